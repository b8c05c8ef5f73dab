"""The format registry and inspect's summary: each format found by its config, each header read once."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from tiny_models import make_tiny_model
from quantkit import api
from quantkit.export import summary as summary_mod
from quantkit.export.formats import FORMAT_NAMES, FORMATS, export_format, format_of_config
from quantkit.export.safetensors_header import SafetensorsHeaderError, open_safetensors
from quantkit.models.loading import LoadedModel
from quantkit.recipe import QuantArgs, Recipe, RecipeError, Scheme, Stage


@pytest.fixture(scope="module")
def qmodel(tiny_tokenizer):
    model = make_tiny_model("llama", seed=7, dtype=torch.float16)
    return api.quantize(LoadedModel(model, tiny_tokenizer, {"kind": "test"}), Recipe(Scheme(QuantArgs(4, 32, True)), (Stage("rtn"),)))


def _linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_summary_reads_each_header_once_and_counts_by_the_library(fmt, qmodel, tmp_path, monkeypatch):
    out = api.export(qmodel, tmp_path / fmt, format=fmt, max_shard_bytes=100_000)  # several shards
    files = sorted(out.glob("*.safetensors"))
    assert len(files) > 1
    opened = []

    def counting(path):
        opened.append(path)
        return open_safetensors(path)

    monkeypatch.setattr(summary_mod, "open_safetensors", counting)
    s = summary_mod.read_checkpoint_summary(out)
    assert sorted(opened) == files  # each header once

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert format_of_config(qc).name == fmt and s["quant_method"] == qc["quant_method"]
    # reference counts from the safetensors library itself
    n_tensors = payload = 0
    for f in files:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                n_tensors += 1
                payload += t.numel() * t.element_size()
    assert s["n_tensors"] == n_tensors and s["quantized_bytes"] + s["unquantized_bytes"] == payload
    shapes = _linear_shapes(qmodel.model)
    assert s["n_quantized_linears"] == len(qmodel.modules) == sum(g["n_targets"] for g in s["groups"])
    if fmt == "compressed-tensors":  # weight_shape read from its bytes: all linears as FP16, from the model's shapes
        assert s["linear_bytes"]["all_fp16"] == sum(2 * o * i for o, i in shapes.values())


def test_read_ints_decodes_integers_and_refuses_floats(qmodel, tmp_path):
    out = api.export(qmodel, tmp_path / "ct")
    f = open_safetensors(out / "model.safetensors")
    name = "model.layers.0.mlp.down_proj"
    assert f.read_ints(f"{name}.weight_shape") == list(qmodel.model.get_submodule(name).weight.shape)
    with pytest.raises(SafetensorsHeaderError, match="expected an integer dtype"):
        f.read_ints(f"{name}.weight_scale")


def test_registry_names_the_choices():
    assert set(FORMATS) == set(api.EXPORT_FORMATS)
    with pytest.raises(RecipeError, match="use one of " + ", ".join(FORMAT_NAMES)):
        export_format("exl2")
    assert format_of_config({}).name == "compressed-tensors"  # a float or unknown config reads as one


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_api_export_refuses_activation_schemes_in_weight_only_layouts(fmt, tiny_tokenizer, tmp_path):
    """A W8A8 model written as a weight-only layout would be served W8A16 while `quantkit eval` scores W8A8:
    api.export refuses it before writing, as the CLI does before calibrating (the API let it through)."""
    from quantkit.recipe import PRESETS

    qm = api.quantize(LoadedModel(make_tiny_model("llama", seed=3), tiny_tokenizer, {"kind": "test"}),
                      Recipe(PRESETS["W8A8"], (Stage("rtn"),)), api.CalibConfig(samples=2, seqlen=16))
    with pytest.raises(RecipeError, match=f"--format {fmt} holds weight-only schemes, not W8A8"):
        api.export(qm, tmp_path / fmt, format=fmt)
    assert not (tmp_path / fmt).exists()
