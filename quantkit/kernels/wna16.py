"""W4A16 / W8A16 GEMM with group-wise scales (and zeros), dequantized in the inner loop.

Spec (``wna16_gemm_ref``), x: (M, K) fp16/bf16, canonical weight q: (N, K) int8 holding
bits-bit signed ints, scale: (N, G) and zero: (N, G) int8 or None, G = K // group_size:

    W[n, k]  = (q[n, k] - zero[n, k // gs]) * scale[n, k // gs]
    out      = (x.float() @ W.float().T + bias).to(x.dtype)

Packed layout (``prepack_wna16``, done once at load; the checkpoint keeps the canonical form):

* K is padded to a multiple of 128 (``K_pad``); kernels walk K in 128-row blocks.
* ``qw`` is int32 (K_pad // PER, N), N contiguous (coalesced 16-byte loads along N), with
  PER = 32 // bits values per word and R = 128 // PER word rows per block (16 for 4-bit, 32
  for 8-bit).  Field j (bits ``bits*j ..``) of word ``[b*R + i, n]`` holds
  ``q[n, b*128 + j*R + i] + 2**(bits-1)`` (offset binary).  Unpacking field j of one (R, N)
  word tile gives K rows j*R .. j*R+R-1 of the block, in order, so the (PER, R, N) unpack
  reshapes to a (128, N) tile with no permutation.
* ``scales``: (G, N) in ``scale_dtype`` (fp16 by default); ``zeros``: (G, N) int8 raw zero
  points, or None when symmetric.

Dequantization uses no int->float conversion instruction (16/clk/SM on Hopper): a field
masked in place, OR-ed into the mantissa of 2**23, is the float ``2**23 + u * 2**(bits*jj)``;
one FADD of ``2**23 + (offset + zero) * 2**(bits*jj)`` gives ``(q - zero) * 2**(bits*jj)``
exactly, and the power of two is folded into the activation.

Paths (``BACKEND`` in the config; configs come from a ConfigCache keyed by (M bucket, N, K, GPU)):

* ``gemv`` (M <= 8): one program per (BLOCK_N outputs, K split); elementwise FMA in fp32,
  one cross-thread reduction at the end; split-K partials reduced in-kernel by the last split.
* ``gemv_h2`` (M = 1, 4-bit, group >= 128): the GEMV with half2 dequantization and products on activations
  prescaled by a power of two; ``PACKED_X``: the prescale and the half2 pairs made once per call by a one-program
  launch (``_h2_pack_x``) instead of in every program's loop, the GEMV launched after it (``PDL``: programmatically).
* ``mma``: ``tl.dot`` with whole 128-K blocks per dot; ``SWAP_AB`` computes C^T = W x^T so
  the weight tile is the MMA's large operand (M = 16..64).  Group scales are applied to the
  (per 128-K block) partial sum when group_size >= 128, else to the dequantized weights
  (``SCALE_W``: to the weights at any group size, so the MMAs chain and overlap the dequant).
* ``dequant``: one Triton dequantization to x.dtype + cuBLAS (``torch.mm``), for large M.
* ``gemv_h2`` with ``TMA_RING`` (sm_90, ``wna16_gluon.wna16_gluon_gemv_kernel``): the same products on packed x,
  every operand streamed through a TMA ring by a loader warp; elsewhere the ``gemv_h2`` kernel on the same tile.
* ``gluon`` (sm_90, ``wna16_gluon``): TMA-fed, each weight dequantized once per CTA, into shared memory or (``RS``,
  4-bit, group >= 128) straight into the wgmma's register operand; where it cannot run (no Gluon, another GPU, x
  that TMA cannot describe, a tile over shared memory) the call takes the ``mma`` / ``dequant`` heuristic plan.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from . import _common, _replay
from ._common import (EAGER, ConfigCache, H2_ASM_SYM, H2_ASM_ZERO, LazyKernel, cached_buffer, call_configs,
                      capturing, cdiv, const_key, eager_cuda, fast_launch, gemv_tile, gpu_key,
                      grid_dep_launch_dependents, grid_dep_wait, grouped_tile, has_sub_configs, jit_helper,
                      l2_prefetch_rows, next_pow2, pdl_chains, pdl_enter, pdl_option, prefetch_steps, remember,
                      spec_key, splitk_buffers, splitk_for, splitk_sum, tl, use_chained_configs, use_triton, wants_pdl)

__all__ = [
    "WNA16Weight",
    "prepack_wna16",
    "wna16_linear",
    "wna16_gemm_ref",
    "wna16_dequant",
    "CONFIGS",
]

PACK_K = 128
MAGIC = tl.constexpr(0x4B000000)  # bits of 2**23
TWO23 = tl.constexpr(8388608.0)


def _per(bits: int) -> int:
    return 32 // bits


def _rows(bits: int) -> int:
    return PACK_K // _per(bits)


@dataclass
class WNA16Weight:
    """Packed weight for the W4A16 / W8A16 kernels (see module docstring for the layout).

    qw: (K_pad // (32 // bits), N) int32; scales: (G, N); zeros: (G, N) int8 or None.
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
    per, R = _per(bits), _rows(bits)
    u = torch.full((N, K_pad), 1 << (bits - 1), dtype=torch.int64, device=dev)
    u[:, :K] = q.to(torch.int64) + (1 << (bits - 1))
    u = u.reshape(N, K_pad // PACK_K, per, R)  # [n, b, j, i]: k = b*128 + j*R + i
    shifts = (torch.arange(per, device=dev, dtype=torch.int64) * bits).reshape(1, 1, per, 1)
    words = (u << shifts).sum(dim=2)  # (N, nb, R), < 2^32
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    qw = words.reshape(N, K_pad // per).t().contiguous()  # (K_pad // per, N)
    scales = scale.t().to(scale_dtype).contiguous()  # (G, N)
    zeros = None if zero is None else zero.reshape(N, G).to(torch.int8).t().contiguous()
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


@jit_helper
def _field_magic(wp, wh, j: tl.constexpr, BITS: tl.constexpr, HALF: tl.constexpr):
    """Field j of the packed words as the float 2**23 + u * 2**(BITS * (j % HALF)) (u: the offset-binary
    value), with no int->float conversion: the field, masked in place, OR-ed into 2**23's mantissa.
    wh = wp >> 16 holds the upper HALF fields."""
    FIELD: tl.constexpr = ((1 << BITS) - 1) << (BITS * (j % HALF))
    if j < HALF:
        bits_ = (wp & FIELD) | MAGIC
    else:
        bits_ = (wh & FIELD) | MAGIC
    return bits_.to(tl.float32, bitcast=True)


@jit_helper
def _store_out(acc, c_ptrs, c_mask, bias_ptr, offs_n, nmask, ws_ptr, lock_ptr, tile, pid_k, HAS_BIAS: tl.constexpr,
               SPLIT_K: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """GEMV epilogue: split-K reduction (when split), bias, store of the (ROWS, COLS) fp32 tile."""
    if SPLIT_K > 1:
        acc, last = splitk_sum(acc, ws_ptr, lock_ptr, tile, pid_k, SPLIT_K, ROWS, COLS)
        c_mask = tl.where(last, c_mask, False)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=nmask, other=0).to(tl.float32)[None, :]
    tl.store(c_ptrs, acc.to(c_ptrs.dtype.element_ty), mask=c_mask)


def _wna16_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, c_ptr, ws_ptr, lock_ptr,
    # x: (M, K) fp16/bf16, M <= BLOCK_M; w: packed (K_pad // PER, N) int32; s, z: (G, N); c: (M, N)
    # ws: fp32 split-K workspace (tiles * SPLIT_K * BLOCK_M * BLOCK_N); lock: int32 (tiles,), zero
    M, N, K, n_groups, group_size,
    stride_xm, stride_cm,
    BITS: tl.constexpr,
    PER: tl.constexpr,  # fields per word (32 // BITS)
    R: tl.constexpr,  # word rows per 128-K block (128 // PER)
    HAS_ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GS_SMALL: tl.constexpr,  # group_size < 128: scales/zeros gathered per element
    EVEN_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    tile, pid_k, offs_n, nmask = gemv_tile(N, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    rm = offs_m % M
    offs_r = tl.arange(0, R)
    HALF: tl.constexpr = PER // 2
    OFFSET: tl.constexpr = 1 << (BITS - 1)

    n_blocks = tl.cdiv(K, 128)
    per_split = tl.cdiv(n_blocks, SPLIT_K)
    b_lo = pid_k * per_split
    b_hi = tl.minimum(n_blocks, b_lo + per_split)
    w_ptrs = w_ptr + offs_r[:, None].to(tl.int64) * N + offs_n[None, :]
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + offs_r[None, :]

    # BLOCK_M == 1 (decode) keeps every tensor 2-D (R, BLOCK_N): one layout, no conversions
    if BLOCK_M == 1:
        acc3 = tl.zeros((R, BLOCK_N), dtype=tl.float32)
        x_ptrs = x_ptr + offs_r
    else:
        acc3 = tl.zeros((BLOCK_M, R, BLOCK_N), dtype=tl.float32)
    for blk in range(b_lo, b_hi):
        k0 = blk * 128
        wp = tl.load(w_ptrs + blk * R * N, mask=nmask[None, :], other=0)
        wh = wp >> 16
        if not GS_SMALL:
            g = tl.minimum(k0 // group_size, n_groups - 1)
            s = tl.load(s_ptr + g * N + offs_n, mask=nmask, other=0).to(tl.float32)
            if HAS_ZERO:
                zc = tl.load(z_ptr + g * N + offs_n, mask=nmask, other=0).to(tl.float32) + OFFSET
            if BLOCK_M == 1:
                part = tl.zeros((R, BLOCK_N), dtype=tl.float32)
            else:
                part = tl.zeros((BLOCK_M, R, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(PER):
            POW = 1 << (BITS * (j % HALF))
            b = _field_magic(wp, wh, j, BITS, HALF)
            if GS_SMALL:
                grow = tl.minimum((k0 + j * R + offs_r) // group_size, n_groups - 1)
                sj = tl.load(s_ptr + grow[:, None] * N + offs_n[None, :], mask=nmask[None, :], other=0).to(tl.float32)
                if HAS_ZERO:
                    zj = tl.load(z_ptr + grow[:, None] * N + offs_n[None, :], mask=nmask[None, :], other=0)
                    b = b - ((zj.to(tl.float32) + OFFSET) * POW + TWO23)
                else:
                    b = b - (TWO23 + OFFSET * POW)
                b = b * sj
            elif HAS_ZERO:
                b = b - (zc * POW + TWO23)[None, :]
            else:
                b = b - (TWO23 + OFFSET * POW)
            if BLOCK_M == 1:
                if EVEN_K:
                    xj = tl.load(x_ptrs + (k0 + j * R))
                else:
                    xj = tl.load(x_ptrs + (k0 + j * R), mask=(k0 + j * R + offs_r) < K, other=0.0)
                prod = (xj.to(tl.float32) * (1.0 / POW))[:, None] * b  # exact scaling: power of two
            else:
                if EVEN_K:
                    xj = tl.load(x_ptrs + (k0 + j * R))
                else:
                    xj = tl.load(x_ptrs + (k0 + j * R), mask=(k0 + j * R + offs_r[None, :]) < K, other=0.0)
                prod = (xj.to(tl.float32) * (1.0 / POW))[:, :, None] * b[None, :, :]
            if GS_SMALL:
                acc3 += prod
            else:
                part += prod
        if not GS_SMALL:
            if BLOCK_M == 1:
                acc3 += part * s[None, :]
            else:
                acc3 += part * s[None, None, :]
    if BLOCK_M == 1:
        acc = tl.sum(acc3, axis=0)[None, :]  # (1, BLOCK_N)
    else:
        acc = tl.sum(acc3, axis=1)  # (BLOCK_M, BLOCK_N)

    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    c_mask = (offs_m[:, None] < M) & nmask[None, :]
    _store_out(acc, c_ptrs, c_mask, bias_ptr, offs_n, nmask, ws_ptr, lock_ptr, tile, pid_k, HAS_BIAS, SPLIT_K,
               BLOCK_M, BLOCK_N)


wna16_gemv_kernel = LazyKernel(_wna16_gemv_kernel)




@jit_helper
def _half2(lo, hi):
    """Two fp32 tensors -> their fp16 values packed as one int32 (lo in the low half)."""
    lo16 = lo.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi16 = hi.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
    return lo16 | (hi16 << 16)


@jit_helper
def _nibble_term(part, xj, wp, j: tl.constexpr, off):
    """``part`` plus the products of 4-bit field j of the words ``wp`` (minus ``off``) with ``xj`` (shaped to
    broadcast against ``wp``) rounded to fp16: the half2 asm's arithmetic in fp32 (its interpreter stand-in)."""
    u = ((wp >> (4 * j)) & 15).to(tl.float32)
    return part + xj.to(tl.float16).to(tl.float32) * (u - off)


@jit_helper
def _h2_acts(x_ptr, kb, K, sc, R: tl.constexpr):
    """The h2 GEMV's activations for word rows ``kb`` (the K index of field 0): fields 0-7 are K offsets j * R,
    prescaled by ``sc`` (even fields) or ``sc / 16`` (odd fields, whose nibbles the asm reads shifted by 4)."""
    xs0 = tl.load(x_ptr + kb, mask=kb < K, other=0.0).to(tl.float32) * sc
    xs1 = tl.load(x_ptr + kb + R, mask=kb + R < K, other=0.0).to(tl.float32) * (sc * 0.0625)
    xs2 = tl.load(x_ptr + kb + 2 * R, mask=kb + 2 * R < K, other=0.0).to(tl.float32) * sc
    xs3 = tl.load(x_ptr + kb + 3 * R, mask=kb + 3 * R < K, other=0.0).to(tl.float32) * (sc * 0.0625)
    xs4 = tl.load(x_ptr + kb + 4 * R, mask=kb + 4 * R < K, other=0.0).to(tl.float32) * sc
    xs5 = tl.load(x_ptr + kb + 5 * R, mask=kb + 5 * R < K, other=0.0).to(tl.float32) * (sc * 0.0625)
    xs6 = tl.load(x_ptr + kb + 6 * R, mask=kb + 6 * R < K, other=0.0).to(tl.float32) * sc
    xs7 = tl.load(x_ptr + kb + 7 * R, mask=kb + 7 * R < K, other=0.0).to(tl.float32) * (sc * 0.0625)
    return xs0, xs1, xs2, xs3, xs4, xs5, xs6, xs7


@jit_helper
def _h2_asm(wp, p0, p1, p2, p3, zc, HAS_ZERO: tl.constexpr):
    """The half2 PTX on words ``wp`` and their activations as four half2 pairs (fields 0/4, 1/5, 2/6, 3/7)."""
    if HAS_ZERO:
        c0 = _half2(zc + 1024.0, zc + 1024.0)
        c1 = _half2(zc * 16.0 + 1024.0, zc * 16.0 + 1024.0)
        return tl.inline_asm_elementwise(H2_ASM_ZERO, "=f,r,r,r,r,r,r,r", [wp, p0, p1, p2, p3, c0, c1],
                                         dtype=tl.float32, is_pure=True, pack=1)
    return tl.inline_asm_elementwise(H2_ASM_SYM, "=f,r,r,r,r,r", [wp, p0, p1, p2, p3], dtype=tl.float32,
                                     is_pure=True, pack=1)


@jit_helper
def _unhalf2(p):
    """``_half2``'s inverse: one int32 of two packed fp16 values -> (lo, hi) as fp32 (exact)."""
    lo = (p & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (p >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@jit_helper
def _h2_packed_products(wp, xp_ptr, rows, n_rows, zc, HAS_ZERO: tl.constexpr, USE_ASM: tl.constexpr):
    """``_h2_products`` on activations packed by ``_h2_pack_x_kernel``: word rows ``rows`` (shaped to broadcast
    against ``wp``) read as their four half2 pairs (planes of ``n_rows`` int32), no prescale or packing here."""
    live = rows < n_rows  # a block past K (an uneven last step) reads nothing
    p0 = tl.load(xp_ptr + rows, mask=live, other=0)
    p1 = tl.load(xp_ptr + n_rows + rows, mask=live, other=0)
    p2 = tl.load(xp_ptr + 2 * n_rows + rows, mask=live, other=0)
    p3 = tl.load(xp_ptr + 3 * n_rows + rows, mask=live, other=0)
    if USE_ASM:
        return _h2_asm(wp, p0, p1, p2, p3, zc, HAS_ZERO)
    xs0, xs4 = _unhalf2(p0)
    xs1, xs5 = _unhalf2(p1)
    xs2, xs6 = _unhalf2(p2)
    xs3, xs7 = _unhalf2(p3)
    return _h2_products(wp, xs0, xs1, xs2, xs3, xs4, xs5, xs6, xs7, zc, HAS_ZERO, False)


@jit_helper
def _h2_prescale(x_ptr, a_lo, a_hi, AMAX_K: tl.constexpr):
    """The h2 GEMV's activation prescale over x[a_lo:a_hi]: (sc, 1 / sc), powers of two with sc = 2**(3 -
    floor(log2 max|x|)), so |x * sc| < 16 (exponent bits: exact, no log2/exp2 approximation)."""
    offs_a = tl.arange(0, AMAX_K)
    amax_v = tl.zeros((AMAX_K,), dtype=tl.float32)
    for k0 in range(a_lo, a_hi, AMAX_K):
        xa = tl.load(x_ptr + k0 + offs_a, mask=(k0 + offs_a) < a_hi, other=0.0)
        amax_v = tl.maximum(amax_v, tl.abs(xa.to(tl.float32)))
    amax = tl.max(amax_v, axis=0)
    e = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2(amax)) for a normal amax
    sc_exp = tl.minimum(tl.maximum(127 + 3 - e, 1), 254)
    return (sc_exp << 23).to(tl.float32, bitcast=True), ((254 - sc_exp) << 23).to(tl.float32, bitcast=True)


def _h2_pack_x_kernel(x_ptr, xp_ptr, xsc_ptr, K, n_rows, AMAX_K: tl.constexpr, BLOCK_R: tl.constexpr,
                      TRIGGER: tl.constexpr, WAIT: tl.constexpr):
    """x (K,) fp16/bf16 -> the h2 GEMV's activations, prescaled (``_h2_prescale`` over all of K), rounded to fp16
    and packed as the half2 asm reads them: word row i = block i // 16, row i % 16, its pairs (fields 0/4, 1/5,
    2/6, 3/7; odd fields divided by 16) in four planes of ``n_rows`` int32 (K padded to whole 128-K blocks with
    zeros); ``xsc``: 1 / the prescale. Done once per call instead of in every program.  Each program of the grid
    (one or more) takes its own BLOCK_R-row chunks, after the whole row's prescale: the GEMV waits for all of it,
    so a long K's chunks run side by side instead of one after another.  TRIGGER: the GEMV (PDL) may launch now;
    WAIT: this launch is programmatic too (``PDL_CHAIN``), so x is read only once the launch before has ended."""
    pdl_enter(TRIGGER, WAIT)
    sc, inv_sc = _h2_prescale(x_ptr, 0, K, AMAX_K)
    for r0 in range(tl.program_id(0) * BLOCK_R, n_rows, BLOCK_R * tl.num_programs(0)):
        rows = r0 + tl.arange(0, BLOCK_R)
        kb = rows // 16 * 128 + rows % 16
        xs0, xs1, xs2, xs3, xs4, xs5, xs6, xs7 = _h2_acts(x_ptr, kb, K, sc, 16)
        live = rows < n_rows
        tl.store(xp_ptr + rows, _half2(xs0, xs4), mask=live)
        tl.store(xp_ptr + n_rows + rows, _half2(xs1, xs5), mask=live)
        tl.store(xp_ptr + 2 * n_rows + rows, _half2(xs2, xs6), mask=live)
        tl.store(xp_ptr + 3 * n_rows + rows, _half2(xs3, xs7), mask=live)
    if tl.program_id(0) == 0:
        tl.store(xsc_ptr, inv_sc)


h2_pack_x_kernel = LazyKernel(_h2_pack_x_kernel)


@jit_helper
def _h2_products(wp, xs0, xs1, xs2, xs3, xs4, xs5, xs6, xs7, zc, HAS_ZERO: tl.constexpr, USE_ASM: tl.constexpr):
    """Per word of ``wp``: its eight 4-bit fields times the activations ``xs0``-``xs7`` (from ``_h2_acts``, shaped to
    broadcast against ``wp``), in half2 asm (compiled) or the same arithmetic in fp32 (interpreter). ``zc``: each
    column's zero point + 8, broadcast likewise (read only with HAS_ZERO; else the offset is 8)."""
    if USE_ASM:
        part = _h2_asm(wp, _half2(xs0, xs4), _half2(xs1, xs5), _half2(xs2, xs6), _half2(xs3, xs7), zc, HAS_ZERO)
    else:  # activations rounded to fp16 as the asm sees them; odd fields' x was prescaled by 1/16 (_h2_acts)
        if HAS_ZERO:
            off = zc
        else:
            off = 8.0
        part = _nibble_term(0.0, xs0, wp, 0, off)
        part = _nibble_term(part, xs1 * 16.0, wp, 1, off)
        part = _nibble_term(part, xs2, wp, 2, off)
        part = _nibble_term(part, xs3 * 16.0, wp, 3, off)
        part = _nibble_term(part, xs4, wp, 4, off)
        part = _nibble_term(part, xs5 * 16.0, wp, 5, off)
        part = _nibble_term(part, xs6, wp, 6, off)
        part = _nibble_term(part, xs7 * 16.0, wp, 7, off)
    return part


@jit_helper
def _h2_per_block(x_ptr, w_ptr, s_ptr, z_ptr, offs_r, offs_n, nmask, N, K, n_blocks, n_groups, group_size, st_lo, st_hi,
                  sc, HAS_ZERO: tl.constexpr, EVEN_U: tl.constexpr, UNROLL: tl.constexpr, R: tl.constexpr,
                  BLOCK_N: tl.constexpr, USE_ASM: tl.constexpr, LOAD_STAGES: tl.constexpr, PACKED_X: tl.constexpr):
    """The h2 GEMV's main loop on (R, BLOCK_N) tiles (PER_BLOCK): the same words, activations and products as
    the 3-D loop, one 128-K block per unrolled iteration; returns the (R, BLOCK_N) fp32 sums."""
    w_rows = w_ptr + offs_r[:, None].to(tl.int64) * N + offs_n[None, :]
    acc = tl.zeros((R, BLOCK_N), dtype=tl.float32)
    for st in tl.range(st_lo, st_hi, num_stages=LOAD_STAGES):
        for u in tl.static_range(UNROLL):
            blk = st * UNROLL + u
            if EVEN_U:
                live = nmask
            else:  # a block past K (the last step's) loads nothing
                live = offs_n < N * (blk < n_blocks).to(tl.int32)
            wp = tl.load(w_rows + blk * R * N, mask=live[None, :], other=0)
            g = tl.minimum(blk * 128 // group_size, n_groups - 1)
            s = tl.load(s_ptr + g * N + offs_n, mask=live, other=0).to(tl.float32)
            if not PACKED_X:
                xs0, xs1, xs2, xs3, xs4, xs5, xs6, xs7 = _h2_acts(x_ptr, blk * 128 + offs_r, K, sc, R)
            zc = 8.0
            if HAS_ZERO:
                zc = (tl.load(z_ptr + g * N + offs_n, mask=live, other=0).to(tl.float32) + 8.0)[None, :]
            if PACKED_X:
                part = _h2_packed_products(wp, x_ptr, (blk * R + offs_r)[:, None], n_blocks * R, zc, HAS_ZERO,
                                           USE_ASM)
            else:
                part = _h2_products(wp, xs0[:, None], xs1[:, None], xs2[:, None], xs3[:, None], xs4[:, None],
                                    xs5[:, None], xs6[:, None], xs7[:, None], zc, HAS_ZERO, USE_ASM)
            acc += part * s[None, :]
    return acc


def _wna16_gemv_h2_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, c_ptr, ws_ptr, lock_ptr, xsc_ptr,
    # x: (1, K) (PACKED_X: the packed activations, xsc: 1 / their prescale); the rest as the GEMV kernel.
    # 4-bit, group size >= 128 (one scale per 128-K block and column)
    N, K, n_groups, group_size,
    HAS_ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_U: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UNROLL: tl.constexpr,
    AMAX_K: tl.constexpr,  # elements per step of the row-max prologue
    USE_ASM: tl.constexpr,  # the half2 PTX (compiled); the same arithmetic in fp32 (interpreter)
    PER_BLOCK: tl.constexpr,  # 2-D (R, BLOCK_N) tiles, one 128-K block at a time (see below)
    LOAD_STAGES: tl.constexpr,  # > 1: the step loop's loads pipelined (cp.async into a ring of this many steps)
    SLICE_PRESCALE: tl.constexpr,  # the prescale from this split's K slice of x (else the whole row)
    PACKED_X: tl.constexpr,  # x prescaled and packed once per call by _h2_pack_x_kernel (no prologue here)
    PDL: tl.constexpr,  # launched programmatically (after the packing launch with PACKED_X, else after whatever
    # ran before): wait for the launch before it before reading x
    PREFETCH: tl.constexpr,  # PDL: this many steps' weight lines asked of L2 before the wait (0: none)
    CHAIN: tl.constexpr,  # PDL_CHAIN: let the next launch start now (it waits for our results in its own wait)
):
    """Decode (M = 1) W4A16 GEMV with half2 dequantization and products (``_common.H2_ASM_*``): about two
    instructions per weight instead of three to four, for the ALU-bound M=1 case.

    x is first scaled by a power of two, 2**(3 - floor(log2 max|x|)), so |x * sc| < 16 and a partial
    of four fp16 products stays under 16 * 15 * 4 (no overflow whatever the activations' range); the
    scale comes back out exactly at the end. Products and 4-term partials are fp16 (rel. error ~2**-11),
    sums across words fp32.

    Tiles: (UNROLL, R, BLOCK_N) per step, or with PER_BLOCK (R, BLOCK_N) per 128-K block, the step's UNROLL blocks
    unrolled. Triton spreads a tile's threads over its columns, so a thread holds every (block, row) of the
    step: with 3-D tiles the step's 128 x UNROLL activations (as half2) in each thread (ptxas, sm_90, the
    shipped tiles: 167-255 registers per thread); a 2-D tile holds one block's 128 (76-168: more programs per
    SM to hide the loads' latency; benchmarks/h2_spills.py)."""
    R: tl.constexpr = 16
    if CHAIN:
        grid_dep_launch_dependents()
    tile, pid_k, offs_n, nmask = gemv_tile(N, BLOCK_N)
    offs_r = tl.arange(0, R)

    n_blocks = tl.cdiv(K, 128)
    n_steps = tl.cdiv(n_blocks, UNROLL)
    per_split = tl.cdiv(n_steps, SPLIT_K)
    st_lo = pid_k * per_split
    st_hi = tl.minimum(n_steps, st_lo + per_split)

    # power-of-two prescale from the max |x| over the row, or with SLICE_PRESCALE over this split's K slice only
    # (the scale comes out of each split's fp32 sum before the splits are added, so each may take its own; a
    # shorter prologue on every program's critical path); PACKED_X: applied by the packing launch
    if PDL:  # everything above overlapped the launch before (the packing with PACKED_X); x (and xsc) are its output
        if PREFETCH > 0:  # the weights do not depend on it: start streaming the first steps' now
            k_rows = st_lo * UNROLL * R + tl.arange(0, PREFETCH * UNROLL * R)
            l2_prefetch_rows(w_ptr, k_rows, tl.minimum(st_hi * UNROLL, n_blocks) * R, N, tile * BLOCK_N, N,
                             BLOCK_N, 32)
        grid_dep_wait()
    if PACKED_X:
        sc = 1.0
        inv_sc = tl.load(xsc_ptr)
    else:
        if SLICE_PRESCALE:
            a_lo = st_lo * UNROLL * 128
            a_hi = tl.minimum(st_hi * UNROLL * 128, K)
        else:
            a_lo = 0
            a_hi = K
        sc, inv_sc = _h2_prescale(x_ptr, a_lo, a_hi, AMAX_K)
    if PER_BLOCK:
        acc = _h2_per_block(x_ptr, w_ptr, s_ptr, z_ptr, offs_r, offs_n, nmask, N, K, n_blocks, n_groups, group_size,
                            st_lo, st_hi, sc, HAS_ZERO, EVEN_U, UNROLL, R, BLOCK_N, USE_ASM, LOAD_STAGES, PACKED_X)
        acc = (tl.sum(acc, axis=0) * inv_sc)[None, :]
        _store_out(acc, c_ptr + offs_n[None, :], nmask[None, :], bias_ptr, offs_n, nmask, ws_ptr, lock_ptr, tile,
                   pid_k, HAS_BIAS, SPLIT_K, 1, BLOCK_N)
        return
    offs_u = tl.arange(0, UNROLL)
    rows = offs_u[:, None] * R + offs_r[None, :]
    w_ptrs = w_ptr + rows[:, :, None].to(tl.int64) * N + offs_n[None, None, :]
    kx = offs_u[:, None] * 128 + offs_r[None, :]
    acc = tl.zeros((UNROLL, R, BLOCK_N), dtype=tl.float32)
    for st in tl.range(st_lo, st_hi, num_stages=LOAD_STAGES):
        blk0 = st * UNROLL
        if EVEN_U:
            umask = offs_u >= 0
            wp = tl.load(w_ptrs + blk0 * R * N, mask=nmask[None, None, :], other=0)
        else:
            umask = (blk0 + offs_u) < n_blocks
            wp = tl.load(w_ptrs + blk0 * R * N, mask=umask[:, None, None] & nmask[None, None, :], other=0)
        g = tl.minimum((blk0 + offs_u) * 128 // group_size, n_groups - 1)
        smask = umask[:, None] & nmask[None, :]
        s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=smask, other=0).to(tl.float32)
        if not PACKED_X:
            xs0, xs1, xs2, xs3, xs4, xs5, xs6, xs7 = _h2_acts(x_ptr, blk0 * 128 + kx, K, sc, R)
        zc = 8.0
        if HAS_ZERO:
            zc = tl.load(z_ptr + g[:, None] * N + offs_n[None, :], mask=smask, other=0).to(tl.float32) + 8.0
            zc = zc[:, None, :]
        if PACKED_X:
            part = _h2_packed_products(wp, x_ptr, (blk0 * R + rows)[:, :, None], n_blocks * R, zc, HAS_ZERO, USE_ASM)
        else:
            part = _h2_products(wp, xs0[:, :, None], xs1[:, :, None], xs2[:, :, None], xs3[:, :, None],
                                xs4[:, :, None], xs5[:, :, None], xs6[:, :, None], xs7[:, :, None], zc, HAS_ZERO,
                                USE_ASM)
        acc += part * s[:, None, :]
    acc = (tl.sum(tl.sum(acc, axis=1), axis=0) * inv_sc)[None, :]
    _store_out(acc, c_ptr + offs_n[None, :], nmask[None, :], bias_ptr, offs_n, nmask, ws_ptr, lock_ptr, tile, pid_k,
               HAS_BIAS, SPLIT_K, 1, BLOCK_N)


wna16_gemv_h2_kernel = LazyKernel(_wna16_gemv_h2_kernel)


def _wna16_mma_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, c_ptr, ws_ptr, lock_ptr,
    # as the GEMV kernel; any M
    M, N, K, n_groups, group_size,
    stride_xm, stride_cm,
    BITS: tl.constexpr,
    PER: tl.constexpr,
    R: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GS_SMALL: tl.constexpr,
    EVEN_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    SWAP_AB: tl.constexpr,  # acc is C^T (BLOCK_N, BLOCK_M) = W_tile x^T
    MAGIC16: tl.constexpr,  # 0: fp32 dequant; else the 16-bit magic (0x6400 fp16, 0x4300 bf16), not GS_SMALL
    M16: tl.constexpr,  # the value of MAGIC16 as a float (1024.0 / 128.0)
    SCALE_W: tl.constexpr,  # group >= 128: scale the weight tile in x.dtype and chain the accumulation (see below)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Tensor-core WNA16 GEMM: one output tile over one K split, weights dequantized per 128-K block."""
    offs_m, offs_n, tile, pid_k = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = offs_m % M
    nmask = offs_n < N
    offs_r = tl.arange(0, R)
    offs_k = tl.arange(0, 128)
    OFFSET: tl.constexpr = 1 << (BITS - 1)
    MASK: tl.constexpr = (1 << BITS) - 1
    dt = x_ptr.dtype.element_ty
    shifts = (tl.arange(0, PER) * BITS)[:, None, None]  # (PER, 1, 1)
    w_ptrs = w_ptr + offs_r[:, None].to(tl.int64) * N + offs_n[None, :]
    if SWAP_AB:
        x_ptrs = x_ptr + rm[None, :].to(tl.int64) * stride_xm + offs_k[:, None]  # x^T tile (128, BLOCK_M)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + offs_k[None, :]  # (BLOCK_M, 128)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    n_blocks = tl.cdiv(K, 128)
    per_split = tl.cdiv(n_blocks, SPLIT_K)
    b_lo = pid_k * per_split
    b_hi = tl.minimum(n_blocks, b_lo + per_split)
    for blk in range(b_lo, b_hi):
        k0 = blk * 128
        wp = tl.load(w_ptrs + blk * R * N, mask=nmask[None, :], other=0)  # (R, BLOCK_N)
        u = tl.reshape((wp[None, :, :] >> shifts) & MASK, (128, BLOCK_N))  # row j*R + i = k - k0
        if MAGIC16 != 0:
            # 16-bit magic: (u | MAGIC16) read as x.dtype is M16 + u exactly (fp16: 1024 + u, u < 1024;
            # bf16: 128 + u, u < 128); one 16-bit subtraction gives q - zero exactly.  No fp32
            # intermediate and no fp32 -> fp16 conversion (quarter rate on Hopper) per weight.
            wh = (u | MAGIC16).to(tl.int16).to(dt, bitcast=True)
            g = tl.minimum(k0 // group_size, n_groups - 1)
            s = tl.load(s_ptr + g * N + offs_n, mask=nmask, other=0).to(tl.float32)
            if HAS_ZERO:
                zc = (tl.load(z_ptr + g * N + offs_n, mask=nmask, other=0).to(tl.float32) + (M16 + OFFSET)).to(dt)
                wq = wh - zc[None, :]
            else:
                wq = wh - tl.full((1, BLOCK_N), M16 + OFFSET, dtype=dt)  # a dt operand: 16-bit subtraction
        else:
            wf = (u | MAGIC).to(tl.float32, bitcast=True)
            if GS_SMALL:
                grow = tl.minimum((k0 + offs_k) // group_size, n_groups - 1)
                st = tl.load(s_ptr + grow[:, None] * N + offs_n[None, :], mask=nmask[None, :], other=0).to(tl.float32)
                if HAS_ZERO:
                    zt = tl.load(z_ptr + grow[:, None] * N + offs_n[None, :], mask=nmask[None, :], other=0)
                    wf = (wf - (TWO23 + OFFSET) - zt.to(tl.float32)) * st
                else:
                    wf = (wf - (TWO23 + OFFSET)) * st
            else:
                g = tl.minimum(k0 // group_size, n_groups - 1)
                s = tl.load(s_ptr + g * N + offs_n, mask=nmask, other=0).to(tl.float32)
                if HAS_ZERO:
                    zc = tl.load(z_ptr + g * N + offs_n, mask=nmask, other=0).to(tl.float32) + (TWO23 + OFFSET)
                    wf = wf - zc[None, :]
                else:
                    wf = wf - (TWO23 + OFFSET)
            wq = wf.to(dt)  # (128, BLOCK_N): exact integers unless GS_SMALL (then scaled weights)
        if EVEN_K:
            xt = tl.load(x_ptrs + k0)
        elif SWAP_AB:
            xt = tl.load(x_ptrs + k0, mask=(k0 + offs_k[:, None]) < K, other=0.0)
        else:
            xt = tl.load(x_ptrs + k0, mask=(k0 + offs_k[None, :]) < K, other=0.0)
        # Group >= 128 keeps exact integer weights and scales each block's partial sum (acc += dot * s): every
        # MMA then starts from zero and is waited for before the scaling. SCALE_W scales the weights instead
        # (in x.dtype, as GS_SMALL does) and accumulates in the MMA, so one wgmma stays in flight while the next
        # tile is dequantized (sm_90 build: warp_group_dot_wait pendings 1 instead of 0).
        if SWAP_AB:
            if GS_SMALL:
                acc = tl.dot(tl.trans(wq), xt, acc)
            elif SCALE_W:
                acc = tl.dot(tl.trans(wq * s.to(dt)[None, :]), xt, acc)
            else:
                acc += tl.dot(tl.trans(wq), xt) * s[:, None]
        else:
            if GS_SMALL:
                acc = tl.dot(xt, wq, acc)
            elif SCALE_W:
                acc = tl.dot(xt, wq * s.to(dt)[None, :], acc)
            else:
                acc += tl.dot(xt, wq) * s[None, :]

    if SWAP_AB:
        c_ptrs = c_ptr + offs_m[None, :].to(tl.int64) * stride_cm + offs_n[:, None]
        c_mask = (offs_m[None, :] < M) & nmask[:, None]
    else:
        c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
        c_mask = (offs_m[:, None] < M) & nmask[None, :]
    if SPLIT_K > 1:  # acc is (BLOCK_N, BLOCK_M) when swapped: the workspace tile takes acc's shape
        if SWAP_AB:
            acc, last = splitk_sum(acc, ws_ptr, lock_ptr, tile, pid_k, SPLIT_K, BLOCK_N, BLOCK_M)
        else:
            acc, last = splitk_sum(acc, ws_ptr, lock_ptr, tile, pid_k, SPLIT_K, BLOCK_M, BLOCK_N)
        c_mask = tl.where(last, c_mask, False)  # only the last split to arrive stores
    if HAS_BIAS:
        bv = tl.load(bias_ptr + offs_n, mask=nmask, other=0).to(tl.float32)
        if SWAP_AB:
            acc += bv[:, None]
        else:
            acc += bv[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


wna16_mma_kernel = LazyKernel(_wna16_mma_kernel)


def _wna16_dequant_kernel(
    w_ptr, s_ptr, z_ptr, o_ptr,  # o: (K_pad, N) out dtype (W transposed, dequantized)
    N, K, n_groups, group_size,
    BITS: tl.constexpr,
    PER: tl.constexpr,
    R: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    blk = tl.program_id(0)  # one 128-row block
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_r = tl.arange(0, R)
    OFFSET: tl.constexpr = 1 << (BITS - 1)
    MASK: tl.constexpr = (1 << BITS) - 1
    k0 = blk * 128
    wp = tl.load(w_ptr + (blk * R + offs_r)[:, None].to(tl.int64) * N + offs_n[None, :], mask=nmask[None, :], other=0)
    for j in tl.static_range(PER):
        rows = k0 + j * R + offs_r
        grow = tl.minimum(rows // group_size, n_groups - 1)
        u = ((wp >> (BITS * j)) & MASK) | MAGIC
        v = u.to(tl.float32, bitcast=True) - (TWO23 + OFFSET)
        if HAS_ZERO:
            v -= tl.load(z_ptr + grow[:, None] * N + offs_n[None, :], mask=nmask[None, :], other=0).to(tl.float32)
        s = tl.load(s_ptr + grow[:, None] * N + offs_n[None, :], mask=nmask[None, :], other=0).to(tl.float32)
        tl.store(o_ptr + rows[:, None].to(tl.int64) * N + offs_n[None, :], (v * s).to(o_ptr.dtype.element_ty),
                 mask=nmask[None, :])


wna16_dequant_kernel = LazyKernel(_wna16_dequant_kernel)


# ----------------------------------------------------------------------------- configs


def _gemv(BN, SK, w=8, s=2):
    return dict(BACKEND="gemv", BLOCK_N=BN, SPLIT_K=SK, num_warps=w, num_stages=s)


def _gemv_h2(BN, SK, U, w=4, s=1, per_block=False, load_stages=1, slice_prescale=False, packed_x=False, pdl=False):
    """M = 1, 4-bit, group >= 128: half2 dequant and products (other cases: ``_gemv`` with the same tiles).
    load_stages > 1: the step loop's loads go through a cp.async ring of that many steps (UNROLL blocks each);
    slice_prescale: each split takes its x prescale from its own K slice; packed_x: x prescaled and packed by a
    launch of its own (``_h2_pack_x``), which pdl overlaps with the GEMV's launch (sm_90+)."""
    cfg = dict(BACKEND="gemv_h2", BLOCK_N=BN, SPLIT_K=SK, UNROLL=U, num_warps=w, num_stages=s)
    if load_stages > 1:
        cfg["LOAD_STAGES"] = load_stages
    if slice_prescale:
        cfg["SLICE_PRESCALE"] = True
    if packed_x:
        cfg["PACKED_X"] = True
    if pdl:
        cfg["PDL"] = True
    return dict(cfg, PER_BLOCK=True) if per_block else cfg


def _gemv_tma(BN, SK, w, ring, pdl=True, chain=False):
    """The TMA-fed decode GEMV (``wna16_gluon.wna16_gluon_gemv_kernel``; ``TMA_RING``: its ring's depth in 128-K
    blocks) on a packed-x PER_BLOCK h2 tile (UNROLL 1), which is what runs the config where that kernel cannot (no
    Gluon, another GPU). ``chain``: ``PDL_CHAIN`` (``_common.pdl_chains``)."""
    cfg = dict(_gemv_h2(BN, SK, 1, w, per_block=True, packed_x=True, pdl=pdl), TMA_RING=ring)
    return dict(cfg, PDL_CHAIN=True) if chain else cfg


def _mma(BM, BN, SK=1, swap=False, G=8, w=4, s=3, scale_w=False):
    cfg = dict(BACKEND="mma", BLOCK_M=BM, BLOCK_N=BN, SPLIT_K=SK, SWAP_AB=swap, GROUP_M=G, num_warps=w, num_stages=s)
    return dict(cfg, SCALE_W=True) if scale_w else cfg


GEMV_MAX_M = 8  # the GEMV kernel keeps BLOCK_M x 128 x BLOCK_N fp32 partials in registers


def _default_config(M: int, N: int, K: int) -> dict:
    """Heuristic configs (ptxas: no spills for these on sm_90); the measured configs (configs/<gpu>.json) override them."""
    nb = cdiv(K, PACK_K)
    if M <= 4:
        bn = 128 if M <= 2 else 64
        return _gemv(bn, splitk_for(cdiv(N, bn), nb))
    if M <= 16:
        return _mma(16, 64, splitk_for(cdiv(N, 64), nb), swap=True, G=1)
    if M <= 256:
        return _mma(64, 128, splitk_for(cdiv(M, 64) * cdiv(N, 128), nb, target=264, max_split=8), G=8, w=8)
    return dict(BACKEND="dequant")





# measured configs: quantkit/kernels/configs/<gpu>.json (benchmarks/gemm.py --tune writes them)
CONFIGS = ConfigCache(_default_config, "w4a16")  # 4-bit
CONFIGS_W8 = ConfigCache(_default_config, "w8a16")  # 8-bit


def _interp_config(M: int, N: int, K: int) -> dict:
    """Small tiles for the CPU interpreter (same dispatch thresholds as on the GPU)."""
    if M <= 4:
        return _gemv(32, 2 if K > PACK_K else 1, s=1)
    if M <= 16:
        return _mma(16, 32, 1, swap=True, G=1, s=1)
    return _mma(16, 32, 1, G=2, s=1)


def wna16_dequant(qw, scales, zeros, bits, group_size, N, K, out_dtype=torch.float16) -> torch.Tensor:
    """Triton dequantization of the packed weight -> W^T: (K, N) out_dtype (a view of (K_pad, N))."""
    K_pad = cdiv(K, PACK_K) * PACK_K
    o = torch.empty((K_pad, N), dtype=out_dtype, device=qw.device)
    BN = 128
    const = dict(BITS=bits, PER=_per(bits), R=_rows(bits), HAS_ZERO=zeros is not None, BLOCK_N=BN,
                 num_warps=4 if bits == 4 else 8)
    fast_launch(wna16_dequant_kernel, (K_pad // PACK_K, cdiv(N, BN)),
                (qw, scales, zeros if zeros is not None else scales, o, N, K, scales.shape[0], group_size),
                const, (bits, zeros is not None))
    return o[:K]


_PLANS: dict = {}


def effective_config(cfg: dict, M: int, bits: int = 4, gs_small: bool = False, dtype=torch.float16) -> dict:
    """The config a call runs: a GEMV config where it cannot apply becomes the general GEMV (``gemv_h2`` beyond
    M = 1, 4-bit, group >= 128, fp16/bf16) or the swapped tensor-core kernel with its split (M > GEMV_MAX_M)."""
    backend = cfg.get("BACKEND", "mma")
    if backend == "gemv_h2" and (M > 1 or gs_small or bits != 4 or dtype not in (torch.float16, torch.bfloat16)):
        backend, cfg = "gemv", dict(cfg, BACKEND="gemv")  # the general GEMV with the same tiles
    if backend == "gemv" and M > GEMV_MAX_M:
        cfg = _mma(16, 64, cfg.get("SPLIT_K", 1), swap=True, G=1)
    return cfg


def _config_key(cfg: dict) -> tuple:
    """A config as a plan-cache key (its sub-configs, ``_common.SUB_CONFIGS``, as their own sorted items; the
    tuner's timed calls pass flat configs and pay only the sort)."""
    if not has_sub_configs(cfg):
        return tuple(sorted(cfg.items()))
    return tuple(sorted((k, _config_key(v) if isinstance(v, dict) else v) for k, v in cfg.items()))


def _plan(x, M, N, K, bits, group_size, n_groups, has_zero, has_bias, config):
    """Launch plan (backend, kernel, grid, constexprs, split-K workspace and counters, the launch key: constexprs
    and the classes of the shape arguments), cached per shape/dtype/device and config (as ``w8a8``'s: the tuner's
    timed calls pass a config and should not pay for building the plan every call)."""
    chained = use_chained_configs(x.device)  # the entry's CHAINED config inside the runtime's chain
    key = (x.get_device(), x.dtype, M, N, K, bits, group_size, n_groups, has_zero, has_bias,
           None if config is None else _config_key(config), chained)
    p = _PLANS.get(key)
    if p is not None:
        return p
    if config is None:
        if x.is_cuda:
            cfg = (CONFIGS if bits == 4 else CONFIGS_W8).get(M, N, K, gpu_key(x))
        else:
            cfg = _interp_config(M, N, K)
    else:
        cfg = dict(config)
    cfg, eager = call_configs(cfg, chained)
    if eager is not None:  # a plan for each: the call picks (wna16_linear_triton)
        p = (EAGER, *(_plan(x, M, N, K, bits, group_size, n_groups, has_zero, has_bias, c) for c in (cfg, eager)))
        return remember(_PLANS, key, p)
    gs_small = n_groups > 1 and group_size < PACK_K
    cfg = effective_config(cfg, M, bits, gs_small, x.dtype)
    backend = cfg.get("BACKEND", "mma")
    if backend == "dequant":
        p = ("dequant", None, None, None, None, None, None)
    elif backend == "gluon":  # (wna16_gluon.Plan or None, split-K buffers), the heuristic plan as the fallback
        from quantkit.kernels import wna16_gluon

        tiles, tile_elems = wna16_gluon.splitk_tiles(cfg, M, N, bits, gs_small)
        fallback = _plan(x, M, N, K, bits, group_size, n_groups, has_zero, has_bias, _default_config(M, N, K))
        gplan = wna16_gluon.plan(cfg, M, N, K, x.dtype, bits, has_zero, has_bias, gs_small)
        p = ("gluon", fallback, None, gplan,
             *splitk_buffers(x.device, tiles, int(cfg.get("SPLIT_K", 1)), tile_elems, 4), None)
    elif backend == "gemv_h2" and cfg.get("TMA_RING") and x.is_cuda:
        # (wna16_gluon.GemvPlan or None, split-K buffers), the h2 GEMV on the same tile as the fallback
        from quantkit.kernels import wna16_gluon

        fallback = _plan(x, M, N, K, bits, group_size, n_groups, has_zero, has_bias,
                         {k: v for k, v in cfg.items() if k != "TMA_RING"})
        gplan = wna16_gluon.gemv_plan(cfg, N, x.dtype, has_zero, has_bias, wants_pdl(cfg, x.device))
        tiles, sk = cdiv(N, cfg["BLOCK_N"]), int(cfg.get("SPLIT_K", 1))
        p = ("gemv_tma", fallback, None, gplan, *splitk_buffers(x.device, tiles, sk, cfg["BLOCK_N"], 4), None)
    elif backend == "gemv_h2":
        nb = cdiv(K, PACK_K)
        u, sk = int(cfg["UNROLL"]), int(cfg.get("SPLIT_K", 1))
        slice_pre = bool(cfg.get("SLICE_PRESCALE", False))
        span = min(K, cdiv(cdiv(nb, u), sk) * u * PACK_K) if slice_pre else K  # x elements the prologue reads
        packed = bool(cfg.get("PACKED_X", False))
        pdl = wants_pdl(cfg, x.device)  # without PACKED_X: after whatever launch came before (a chain's trigger)
        const = dict(HAS_ZERO=has_zero, HAS_BIAS=has_bias, EVEN_U=(nb % u == 0), SPLIT_K=sk,
                     BLOCK_N=cfg["BLOCK_N"], UNROLL=u, AMAX_K=min(4096, next_pow2(max(16, span))),
                     USE_ASM=x.is_cuda, PER_BLOCK=bool(cfg.get("PER_BLOCK", False)),
                     LOAD_STAGES=int(cfg.get("LOAD_STAGES", 1)), SLICE_PRESCALE=slice_pre and not packed,
                     PACKED_X=packed, PDL=pdl, PREFETCH=prefetch_steps(cfg, pdl), CHAIN=pdl_chains(cfg, pdl),
                     num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                     **pdl_option(pdl))
        tiles = cdiv(N, cfg["BLOCK_N"])
        p = (backend, wna16_gemv_h2_kernel, (tiles * const["SPLIT_K"],), const,
             *splitk_buffers(x.device, tiles, const["SPLIT_K"], cfg["BLOCK_N"], 4),
             (const_key(const), spec_key((N, K, n_groups, group_size))))
    else:
        const = dict(BITS=bits, PER=_per(bits), R=_rows(bits), HAS_ZERO=has_zero, HAS_BIAS=has_bias,
                     GS_SMALL=gs_small, EVEN_K=(K % PACK_K == 0), SPLIT_K=int(cfg.get("SPLIT_K", 1)),
                     BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        if backend == "gemv":
            bm = max(1, 1 << (M - 1).bit_length())
            tiles = cdiv(N, cfg["BLOCK_N"])
            kern = wna16_gemv_kernel
        else:
            bm = cfg["BLOCK_M"]
            tiles = cdiv(M, bm) * cdiv(N, cfg["BLOCK_N"])
            kern = wna16_mma_kernel
            magic, m16 = 0, 0.0
            if not gs_small and cfg.get("MAGIC16", True):
                if x.dtype == torch.float16:
                    magic, m16 = 0x6400, 1024.0
                elif x.dtype == torch.bfloat16 and bits == 4 and x.is_cuda:  # interpreter: no bf16 bitcast
                    magic, m16 = 0x4300, 128.0
            const.update(SWAP_AB=bool(cfg.get("SWAP_AB", False)), GROUP_M=cfg.get("GROUP_M", 1), MAGIC16=magic,
                         M16=m16, SCALE_W=bool(cfg.get("SCALE_W", False)) and not gs_small)
        const["BLOCK_M"] = bm
        p = (backend, kern, (tiles * const["SPLIT_K"],), const,
             *splitk_buffers(x.device, tiles, const["SPLIT_K"], bm * cfg["BLOCK_N"], 4),
             (const_key(const), spec_key((M, N, K, n_groups, group_size))))
    return remember(_PLANS, key, p)


def wna16_linear_triton(x, qw, scales, zeros, bias, bits, group_size, N, K, config: Optional[dict] = None, out=None):
    """x: (M, K) fp16/bf16 -> (M, N) x.dtype (written into ``out`` when given)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    M = x.shape[0]
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    n_groups = scales.shape[0]
    p = _plan(x, M, N, K, bits, group_size, n_groups, zeros is not None, bias is not None, config)
    if p[0] == EAGER:  # the entry's EAGER config outside a CUDA-graph capture, its plain one inside
        p = p[1] if capturing(x) else p[2]
    backend, kern, grid, const, ws, lock, ckey = p
    if backend == "gluon":  # const: the Gluon kernel's per-shape plan (None where it cannot run at this shape)
        if const is not None and const.runs_on(x, qw):
            return const.launch(x, qw, scales, zeros, bias, out, ws, lock, group_size, N, K)
        backend, kern, grid, const, ws, lock, ckey = kern  # the heuristic plan
    elif backend == "gemv_tma":  # the TMA-fed GEMV's plan (wna16_gluon.GemvPlan), or the h2 GEMV's on its tile
        if const is not None and const.runs_on(x, qw, scales, zeros):
            xp, xsc = _h2_pack_x(x, K, const.pdl, const.chain)
            return const.launch(xp, xsc, qw, scales, zeros, bias, out, ws, lock, group_size, N, K)
        backend, kern, grid, const, ws, lock, ckey = kern
    if backend == "dequant":
        wt = wna16_dequant(qw, scales, zeros, bits, group_size, N, K, x.dtype)
        if bias is not None:
            return torch.addmm(bias.to(x.dtype), x, wt, out=out)
        return torch.mm(x, wt, out=out)
    vary = (x, qw, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, out)
    # ws and lock (cached buffers) and the shape arguments (in ckey) are left out of the specialization key
    if backend == "gemv_h2":
        xsc = ws  # read only with PACKED_X
        if const["PACKED_X"]:
            xp, xsc = _h2_pack_x(x, K, const["PDL"], const["CHAIN"])
            vary = (xp, *vary[1:])
        fast_launch(kern, grid, (*vary, ws, lock, xsc, N, K, n_groups, group_size), const, ckey, vary)
    else:
        strides = (x.stride(0), out.stride(0))
        fast_launch(kern, grid, (*vary, ws, lock, M, N, K, n_groups, group_size, *strides), const, ckey,
                    (*vary, *strides))
    return out


def h2_pack_x_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``_h2_pack_x_kernel``'s reference: x (K,) or (1, K) fp16/bf16 -> (packed (4 * n_rows,) int32, 1 / prescale
    (1,) fp32), n_rows = 16 per 128-K block. sc = 2**(3 - floor(log2 max|x|)) (exponent clamped as the kernel's);
    word row i's pairs: (x[k0], x[k0 + 64]), (x[k0 + 16] / 16, x[k0 + 80] / 16), (x[k0 + 32], x[k0 + 96]),
    (x[k0 + 48] / 16, x[k0 + 112] / 16) times sc, rounded to fp16, k0 = i // 16 * 128 + i % 16 (lo half first)."""
    xf = x.reshape(-1).float()
    K = xf.numel()
    nb = cdiv(K, PACK_K)
    amax = xf.abs().max() if K else xf.new_zeros(())
    e = ((amax.view(torch.int32) >> 23) & 0xFF) - 127
    sc_exp = torch.clamp(127 + 3 - e, 1, 254).to(torch.int32)
    sc = (sc_exp << 23).view(torch.float32)
    inv_sc = ((254 - sc_exp) << 23).view(torch.float32)
    xs = torch.zeros(nb * PACK_K, device=x.device)
    xs[:K] = xf * sc
    fields = xs.view(nb, 8, 16)  # [block, field j, row r] = x[block * 128 + j * 16 + r]
    fields = fields * torch.tensor([1.0, 1 / 16] * 4, device=x.device)[None, :, None]
    bits = fields.half().view(torch.int16).to(torch.int32) & 0xFFFF  # (nb, 8, 16)
    pairs = [bits[:, j] | (bits[:, j + 4] << 16) for j in range(4)]  # (nb, 16) each: fields j / j + 4
    return torch.stack([pr.reshape(-1) for pr in pairs]).reshape(-1), inv_sc.reshape(1)


def _h2_pack_x(x: torch.Tensor, K: int, pdl: bool = False, chain: bool = False):
    """``PACKED_X``: the h2 GEMV's activations prescaled and packed once for the call (``_h2_pack_x_kernel``) into
    this device's scratch: (packed (4 * n_rows,) int32, 1 / prescale (1,) fp32). ``pdl``: the GEMV is launched
    programmatically next, so this launch triggers it, and is programmatic itself where ``_common.first_waits``
    says (``chain``: the config's ``PDL_CHAIN``)."""
    key = (x.get_device(), K, pdl, _common.first_waits(chain, pdl))  # (the chain's state read per call)
    n_rows, grid, const, ckey, xp, xsc = _PACKS.get(key) or remember(_PACKS, key, _h2_pack_buffers(x.device, *key[1:]))
    fast_launch(h2_pack_x_kernel, grid, (x, xp, xsc, K, n_rows), const, ckey, (x,))
    return xp, xsc


# (device, K, trigger, wait) -> ``_h2_pack_plan`` and the packed x's buffers: a decode step packs x for every
# linear.  A buffer a larger request replaced later stays valid (``_common._RETIRED``), so a memoised one can be used
# on.
_PACKS: dict = {}


def _h2_pack_buffers(device, K: int, trigger: bool, wait: bool) -> tuple:
    n_rows, grid, const, ckey = _h2_pack_plan(K, trigger, wait)
    return (n_rows, grid, const, ckey, cached_buffer(device, torch.int32, 4 * n_rows, tag="h2_xpack"),
            cached_buffer(device, torch.float32, 1, tag="h2_xscale"))


def _h2_pack_plan(K: int, trigger: bool, wait: bool = False) -> tuple[int, tuple, dict, tuple]:
    """What ``_h2_pack_x`` derives from K alone (memoised with its buffers in ``_PACKS``): word rows, grid,
    constexprs and launch options, their key.  The GEMV waits for all of the packing, so past K = 4096 it takes
    the row's absolute maximum in one pass of up to 16384 (eight warps: 170 registers, no spill on sm_90) and a
    program per 512 word rows, instead of one program's loops of dependent loads (4096 and 512 a step)."""
    n_rows = cdiv(K, PACK_K) * 16
    wide = K > 4096
    const = dict(AMAX_K=min(16384 if wide else 4096, next_pow2(max(16, K))), BLOCK_R=min(512, next_pow2(n_rows)),
                 TRIGGER=trigger, WAIT=wait, num_warps=8 if wide else 4, **pdl_option(wait))
    return n_rows, (cdiv(n_rows, const["BLOCK_R"]),), const, (const_key(const), spec_key((K, n_rows)))


def _unpack_ref(qw, scales, zeros, bits, group_size, N, K):
    """Packed -> canonical (q, scale, zero) in torch (used by the CPU fallback)."""
    K_pad = cdiv(K, PACK_K) * PACK_K
    per, R = _per(bits), _rows(bits)
    words = qw.t().to(torch.int64) & 0xFFFFFFFF  # (N, K_pad // per)
    words = words.reshape(N, K_pad // PACK_K, 1, R)
    shifts = (torch.arange(per, device=qw.device, dtype=torch.int64) * bits).reshape(1, 1, per, 1)
    u = (words >> shifts) & ((1 << bits) - 1)  # (N, nb, per, R)
    q = (u.reshape(N, K_pad) - (1 << (bits - 1)))[:, :K].to(torch.int8)
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
    if x.dim() == 2 and eager_cuda(x):  # eager fast path: no custom-op dispatch (~30 us of host time), and the
        # call's launches replayed where this kind of call was recorded for this weight (``_replay``)
        return _replay.linear(weight, "wna16_linear", (weight.qw, weight.scales, weight.zeros, bias), x, weight.N,
                              lambda out: wna16_linear_triton(x, weight.qw, weight.scales, weight.zeros, bias,
                                                              weight.bits, weight.group_size, weight.N, weight.K,
                                                              out=out))
    lead = x.shape[:-1]
    out = _wna16_linear_op(
        x.reshape(-1, x.shape[-1]), weight.qw, weight.scales, weight.zeros, bias,
        weight.bits, weight.group_size, weight.N, weight.K,
    )
    return out.reshape(*lead, weight.N)
