"""AWQ: scale math, folding, clipping search against references; end to end on tiny models."""

import math

import pytest
import torch

from tiny_models import make_tiny_model, make_tiny_tokenizer
from quantkit.calib.pipeline import run_layerwise
from quantkit.methods.awq import AWQ, _recording
from quantkit.methods.base import Method, get_method
from quantkit.models.adapter import ModelAdapter
from quantkit.quant.awq import (
    apply_clip,
    awq_scales,
    clip_search,
    fold_scales,
    sanitize_channel_stat,
    scaled_fake_quant,
    weight_channel_mean,
)
from quantkit.quant.core import compute_qparams, dequantize, fake_quantize, quantize
from quantkit.recipe import QuantArgs, RecipeError, Scheme

W3 = QuantArgs(bits=3, group_size=32, symmetric=False)


# ---------------------------------------------------------------- scale math


def test_alpha_zero_gives_unit_scales_and_rtn():
    torch.manual_seed(0)
    x = torch.rand(64) * 5 + 0.1
    s = awq_scales(x, 0.0)
    assert torch.equal(s, torch.ones(64))
    w = torch.randn(16, 64)
    # with s = 1 the scaled fake-quant is exactly RTN
    assert torch.equal(scaled_fake_quant(w, s, W3), fake_quantize(w, W3))


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.95])
def test_scales_match_formula(alpha):
    torch.manual_seed(1)
    x = torch.rand(48) * 2 + 0.05
    x[7] = 40.0  # an outlier channel
    xn = x / x.mean()
    ref = xn**alpha
    ref = ref / math.sqrt(float(ref.max() * ref.min()))
    s = awq_scales(x, alpha)
    torch.testing.assert_close(s, ref, rtol=1e-5, atol=0)
    assert s[7] > 1 and s.argmax() == 7
    # scale-invariant in x: the normalisation removes a constant factor
    torch.testing.assert_close(awq_scales(x * 123.0, alpha), s, rtol=1e-5, atol=0)


def test_duo_scales_match_formula():
    torch.manual_seed(2)
    x = torch.rand(32) + 0.1
    ws = [torch.randn(8, 32), torch.randn(4, 32)]
    w = weight_channel_mean(ws, 16)
    # reference: every (row, 16-column group) divided by its own max |w|, then column means
    full = torch.cat(ws).abs()
    norm = torch.empty_like(full)
    for r in range(full.shape[0]):
        for c0 in (0, 16):
            norm[r, c0 : c0 + 16] = full[r, c0 : c0 + 16] / full[r, c0 : c0 + 16].max()
    torch.testing.assert_close(w, norm.mean(0))
    alpha = 0.3
    xn, wn = x / x.mean(), w / w.mean()
    ref = xn**alpha / wn ** (1 - alpha)
    ref = ref / math.sqrt(float(ref.max() * ref.min()))
    torch.testing.assert_close(awq_scales(x, alpha, w), ref, rtol=1e-5, atol=0)


def test_bad_channels_give_finite_scales():
    torch.manual_seed(3)
    x = torch.rand(40) + 0.5
    x[3], x[11], x[20] = float("nan"), float("inf"), 0.0
    clean, n_bad, n_zero = sanitize_channel_stat(x)
    assert (n_bad, n_zero) == (2, 1)
    assert torch.isfinite(clean).all() and (clean > 0).all()
    # the non-finite channels get the median of the finite ones: a neutral scale
    med = x[torch.isfinite(x)].median()
    assert clean[3] == clean[11]
    torch.testing.assert_close(clean[3], med / torch.where(torch.isfinite(x), x, med).mean())
    for alpha in (0.0, 0.5, 0.99):
        s = awq_scales(x, alpha, w_mean=x.clone())
        assert torch.isfinite(s).all() and (s > 0).all()
    assert torch.isfinite(awq_scales(torch.full((8,), float("nan")), 0.5)).all()


# ---------------------------------------------------------------- folding


