"""GPTQ: the solver against closed forms and a slow reference; the method on tiny models."""

from __future__ import annotations

import pytest
import torch

from tiny_models import make_tiny_model
from quantkit.calib.pipeline import run_layerwise
from quantkit.methods.base import get_method
from quantkit.models.adapter import ModelAdapter
from quantkit.quant.core import compute_qparams, fake_quantize, quantize_weight
from quantkit.quant.gptq import CholeskyError, gptq_quantize, hessian_error
from quantkit.recipe import QuantArgs, RecipeError, Scheme

OUT, IN = 32, 64  # an nn.Linear(64, 32)


def _correlated_inputs(n: int, k: int, seed: int, dead: tuple[int, ...] = ()) -> torch.Tensor:
    """X (n, k) with correlated columns of different scales (like real activations)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g, dtype=torch.float64) / k**0.5 + torch.eye(k, dtype=torch.float64)
    x = torch.randn(n, k, generator=g, dtype=torch.float64) @ mix
    x = x * torch.linspace(0.2, 3.0, k, dtype=torch.float64)[torch.randperm(k, generator=g)]
    for c in dead:
        x[:, c] = 0
    return x


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.T @ x / x.shape[0]


def _weight(seed: int, out: int = OUT, k: int = IN, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(out, k, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 0.1


def _reference_gptq(w, h, args, *, damp, act_order):
    """Slow, obviously-correct OBQ: one column at a time, updating every remaining column
    with the explicit inverse of the remaining Hessian (full inverse + rank-1 removal);
    no Cholesky, no lazy blocks. Returns integers (out, in) in the original order, scale, zero."""
    W = w.double().clone()
    H = h.double().clone()
    k = W.shape[1]
    for c in range(k):
        if H[c, c] == 0:  # dead input: the same convention as the solver
            H[c, c] = 1
            W[:, c] = 0
    H += damp * H.diagonal().mean() * torch.eye(k, dtype=H.dtype)
    order = torch.argsort(H.diagonal(), descending=True, stable=True).tolist() if act_order else list(range(k))
    g = k if args.group_size is None else args.group_size
    static = args.group_size is None or act_order
    if static:
        scale, zero = compute_qparams(W, args, scale_dtype=torch.float32)
    else:
        scale = torch.zeros(W.shape[0], k // g)
        zero = None if args.symmetric else torch.zeros(W.shape[0], k // g, dtype=torch.int8)
    hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    for pos, c in enumerate(order):
        if not static and c % g == 0:
            s_g, z_g = compute_qparams(W[:, c : c + g], args, scale_dtype=torch.float32)
            scale[:, c // g] = s_g[:, 0]
            if zero is not None:
                zero[:, c // g] = z_g[:, 0]
        gi = 0 if args.group_size is None else c // g
        s = scale[:, gi].double()
        z = zero[:, gi].double() if zero is not None else 0.0
        q = (torch.round(W[:, c] / s) + z).clamp(args.qmin, args.qmax)
        Q[:, c] = q
        rest = order[pos + 1 :]
        delta = (W[:, c] - (q - z) * s) / hinv[c, c]
        W[:, rest] -= delta[:, None] * hinv[c, rest][None, :]
        hinv = hinv - hinv[:, c : c + 1] @ hinv[c : c + 1, :] / hinv[c, c]
    return Q.to(torch.int8), scale, zero


# ------------------------------------------------------------------ closed forms


@pytest.mark.parametrize("group_size", [16, None])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_diagonal_hessian_equals_rtn(group_size, symmetric, act_order):
    # A diagonal H means independent inputs: no error is worth moving, GPTQ == RTN exactly.
    args = QuantArgs(4, group_size, symmetric)
    w = _weight(1, dtype=torch.float32)
    h = torch.diag(torch.rand(IN, generator=torch.Generator().manual_seed(2)) + 0.1)
    res = gptq_quantize(w, h, args, act_order=act_order, block_size=8)
    rtn = quantize_weight(w, args)
    assert torch.equal(res.qt.q, rtn.q)
    assert torch.equal(res.qt.scale, rtn.scale)
    assert (res.qt.zero is None) == symmetric and (symmetric or torch.equal(res.qt.zero, rtn.zero))
    assert res.error == pytest.approx(hessian_error(w, rtn.dequantize(), h), rel=1e-6)


def test_single_column_equals_rtn():
    args = QuantArgs(3, None, False)
    w = _weight(3, k=1, dtype=torch.float32)
    res = gptq_quantize(w, torch.tensor([[0.7]]), args)
    assert torch.equal(res.qt.q, quantize_weight(w, args).q)


def test_two_columns_by_hand():
    # H = [[a, b], [b, c]], so H^-1 = [[c, -b], [-b, a]] / (ac - b^2) and the
    # OBQ update of column 1 is w1 -= (w0 - q0) * Hinv[0,1] / Hinv[0,0] = (w0 - q0) * (-b / c).
    a, b, c = 2.0, 0.9, 1.5
    h = torch.tensor([[a, b], [b, c]], dtype=torch.float64)
    args = QuantArgs(4, None, True)
    w = _weight(4, k=2)
    res = gptq_quantize(w, h, args, damp=0.0)
    scale = compute_qparams(w, args, scale_dtype=torch.float32)[0][:, 0].double()  # per-channel, original W
    q0 = torch.round(w[:, 0] / scale).clamp(args.qmin, args.qmax)
    hinv01_over_00 = (-b / (a * c - b * b)) / (c / (a * c - b * b))
    w1_updated = w[:, 1] - (w[:, 0] - q0 * scale) * hinv01_over_00
    q1 = torch.round(w1_updated / scale).clamp(args.qmin, args.qmax)
    assert torch.equal(res.qt.q[:, 0], q0.to(torch.int8))
    assert torch.equal(res.qt.q[:, 1], q1.to(torch.int8))
    # The update matters: some rows round differently from plain RTN.
    assert (res.qt.q[:, 1] != quantize_weight(w, args).q[:, 1]).sum() >= 3
    assert res.damp == 0.0


# ------------------------------------------------------------------ against the slow reference


@pytest.mark.parametrize("block_size", [128, 8, 24])
@pytest.mark.parametrize("group_size", [16, None])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_matches_reference(block_size, group_size, symmetric, act_order):
    # block 8 forces 8 lazy blocks; block 24 makes groups of 16 start mid-block and
    # straddle two blocks (their scales must include the pending lazy updates).
    args = QuantArgs(4, group_size, symmetric)
    w = _weight(10)
    h = _hessian(_correlated_inputs(256, IN, seed=11, dead=(5,)))
    res = gptq_quantize(w, h, args, damp=0.01, block_size=block_size, act_order=act_order)
    q, scale, zero = _reference_gptq(w, h, args, damp=0.01, act_order=act_order)
    assert torch.equal(res.qt.q, q)
    torch.testing.assert_close(res.qt.scale, scale, rtol=1e-6, atol=0)
    if zero is not None:
        assert torch.equal(res.qt.zero, zero)
    assert (res.perm is not None) == act_order
    # Not RTN in disguise: the error feedback changed many integers.
    assert (res.qt.q != quantize_weight(w, args).q).float().mean() > 0.1


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_matches_reference_other_bits(bits):
    args = QuantArgs(bits, 16, False)
    w = _weight(12)
    h = _hessian(_correlated_inputs(256, IN, seed=13))
    res = gptq_quantize(w, h, args, block_size=8, act_order=True)
    assert torch.equal(res.qt.q, _reference_gptq(w, h, args, damp=0.01, act_order=True)[0])
    assert int(res.qt.q.min()) >= args.qmin and int(res.qt.q.max()) <= args.qmax


def test_act_order_keeps_standard_layout():
    # Static groups: scales are the RTN scales of the original weight, group of column c = c // g.
    args = QuantArgs(4, 16, False)
    w = _weight(14, dtype=torch.float32)
    h = _hessian(_correlated_inputs(256, IN, seed=15)).float()
    res = gptq_quantize(w, h, args, act_order=True)
    rtn = quantize_weight(w, args)
    assert torch.equal(res.qt.scale, rtn.scale) and torch.equal(res.qt.zero, rtn.zero)
    assert not torch.equal(res.perm, torch.arange(IN))
    assert torch.equal(res.perm, torch.argsort(h.diagonal(), descending=True, stable=True))


def test_scales_rounded_like_rtn():
    # Scales are stored in the model dtype: rounded as RTN rounds them (exact export).
    args = QuantArgs(4, None, True)
    w = _weight(16, dtype=torch.bfloat16)
    h = _hessian(_correlated_inputs(128, IN, seed=17)).float()
    res = gptq_quantize(w, h, args)
    assert torch.equal(res.qt.scale, res.qt.scale.to(torch.bfloat16).float())
    assert torch.equal(res.qt.scale, quantize_weight(w, args).scale)


# ------------------------------------------------------------------ better than RTN


@pytest.mark.parametrize("args", [QuantArgs(4, 16, False), QuantArgs(3, None, True), QuantArgs(4, 32, True)])
@pytest.mark.parametrize("act_order", [False, True])
def test_error_below_rtn(args, act_order):
    w = _weight(20, dtype=torch.float32)
    h = _hessian(_correlated_inputs(512, IN, seed=21)).float()
    res = gptq_quantize(w, h, args, act_order=act_order)
    rtn_err = hessian_error(w, fake_quantize(w, args), h)
    assert res.error < 0.75 * rtn_err, (res.error, rtn_err)
    assert res.error == pytest.approx(hessian_error(w, res.qt.dequantize(), h), rel=1e-5)


@pytest.mark.parametrize("args", [QuantArgs(4, 16, False), QuantArgs(4, 32, True), QuantArgs(3, None, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_refit_scales_solves_gptq_objective_per_row(args, dtype):
    """refit_scales keeps GPTQ's integers and zero points; each row's scales are the least-squares optimum of
    (w - w_hat) H (w - w_hat)^T (checked against a per-row solve on an explicit design matrix), stored in the
    weight's dtype, and the error is lower than GPTQ's own on every row."""
    from quantkit.quant.gptq import _row_hessian_error

    w = _weight(12, dtype=dtype)
    h = _hessian(_correlated_inputs(512, IN, seed=23)).float()
    base = gptq_quantize(w, h, args, act_order=True)
    res = gptq_quantize(w, h, args, act_order=True, refit_scales=True)
    assert torch.equal(res.qt.q, base.qt.q)
    assert (res.qt.zero is None) == (base.qt.zero is None) and (res.qt.zero is None or torch.equal(res.qt.zero,
                                                                                                    base.qt.zero))
    assert torch.equal(res.qt.scale, res.qt.scale.to(dtype).float())  # exact in the stored dtype
    assert not torch.equal(res.qt.scale, base.qt.scale)
    e0, e1 = _row_hessian_error(w, base.qt, h), _row_hessian_error(w, res.qt, h)
    assert (e1 <= e0).all() and e1.sum() < 0.99 * e0.sum()
    assert res.error == pytest.approx(hessian_error(w, res.qt.dequantize(), h), rel=1e-5)
    # the reference: one row's scales from the normal equations on an explicit (in, groups) design matrix
    qt, H, n_groups = base.qt, h.double(), base.qt.scale.shape[1]
    g = IN // n_groups
    for r in (0, 7):
        d = qt.q[r].double() - (0.0 if qt.zero is None else qt.zero[r].double().repeat_interleave(g))
        x = torch.zeros(IN, n_groups, dtype=torch.float64)
        for k in range(n_groups):
            x[k * g:(k + 1) * g, k] = d[k * g:(k + 1) * g]
        want = torch.linalg.solve(x.T @ H @ x, x.T @ H @ w[r].double())
        tol = 1e-5 if dtype == torch.float32 else 8e-3
        torch.testing.assert_close(res.qt.scale[r].double(), want.to(dtype).double(), rtol=tol, atol=0)


# ------------------------------------------------------------------ damping, failures, dead columns


def _with_eigenvalue(low: float, rest: float, seed: int) -> torch.Tensor:
    """A symmetric (IN, IN) matrix with eigenvalues `rest` and one `low`, randomly rotated."""
    qmat, _ = torch.linalg.qr(torch.randn(IN, IN, generator=torch.Generator().manual_seed(seed)))
    ev = torch.full((IN,), rest)
    ev[0] = low
    return (qmat * ev) @ qmat.T


def test_damping_is_raised_when_needed():
    w = _weight(30, dtype=torch.float32)
    h = _with_eigenvalue(-0.05, 1.0, seed=31)  # needs damp > 0.05 / mean diag (~1)
    res = gptq_quantize(w, h, QuantArgs(4, 16, True), damp=0.01)
    assert res.damp == pytest.approx(0.1)
    assert torch.isfinite(res.qt.dequantize()).all()


def test_hopeless_hessian_raises():
    w = _weight(32, dtype=torch.float32)
    with pytest.raises(CholeskyError, match="not positive definite even with damp 10"):
        gptq_quantize(w, _with_eigenvalue(-300.0, 10.0, seed=33), QuantArgs(4, 16, True))
    with pytest.raises(CholeskyError, match="NaN"):
        gptq_quantize(w, torch.full((IN, IN), float("nan")), QuantArgs(4, 16, True))
    with pytest.raises(CholeskyError, match="mean"):
        gptq_quantize(w, -torch.eye(IN), QuantArgs(4, 16, True))


@pytest.mark.parametrize("act_order", [False, True])
def test_dead_columns(act_order):
    args = QuantArgs(4, 16, False)
    w = _weight(34, dtype=torch.float32)
    dead = (0, 7, 40)
    h = _hessian(_correlated_inputs(128, IN, seed=35, dead=dead)).float()
    res = gptq_quantize(w, h, args, act_order=act_order, block_size=8)
    deq = res.qt.dequantize()
    assert res.dead == 3 and torch.isfinite(deq).all()
    assert torch.all(deq[:, list(dead)] == 0)  # dead columns are exactly zero
    assert res.error < hessian_error(w, fake_quantize(w, args), h)
    # Everything dead: H becomes I, the weight all-zero columns; still no NaN.
    res0 = gptq_quantize(w, torch.zeros(IN, IN), args)
    assert torch.all(res0.qt.dequantize() == 0) and res0.dead == IN


def test_backend_choice():
    args = QuantArgs(4, 16, True)
    w = _weight(1, dtype=torch.float32)
    h = _hessian(_correlated_inputs(128, IN, seed=2)).float()
    assert gptq_quantize(w, h, args).backend == "torch"  # auto on a CPU tensor: the torch loop
    assert gptq_quantize(w, h, args, backend="torch").backend == "torch"
    with pytest.raises(ValueError, match="backend='cuda'; choose one of auto, torch, triton"):
        gptq_quantize(w, h, args, backend="cuda")
    with pytest.raises(ValueError, match="runs in float32"):
        gptq_quantize(w, h.double(), args, backend="triton")
    # float64 under auto stays on torch (the reference tests rely on it)
    assert gptq_quantize(w, h.double(), args, backend="auto").backend == "torch"


def test_auto_falls_back_to_torch_when_the_kernel_fails(monkeypatch):
    import quantkit.quant.gptq as mod

    def broken(*a, **k):
        a[0].add_(1.0)  # a failure after W was already touched: the fallback must start over
        raise RuntimeError("no kernel here")

    args = QuantArgs(4, 16, False)
    w = _weight(3, dtype=torch.float32)
    h = _hessian(_correlated_inputs(128, IN, seed=4)).float()
    ref = gptq_quantize(w, h, args, act_order=True, backend="torch")
    monkeypatch.setattr(mod, "_pick_backend", lambda *a, **k: "triton")
    monkeypatch.setattr(mod, "_solve_triton", broken)
    monkeypatch.setattr(mod, "_fallback_warned", False)
    with pytest.warns(RuntimeWarning, match="Triton GPTQ solve failed"):
        res = gptq_quantize(w, h, args, act_order=True, backend="auto")
    assert res.backend == "torch" and torch.equal(res.qt.q, ref.qt.q) and torch.equal(res.qt.scale, ref.qt.scale)
    with pytest.raises(RuntimeError, match="no kernel here"):
        gptq_quantize(w, h, args, act_order=True, backend="triton")


def test_shape_checks():
    with pytest.raises(ValueError, match="does not match"):
        gptq_quantize(_weight(1), torch.eye(IN - 1), QuantArgs(4, 16, True))
    with pytest.raises(ValueError, match="does not divide"):
        gptq_quantize(_weight(1), torch.eye(IN), QuantArgs(4, 24, True))


# ------------------------------------------------------------------ the method


@pytest.mark.parametrize(
    "opts,match",
    [
        ({"damp": 0}, "damp=0 must be a number in \\(0, 1\\]"),
        ({"damp": 1.5}, "damp=1.5"),
        ({"damp": True}, "damp=True"),
        ({"block_size": 0}, "block_size=0 must be a positive integer"),
        ({"block_size": 12.5}, "block_size=12.5"),
        ({"act_order": "yes"}, "act_order='yes' must be true or false"),
        ({"true_sequential": 1}, "true_sequential=1"),
        ({"blocksize": 128}, "no option"),
        ({"backend": "cuda"}, "backend='cuda' must be one of auto, torch, triton"),
    ],
)
def test_options_validated(opts, match):
    with pytest.raises(RecipeError, match=match):
        get_method("gptq")(Scheme(), **opts)


def test_options_accepted():
    m = get_method("gptq")(Scheme(), damp=1, block_size=64, act_order=True, true_sequential=False)
    assert (m.damp, m.block_size, m.act_order, m.true_sequential) == (1.0, 64, True, False)


def test_gptq_must_be_last_stage():
    model = make_tiny_model("llama", seed=1)
    m = get_method("gptq")(Scheme(QuantArgs(4, 32, True)))
    m.final = False
    with pytest.raises(RecipeError, match="last stage"):
        run_layerwise(model, torch.randint(0, 512, (2, 16)), [m])


def _calib(seed: int, n: int = 8, seqlen: int = 32) -> torch.Tensor:
    return torch.randint(0, 512, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _output_mse(model, ref_hidden, ids) -> float:
    with torch.no_grad():
        out = model.model(input_ids=ids).last_hidden_state
    return float(((out - ref_hidden) ** 2).mean())


def test_end_to_end_tiny_models(tiny_arch):
    args = QuantArgs(3, 16, False)
    ids = _calib(40)
    ref = make_tiny_model(tiny_arch, seed=41)
    with torch.no_grad():
        ref_hidden = ref.model(input_ids=ids).last_hidden_state
    rtn_model = make_tiny_model(tiny_arch, seed=41)
    run_layerwise(rtn_model, ids, [get_method("rtn")(Scheme(args))])
    model = make_tiny_model(tiny_arch, seed=41)
    res = run_layerwise(model, ids, [get_method("gptq")(Scheme(args))], batch_size=3, ignore=("lm_head",))
    linears = ModelAdapter.for_model(model).all_linears()
    assert set(res.results) == set(linears) and len(res.results) == 21
    for name, lin in linears.items():
        qt = res.results[name]
        assert qt.q.device.type == "cpu" and qt.q.shape == lin.weight.shape
        assert torch.equal(lin.weight, qt.dequantize(lin.weight.dtype))  # the model holds exactly the export
    assert not res.warnings
    held = _calib(42, n=2)
    with torch.no_grad():
        loss = model(input_ids=held, labels=held).loss
    assert torch.isfinite(loss)
    mse_gptq, mse_rtn = _output_mse(model, ref_hidden, ids), _output_mse(rtn_model, ref_hidden, ids)
    assert mse_gptq < 0.7 * mse_rtn, (mse_gptq, mse_rtn)


def test_true_sequential_off_and_act_order():
    args = QuantArgs(4, 16, True)
    ids = _calib(50)
    ref = make_tiny_model("qwen2", seed=51)
    with torch.no_grad():
        ref_hidden = ref.model(input_ids=ids).last_hidden_state
    mses = {}
    for opts in ({"true_sequential": False}, {"act_order": True, "block_size": 8}, {}):
        model = make_tiny_model("qwen2", seed=51)
        res = run_layerwise(model, ids, [get_method("gptq")(Scheme(args), **opts)])
        assert len(res.results) == 21
        mses[str(opts)] = _output_mse(model, ref_hidden, ids)
    rtn_model = make_tiny_model("qwen2", seed=51)
    run_layerwise(rtn_model, ids, [get_method("rtn")(Scheme(args))])
    rtn = _output_mse(rtn_model, ref_hidden, ids)
    assert all(m < 0.8 * rtn for m in mses.values()), (mses, rtn)


def test_single_step_matches_direct_solve():
    """First step of block 0: the stacked q/k/v solve equals solving each with the input Hessian."""
    from quantkit.calib.capture import capture_inputs

    args = QuantArgs(4, 16, False)
    ids = _calib(60, n=4)
    model = make_tiny_model("llama", seed=61)
    attn = model.model.layers[0].self_attn
    with capture_inputs({"q": attn.q_proj}, {"hessian"}) as st:
        with torch.no_grad():
            model(input_ids=ids)
    h = st["q"].hessian
    from quantkit.methods.gptq import DEFAULTS

    method = get_method("gptq")(Scheme(args))
    assert method.mse is not None and method.mse.weight == "hessian"  # the default at 4 bits: the weighted search
    expect = {
        n: gptq_quantize(getattr(attn, n).weight.data, h, args, act_order=DEFAULTS["act_order"], mse=method.mse).qt
        for n in ("q_proj", "k_proj", "v_proj")
    }
    res = run_layerwise(model, ids, [method], batch_size=2)
    for n, qt in expect.items():
        got = res.results[f"model.layers.0.self_attn.{n}"]
        assert (got.q != qt.q).float().mean() < 0.002  # same solve; batched Hessian sums may differ in the last bit
        torch.testing.assert_close(got.scale, qt.scale)


def test_fallback_to_rtn_with_warning(monkeypatch):
    """A Hessian that cannot be factored: that step falls back to RTN, the rest is GPTQ, a warning says so."""
    import quantkit.methods.gptq as mod

    real = mod.gptq_quantize
    calls = []

    def solver(w, h, args, **kw):
        calls.append(w.shape)
        if len(calls) % 4 == 2:  # the o_proj step of every block
            h = h - 1e3 * torch.eye(h.shape[0]) * h.diagonal().mean()  # strongly negative definite
        return real(w, h, args, **kw)

    monkeypatch.setattr(mod, "gptq_quantize", solver)
    args = QuantArgs(4, 32, True)
    model = make_tiny_model("llama", seed=70)
    originals = {k: v.weight.detach().clone() for k, v in ModelAdapter.for_model(model).all_linears().items()}
    res = run_layerwise(model, _calib(71), [get_method("gptq")(Scheme(args))])
    assert len(calls) == 12 and len(res.results) == 21
    assert len(res.warnings) == 3 and all("o_proj" in w and "RTN" in w for w in res.warnings)
    for i in range(3):
        name = f"model.layers.{i}.self_attn.o_proj"
        assert torch.equal(res.results[name].q, quantize_weight(originals[name], args).q)
    q_name = "model.layers.1.self_attn.q_proj"  # not the fallback: differs from RTN
    assert not torch.equal(res.results[q_name].q, quantize_weight(originals[q_name], args).q)


def test_hooks_and_forward_restored():
    model = make_tiny_model("mistral", seed=80)
    ids = _calib(81, n=2)
    run_layerwise(model, ids, [get_method("gptq")(Scheme(QuantArgs(4, 32, True)))])
    for block in model.model.layers:
        assert "forward" not in block.__dict__
        for m in block.modules():
            assert not m._forward_pre_hooks and not m._forward_hooks


class _FoldScales:
    """A transform stage (like AWQ): input_layernorm *= s, q/k/v columns /= s; the function is unchanged."""

    @staticmethod
    def apply(block) -> None:
        s = torch.linspace(0.5, 2.0, block.input_layernorm.weight.shape[0])
        block.input_layernorm.weight.data.mul_(s)
        for n in ("q_proj", "k_proj", "v_proj"):
            getattr(block.self_attn, n).weight.data.div_(s)


def test_after_a_transform_stage_uses_fresh_hessians():
    """GPTQ after a stage that changed the block == GPTQ on the already-changed model:
    the Hessians are taken from the block as the earlier stage left it, not from the capture pass.

    gptaq off: with it, path a's reference stream is the original float model's and path b's the folded one's,
    equal only up to float rounding (the fold multiplies and divides by s), and a code at a rounding boundary
    then flips on some CPUs (seen with 2 threads on an AVX-512 machine), which says nothing about the Hessians."""
    from quantkit.methods.base import Method

    class Fold(Method):
        def apply_block(self, ctx):
            _FoldScales.apply(ctx.block)

    args = QuantArgs(4, 16, False)
    ids = _calib(90, n=4)
    fold = Fold(Scheme(args))
    fold.final = False
    a = make_tiny_model("llama", seed=91)
    res_a = run_layerwise(a, ids, [fold, get_method("gptq")(Scheme(args), gptaq=0.0)])
    b = make_tiny_model("llama", seed=91)
    for block in b.model.layers:
        _FoldScales.apply(block)
    res_b = run_layerwise(b, ids, [get_method("gptq")(Scheme(args), gptaq=0.0)])
    for name in res_b.results:
        assert torch.equal(res_a.results[name].q, res_b.results[name].q), name


def test_api_quantize_export_and_read_back(tmp_path, tiny_tokenizer):
    from quantkit import api
    from quantkit.calib.data import CalibrationSet
    from quantkit.models.checkpoint import load_quantkit_checkpoint
    from quantkit.models.loading import LoadedModel
    from quantkit.recipe import Recipe, Stage

    model = make_tiny_model("qwen3", seed=95, dtype=torch.bfloat16)
    recipe = Recipe(Scheme(QuantArgs(4, 16, False)), (Stage("gptq", {"act_order": True}),))
    calib = CalibrationSet(_calib(96), {"source": "random tokens (test)"})
    qm = api.quantize(LoadedModel(model, tiny_tokenizer, {"kind": "test"}), recipe, calib_set=calib)
    assert len(qm.modules) == 21
    out = api.export(qm, tmp_path / "ckpt")
    loaded, _, manifest = load_quantkit_checkpoint(out)
    assert len(manifest["modules"]) == 21 and loaded.dtype == torch.bfloat16
    a, b = model.state_dict(), loaded.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # scales rounded to bf16 as stored: the export is exact
    ids = _calib(97, n=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


# ------------------------------------------------------------------ asymmetric calibration (gptaq)


def test_asymmetric_target_is_the_least_squares_weight():
    """asymmetric_target(w) is the ridge solution of min |w X_float - v X|^2 + lam |w - v|^2 (explicit normal
    equations on the token matrices), and GPTQ on it beats GPTQ on w for the asymmetric objective."""
    from quantkit.quant.gptq import asymmetric_target

    x = _correlated_inputs(400, IN, seed=3)  # what the layer sees in the quantized model
    g = torch.Generator().manual_seed(4)
    x_float = x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64) * x.std(0)  # the float model's
    w = _weight(5)
    n = x.shape[0]
    h = 2 * x.T @ x / n
    cross = 2 * (x_float - x).T @ x / n
    dead = torch.zeros(IN, dtype=torch.bool)
    lam = 0.01 * h.diagonal().mean()
    got = asymmetric_target(w, h, cross, dead, lam, torch.float64)
    # normal equations of sum_t |x_float_t w^T - x_t v^T|^2 (scaled 2/n) + lam |w - v|^2
    lhs = h + lam * torch.eye(IN, dtype=torch.float64)
    rhs = 2 * x.T @ x_float / n @ w.T + lam * w.T
    want = torch.linalg.solve(lhs, rhs).T
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert (got - w).abs().max() > 1e-2  # the inputs differ: the target moved
    # the option's strength scales the cross term: the target moves that fraction of the way
    torch.testing.assert_close(asymmetric_target(w, h, 0.25 * cross, dead, lam, torch.float64), w + 0.25 * (got - w))

    def asym_err(v):
        return float(((x_float @ w.T - x @ v.T) ** 2).sum())

    args = QuantArgs(4, 16, False)
    plain = gptq_quantize(w, h, args, act_order=True).qt.dequantize(torch.float64)
    asym = gptq_quantize(w, h, args, act_order=True, cross=cross).qt.dequantize(torch.float64)
    floor = asym_err(got)  # what no quantization can remove (x_float is not a function of x)
    assert asym_err(asym) - floor < 0.8 * (asym_err(plain) - floor), (asym_err(asym), asym_err(plain), floor)
    # no difference in the inputs: exactly GPTQ
    same = gptq_quantize(w, h, args, act_order=True, cross=torch.zeros_like(h)).qt
    ref = gptq_quantize(w, h, args, act_order=True).qt
    assert torch.equal(same.q, ref.q) and torch.equal(same.scale, ref.scale)


def test_gptaq_option_end_to_end():
    """Block 0's first step sees the float model's own inputs, so gptaq solves it as GPTQ does; over the whole
    model the quantized outputs end closer to the float model's on the calibration tokens."""
    args = QuantArgs(3, 16, False)
    ids = _calib(70, n=6)
    ref = make_tiny_model("llama", seed=71)
    with torch.no_grad():
        ref_hidden = ref.model(input_ids=ids).last_hidden_state
    out = {}
    for opts in ({"gptaq": 0.0}, {"gptaq": 1.0}):
        model = make_tiny_model("llama", seed=71)
        method = get_method("gptq")(Scheme(args), **opts)
        assert method.needs_reference == bool(opts["gptaq"])
        res = run_layerwise(model, ids, [method], batch_size=2)
        assert len(res.results) == 21 and not res.warnings
        out[bool(opts["gptaq"])] = (res, _output_mse(model, ref_hidden, ids))
    first = [f"model.layers.0.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")]
    for n in first:
        assert torch.equal(out[True][0].results[n].q, out[False][0].results[n].q), n
    later = "model.layers.1.mlp.down_proj"
    assert not torch.equal(out[True][0].results[later].q, out[False][0].results[later].q)
    assert out[True][1] < 0.9 * out[False][1], (out[True][1], out[False][1])


