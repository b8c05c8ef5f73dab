"""INT8 KV-cache quantizers and outlier-token residuals (quantkit.quant.kv)."""

from __future__ import annotations

import pytest
import torch

from quantkit.quant import kv as kvq


def _kv(seed=0, b=2, h=3, s=40, d=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, s, d, generator=g) * torch.linspace(0.5, 3.0, d)


def test_per_token_round_trip_error_bound():
    x = _kv()
    r = kvq.fake_quantize_kv(x, "token")
    # Each element is off by at most half a step; the step is max|token| / 127.
    step = x.abs().amax(dim=-1, keepdim=True) / 127
    assert ((r.x_hat - x).abs() <= 0.5 * step + 1e-6).all()
    # and the reference: round(x / step) * step
    ref = torch.round(x / step).clamp(-128, 127) * step
    torch.testing.assert_close(r.x_hat, ref, rtol=0, atol=1e-6)
    assert r.eps.max() < 0.01


def test_per_channel_static_scales_shape_and_bound():
    x = _kv(1)
    amax = kvq.channel_amax(x)
    assert amax.shape == (3, 16)
    torch.testing.assert_close(amax, x.abs().amax(dim=(0, 2)))
    scale = kvq.static_scale(amax)
    r = kvq.fake_quantize_kv(x, "channel", static=scale)
    assert ((r.x_hat - x).abs() <= 0.5 * scale.view(1, 3, 1, 16) + 1e-6).all()
    with pytest.raises(ValueError, match="kv_heads, head_dim"):
        kvq.fake_quantize_kv(x, "channel", static=scale[:2])


def test_static_clips_values_beyond_the_calibrated_range():
    x = _kv(2)
    scale = kvq.static_scale(kvq.channel_amax(x))
    y = x.clone()
    y[0, 0, 5] *= 10  # beyond calibration range: clipped to +-128 * scale
    r = kvq.fake_quantize_kv(y, "channel", static=scale)
    assert r.eps[0, 0, 5] > 0.5
    assert r.x_hat.abs().max() <= 128 * scale.max() + 1e-5


def test_relative_error_matches_definition():
    x = torch.randn(4, 8)
    xh = x + 0.1 * torch.randn(4, 8)
    ref = torch.stack([(x[i] - xh[i]).norm() / x[i].norm() for i in range(4)])
    torch.testing.assert_close(kvq.relative_error(x, xh), ref)
    assert kvq.relative_error(torch.zeros(2, 8), torch.zeros(2, 8)).eq(0).all()


def test_planted_outliers_are_selected_and_patched():
    x = _kv(3, s=64)
    calib_scale = kvq.static_scale(kvq.channel_amax(x))
    mean_eps = float(kvq.fake_quantize_kv(x, "channel", static=calib_scale).eps.mean())
    y = x.clone()
    planted = [(0, 1, 7), (1, 2, 30), (0, 0, 63)]
    for b, h, s in planted:
        y[b, h, s] *= 50
    plain = kvq.fake_quantize_kv(y, "channel", static=calib_scale)
    res = kvq.fake_quantize_kv(y, "channel", static=calib_scale, mean_eps=mean_eps, tau=3.0, residual_bits=4)
    want = torch.zeros_like(res.patched)
    for p in planted:
        want[p] = True
    assert torch.equal(res.patched, want)  # the x50 rows and only they
    for p in planted:
        e_plain = float((plain.x_hat[p] - y[p]).norm() / y[p].norm())
        e_res = float((res.x_hat[p] - y[p]).norm() / y[p].norm())
        # the 4-bit residual of a clipped row removes most of its error
        assert e_res < 0.25 * e_plain
    # unpatched rows are bit-identical to the plain INT8 entries
    torch.testing.assert_close(res.x_hat[~want], plain.x_hat[~want], rtol=0, atol=0)


def test_residual_needs_mean_eps():
    with pytest.raises(ValueError, match="mean_eps"):
        kvq.fake_quantize_kv(_kv(), "token", residual_bits=4)


def test_residual_quantizer_round_trip():
    r = torch.randn(10, 16)
    q, s = kvq.quantize_residual(r, 4)
    assert q.min() >= -8 and q.max() <= 7 and s.shape == (10, 1)
    assert ((kvq.dequantize_kv(q, s) - r).abs() <= 0.5 * s + 1e-6).all()


def test_residual_memory_overhead():
    # head_dim 64: 32 bytes of 4-bit residual + 2 scale + 4 index per patched token vs 64 bytes INT8
    assert kvq.residual_bytes_per_token(64, 4) == 38
    assert kvq.residual_overhead(0.01, 64, "channel", 4) == pytest.approx(0.01 * 38 / 64)
    assert kvq.residual_overhead(0.0, 64, "channel", 4) == 0.0
