"""Quantization primitives against a direct, loop-by-loop reference."""

import pytest
import torch

from quantkit.quant.core import check_group_size, compute_qparams, dequantize, fake_quantize, quantize, quantize_weight
from quantkit.recipe import QuantArgs, RecipeError


def _reference_rtn(w: torch.Tensor, bits: int, group: int, sym: bool) -> torch.Tensor:
    """One group at a time, written from the textbook formulas."""
    out = torch.empty_like(w)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], group):
            x = w[r, c0 : c0 + group]  # float32 arithmetic, as the library does: ties then agree
            if sym:
                s = torch.clamp(x.abs().max() / ((qmax - qmin) / 2), min=1e-8)
                q = torch.clamp(torch.round(x / s), qmin, qmax)
                out[r, c0 : c0 + group] = q * s
            else:
                lo, hi = torch.clamp(x.min(), max=0.0), torch.clamp(x.max(), min=0.0)
                s = torch.clamp((hi - lo) / (qmax - qmin), min=1e-8)
                z = torch.clamp(torch.round(qmin - lo / s), qmin, qmax)
                q = torch.clamp(torch.round(x / s) + z, qmin, qmax)
                out[r, c0 : c0 + group] = (q - z) * s
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [None, 16])
def test_rtn_matches_reference(bits, sym, group):
    torch.manual_seed(bits * 10 + sym)
    w = torch.randn(12, 48) * torch.rand(12, 1) * 3
    args = QuantArgs(bits=bits, group_size=group, symmetric=sym)
    got = fake_quantize(w, args)
    ref = _reference_rtn(w, bits, group or 48, sym)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_integers_in_range_and_roundtrip():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    for bits in (2, 3, 4, 8):
        for sym in (True, False):
            args = QuantArgs(bits=bits, group_size=32, symmetric=sym)
            qt = quantize_weight(w, args)
            assert qt.q.dtype == torch.int8 and qt.q.shape == w.shape
            assert qt.q.min() >= args.qmin and qt.q.max() <= args.qmax
            assert qt.scale.shape == (8, 2)
            assert (qt.zero is None) == sym
            # quantizing the dequantized weight again gives the same integers
            again = quantize(qt.dequantize(), qt.scale, qt.zero, args)
            assert torch.equal(again, qt.q)


def test_error_shrinks_with_bits_and_groups():
    torch.manual_seed(1)
    w = torch.randn(64, 128)
    errs = {b: (fake_quantize(w, QuantArgs(bits=b, group_size=None)) - w).norm() / w.norm() for b in (2, 3, 4, 8)}
    assert errs[2] > errs[3] > errs[4] > errs[8]
    assert errs[8] < 0.01
    grouped = (fake_quantize(w, QuantArgs(bits=4, group_size=32)) - w).norm() / w.norm()
    assert grouped < errs[4]


def test_zero_group_gives_zero_not_nan():
    w = torch.zeros(4, 32)
    w[0, :16] = torch.randn(16)
    for sym in (True, False):
        out = fake_quantize(w, QuantArgs(bits=4, group_size=16, symmetric=sym))
        assert torch.isfinite(out).all()
        assert torch.equal(out[1:], torch.zeros(3, 32))


def test_asymmetric_keeps_zero_exact():
    w = torch.rand(4, 32) + 0.5  # all positive: range still includes 0
    args = QuantArgs(bits=4, group_size=None, symmetric=False)
    scale, zero = compute_qparams(w, args)
    q = quantize(torch.zeros(4, 32), scale, zero, args)
    assert torch.equal(dequantize(q, scale, zero, args), torch.zeros(4, 32))


def test_group_size_check_names_layers_and_fixes():
    layers = {"model.layers.0.self_attn.q_proj": 576, "model.layers.0.mlp.down_proj": 1536}
    with pytest.raises(RecipeError) as e:
        check_group_size(layers, QuantArgs(bits=4, group_size=128))
    msg = str(e.value)
    assert "576" in msg and "q_proj" in msg and "--group-size 64" in msg
    assert "down_proj" not in msg  # 1536 is divisible by 128
    check_group_size(layers, QuantArgs(bits=4, group_size=64))  # fine
    check_group_size(layers, QuantArgs(bits=4, group_size=None))


def test_quantargs_validation():
    with pytest.raises(RecipeError, match="bits=5"):
        QuantArgs(bits=5)
    with pytest.raises(RecipeError, match="group_size"):
        QuantArgs(bits=4, group_size=0)


def test_fake_quantize_activations_per_token_and_static_tensor():
    from quantkit.quant.core import fake_quantize_activations
    from quantkit.recipe import ActQuantArgs

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 64, generator=g)
    x[0, 0] *= 100  # one loud token must not coarsen the others' grid under per-token scales
    y = fake_quantize_activations(x, ActQuantArgs(8, "token"))
    step = x.abs().amax(-1, keepdim=True) / 127
    assert torch.all((y - x).abs() <= step / 2 + 1e-6)
    assert (y[1] - x[1]).abs().max() < (x[0, 0].abs().max() / 127) / 10
    s = torch.tensor(0.01)
    z = fake_quantize_activations(x, ActQuantArgs(8, "tensor", dynamic=False), scale=s)
    assert z.abs().max() <= 127 * 0.01 + 1e-6  # clamped to the symmetric static range [-127, 127]
    y_ = x / s  # ties away from zero, as the kernels round
    assert torch.allclose(z, torch.clamp(torch.where(y_ >= 0, torch.floor(y_ + 0.5), torch.ceil(y_ - 0.5)), -127, 127) * s)


def test_one_quantizer_definition_for_simulation_kernels_and_kv():
    """Simulation (quant.core), the kernels' reference and the KV cache share one quantizer:
    ties away from zero and the symmetric range; a tie and an out-of-range value show it."""
    from quantkit.kernels.act_quant import per_token_quant_ref, quantize_symmetric_ref
    from quantkit.quant.core import quantize_activations
    from quantkit.quant.kv import quantize_kv
    from quantkit.recipe import ActQuantArgs

    x = torch.tensor([[2.5, -2.5, 1.5, -300.0, 0.49]])
    s = torch.tensor(1.0)
    want = torch.tensor([[3, -3, 2, -127, 0]], dtype=torch.int8)  # torch.round would give 2, -2, 2, -128 clamp
    assert torch.equal(quantize_symmetric_ref(x, s), want)
    assert torch.equal(quantize_kv(x, s, bits=8), want)
    q, _ = quantize_activations(x, ActQuantArgs(8, "tensor", dynamic=False), scale=s)
    assert torch.equal(q, want)
    g = torch.Generator().manual_seed(1)
    xr = torch.randn(9, 33, generator=g)
    qa, sa = quantize_activations(xr, ActQuantArgs(8, "token"))
    qk, sk = per_token_quant_ref(xr)
    assert torch.equal(qa, qk) and torch.equal(sa, sk)
    q4, s4 = quantize_activations(xr, ActQuantArgs(4, "token"))
    assert int(q4.abs().max()) == 7 and torch.allclose(s4, xr.abs().amax(-1, keepdim=True) / 7)
