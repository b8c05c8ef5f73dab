"""Fused elementwise steps of a decoder block, so a decode step is a handful of launches, not dozens.

* ``add_rmsnorm(x, delta, weight, eps)`` -> (x + delta, RMSNorm(x + delta) * weight): the residual add and
  the next norm in one pass. Spec = transformers' LlamaRMSNorm: the sum rounded to x.dtype, then
  x * rsqrt(mean(x^2) + eps) in fp32, rounded to x.dtype, times the weight (rounded).
* ``silu_mul(gu, inter)`` -> silu(gate) * up for the fused gate/up output (rows, 2 * inter), each
  product rounded to the activation dtype as torch does.
* ``rope_store(qkv, cos, sin, pos, ...)`` -> q with RoPE (B, Hq, S, D); K with RoPE and V written into
  the KV cache at their positions: float, or INT8 with per-token scales (computed here) or static
  per-channel scales, quantized as ``quantkit.quant.kv`` does. One program per (token, head).

Each has a torch reference (``*_ref``) that is the spec; CPU tensors run it (the kernels' dispatch rule). With the
runtime's programmatic chain on (``_common.chain_pdl``: sm_90+, unless QUANTKIT_CHAIN_PDL=0; the ``PDL`` constexpr) each
launch lets the next launch start at once and waits for the launch before it before it reads anything.
"""

from __future__ import annotations

import torch

from ._common import (LazyKernel, cdiv, chain_pdl, fast_launch, next_pow2, pdl_enter, pdl_option, quantize_sym, tl,
                      use_triton)

__all__ = ["add_rmsnorm", "add_rmsnorm_ref", "silu_mul", "silu_mul_ref", "rope_store", "rope_store_ref"]

KV_MIN_SCALE = 1e-8  # quantkit.kernels.numerics.MIN_SCALE


# ----------------------------------------------------------------------------- add + RMSNorm


def add_rmsnorm_ref(x, delta, weight, eps):
    if delta is not None:
        x = x + delta
    xf = x.float()
    h = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return x, weight * h


def _add_rmsnorm_kernel(x_ptr, d_ptr, w_ptr, xo_ptr, h_ptr, N, eps, HAS_D: tl.constexpr, BLOCK: tl.constexpr,
                        PDL: tl.constexpr):
    pdl_enter(PDL, PDL)
    r = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    dt = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + r * N + offs, mask=mask, other=0.0)
    if HAS_D:
        x = (x.to(tl.float32) + tl.load(d_ptr + r * N + offs, mask=mask, other=0.0).to(tl.float32)).to(dt)
        tl.store(xo_ptr + r * N + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(xf * xf, axis=0) / N + eps)
    h = (xf * rstd).to(dt).to(tl.float32) * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(h_ptr + r * N + offs, h.to(dt), mask=mask)


add_rmsnorm_kernel = LazyKernel(_add_rmsnorm_kernel)


def add_rmsnorm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """x, delta: (..., N) -> (x + delta, normed) (x itself when delta is None)."""
    if not use_triton(x) or x.shape[-1] > 65536:
        return add_rmsnorm_ref(x, delta, weight, eps)
    N = x.shape[-1]
    x2 = x.reshape(-1, N).contiguous()
    rows = x2.shape[0]
    h = torch.empty_like(x2)
    if delta is not None:
        xo = torch.empty_like(x2)
        d2 = delta.reshape(-1, N).contiguous()
    else:
        xo, d2 = x2, x2
    has_d, block, warps, pdl = delta is not None, next_pow2(N), 4 if N <= 4096 else 8, chain_pdl(x.device)
    fast_launch(add_rmsnorm_kernel, (rows,), (x2, d2, weight, xo, h, N, float(eps)),
                dict(HAS_D=has_d, BLOCK=block, PDL=pdl, num_warps=warps, **pdl_option(pdl)), (has_d, block, warps, pdl))
    return xo.view(x.shape), h.view(x.shape)


# ----------------------------------------------------------------------------- SiLU(gate) * up


def silu_mul_ref(gu, inter):
    g, u = gu[..., :inter], gu[..., inter:]
    return torch.nn.functional.silu(g) * u


