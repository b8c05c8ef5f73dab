"""Fast Walsh-Hadamard transform over the last dim: y = x @ (H_n / sqrt(n)).

H_n is `quantkit.quant.rotation.hadamard_matrix(n)` = kron(A_m, S_p): p = 2^k (Sylvester,
symmetric), A_m the product of the Paley factors (m = n / p, 1 when n is a power of two).
Viewing a row x as X (m, p), x @ H_n = A_m^T X S_p, so the transform is a butterfly over
p (O(n log p), the Triton kernel) followed by a small m x m matmul (torch).

Spec (`hadamard_ref`): x (..., n) float -> (..., n) in x's dtype, computed in float32.
The kernel handles p <= 2^15 per row (one row block in registers); rows are independent.

block: a block-diagonal Hadamard instead, n / block copies of H_block / sqrt(block) (block a power
of two dividing n): x is viewed as (..., n / block, block) and each piece transformed alone. That is
the matrix compressed-tensors' `hadamard` transform with `head_dim = block` describes (Sylvester,
natural order), which vLLM applies with its Hadacore kernel.
"""

from __future__ import annotations

import math

import torch

from ._common import LazyKernel, cdiv, fast_launch, tl, use_triton
from .numerics import MAX_POW2, check_hadamard_block

__all__ = ["hadamard_transform", "hadamard_ref", "split_order", "fwht_pow2_ref"]
_triton_failed = False  # set after the first failed launch (hadamard_transform then uses the reference)


def split_order(n: int) -> tuple[int, torch.Tensor | None]:
    """(p, A_m): the power-of-two part p of n and the Paley part A_m (m x m, +-1, float32; None if m == 1)."""
    from .numerics import _hadamard_factors, _paley1

    factors = _hadamard_factors(n)
    if factors is None:
        raise ValueError(f"no Hadamard matrix of order {n} is known; use a rotation of another size")
    a = None
    for m in factors[1:]:
        f = _paley1(m - 1)
        a = f if a is None else torch.kron(f, a)
    return factors[0], (None if a is None else a.float())


def fwht_pow2_ref(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard (Sylvester) transform over the last dim (a power of two), float32."""
    p = x.shape[-1]
    y = x.float()
    h = 1
    while h < p:
        y = y.reshape(*x.shape[:-1], p // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return y.reshape(x.shape)


def _apply_paley(y: torch.Tensor, a: torch.Tensor | None, p: int) -> torch.Tensor:
    # y: (..., m * p) after the butterfly on each length-p piece -> A^T X over the m pieces
    if a is None:
        return y
    m = a.shape[0]
    yv = y.reshape(*y.shape[:-1], m, p)
    return torch.einsum("ik,...ij->...kj", a.to(yv.device, yv.dtype), yv).reshape(y.shape)


def _blocks(x: torch.Tensor, block: int | None) -> torch.Tensor | None:
    """x viewed as (..., n / block, block), or None when the transform is over the whole row."""
    n = x.shape[-1]
    if block is None or block == n:
        return None
    check_hadamard_block(n, block)
    return x.reshape(*x.shape[:-1], n // block, block)


def hadamard_ref(x: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """Reference: x (..., n) -> x @ H_n / sqrt(n) (or the block-diagonal H_block / sqrt(block)), in x's dtype
    (float32 math)."""
    xb = _blocks(x, block)
    if xb is not None:
        return hadamard_ref(xb).reshape(x.shape)
    n = x.shape[-1]
    p, a = split_order(n)
    y = fwht_pow2_ref(x.float().reshape(*x.shape[:-1], n // p, p)).reshape(*x.shape[:-1], n)
    return (_apply_paley(y, a, p) / math.sqrt(n)).to(x.dtype)


def _fwht_kernel(
    x_ptr, y_ptr,  # x, y: (rows, P) contiguous
    rows, scale,
    P: tl.constexpr,
    LOG_P: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    r = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    c = tl.arange(0, P)
    offs = r[:, None] * P + c[None, :]
    mask = (r < rows)[:, None]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # One butterfly stage per bit, from the highest: view (rows, 2, P/2), combine the halves.
    # Splitting on the top bit each time and rotating it to the bottom (join) visits every
    # bit once; after LOG_P stages the element order is back where it started.
    for _ in tl.static_range(LOG_P):
        x3 = tl.reshape(x, (BLOCK_ROWS, 2, P // 2))
        x3 = tl.permute(x3, (0, 2, 1))
        a, b = tl.split(x3)
        x = tl.reshape(tl.join(a + b, a - b), (BLOCK_ROWS, P))
    tl.store(y_ptr + offs, (x * scale).to(y_ptr.dtype.element_ty), mask=mask)


fwht_kernel = LazyKernel(_fwht_kernel)


def fwht_pow2_triton(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Triton launch: scale * Walsh-Hadamard transform over the last dim of x (rows, p), p = 2^k <= 2^15."""
    rows, p = x.shape
    if p & (p - 1) or p > MAX_POW2 or p < 2:
        raise ValueError(f"the Triton FWHT takes a power of two in [2, {MAX_POW2}], got {p}")
    x = x.contiguous()
    y = torch.empty_like(x)
    if rows == 0:
        return y
    block_rows = max(1, min(16, 4096 // p))
    num_warps = max(1, min(8, (p * block_rows) // 512)) if x.is_cuda else 1
    fast_launch(fwht_kernel, (cdiv(rows, block_rows),), (x, y, rows, float(scale)),
                dict(P=p, LOG_P=p.bit_length() - 1, BLOCK_ROWS=block_rows, num_warps=num_warps),
                (p, block_rows, num_warps))
    return y


def hadamard_transform(x: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """x (..., n) -> x @ H_n / sqrt(n) in x's dtype (block: the block-diagonal H_block / sqrt(block)); Triton
    butterfly on CUDA (or under TRITON_INTERPRET=1), else the torch reference. Differentiable only through the
    reference (used at run time / eval)."""
    xb = _blocks(x, block)
    if xb is not None:
        return hadamard_transform(xb).reshape(x.shape)
    n = x.shape[-1]
    p, a = split_order(n)
    if p < 2 or p > MAX_POW2 or not use_triton(x) or x.requires_grad:
        return hadamard_ref(x)
    global _triton_failed
    if _triton_failed:
        return hadamard_ref(x)
    lead = x.shape[:-1]
    try:
        y = fwht_pow2_triton(x.reshape(-1, p), 1.0 / math.sqrt(n))
    except Exception as e:  # a compile failure must not stop an eval: fall back once, loudly
        import warnings

        warnings.warn(f"Triton FWHT failed ({type(e).__name__}: {e}); using the torch reference from now on")
        _triton_failed = True
        return hadamard_ref(x)
    y = y.reshape(*lead, n)
    return _apply_paley(y.float(), a, p).to(x.dtype) if a is not None else y
