"""W4A16 / W8A16 GEMM with group-wise scales (and zeros), dequantized in the inner loop.

Spec (``wna16_gemm_ref``), x: (M, K) fp16/bf16, canonical weight q: (N, K) int8 holding
bits-bit signed ints, scale: (N, G) and zero: (N, G) int8 or None, G = K // group_size:

    W[n, k]  = (q[n, k] - zero[n, k // gs]) * scale[n, k // gs]
    out      = (x.float() @ W.float().T + bias).to(x.dtype)

Packed layout (``prepack_wna16``, done once at load; the checkpoint keeps the canonical form):

* K is padded to a multiple of 128 (``K_pad``); the kernel walks K in 128-row blocks, each
  split into 8 chunks of 16 rows (one ``tl.dot`` of K=16 per chunk).
* 4-bit: ``qw`` is int32 (K_pad // 8, N), N contiguous (coalesced along N).  Word
  ``[b*16 + i, n]`` holds, in nibble j (bits 4j..4j+3), ``q[n, b*128 + j*16 + i] + 8``
  (offset binary 0..15).  So unpacking nibble j of one (16, BLOCK_N) word tile gives exactly
  chunk j -- no interleave/reshape in the kernel.
* 8-bit: ``qw`` is int8 (K_pad, N), i.e. the transposed weight.
* ``scales``: (G, N) in ``scale_dtype`` (fp16 by default).  ``zeros`` (G, N) int8 holds
  ``zero + 8`` for 4-bit (so ``q = nibble - zeros``) and ``zero`` for 8-bit; None when symmetric.

Scale application: the dequantized integers ``q - zero`` are exact in fp16/bf16, the chunks of
one group are accumulated by the tensor cores, and the group's scale is applied to the
(BLOCK_M, BLOCK_N) partial sum ("scale on accumulator"), i.e. once per group per output
instead of once per weight element.  Supported group sizes: multiples of 16 that divide 128
(16, 32, 64, 128), multiples of 128, or per-channel (G == 1, any K).

Dispatch: Triton fused kernel for small/medium M; for large M the config cache may pick
``BACKEND="dequant"``: one Triton dequantization kernel to fp16 + cuBLAS (``torch.mm``).
"""

from dataclasses import dataclass
from typing import Optional

import torch

from ._common import ConfigCache, LazyKernel, cdiv, gpu_key, splitk_buffers, tl, use_triton

__all__ = [
    "WNA16Weight",
    "prepack_wna16",
    "wna16_linear",
    "wna16_gemm_ref",
    "wna16_dequant",
    "CONFIGS",
]

PACK_K = 128


@dataclass
class WNA16Weight:
    """Packed weight for the W4A16 / W8A16 kernel (see module docstring for the layout).

    qw: (K_pad // 8, N) int32 (bits=4) or (K_pad, N) int8 (bits=8); scales: (G, N);
    zeros: (G, N) int8 or None.
    """

    qw: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    bits: int
    group_size: int
    N: int
    K: int

    @property
    def K_pad(self) -> int:
        return cdiv(self.K, PACK_K) * PACK_K

    @property
    def n_groups(self) -> int:
        return self.scales.shape[0]


def check_group_size(group_size: int, K: int) -> bool:
    if group_size == K:
        return True
    return group_size % 16 == 0 and (PACK_K % group_size == 0 or group_size % PACK_K == 0)


