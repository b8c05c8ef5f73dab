"""Orthogonal rotations for SpinQuant / QuaRot-style quantization: pure tensor math.

Conventions (a linear computes y = x W^T + b, W: (out, in), x a row vector):
  rotate_input(W, R)      = W R       the linear then expects inputs x R (R: (in, in))
  rotate_output(W, b, R)  = R^T W     its outputs become y R (R: (out, out)), bias b R
Both keep the function exactly when the neighbour applies the matching R
(x R (W R)^T = x W^T because R R^T = I).

Hadamard matrices: Sylvester for 2^k, Paley I (q prime, q = 3 mod 4) for order
q + 1, and Kronecker products of them, so n = 576 = 8 x 72, 1536 = 12 x 128,
14336 = 64 x 224 all have one. `hadamard_matrix(n)` is unnormalized (entries +-1);
the orthogonal version is H / sqrt(n).
"""

from __future__ import annotations

import functools
import math

import torch

from quantkit.kernels.numerics import (  # noqa: F401  (re-exported: the Hadamard orders' definition)
    MAX_POW2,
    _hadamard_factors,
    _paley1,
    check_hadamard_block,
)

# ----------------------------------------------------------------------------- Hadamard matrices


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def has_hadamard(n: int) -> bool:
    return _hadamard_factors(n) is not None


@functools.lru_cache(maxsize=32)
def _hadamard_cached(n: int) -> torch.Tensor:
    factors = _hadamard_factors(n)
    if factors is None:
        raise ValueError(f"no Hadamard construction known for order {n}; use random_orthogonal")
    h = _sylvester(factors[0])
    for m in factors[1:]:
        h = torch.kron(_paley1(m - 1), h)  # the Paley factor outermost: x viewed as (m, p) (see kernels/hadamard)
    return h


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An n x n matrix with entries +-1 and H H^T = n I (n = 2^k * Paley orders). ValueError if none is known."""
    return _hadamard_cached(n).to(dtype)


def random_signs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1


def random_orthogonal(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A seeded random orthogonal matrix (QR of a Gaussian, signs fixed so it is Haar-distributed)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r)).view(1, -1)).to(dtype)


def random_hadamard(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """diag(random signs) H / sqrt(n): orthogonal, every entry +-1/sqrt(n). Falls back to
    `random_orthogonal` when no Hadamard order is known for n."""
    if not has_hadamard(n):
        return random_orthogonal(n, seed, dtype)
    h = _hadamard_cached(n) / math.sqrt(n)
    return (random_signs(n, seed).view(-1, 1) * h).to(dtype)


def normalized_hadamard(n: int, dtype: torch.dtype = torch.float32, block: int | None = None) -> torch.Tensor:
    """H / sqrt(n): the deterministic orthogonal Hadamard the online rotations (R3, R4) apply.

    block (a power of two dividing n, < n): block-diagonal instead, n / block Sylvester blocks H_b / sqrt(b),
    the matrix `quantkit.kernels.hadamard.hadamard_transform(x, block)` multiplies by. Symmetric either way
    for Sylvester blocks; the full Paley one is not (x H != x H^T), so callers keep x H."""
    if block is None or block == n:
        return (_hadamard_cached(n) / math.sqrt(n)).to(dtype)
    check_hadamard_block(n, block)
    h = _sylvester(block) / math.sqrt(block)
    return torch.block_diag(*[h] * (n // block)).to(dtype)


def sylvester_block(n: int) -> int:
    """The largest power of two dividing n (at most the FWHT kernel's MAX_POW2, also vLLM's Hadacore limit): the
    block of the block-diagonal Hadamard of width n that engines with a power-of-two FWHT can run (n itself when
    n is a power of two)."""
    return min(n & -n, MAX_POW2)


# ----------------------------------------------------------------------------- Cayley parametrization


def skew(p: torch.Tensor) -> torch.Tensor:
    """The skew-symmetric part (P - P^T) / 2 of a square matrix."""
    return 0.5 * (p - p.transpose(-1, -2))


def cayley(a: torch.Tensor) -> torch.Tensor:
    """R = (I - A)(I + A)^-1 for skew-symmetric A (n, n): orthogonal, differentiable in A.

    (I + A) is always invertible for skew A (its eigenvalues are 1 + i*t)."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    # solve X (I + A) = (I - A) for X, no explicit inverse
    return torch.linalg.solve(eye + a, eye - a, left=False)


