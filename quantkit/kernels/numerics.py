"""The number formats' definitions that the kernels' torch references and quantkit.quant share.

Below both: the kernels' references import them from here, quant/ re-exports them, so each
has one definition and no kernel imports quant/ (the floors: kernels -> quant).

  weights:  min/max scales and zero points per output channel or input-column group
            (`compute_qparams`; the GPTQ kernel's reference and quant.core's RTN use it);
  KV cache: per-token / per-channel / per-tensor scales and the integers (`kv_scale`,
            `quantize_kv`; the fused RoPE+store reference and quant.kv use them);
  Hadamard: the orders with a known construction (Sylvester 2^k x Paley I), which the
            Hadamard transform kernel and quant.rotation's matrices both factor.

`args` is anything with bits/qmin/qmax/symmetric/group_size (quantkit.quant.args.QuantArgs).
"""

from __future__ import annotations

import functools
import math

import torch

from quantkit.errors import short_repr

# ----------------------------------------------------------------------------- weights

# Smallest scale we allow: keeps all-zero groups from dividing by zero.
MIN_SCALE = 1e-8


def group_size_for(args, in_features: int) -> int:
    """The number of input columns sharing one scale (in_features for per-channel)."""
    return in_features if args.group_size is None else args.group_size


def _grouped(w: torch.Tensor, g: int) -> torch.Tensor:
    # w: (out, in) -> (out, n_groups, g)
    out_f, in_f = w.shape
    if in_f % g:
        raise ValueError(f"group size {g} does not divide in_features {in_f}")
    return w.reshape(out_f, in_f // g, g)


def round_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Scales as the checkpoint will store them: rounded to `dtype`, kept >0, returned as float32.

    Checkpoints store scales in the model dtype; rounding here keeps the
    in-memory model and the exported one bit-identical.
    """
    if dtype in (torch.float16, torch.bfloat16):
        scale = scale.to(dtype).clamp_min(torch.finfo(dtype).tiny)
    return scale.float().clamp_min(MIN_SCALE)


def compute_qparams(
    w: torch.Tensor,
    args,
    *,
    shrink: torch.Tensor | float = 1.0,
    scale_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min/max scales for w (out, in). Returns scale (out, n_groups) float32 and zero or None.

    shrink scales the range before the scale is computed (clipping search); a
    tensor must broadcast against (out, n_groups). scale_dtype (default: w's
    dtype) is the dtype the scale will be stored in; scales are rounded to it.
    """
    g = group_size_for(args, w.shape[1])
    wg = _grouped(w.float(), g)
    sdt = scale_dtype or w.dtype
    if args.symmetric:
        amax = wg.abs().amax(dim=-1) * shrink
        # Full signed range: [-2^(b-1), 2^(b-1)-1] spans 2^b - 1 steps around 0.
        scale = round_scale(amax / ((args.qmax - args.qmin) / 2), sdt)
        return scale, None
    # The range always includes 0 so that 0 is exactly representable.
    wmin = wg.amin(dim=-1).clamp_max(0) * shrink
    wmax = wg.amax(dim=-1).clamp_min(0) * shrink
    scale = round_scale((wmax - wmin) / (args.qmax - args.qmin), sdt)
    zero = torch.round(args.qmin - wmin / scale).clamp(args.qmin, args.qmax)
    return scale, zero.to(torch.int8)

# ----------------------------------------------------------------------------- KV cache

def _qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def static_scale(amax: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Static scale from a calibrated max|x| (any shape that broadcasts against x): amax / qmax, in IEEE division
    (`scale_from_amax`, quantkit.kernels.act_quant)."""
    from quantkit.kernels.act_quant import scale_from_amax

    return scale_from_amax(amax, _qmax(bits)).clamp_min(MIN_SCALE)


def channel_amax(x: torch.Tensor) -> torch.Tensor:
    """max|x| per (kv_head, channel) over batch and sequence. x: (b, h, s, d) -> (h, d)."""
    return x.detach().float().abs().amax(dim=(0, 2))


def kv_scale(x: torch.Tensor, strategy: str, bits: int = 8, static: torch.Tensor | None = None) -> torch.Tensor:
    """The scale that quantizes x (b, h, s, d), broadcastable to x.

    "token": (b, h, s, 1) from x itself. "channel": static (h, d) -> (1, h, 1, d).
    "tensor": static scalar (or (h, d), reduced to its max).
    """
    if strategy == "token":
        return static_scale(x.float().abs().amax(dim=-1, keepdim=True), bits)
    if static is None:
        raise ValueError(f"KV strategy {short_repr(strategy)} needs calibrated static scales")
    static = static.float().to(x.device)
    if strategy == "channel":
        h, d = x.shape[1], x.shape[3]
        if tuple(static.shape) != (h, d):
            raise ValueError(f"per-channel KV scale shape {tuple(static.shape)} != (kv_heads, head_dim) {(h, d)}")
        return static.view(1, h, 1, d)
    if strategy == "tensor":
        return static.max().reshape(1, 1, 1, 1)
    raise ValueError(f"unknown KV strategy {short_repr(strategy)}")


def quantize_kv(x: torch.Tensor, scale: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Signed integers of x's shape (int8): `quantize_symmetric_ref` (quantkit.kernels.act_quant),
    the quantizer the activations and the kernels use: ties away from zero, range [-qmax, qmax]."""
    from quantkit.kernels.act_quant import quantize_symmetric_ref

    return quantize_symmetric_ref(x, scale, _qmax(bits))

# ----------------------------------------------------------------------------- Hadamard orders

def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, int(math.isqrt(q)) + 1))


def _paley1(q: int) -> torch.Tensor:
    """Paley construction I: a Hadamard matrix of order q + 1 for a prime q = 3 (mod 4)."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in residues else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jacobsthal = chi[(idx.view(1, -1) - idx.view(-1, 1)) % q]  # Q[i, j] = chi(j - i), skew for q = 3 mod 4
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = jacobsthal
    return s + torch.eye(q + 1, dtype=torch.float64)


def paley_orders(limit: int) -> list[int]:
    """Orders q + 1 <= limit with q prime, q = 3 (mod 4), that are not powers of two: 12, 20, 24, 44, 48, 60, ..."""
    return [q + 1 for q in range(3, limit) if q % 4 == 3 and _is_prime(q) and not _is_pow2(q + 1)]


MAX_POW2 = 1 << 15  # the largest power-of-two Hadamard the FWHT kernel takes per row (vLLM's Hadacore: the same)


def is_hadamard_block(n: int, block: int) -> bool:
    """Whether `block` splits a width-n row for the transform: n itself (one Hadamard of the whole row) or a
    power of two >= 2 dividing n (Sylvester blocks)."""
    return block == n or (block >= 2 and block & (block - 1) == 0 and n % block == 0)


def check_hadamard_block(n: int, block: int) -> None:
    if not is_hadamard_block(n, block):
        raise ValueError(f"a Hadamard block must be a power of two >= 2 dividing {n}, got {block}")


@functools.lru_cache(maxsize=32)
def _hadamard_factors(n: int) -> tuple[int, ...] | None:
    """(p, m1, m2, ...): n = p * m1 * m2 ..., p a power of two, each m a Paley order; None if none found."""
    if _is_pow2(n):
        return (n,)
    for m in paley_orders(n + 1):
        if n % m == 0:
            rest = _hadamard_factors(n // m)
            if rest is not None:
                return rest + (m,)
    return None