def test_gptaq_needs_the_reference_stream():
    from quantkit.methods.base import BlockContext

    model = make_tiny_model("llama", seed=72)
    block = model.model.layers[0]
    method = get_method("gptq")(Scheme(QuantArgs(4, 16, False)), gptaq=1.0)
    ctx = BlockContext(0, "model.layers.0", block, {"model.layers.0.mlp.down_proj": block.mlp.down_proj}, {},
                       lambda: [], torch.device("cpu"))
    with pytest.raises(RecipeError, match="float model's activations"):
        method.apply_block(ctx)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_gptaq_on_moe_pairs_dense_steps_only(arch):
    """An expert sees different tokens in the two models (routing follows the activations), so its steps get plain
    Hessians; attention and shared layers are fit to the float model. Every linear is quantized."""
    args = QuantArgs(4, 16, False)
    ids = _calib(80, n=6)
    out = {}
    for opts in ({"gptaq": 0.0}, {"gptaq": 1.0}):
        model = make_tiny_model(arch, seed=81)
        res = run_layerwise(model, ids, [get_method("gptq")(Scheme(args), expert_min_tokens=0, **opts)], batch_size=3)
        assert set(res.results) == set(ModelAdapter.for_model(model).all_linears())
        out[bool(opts["gptaq"])] = res.results
    o_proj = "model.layers.1.self_attn.o_proj"
    assert not torch.equal(out[True][o_proj].q, out[False][o_proj].q)


