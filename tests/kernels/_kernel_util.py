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
