"""Our checkpoint reader: the loaded model equals the in-memory quantized model, bit for bit."""

import pytest
import torch

from tiny_models import make_tiny_model
from quantkit import api
from quantkit.export.reader import CheckpointError
from quantkit.models.checkpoint import load_quantkit_checkpoint
from quantkit.models.loading import LoadedModel
from quantkit.quant.core import quantize_weight
from quantkit.quant.model import QuantizedModel
from quantkit.recipe import QuantArgs, Recipe, Scheme, Stage


def _quantize_export(tmp_path, tok, dtype, args, arch="llama"):
    model = make_tiny_model(arch, seed=7, dtype=dtype)
    q = api.quantize(LoadedModel(model, tok, {"kind": "test"}), Recipe(Scheme(args), (Stage("rtn"),)))
    out = api.export(q, tmp_path / "ckpt")
    return model, out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sym", [True, False])
def test_reader_matches_in_memory_model(tmp_path, tiny_tokenizer, dtype, sym):
    model, out = _quantize_export(tmp_path, tiny_tokenizer, dtype, QuantArgs(bits=4, group_size=32, symmetric=sym))
    loaded, tok, manifest = load_quantkit_checkpoint(out)
    assert loaded.dtype == dtype and len(manifest["modules"]) == 21
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_reader_mixed_precision_groups(tmp_path, tiny_tokenizer):
    """Two schemes in one checkpoint: the case transformers + compressed-tensors mis-load today."""
    model = make_tiny_model("mistral", seed=8)
    modules = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            args = QuantArgs(bits=8) if ".mlp." in name else QuantArgs(bits=4, group_size=32, symmetric=False)
            qt = quantize_weight(mod.weight.data, args)
            mod.weight.data.copy_(qt.dequantize())
            modules[name] = qt
    qm = QuantizedModel(model, tiny_tokenizer, Recipe(Scheme(), (Stage("rtn"),)), modules, {"kind": "test"})
    out = api.export(qm, tmp_path / "mixed")
    loaded, _, _ = load_quantkit_checkpoint(out)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_reader_refuses_tampered_checkpoint(tmp_path, tiny_tokenizer):
    _, out = _quantize_export(tmp_path, tiny_tokenizer, torch.float32, QuantArgs(bits=8))
    st = out / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[len(data) // 2] ^= 0x01
    st.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_quantkit_checkpoint(out)


def test_load_model_routes_quantkit_dirs_to_the_reader(tmp_path, tiny_tokenizer):
    model, out = _quantize_export(tmp_path, tiny_tokenizer, torch.float32, QuantArgs(bits=4, group_size=32, symmetric=False))
    loaded = api.load(str(out))
    assert loaded.source["kind"] == "quantkit-checkpoint"
    assert loaded.source["source"] == {"kind": "test"}
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k]), k
