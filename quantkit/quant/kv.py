"""INT8 KV-cache quantization with outlier-token residuals: pure tensor functions.

Shapes follow the attention code: K or V is x (batch, kv_heads, seq, head_dim),
K after RoPE (as stored in the cache). A "token" is one (batch, head, position)
vector of head_dim values.

Strategies (symmetric, signed integers in [-qmax, qmax], dequant = q * scale):
  "channel": static scale per (kv_head, head_dim channel), from calibration max|x|.
  "tensor":  one static scale.
  "token":   dynamic scale per token vector, max|x_token| / qmax, computed at run time.

Outlier residuals: a token whose relative error eps = ||x - deq(q(x))|| / ||x||
exceeds tau x (mean eps over calibration tokens) gets a residual r = x - deq(q(x))
quantized to `residual_bits` with its own per-token scale max|r| / rmax, stored
beside its INT8 entry; dequantization adds it back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.kernels.numerics import (  # noqa: F401  (re-exported: the KV quantizer's definition)
    channel_amax,
    kv_scale,
    quantize_kv,
    static_scale,
)

def dequantize_kv(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float32 q * scale."""
    return q.float() * scale


def relative_error(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Per-token ||x - x_hat||_2 / ||x||_2 over the last dim. (..., d) -> (...). Zero tokens give 0."""
    xf = x.float()
    num = (xf - x_hat.float()).norm(dim=-1)
    den = xf.norm(dim=-1)
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num))


def select_outliers(eps: torch.Tensor, mean_eps: float | torch.Tensor, tau: float) -> torch.Tensor:
    """Bool mask of tokens whose error exceeds tau x the calibration mean error. eps: (...)."""
    return eps > tau * torch.as_tensor(mean_eps, dtype=eps.dtype, device=eps.device)


@dataclass
class KVQuantResult:
    """One K or V tensor through the cache: x_hat is what attention reads back.

    x_hat: float32 (b, h, s, d). patched: bool (b, h, s), tokens that got a residual.
    eps: (b, h, s) relative error of the INT8 entry alone (before any residual).
    """

    x_hat: torch.Tensor
    patched: torch.Tensor
    eps: torch.Tensor


def quantize_residual(r: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric quantization of residuals r (..., d): (q int8 (..., d), scale (..., 1))."""
    scale = static_scale(r.float().abs().amax(dim=-1, keepdim=True), bits)
    return quantize_kv(r, scale, bits), scale


def fake_quantize_kv(
    x: torch.Tensor,
    strategy: str,
    *,
    bits: int = 8,
    static: torch.Tensor | None = None,
    mean_eps: float | None = None,
    tau: float = 3.0,
    residual_bits: int | None = None,
) -> KVQuantResult:
    """Quantize-dequantize K or V (b, h, s, d) as the cache stores it, with optional outlier residuals.

    residual_bits None = no residuals. With residuals, `mean_eps` (the mean
    relative error measured on calibration data with the same scales) is needed.
    """
    scale = kv_scale(x, strategy, bits, static)
    x_hat = dequantize_kv(quantize_kv(x, scale, bits), scale)
    eps = relative_error(x, x_hat)
    patched = torch.zeros_like(eps, dtype=torch.bool)
    if residual_bits is not None:
        if mean_eps is None:
            raise ValueError("KV residuals need the calibration mean error (mean_eps)")
        patched = select_outliers(eps, mean_eps, tau)
        if patched.any():
            r = x.float()[patched] - x_hat[patched]  # (n_patched, d)
            rq, rs = quantize_residual(r, residual_bits)
            x_hat[patched] = x_hat[patched] + dequantize_kv(rq, rs)
    return KVQuantResult(x_hat, patched, eps)


def residual_bytes_per_token(head_dim: int, residual_bits: int = 4, scale_bytes: int = 2, index_bytes: int = 4) -> int:
    """Extra cache bytes for one patched token vector: packed residual + its scale + its position index."""
    return (head_dim * residual_bits + 7) // 8 + scale_bytes + index_bytes


def int8_bytes_per_token(head_dim: int, strategy: str, scale_bytes: int = 2) -> int:
    """Cache bytes of one INT8 token vector (per-token strategy also stores its scale)."""
    return head_dim + (scale_bytes if strategy == "token" else 0)


def residual_overhead(patched_fraction: float, head_dim: int, strategy: str, residual_bits: int = 4) -> float:
    """Extra KV memory of the residuals as a fraction of the INT8 cache (0.01 = 1%)."""
    return patched_fraction * residual_bytes_per_token(head_dim, residual_bits) / int8_bytes_per_token(head_dim, strategy)
