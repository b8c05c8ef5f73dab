"""Per-sample histograms and power sums of a linear's outputs, for the runtime's fallback monitor.

Spec (``row_histogram_ref``), y: (rows, N) float, sample: (rows,) long, weight: (rows,) float (0 or 1):

    bin[r, c]         = clamp(floor((y[r, c] - lo) * inv_w), 0, bins - 1)
    counts[s, k]     += sum over rows r of sample s, columns c with bin[r, c] == k, of weight[r]
    moments[s, :]    += sum over those rows and all columns of weight[r] * (1, y, y^2, y^3)

counts: (S * bins,) fp32 and moments: (S, 4) fp32 are accumulated in place (the monitor resets them
per window). The kernel (``row_histogram``) is one launch: a program per row, atomic adds into the
row's sample; the reference is a few torch ops.
"""

from __future__ import annotations

import torch

from ._common import LazyKernel, fast_launch, next_pow2, tl, use_triton

__all__ = ["row_histogram", "row_histogram_ref"]


def row_histogram_ref(y, sample, weight, lo: float, inv_w: float, bins: int, counts, moments) -> None:
    rows, N = y.shape
    yf = y.float()
    b = ((yf - lo) * inv_w).floor_().clamp_(0, bins - 1).long()
    b += (sample * bins).view(rows, 1)
    w = weight.float().view(rows, 1).expand(rows, N)
    counts.index_add_(0, b.reshape(-1), w.reshape(-1))
    wd = weight.float().view(rows, 1)
    p = torch.stack([wd.expand(rows, N).sum(-1), (yf * wd).sum(-1), (yf * yf * wd).sum(-1),
                     (yf * yf * yf * wd).sum(-1)], dim=-1)
    moments.index_add_(0, sample, p.to(moments.dtype))


def _row_hist_kernel(
    y_ptr, s_ptr, w_ptr, c_ptr, m_ptr,
    # y: (rows, N) float; s: (rows,) int64 sample; w: (rows,) fp32 weight; c: (S * BINS,) fp32; m: (S, 4) fp32
    N, stride_y, lo, inv_w,
    BINS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0)
    w = tl.load(w_ptr + r)
    if w != 0:
        smp = tl.load(s_ptr + r)
        offs = tl.arange(0, BLOCK)
        s1 = tl.zeros((BLOCK,), dtype=tl.float32)
        s2 = tl.zeros((BLOCK,), dtype=tl.float32)
        s3 = tl.zeros((BLOCK,), dtype=tl.float32)
        for c0 in range(0, N, BLOCK):
            mask = (c0 + offs) < N
            y = tl.load(y_ptr + r.to(tl.int64) * stride_y + c0 + offs, mask=mask, other=0.0).to(tl.float32)
            b = tl.minimum(tl.maximum(tl.floor((y - lo) * inv_w), 0.0), BINS - 1).to(tl.int32)
            tl.atomic_add(c_ptr + smp * BINS + b, tl.zeros_like(y) + w, mask=mask, sem="relaxed")
            y = tl.where(mask, y, 0.0)
            s1 += y
            s2 += y * y
            s3 += y * y * y
        tl.atomic_add(m_ptr + smp * 4, w * N, sem="relaxed")
        tl.atomic_add(m_ptr + smp * 4 + 1, w * tl.sum(s1, axis=0), sem="relaxed")
        tl.atomic_add(m_ptr + smp * 4 + 2, w * tl.sum(s2, axis=0), sem="relaxed")
        tl.atomic_add(m_ptr + smp * 4 + 3, w * tl.sum(s3, axis=0), sem="relaxed")


row_hist_kernel = LazyKernel(_row_hist_kernel)


def row_histogram(y: torch.Tensor, sample: torch.Tensor, weight: torch.Tensor, lo: float, inv_w: float, bins: int,
                  counts: torch.Tensor, moments: torch.Tensor) -> None:
    """Accumulate (see module docstring). CUDA (or TRITON_INTERPRET=1): one Triton launch; else torch."""
    if not use_triton(y) or moments.dtype != torch.float32:
        row_histogram_ref(y, sample, weight, lo, inv_w, bins, counts, moments)
        return
    rows, N = y.shape
    if rows == 0:
        return
    y = y if y.stride(-1) == 1 else y.contiguous()
    block = min(1024, next_pow2(N))
    fast_launch(row_hist_kernel, (rows,), (y, sample, weight.float(), counts, moments, N, y.stride(0), float(lo),
                                           float(inv_w)), dict(BINS=bins, BLOCK=block, num_warps=4), (bins, block))