def prepack_wna16(
    q: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], bits: int,
    scale_dtype: torch.dtype = torch.float16,
) -> WNA16Weight:
    """Canonical (q (N, K) int8, scale (N, G), zero (N, G) int8 | None) -> :class:`WNA16Weight`."""
    if bits not in (4, 8):
        raise ValueError("bits must be 4 or 8")
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError("q must be a 2-D int8 tensor (N, K)")
    N, K = q.shape
    scale = scale.reshape(N, -1)
    G = scale.shape[1]
    if K % G:
        raise ValueError(f"group count {G} does not divide K={K}")
    gs = K // G
    if not check_group_size(gs, K):
        raise ValueError(f"unsupported group size {gs} (need 16|32|64|128|multiple of 128|per-channel)")
    K_pad = cdiv(K, PACK_K) * PACK_K
    dev = q.device
    qi = torch.zeros((N, K_pad), dtype=torch.int32, device=dev)
    qi[:, :K] = q.to(torch.int32)
    if bits == 4:
        u = (qi + 8).to(torch.int64)  # 0..15
        u = u.reshape(N, K_pad // PACK_K, 8, 16)  # [n, b, j, i] = k = b*128 + j*16 + i
        shifts = (torch.arange(8, device=dev, dtype=torch.int64) * 4).reshape(1, 1, 8, 1)
        words = (u << shifts).sum(dim=2)  # (N, nb, 16), < 2^32
        words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
        qw = words.reshape(N, K_pad // 8).t().contiguous()  # (K_pad // 8, N)
    else:
        qw = qi.to(torch.int8).t().contiguous()  # (K_pad, N)
    scales = scale.t().to(scale_dtype).contiguous()  # (G, N)
    zeros = None
    if zero is not None:
        z = zero.reshape(N, G).to(torch.int32) + (8 if bits == 4 else 0)
        zeros = z.t().to(torch.int8).contiguous()
    return WNA16Weight(qw=qw, scales=scales, zeros=zeros, bits=bits, group_size=gs, N=N, K=K)


# ----------------------------------------------------------------------------- references


def dequant_ref(q, scale, zero):
    """Canonical -> dense fp32 weight (N, K)."""
    N, K = q.shape
    G = scale.reshape(N, -1).shape[1]
    gs = K // G
    s = scale.reshape(N, G).float().repeat_interleave(gs, dim=1)
    qf = q.float()
    if zero is not None:
        qf = qf - zero.reshape(N, G).float().repeat_interleave(gs, dim=1)
    return qf * s


def wna16_gemm_ref(x, q, scale, zero=None, bias=None):
    """Reference. x: (M, K), q: (N, K) int8, scale: (N, G), zero: (N, G) | None -> (M, N) x.dtype."""
    ct = torch.float64 if x.device.type == "cpu" else torch.float32
    out = x.to(ct) @ dequant_ref(q, scale, zero).to(ct).t()
    if bias is not None:
        out = out + bias.to(ct)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------- kernels


def _wna16_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, c_ptr, ws_ptr, lock_ptr,
    # x: (M, K) fp16/bf16; w: packed (see docstring); s: (G, N); z: (G, N) int8; c: (M, N)
    # ws: fp32 split-K workspace (tiles * SPLIT_K * BLOCK_M * BLOCK_N); lock: int32 (tiles,), zero
    M, N, K, n_groups, group_size,
    stride_xm, stride_cm,
    BITS: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GROUP_CHUNKS: tl.constexpr,  # 16-row chunks per scale application: min(group, 128) // 16
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no K masks
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # multiple of 128
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
    rm = offs_m % M
    nmask = offs_n < N  # masks (not modulo) keep the N-contiguous loads vectorizable
    nmask2 = nmask[None, :]
    offs_i = tl.arange(0, 16)
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + offs_i[None, :]
    dt = x_ptr.dtype.element_ty

    n_blocks = tl.cdiv(K, BLOCK_K)
    blocks_per_split = tl.cdiv(n_blocks, SPLIT_K)
    k_lo = pid_k * blocks_per_split * BLOCK_K
    k_hi = tl.minimum(K, k_lo + blocks_per_split * BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(k_lo, k_hi, BLOCK_K):
        for sb in tl.static_range(BLOCK_K // 128):
            k0 = kb + sb * 128
            if BITS == 4:
                wp_ptrs = w_ptr + ((k0 // 8) + offs_i)[:, None].to(tl.int64) * N + offs_n[None, :]
                if EVEN_K:
                    wp = tl.load(wp_ptrs, mask=nmask2, other=0)
                else:
                    wp = tl.load(wp_ptrs, mask=nmask2 & ((k0 + offs_i[:, None] * 0) < K), other=0)
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(8):
                kk = k0 + j * 16
                if j % GROUP_CHUNKS == 0:
                    g = tl.minimum(kk // group_size, n_groups - 1)
                    if HAS_ZERO:
                        zp = tl.load(z_ptr + g * N + offs_n, mask=nmask, other=0).to(tl.int32)
                if EVEN_K:
                    xt = tl.load(x_ptrs + kk)
                else:
                    xt = tl.load(x_ptrs + kk, mask=(kk + offs_i[None, :]) < K, other=0.0)
                if BITS == 4:
                    v = (wp >> (4 * j)) & 0xF
                    if HAS_ZERO:
                        v = v - zp[None, :]
                    else:
                        v = v - 8
                else:
                    v_ptrs = w_ptr + (kk + offs_i)[:, None].to(tl.int64) * N + offs_n[None, :]
                    if EVEN_K:
                        v = tl.load(v_ptrs, mask=nmask2, other=0)
                    else:
                        v = tl.load(v_ptrs, mask=nmask2 & ((kk + offs_i[:, None]) < K), other=0)
                    if HAS_ZERO:
                        v = v.to(tl.int32) - zp[None, :]
                part = tl.dot(xt, v.to(tl.float32).to(dt), part)
                if (j + 1) % GROUP_CHUNKS == 0:
                    s = tl.load(s_ptr + g * N + offs_n, mask=nmask, other=0).to(tl.float32)
                    acc += part * s[None, :]
                    part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    c_mask = (offs_m[:, None] < M) & nmask2
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=nmask, other=0).to(tl.float32)[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)
    else:
        # split-K in one launch: every split writes its partial tile, bumps the tile's counter;
        # the split that arrives last sums the partials, writes C and resets the counter to 0.
        offs_t = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        ws_tile = ws_ptr + tile.to(tl.int64) * (SPLIT_K * BLOCK_M * BLOCK_N)
        tl.store(ws_tile + pid_k * (BLOCK_M * BLOCK_N) + offs_t, acc)
        count = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
        if count == SPLIT_K - 1:
            tot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for sk in tl.static_range(SPLIT_K):
                tot += tl.load(ws_tile + sk * (BLOCK_M * BLOCK_N) + offs_t)
            if HAS_BIAS:
                tot += tl.load(bias_ptr + offs_n, mask=nmask, other=0).to(tl.float32)[None, :]
            tl.store(c_ptrs, tot.to(c_ptr.dtype.element_ty), mask=c_mask)
            tl.atomic_xchg(lock_ptr + tile, 0)


wna16_kernel = LazyKernel(_wna16_kernel)


def _wna16_dequant_kernel(
    w_ptr, s_ptr, z_ptr, o_ptr,  # o: (K_pad, N) out dtype (W transposed, dequantized)
    N, K, n_groups, group_size,
    BITS: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_k = tl.program_id(0)  # one 128-row block
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_i = tl.arange(0, 16)
    k0 = pid_k * 128
    if BITS == 4:
        wp = tl.load(w_ptr + ((k0 // 8) + offs_i)[:, None].to(tl.int64) * N + offs_n[None, :],
                     mask=nmask[None, :], other=0)
    for j in tl.static_range(8):
        kk = k0 + j * 16
        g = tl.minimum(kk // group_size, n_groups - 1)
        if BITS == 4:
            v = (wp >> (4 * j)) & 0xF
            if HAS_ZERO:
                v = v - tl.load(z_ptr + g * N + offs_n, mask=nmask, other=0).to(tl.int32)[None, :]
            else:
                v = v - 8
        else:
            v = tl.load(w_ptr + (kk + offs_i)[:, None].to(tl.int64) * N + offs_n[None, :],
                        mask=nmask[None, :], other=0).to(tl.int32)
            if HAS_ZERO:
                v = v - tl.load(z_ptr + g * N + offs_n, mask=nmask, other=0).to(tl.int32)[None, :]
        s = tl.load(s_ptr + g * N + offs_n, mask=nmask, other=0).to(tl.float32)
        o = v.to(tl.float32) * s[None, :]
        tl.store(o_ptr + (kk + offs_i)[:, None].to(tl.int64) * N + offs_n[None, :],
                 o.to(o_ptr.dtype.element_ty), mask=nmask[None, :])


wna16_dequant_kernel = LazyKernel(_wna16_dequant_kernel)


def _default_config(M: int, N: int, K: int) -> dict:
    if M <= 16:
        return dict(BACKEND="triton", BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    if M <= 64:
        return dict(BACKEND="triton", BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    if M <= 256:
        return dict(BACKEND="triton", BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BACKEND="dequant")


# measured on an H200 by `benchmarks/gemm.py --tune` (2026-11-22); keys (gpu, M bucket, N, K)
TUNED_W4: dict = {('H200', 1, 4096, 4096): {'BACKEND': 'triton',
                           'BLOCK_K': 128,
                           'BLOCK_M': 16,
                           'BLOCK_N': 64,
                           'GROUP_M': 1,
                           'SPLIT_K': 8,
                           'num_stages': 4,
                           'num_warps': 4},
 ('H200', 1, 4096, 14336): {'BACKEND': 'triton',
                            'BLOCK_K': 128,
                            'BLOCK_M': 16,
                            'BLOCK_N': 64,
                            'GROUP_M': 1,
                            'SPLIT_K': 8,
                            'num_stages': 4,
                            'num_warps': 4},
 ('H200', 1, 6144, 4096): {'BACKEND': 'triton',
                           'BLOCK_K': 128,
                           'BLOCK_M': 16,
                           'BLOCK_N': 64,
                           'GROUP_M': 1,
                           'SPLIT_K': 4,
                           'num_stages': 4,
                           'num_warps': 4},
 ('H200', 1, 28672, 4096): {'BACKEND': 'triton',
                            'BLOCK_K': 128,
                            'BLOCK_M': 16,
                            'BLOCK_N': 64,
                            'GROUP_M': 1,
                            'SPLIT_K': 8,
                            'num_stages': 4,
                            'num_warps': 4},
 ('H200', 16, 4096, 4096): {'BACKEND': 'triton',
                            'BLOCK_K': 128,
                            'BLOCK_M': 16,
                            'BLOCK_N': 64,
                            'GROUP_M': 1,
                            'SPLIT_K': 8,
                            'num_stages': 4,
                            'num_warps': 4},
 ('H200', 16, 4096, 14336): {'BACKEND': 'triton',
                             'BLOCK_K': 128,
                             'BLOCK_M': 16,
                             'BLOCK_N': 64,
                             'GROUP_M': 1,
                             'SPLIT_K': 8,
                             'num_stages': 4,
                             'num_warps': 4},
 ('H200', 16, 6144, 4096): {'BACKEND': 'triton',
                            'BLOCK_K': 128,
                            'BLOCK_M': 16,
                            'BLOCK_N': 64,
                            'GROUP_M': 1,
                            'SPLIT_K': 8,
                            'num_stages': 4,
                            'num_warps': 4},
 ('H200', 16, 28672, 4096): {'BACKEND': 'triton',
                             'BLOCK_K': 128,
                             'BLOCK_M': 16,
                             'BLOCK_N': 64,
                             'GROUP_M': 1,
                             'SPLIT_K': 4,
                             'num_stages': 4,
                             'num_warps': 4},
 ('H200', 64, 4096, 4096): {'BACKEND': 'triton',
                            'BLOCK_K': 128,
                            'BLOCK_M': 32,
                            'BLOCK_N': 128,
                            'GROUP_M': 1,
                            'SPLIT_K': 4,
                            'num_stages': 3,
                            'num_warps': 4},
 ('H200', 64, 4096, 14336): {'BACKEND': 'triton',
                             'BLOCK_K': 128,
                             'BLOCK_M': 32,
                             'BLOCK_N': 64,
                             'GROUP_M': 1,
                             'SPLIT_K': 8,
                             'num_stages': 4,
                             'num_warps': 4},
 ('H200', 64, 6144, 4096): {'BACKEND': 'triton',
                            'BLOCK_K': 128,
                            'BLOCK_M': 32,
                            'BLOCK_N': 128,
                            'GROUP_M': 1,
                            'SPLIT_K': 4,
                            'num_stages': 3,
                            'num_warps': 4},
 ('H200', 64, 28672, 4096): {'BACKEND': 'triton',
                             'BLOCK_K': 128,
                             'BLOCK_M': 64,
                             'BLOCK_N': 128,
                             'GROUP_M': 1,
                             'SPLIT_K': 2,
                             'num_stages': 3,
                             'num_warps': 4},
 ('H200', 256, 4096, 4096): {'BACKEND': 'triton',
                             'BLOCK_K': 128,
                             'BLOCK_M': 128,
                             'BLOCK_N': 128,
                             'GROUP_M': 8,
                             'SPLIT_K': 2,
                             'num_stages': 3,
                             'num_warps': 8},
 ('H200', 256, 4096, 14336): {'BACKEND': 'dequant'},
 ('H200', 256, 6144, 4096): {'BACKEND': 'dequant'},
 ('H200', 256, 28672, 4096): {'BACKEND': 'dequant'},
 ('H200', 2048, 4096, 4096): {'BACKEND': 'dequant'},
 ('H200', 2048, 4096, 14336): {'BACKEND': 'dequant'},
 ('H200', 2048, 6144, 4096): {'BACKEND': 'dequant'},
 ('H200', 2048, 28672, 4096): {'BACKEND': 'dequant'},
 ('H200', 8192, 4096, 4096): {'BACKEND': 'dequant'},
 ('H200', 8192, 4096, 14336): {'BACKEND': 'dequant'},
 ('H200', 8192, 6144, 4096): {'BACKEND': 'dequant'},
 ('H200', 8192, 28672, 4096): {'BACKEND': 'dequant'}}
TUNED_W8: dict = {('H200', 1, 4096, 4096): {'BACKEND': 'triton',
                           'BLOCK_K': 128,
                           'BLOCK_M': 16,
                           'BLOCK_N': 64,
                           'GROUP_M': 1,
                           'SPLIT_K': 4,
                           'num_stages': 4,
                           'num_warps': 4},
 ('H200', 1, 4096, 14336): {'BACKEND': 'triton',
                            'BLOCK_K': 128,
                            'BLOCK_M': 16,
                            'BLOCK_N': 64,
                            'GROUP_M': 1,
                            'SPLIT_K': 8,
                            'num_stages': 4,
                            'num_warps': 4},
 ('H200', 1, 6144, 4096): {'BACKEND': 'triton',
                           'BLOCK_K': 256,
                           'BLOCK_M': 16,
                           'BLOCK_N': 64,
                           'GROUP_M': 1,
                           'SPLIT_K': 1,
                           'num_stages': 4,
                           'num_warps': 4},
 ('H200', 1, 28672, 4096): {'BACKEND': 'triton',
                            'BLOCK_K': 128,
                            'BLOCK_M': 16,
                            'BLOCK_N': 64,
                            'GROUP_M': 1,
                            'SPLIT_K': 4,
                            'num_stages': 4,
                            'num_warps': 4},
 ('H200', 16, 4096, 4096): {'BACKEND': 'triton',
                            'BLOCK_K': 128,
                            'BLOCK_M': 16,
                            'BLOCK_N': 64,
                            'GROUP_M': 1,
                            'SPLIT_K': 4,
                            'num_stages': 4,
                            'num_warps': 4},
 ('H200', 16, 4096, 14336): {'BACKEND': 'triton',
                             'BLOCK_K': 128,
                             'BLOCK_M': 16,
                             'BLOCK_N': 64,
                             'GROUP_M': 1,
                             'SPLIT_K': 4,
                             'num_stages': 4,
                             'num_warps': 4},
 ('H200', 16, 6144, 4096): {'BACKEND': 'triton',
                            'BLOCK_K': 128,
                            'BLOCK_M': 16,
                            'BLOCK_N': 64,
                            'GROUP_M': 1,
                            'SPLIT_K': 8,
                            'num_stages': 4,
                            'num_warps': 4},
 ('H200', 16, 28672, 4096): {'BACKEND': 'triton',
                             'BLOCK_K': 128,
                             'BLOCK_M': 16,
                             'BLOCK_N': 64,
                             'GROUP_M': 1,
                             'SPLIT_K': 4,
                             'num_stages': 4,
                             'num_warps': 4},
 ('H200', 64, 4096, 4096): {'BACKEND': 'triton',
                            'BLOCK_K': 128,
                            'BLOCK_M': 32,
                            'BLOCK_N': 128,
                            'GROUP_M': 1,
                            'SPLIT_K': 4,
                            'num_stages': 3,
                            'num_warps': 4},
 ('H200', 64, 4096, 14336): {'BACKEND': 'triton',
                             'BLOCK_K': 128,
                             'BLOCK_M': 32,
                             'BLOCK_N': 128,
                             'GROUP_M': 1,
                             'SPLIT_K': 4,
                             'num_stages': 3,
                             'num_warps': 4},
 ('H200', 64, 6144, 4096): {'BACKEND': 'dequant'},
 ('H200', 64, 28672, 4096): {'BACKEND': 'triton',
                             'BLOCK_K': 128,
                             'BLOCK_M': 64,
                             'BLOCK_N': 128,
                             'GROUP_M': 1,
                             'SPLIT_K': 2,
                             'num_stages': 3,
                             'num_warps': 4},
 ('H200', 256, 4096, 4096): {'BACKEND': 'triton',
                             'BLOCK_K': 128,
                             'BLOCK_M': 128,
                             'BLOCK_N': 128,
                             'GROUP_M': 8,
                             'SPLIT_K': 2,
                             'num_stages': 3,
                             'num_warps': 8},
 ('H200', 256, 4096, 14336): {'BACKEND': 'dequant'},
 ('H200', 256, 6144, 4096): {'BACKEND': 'dequant'},
 ('H200', 256, 28672, 4096): {'BACKEND': 'dequant'},
 ('H200', 2048, 4096, 4096): {'BACKEND': 'dequant'},
 ('H200', 2048, 4096, 14336): {'BACKEND': 'dequant'},
 ('H200', 2048, 6144, 4096): {'BACKEND': 'dequant'},
 ('H200', 2048, 28672, 4096): {'BACKEND': 'dequant'},
 ('H200', 8192, 4096, 4096): {'BACKEND': 'dequant'},
 ('H200', 8192, 4096, 14336): {'BACKEND': 'dequant'},
 ('H200', 8192, 6144, 4096): {'BACKEND': 'dequant'},
 ('H200', 8192, 28672, 4096): {'BACKEND': 'dequant'}}
CONFIGS = ConfigCache(_default_config, TUNED_W4)  # 4-bit
CONFIGS_W8 = ConfigCache(_default_config, TUNED_W8)  # 8-bit
_INTERP_CFG = dict(BACKEND="triton", BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=2, num_warps=4, num_stages=1)


def wna16_dequant(qw, scales, zeros, bits, group_size, N, K, out_dtype=torch.float16) -> torch.Tensor:
    """Triton dequantization of the packed weight -> W^T: (K, N) out_dtype (a view of (K_pad, N))."""
    K_pad = cdiv(K, PACK_K) * PACK_K
    o = torch.empty((K_pad, N), dtype=out_dtype, device=qw.device)
    BN = 128
    wna16_dequant_kernel[(K_pad // PACK_K, cdiv(N, BN))](
        qw, scales, zeros if zeros is not None else scales, o, N, K, scales.shape[0], group_size,
        BITS=bits, HAS_ZERO=zeros is not None, BLOCK_N=BN, num_warps=4,
    )
    return o[:K]


def wna16_linear_triton(x, qw, scales, zeros, bias, bits, group_size, N, K, config: Optional[dict] = None, out=None):
    """x: (M, K) fp16/bf16 -> (M, N) x.dtype (written into ``out`` when given)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    M = x.shape[0]
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    if config is not None:
        cfg = dict(config)
    elif not x.is_cuda:
        cfg = dict(_INTERP_CFG)
    else:
        cfg = (CONFIGS if bits == 4 else CONFIGS_W8).get(M, N, K, gpu_key(x))
    if cfg.get("BACKEND", "triton") == "dequant":
        wt = wna16_dequant(qw, scales, zeros, bits, group_size, N, K, x.dtype)
        if bias is not None:
            return torch.addmm(bias.to(x.dtype), x, wt, out=out)
        return torch.mm(x, wt, out=out)
    n_groups = scales.shape[0]
    tiles = cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"])
    split_k = int(cfg.get("SPLIT_K", 1))
    ws, lock = splitk_buffers(x.device, tiles, split_k, cfg["BLOCK_M"] * cfg["BLOCK_N"], 4)
    wna16_kernel[(tiles * split_k,)](
        x, qw, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, out,
        ws, lock,
        M, N, K, n_groups, group_size, x.stride(0), out.stride(0),
        BITS=bits, HAS_ZERO=zeros is not None, HAS_BIAS=bias is not None,
        GROUP_CHUNKS=min(group_size if n_groups > 1 else PACK_K, PACK_K) // 16,
        EVEN_K=(K % cfg["BLOCK_K"] == 0), SPLIT_K=split_k,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def _unpack_ref(qw, scales, zeros, bits, group_size, N, K):
    """Packed -> canonical (q, scale, zero) in torch (used by the CPU fallback)."""
    K_pad = cdiv(K, PACK_K) * PACK_K
    if bits == 4:
        words = qw.t().to(torch.int64) & 0xFFFFFFFF  # (N, K_pad // 8)
        words = words.reshape(N, K_pad // PACK_K, 1, 16)
        shifts = (torch.arange(8, device=qw.device, dtype=torch.int64) * 4).reshape(1, 1, 8, 1)
        u = (words >> shifts) & 0xF  # (N, nb, 8, 16)
        q = (u.reshape(N, K_pad) - 8)[:, :K].to(torch.int8)
        zero = None if zeros is None else (zeros.t().to(torch.int32) - 8).to(torch.int8)
    else:
        q = qw.t()[:, :K].contiguous()
        zero = None if zeros is None else zeros.t().contiguous()
    return q, scales.t().float(), zero


# ----------------------------------------------------------------------------- custom op


@torch.library.custom_op("quantkit::wna16_linear", mutates_args=())
def _wna16_linear_op(
    x: torch.Tensor, qw: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], bits: int, group_size: int, N: int, K: int,
) -> torch.Tensor:
    if use_triton(x, qw):
        return wna16_linear_triton(x, qw, scales, zeros, bias, bits, group_size, N, K)
    q, s, z = _unpack_ref(qw, scales, zeros, bits, group_size, N, K)
    return wna16_gemm_ref(x, q, s, z, bias)


@_wna16_linear_op.register_fake
def _(x, qw, scales, zeros, bias, bits, group_size, N, K):
    return x.new_empty((x.shape[0], N))


def wna16_linear(x: torch.Tensor, weight: WNA16Weight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W4A16/W8A16 linear. x: (..., K) fp16/bf16 -> (..., N) x.dtype."""
    lead = x.shape[:-1]
    out = _wna16_linear_op(
        x.reshape(-1, x.shape[-1]), weight.qw, weight.scales, weight.zeros, bias,
        weight.bits, weight.group_size, weight.N, weight.K,
    )
    return out.reshape(*lead, weight.N)
