"""AutoAWQ GEMM and GPTQ v1 layouts: exact int32 words, round trips, full exports read back."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tiny_models import make_tiny_model
from quantkit import api
from quantkit.export.awq import AWQ_ORDER, awq_tensors, pack_awq, read_awq, unpack_awq
from quantkit.export.gptq import gptq_tensors, read_gptq
from quantkit.models.checkpoint import load_quantkit_checkpoint
from quantkit.models.loading import LoadedModel
from quantkit.quant.core import QuantizedTensor
from quantkit.recipe import QuantArgs, Recipe, RecipeError, Scheme, Stage


def _i32(u: int) -> int:
    return u - (1 << 32) if u >= (1 << 31) else u


# ----------------------------------------------------------------------------- references (plain loops)


def _ref_pack_awq(u):
    # AutoAWQ: word w of a row holds columns 8w..8w+7; nibble i holds column 8w + AWQ_ORDER[i].
    rows, cols = u.shape
    out = torch.zeros(rows, cols // 8, dtype=torch.int32)
    for r in range(rows):
        for w in range(cols // 8):
            word = 0
            for i in range(8):
                word |= int(u[r, 8 * w + AWQ_ORDER[i]]) << (4 * i)
            out[r, w] = _i32(word)
    return out


def _ref_pack_stream(u_cols, bits):
    # GPTQ v1: the values of one column, as one little-endian bit stream over int32 words.
    n = len(u_cols)
    words = [0] * (n * bits // 32)
    for j, v in enumerate(u_cols):
        for b in range(bits):
            if (int(v) >> b) & 1:
                pos = j * bits + b
                words[pos // 32] |= 1 << (pos % 32)
    return [_i32(w) for w in words]


# ----------------------------------------------------------------------------- hand-derived words


def test_awq_words_by_hand():
    u = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [0, 15, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 15]])
    p = pack_awq(u)
    # nibbles 0..7 hold columns 0,2,4,6,1,3,5,7: row 0 -> 0x75316420
    assert p.dtype == torch.int32 and p.shape == (3, 1)
    assert p[0, 0].item() == 0x75316420
    assert p[1, 0].item() == 0x000F0000  # column 1 sits in nibble 4
    assert p[2, 0].item() == _i32(0xF0000000)  # column 7 in nibble 7: the sign bit
    assert torch.equal(unpack_awq(p), u)


def test_gptq_4bit_words_by_hand():
    # one output column, in = 8: q_u = 1..8 packed along in, value j at bits 4j
    q = torch.arange(1, 9, dtype=torch.int8).view(1, 8) - 8  # signed (out=1, in=8)
    qt = QuantizedTensor(q, torch.ones(1, 1), None, QuantArgs(4, None, True))
    # out=1 does not pack into a qzeros word; only qweight is checked here
    t = gptq_tensors(QuantizedTensor(q.repeat(8, 1), torch.ones(8, 1), None, qt.args))
    assert t["qweight"].shape == (1, 8)
    assert t["qweight"][0, 0].item() == _i32(0x87654321)
    # symmetric: stored zero = 8 - 1 = 7 in every nibble
    assert t["qzeros"].shape == (1, 1) and t["qzeros"][0, 0].item() == 0x77777777
    assert torch.equal(t["g_idx"], torch.zeros(8, dtype=torch.int32))


def test_gptq_3bit_words_by_hand():
    # 32 values fill 3 words; value 10 straddles words 0/1, value 21 words 1/2.
    u = torch.zeros(32, dtype=torch.int64)
    u[0], u[10], u[21], u[31] = 7, 5, 6, 7
    q = (u - 4).to(torch.int8).view(1, 32).repeat(32, 1)  # (out=32, in=32)
    t = gptq_tensors(QuantizedTensor(q, torch.ones(32, 1), None, QuantArgs(3, None, True)))
    words = t["qweight"][:, 0].tolist()
    assert words[0] == _i32(7 | (0b01 << 30))  # value 0 at bits 0-2; low 2 bits of value 10 at 30-31
    assert words[1] == 1  # high bit of value 10 at bit 0; low bit of value 21 (0) at bit 31
    assert words[2] == _i32(0b11 | (7 << 29))  # high 2 bits of value 21 at 0-1; value 31 at 29-31


# ----------------------------------------------------------------------------- random round trips


def test_awq_pack_matches_reference_and_round_trips():
    g = torch.Generator().manual_seed(0)
    u = torch.randint(0, 16, (5, 24), generator=g)
    assert torch.equal(pack_awq(u), _ref_pack_awq(u))
    assert torch.equal(unpack_awq(pack_awq(u)), u)
    with pytest.raises(ValueError):
        pack_awq(torch.zeros(2, 12, dtype=torch.int64))


def _random_qt(bits, group, sym, out_f=64, in_f=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    args = QuantArgs(bits, group, sym)
    n_groups = 1 if group is None else in_f // group
    q = torch.randint(args.qmin, args.qmax + 1, (out_f, in_f), generator=g).to(torch.int8)
    scale = (torch.rand(out_f, n_groups, generator=g) * 0.1 + 0.01).half().float()
    zero = None if sym else torch.randint(args.qmin + 1, args.qmax + 1, (out_f, n_groups), generator=g).to(torch.int8)
    return QuantizedTensor(q, scale, zero, args)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym,group", [(True, None), (False, 32), (True, 64)])
def test_gptq_round_trip_and_reference(bits, sym, group):
    qt = _random_qt(bits, group, sym, seed=bits)
    t = gptq_tensors(qt)
    in_f = qt.q.shape[1]
    n_groups = qt.scale.shape[1]
    assert t["qweight"].shape == (in_f * bits // 32, 64) and t["qzeros"].shape == (n_groups, 64 * bits // 32)
    assert t["scales"].dtype == torch.float16 and t["scales"].shape == (n_groups, 64)
    # column 5 of qweight = the bit stream of output 5's unsigned values
    u5 = (qt.q[5].to(torch.int64) + (1 << (bits - 1))).tolist()
    assert t["qweight"][:, 5].tolist() == _ref_pack_stream(u5, bits)
    # qzeros row 0 = bit stream over outputs of (z_u - 1)
    zero = torch.zeros(64, n_groups, dtype=torch.int64) if qt.zero is None else qt.zero.to(torch.int64)
    assert t["qzeros"][0].tolist() == _ref_pack_stream((zero[:, 0] + (1 << (bits - 1)) - 1).tolist(), bits)
    back = read_gptq({f"m.{k}": v for k, v in t.items()}.__getitem__, "m", qt.args)
    assert torch.equal(back.q, qt.q) and torch.equal(back.dequantize(), qt.dequantize())


@pytest.mark.parametrize("sym", [True, False])
def test_awq_round_trip(sym):
    qt = _random_qt(4, 32, sym, seed=7)
    t = awq_tensors(qt)
    assert t["qweight"].shape == (128, 8) and t["qzeros"].shape == (4, 8) and t["scales"].shape == (4, 64)
    assert torch.equal(t["qweight"], _ref_pack_awq((qt.q.to(torch.int64) + 8).t()))
    back = read_awq({f"m.{k}": v for k, v in t.items()}.__getitem__, "m", qt.args)
    assert torch.equal(back.q, qt.q) and torch.equal(back.dequantize(), qt.dequantize())


def test_gptq_refuses_zero_at_bottom_of_range():
    qt = _random_qt(4, 32, False)
    qt.zero[3, 1] = -8
    with pytest.raises(RecipeError, match="--sym"):
        gptq_tensors(qt)


# ----------------------------------------------------------------------------- full exports


def _qmodel(tiny_tokenizer, args, dtype=torch.float16, seed=3):
    model = make_tiny_model("llama", seed=seed, dtype=dtype)
    return api.quantize(LoadedModel(model, tiny_tokenizer, {"kind": "test"}), Recipe(Scheme(args), (Stage("rtn"),)))


@pytest.mark.parametrize("sym", [False, True])
def test_full_export_matches_compressed_tensors(tmp_path, tiny_tokenizer, sym):
    qm = _qmodel(tiny_tokenizer, QuantArgs(4, 32, sym))
    sds = {}
    for fmt in api.EXPORT_FORMATS:
        path = api.export(qm, tmp_path / fmt, format=fmt)
        model, _, manifest = load_quantkit_checkpoint(path)  # verifies hashes first
        assert manifest["format"] == fmt and manifest["warnings"] == []
        sds[fmt] = model.state_dict()
    ref = sds["compressed-tensors"]
    for fmt in ("awq", "gptq"):
        assert sds[fmt].keys() == ref.keys()
        for k in ref:
            assert torch.equal(sds[fmt][k], ref[k]), (fmt, k)
    # and they equal the in-memory quantized model
    for k, v in qm.model.state_dict().items():
        assert torch.equal(ref[k], v), k

    awq_cfg = json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]
    assert awq_cfg == {
        "quant_method": "awq",
        "bits": 4,
        "group_size": 32,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": ["lm_head"],
    }
    gptq_dir = tmp_path / "gptq"
    gcfg = json.loads((gptq_dir / "config.json").read_text())["quantization_config"]
    assert gcfg == json.loads((gptq_dir / "quantize_config.json").read_text())
    assert (gcfg["bits"], gcfg["group_size"], gcfg["sym"], gcfg["desc_act"], gcfg["checkpoint_format"]) == (
        4, 32, sym, False, "gptq")
    t = load_file(str(gptq_dir / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"  # in 160, out 96
    assert t[f"{name}.qweight"].shape == (20, 96) and t[f"{name}.qzeros"].shape == (5, 12)
    assert torch.equal(t[f"{name}.g_idx"], torch.arange(160, dtype=torch.int32) // 32)
    assert "lm_head.weight" in t and t["lm_head.weight"].dtype == torch.float16
    a = load_file(str(tmp_path / "awq" / "model.safetensors"))
    assert a[f"{name}.qweight"].shape == (160, 12) and a[f"{name}.scales"].shape == (5, 96)


def test_gptq_3bit_and_per_channel_export(tmp_path, tiny_tokenizer):
    # 3-bit needs in/out divisible by 32: hidden 96 / intermediate 160 both are.
    qm = _qmodel(tiny_tokenizer, QuantArgs(3, 32, False))
    api.export(qm, tmp_path / "ct", format="compressed-tensors")
    api.export(qm, tmp_path / "g3", format="gptq")
    a, _, _ = load_quantkit_checkpoint(tmp_path / "ct")
    b, _, _ = load_quantkit_checkpoint(tmp_path / "g3")
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k
    qm = _qmodel(tiny_tokenizer, QuantArgs(8, None, True))
    api.export(qm, tmp_path / "g8", format="gptq")
    cfg = json.loads((tmp_path / "g8" / "quantize_config.json").read_text())
    assert cfg["group_size"] == -1 and cfg["bits"] == 8


def test_fp32_model_warns_about_fp16_scales(tmp_path, tiny_tokenizer):
    qm = _qmodel(tiny_tokenizer, QuantArgs(4, 32, False), dtype=torch.float32)
    api.export(qm, tmp_path / "a", format="awq")
    m = json.loads((tmp_path / "a" / "quantkit.json").read_text())
    assert any("fp16 scales" in w for w in m["warnings"])


def test_layouts_refuse_what_they_cannot_hold(tmp_path, tiny_tokenizer):
    qm = _qmodel(tiny_tokenizer, QuantArgs(8, 32, True))
    with pytest.raises(RecipeError, match="4-bit"):
        api.export(qm, tmp_path / "x", format="awq")
    qm = _qmodel(tiny_tokenizer, QuantArgs(4, None, True))
    with pytest.raises(RecipeError, match="group size"):
        api.export(qm, tmp_path / "x", format="awq")
    assert not (tmp_path / "x").exists()
    r = Recipe(Scheme(QuantArgs(4, 32, True)), (Stage("rtn"),))
    api.check_export_format(r, "awq", qm.model)  # fine
    with pytest.raises(RecipeError, match="divisible by 8"):
        api.check_export_format(r, "awq", make_tiny_model("llama", seed=0, intermediate_size=164, hidden_size=96))
    with pytest.raises(RecipeError, match="divisible by 32"):
        api.check_export_format(r.with_weights(bits=3), "gptq", make_tiny_model("llama", seed=0, intermediate_size=176))
    with pytest.raises(RecipeError, match="weight-only"):
        from quantkit.recipe import PRESETS

        api.check_export_format(Recipe(PRESETS["W8A8"], (Stage("rtn"),)), "gptq")
    with pytest.raises(RecipeError, match="not supported"):
        api.check_export_format(r, "exl2")