def _silu_mul_kernel(gu_ptr, o_ptr, I, stride, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL, PDL)
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < I
    dt = gu_ptr.dtype.element_ty
    g = tl.load(gu_ptr + r * stride + c, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + r * stride + I + c, mask=mask, other=0.0).to(tl.float32)
    a = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    tl.store(o_ptr + r * I + c, (a * u).to(dt), mask=mask)


silu_mul_kernel = LazyKernel(_silu_mul_kernel)


def silu_mul(gu: torch.Tensor, inter: int) -> torch.Tensor:
    """gu: (..., 2 * inter) [gate | up] -> silu(gate) * up (..., inter)."""
    if not use_triton(gu):
        return silu_mul_ref(gu, inter)
    lead = gu.shape[:-1]
    g2 = gu.reshape(-1, gu.shape[-1])
    if g2.stride(-1) != 1:
        g2 = g2.contiguous()
    rows = g2.shape[0]
    out = torch.empty((rows, inter), dtype=gu.dtype, device=gu.device)
    BLOCK, pdl = 1024, chain_pdl(gu.device)
    fast_launch(silu_mul_kernel, (rows, cdiv(inter, BLOCK)), (g2, out, inter, g2.stride(0)),
                dict(BLOCK=BLOCK, PDL=pdl, num_warps=4, **pdl_option(pdl)), (BLOCK, 4, pdl))
    return out.view(*lead, inter)


# ----------------------------------------------------------------------------- RoPE + KV store


def split_heads(qkv, Hq: int, Hkv: int, D: int):
    """The fused q/k/v output (B, S, (Hq + 2 Hkv) * D) as q (B, S, Hq, D), k and v (B, S, Hkv, D) views."""
    B, S, _ = qkv.shape
    q, k, v = torch.split(qkv, [Hq * D, Hkv * D, Hkv * D], dim=-1)
    return q.view(B, S, Hq, D), k.view(B, S, Hkv, D), v.view(B, S, Hkv, D)


def rope(x, cos, sin):
    """RoPE as transformers applies it: x (B, H, S, D), cos/sin (B, S, D) -> x cos + rotate_half(x) sin."""
    h = x.shape[-1] // 2
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * c + torch.cat((-x[..., h:], x[..., :h]), dim=-1) * s


def rope_store_ref(qkv, cos, sin, pos, Hq, Hkv, D, k_cache, v_cache, k_scale=None, v_scale=None, bits: int = 8):
    """qkv: (B, S, (Hq + 2 Hkv) * D); cos, sin: (B, S, D); pos: (B, S) long; caches: (B, Hkv, T, D) float or
    int8; scales: None, per-token (B, Hkv, T) (written here) or per-channel (Hkv, D). Returns q (B, Hq, S, D)."""
    q, k, v = (t.transpose(1, 2) for t in split_heads(qkv, Hq, Hkv, D))
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    _store_kv(k, v, pos, k_cache, v_cache, k_scale, v_scale, bits)
    return q


def _store_kv(k, v, pos, k_cache, v_cache, k_scale, v_scale, bits):
    from . import numerics as kvq

    B, H, S, D = k.shape
    index = pos.view(B, 1, S, 1).expand(B, H, S, D)
    if k_cache.dtype != torch.int8:
        k_cache.scatter_(2, index, k.to(k_cache.dtype))
        v_cache.scatter_(2, index, v.to(v_cache.dtype))
        return
    for x, cache, sc in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        if sc.dim() == 3:  # per-token, dynamic
            scale = kvq.kv_scale(x, "token", bits)
            sc.scatter_(2, pos.view(B, 1, S).expand(B, H, S), scale[..., 0])
        else:
            scale = sc.view(1, H, 1, D)
        cache.scatter_(2, index, kvq.quantize_kv(x, scale, bits))


