"""Sensitivity metrics of one linear layer: pure tensor functions, no model traversal.

- KL(P||Q) between per-output-channel histograms of the float output (P) and the
  fake-quantized output (Q), over one shared range per layer, averaged over channels.
- R = (max - min) / (Q3 - Q1) of the layer's input activations.
- energy = sigma_1^2 / ||W||_F^2 (power iteration on the Gram matrix, float64).
- skewness: Pearson's third standardized moment, from streamed power sums.
- rel_err = ||yq - y||^2 / ||y||^2: the relative squared error of the quantized output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

DEFAULT_BINS = 512
# Added to every bin's probability before renormalizing: an empty bin in Q where
# P has mass would otherwise give an infinite KL.
KL_EPS = 1e-6


@torch.no_grad()
def channel_histograms(y: torch.Tensor, lo: float, hi: float, bins: int = DEFAULT_BINS) -> torch.Tensor:
    """Counts per output channel over [lo, hi] (values outside are clipped into the edge bins).

    y: (tokens, channels). Returns float64 (channels, bins).
    """
    if not hi > lo:
        raise ValueError(f"histogram range must satisfy hi > lo, got [{lo}, {hi}]")
    y = y.reshape(-1, y.shape[-1]).float()
    n_ch = y.shape[1]
    idx = ((y - lo) * (bins / (hi - lo))).floor().clamp_(0, bins - 1).long()  # (tokens, channels)
    idx += torch.arange(n_ch, device=y.device) * bins  # channel c's bins start at c * bins
    counts = torch.bincount(idx.reshape(-1), minlength=n_ch * bins)
    return counts.reshape(n_ch, bins).double()


def relative_error(err2: float, ref2: float) -> float:
    """||yq - y||^2 / ||y||^2 from the two streamed sums; 0 when both are 0, inf when only y is 0."""
    if ref2 > 0:
        return err2 / ref2
    return 0.0 if err2 == 0 else math.inf


def smooth(counts: torch.Tensor, eps: float = KL_EPS) -> torch.Tensor:
    """Probabilities from counts (..., bins): normalized, + eps per bin, renormalized."""
    p = counts.double() / counts.sum(dim=-1, keepdim=True).clamp_min(1)
    p = p + eps
    return p / p.sum(dim=-1, keepdim=True)


def kl_divergence(p_counts: torch.Tensor, q_counts: torch.Tensor, eps: float = KL_EPS) -> float:
    """mean over channels of KL(P_c || Q_c) in nats; counts (channels, bins) or (bins,)."""
    if p_counts.shape != q_counts.shape:
        raise ValueError(f"histogram shapes differ: {tuple(p_counts.shape)} vs {tuple(q_counts.shape)}")
    p, q = smooth(p_counts, eps), smooth(q_counts, eps)
    kl = (p * (p.log() - q.log())).sum(dim=-1)
    return float(kl.mean())


def range_ratio(values: torch.Tensor, vmin: float | None = None, vmax: float | None = None) -> float:
    """R = (max - min) / (Q3 - Q1).

    values: any shape, the sample the quartiles come from (exact quantiles via
    torch.quantile). vmin/vmax: the true extremes when `values` is a subsample of a
    larger stream (default: the sample's own). A zero IQR gives inf.
    """
    v = values.reshape(-1).float()
    q1, q3 = torch.quantile(v, torch.tensor([0.25, 0.75], device=v.device)).tolist()
    lo = float(v.min()) if vmin is None else vmin
    hi = float(v.max()) if vmax is None else vmax
    iqr = q3 - q1
    return (hi - lo) / iqr if iqr > 0 else math.inf


def energy_ratio(w: torch.Tensor, iters: int = 300, tol: float = 1e-12, squarings: int = 4) -> float:
    """sigma_1^2 / ||W||_F^2 for W (out, in): 1 for a rank-1 matrix, 1/min(out, in) for an orthogonal one.

    sigma_1^2 is the top eigenvalue of the smaller Gram matrix G (W W^T or W^T W),
    found by power iteration in float64 on P = G^(2^squarings) (repeated squaring,
    rescaled each time), with the Rayleigh quotient taken on G itself and stopped
    when it moves less than `tol` relative. Not svdvals / eigvalsh: LAPACK took
    ~7-18 s per 576x1536 matrix on the shared 2-core CPU; the plain power iteration
    on G took ~2 s there (300 tiny matvecs, each paying thread overhead); a few
    (k, k) matmuls for P cut the iterations 16-fold: the error shrinks like
    (lambda_2 / lambda_1)^(2 * 2^squarings * steps), and the Rayleigh quotient on G
    is accurate even when the top two singular values are close.
    """
    w = w.detach().double()
    fro2 = float((w * w).sum())
    if fro2 == 0:
        return 0.0
    g = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w  # (k, k), k = min(out, in)
    p = g / g.diagonal().sum()
    for _ in range(squarings):
        p = p @ p
        p = p / p.norm()  # keep the scale near 1; only the direction of P v matters
    v = torch.randn(g.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(g.device)
    v /= v.norm()
    lam = 0.0
    for _ in range(iters):
        u = p @ v
        n = u.norm()
        if n == 0:
            break
        v = u / n
        new = float(v @ (g @ v))
        if abs(new - lam) <= tol * abs(new):
            lam = new
            break
        lam = new
    return lam / fro2


class Moments:
    """Streaming power sums (float64) for the mean, variance and skewness of all values seen."""

    def __init__(self) -> None:
        self.n = 0
        self.s1 = self.s2 = self.s3 = 0.0
        self.shift: float | None = None  # subtract the first batch's mean: keeps the sums well conditioned

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1).double()
        if self.shift is None:
            self.shift = float(x.mean())
        x = x - self.shift
        self.n += x.numel()
        self.s1 += float(x.sum())
        self.s2 += float((x * x).sum())
        self.s3 += float((x * x * x).sum())

    @property
    def skewness(self) -> float:
        """Pearson's g1 = m3 / m2^1.5 (population moments); 0 for constant data."""
        if self.n == 0:
            return 0.0
        m = self.s1 / self.n
        m2 = self.s2 / self.n - m * m
        m3 = self.s3 / self.n - 3 * m * self.s2 / self.n + 2 * m**3
        return m3 / m2**1.5 if m2 > 0 else 0.0


def skewness(x: torch.Tensor) -> float:
    """Pearson's third standardized moment of all values of x."""
    m = Moments()
    m.add(x)
    return m.skewness


def _ranks(v: torch.Tensor) -> torch.Tensor:
    """1-based ranks, ties get their average rank."""
    v = v.double()
    order = torch.argsort(v, stable=True)
    ranks = torch.empty_like(v)
    ranks[order] = torch.arange(1, len(v) + 1, dtype=torch.float64)
    for u in torch.unique(v):  # average ranks over ties (few ties in practice)
        m = v == u
        if int(m.sum()) > 1:
            ranks[m] = ranks[m].mean()
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson on average ranks); nan when either side is constant or n < 2."""
    x, y = torch.tensor(list(a), dtype=torch.float64), torch.tensor(list(b), dtype=torch.float64)
    if x.shape != y.shape:
        raise ValueError(f"spearman needs equal lengths, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return float("nan")
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float((rx.square().sum() * ry.square().sum()).sqrt())
    return float((rx * ry).sum()) / den if den > 0 else float("nan")
