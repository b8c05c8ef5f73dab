"""Learned rounding (quant.rounding, the learned_rounding option of RTN and GPTQ): its quantizer against a
plain-torch reference, the start = RTN / GPTQ bit for bit, SignSGD lowering a linear's output error and never
returning something worse than its start, determinism, and end to end on tiny models (logits, export)."""

from __future__ import annotations

import pytest
import torch

import test_gptq as tg
from quantkit import api
from quantkit.calib.data import CalibrationSet
from quantkit.calib.pipeline import run_layerwise
from quantkit.methods.base import get_method
from quantkit.models.loading import LoadedModel
from quantkit.quant.core import compute_qparams, quantize, quantize_weight
from quantkit.quant.gptq import gptq_quantize
from quantkit.quant.mse import MSESearch, mse_qparams
from quantkit.quant.rounding import (RoundingConfig, block_loss, codes, exact, fake_quant, grid_start, learn_rounding,
                                     rtn_start)
from quantkit.recipe import PRESETS, QuantArgs, Recipe, RecipeError, Scheme, Stage
from tiny_models import make_tiny_model, run_cli

ARGS = [QuantArgs(4, 16, False), QuantArgs(4, 16, True), QuantArgs(3, None, False)]


def _linear_problem(seed: int = 0, n_batches: int = 4):
    """W (32, 64) and inputs whose covariance has a decaying spectrum (real activations' is far from
    diagonal: that is where rounding by the output error beats rounding each weight to its nearest; with
    near-diagonal covariance nearest rounding is close to optimal); targets = the float outputs."""
    g = torch.Generator().manual_seed(seed)
    w = tg._weight(seed, dtype=torch.float32)
    mix = torch.randn(tg.IN, tg.IN, generator=g) * torch.logspace(0, -2, tg.IN).unsqueeze(1)
    xs = [torch.randn(8, 32, tg.IN, generator=g) @ mix for _ in range(n_batches)]
    return w, xs, [x @ w.T for x in xs]


def _fwd(xs):
    return lambda weights, i: xs[i] @ weights["l"].T