def test_fold_into_norm_and_linear_preserves_outputs():
    torch.manual_seed(4)
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(24)
    norm.weight.data = torch.rand(24) + 0.5
    a, b = torch.nn.Linear(24, 10, bias=False), torch.nn.Linear(24, 6, bias=True)
    x = torch.randn(5, 24)
    ref = (a(norm(x)), b(norm(x)))
    s = torch.rand(24) * 3 + 0.2
    fold_scales(norm, [a, b], s)
    torch.testing.assert_close((a(norm(x)), b(norm(x))), ref, rtol=1e-5, atol=1e-6)

    # linear -> linear, producer with bias (Qwen2's v_proj has one)
    p, c = torch.nn.Linear(12, 24, bias=True), torch.nn.Linear(24, 8)
    ref = c(torch.relu(p(x[:, :12])))  # a positive-homogeneous map between them keeps it exact
    fold_scales(p, [c], s)
    torch.testing.assert_close(c(torch.relu(p(x[:, :12]))), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        fold_scales(p, [torch.nn.Linear(10, 3)], s)


def _fold_random(model, seed):
    """Fold random scales into every scale group whose shapes allow it. Returns groups folded per block."""
    ad = ModelAdapter.for_model(model)
    g = torch.Generator().manual_seed(seed)
    counts = []
    for block in ad.blocks():
        n = 0
        for grp in ad.spec.scale_groups:
            prod = block.get_submodule(grp.producer)
            cons = [block.get_submodule(c) for c in grp.consumers]
            width = prod.out_features if isinstance(prod, torch.nn.Linear) else prod.weight.numel()
            if any(c.in_features != width for c in cons):
                assert grp.requires_equal_shapes
                continue
            fold_scales(prod, cons, torch.rand(width, generator=g) * 1.5 + 0.5)
            n += 1
        counts.append(n)
    return counts


@pytest.mark.parametrize("kv_heads", [2, 6])
def test_folding_alone_keeps_every_tiny_arch_exact(tiny_arch, kv_heads):
    model = make_tiny_model(tiny_arch, seed=5, num_key_value_heads=kv_heads)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.model(input_ids=ids).last_hidden_state
        counts = _fold_random(model, 0)
        out = model.model(input_ids=ids).last_hidden_state
    # v -> o folds only without grouped-query attention
    assert counts == [4 if kv_heads == 6 else 3] * 3
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- clipping


def _reference_clip(w, x, args, shrinks):
    """Brute force per (row, group): the shrink with the lowest partial-output MSE."""
    g = args.group_size
    best = torch.ones(w.shape[0], w.shape[1] // g)
    for r in range(w.shape[0]):
        for j in range(w.shape[1] // g):
            cols = slice(j * g, (j + 1) * g)
            wr, xg = w[r : r + 1, cols], x[:, cols]
            ref = xg @ wr[0]
            errs = []
            for sh in shrinks:
                if args.symmetric:
                    m = wr.abs().max() * sh
                    lo, hi = -m, m
                else:
                    lo, hi = wr.min().clamp(max=0) * sh, wr.max().clamp(min=0) * sh
                wc = wr.clamp(lo, hi)
                sc, z = compute_qparams(wc, QuantArgs(args.bits, None, args.symmetric))
                q = dequantize(quantize(wc, sc, z, QuantArgs(args.bits, None, args.symmetric)), sc, z,
                               QuantArgs(args.bits, None, args.symmetric))
                errs.append(float((xg @ q[0] - ref).pow(2).mean()))
            best[r, j] = shrinks[min(range(len(errs)), key=lambda i: (errs[i], i))]
    return best


@pytest.mark.parametrize("sym", [False, True])
def test_clip_search_matches_brute_force_and_never_hurts(sym):
    torch.manual_seed(6)
    args = QuantArgs(bits=3, group_size=16, symmetric=sym)
    w = torch.randn(10, 32)
    w[torch.rand_like(w) < 0.05] *= 6  # outliers make clipping worth it somewhere
    x = torch.randn(40, 32)
    shrinks = [1.0 - 0.05 * i for i in range(10)]
    best, best_err, first_err = clip_search(w, x, args, shrinks, oc_batch=3)
    assert torch.equal(best, _reference_clip(w, x, args, shrinks))
    assert (best_err <= first_err).all() and (best_err < first_err).any()
    # the clamped weight quantizes to exactly the shrunk range
    wc = apply_clip(w, best, args)
    s1, z1 = compute_qparams(wc, args)
    s2, z2 = compute_qparams(w, args, shrink=best)
    torch.testing.assert_close(s1, s2, rtol=1e-6, atol=0)
    assert (z1 is None and z2 is None) or torch.equal(z1, z2)
    # and its total output error is no worse than RTN's on the same tokens
    assert ((x @ fake_quantize(wc, args).T - x @ w.T) ** 2).mean() <= ((x @ fake_quantize(w, args).T - x @ w.T) ** 2).mean()


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    "opts, match",
    [
        ({"grid": 0}, "grid"),
        ({"grid": "20"}, "grid"),
        ({"duo": "yes"}, "duo"),
        ({"clip": 1}, "clip"),
        ({"clip_grid": -1}, "clip_grid"),
        ({"grid": 10**9}, "grid"),
        ({"clip_grid": 10**9}, "clip_grid"),
        ({"max_shrink": 1.0}, r"max_shrink.*\[0, 1\)"),
        ({"search_samples": 0}, "search_samples"),
        ({"alpha": 0.5}, "allowed: grid"),
    ],
)
def test_bad_options_refused(opts, match):
    with pytest.raises(RecipeError, match=match):
        get_method("awq")(Scheme(W3), **opts)


def test_options_and_grids():
    m = get_method("awq")(Scheme(W3), grid=4, clip_grid=3, max_shrink=0.4, search_samples=None, duo=True)
    assert isinstance(m, AWQ) and m.stats == frozenset({"abs_mean"})
    assert m.alphas == [0.0, 0.25, 0.5, 0.75]
    assert m.shrinks == pytest.approx([1.0, 0.8, 0.6])
    assert m.search_samples is None and m.duo


# ---------------------------------------------------------------- end to end


def _planted(arch, seed=7, **kw):
    """A tiny model whose hidden states have a few large channels, as real LLMs do."""
    model = make_tiny_model(arch, seed=seed, **kw)
    g = torch.Generator().manual_seed(seed)
    for block in ModelAdapter.for_model(model).blocks():
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            idx = torch.randperm(norm.weight.numel(), generator=g)[:4]
            norm.weight.data[idx] *= 15.0
    return model


def _out_mse(model, ref, ids):
    out = run_layerwise(model, ids, [], batch_size=4, return_hidden=True).hidden
    return float(sum((a - b).pow(2).mean() for a, b in zip(out, ref)) / len(ref))


_IDS = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(2))


def test_awq_beats_rtn_on_every_tiny_arch(tiny_arch):
    ref = run_layerwise(_planted(tiny_arch), _IDS, [], batch_size=4, return_hidden=True).hidden
    rtn_model, awq_model = _planted(tiny_arch), _planted(tiny_arch)
    run_layerwise(rtn_model, _IDS, [get_method("rtn")(Scheme(W3))], batch_size=4)
    awq = get_method("awq")(Scheme(W3), grid=10, clip_grid=10, search_samples=4)
    res = run_layerwise(awq_model, _IDS, [awq], batch_size=4)
    linears = ModelAdapter.for_model(awq_model).all_linears()
    assert set(res.results) == set(linears)
    # the one group AWQ cannot apply (v -> o under GQA) is recorded once per block, nothing else
    assert res.warnings == [f"awq: scale group model.layers.{i}.self_attn.v_proj -> model.layers.{i}.self_attn.o_proj "
                            "skipped: the producer has 32 outputs, the consumers 96 inputs (grouped-query attention: "
                            "V heads are shared by several query heads)" for i in range(3)]
    for name, lin in linears.items():
        assert torch.isfinite(lin.weight).all()
        torch.testing.assert_close(lin.weight.detach(), res.results[name].dequantize())
    mse_rtn, mse_awq = _out_mse(rtn_model, ref, _IDS), _out_mse(awq_model, ref, _IDS)
    assert math.isfinite(mse_awq) and mse_awq < 0.7 * mse_rtn, (mse_awq, mse_rtn)
    # artifacts: one entry per folded group, loss curves over the grid, the best is the minimum
    for block, art in awq.artifacts.items():
        assert [g["producer"].split(".", 3)[-1] for g in art["groups"]] == [
            "input_layernorm", "post_attention_layernorm", "mlp.up_proj"]  # GQA: v -> o skipped
        for g in art["groups"]:
            assert len(g["losses"]) == 10 and g["losses"][int(g["alpha"] * 10)] == min(g["losses"])
        assert sorted(n.rsplit(".", 1)[-1] for n in art["clip"]) == ["down_proj", "gate_proj", "o_proj", "up_proj", "v_proj"]


def test_v_to_o_folds_without_gqa_and_search_uses_first_windows():
    ref = run_layerwise(_planted("qwen2", num_key_value_heads=6), _IDS, [], batch_size=4, return_hidden=True).hidden
    model, rtn_model = _planted("qwen2", num_key_value_heads=6), _planted("qwen2", num_key_value_heads=6)
    awq = get_method("awq")(Scheme(W3), grid=5, clip=False, search_samples=3)
    res = run_layerwise(model, _IDS, [awq], batch_size=2)
    assert len(res.results) == 21
    run_layerwise(rtn_model, _IDS, [get_method("rtn")(Scheme(W3))], batch_size=2)
    # scaling alone (no clipping) already beats RTN (measured ratio 0.63)
    assert _out_mse(model, ref, _IDS) < 0.85 * _out_mse(rtn_model, ref, _IDS)
    for art in awq.artifacts.values():
        assert [g["producer"].rsplit(".", 1)[-1] for g in art["groups"]] == [
            "input_layernorm", "v_proj", "post_attention_layernorm", "up_proj"]
        assert art["clip"] == {} and art["skipped"] == []


def test_recording_keeps_first_windows_and_removes_hooks():
    model = make_tiny_model("llama", seed=8)
    block = model.model.layers[0]
    ids = torch.randint(0, 512, (5, 16), generator=torch.Generator().manual_seed(3))
    seen = {}

    class Probe(Method):
        stats = frozenset()

        def apply_block(self, ctx):
            if ctx.index:
                return
            lin = {"v": ctx.linears["model.layers.0.self_attn.v_proj"]}
            with _recording(ctx.block, ["self_attn", "mlp"], lin, 3) as (records, tokens):
                outs = ctx.forward()
            seen.update(records=records, tokens=tokens, n=len(outs))
            # replaying a recorded call gives the recorded output
            args, kwargs, out = records["self_attn"].calls[1]
            torch.testing.assert_close(ctx.block.self_attn(*args, **kwargs)[0], out)

    run_layerwise(model, ids, [Probe(Scheme(W3))], batch_size=2)
    # batches of 2: windows 0-1 and 2-3 cover the 3 asked for; the last batch is left out
    assert seen["n"] == 3 and [len(seen["records"][k].calls) for k in ("self_attn", "mlp")] == [2, 2]
    assert seen["records"]["mlp"].samples == 4
    assert len(seen["tokens"]["v"]) == 2 and seen["tokens"]["v"][0].shape == (32, 96)
    for mod in block.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks


class _Tamper(Method):
    """Plants a NaN, an inf and a zero channel in block 0's q/k/v input statistics."""

    stats = frozenset({"abs_mean"})

    def apply_block(self, ctx):
        if ctx.index == 0:
            st = ctx.stats["model.layers.0.self_attn.q_proj"]
            st.abs_sum[3], st.abs_sum[4], st.abs_sum[5] = float("nan"), float("inf"), 0.0


def test_bad_statistics_warn_and_keep_going():
    model = _planted("llama")
    # a real all-zero input channel of the MLP group in block 1
    model.model.layers[1].post_attention_layernorm.weight.data[9] = 0.0
    awq = get_method("awq")(Scheme(W3), grid=5, clip_grid=4, search_samples=4)
    res = run_layerwise(model, _IDS, [_Tamper(Scheme(W3)), awq], batch_size=4)
    assert len(res.results) == 21
    assert any("model.layers.0.input_layernorm" in w and "3 input channel(s)" in w and "2 non-finite" in w
               for w in res.warnings), res.warnings
    assert any("model.layers.1.post_attention_layernorm" in w and "1 zero" in w for w in res.warnings), res.warnings
    for lin in ModelAdapter.for_model(model).all_linears().values():
        assert torch.isfinite(lin.weight).all()
    for art in awq.artifacts.values():
        for g in art["groups"]:
            assert torch.isfinite(g["scales"]).all() and (g["scales"] > 0).all()
    out = run_layerwise(model, _IDS, [], batch_size=4, return_hidden=True).hidden
    assert all(torch.isfinite(h).all() for h in out)


def test_non_final_awq_transforms_only_then_rtn_quantizes():
    from quantkit import api
    from quantkit.calib.data import calibration_set
    from quantkit.models.loading import LoadedModel
    from quantkit.recipe import Recipe, Stage

    tok = make_tiny_tokenizer()
    calib = calibration_set(tok, samples=8, seqlen=32)
    ref = run_layerwise(_planted("mistral"), calib.input_ids, [], batch_size=4, return_hidden=True).hidden

    # awq alone, not final, no clipping: folding only, the float model is unchanged
    model = _planted("mistral")
    awq = get_method("awq")(Scheme(W3), grid=5, clip=False)
    awq.final = False
    res = run_layerwise(model, calib.input_ids, [awq], batch_size=4)
    assert res.results == {} and _out_mse(model, ref, calib.input_ids) < 1e-9
    assert any(g["alpha"] for a in awq.artifacts.values() for g in a["groups"])  # scales did change

    def run(stages):
        loaded = LoadedModel(_planted("mistral"), tok, {"kind": "test"})
        q = api.quantize(loaded, Recipe(Scheme(W3), tuple(stages)), calib_set=calib)
        return q, _out_mse(loaded.model, ref, calib.input_ids)

    q_both, mse_both = run([Stage("awq", {"grid": 5, "clip_grid": 5}), Stage("rtn")])
    q_rtn, mse_rtn = run([Stage("rtn")])
    assert len(q_both.modules) == 21
    assert mse_both < 0.7 * mse_rtn, (mse_both, mse_rtn)


def test_non_finite_losses_leave_unit_scales(monkeypatch):
    import quantkit.methods.awq as awq_mod

    monkeypatch.setattr(awq_mod, "_subblock_loss", lambda module, record: float("nan"))
    model = make_tiny_model("qwen3", seed=9)
    awq = get_method("awq")(Scheme(W3), grid=3, clip=False, search_samples=2)
    res = run_layerwise(model, _IDS[:4], [awq], batch_size=2)
    assert len(res.results) == 21
    assert sum("non-finite loss" in w for w in res.warnings) == 3 * 3  # 3 groups x 3 blocks
    for art in awq.artifacts.values():
        for g in art["groups"]:
            assert g["alpha"] is None and torch.equal(g["scales"], torch.ones_like(g["scales"]))
            assert all(math.isnan(v) for v in g["losses"])


def test_bfloat16_model_runs():
    model = _planted("llama", dtype=torch.bfloat16)
    awq = get_method("awq")(Scheme(QuantArgs(bits=4, group_size=32, symmetric=True)), grid=4, clip_grid=3)
    res = run_layerwise(model, _IDS[:4], [awq], batch_size=2)
    assert len(res.results) == 21
    for name, lin in ModelAdapter.for_model(model).all_linears().items():
        assert lin.weight.dtype == torch.bfloat16 and torch.isfinite(lin.weight).all()
        assert torch.equal(lin.weight, res.results[name].dequantize(torch.bfloat16))