def cayley_sgd_step(r: torch.Tensor, grad: torch.Tensor, lr: float, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """One Riemannian SGD step on the orthogonal matrices R (..., n, n) with the Cayley retraction.

    Li, Li & Todorovic, "Efficient Riemannian optimization on the Stiefel manifold via the
    Cayley transform" (ICLR 2020), as SpinQuant trains its rotations. W = G R^T - R G^T is the
    skew generator of steepest descent (to first order R' = R - a G + a R G^T R);
    R' = (I + a/2 W)^-1 (I - a/2 W) R stays exactly orthogonal. The step a = min(lr, 1/|W|_1)
    per matrix (|W|_1 the largest column sum of |W|) caps how far one step turns.
    Returns (R', a)."""
    w = grad @ r.transpose(-1, -2)
    w = w - w.transpose(-1, -2)
    norm1 = w.abs().sum(-2).amax(-1)
    alpha = torch.clamp(1.0 / (norm1 + eps), max=lr)
    return cayley(0.5 * alpha[..., None, None] * w) @ r, alpha


def orthogonality_error(r: torch.Tensor) -> float:
    """max |R^T R - I| (0 for an exactly orthogonal R), computed in float64."""
    r = r.detach().double()
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
    return float((r.transpose(-1, -2) @ r - eye).abs().max())


def reproject(r: torch.Tensor) -> torch.Tensor:
    """The nearest orthogonal matrix to R (polar factor U V^T of its SVD), in R's dtype."""
    u, _, vh = torch.linalg.svd(r.detach().double())
    return (u @ vh).to(r.dtype)


# ----------------------------------------------------------------------------- folding into weights


def rotate_input(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """W R: the linear now takes inputs x R. w: (out, in), r: (in, in)."""
    return w @ r.to(w.dtype)


def rotate_output(w: torch.Tensor, b: torch.Tensor | None, r: torch.Tensor):
    """(R^T W, b R): the linear now produces y R. w: (out, in), b: (out,) or None, r: (out, out)."""
    r = r.to(w.dtype)
    return r.transpose(0, 1) @ w, (None if b is None else b @ r)


def blockwise(r: torch.Tensor, heads: int) -> torch.Tensor:
    """block-diag(R, ..., R) of `heads` copies of R (d, d): the per-head rotation of a (heads * d) space."""
    return torch.block_diag(*([r] * heads))


def rotate_heads_output(w: torch.Tensor, b: torch.Tensor | None, r: torch.Tensor, head_dim: int):
    """Outputs of w (heads * d, in) rotated per head by r (d, d): rows of head h -> R^T W_h, b_h -> b_h R."""
    out_f, in_f = w.shape
    heads = out_f // head_dim
    r = r.to(w.dtype)
    w2 = torch.einsum("ji,hjk->hik", r, w.reshape(heads, head_dim, in_f)).reshape(out_f, in_f)
    b2 = None if b is None else (b.reshape(heads, head_dim) @ r).reshape(out_f)
    return w2, b2


def rotate_heads_input(w: torch.Tensor, r: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Inputs of w (out, heads * d) rotated per head: columns of head h -> W_h R (expects x_h R)."""
    out_f, in_f = w.shape
    heads = in_f // head_dim
    return torch.einsum("ohj,jk->ohk", w.reshape(out_f, heads, head_dim), r.to(w.dtype)).reshape(out_f, in_f)


def fold_norm_into_linears(norm_weight: torch.Tensor, linears_w: list[torch.Tensor]) -> list[torch.Tensor]:
    """W diag(g) for each consumer of an RMSNorm with weight g (in,): the norm can then use weight 1.

    RMSNorm(x) = x / rms(x) * g, so consumer(x) = (x / rms(x)) (W diag(g))^T: exact."""
    return [w * norm_weight.to(w.dtype).view(1, -1) for w in linears_w]
