"""W8A8 GEMM: int8 activations x int8 weights -> int32 accumulate -> scaled FP16/BF16 out.

Math (``w8a8_gemm_ref`` is the spec), x: (M, K) fp16/bf16, weight q: (N, K) int8 with
per-output-channel scale w_scale: (N,):

    a_q, a_scale = per_token_quant(x)                 # (M, K) int8, (M, 1) fp32
    acc[m, n]    = sum_k a_q[m, k] * q[n, k]          # exact int32
    out[m, n]    = (acc * a_scale[m] * w_scale[n] + bias[n]).to(x.dtype)   # fp32 epilogue

Layout: ``prepack_w8a8`` keeps the weight as (N, K) row-major int8 -- i.e. K-major, which is
what the int8 tensor-core instructions want for the B operand -- and turns the per-channel
scale into a contiguous fp32 (N,) vector.  Only symmetric weights are accepted.

Paths (one kernel, chosen by constexprs):

* small M (M <= 16): GEMV-style tiles (BLOCK_M=16, narrow BLOCK_N, long BLOCK_K, deep
  pipeline) with the activation quantization **fused into the prologue** (each program
  computes the row max of its 16 rows, then quantizes the fp16 tiles on the fly), so the whole
  linear is one launch;
* large M: wide tiles, a separate ``per_token_quant`` launch first (re-computing the row max
  in every N-tile would re-read x N/BLOCK_N times).

Configs come from a :class:`~quantkit.kernels._common.ConfigCache` keyed by
(M bucket, N, K, GPU): heuristics by default, overridden by ``TUNED`` (measured by
``benchmarks/gemm.py --tune``).
"""

from dataclasses import dataclass
from typing import Optional

import torch

from ._common import ConfigCache, LazyKernel, cdiv, gpu_key, splitk_buffers, splitk_for, tl, use_triton
from .act_quant import EPS, per_token_quant, per_token_quant_ref

MAGIC = tl.constexpr(0x4B000000)  # bits of 2**23 (see wna16: int -> float without a cvt)
TWO23 = tl.constexpr(8388608.0)

__all__ = [
    "W8A8Weight",
    "prepack_w8a8",
    "w8a8_linear",
    "w8a8_gemm_q",
    "w8a8_gemm_ref",
    "w8a8_gemm_q_ref",
    "w8a8_int32_accumulate",
    "CONFIGS",
]


@dataclass
class W8A8Weight:
    """Packed W8A8 weight. w: (N, K) int8 contiguous (K-major); scale: (N,) fp32."""

    w: torch.Tensor
    scale: torch.Tensor

    @property
    def N(self) -> int:
        return self.w.shape[0]

    @property
    def K(self) -> int:
        return self.w.shape[1]


