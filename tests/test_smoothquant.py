"""SmoothQuant: scale formula, exact folding, the method in the pipeline, simulation of W8A8 / INT8 KV."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from quantkit.recipe import PRESETS, ActQuantArgs, KVCacheArgs, Recipe, RecipeError, Stage
from tiny_models import make_tiny_model


def _ids(n=4, s=32, seed=0):
    return torch.randint(3, 512, (n, s), generator=torch.Generator().manual_seed(seed))


def test_smooth_scales_hand_made():
    from quantkit.methods.smoothquant import smooth_scales

    x = torch.tensor([4.0, 1.0, 9.0, 0.25])
    w = torch.tensor([1.0, 4.0, 1.0, 0.25])
    torch.testing.assert_close(smooth_scales(x, w, 0.5), torch.tensor([2.0, 0.5, 3.0, 1.0]))
    torch.testing.assert_close(smooth_scales(x, w, 1.0), x)
    torch.testing.assert_close(smooth_scales(x, w, 0.0), 1.0 / w)
    # a dead channel does not divide by zero
    s = smooth_scales(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0]), 0.5)
    assert torch.isfinite(s).all() and (s > 0).all()


def test_smoothing_balances_channel_ranges():
    from quantkit.methods.smoothquant import smooth_scales

    torch.manual_seed(0)
    x_max = torch.rand(32) * 10 + 0.1
    x_max[3] = 200.0  # an outlier channel
    w_max = torch.rand(32) + 0.1
    s = smooth_scales(x_max, w_max, 0.5)
    # alpha 0.5: after smoothing, activation and weight ranges are equal per channel
    torch.testing.assert_close(x_max / s, w_max * s)


def test_smoothing_is_exact_in_float():
    """The smoothed model (no quantization) computes what the original did."""
    from quantkit.calib.pipeline import run_layerwise
    from quantkit.methods.smoothquant import SmoothQuant

    model = make_tiny_model("llama", seed=1)
    ref_model = copy.deepcopy(model)
    ids = _ids()
    m = SmoothQuant(PRESETS["W8A8"], alpha=0.5)
    m.final = False  # smoothing only
    run_layerwise(model, ids, [m], batch_size=2)
    norm0 = model.model.layers[0].input_layernorm.weight
    assert not torch.allclose(norm0, ref_model.model.layers[0].input_layernorm.weight)  # it did change weights
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = ref_model(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_stats_are_rescaled_for_the_next_stage():
    """A later stage (gptq) sees statistics of the smoothed inputs, as if captured after smoothing."""
    from quantkit.calib.capture import InputStats
    from quantkit.methods.smoothquant import _rescale_stats

    x = torch.randn(50, 8)
    s = torch.rand(8) + 0.5
    st, ref = InputStats({"abs_max", "abs_mean", "hessian"}), InputStats({"abs_max", "abs_mean", "hessian"})
    st.add(x)
    ref.add(x / s)
    _rescale_stats(st, s)
    torch.testing.assert_close(st.abs_max, ref.abs_max)
    torch.testing.assert_close(st.abs_mean, ref.abs_mean)
    torch.testing.assert_close(st.hessian, ref.hessian, rtol=1e-4, atol=1e-5)


def test_options_validated():
    from quantkit.methods.smoothquant import SmoothQuant

    with pytest.raises(RecipeError, match="alpha"):
        SmoothQuant(PRESETS["W8A8"], alpha=1.5)
    with pytest.raises(RecipeError, match="alpha"):
        SmoothQuant(PRESETS["W8A8"], alpha="big")
    with pytest.raises(RecipeError, match="alpha_grid"):
        SmoothQuant(PRESETS["W8A8"], alpha="auto", alpha_grid=[])
    assert SmoothQuant(PRESETS["W8A8"], alpha="0.7").alpha == 0.7


def _outlier_model():
    """Tiny llama whose input norms produce a few large channels (the problem SmoothQuant solves)."""
    model = make_tiny_model("llama", seed=2)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[5, 40, 77]] = 30.0
    return model


def _sim_ppl_proxy(model, ids, act):
    from quantkit.runtime.simulate import simulate

    with torch.no_grad(), simulate(model, act=act):
        return model(input_ids=ids).logits


def test_smoothquant_beats_naive_w8a8_on_outliers():
    from quantkit import api
    from quantkit.models.loading import LoadedModel

    ids = _ids(4, 32)
    base = _outlier_model()
    with torch.no_grad():
        ref = base(input_ids=ids).logits
    act = ActQuantArgs(8, "token", dynamic=True)
    errs = {}
    for name, stages in (("naive", (Stage("rtn"),)), ("sq", (Stage("smoothquant", {"alpha": 0.5}),))):
        model = copy.deepcopy(base)
        qm = api.quantize(
            LoadedModel(model, None, {}), Recipe(PRESETS["W8A8"], stages), calib_set=_Calib(ids), device="cpu"
        )
        assert len(qm.modules) == 21
        errs[name] = float((_sim_ppl_proxy(model, ids, act) - ref).pow(2).mean())
    assert errs["sq"] < 0.7 * errs["naive"], errs


class _Calib:
    def __init__(self, ids):
        self.input_ids = ids
        self.settings = {"source": "test"}


def test_alpha_auto_restores_weights_between_trials():
    """After the search, block 0 is exactly what a fixed run with the chosen alpha produces
    (block 0 sees the same inputs in both runs), and a one-point grid equals the fixed alpha."""
    from quantkit.calib.pipeline import run_layerwise
    from quantkit.methods.base import describe_resolved
    from quantkit.methods.smoothquant import SmoothQuant

    ids = _ids(2, 32)
    auto = SmoothQuant(PRESETS["W8A8"], alpha="auto", alpha_grid=[0.0, 0.5, 0.9])
    m_auto = _outlier_model()
    run_layerwise(m_auto, ids, [auto], batch_size=2)
    assert set(auto.chosen.values()) <= {0.0, 0.5, 0.9} and len(auto.chosen) == 3
    a0 = auto.chosen["model.layers.0"]
    assert auto.resolved_options() == {"alpha": auto.chosen}  # what the manifest records of "auto"
    assert SmoothQuant(PRESETS["W8A8"], alpha=0.5).resolved_options() == {}
    lo, hi = min(auto.chosen.values()), max(auto.chosen.values())
    assert describe_resolved({"stage": 1, "method": "smoothquant", **auto.resolved_options()}) == \
        f"alpha={lo:g}-{hi:g} over 3 blocks"
    m_fixed = _outlier_model()
    run_layerwise(m_fixed, ids, [SmoothQuant(PRESETS["W8A8"], alpha=a0)], batch_size=2)
    for (n, p), (_, q) in zip(m_auto.model.layers[0].named_parameters(), m_fixed.model.layers[0].named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    # the outlier norms make alpha 0 (no smoothing) the worst choice
    assert a0 > 0.0


def test_simulate_hooks_come_off_and_kv_restores_attention_table():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from quantkit.runtime.simulate import simulate

    model = make_tiny_model("llama", seed=3)
    ids = _ids(2, 16)
    impl = model.config._attn_implementation
    before = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with simulate(model, act=ActQuantArgs(8), kv=KVCacheArgs(8, "token", dynamic=True)) as st:
            sim = model(input_ids=ids).logits
            assert impl in ALL_ATTENTION_FUNCTIONS._local_mapping
        after = model(input_ids=ids).logits
    assert st.tokens == 3 * 2 * 2 * 2 * 16  # layers x (k,v) x batch x kv_heads x seq
    assert not torch.equal(sim, ref)
    torch.testing.assert_close(sim, ref, rtol=0.05, atol=0.05)
    torch.testing.assert_close(after, ref, rtol=0, atol=0)
    assert dict(ALL_ATTENTION_FUNCTIONS._local_mapping) == before
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_kv_simulation_matches_manual_fake_quant():
    """The attention wrapper quantizes K after RoPE: compare with an attention layer fed by hand."""
    from quantkit.quant import kv as kvq
    from quantkit.models.hooks import kv_hook

    model = make_tiny_model("llama", seed=4)
    ids = _ids(1, 12)
    seen = {}

    def grab(name, k, v):
        seen[name] = (k.clone(), v.clone())
        return k, v

    with torch.no_grad(), kv_hook(model, grab):
        model(input_ids=ids)
    assert len(seen) == 3
    k, v = seen["model.layers.0.self_attn"]
    assert k.shape == (1, 2, 12, 16)
    # K differs from k_proj output (RoPE applied) for positions > 0, V equals v_proj output
    layer = model.model.layers[0]
    with torch.no_grad():
        h = layer.input_layernorm(model.model.embed_tokens(ids))
        v_ref = layer.self_attn.v_proj(h).view(1, 12, 2, 16).transpose(1, 2)
        k_raw = layer.self_attn.k_proj(h).view(1, 12, 2, 16).transpose(1, 2)
    torch.testing.assert_close(v, v_ref)
    torch.testing.assert_close(k[:, :, 0], k_raw[:, :, 0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(k[:, :, 5], k_raw[:, :, 5])
    r = kvq.fake_quantize_kv(k, "token")
    assert r.eps.mean() < 0.01


def test_static_calibration_and_residual_simulation():
    from quantkit.calib.static import calibrate_static
    from quantkit.runtime.simulate import simulate

    model = make_tiny_model("llama", seed=5)
    ids = _ids(4, 32)
    act = ActQuantArgs(8, "tensor", dynamic=False)
    kv = KVCacheArgs(8, "channel", dynamic=False, residual_bits=4, residual_tau=3.0)
    scales = calibrate_static(model, ids, act=act, kv=kv, batch_size=2)
    assert len(scales.act) == 21 and all(s.shape == (1,) and s.item() > 0 for s in scales.act.values())
    e = scales.kv["model.layers.1.self_attn"]
    assert e["k_scale"].shape == (2, 16) and e["v_scale"].shape == (2, 16)
    assert 0 < e["k_mean_eps"] < 0.05 and 0 < e["v_mean_eps"] < 0.05
    # The act scale is max|x| / 127 of the linear's input: check one against a hook
    lin = model.model.layers[2].mlp.down_proj
    amax = []
    h = lin.register_forward_pre_hook(lambda m, a: amax.append(a[0].abs().max()))
    with torch.no_grad():
        for b in ids.split(2):
            model(input_ids=b)
    h.remove()
    torch.testing.assert_close(scales.act["model.layers.2.mlp.down_proj"], (max(amax) / 127).reshape(1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with simulate(model, act=act, kv=kv, static=scales, kv_residual=False) as st0:
            plain = model(input_ids=ids).logits
        with simulate(model, kv=kv, static=scales) as st3:
            model(input_ids=ids)
        # a lower tau patches more tokens (the random tiny model has no x3 outliers)
        kv15 = dataclasses.replace(kv, residual_tau=1.5)
        with simulate(model, kv=kv15, static=scales) as st1:
            res = model(input_ids=ids).logits
    assert st0.patched == 0 and st1.tokens == st0.tokens
    assert st3.patched <= st1.patched
    assert 0 < st1.patched_fraction < 0.3
    assert 0 < st1.residual_memory_overhead < st1.patched_fraction
    torch.testing.assert_close(plain, ref, rtol=0.1, atol=0.1)
    torch.testing.assert_close(res, ref, rtol=0.1, atol=0.1)


def test_static_act_without_scales_is_a_usage_error():
    from quantkit.runtime.simulate import simulate

    model = make_tiny_model("llama", seed=6)
    with pytest.raises(RecipeError, match="calibrate"):
        with simulate(model, act=ActQuantArgs(8, "tensor", dynamic=False)):
            pass
