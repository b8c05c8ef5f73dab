"""Fused decoder-block steps (add + RMSNorm, SiLU * up, RoPE + KV-cache store): kernels vs torch references."""

import pytest
import torch

from _kernel_util import rel_err
from quantkit.kernels import fused


# Triton's interpreter emulates bf16 conversions inexactly: bf16 runs on a GPU only
DTYPES = [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="bf16 rounding needs a GPU (the interpreter truncates)"))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rmsnorm(dev, dtype, with_delta):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(5, 3, 96, generator=g) * 3).to(dtype).to(dev)
    d = torch.randn(5, 3, 96, generator=g).to(dtype).to(dev) if with_delta else None
    w = (torch.rand(96, generator=g) + 0.5).to(dtype).to(dev)
    xo, h = fused.add_rmsnorm(x, d, w, 1e-5)
    xr, hr = fused.add_rmsnorm_ref(x, d, w, 1e-5)
    assert torch.equal(xo, xr)  # the residual sum: the same rounding
    assert rel_err(h, hr) <= 2e-3 and h.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dev, dtype):
    g = torch.Generator().manual_seed(2)
    gu = (torch.randn(7, 2 * 1100, generator=g) * 2).to(dtype).to(dev)
    y = fused.silu_mul(gu, 1100)
    assert y.shape == (7, 1100) and rel_err(y, fused.silu_mul_ref(gu, 1100)) <= 2e-3


@pytest.mark.parametrize("mode", ["float", "token", "channel"])
def test_rope_store(dev, mode):
    from quantkit.quant import kv as kvq

    B, S, Hq, Hkv, D, T = 2, 5, 4, 2, 32, 16
    g = torch.Generator().manual_seed(3)
    dtype = torch.float16
    qkv = torch.randn(B, S, (Hq + 2 * Hkv) * D, generator=g).to(dtype).to(dev)
    ang = torch.rand(B, S, D // 2, generator=g) * 6
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(dtype).to(dev)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(dtype).to(dev)
    pos = torch.tensor([[3, 4, 5, 6, 7], [0, 1, 2, 3, 4]], device=dev)
    ks_c = kvq.static_scale(torch.rand(Hkv, D, generator=g).to(dev) * 3 + 0.5)
    vs_c = kvq.static_scale(torch.rand(Hkv, D, generator=g).to(dev) * 3 + 0.5)
    outs = []
    for impl in (fused.rope_store, fused.rope_store_ref):
        if mode == "float":
            kc, vc, ks, vs = torch.zeros(B, Hkv, T, D, dtype=dtype, device=dev), torch.zeros(B, Hkv, T, D, dtype=dtype, device=dev), None, None
        else:
            kc, vc = torch.zeros(B, Hkv, T, D, dtype=torch.int8, device=dev), torch.zeros(B, Hkv, T, D, dtype=torch.int8, device=dev)
            if mode == "token":
                ks, vs = torch.zeros(B, Hkv, T, device=dev), torch.zeros(B, Hkv, T, device=dev)
            else:
                ks, vs = ks_c, vs_c
        q = impl(qkv, cos, sin, pos, Hq, Hkv, D, kc, vc, ks, vs)
        outs.append((q, kc, vc, ks))
    (q, kc, vc, ks), (qr, kcr, vcr, ksr) = outs
    # the same roundings as torch's eager ops; on a GPU a sum may still land one ulp apart (the first H200
    # run saw that), so: within a few ulps, and mostly identical
    bad = (q.float() - qr.float()).abs() > 1e-3 * qr.float().abs().max()
    assert rel_err(q, qr) <= 1e-3 and (q != qr).float().mean() < 0.02, (
        rel_err(q, qr), bad.nonzero()[:6].tolist(), q[bad][:6].tolist(), qr[bad][:6].tolist())
    if mode == "float":
        assert rel_err(kc, kcr) <= 1e-3 and torch.equal(vc, vcr)
    else:  # identical integers, up to a rare tie flip from a last-bit difference
        assert (kc.int() - kcr.int()).abs().max() <= 1 and (kc != kcr).float().mean() < 0.01
        assert (vc.int() - vcr.int()).abs().max() <= 1 and (vc != vcr).float().mean() < 0.01
        if mode == "token":
            torch.testing.assert_close(ks, ksr)
    assert kc.float().abs().sum() > 0 and kc[1, :, 5:].float().abs().sum() == 0  # written where asked only
