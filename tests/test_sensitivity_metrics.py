"""Sensitivity metrics against references on small random tensors, and the threshold logic."""

import math

import pytest
import torch

from quantkit.recipe import PRESETS
from quantkit.sensitivity.metrics import (
    KL_EPS,
    Moments,
    channel_histograms,
    energy_ratio,
    kl_divergence,
    range_ratio,
    relative_error,
    skewness,
    smooth,
    spearman,
)
from quantkit.sensitivity.scan import LayerScan, Thresholds, apply_thresholds


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ energy


def test_energy_rank_one_is_one():
    u, v = torch.randn(48, 1, generator=_g(1)), torch.randn(1, 80, generator=_g(2))
    assert energy_ratio(u @ v) == pytest.approx(1.0, abs=1e-5)


def test_energy_orthogonal_is_one_over_n():
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=_g(3)))
    assert energy_ratio(q) == pytest.approx(1 / 32, rel=1e-4)


def test_energy_matches_numpy_svd():
    w = torch.randn(40, 64, generator=_g(4))
    w[:, 3] *= 9  # a dominant direction
    s = torch.from_numpy(__import__("numpy").linalg.svd(w.double().numpy(), compute_uv=False))
    ref = float(s[0] ** 2 / (s**2).sum())
    assert energy_ratio(w) == pytest.approx(ref, rel=1e-5)
    assert 1 / 40 < ref < 1


# ------------------------------------------------------------------ R


def test_range_ratio_known_answer():
    # 0..100: min 0, max 100, Q1 25, Q3 75 -> R = 100 / 50
    assert range_ratio(torch.arange(101.0)) == pytest.approx(2.0)
    # extremes passed in (a subsample's stream min/max) override the sample's own
    assert range_ratio(torch.arange(101.0), vmin=-50.0, vmax=150.0) == pytest.approx(4.0)


def test_range_ratio_outliers_raise_r():
    x = torch.randn(4096, generator=_g(5))
    base = range_ratio(x)
    y = x.clone()
    y[::512] *= 60  # 8 planted outliers: the bulk (IQR) barely moves, the range explodes
    planted = range_ratio(y)
    assert base < 10  # Gaussian: ~7 for 4k samples
    assert planted > 5 * base


def test_range_ratio_constant_is_inf():
    assert math.isinf(range_ratio(torch.ones(100)))


# ------------------------------------------------------------------ histograms + KL


def test_channel_histograms_match_histc():
    y = torch.randn(300, 5, generator=_g(6)) * torch.tensor([0.5, 1, 2, 3, 4])
    lo, hi = -3.0, 3.0
    h = channel_histograms(y, lo, hi, bins=16)
    assert h.shape == (5, 16)
    for c in range(5):
        ref = torch.histc(y[:, c].clamp(lo, hi - 1e-6), bins=16, min=lo, max=hi)
        assert torch.equal(h[c].float(), ref), c
    assert torch.all(h.sum(dim=1) == 300)  # out-of-range values are clipped into the edge bins, not dropped


def test_kl_identical_is_zero_and_known_two_bin_value():
    counts = torch.tensor([[3.0, 1.0, 0.0, 6.0], [1.0, 1.0, 1.0, 1.0]])
    assert kl_divergence(counts, counts) == pytest.approx(0.0, abs=1e-12)
    p, q = torch.tensor([[3.0, 1.0]]), torch.tensor([[1.0, 3.0]])
    ps = (torch.tensor([0.75, 0.25], dtype=torch.float64) + KL_EPS) / (1 + 2 * KL_EPS)
    qs = (torch.tensor([0.25, 0.75], dtype=torch.float64) + KL_EPS) / (1 + 2 * KL_EPS)
    ref = float((ps * (ps / qs).log()).sum())
    assert kl_divergence(p, q) == pytest.approx(ref, rel=1e-9)
    assert ref == pytest.approx(0.5 * math.log(3), rel=1e-4)


def test_kl_empty_bins_finite_and_averaged_over_channels():
    p = torch.tensor([[10.0, 0.0], [5.0, 5.0]])
    q = torch.tensor([[0.0, 10.0], [5.0, 5.0]])
    kl = kl_divergence(p, q)
    assert math.isfinite(kl)
    ps, qs = smooth(p[0]), smooth(q[0])
    assert kl == pytest.approx(float((ps * (ps / qs).log()).sum()) / 2, rel=1e-9)