def _rope_store_kernel(
    qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr,
    # qkv: (R, W) rows b * S + s; cos/sin: (R, D); pos: (R,) int64; q: (B, Hq, S, D); k/v: (B, Hkv, T, D)
    # ks/vs: (B, Hkv, T) per-token scales (MODE 1) or (Hkv, D) static per-channel scales (MODE 2)
    S, T, Hq, Hkv, stride_r,
    D: tl.constexpr,
    MODE: tl.constexpr,  # 0 float cache, 1 int8 per-token, 2 int8 per-channel
    QMAX: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_enter(PDL, PDL)
    r = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    b = r // S
    s = r % S
    HALF: tl.constexpr = D // 2
    offs = tl.arange(0, D)
    partner = (offs + HALF) % D
    sign = tl.where(offs < HALF, -1.0, 1.0)
    dt = qkv_ptr.dtype.element_ty
    c = tl.load(cos_ptr + r * D + offs).to(tl.float32)
    sn = tl.load(sin_ptr + r * D + offs).to(tl.float32)
    row = qkv_ptr + r * stride_r
    if j < Hq:
        x = tl.load(row + j * D + offs).to(tl.float32)
        xr = tl.load(row + j * D + partner).to(tl.float32) * sign
        y = ((x * c).to(dt).to(tl.float32) + (xr * sn).to(dt).to(tl.float32)).to(dt)
        tl.store(q_ptr + ((b * Hq + j) * S + s) * D + offs, y)
    else:
        h = j - Hq
        t = tl.load(pos_ptr + r)
        x = tl.load(row + (Hq + h) * D + offs).to(tl.float32)
        xr = tl.load(row + (Hq + h) * D + partner).to(tl.float32) * sign
        kr = ((x * c).to(dt).to(tl.float32) + (xr * sn).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        vv = tl.load(row + (Hq + Hkv + h) * D + offs).to(tl.float32)
        slot = (b * Hkv + h) * T + t
        dst = slot * D + offs
        if MODE == 0:
            tl.store(k_ptr + dst, kr.to(k_ptr.dtype.element_ty))
            tl.store(v_ptr + dst, vv.to(v_ptr.dtype.element_ty))
        else:
            if MODE == 1:
                ks = tl.maximum(tl.math.div_rn(tl.max(tl.abs(kr), axis=0), QMAX), 1e-8)
                vs = tl.maximum(tl.math.div_rn(tl.max(tl.abs(vv), axis=0), QMAX), 1e-8)
                tl.store(ks_ptr + slot, ks)
                tl.store(vs_ptr + slot, vs)
                yk = quantize_sym(kr, tl.zeros_like(kr) + ks, QMAX)
                yv = quantize_sym(vv, tl.zeros_like(vv) + vs, QMAX)
            else:
                yk = quantize_sym(kr, tl.load(ks_ptr + h * D + offs), QMAX)
                yv = quantize_sym(vv, tl.load(vs_ptr + h * D + offs), QMAX)
            tl.store(k_ptr + dst, yk.to(tl.int8))
            tl.store(v_ptr + dst, yv.to(tl.int8))


rope_store_kernel = LazyKernel(_rope_store_kernel)


def rope_store(qkv, cos, sin, pos, Hq, Hkv, D, k_cache, v_cache, k_scale=None, v_scale=None, bits: int = 8):
    """See rope_store_ref (the spec). One launch on CUDA: grid (B * S tokens, Hq + Hkv heads)."""
    if not use_triton(qkv) or D != next_pow2(D):
        return rope_store_ref(qkv, cos, sin, pos, Hq, Hkv, D, k_cache, v_cache, k_scale, v_scale, bits)
    B, S, W = qkv.shape
    q2 = qkv.reshape(B * S, W)
    if q2.stride(-1) != 1:
        q2 = q2.contiguous()
    c2 = cos.reshape(B * S, D).contiguous()
    s2 = sin.reshape(B * S, D).contiguous()
    p2 = pos.reshape(B * S).contiguous()
    q = torch.empty((B, Hq, S, D), dtype=qkv.dtype, device=qkv.device)
    mode = 0 if k_cache.dtype != torch.int8 else (1 if k_scale.dim() == 3 else 2)
    T = k_cache.shape[2]
    dummy = c2
    qmax = float((1 << (bits - 1)) - 1)
    pdl = chain_pdl(qkv.device)
    fast_launch(rope_store_kernel, (B * S, Hq + Hkv),
                (q2, c2, s2, p2, q, k_cache, v_cache, k_scale if mode else dummy, v_scale if mode else dummy,
                 S, T, Hq, Hkv, q2.stride(0)), dict(D=D, MODE=mode, QMAX=qmax, PDL=pdl, num_warps=1, **pdl_option(pdl)),
                (D, mode, qmax, pdl))
    return q

