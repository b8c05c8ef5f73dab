"""Fast Walsh-Hadamard transform: Triton kernel (interpreter on CPU, compiled on GPU) vs torch reference
and vs the explicit Hadamard matrix, on a grid of sizes (powers of two and 2^k x Paley orders)."""

import math

import pytest
import torch

from quantkit.kernels.hadamard import fwht_pow2_ref, fwht_pow2_triton, hadamard_ref, hadamard_transform
from quantkit.quant.rotation import hadamard_matrix

from _kernel_util import rel_err

SIZES = [2, 16, 64, 96, 160, 576, 1536]


@pytest.mark.parametrize("n", SIZES)
def test_reference_matches_explicit_matrix(n):
    x = torch.randn(7, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    explicit = x @ (hadamard_matrix(n, torch.float64) / math.sqrt(n))
    assert rel_err(hadamard_ref(x.float()), explicit) < 1e-6


@pytest.mark.parametrize("p", [2, 8, 64, 256, 2048])
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_triton_pow2_matches_reference(dev, p, rows):
    x = torch.randn(rows, p, generator=torch.Generator().manual_seed(p + rows)).to(dev)
    y = fwht_pow2_triton(x, 0.5)
    assert rel_err(y, 0.5 * fwht_pow2_ref(x)) < 1e-6


@pytest.mark.parametrize("n", [64, 576, 1536])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transform_dispatch_matches_reference(dev, n, dtype):
    x = torch.randn(3, 4, n, generator=torch.Generator().manual_seed(n)).to(dev, dtype)
    y = hadamard_transform(x)
    assert y.shape == x.shape and y.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(y, hadamard_ref(x)) < tol


def test_refuses_non_pow2_rows():
    with pytest.raises(ValueError, match="power of two"):
        fwht_pow2_triton(torch.zeros(2, 12))


@pytest.mark.parametrize("n,block", [(160, 32), (1536, 512), (1536, 128), (64, 64)])
def test_block_diagonal_matches_its_matrix(dev, n, block):
    """block: n / block Sylvester blocks H_b / sqrt(b) (compressed-tensors' hadamard with head_dim = block),
    through the Triton butterfly on the device and the reference, against the explicit block matrix."""
    from quantkit.quant.rotation import normalized_hadamard

    x = torch.randn(5, n, generator=torch.Generator().manual_seed(block)).to(dev)
    explicit = (x.double().cpu() @ normalized_hadamard(n, torch.float64, block=block)).float()
    assert rel_err(hadamard_transform(x, block).cpu(), explicit) < 1e-6
    assert rel_err(hadamard_ref(x, block).cpu(), explicit) < 1e-6
    if block < n:  # not the full Hadamard: the blocks leave the pieces unmixed
        assert rel_err(hadamard_transform(x, block).cpu(), hadamard_ref(x).cpu()) > 0.1


@pytest.mark.parametrize("block", [3, 48, 1024])
def test_refuses_a_block_that_is_not_a_dividing_power_of_two(block):
    with pytest.raises(ValueError, match="power of two"):
        hadamard_transform(torch.ones(2, 1536), block)