def _reference_quant(w, v, f, args):
    """Group by group in plain torch: the range [min*beta, max*alpha] (holding 0), scale/zero from it as
    RTN computes them, codes clamp(round(w/scale + v) + zero)."""
    g = w.shape[1] if args.group_size is None else args.group_size
    q = torch.empty_like(w, dtype=torch.int8)
    for r in range(w.shape[0]):
        for gi in range(w.shape[1] // g):
            cols = slice(gi * g, (gi + 1) * g)
            lo, hi = w[r, cols].min() * f[r, 2 * gi], w[r, cols].max() * f[r, 2 * gi + 1]
            if args.symmetric:
                scale = torch.maximum(lo.abs(), hi.abs()) / ((args.qmax - args.qmin) / 2)
                zero = 0.0
            else:
                lo, hi = lo.clamp_max(0), hi.clamp_min(0)
                scale = (hi - lo) / (args.qmax - args.qmin)
                zero = torch.round(args.qmin - lo / scale)
            q[r, cols] = (torch.round(w[r, cols] / scale + v[r, cols]) + zero).clamp(args.qmin, args.qmax).to(torch.int8)
    return q


@pytest.mark.parametrize("args", ARGS)
def test_quantizer_matches_reference(args):
    w, _, _ = _linear_problem(1)
    gen = torch.Generator().manual_seed(3)
    st = rtn_start(w, args)
    v = torch.rand(w.shape, generator=gen) - 0.5
    f = 0.5 + 0.5 * torch.rand(st.ends.shape, generator=gen)
    qt = exact(st, v, f, args)
    ref = _reference_quant(w, v, f, args)
    # the scale differs from the reference's in the last bit at most, so a code sitting on a rounding
    # boundary may differ by one: allow a handful, never more than one step
    diff = (qt.q.int() - ref.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01
    assert qt.q.min() >= args.qmin and qt.q.max() <= args.qmax
    # training's fake-quant has the exact result's values
    torch.testing.assert_close(fake_quant(st, v, f, args), qt.dequantize(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("args", ARGS)
@pytest.mark.parametrize("mse", [False, True])
def test_start_is_rtn_bit_for_bit(args, mse):
    w, xs, ts = _linear_problem(2)
    if mse:
        search = MSESearch(grid=11)
        shrink = mse_qparams(w, args, search.shrinks(), norm=search.norm)[2]
        scale, zero = search.qparams(w, args)
        want = quantize(w, scale, zero, args), scale, zero
    else:
        shrink, rtn = None, quantize_weight(w, args)
        want = rtn.q, rtn.scale, rtn.zero
    st = rtn_start(w, args, shrink=shrink)
    for got, ref in zip((st.qt.q, st.qt.scale, st.qt.zero), want):
        assert (got is None and ref is None) or torch.equal(got, ref)
    assert torch.equal(fake_quant(st, torch.zeros_like(w), torch.ones_like(st.ends), args), st.qt.dequantize())
    out, report = learn_rounding({"l": st}, args, _fwd(xs), ts, RoundingConfig(steps=0))
    assert out["l"] is st.qt and report.kept == "start"


@pytest.mark.parametrize("args", ARGS[:2])
def test_signsgd_lowers_the_output_error(args):
    w, xs, ts = _linear_problem(3)
    st = rtn_start(w, args)
    out, rep = learn_rounding({"l": st}, args, _fwd(xs), ts, RoundingConfig(steps=60))
    qt = out["l"]
    loss = sum(float(block_loss(x @ qt.dequantize().T, t)) for x, t in zip(xs, ts))
    rtn = sum(float(block_loss(x @ quantize_weight(w, args).dequantize().T, t)) for x, t in zip(xs, ts))
    assert rep.kept == "learned" and abs(loss - rep.final_loss) <= 1e-6 * loss and abs(rtn - rep.start_loss) <= 1e-6 * rtn
    assert loss < 0.9 * rtn, (loss, rtn)
    # |V| <= 0.5: every code within one step of w / scale (the rounding's own 0.5 plus V's); alpha, beta in
    # [0.5, 1]: scales only shrink
    g = args.group_size
    s = qt.scale.repeat_interleave(g, 1)
    z = 0 if qt.zero is None else qt.zero.float().repeat_interleave(g, 1)
    inside = (qt.q.float() > args.qmin) & (qt.q.float() < args.qmax)
    assert ((qt.q.float() - z - w / s).abs()[inside] <= 1.0 + 1e-5).all()
    rs = quantize_weight(w, args).scale
    assert (qt.scale <= rs * (1 + 1e-6)).all() and (qt.scale >= 0.5 * rs * (1 - 1e-6)).all()
    assert not torch.equal(qt.q, st.qt.q)


def test_never_worse_than_the_start():
    # inputs with equal, uncorrelated columns and one tiny batch: nearest rounding is hard to beat, a
    # large lr makes the steps worse; whatever is returned scores no worse than the start on the batches
    args = QuantArgs(4, 16, False)
    w = tg._weight(4, dtype=torch.float32)
    xs = [torch.randn(1, 8, tg.IN, generator=torch.Generator().manual_seed(9))]
    ts = [x @ w.T for x in xs]
    st = rtn_start(w, args)
    out, rep = learn_rounding({"l": st}, args, _fwd(xs), ts, RoundingConfig(steps=10, lr=0.5))
    assert rep.final_loss <= rep.start_loss
    if rep.kept == "start":
        assert out["l"] is st.qt


def test_seeded_and_deterministic():
    args = QuantArgs(4, 16, False)
    w, xs, ts = _linear_problem(5)
    runs = [learn_rounding({"l": rtn_start(w, args)}, args, _fwd(xs), ts, RoundingConfig(steps=20, seed=s))[0]["l"]
            for s in (0, 0, 1)]
    assert torch.equal(runs[0].q, runs[1].q) and torch.equal(runs[0].scale, runs[1].scale)
    assert torch.equal(runs[0].zero, runs[1].zero)
    assert not torch.equal(runs[0].q, runs[2].q)  # another batch order, another path


@pytest.mark.parametrize("act_order", [False, True])
def test_grid_start_reproduces_gptq(act_order):
    args = QuantArgs(4, 16, False)
    w, xs, ts = _linear_problem(6)
    h = tg._hessian(torch.cat([x.reshape(-1, tg.IN) for x in xs]).double()).float()
    qt = gptq_quantize(w, h, args, act_order=act_order, backend="torch").qt
    st = grid_start(w, qt)
    assert st.qt is qt
    start = exact(st, torch.zeros_like(w), torch.ones_like(st.ends), args)
    torch.testing.assert_close(start.scale, qt.scale, rtol=1e-6, atol=0)
    assert torch.equal(start.zero, qt.zero)
    assert torch.equal(start.q, qt.q)  # every code, also those GPTQ moved more than one rounding step
    # a code that is w's nearest keeps w as the value rounded; the others sit at their cell's edge
    s, z = qt.scale.repeat_interleave(16, 1), qt.zero.float().repeat_interleave(16, 1)
    near = (qt.q.float() - z - w / s).abs() < 0.49
    assert 0 < near.float().mean() < 1
    torch.testing.assert_close(st.w[near], w[near], rtol=1e-6, atol=1e-7)
    assert ((st.w / s - (qt.q.float() - z)).abs() <= 0.49 + 1e-5).all()
    out, rep = learn_rounding({"l": st}, args, _fwd(xs), ts, RoundingConfig(steps=40))
    assert rep.final_loss <= rep.start_loss
    gptq = sum(float(block_loss(x @ qt.dequantize().T, t)) for x, t in zip(xs, ts))
    assert abs(rep.start_loss - gptq) <= 1e-6 * gptq  # the start to beat is GPTQ's exact result


_IDS = torch.randint(3, 512, (8, 32), generator=torch.Generator().manual_seed(2))
_HELD = torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(7))
W4 = QuantArgs(bits=4, group_size=32, symmetric=False)


def _correlated_model():
    """The tiny Llama with activations like a trained model's: embeddings with a decaying spectrum and a few
    15x norm channels. (A random model's hidden states are close to white: there nearest rounding is close to
    optimal per weight, and learned rounding only fits the calibration tokens.)"""
    m = make_tiny_model("llama", seed=3, randomize=True)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        e = m.model.embed_tokens.weight
        mix = torch.randn(e.shape[1], e.shape[1], generator=g) * torch.logspace(0, -1.5, e.shape[1]).unsqueeze(1)
        e.copy_(torch.randn(e.shape, generator=g) @ mix)
        for b in m.model.layers:
            for norm in (b.input_layernorm, b.post_attention_layernorm):
                norm.weight[torch.randperm(norm.weight.numel(), generator=g)[:4]] *= 15
    return m


def test_tiny_model_no_worse_than_rtn_and_gptq():
    """Logits error on held-out tokens: RTN + learned rounding well under RTN's, GPTQ + refinement <= GPTQ."""
    with torch.no_grad():
        ref = _correlated_model()(_HELD).logits
    err = {}
    for key, name, opts in [("rtn", "rtn", {}), ("rtn+lr", "rtn", {"learned_rounding": True}),
                            ("gptq", "gptq", {}), ("gptq+lr", "gptq", {"learned_rounding": True})]:
        m = _correlated_model()
        res = run_layerwise(m, _IDS, [get_method(name)(Scheme(W4), rounding_steps=30, **opts)], batch_size=4)
        assert len(res.results) == 3 * 7
        with torch.no_grad():
            err[key] = float((m(_HELD).logits - ref).pow(2).mean())
    # the refinement is kept where it beats GPTQ on the calibration tokens; on held-out tokens it may lose
    # a hair (measured: +7e-7 relative), never more than 1%
    assert err["rtn+lr"] < 0.5 * err["rtn"] and err["gptq+lr"] <= 1.01 * err["gptq"], err
    assert all(p.grad is None and p.requires_grad for p in m.parameters())  # never trained, flags restored


def test_moe_experts_keep_the_methods_rounding():
    runs = []
    for opts in ({}, {"learned_rounding": True, "rounding_steps": 20}):
        m = make_tiny_model("mixtral", seed=3, randomize=True)
        runs.append(run_layerwise(m, _IDS, [get_method("rtn")(Scheme(W4), **opts)], batch_size=4))
    plain, learned = runs
    assert any("expert linear(s) of model.layers.0 keep rtn's rounding" in w for w in learned.warnings)
    experts = [n for n in plain.results if ".experts." in n]
    assert experts and all(torch.equal(plain.results[n].q, learned.results[n].q) for n in experts)
    others = [n for n in plain.results if n not in experts]
    assert any(not torch.equal(plain.results[n].q, learned.results[n].q) for n in others), learned.warnings


def test_export_round_trip(tmp_path, tiny_tokenizer):
    from quantkit.models.checkpoint import load_quantkit_checkpoint

    m = make_tiny_model("llama", seed=3, randomize=True)
    calib = CalibrationSet(_IDS, {"source": "random tokens (test)"})
    recipe = Recipe(Scheme(W4), (Stage("gptq", {"learned_rounding": True, "rounding_steps": 10}),))
    qm = api.quantize(LoadedModel(m, tiny_tokenizer, {"kind": "test"}), recipe, calib_set=calib)
    loaded, _, manifest = load_quantkit_checkpoint(api.export(qm, tmp_path / "ckpt"))
    assert manifest["recipe"]["stages"] == [{"method": "gptq", "learned_rounding": True, "rounding_steps": 10}]
    with torch.no_grad():
        torch.testing.assert_close(loaded(_HELD).logits, m(_HELD).logits, rtol=0, atol=0)


@pytest.mark.parametrize("opts, match", [
    ({"learned_rounding": 1}, "learned_rounding=1 must be true or false"),
    ({"rounding_steps": -1}, "rounding_steps=-1 must be an integer in 0..100000"),
    ({"rounding_lr": 0}, r"rounding_lr=0 must be a number in \(0, 1\] or null"),
    ({"rounding_seed": 1.5}, "rounding_seed=1.5 must be"),
])
def test_options_checked(opts, match):
    for method in ("rtn", "gptq"):
        with pytest.raises(RecipeError, match=match):
            get_method(method)(PRESETS["W4A16"], **opts)
    on = get_method("rtn")(PRESETS["W4A16"], learned_rounding=True, rounding_steps=7)
    assert on.uses_data and on.opts.rounding == RoundingConfig(7, None, 0)
    assert not get_method("rtn")(PRESETS["W4A16"]).uses_data


def test_cli_flags_reach_the_recipe(tmp_path, tiny_tokenizer):
    from quantkit.export.manifest import read_manifest
    from tiny_models import save_tiny_model_dir

    code, out = run_cli("rtn", "--out", tmp_path / "x", "--learned-rounding", "--rounding-steps", "-3")
    assert code == 2 and "--rounding-steps" in out and "Traceback" not in out
    model = save_tiny_model_dir(tmp_path / "m", tiny_tokenizer)
    code, out = run_cli("rtn", "--model", model, "--out", tmp_path / "on", "--group-size", "16", "--asym",
                        "--learned-rounding", "--rounding-steps", "3", "--samples", "4", "--seqlen", "32")
    assert code == 0, out
    assert read_manifest(tmp_path / "on")["recipe"]["stages"] == [
        {"method": "rtn", "learned_rounding": True, "rounding_steps": 3}]