def prepack_w8a8(q: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor] = None) -> W8A8Weight:
    """Canonical (q (N, K) int8, scale (N, 1), zero None) -> :class:`W8A8Weight`. Call once at load."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError("q must be a 2-D int8 tensor (N, K)")
    N, K = q.shape
    if scale.numel() != N:
        raise ValueError(f"W8A8 needs per-output-channel scales (N, 1); got {tuple(scale.shape)}")
    if zero is not None and bool((zero != 0).any()):
        raise ValueError("W8A8 weights must be symmetric (zero=None)")
    return W8A8Weight(w=q.contiguous(), scale=scale.reshape(N).to(torch.float32).contiguous())


# ----------------------------------------------------------------------------- references


def w8a8_gemm_q_ref(a_q, a_scale, w, w_scale, bias=None, out_dtype=torch.float16):
    """Reference on pre-quantized activations. a_q: (M, K) int8, a_scale: (M, 1) fp32,
    w: (N, K) int8, w_scale: (N,) fp32, bias: (N,) or None -> (M, N) out_dtype."""
    # float64 products of int8 values are exact (|acc| < 2^53); float32 on GPU (tolerance-level)
    ct = torch.float64 if a_q.device.type == "cpu" else torch.float32
    acc = (a_q.to(ct) @ w.to(ct).t()).to(torch.float32)
    out = acc * a_scale.reshape(-1, 1).float() * w_scale.reshape(1, -1).float()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def w8a8_gemm_ref(x, w, w_scale, bias=None):
    """Reference W8A8 linear. x: (M, K) fp16/bf16, w: (N, K) int8, w_scale: (N,) -> (M, N) x.dtype."""
    a_q, a_s = per_token_quant_ref(x)
    return w8a8_gemm_q_ref(a_q, a_s, w, w_scale, bias, x.dtype)


# ----------------------------------------------------------------------------- kernel


def _w8a8_kernel(
    a_ptr, w_ptr, as_ptr, ws_ptr, bias_ptr, c_ptr, part_ptr, lock_ptr,
    # a: (M, K) int8, or fp16/bf16 when FUSE_QUANT; w: (N, K) int8; as: (M,) fp32; ws: (N,) fp32
    # bias: (N,); c: (M, N) out dtype (int32 when OUT_INT32)
    # part: int32 split-K workspace (tiles * SPLIT_K * BLOCK_M * BLOCK_N); lock: int32 (tiles,), zero
    M, N, K,
    stride_am, stride_wn, stride_cm,
    HAS_BIAS: tl.constexpr,
    FUSE_QUANT: tl.constexpr,
    OUT_INT32: tl.constexpr,
    EVEN_K: tl.constexpr,
    EPS_C: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    pid_k = pid // num_tiles
    tile = pid % num_tiles
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile % num_pid_in_group) % group_size_m)
    pid_n = (tile % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m % M  # wrapped rows/cols: loads need no M/N masks, stores are masked
    rn = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + rn[None, :].to(tl.int64) * stride_wn + offs_k[:, None]

    if FUSE_QUANT:
        # prologue: per-row amax of this tile's rows (fp16/bf16 x), same math as act_quant
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                xa = tl.load(a_ptrs + k0)
            else:
                xa = tl.load(a_ptrs + k0, mask=(offs_k[None, :] + k0) < K, other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(xa.to(tl.float32)), axis=1))
        a_scale = tl.maximum(amax, EPS_C) / 127.0
        a_scale_b = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32) + a_scale[:, None]
    else:
        a_scale = tl.load(as_ptr + rm)

    n_blocks = tl.cdiv(K, BLOCK_K)
    blocks_per_split = tl.cdiv(n_blocks, SPLIT_K)
    k_lo = pid_k * blocks_per_split * BLOCK_K
    k_hi = tl.minimum(K, k_lo + blocks_per_split * BLOCK_K)
    a_ptrs += k_lo
    w_ptrs += k_lo
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(offs_k[None, :] + k0) < K, other=0)
            w = tl.load(w_ptrs, mask=(offs_k[:, None] + k0) < K, other=0)
        if FUSE_QUANT:
            y = tl.math.div_rn(a.to(tl.float32), a_scale_b)
            y = tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5))
            a = tl.minimum(tl.maximum(y, -127.0), 127.0).to(tl.int8)
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        if OUT_INT32:
            tl.store(c_ptrs, acc, mask=c_mask)
        else:
            w_scale = tl.load(ws_ptr + rn)
            out = acc.to(tl.float32) * a_scale[:, None] * w_scale[None, :]
            if HAS_BIAS:
                out += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
            tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=c_mask)
    else:
        # split-K in one launch: partial int32 tiles (exact); the split that arrives last sums
        # them, applies the epilogue and resets the tile's counter to 0.
        offs_t = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        p_tile = part_ptr + tile.to(tl.int64) * (SPLIT_K * BLOCK_M * BLOCK_N)
        tl.store(p_tile + pid_k * (BLOCK_M * BLOCK_N) + offs_t, acc)
        count = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
        if count == SPLIT_K - 1:
            tot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            for sk in tl.static_range(SPLIT_K):
                tot += tl.load(p_tile + sk * (BLOCK_M * BLOCK_N) + offs_t)
            tl.atomic_xchg(lock_ptr + tile, 0)
            if OUT_INT32:
                tl.store(c_ptrs, tot, mask=c_mask)
            else:
                w_scale = tl.load(ws_ptr + rn)
                out = tot.to(tl.float32) * a_scale[:, None] * w_scale[None, :]
                if HAS_BIAS:
                    out += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
                tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=c_mask)


w8a8_kernel = LazyKernel(_w8a8_kernel)


def _w8a8_gemv_kernel(
    x_ptr, w_ptr, ws_ptr, bias_ptr, c_ptr, part_ptr, lock_ptr,
    # x: (M, K) fp16/bf16, M <= BLOCK_M; w: the (N, K) int8 weight viewed as int32 words (N, K // 4);
    # ws: (N,) fp32; c: (M, N); part: fp32 split-K workspace; lock: int32 (tiles,), zero
    M, N, K,
    stride_xm, stride_wn, stride_cm,  # stride_wn in words
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0
    EPS_C: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """GEMV-style W8A8 for M <= BLOCK_M <= 8 with the per-token quantization fused.

    Each program re-reads its BLOCK_M activation rows for the row max (BLOCK_M * K * 2 bytes,
    from L2), quantizes its K slice exactly like ``act_quant`` and accumulates a_q * w in fp32:
    every product is an exact integer and each register partial stays < 2**24 for K <= 32768,
    so only the final cross-thread sum rounds (relative 6e-8)."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    tile = pid % num_pid_n
    pid_k = pid // num_pid_n
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = offs_n % N
    offs_m = tl.arange(0, BLOCK_M)
    rm = offs_m % M
    BC: tl.constexpr = BLOCK_K // 4
    offs_c = tl.arange(0, BC)
    offs_kk = tl.arange(0, BLOCK_K)
    x_row = x_ptr + rm[:, None].to(tl.int64) * stride_xm

    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            xa = tl.load(x_row + k0 + offs_kk[None, :])
        else:
            xa = tl.load(x_row + k0 + offs_kk[None, :], mask=(k0 + offs_kk[None, :]) < K, other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(xa.to(tl.float32)), axis=1))
    a_scale = tl.maximum(amax, EPS_C) / 127.0
    a_scale_b = tl.zeros([BLOCK_M, BC], dtype=tl.float32) + a_scale[:, None]

    n_it = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(n_it, SPLIT_K)
    i_lo = pid_k * per_split
    i_hi = tl.minimum(n_it, i_lo + per_split)
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + offs_c[None, :]  # (BLOCK_N, BC) words
    if BLOCK_M == 1:  # decode: 2-D tensors only (one layout, no conversions)
        acc3 = tl.zeros((BLOCK_N, BC), dtype=tl.float32)
    else:
        acc3 = tl.zeros((BLOCK_M, BLOCK_N, BC), dtype=tl.float32)
    for it in range(i_lo, i_hi):
        k0 = it * BLOCK_K
        if EVEN_K:
            wd = tl.load(w_ptrs + it * BC)
        else:
            wd = tl.load(w_ptrs + it * BC, mask=(it * BC + offs_c[None, :]) < (K // 4), other=0)
        wd = wd ^ -2139062144  # 0x80808080: each byte -> offset binary w + 128
        wh = wd >> 16
        for j in tl.static_range(4):
            FIELD = 0xFF << (8 * (j % 2))
            POW = 1 << (8 * (j % 2))
            if j < 2:
                b = ((wd & FIELD) | MAGIC).to(tl.float32, bitcast=True)
            else:
                b = ((wh & FIELD) | MAGIC).to(tl.float32, bitcast=True)
            b = b - (TWO23 + 128.0 * POW)  # = w * POW, exact
            if BLOCK_M == 1:
                if EVEN_K:
                    xj = tl.load(x_row + k0 + 4 * offs_c[None, :] + j)
                else:
                    xj = tl.load(x_row + k0 + 4 * offs_c[None, :] + j, mask=(k0 + 4 * offs_c[None, :] + j) < K,
                                 other=0.0)
            else:
                if EVEN_K:
                    xj = tl.load(x_row + k0 + 4 * offs_c[None, :] + j)
                else:
                    xj = tl.load(x_row + k0 + 4 * offs_c[None, :] + j, mask=(k0 + 4 * offs_c[None, :] + j) < K,
                                 other=0.0)
            y = tl.math.div_rn(xj.to(tl.float32), a_scale_b)
            y = tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5))
            y = tl.minimum(tl.maximum(y, -127.0), 127.0) * (1.0 / POW)
            if BLOCK_M == 1:
                acc3 += tl.sum(y, axis=0)[None, :] * b  # (1, BC) row -> broadcast over BLOCK_N
            else:
                acc3 += y[:, None, :] * b[None, :, :]
    if BLOCK_M == 1:
        acc = tl.sum(acc3, axis=1)[None, :]  # (1, BLOCK_N)
    else:
        acc = tl.sum(acc3, axis=2)  # (BLOCK_M, BLOCK_N)

    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K > 1:
        offs_t = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        p_tile = part_ptr + tile.to(tl.int64) * (SPLIT_K * BLOCK_M * BLOCK_N)
        tl.store(p_tile + pid_k * (BLOCK_M * BLOCK_N) + offs_t, acc)
        count = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
        if count == SPLIT_K - 1:
            acc = tl.zeros_like(acc)
            for sk in tl.static_range(SPLIT_K):
                acc += tl.load(p_tile + sk * (BLOCK_M * BLOCK_N) + offs_t)
            tl.atomic_xchg(lock_ptr + tile, 0)
        else:
            c_mask = c_mask & False  # not the last split: store nothing
    out = acc * a_scale[:, None] * tl.load(ws_ptr + rn)[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=c_mask)


