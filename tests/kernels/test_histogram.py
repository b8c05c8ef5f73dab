"""The monitor's per-sample histogram + power sums: Triton kernel vs its torch reference."""

import pytest
import torch

from quantkit.kernels.histogram import row_histogram, row_histogram_ref


@pytest.mark.parametrize("rows,N,S,bins", [(7, 300, 3, 64), (20, 1100, 4, 512)])
def test_row_histogram_matches_reference(dev, rows, N, S, bins):
    g = torch.Generator().manual_seed(rows + N)
    y = (torch.randn(rows, N, generator=g) * 2 + 0.3).half().to(dev)
    sample = torch.randint(0, S, (rows,), generator=g).to(dev)
    weight = (torch.rand(rows, generator=g) < 0.7).float().to(dev)
    lo, hi = -3.0, 4.0  # some values fall outside: edge bins
    counts = torch.zeros(S * bins, device=dev)
    moments = torch.zeros(S, 4, device=dev)
    row_histogram(y, sample, weight, lo, bins / (hi - lo), bins, counts, moments)
    rc, rm = torch.zeros_like(counts), torch.zeros(S, 4, device=dev)
    row_histogram_ref(y, sample, weight, lo, bins / (hi - lo), bins, rc, rm)
    assert torch.equal(counts, rc)  # integer-valued counts: exact in fp32
    assert counts.sum() == weight.sum() * N and counts.view(S, bins)[:, 0].sum() > 0
    torch.testing.assert_close(moments, rm, rtol=1e-4, atol=1e-2)
    # accumulating twice doubles (the monitor adds every step into the window)
    row_histogram(y, sample, weight, lo, bins / (hi - lo), bins, counts, moments)
    assert torch.equal(counts, 2 * rc)
