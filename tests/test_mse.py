"""The per-group MSE range search (quant.mse): against a brute force on small tensors, inside GPTQ against the
slow reference solve, and off = today's results bit for bit (RTN and GPTQ)."""

from __future__ import annotations

import pytest
import torch

import test_gptq as tg
from quantkit.methods.base import get_method
from quantkit.quant.core import compute_qparams, dequantize, fake_quantize, quantize, quantize_weight
from quantkit.quant.gptq import gptq_quantize
from quantkit.quant.mse import MSESearch, from_options, group_errors, mse_qparams
from quantkit.recipe import PRESETS, QuantArgs, RecipeError, Scheme
from tiny_models import run_cli


def _heavy(seed: int, out: int = 6, k: int = 64, dtype=torch.float32) -> torch.Tensor:
    """Weights with a few large entries per row (Student-t, 3 degrees of freedom): where min/max scales
    waste the grid."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(out, k, generator=g, dtype=torch.float64)
    chi = torch.randn(out, k, 3, generator=g, dtype=torch.float64).pow(2).mean(-1)
    return (z / chi.sqrt() * 0.05).to(dtype)


@pytest.mark.parametrize("args", [QuantArgs(4, 16, False), QuantArgs(4, 16, True), QuantArgs(3, 32, False),
                                  QuantArgs(4, None, False)])
@pytest.mark.parametrize("norm", [2.0, 2.4])
def test_chosen_shrink_is_the_brute_force_minimum(args, norm):
    w = _heavy(1)
    shrinks = MSESearch(grid=21, max_shrink=0.6).shrinks()
    assert shrinks[0] == 1.0 and abs(shrinks[-1] - 0.4) < 1e-12 and len(shrinks) == 21
    scale, zero, pick = mse_qparams(w, args, shrinks, norm=norm)
    g = w.shape[1] if args.group_size is None else args.group_size
    one = QuantArgs(args.bits, None, args.symmetric)
    n_better = 0
    for r in range(w.shape[0]):
        for gi in range(w.shape[1] // g):
            grp = w[r : r + 1, gi * g : (gi + 1) * g]  # this group alone, one scale
            errs = []
            for p in shrinks:
                s, z = compute_qparams(grp, one, shrink=p)
                q = torch.clamp(torch.round(grp / s) + (0 if z is None else z.float()), one.qmin, one.qmax)
                dq = (q - (0 if z is None else z.float())) * s
                errs.append(float((grp - dq).abs().pow(norm).sum()))
            best = min(range(len(shrinks)), key=lambda i: (errs[i], i))  # first minimum: the larger shrink
            assert float(pick[r, gi]) == float(torch.tensor(shrinks[best], dtype=torch.float32))
            s, z = compute_qparams(grp, one, shrink=shrinks[best])
            assert float(scale[r, gi]) == float(s[0, 0])
            if z is not None:
                assert int(zero[r, gi]) == int(z[0, 0])
            n_better += errs[best] < errs[0]
    assert n_better > 0  # heavy tails: some group is better clipped


def test_column_weights_are_brute_force_minimum():
    args = QuantArgs(4, 16, False)
    w = _heavy(5)
    cw = torch.rand(64, generator=torch.Generator().manual_seed(1)) ** 4 * 10  # a few columns dominate
    shrinks = MSESearch(grid=15).shrinks()
    scale, zero, pick = mse_qparams(w, args, shrinks, col_weight=cw)
    _, _, plain = mse_qparams(w, args, shrinks)
    one = QuantArgs(4, None, False)
    for r in range(w.shape[0]):
        for gi in range(4):
            grp, c = w[r : r + 1, gi * 16 : gi * 16 + 16], cw[gi * 16 : gi * 16 + 16]
            errs = []
            for p in shrinks:
                s, z = compute_qparams(grp, one, shrink=p)
                errs.append(float(((grp - dequantize(quantize(grp, s, z, one), s, z, one)).abs() ** 2.4 * c).sum()))
            best = min(range(len(shrinks)), key=lambda i: (errs[i], i))
            assert float(pick[r, gi]) == float(torch.tensor(shrinks[best], dtype=torch.float32))
    assert not torch.equal(pick, plain)  # the weights changed some choice


def test_search_lowers_the_error_and_keeps_min_max_when_nothing_beats_it():
    args = QuantArgs(4, 16, False)
    w = _heavy(2, out=32)
    s = MSESearch(grid=26, max_shrink=0.5, norm=2.0)
    scale, zero = s.qparams(w, args)
    err_mse = (w - dequantize(quantize(w, scale, zero, args), scale, zero, args)).pow(2).sum()
    err_rtn = (w - fake_quantize(w, args)).pow(2).sum()
    assert err_mse < 0.98 * err_rtn  # measured 0.96 on these weights
    s0, z0 = compute_qparams(w, args)  # 1.0 is a candidate: no group gets worse
    assert (group_errors(w, scale, zero, args, 2.0) <= group_errors(w, s0, z0, args, 2.0)).all()
    # a grid of one (shrink 1.0 only) is min/max exactly
    s1, z1 = MSESearch(grid=1).qparams(w, args)
    s0, z0 = compute_qparams(w, args)
    assert torch.equal(s1, s0) and torch.equal(z1, z0)


def test_row_chunks_give_the_same_answer(monkeypatch):
    import quantkit.quant.mse as M

    args = QuantArgs(4, 16, False)
    w = _heavy(3, out=20)
    a = mse_qparams(w, args, MSESearch(grid=9).shrinks())
    monkeypatch.setattr(M, "_CHUNK_ELEMS", 3 * 64)  # 3 rows per chunk
    b = mse_qparams(w, args, MSESearch(grid=9).shrinks())
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [16, None])
@pytest.mark.parametrize("block_size", [128, 24])
@pytest.mark.parametrize("weight", ["none", "hessian"])
def test_gptq_searches_where_it_computes_group_scales(monkeypatch, act_order, group_size, block_size, weight):
    # The slow reference with the search in place of compute_qparams: static groups search the original
    # weights, dynamic groups the error-compensated weights when the solve reaches them (block 24: groups
    # of 16 straddle lazy blocks, so the pending updates must be in the searched weights); "hessian"
    # weighs each column's error by the Hessian diagonal.
    args = QuantArgs(4, group_size, False)
    search = MSESearch(grid=11, max_shrink=0.5, norm=2.4, weight=weight)
    w = tg._weight(10)
    h = tg._hessian(tg._correlated_inputs(256, tg.IN, seed=11, dead=(5,)))
    res = gptq_quantize(w, h, args, damp=0.01, block_size=block_size, act_order=act_order, mse=search)
    firsts = iter(range(0, tg.IN, group_size or tg.IN))  # the reference asks for groups in column order

    def ref_qparams(W, a, scale_dtype=None):
        first = next(firsts)
        cw = None if weight == "none" else h.diagonal()[first : first + W.shape[1]]
        return search.qparams(W, a, scale_dtype=scale_dtype, col_weight=cw)

    monkeypatch.setattr(tg, "compute_qparams", ref_qparams)
    q, scale, zero = tg._reference_gptq(w, h, args, damp=0.01, act_order=act_order)
    assert torch.equal(res.qt.q, q)
    torch.testing.assert_close(res.qt.scale, scale, rtol=1e-6, atol=0)
    assert torch.equal(res.qt.zero, zero)
    plain = gptq_quantize(w, h, args, damp=0.01, block_size=block_size, act_order=act_order)
    assert not torch.equal(plain.qt.scale, res.qt.scale)  # the search changed something


@pytest.mark.parametrize("act_order", [False, True])
def test_off_is_bit_identical(act_order):
    # mse=None is the default path; a grid of one (shrink 1.0) runs the search hooks and must agree bit for bit.
    args = QuantArgs(4, 16, False)
    w = tg._weight(4, dtype=torch.float32)
    h = tg._hessian(tg._correlated_inputs(256, tg.IN, seed=5)).float()
    a = gptq_quantize(w, h, args, block_size=24, act_order=act_order)
    b = gptq_quantize(w, h, args, block_size=24, act_order=act_order, mse=MSESearch(grid=1))
    assert torch.equal(a.qt.q, b.qt.q) and torch.equal(a.qt.scale, b.qt.scale) and torch.equal(a.qt.zero, b.qt.zero)


def test_methods_off_equal_today_and_on_search():
    from tiny_models import make_tiny_model

    for method, extra in (("rtn", {}), ("gptq", {"backend": "torch"})):
        assert get_method(method)(PRESETS["W4A16"], mse=False, **extra).mse is None
        assert get_method(method)(PRESETS["W4A16"], mse=True, mse_grid=5, mse_weight="none", mse_norm=2.4,
                                  **extra).mse == MSESearch(grid=5)
    assert get_method("rtn")(PRESETS["W4A16"]).mse is None  # RTN: off unless asked (the plain search hurt it)
    assert get_method("rtn")(PRESETS["W4A16"], mse=True).mse == MSESearch()  # p 2.4, as GPTQModel's mse
    # GPTQ: "auto" = the Hessian-weighted search (p 2) at 2-4 bits, min/max above (BENCHMARKS.md, issue 23)
    weighted = MSESearch(weight="hessian", norm=2.0)
    for bits, want in ((2, weighted), (3, weighted), (4, weighted), (8, None)):
        assert get_method("gptq")(Scheme(QuantArgs(bits, 16, False))).mse == want, bits
    assert get_method("gptq")(PRESETS["W8A16"], mse=True).mse == weighted  # said: on at any width
    assert get_method("gptq")(PRESETS["W4A4KV4"]).mse is None  # activations quantized: not measured, min/max
    assert get_method("gptq")(PRESETS["W4A16"], mse="auto", mse_weight="none").mse == MSESearch(norm=2.0)
    # the Triton solve cannot search without act-order: "auto" means min/max there, an explicit true is refused
    assert get_method("gptq")(PRESETS["W4A16"], backend="triton", act_order=False).mse is None
    # RTN's apply_block: off = quantize_weight (today), on = the search's scales
    lin = make_tiny_model("llama", seed=3).model.layers[0].self_attn.q_proj
    w = lin.weight.data.clone()
    args = QuantArgs(4, 16, False)
    for opts, want in (({}, quantize_weight(w, args)), ({"mse": True}, None)):
        lin.weight.data.copy_(w)

        class Ctx:
            linears = {"q": lin}
            results: dict = {}

        get_method("rtn")(Scheme(args), **opts).apply_block(Ctx)
        got = Ctx.results["q"]
        if want is None:
            scale, zero = MSESearch().qparams(w, args)
            assert torch.equal(got.scale, scale) and torch.equal(got.zero, zero)
            assert not torch.equal(got.scale, quantize_weight(w, args).scale)
        else:
            assert torch.equal(got.q, want.q) and torch.equal(got.scale, want.scale) and torch.equal(got.zero, want.zero)
        assert torch.equal(lin.weight.data, got.dequantize(w.dtype))


@pytest.mark.parametrize("opts, match", [
    ({"mse": 1}, "mse=1 must be true"),
    ({"mse": "yes"}, "mse='yes' must be true"),
    ({"mse": True, "mse_grid": 0}, "mse_grid=0 must be an integer in 1..1000"),
    ({"mse": True, "mse_grid": 10**9}, "mse_grid=1000000000 must be"),
    ({"mse": True, "mse_max_shrink": 1.0}, r"mse_max_shrink=1.0 must be a number in \[0, 1\)"),
    ({"mse": True, "mse_norm": 0}, r"mse_norm=0 must be a number in \(0, 10\]"),
    ({"mse": True, "mse_weight": "x"}, "mse_weight='x' must be one of"),
])
def test_options_checked(opts, match):
    for method in ("rtn", "gptq"):
        with pytest.raises(RecipeError, match=match):
            get_method(method)(PRESETS["W4A16"], **opts)
    with pytest.raises(RecipeError, match="torch solve"):
        get_method("gptq")(PRESETS["W4A16"], mse=True, backend="triton", act_order=False)
    assert from_options("rtn", {}) is None
    with pytest.raises(RecipeError, match="only gptq has a Hessian"):
        get_method("rtn")(PRESETS["W4A16"], mse=True, mse_weight="hessian")
    assert get_method("gptq")(PRESETS["W4A16"], mse=True, mse_weight="hessian").mse.weight == "hessian"


def test_cli_mse_reaches_the_recipe(tmp_path, tiny_tokenizer):
    from quantkit.export.manifest import read_manifest
    from tiny_models import rtn_checkpoint, save_tiny_model_dir

    code, out = run_cli("gptq", "--out", tmp_path / "x", "--mse", "--mse-grid", "0")
    assert code == 2 and "--mse-grid" in out and "Traceback" not in out
    code, out = run_cli("gptq", "--out", tmp_path / "x", "--mse", "--mse-weight", "bogus")
    assert code == 2 and "--mse-weight" in out and "hessian" in out and "Traceback" not in out
    from quantkit.cli.options import mse_stage_options

    assert mse_stage_options(True, 50, "hessian") == {"mse": True, "mse_weight": "hessian"}
    assert mse_stage_options(True, 9) == {"mse": True, "mse_grid": 9}
    assert mse_stage_options(None, 50) == {}  # not given: the method's default, nothing recorded
    assert mse_stage_options(False, 50) == {"mse": False}
    assert mse_stage_options(None, 50, "none") == {"mse_weight": "none"}
    code, out = run_cli("gptq", "--out", tmp_path / "x", "--no-mse", "--mse-weight", "none")
    assert code == 2 and "--no-mse" in out and "Traceback" not in out
    code, out = run_cli("gptq", "--out", tmp_path / "x", "--no-mse", "--mse-grid", "20")
    assert code == 2 and "drop one" in out and "Traceback" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # refused before anything was written
    model = save_tiny_model_dir(tmp_path / "m", tiny_tokenizer)
    off = read_manifest(rtn_checkpoint(model, tmp_path / "off", "--group-size", "16", "--asym"))
    on = read_manifest(rtn_checkpoint(model, tmp_path / "on", "--group-size", "16", "--asym", "--mse", "--mse-grid", "9"))
    assert off["recipe"]["stages"] == [{"method": "rtn"}]  # off: the recipe (and checkpoint) of today
    assert on["recipe"]["stages"] == [{"method": "rtn", "mse": True, "mse_grid": 9}]
    weights = [k for k in off["files"] if k.endswith(".safetensors")]
    assert weights and all(off["files"][k] != on["files"][k] for k in weights)  # other scales were exported


@pytest.mark.parametrize("args", [QuantArgs(4, 16, False), QuantArgs(3, 16, True), QuantArgs(4, None, False)])
@pytest.mark.parametrize("norm", [2.0, 2.4])
def test_fast_search_path_equals_quantize_dequantize(args, norm):
    # mse_qparams reads each group's range once ([min, max] as a group of two) and computes the errors in
    # place: the same scales and the same error values as compute_qparams + quantize/dequantize.
    import dataclasses

    from quantkit.quant.core import _grouped
    from quantkit.quant.mse import _errors

    w = _heavy(7, out=8)
    g = w.shape[1] if args.group_size is None else args.group_size
    wg = _grouped(w, g)
    ends = torch.stack([wg.amin(-1), wg.amax(-1)], -1).flatten(1)
    pair = dataclasses.replace(args, group_size=2)
    for p in (1.0, 0.9, 0.73, 0.5):
        s, z = compute_qparams(w, args, shrink=p)
        s2, z2 = compute_qparams(ends, pair, shrink=p, scale_dtype=w.dtype)
        assert torch.equal(s, s2) and (z is None or torch.equal(z, z2))
        assert torch.equal(_errors(wg, s, z, args, norm, torch.empty_like(wg)), group_errors(w, s, z, args, norm))
