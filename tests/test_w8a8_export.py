"""W8A8 / W8A8C8 export as compressed-tensors int-quantized: layout, transformers load, our reader."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from quantkit import api
from quantkit.export.compressed_tensors import KV_SCALES_NAME, export_compressed_tensors
from quantkit.models.loading import LoadedModel
from quantkit.recipe import PRESETS, ActQuantArgs, KVCacheArgs, Recipe, Scheme, Stage
from tiny_models import make_tiny_model


class _Calib:
    def __init__(self, ids):
        self.input_ids = ids
        self.settings = {"source": "test"}


def _ids(n=4, s=32, seed=0):
    return torch.randint(3, 512, (n, s), generator=torch.Generator().manual_seed(seed))


def _quantized(tokenizer, scheme, seed=0):
    model = make_tiny_model("llama", seed=seed)
    rec = Recipe(scheme, (Stage("smoothquant", {"alpha": 0.5}),))
    return api.quantize(LoadedModel(model, tokenizer, {"kind": "test"}), rec, calib_set=_Calib(_ids()))


def _tensors(out):
    from safetensors.torch import load_file

    t = {}
    for f in sorted(out.glob("*.safetensors")):
        t.update(load_file(f))
    return t


def test_w8a8_dynamic_layout_and_transformers_load(tmp_path, tiny_tokenizer):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    from quantkit.runtime.simulate import simulate

    qm = _quantized(tiny_tokenizer, PRESETS["W8A8"])
    out = export_compressed_tensors(qm, tmp_path / "ckpt")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "int-quantized" and qc["kv_cache_scheme"] is None
    (g,) = qc["config_groups"].values()
    assert g["input_activations"] == {
        "num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "token", "dynamic": True
    }
    assert g["weights"]["strategy"] == "channel" and g["weights"]["num_bits"] == 8
    t = _tensors(out)
    name = "model.layers.1.mlp.down_proj"
    assert t[f"{name}.weight"].dtype == torch.int8 and tuple(t[f"{name}.weight"].shape) == (96, 160)
    assert tuple(t[f"{name}.weight_scale"].shape) == (96, 1)
    torch.testing.assert_close(t[f"{name}.weight"], qm.modules[name].q)
    assert not any(k.endswith("input_scale") for k in t)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _ids(2, 24, seed=1)
    with torch.no_grad():
        with simulate(qm.model, act=PRESETS["W8A8"].input_activations):
            ours = qm.model(input_ids=ids).logits
        plain = qm.model(input_ids=ids).logits
        theirs = loaded(input_ids=ids).logits
        # compressed-tensors' reference fake quant divides max|row| by 127.5 (its symmetric
        # range convention); our runtime kernels and vLLM divide by 127. With that one
        # difference replayed here, transformers must reproduce our model exactly.
        handles = [m.register_forward_pre_hook(_ct_token_quant) for n, m in qm.model.named_modules() if n in qm.modules]
        ours_ct = qm.model(input_ids=ids).logits
        for h in handles:
            h.remove()
    scale = ours.abs().max().item()
    assert (theirs - ours_ct).abs().max().item() <= 1e-4 * scale
    # and our 127 convention differs from theirs only by A8 rounding noise, far below the A8 effect itself
    assert (theirs - ours).abs().max().item() <= 0.05 * scale
    assert (plain - ours).abs().max().item() > 1e-3 * scale  # A8 simulation changed something


def _ct_token_quant(_m, args):
    x = args[0]
    s = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / 127.5
    return (torch.clamp(torch.round(x / s), -128, 127) * s, *args[1:])


def test_static_w8a8c8_scales_and_reader_round_trip(tmp_path, tiny_tokenizer):
    from quantkit.export.reader import read_static_scales
    from quantkit.models.checkpoint import load_quantkit_checkpoint

    scheme = Scheme(
        PRESETS["W8A8"].weights,
        ActQuantArgs(8, "tensor", dynamic=False),
        KVCacheArgs(8, "channel", dynamic=False, residual_bits=4, residual_tau=3.0),
    )
    qm = _quantized(tiny_tokenizer, scheme, seed=2)
    st = qm.static_scales
    assert st is not None and len(st.act) == 21 and len(st.kv) == 3
    out = export_compressed_tensors(qm, tmp_path / "ckpt")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    (g,) = qc["config_groups"].values()
    assert g["input_activations"]["strategy"] == "tensor" and g["input_activations"]["dynamic"] is False
    assert qc["kv_cache_scheme"] == {
        "num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "tensor", "dynamic": False
    }
    t = _tensors(out)
    a = "model.layers.0.self_attn"
    torch.testing.assert_close(t["model.layers.0.mlp.up_proj.input_scale"], st.act["model.layers.0.mlp.up_proj"])
    # per-tensor k_scale = the largest per-channel scale
    torch.testing.assert_close(t[f"{a}.k_scale"], st.kv[a]["k_scale"].max().reshape(1), rtol=1e-6, atol=0)
    assert (out / KV_SCALES_NAME).is_file()

    model, _tok, manifest = load_quantkit_checkpoint(out)
    assert manifest["kv_scales_file"] == KV_SCALES_NAME
    assert Scheme.from_dict(manifest["recipe"]["scheme"]) == scheme
    back = read_static_scales(out, manifest)
    for k, v in st.act.items():
        torch.testing.assert_close(back.act[k], v)
    for k, e in st.kv.items():
        torch.testing.assert_close(back.kv[k]["k_scale"], e["k_scale"])
        torch.testing.assert_close(back.kv[k]["v_scale"], e["v_scale"])
        assert back.kv[k]["k_mean_eps"] == pytest.approx(e["k_mean_eps"], rel=1e-6)
    ids = _ids(2, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, qm.model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_fp8_kv_format(tmp_path, tiny_tokenizer):
    scheme = PRESETS["W8A8C8"]
    qm = _quantized(tiny_tokenizer, scheme, seed=4)
    out = export_compressed_tensors(qm, tmp_path / "ckpt", kv_format="fp8")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["kv_cache_scheme"]["type"] == "float" and qc["kv_cache_scheme"]["strategy"] == "tensor"
    t = _tensors(out)
    a = "model.layers.2.self_attn"
    amax = qm.static_scales.kv[a]["v_scale"].max() * 127
    torch.testing.assert_close(t[f"{a}.v_scale"], (amax / 448).reshape(1))
    assert (out / KV_SCALES_NAME).is_file()  # our INT8 per-channel scales stay beside
    # transformers + compressed-tensors load it and pick up the static scales where the format puts them
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    loaded.eval()
    if _ct_finds_kv_attention(loaded.model.layers[2].self_attn):
        torch.testing.assert_close(loaded.model.layers[2].self_attn.v_scale.data, t[f"{a}.v_scale"])
    else:
        # compressed-tensors <= 0.20.1 finds attention modules by a `past_key_values` forward
        # argument, which transformers 5.24 renamed `cache`: it then skips the KV scheme and
        # the scales load as unexpected keys (the checkpoint itself is right; vLLM reads them).
        assert f"{a}.v_scale" in info["unexpected_keys"]
    ids = _ids(2, 16, seed=5)
    with torch.no_grad():
        logits = loaded(input_ids=ids).logits
    assert torch.isfinite(logits).all()


def _ct_finds_kv_attention(attn) -> bool:
    """Whether this compressed-tensors recognizes this transformers version's attention modules."""
    from compressed_tensors.quantization.lifecycle.initialize import is_cached_attention_module

    return is_cached_attention_module(attn)