def test_kl_grows_with_quantization_error():
    y = torch.randn(4000, 8, generator=_g(7))
    lo, hi = -5.0, 5.0
    p = channel_histograms(y, lo, hi, 64)
    small = channel_histograms(y + 0.01 * torch.randn(y.shape, generator=_g(8)), lo, hi, 64)
    big = channel_histograms(torch.round(y / 0.5) * 0.5, lo, hi, 64)  # coarse rounding
    assert kl_divergence(p, small) < kl_divergence(p, big)
    assert kl_divergence(p, big) > 0.1


# ------------------------------------------------------------------ skew, spearman


def test_skewness_matches_direct_formula_and_streams():
    x = torch.distributions.Exponential(1.0).sample((20000,))
    m, s = x.double().mean(), x.double().std(unbiased=False)
    ref = float(((x.double() - m) ** 3).mean() / s**3)
    assert skewness(x) == pytest.approx(ref, rel=1e-6)
    assert ref == pytest.approx(2.0, abs=0.2)  # the exponential distribution's skewness
    st = Moments()
    for chunk in (x + 1000).split(777):  # a large offset: the shifted sums must stay exact
        st.add(chunk)
    assert st.skewness == pytest.approx(ref, rel=1e-4)
    assert skewness(-x) == pytest.approx(-ref, rel=1e-6)


def test_spearman():
    a = [0.1, 0.5, 0.2, 0.9, 0.3]
    assert spearman(a, [math.exp(v) for v in a]) == pytest.approx(1.0)
    assert spearman(a, [-v for v in a]) == pytest.approx(-1.0)
    # ties get average ranks: x ranks [1.5,1.5,3,4], y ranks [1,2,4,3]
    rx, ry = torch.tensor([1.5, 1.5, 3, 4]), torch.tensor([1.0, 2, 4, 3])
    rx, ry = rx - rx.mean(), ry - ry.mean()
    ref = float((rx * ry).sum() / (rx.square().sum() * ry.square().sum()).sqrt())
    assert spearman([1, 1, 2, 3], [10, 20, 40, 30]) == pytest.approx(ref)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


# ------------------------------------------------------------------ thresholds


def _entry(name, kl, R, energy):
    return LayerScan(name, 0, "o_proj", kl, R, energy, 0.0, torch.zeros(4), 0.0, 1.0, 0.0)


def test_threshold_logic_any_metric_over_flags():
    th = Thresholds()  # 0.02, 15, 0.42
    assert not th.flags(0.02, 15.0, 0.42)  # strictly greater
    assert th.flags(0.0201, 1.0, 0.1)
    assert th.flags(0.0, 15.1, 0.1)
    assert th.flags(0.0, 1.0, 0.43)
    assert not Thresholds(None, None, None).flags(9.0, 99.0, 1.0)
    assert Thresholds(kl=None, R=None, energy=0.5).flags(9.0, 99.0, 0.6)
    assert not Thresholds().flags(0.0, None, 0.1)  # R unknown (zero IQR stored as null) never flags by itself
    layers = [_entry("a", 0.03, 1, 0.1), _entry("b", 0.01, 1, 0.1), _entry("c", 0.01, 20, 0.1)]
    assert apply_thresholds(layers, th, PRESETS["W8A8"]) == ["a", "c"]
    assert [e.flag for e in layers] == ["fp16", "int8", "fp16"]
    apply_thresholds(layers, th, PRESETS["W4A16"])
    assert layers[1].flag == "int4"


def test_relative_error_known_answers():
    y = torch.tensor([[3.0, 4.0]])  # ||y||^2 = 25
    yq = torch.tensor([[3.0, 5.0]])  # ||yq - y||^2 = 1
    assert relative_error(float((yq - y).square().sum()), float(y.square().sum())) == pytest.approx(0.04)
    assert relative_error(0.0, 0.0) == 0.0 and relative_error(1.0, 0.0) == math.inf


def test_rel_err_threshold():
    th = Thresholds(kl=None, R=None, energy=None, rel_err=0.1)
    assert th.flags(0.0, 1.0, 0.1, 0.2) and not th.flags(9.0, 99.0, 1.0, 0.05)
    assert not th.flags(0.0, 1.0, 0.1, math.nan)  # unknown rel_err never flags