w8a8_gemv_kernel = LazyKernel(_w8a8_gemv_kernel)


GEMV_MAX_M = 8


def _default_config(M: int, N: int, K: int) -> dict:
    """Heuristics; ``TUNED`` overrides.  BACKEND "gemv" (M <= 8, fused quant) or "mma"."""
    if M <= 4 and K % 4 == 0:
        bn = 64
        return dict(BACKEND="gemv", BLOCK_N=bn, BLOCK_K=128, SPLIT_K=splitk_for(cdiv(N, bn), cdiv(K, 128)),
                    num_warps=8, num_stages=2)
    if M <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=4, FUSE_QUANT=False,
                    SPLIT_K=splitk_for(cdiv(N, 64), cdiv(K, 256)))
    if M <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4, FUSE_QUANT=False)
    if M <= 256:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4, FUSE_QUANT=False)
    return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3, FUSE_QUANT=False)



# measured on an H200 by `benchmarks/gemm.py --tune` (2026-11-22, second pass); keys (gpu, M bucket, N, K)
TUNED: dict = {('H200', 1, 4096, 4096): {'BACKEND': 'gemv',
                           'BLOCK_K': 256,
                           'BLOCK_N': 64,
                           'SPLIT_K': 4,
                           'num_stages': 2,
                           'num_warps': 8},
 ('H200', 1, 4096, 14336): {'BACKEND': 'gemv',
                            'BLOCK_K': 256,
                            'BLOCK_N': 64,
                            'SPLIT_K': 4,
                            'num_stages': 2,
                            'num_warps': 8},
 ('H200', 1, 6144, 4096): {'BACKEND': 'gemv',
                           'BLOCK_K': 256,
                           'BLOCK_N': 64,
                           'SPLIT_K': 4,
                           'num_stages': 2,
                           'num_warps': 8},
 ('H200', 1, 28672, 4096): {'BACKEND': 'gemv',
                            'BLOCK_K': 256,
                            'BLOCK_N': 64,
                            'SPLIT_K': 4,
                            'num_stages': 2,
                            'num_warps': 8},
 ('H200', 16, 4096, 4096): {'BLOCK_K': 256,
                            'BLOCK_M': 16,
                            'BLOCK_N': 64,
                            'FUSE_QUANT': True,
                            'GROUP_M': 1,
                            'SPLIT_K': 2,
                            'num_stages': 4,
                            'num_warps': 4},
 ('H200', 16, 4096, 14336): {'BLOCK_K': 256,
                             'BLOCK_M': 16,
                             'BLOCK_N': 64,
                             'FUSE_QUANT': False,
                             'GROUP_M': 1,
                             'SPLIT_K': 4,
                             'num_stages': 4,
                             'num_warps': 4},
 ('H200', 16, 6144, 4096): {'BLOCK_K': 256,
                            'BLOCK_M': 16,
                            'BLOCK_N': 128,
                            'FUSE_QUANT': True,
                            'GROUP_M': 1,
                            'SPLIT_K': 2,
                            'num_stages': 4,
                            'num_warps': 4},
 ('H200', 16, 28672, 4096): {'BLOCK_K': 128,
                             'BLOCK_M': 16,
                             'BLOCK_N': 64,
                             'FUSE_QUANT': False,
                             'GROUP_M': 1,
                             'SPLIT_K': 8,
                             'num_stages': 4,
                             'num_warps': 4},
 ('H200', 64, 4096, 4096): {'BLOCK_K': 128,
                            'BLOCK_M': 64,
                            'BLOCK_N': 64,
                            'GROUP_M': 1,
                            'num_stages': 4,
                            'num_warps': 4},
 ('H200', 64, 4096, 14336): {'BLOCK_K': 128,
                             'BLOCK_M': 64,
                             'BLOCK_N': 64,
                             'GROUP_M': 1,
                             'num_stages': 4,
                             'num_warps': 4},
 ('H200', 64, 6144, 4096): {'BLOCK_K': 128,
                            'BLOCK_M': 64,
                            'BLOCK_N': 64,
                            'GROUP_M': 1,
                            'num_stages': 4,
                            'num_warps': 4},
 ('H200', 64, 28672, 4096): {'BLOCK_K': 128,
                             'BLOCK_M': 64,
                             'BLOCK_N': 64,
                             'GROUP_M': 1,
                             'SPLIT_K': 4,
                             'num_stages': 4,
                             'num_warps': 4},
 ('H200', 256, 4096, 4096): {'BLOCK_K': 128,
                             'BLOCK_M': 64,
                             'BLOCK_N': 128,
                             'GROUP_M': 8,
                             'SPLIT_K': 2,
                             'num_stages': 4,
                             'num_warps': 4},
 ('H200', 256, 4096, 14336): {'BLOCK_K': 128,
                              'BLOCK_M': 128,
                              'BLOCK_N': 128,
                              'GROUP_M': 8,
                              'SPLIT_K': 2,
                              'num_stages': 3,
                              'num_warps': 8},
 ('H200', 256, 6144, 4096): {'BLOCK_K': 128,
                             'BLOCK_M': 128,
                             'BLOCK_N': 128,
                             'GROUP_M': 8,
                             'SPLIT_K': 2,
                             'num_stages': 3,
                             'num_warps': 8},
 ('H200', 256, 28672, 4096): {'BLOCK_K': 128,
                              'BLOCK_M': 128,
                              'BLOCK_N': 128,
                              'GROUP_M': 8,
                              'num_stages': 3,
                              'num_warps': 8},
 ('H200', 2048, 4096, 4096): {'BLOCK_K': 128,
                              'BLOCK_M': 256,
                              'BLOCK_N': 128,
                              'GROUP_M': 8,
                              'num_stages': 3,
                              'num_warps': 8},
 ('H200', 2048, 4096, 14336): {'BLOCK_K': 128,
                               'BLOCK_M': 256,
                               'BLOCK_N': 128,
                               'GROUP_M': 8,
                               'num_stages': 3,
                               'num_warps': 8},
 ('H200', 2048, 6144, 4096): {'BLOCK_K': 128,
                              'BLOCK_M': 256,
                              'BLOCK_N': 128,
                              'GROUP_M': 8,
                              'num_stages': 3,
                              'num_warps': 8},
 ('H200', 2048, 28672, 4096): {'BLOCK_K': 128,
                               'BLOCK_M': 256,
                               'BLOCK_N': 128,
                               'GROUP_M': 8,
                               'num_stages': 3,
                               'num_warps': 8},
 ('H200', 8192, 4096, 4096): {'BLOCK_K': 128,
                              'BLOCK_M': 256,
                              'BLOCK_N': 128,
                              'GROUP_M': 8,
                              'num_stages': 3,
                              'num_warps': 8},
 ('H200', 8192, 4096, 14336): {'BLOCK_K': 128,
                               'BLOCK_M': 256,
                               'BLOCK_N': 128,
                               'GROUP_M': 8,
                               'num_stages': 3,
                               'num_warps': 8},
 ('H200', 8192, 6144, 4096): {'BLOCK_K': 128,
                              'BLOCK_M': 256,
                              'BLOCK_N': 128,
                              'GROUP_M': 8,
                              'num_stages': 3,
                              'num_warps': 8},
 ('H200', 8192, 28672, 4096): {'BLOCK_K': 128,
                               'BLOCK_M': 256,
                               'BLOCK_N': 128,
                               'GROUP_M': 8,
                               'num_stages': 3,
                               'num_warps': 8}}
