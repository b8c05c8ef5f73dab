import torch


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error; inf if y has a NaN/Inf (poisoned element never written)."""
    y = y.double()
    ref = ref.double()
    if not torch.isfinite(y).all():
        return float("inf")
    return ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def poison(shape, dtype, device):
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, -(2**31) if dtype == torch.int32 else -128, dtype=dtype, device=device)


def randw(gen, shape, lo, hi, device):
    """Random signed ints in [lo, hi], never all zero."""
    q = torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int8).to(device)
    q[q == 0] = 1
    return q


def chained_calls_match(call, x0: torch.Tensor, plain: dict, chain: dict, steps: int = 6) -> list:
    """``PDL_CHAIN``'s GPU check: ``steps`` calls ``call(x, cfg, out)`` (N = K), each fed the previous one's output,
    on ``chain`` give bit for bit the outputs on ``plain``, eager and replayed three times from a CUDA graph with
    every output poisoned before each replay (a launch that read its input too early, or reused a scratch the
    previous call still read, would not). Returns the plain chain's outputs (finite)."""
    ys = [poison(x0.shape, x0.dtype, x0.device) for _ in range(steps)]

    def run(cfg):
        x = x0
        for y in ys:
            x = call(x, cfg, y)
        return [y.clone() for y in ys]

    want = run(plain)
    assert all(torch.isfinite(y).all() for y in want)
    for y in ys:
        y.fill_(float("nan"))
    assert all(torch.equal(a, b) for a, b in zip(run(chain), want))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(chain)
    for _ in range(3):
        for y in ys:
            y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(y, w) for y, w in zip(ys, want))
    return want