def test_gptaq_without_true_sequential():
    """One capture of every step (true_sequential false) pairs all of them in one pass over each batch; with the
    strength at 0 it is GPTQ itself."""
    args = QuantArgs(4, 16, False)
    ids = _calib(90, n=4)
    out = {}
    for alpha in (0.0, 0.5):
        model = make_tiny_model("llama", seed=91, num_hidden_layers=2)
        res = run_layerwise(model, ids, [get_method("gptq")(Scheme(args), true_sequential=False, gptaq=alpha)],
                            batch_size=2)
        assert len(res.results) == 14 and not res.warnings
        out[alpha] = res.results
    plain = run_layerwise(make_tiny_model("llama", seed=91, num_hidden_layers=2), ids,
                          [get_method("gptq")(Scheme(args), true_sequential=False, gptaq=0.0)], batch_size=2).results
    assert all(torch.equal(out[0.0][k].q, plain[k].q) for k in plain)
    assert not torch.equal(out[0.5]["model.layers.1.self_attn.q_proj"].q, plain["model.layers.1.self_attn.q_proj"].q)


def test_gptaq_auto_is_on_for_low_bit_weight_only_schemes():
    from quantkit.methods.gptq import AUTO_GPTAQ
    from quantkit.recipe import PRESETS

    gptq = get_method("gptq")
    assert 0 < AUTO_GPTAQ <= 1
    assert gptq(Scheme(QuantArgs(4, 64, False))).gptaq == AUTO_GPTAQ
    assert gptq(Scheme(QuantArgs(3, 64, False))).needs_reference
    assert gptq(Scheme(QuantArgs(8, None, True))).gptaq == 0.0  # 8-bit weights: not measured, off
    assert gptq(PRESETS["W8A8"]).gptaq == 0.0 and not gptq(PRESETS["W8A8"]).needs_reference
    assert gptq(Scheme(QuantArgs(4, 64, False)), gptaq=0.5).gptaq == 0.5
    assert gptq(Scheme(QuantArgs(4, 64, False)), gptaq=0).needs_reference is False