CONFIGS = ConfigCache(_default_config, TUNED)

_INTERP_CFG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)


def _launch(a, a_scale, w, w_scale, bias, out, fuse_quant, out_int32, cfg):
    M, K = a.shape
    N = w.shape[0]
    tiles = cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"])
    split_k = int(cfg.get("SPLIT_K", 1))
    part, lock = splitk_buffers(a.device, tiles, split_k, cfg["BLOCK_M"] * cfg["BLOCK_N"], 0)
    w8a8_kernel[(tiles * split_k,)](
        a, w, a_scale if a_scale is not None else w_scale, w_scale,
        bias if bias is not None else w_scale, out, part, lock,
        M, N, K, a.stride(0), w.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, FUSE_QUANT=fuse_quant, OUT_INT32=out_int32,
        EVEN_K=(K % cfg["BLOCK_K"] == 0), EPS_C=EPS, SPLIT_K=split_k,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def _mma_only(cfg, x, M, N, K):
    """The tensor-core config to use where the GEMV path does not apply."""
    if cfg.get("BACKEND") != "gemv":
        return cfg
    return dict(_INTERP_CFG if not x.is_cuda else _default_config(max(M, 5), N, K), FUSE_QUANT=M <= 16)


def _launch_gemv(x, w, w_scale, bias, out, cfg):
    M, K = x.shape
    N = w.shape[0]
    bm = max(1, 1 << (M - 1).bit_length())
    tiles = cdiv(N, cfg["BLOCK_N"])
    split_k = int(cfg.get("SPLIT_K", 1))
    part, lock = splitk_buffers(x.device, tiles, split_k, bm * cfg["BLOCK_N"], 4)
    wv = w.view(torch.int32)  # (N, K // 4): 4 int8 per word
    w8a8_gemv_kernel[(tiles * split_k,)](
        x, wv, w_scale, bias if bias is not None else w_scale, out, part, lock,
        M, N, K, x.stride(0), wv.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, EVEN_K=(K % cfg["BLOCK_K"] == 0), EPS_C=EPS, SPLIT_K=split_k,
        BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def _pick(x, M, N, K, config):
    if config is not None:
        return dict(config)
    if not x.is_cuda:
        if M <= 4 and K % 4 == 0 and x.is_floating_point():
            return dict(BACKEND="gemv", BLOCK_N=32, BLOCK_K=32, SPLIT_K=2 if K > 32 else 1, num_warps=4, num_stages=1)
        return dict(_INTERP_CFG, FUSE_QUANT=M <= 16)
    key = (x.device.index, M, N, K)
    cfg = _CFG_CACHE.get(key)
    if cfg is None:
        cfg = _CFG_CACHE[key] = CONFIGS.get(M, N, K, gpu_key(x))
    return cfg


_CFG_CACHE: dict = {}


def w8a8_linear_triton(x, w, w_scale, bias=None, config: Optional[dict] = None, out=None):
    """Triton W8A8 linear incl. activation quantization. x: (M, K) -> (M, N) x.dtype
    (written into ``out`` when given)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    M, K = x.shape
    N = w.shape[0]
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    cfg = _pick(x, M, N, K, config)
    if cfg.get("BACKEND") == "gemv" and M <= GEMV_MAX_M and K % 4 == 0:
        return _launch_gemv(x, w, w_scale, bias, out, cfg)
    cfg = _mma_only(cfg, x, M, N, K)
    if cfg.get("FUSE_QUANT", False):
        return _launch(x, None, w, w_scale, bias, out, True, False, cfg)
    a_q, a_s = per_token_quant(x)
    return _launch(a_q, a_s, w, w_scale, bias, out, False, False, cfg)


def w8a8_gemm_q_triton(a_q, a_scale, w, w_scale, bias=None, out_dtype=torch.float16, config=None, out=None):
    """Triton GEMM on pre-quantized activations. a_q: (M, K) int8, a_scale: (M, 1) -> (M, N)."""
    a_q = a_q.contiguous()
    M, K = a_q.shape
    N = w.shape[0]
    if out is None:
        out = torch.empty((M, N), dtype=out_dtype, device=a_q.device)
    if M == 0:
        return out
    cfg = _mma_only(_pick(a_q, M, N, K, config), a_q, M, N, K)
    return _launch(a_q, a_scale.reshape(-1).float().contiguous(), w, w_scale, bias, out, False, False, cfg)


def w8a8_int32_accumulate(a_q, w, config: Optional[dict] = None, out=None):
    """Raw int32 accumulator (testing/debug): a_q (M, K) int8, w (N, K) int8 -> (M, N) int32.
    Reference: ``a_q.long() @ w.long().T``."""
    a_q = a_q.contiguous()
    M, K = a_q.shape
    N = w.shape[0]
    if out is None:
        out = torch.empty((M, N), dtype=torch.int32, device=a_q.device)
    dummy = torch.empty(1, dtype=torch.float32, device=a_q.device)
    cfg = _mma_only(_pick(a_q, M, N, K, config), a_q, M, N, K)
    return _launch(a_q, dummy, w, dummy, None, out, False, True, cfg)


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("quantkit::w8a8_linear", mutates_args=())
def _w8a8_linear_op(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if use_triton(x, w):
        return w8a8_linear_triton(x, w, w_scale, bias)
    return w8a8_gemm_ref(x, w, w_scale, bias)


@_w8a8_linear_op.register_fake
def _(x, w, w_scale, bias):
    return x.new_empty((x.shape[0], w.shape[0]))


@torch.library.custom_op("quantkit::w8a8_gemm_q", mutates_args=())
def _w8a8_gemm_q_op(
    a_q: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
    bias: Optional[torch.Tensor], out_dtype: torch.dtype,
) -> torch.Tensor:
    if use_triton(a_q, w):
        return w8a8_gemm_q_triton(a_q, a_scale, w, w_scale, bias, out_dtype)
    return w8a8_gemm_q_ref(a_q, a_scale, w, w_scale, bias, out_dtype)


@_w8a8_gemm_q_op.register_fake
def _(a_q, a_scale, w, w_scale, bias, out_dtype):
    return a_q.new_empty((a_q.shape[0], w.shape[0]), dtype=out_dtype)


def w8a8_linear(x: torch.Tensor, weight: W8A8Weight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W8A8 linear (quantizes x per token). x: (..., K) fp16/bf16 -> (..., N) x.dtype."""
    lead = x.shape[:-1]
    out = _w8a8_linear_op(x.reshape(-1, x.shape[-1]), weight.w, weight.scale, bias)
    return out.reshape(*lead, weight.N)


def w8a8_gemm_q(a_q, a_scale, weight: W8A8Weight, bias=None, out_dtype=torch.float16):
    """W8A8 GEMM on pre-quantized activations. a_q: (M, K) int8, a_scale: (M, 1) -> (M, N)."""
    return _w8a8_gemm_q_op(a_q, a_scale, weight.w, weight.scale, bias, out_dtype)
