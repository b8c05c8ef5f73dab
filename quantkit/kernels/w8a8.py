"""W8A8 GEMM: int8 activations x int8 weights -> int32 accumulate -> scaled FP16/BF16 out.

Math (``w8a8_gemm_ref`` is the spec), x: (M, K) fp16/bf16, weight q: (N, K) int8 with
per-output-channel scale w_scale: (N,):

    a_q, a_scale = per_token_quant(x)                 # (M, K) int8, (M, 1) fp32
    acc[m, n]    = sum_k a_q[m, k] * q[n, k]          # exact int32
    out[m, n]    = (acc * a_scale[m] * w_scale[n] + bias[n]).to(x.dtype)   # fp32 epilogue

Layout: ``prepack_w8a8`` keeps the weight as (N, K) row-major int8 -- i.e. K-major, which is
what the int8 tensor-core instructions want for the B operand -- and turns the per-channel
scale into a contiguous fp32 (N,) vector.  Only symmetric weights are accepted.

Paths:

* GEMV (``BACKEND="gemv"``, M <= 16): ``per_token_quant`` once per call into cached buffers, then
  a dp4a GEMV on int32 words of both operands (exact int32, in-kernel split-K);
* tensor cores (``_w8a8_kernel``): a separate ``per_token_quant`` launch, or the quantization in the
  same launch: ``QUANT_ONCE`` (the first programs to arrive quantize x into the scratch by K chunks, the
  others wait, then all run the plain INT8 loop) or ``FUSE_QUANT`` (each tile quantizes its x tiles in
  registers after taking its rows' maxima over all of K: x re-read N/BLOCK_N times, and on an H100 the
  in-register quantization made the loop ~4x slower than the INT8 one; the CPU interpreter's path);
* persistent tensor cores with TMA descriptors (``BACKEND="tma"``, large M on Hopper or newer);
* the Gluon kernel of ``w8a8_gluon`` (``BACKEND="gluon"``, M >= 64 on sm_90): Triton's pipeliner waits for
  every INT8 wgmma, Gluon keeps one in flight (mixed mode too), and with ``WARP_SPECIALIZE`` a plain call walks
  the tiles one program an SM (a loader warp and two MMA warpgroups taking the tiles in turn);
  elsewhere its configs run the tl.dot kernel.

Where the quantization is a launch of its own (the GEMV, the tensor-core kernel, Gluon), a ``PDL`` config on sm_90+
launches the GEMM programmatically: it starts while the quantization runs and waits for it only before reading
its output (``_common.wants_pdl``); the GEMV's ``PREFETCH`` asks L2 for its first weights before that wait.

Every Triton kernel here takes a ``ROW_BITS`` constexpr for the mixed INT8/FP16 mode of
``quantkit.kernels.mixed`` (pruned away when False).

Configs come from a :class:`~quantkit.kernels._common.ConfigCache` keyed by
(M bucket, N, K, GPU): heuristics by default, overridden by ``configs/<gpu>.json`` (measured by
``benchmarks/gemm.py --tune``).
"""

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from . import _common, _replay
from ._common import (ConfigCache, HOPPER_SMEM_PER_BLOCK, LazyKernel, cached_buffer, call_configs, capability,
                      capturing, cdiv, eager_cuda, fast_launch, gemv_tile, gpu_key, grid_dep_launch_dependents,
                      grid_dep_wait, grouped_tile, interpret_mode, jit_helper, l2_prefetch_rows, launch_consts,
                      load_k_tiles, next_pow2, pdl_chains, pdl_option, prefetch_steps, quantize_sym, quantize_sym_rcp,
                      remember, sm_count, spec_key, splitk_arrive, splitk_buffers, splitk_for, splitk_slot, splitk_sum,
                      splitk_sum_rows, sym_scale, tl, use_chained_configs, use_triton, wants_pdl)
from .act_quant import EPS, per_token_quant_ref, per_token_quant_triton


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


@jit_helper
def _tile_rows(rb_ptr, offs_m, rm, M):
    """Mixed mode: the tile's FP16 rows (row bit 0, valid rows only), their count, and whether any valid
    row is INT8 -- what the hoisted per-tile loop bounds read."""
    valid = offs_m < M
    is_fp = ((tl.load(rb_ptr + rm).to(tl.int32) & 1) != 0) & valid
    n_fp = tl.sum(is_fp.to(tl.int32), axis=0)
    n_valid = tl.sum(valid.to(tl.int32), axis=0)
    return is_fp, n_fp, n_fp < n_valid


@jit_helper
def _int8_epilogue(acc, a_scale, w_scale, bias_ptr, rn, HAS_BIAS: tl.constexpr):
    """INT8 rows' output in fp32: acc * a_scale[m] * w_scale[n] (+ bias[n], as an explicit fma), written once
    so the plain, split-K and persistent kernels round alike."""
    if HAS_BIAS:
        return tl.fma(acc.to(tl.float32) * a_scale[:, None], w_scale[None, :],
                      tl.load(bias_ptr + rn).to(tl.float32)[None, :])
    return acc.to(tl.float32) * a_scale[:, None] * w_scale[None, :]


@jit_helper
def _store_fp16_rows(accm, c_ptrs, mask, bias_ptr, rn, HAS_BIAS: tl.constexpr):
    """Mixed mode: FP16 rows' output, their fp32 accumulator (+ bias[n]), stored where ``mask``."""
    if HAS_BIAS:
        accm += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
    tl.store(c_ptrs, accm.to(c_ptrs.dtype.element_ty), mask=mask)


@jit_helper
def _wait_count(ptr, target):
    """Spin until the int32 counter at ``ptr`` reaches ``target`` (acquire: what its releasers wrote is visible)."""
    ready = tl.atomic_add(ptr, 0, sem="acquire")
    while ready < target:
        ready = tl.atomic_add(ptr, 0, sem="acquire")


@jit_helper
def _x_chunk(x_ptr, stride_xm, m0, offs_cm, cols, M, K):
    """QUANT_ONCE: rows m0 + offs_cm of x's columns ``cols``: (rows, in-bounds mask, the (CHUNK_M, CHUNK_K) x values,
    zero outside)."""
    rows = m0 + offs_cm
    inb = (rows[:, None] < M) & (cols[None, :] < K)
    xv = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :], mask=inb, other=0.0)
    return rows, inb, xv


@jit_helper
def _mma_tile(pid, a_ptr, w_ptr, as_ptr, ws_ptr, bias_ptr, c_ptr, part_ptr, lock_ptr, x_ptr, wf_ptr, rb_ptr, M, N, K,
              stride_am, stride_wn, stride_cm, stride_xm, stride_wfn,
              HAS_BIAS: tl.constexpr, ROW_BITS: tl.constexpr, HAS_FP16_W: tl.constexpr, BLOCK_KF: tl.constexpr,
              STAGES_F: tl.constexpr, TMA_F: tl.constexpr, FUSE_QUANT: tl.constexpr, QUANT_ONCE: tl.constexpr,
              OUT_INT32: tl.constexpr, EVEN_K: tl.constexpr, EPS_C: tl.constexpr, SPLIT_K: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """The tl.dot kernel's work on one (BLOCK_M, BLOCK_N) output tile over one K split (``pid``: its index in the
    grid's order, see ``grouped_tile``): the INT8 loop, mixed mode's FP16 loop, split-K and the epilogue."""
    offs_m, offs_n, tile, pid_k = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = offs_m % M  # wrapped rows/cols: loads need no M/N masks, stores are masked
    rn = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + rn[None, :].to(tl.int64) * stride_wn + offs_k[:, None]

    if ROW_BITS:
        is_fp, n_fp, any_i8 = _tile_rows(rb_ptr, offs_m, rm, M)
        k_end = tl.where(any_i8, K, 0)  # hoisted: an all-FP16 tile runs no INT8 iteration
    else:
        k_end = K
    if FUSE_QUANT:  # prologue: per-row amax of this tile's rows (fp16/bf16 x), same math as act_quant
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, k_end, BLOCK_K):
            if EVEN_K:
                xa = tl.load(a_ptrs + k0)
            else:
                xa = tl.load(a_ptrs + k0, mask=(offs_k[None, :] + k0) < K, other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(xa.to(tl.float32)), axis=1))
        a_scale = sym_scale(amax, EPS_C, 127.0)
        a_scale_b = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32) + a_scale[:, None]
        a_rcp_b = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32) + tl.math.div_rn(1.0, a_scale)[:, None]
    elif QUANT_ONCE:  # the shared maxima (past L1: other SMs wrote them)
        a_scale = sym_scale(tl.load(as_ptr + rm, cache_modifier=".cg"), EPS_C, 127.0)
    else:
        a_scale = tl.load(as_ptr + rm)

    n_blocks = tl.cdiv(K, BLOCK_K)
    blocks_per_split = tl.cdiv(n_blocks, SPLIT_K)
    k_lo = pid_k * blocks_per_split * BLOCK_K
    k_hi = tl.minimum(K, k_lo + blocks_per_split * BLOCK_K)
    a_ptrs += k_lo
    w_ptrs += k_lo
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(k_lo, tl.minimum(k_hi, k_end), BLOCK_K):
        a, w = load_k_tiles(a_ptrs, w_ptrs, offs_k, k0, K, EVEN_K)
        if FUSE_QUANT:
            a = quantize_sym_rcp(a.to(tl.float32), a_scale_b, a_rcp_b, 127.0, True).to(tl.int8)
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    # INT8 rows' epilogue is _int8_epilogue on every path (an explicit fma for the bias), so the compiler's
    # contraction choices cannot make the mixed path round differently from the plain one.
    if ROW_BITS:
        # Registers (sm_90a, ptxas, Triton 3.6): with the FP16 loop beside the INT8 one, the 8-warp 128 x 128 tile
        # took 229 per thread against the plain kernel's 127 (one CTA per SM instead of two: +40% at 28672 x 4096,
        # M = 256 on an H100). So INT8 rows leave (to the output, or as split-K partials) before the FP16 loop,
        # the FP16 accumulator starts from the INT8 one's registers (below), the FP16 loop loads through tensor
        # descriptors where it can (TMA_F: no pointer tensors), and _mixed_maxnreg caps the rest: 12-20 B of spills.
        w_sc = tl.load(ws_ptr + rn)
        fp_rows = is_fp[:, None]
        if SPLIT_K > 1:
            # exact int32 partials of INT8 rows; FP16 rows store their fp32 partial's bits after their loop
            tl.store(splitk_slot(part_ptr, tile, pid_k, SPLIT_K, BLOCK_M, BLOCK_N), acc, mask=~fp_rows)
        else:
            out = _int8_epilogue(acc, a_scale, w_sc, bias_ptr, rn, HAS_BIAS)
            tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=c_mask & ~fp_rows)
        # FP16 rows: fp16 tensor-core loop over the same K split (skipped unless the tile has one), over every
        # row of the tile (only FP16 rows are stored from it). Zeros, written as a select on the dead INT8
        # accumulator (n_fp is never negative) so that ptxas gives both wgmma accumulators the same registers
        # (as two zero-initialised tensors they got disjoint ones: 187 registers instead of 161).
        accm = tl.where(n_fp < 0, acc.to(tl.float32), 0.0)
        if TMA_F:
            if n_fp > 0:
                m0 = tl.min(offs_m, axis=0)
                n0 = tl.min(offs_n, axis=0)
                x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1],
                                                   block_shape=[BLOCK_M, BLOCK_KF])
                wf_desc = tl.make_tensor_descriptor(wf_ptr, shape=[N, K], strides=[stride_wfn, 1],
                                                    block_shape=[BLOCK_N, BLOCK_KF])
                for k0 in tl.range(k_lo, k_hi, BLOCK_KF, num_stages=STAGES_F):
                    xf = x_desc.load([m0, k0])
                    wt = wf_desc.load([n0, k0])
                    accm = tl.dot(xf, wt.to(x_ptr.dtype.element_ty).T, accm)
        else:
            offs_kf = tl.arange(0, BLOCK_KF)
            xf_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + offs_kf[None, :] + k_lo
            wf_ptrs = wf_ptr + rn[None, :].to(tl.int64) * stride_wfn + offs_kf[:, None] + k_lo
            for k0 in tl.range(k_lo, tl.where(n_fp > 0, k_hi, k_lo), BLOCK_KF, num_stages=STAGES_F):
                xf, wt = load_k_tiles(xf_ptrs, wf_ptrs, offs_kf, k0, k_hi, EVEN_K)
                accm = tl.dot(xf, wt.to(x_ptr.dtype.element_ty), accm)
                xf_ptrs += BLOCK_KF
                wf_ptrs += BLOCK_KF
        if not HAS_FP16_W:
            accm = accm * w_sc[None, :]
        if SPLIT_K > 1:
            tl.store(splitk_slot(part_ptr, tile, pid_k, SPLIT_K, BLOCK_M, BLOCK_N), accm.to(tl.int32, bitcast=True),
                     mask=fp_rows)
            # the split that arrives last sums every split's partials: INT8 rows, then FP16 rows (one total live)
            if splitk_arrive(lock_ptr, tile, SPLIT_K):
                tot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
                for sk in tl.static_range(SPLIT_K):
                    tot += tl.load(splitk_slot(part_ptr, tile, sk, SPLIT_K, BLOCK_M, BLOCK_N), mask=~fp_rows, other=0)
                out = _int8_epilogue(tot, a_scale, w_sc, bias_ptr, rn, HAS_BIAS)
                tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=c_mask & ~fp_rows)
                accm = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for sk in tl.static_range(SPLIT_K):
                    accm += tl.load(splitk_slot(part_ptr, tile, sk, SPLIT_K, BLOCK_M, BLOCK_N), mask=fp_rows,
                                    other=0).to(tl.float32, bitcast=True)
                _store_fp16_rows(accm, c_ptrs, c_mask & fp_rows, bias_ptr, rn, HAS_BIAS)
                tl.atomic_xchg(lock_ptr + tile, 0)
        else:
            _store_fp16_rows(accm, c_ptrs, c_mask & fp_rows, bias_ptr, rn, HAS_BIAS)
    else:
        # split-K in one launch: exact int32 partials; the split that arrives last sums them
        if SPLIT_K > 1:
            acc, last = splitk_sum(acc, part_ptr, lock_ptr, tile, pid_k, SPLIT_K, BLOCK_M, BLOCK_N)
            c_mask = tl.where(last, c_mask, False)
        if OUT_INT32:
            tl.store(c_ptrs, acc, mask=c_mask)
        else:
            out = _int8_epilogue(acc, a_scale, tl.load(ws_ptr + rn), bias_ptr, rn, HAS_BIAS)
            tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=c_mask)


def _w8a8_kernel(
    a_ptr, w_ptr, as_ptr, ws_ptr, bias_ptr, c_ptr, part_ptr, lock_ptr, x_ptr, wf_ptr, rb_ptr, sync_ptr,
    # a: (M, K) int8, or fp16/bf16 when FUSE_QUANT; w: (N, K) int8; as: (M,) fp32; ws: (N,) fp32
    # bias: (N,); c: (M, N) out dtype (int32 when OUT_INT32)
    # part: int32 split-K workspace (tiles * SPLIT_K * BLOCK_M * BLOCK_N); lock: int32 (tiles,), zero
    # ROW_BITS: x: (M, K) fp16/bf16; wf: (N, K) fp16 copy or the int8 weight; rb: (M,) uint8
    # QUANT_ONCE: a: the (M, K) int8 scratch it fills; as: fp32 (M,) row maxima, zero; sync: int32 (4,), zero
    # (tickets, K chunks' maxima in, K chunks quantized, programs done); the last program to finish resets both
    M, N, K,
    stride_am, stride_wn, stride_cm, stride_xm, stride_wfn,
    N_PROD,  # QUANT_ONCE: programs that quantize K chunks (the first to arrive)
    HAS_BIAS: tl.constexpr,
    ROW_BITS: tl.constexpr,  # mixed mode: per-row INT8 / FP16, branches hoisted per tile
    HAS_FP16_W: tl.constexpr,
    BLOCK_KF: tl.constexpr,  # K step of the FP16 loop
    STAGES_F: tl.constexpr,  # pipeline depth of the FP16 loop (Triton reuses the INT8 loop's buffers for it)
    TMA_F: tl.constexpr,  # the FP16 loop loads through tensor descriptors (Hopper; aligned x and wf)
    FUSE_QUANT: tl.constexpr,
    QUANT_ONCE: tl.constexpr,  # x quantized into the scratch once per launch by the first programs (see below)
    CHUNK_K: tl.constexpr,  # QUANT_ONCE: K elements per chunk
    CHUNK_M: tl.constexpr,  # QUANT_ONCE: rows per step of a chunk
    OUT_INT32: tl.constexpr,
    EVEN_K: tl.constexpr,
    EPS_C: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PDL: tl.constexpr,  # launched programmatically after the quantization: wait for it before reading a and as
):
    """Tensor-core W8A8 GEMM: one (BLOCK_M, BLOCK_N) output tile over one K split (see module docstring).

    QUANT_ONCE (one launch): the activation quantization of the separate launch, done by the first programs to
    arrive. A program's work is picked by its arrival ticket, not its program id: the first N_PROD arrivals take
    K chunks (all rows, CHUNK_K columns): the chunks' row maxima into ``as`` with an atomic max, a wait until
    every chunk's maxima are in, then the chunks quantized into the int8 scratch ``a`` with the final maxima;
    every program waits until all chunks are quantized and runs the plain INT8 loop on the scratch. The
    producers are running (they drew tickets), so no wait depends on a program not yet started, whatever order
    the GPU starts them in. Scales and integers are act_quant's (a maximum is exact in any order). (The second
    form quantized in FUSE_QUANT's loop instead of the scratch: 4x slower on an H100, BENCHMARKS.md.)"""
    if QUANT_ONCE:
        pid = tl.atomic_add(sync_ptr, 1, sem="relaxed")
        n_chunks = tl.cdiv(K, CHUNK_K)
        if pid < N_PROD:
            offs_cm = tl.arange(0, CHUNK_M)
            offs_ck = tl.arange(0, CHUNK_K)
            for ch in range(pid, n_chunks, N_PROD):
                cols = ch * CHUNK_K + offs_ck
                for m0 in range(0, M, CHUNK_M):
                    rows, inb, xv = _x_chunk(x_ptr, stride_xm, m0, offs_cm, cols, M, K)
                    # abs and max are exact in x's own format
                    tl.atomic_max(as_ptr + rows, tl.max(tl.abs(xv), axis=1).to(tl.float32), mask=rows < M,
                                  sem="relaxed")
                tl.debug_barrier()  # every thread's maxima come before the (one-thread) release
                tl.atomic_add(sync_ptr + 1, 1, sem="release")
            _wait_count(sync_ptr + 1, n_chunks)
            for ch in range(pid, n_chunks, N_PROD):
                cols = ch * CHUNK_K + offs_ck
                for m0 in range(0, M, CHUNK_M):
                    rows, inb, xv = _x_chunk(x_ptr, stride_xm, m0, offs_cm, cols, M, K)
                    # the final maxima (past L1: other SMs wrote them); act_quant's scale and rounding
                    sc = sym_scale(tl.load(as_ptr + rows, mask=rows < M, other=0.0, cache_modifier=".cg"), EPS_C,
                                   127.0)
                    zero = tl.zeros([CHUNK_M, CHUNK_K], dtype=tl.float32)
                    qv = quantize_sym_rcp(xv.to(tl.float32), zero + sc[:, None],
                                          zero + tl.math.div_rn(1.0, sc)[:, None], 127.0, True)
                    tl.store(a_ptr + rows[:, None].to(tl.int64) * stride_am + cols[None, :], qv.to(tl.int8), mask=inb)
                tl.debug_barrier()  # every thread's stores come before the (one-thread) release
                tl.atomic_add(sync_ptr + 2, 1, sem="release")
        _wait_count(sync_ptr + 2, n_chunks)
    else:
        pid = tl.program_id(0)
        if PDL:
            grid_dep_wait()
    _mma_tile(pid, a_ptr, w_ptr, as_ptr, ws_ptr, bias_ptr, c_ptr, part_ptr, lock_ptr, x_ptr, wf_ptr, rb_ptr,
              M, N, K, stride_am, stride_wn, stride_cm, stride_xm, stride_wfn,
              HAS_BIAS, ROW_BITS, HAS_FP16_W, BLOCK_KF, STAGES_F, TMA_F, FUSE_QUANT, QUANT_ONCE,
              OUT_INT32, EVEN_K, EPS_C, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    if QUANT_ONCE:  # the last program to finish resets maxima and counters for the next launch (or graph replay)
        if tl.atomic_add(sync_ptr + 3, 1, sem="acq_rel") == tl.num_programs(0) - 1:
            for m0 in range(0, M, CHUNK_M):
                tl.store(as_ptr + m0 + tl.arange(0, CHUNK_M), tl.zeros([CHUNK_M], dtype=tl.float32),
                         mask=m0 + tl.arange(0, CHUNK_M) < M)
            tl.atomic_xchg(sync_ptr, 0)
            tl.atomic_xchg(sync_ptr + 1, 0)
            tl.atomic_xchg(sync_ptr + 2, 0)
            tl.atomic_xchg(sync_ptr + 3, 0)


w8a8_kernel = LazyKernel(_w8a8_kernel)


def _w8a8_tma_kernel(
    a_ptr, w_ptr, as_ptr, ws_ptr, bias_ptr, c_ptr, x_ptr, wf_ptr, rb_ptr,
    # a: (M, K) int8 (quantized activations); w: (N, K) int8; as: (M,) fp32; ws: (N,) fp32; bias: (N,)
    # c: (M, N) fp16/bf16; all contiguous, K % 16 == 0 and N * c.element_size() % 16 == 0 (TMA strides)
    # ROW_BITS only: x: (M, K) fp16/bf16; wf: (N, K) fp16/bf16 copy or the int8 weight; rb: (M,) uint8
    M, N, K,
    NUM_PROGS,  # the persistent grid: min(SMs, tiles) programs, each walking the tiles NUM_PROGS apart
    HAS_BIAS: tl.constexpr,
    ROW_BITS: tl.constexpr,  # mixed mode: per-row INT8 / FP16, each K loop skipped by a tile that needs none
    HAS_FP16_W: tl.constexpr,
    BLOCK_KF: tl.constexpr,  # K step of the FP16 loop
    STAGES_F: tl.constexpr,  # its pipeline depth
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    LOOP_STAGES: tl.constexpr,
):
    """Persistent tensor-core W8A8 GEMM for large M (``BACKEND="tma"``): NUM_PROGS programs stride over the
    output tiles (GROUP_M-grouped order), A and W tiles come through TMA tensor descriptors (out-of-range
    rows/columns read as 0, stores clipped), the epilogue is the plain kernel's (same formulas).  With ROW_BITS
    (the runtime's bitmask) a tile runs the INT8 loop unless all its rows are FP16 and the FP16 loop (x and the
    FP16 weight through descriptors too) only if one is: a tile with no FP16 row costs one load of its row bits."""
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    if ROW_BITS:
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_KF])
        wf_desc = tl.make_tensor_descriptor(wf_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_KF])
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGS):
        first_m = tile // in_group * GROUP_M  # grouped order, as grouped_tile (tiles sharing A rows run together)
        group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
        m0 = (first_m + (tile % in_group) % group_m) * BLOCK_M
        n0 = (tile % in_group) // group_m * BLOCK_N
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        rm = offs_m % M
        rn = offs_n % N
        if ROW_BITS:
            is_fp, n_fp, any_i8 = _tile_rows(rb_ptr, offs_m, rm, M)
            k_end = tl.where(any_i8, K, 0)  # an all-FP16 tile runs no INT8 iteration
        else:
            k_end = K
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in tl.range(0, k_end, BLOCK_K, num_stages=LOOP_STAGES):
            a = a_desc.load([m0, k0])
            w = w_desc.load([n0, k0])
            acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)
        w_sc = tl.load(ws_ptr + rn)
        out = _int8_epilogue(acc, tl.load(as_ptr + rm), w_sc, bias_ptr, rn, HAS_BIAS)
        if ROW_BITS:
            # FP16 rows (INT8 rows' activations zeroed, so they add nothing); INT8 rows keep the epilogue above,
            # bit-identical to the plain path
            accm = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in tl.range(0, tl.where(n_fp > 0, K, 0), BLOCK_KF, num_stages=STAGES_F):
                xf = x_desc.load([m0, k0])
                wt = wf_desc.load([n0, k0])
                xf = tl.where(is_fp[:, None], xf, tl.zeros_like(xf))
                accm = tl.dot(xf, wt.to(x_ptr.dtype.element_ty).T, accm)
            if not HAS_FP16_W:
                accm = accm * w_sc[None, :]
            if HAS_BIAS:
                accm += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
            out = tl.where(is_fp[:, None], accm, out)
        c_desc.store([m0, n0], out.to(c_ptr.dtype.element_ty))


w8a8_tma_kernel = LazyKernel(_w8a8_tma_kernel)


def _w8a8_gemv_kernel(
    a_ptr, as_ptr, w_ptr, ws_ptr, bias_ptr, c_ptr, part_ptr, lock_ptr, x_ptr, wf_ptr, rb_ptr,
    # a: the (M, K) int8 quantized activations viewed as int32 words (M, K // 4); as: (M,) fp32
    # w: the (N, K) int8 weight viewed as int32 words (N, K // 4); ws: (N,) fp32; c: (M, N)
    # part: int32 split-K workspace; lock: int32 (tiles,), zero
    # ROW_BITS only (mixed INT8/FP16 rows): x: (M, K) fp16/bf16; wf: (N, K) fp16 copy or the int8 weight;
    # rb: (M,) uint8, bit 0 = FP16 row
    M, N, KW,  # KW = K // 4 (words)
    stride_am, stride_wn, stride_cm,  # a, w strides in words
    stride_xm, stride_wfn,
    HAS_BIAS: tl.constexpr,
    ROW_BITS: tl.constexpr,  # mixed mode: per-row INT8 / FP16 (hoisted per-tile branches)
    HAS_FP16_W: tl.constexpr,  # wf is an fp16/bf16 copy (else the int8 weight, scaled by ws)
    EVEN_K: tl.constexpr,  # KW % BC == 0
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BC: tl.constexpr,  # words of K per iteration (BLOCK_K // 4)
    USE_DP4A: tl.constexpr,  # dp4a.s32.s32 (compiled); shifts + multiplies (interpreter)
    FUSE_QUANT: tl.constexpr,  # a is x itself (fp16/bf16, stride_am in elements): per-token quantization in here
    EPS_C: tl.constexpr,
    AMAX_K: tl.constexpr,  # FUSE_QUANT: elements per step of the row-max prologue
    LOAD_STAGES: tl.constexpr,  # > 1: the INT8 loop's loads pipelined (cp.async into a ring of this many steps)
    PDL: tl.constexpr,  # launched programmatically after the quantization: wait for it before reading a and as
    PREFETCH: tl.constexpr,  # PDL: this many iterations' weight lines asked of L2 before the wait (0: none)
    CHAIN: tl.constexpr,  # PDL_CHAIN: the next launch (the next call's quantization, programmatic) may start now
):
    """GEMV-style W8A8 for M <= BLOCK_M <= 16 on activations quantized once per call.

    Both operands are read as int32 words of 4 int8 values along K; one ``dp4a`` per word pair
    accumulates the 4 products exactly in int32 (elementwise, one cross-thread reduction at the
    end).  Split-K partials are int32 (exact) and reduced in-kernel by the last split.

    FUSE_QUANT (one launch): every program takes the absmax of its rows over all of K, then
    quantizes its K slice as it goes (the act_quant math, so the integers are the same) and packs
    4 of them into a word; x is re-read from L2 by each N tile, which pays for small M only."""
    if CHAIN:
        grid_dep_launch_dependents()
    tile, pid_k, offs_n, _ = gemv_tile(N, BLOCK_N)
    rn = offs_n % N
    offs_m = tl.arange(0, BLOCK_M)
    rm = offs_m % M
    offs_c = tl.arange(0, BC)

    n_it = tl.cdiv(KW, BC)
    per_split = tl.cdiv(n_it, SPLIT_K)
    i_lo = pid_k * per_split
    i_hi = tl.minimum(n_it, i_lo + per_split)
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + offs_c[None, :]  # (BLOCK_N, BC) words
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + offs_c[None, :]  # (BLOCK_M, BC) words
    if ROW_BITS:
        is_fp, n_fp, any_i8 = _tile_rows(rb_ptr, offs_m, rm, M)
        i_hi_i8 = tl.where(any_i8, i_hi, i_lo)  # hoisted: an all-FP16 tile runs no INT8 iteration
    else:
        i_hi_i8 = i_hi
    if FUSE_QUANT:
        offs_e = tl.arange(0, 4)
        # row max in AMAX_K-element steps (few, wide loads: the prologue is on every program's critical path)
        offs_x = tl.arange(0, AMAX_K)
        xr_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + offs_x[None, :]  # (BLOCK_M, AMAX_K) elements
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, KW * 4, AMAX_K):
            xa = tl.load(xr_ptrs + k0, mask=(k0 + offs_x[None, :]) < KW * 4, other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(xa.to(tl.float32)), axis=1))
        a_qs = sym_scale(amax, EPS_C, 127.0)  # (BLOCK_M,)
        a_qs3 = tl.zeros((BLOCK_M, BC, 4), dtype=tl.float32) + a_qs[:, None, None]
        x3_ptrs = (a_ptr + rm[:, None, None].to(tl.int64) * stride_am + offs_c[None, :, None] * 4
                   + offs_e[None, None, :])  # (BLOCK_M, BC, 4)
        shifts = (offs_e * 8)[None, None, :]
    if BLOCK_M == 1:  # decode: 2-D tensors only
        acc = tl.zeros((BLOCK_N, BC), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N, BC), dtype=tl.int32)
    if PDL:  # everything above overlapped the quantization's launch; a and as are its output
        if PREFETCH > 0:  # the weights do not depend on it: start streaming the first ones now
            l2_prefetch_rows(w_ptr, rn, N, stride_wn, i_lo * BC, tl.minimum(i_hi_i8 * BC, KW), PREFETCH * BC,
                             32)
        grid_dep_wait()
    for it in tl.range(i_lo, i_hi_i8, num_stages=LOAD_STAGES):
        if EVEN_K:
            wd = tl.load(w_ptrs + it * BC)
        else:
            kmask = (it * BC + offs_c[None, :]) < KW
            wd = tl.load(w_ptrs + it * BC, mask=kmask, other=0)
        if FUSE_QUANT:
            if EVEN_K:
                xv = tl.load(x3_ptrs + it * BC * 4)
            else:
                xv = tl.load(x3_ptrs + it * BC * 4, mask=(it * BC + offs_c[None, :, None]) < KW, other=0.0)
            # a division an element: a thread quantizes about one x element an iteration here, so a per-row
            # reciprocal (quantize_sym_rcp) would cost more than it saves (sm_90a SASS: 576 vs 560 instructions)
            qv = quantize_sym(xv.to(tl.float32), a_qs3, 127.0).to(tl.int32)
            ad = tl.sum((qv & 0xFF) << shifts, axis=2)  # (BLOCK_M, BC): 4 int8 per word, byte j = k 4c+j
        elif EVEN_K:
            ad = tl.load(a_ptrs + it * BC)
        else:
            ad = tl.load(a_ptrs + it * BC, mask=kmask, other=0)
        if BLOCK_M == 1:
            wb = wd
            ab = ad
        else:
            wb = wd[None, :, :]
            ab = ad[:, None, :]
        if USE_DP4A:
            acc = tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [wb, ab, acc],
                                            dtype=tl.int32, is_pure=True, pack=1)
        else:
            for j in tl.static_range(4):
                acc += ((wb << (24 - 8 * j)) >> 24) * ((ab << (24 - 8 * j)) >> 24)
    if BLOCK_M == 1:
        tot = tl.sum(acc, axis=1)[None, :]  # (1, BLOCK_N)
    else:
        tot = tl.sum(acc, axis=2)  # (BLOCK_M, BLOCK_N)
    if FUSE_QUANT:
        a_sc = a_qs
    else:
        a_sc = tl.load(as_ptr + rm)
    w_sc = tl.load(ws_ptr + rn)

    if ROW_BITS:
        # FP16 rows: elementwise fp32 FMA over the same K split, in BC-element steps
        i_hi_f = tl.where(n_fp > 0, i_hi, i_lo)
        x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + offs_c[None, :]  # (BLOCK_M, BC)
        wf_ptrs = wf_ptr + rn[:, None].to(tl.int64) * stride_wfn + offs_c[None, :]  # (BLOCK_N, BC)
        if BLOCK_M == 1:
            accf = tl.zeros((BLOCK_N, BC), dtype=tl.float32)
        else:
            accf = tl.zeros((BLOCK_M, BLOCK_N, BC), dtype=tl.float32)
        for it in range(i_lo * 4, i_hi_f * 4):
            kmask = (it * BC + offs_c[None, :]) < KW * 4
            wt = tl.load(wf_ptrs + it * BC, mask=kmask, other=0).to(tl.float32)
            xt = tl.load(x_ptrs + it * BC, mask=kmask, other=0).to(tl.float32)
            if BLOCK_M == 1:
                accf += xt * wt
            else:
                accf += xt[:, None, :] * wt[None, :, :]
        if BLOCK_M == 1:
            totf = tl.sum(accf, axis=1)[None, :]
        else:
            totf = tl.sum(accf, axis=2)
        if not HAS_FP16_W:
            totf = totf * w_sc[None, :]

    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K > 1:
        if ROW_BITS:
            tot, totf, last = splitk_sum_rows(tot, totf, is_fp, part_ptr, lock_ptr, tile, pid_k, SPLIT_K, BLOCK_M,
                                              BLOCK_N)
        else:
            tot, last = splitk_sum(tot, part_ptr, lock_ptr, tile, pid_k, SPLIT_K, BLOCK_M, BLOCK_N)
        c_mask = tl.where(last, c_mask, False)
    # the INT8 rows' epilogue in one form for both modes (explicit fma for the bias: see _w8a8_kernel)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn).to(tl.float32)[None, :]
        out = tl.fma(tot.to(tl.float32) * a_sc[:, None], w_sc[None, :], bias)
        if ROW_BITS:
            out = tl.where(is_fp[:, None], totf + bias, out)
    else:
        out = tot.to(tl.float32) * a_sc[:, None] * w_sc[None, :]
        if ROW_BITS:
            out = tl.where(is_fp[:, None], totf, out)
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=c_mask)


w8a8_gemv_kernel = LazyKernel(_w8a8_gemv_kernel)


GEMV_MAX_M = 16  # the dp4a GEMV keeps BLOCK_M x BLOCK_N x BC int32 partials in registers:
# keep BLOCK_M * BLOCK_N * BLOCK_K / 4 <= 32 * (32 * num_warps) (e.g. M=16: BLOCK_N=32, BLOCK_K=64, 8 warps)


def _default_config(M: int, N: int, K: int) -> dict:
    """Heuristics; the measured configs (configs/<gpu>.json) override them.  BACKEND "gemv" (M <= 8, fused quant) or "mma"."""
    if M <= 4 and K % 4 == 0:
        bn = 64
        return dict(BACKEND="gemv", BLOCK_N=bn, BLOCK_K=256, SPLIT_K=splitk_for(cdiv(N, bn), cdiv(K, 256)),
                    num_warps=8, num_stages=2)
    if M <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=4, FUSE_QUANT=False,
                    SPLIT_K=splitk_for(cdiv(N, 64), cdiv(K, 256)))
    if M <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4, FUSE_QUANT=False)
    if M <= 256:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4, FUSE_QUANT=False)
    return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3, FUSE_QUANT=False)


# measured configs: quantkit/kernels/configs/<gpu>.json (benchmarks/gemm.py --tune writes them)
CONFIGS = ConfigCache(_default_config, "w8a8")

_INTERP_CFG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)


_LAUNCH_PLANS: dict = {}


def _launch(a, a_scale, w, w_scale, bias, out, fuse_quant, out_int32, cfg, x=None, row_bits=None, w_fp16=None,
            quant_once=False, pdl=False):
    """The tl.dot kernel. ``quant_once``: ``a`` is the int8 scratch the launch fills from ``x`` (``a_scale``
    unused: the plan's row-maximum buffer takes its place).  ``pdl``: launched programmatically (see
    ``_common.wants_pdl``), right after the launch that wrote ``a`` and ``a_scale``."""
    M, K = a.shape
    N = w.shape[0]
    rbits = row_bits is not None
    xx = x if x is not None else a
    wf = w_fp16 if w_fp16 is not None else w
    tma_f = rbits and _fp16_loop_tma(cfg, xx, wf)
    pkey = (tuple(cfg.items()), M, N, K, a.get_device(), bias is not None, rbits, w_fp16 is not None, fuse_quant,
            out_int32, quant_once, tma_f, interpret_mode(), pdl)
    grid, part, lock, sync, n_prod, amax, const, ckey = (
        _LAUNCH_PLANS.get(pkey) or remember(_LAUNCH_PLANS, pkey, _launch_plan(cfg, M, N, K, a.device, pkey[5:])))
    if quant_once:
        a_scale = amax
    if tma_f and not interpret_mode():
        _tma_allocator()
    vary = (a, w, a_scale if a_scale is not None else w_scale, w_scale, bias if bias is not None else w_scale, out)
    tail = (xx, wf, row_bits if rbits else w_scale)
    strides = (a.stride(0), w.stride(0), out.stride(0), xx.stride(0), wf.stride(0))
    # the plan's key fixes the classes of part, lock and sync (cached buffers: aligned, one dtype each) and of
    # M, N, K, n_prod (in ckey): left out of the specialization key
    fast_launch(w8a8_kernel, grid, (*vary, part, lock, *tail, sync, M, N, K, *strides, n_prod), const, ckey,
                (*vary, *tail, *strides))
    return out


def _launch_plan(cfg, M, N, K, device, flags):
    """What ``_launch`` derives from its config, shape and flags alone: grid, buffers, constexprs (memoised)."""
    has_bias, rbits, has_fp16_w, fuse_quant, out_int32, quant_once, tma_f, interp, pdl = flags
    tiles = cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"])
    split_k = int(cfg.get("SPLIT_K", 1))
    part, lock = splitk_buffers(device, tiles, split_k, cfg["BLOCK_M"] * cfg["BLOCK_N"], 0)
    # QUANT_ONCE: a K chunk per producer; in the interpreter (programs run one after another) program 0 does all
    n_prod = (1 if interp else min(cdiv(K, _ONCE_CHUNK_K), tiles * split_k)) if quant_once else 1
    sync = once_counters(device) if quant_once else lock
    amax = _once_maxima(device, M) if quant_once else None
    const, ckey = launch_consts(HAS_BIAS=has_bias, ROW_BITS=rbits, HAS_FP16_W=has_fp16_w,
                                BLOCK_KF=_block_kf(cfg) if rbits else 16,
                                STAGES_F=(_desc_stages_f(cfg) if tma_f else _stages_f(cfg)) if rbits else 1,
                                TMA_F=tma_f, FUSE_QUANT=fuse_quant, QUANT_ONCE=quant_once,
                                CHUNK_K=_ONCE_CHUNK_K if quant_once else 16,
                                CHUNK_M=min(16, next_pow2(M)) if quant_once else 1,
                                OUT_INT32=out_int32,
                                EVEN_K=(K % cfg["BLOCK_K"] == 0), EPS_C=EPS, SPLIT_K=split_k,
                                BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                                GROUP_M=cfg["GROUP_M"], PDL=pdl, num_warps=cfg["num_warps"],
                                num_stages=cfg["num_stages"], maxnreg=_mixed_maxnreg(cfg) if rbits else None,
                                **pdl_option(pdl))
    programs = tiles * split_k
    return (programs,), part, lock, sync, n_prod, amax, const, (ckey, spec_key((M, N, K, n_prod)))


def _mixed_maxnreg(cfg: dict) -> Optional[int]:
    """Register cap of the tl.dot kernel in mixed mode: a config's MAXNREG (0: none), else 128 where the plain
    kernel runs two 8-warp CTAs per SM (its shared memory fits twice, its accumulator is at most 64 registers a
    thread), so that mixed mode keeps that occupancy (see the kernel's ROW_BITS epilogue). No cap elsewhere:
    4-warp tiles keep two CTAs below 255 registers, and a wider accumulator cannot build under 128."""
    if "MAXNREG" in cfg:
        return int(cfg["MAXNREG"]) or None
    smem = cfg["num_stages"] * (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"]  # the INT8 loop's buffers
    acc_regs = cfg["BLOCK_M"] * cfg["BLOCK_N"] // (32 * cfg["num_warps"])
    return 128 if cfg["num_warps"] == 8 and acc_regs <= 64 and 2 * smem <= HOPPER_SMEM_PER_BLOCK else None


def _fp16_loop_tma(cfg: dict, x: torch.Tensor, wf: torch.Tensor) -> bool:
    """Mixed mode: may the FP16 loop load x and the FP16 (or int8) weight through tensor descriptors? A config's
    TMA_F decides (the tests force it in the interpreter), else: on Hopper or newer, where the register cap
    applies (there it saves the pointer tensors' registers: +4.4 us over plain W8A8 instead of +18.5 at
    28672 x 4096, M = 256, H100; uncapped tiles were 1.6-1.8 us slower with it). Both operands need TMA's
    alignment (16-byte base and row stride, unit column stride)."""
    want = cfg.get("TMA_F")
    if want is None:
        want = x.is_cuda and _has_tma(x.get_device()) and _mixed_maxnreg(cfg) is not None
    return bool(want) and all(t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0
                              for t in (x, wf))


def _mma_only(cfg, x, M, N, K):
    """The tensor-core config to use where the GEMV (or the persistent TMA) path does not apply."""
    if cfg.get("BACKEND") not in ("gemv", "tma", "gluon"):
        return cfg
    if not x.is_cuda:
        return dict(_INTERP_CFG, FUSE_QUANT=M <= 16)
    # FUSE_QUANT off on a GPU: its loop (x quantized in registers) ran ~4x slower than two launches on an H100
    return _default_config(max(M, 5), N, K)


def tma_applies(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, row_bits: Optional[torch.Tensor] = None,
                w_fp16: Optional[torch.Tensor] = None) -> bool:
    """Whether the persistent TMA kernel can run: Hopper or newer (or the interpreter), and the row strides
    and base addresses TMA descriptors need (16-byte aligned; the operands contiguous; in mixed mode also the
    row bits and the FP16 weight)."""
    ops = [t for t in (a, w, out, row_bits, w_fp16) if t is not None]
    if not all(t.is_contiguous() for t in ops):
        return False
    if a.shape[1] % 16 or (out.shape[1] * out.element_size()) % 16:
        return False
    if any(t.data_ptr() % 16 for t in (a, w, out, w_fp16) if t is not None):
        return False
    return interpret_mode() or (a.is_cuda and _has_tma(a.get_device()))


def _has_tma(index: int) -> bool:
    return capability(index) >= (9, 0)


@functools.lru_cache(maxsize=None)
def _tma_allocator() -> None:
    """Device-side tensor descriptors need global scratch memory from an allocator Triton calls at launch
    (set once per process; the interpreter needs none)."""
    import triton

    def alloc(size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device="cuda")

    triton.set_allocator(alloc)


def _launch_tma(a_q, a_scale, w, w_scale, bias, out, cfg, x=None, row_bits=None, w_fp16=None):
    """The persistent TMA GEMM on quantized activations a_q (M, K) int8 with a_scale (M,) fp32 (``row_bits``:
    mixed mode, FP16 rows from x on ``w_fp16`` or on the int8 weight scaled per channel)."""
    M, K = a_q.shape
    N = w.shape[0]
    if not interpret_mode():
        _tma_allocator()
    tiles = cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"])
    slots = 4 if interpret_mode() else sm_count(a_q.device)
    progs = min(tiles, slots)
    rbits = row_bits is not None
    wf = w_fp16 if w_fp16 is not None else w
    _common.record(None)  # launched through the JIT: a replay cannot repeat it
    w8a8_tma_kernel[(progs,)](
        a_q, w, a_scale, w_scale, bias if bias is not None else w_scale, out,
        x if rbits else a_q, wf, row_bits if rbits else w_scale, M, N, K, progs,
        HAS_BIAS=bias is not None, ROW_BITS=rbits, HAS_FP16_W=w_fp16 is not None,
        BLOCK_KF=_block_kf(cfg) if rbits else 16, STAGES_F=_desc_stages_f(cfg) if rbits else 1,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"], LOOP_STAGES=cfg["num_stages"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return out


def _scratch(x: torch.Tensor):
    """This device's cached activation scratch for x (M, K) (no allocation per call once warm; reuse is ordered
    by the stream, see ``cached_buffer``): (a_q (M, K) int8, a_scale (M,) fp32, a_q as int32 words (the GEMV's
    view; K % 4 == 0 only, else None)) views."""
    M, K = x.shape
    key = (x.get_device(), M, K)  # an int: a torch.device costs more to make and hash
    # memoised: slicing and viewing cost more host time than the launch's own wrapper
    return _SCRATCH_VIEWS.get(key) or remember(_SCRATCH_VIEWS, key, _scratch_views(x.device, M, K))


def _scratch_views(device, M: int, K: int) -> tuple:
    a_q = cached_buffer(device, torch.int8, M * K, tag="act_q")[: M * K].view(M, K)
    return a_q, cached_buffer(device, torch.float32, M, tag="act_s")[:M], a_q.view(torch.int32) if K % 4 == 0 else None


def _quantize_into_scratch(x: torch.Tensor, pdl: bool = False, chain: bool = False):
    """Per-token quantization of x (M, K) into the activation scratch: :func:`_scratch`'s views. ``pdl``: the
    consumer is launched programmatically next, so this launch triggers it, and is programmatic itself where
    ``_common.first_waits`` says (``chain``: the config's ``PDL_CHAIN``; the GEMV before it reads the same
    scratch)."""
    views = _scratch(x)
    per_token_quant_triton(x, out_q=views[0], out_s=views[1], trigger_dependents=pdl,
                           wait_prior=_common.first_waits(chain, pdl), into_scratch=True)
    return views


_SCRATCH_VIEWS: dict = {}  # (device, M, K) -> views of the cached buffers (one that grew later stays valid: _RETIRED)


_ONCE_CHUNK_K = 256  # QUANT_ONCE: K columns per chunk (4096-wide rows: 16 programs take them)


def once_counters(device) -> torch.Tensor:
    """The ``QUANT_ONCE`` launches' int32 counters (tickets, K chunks' maxima in, K chunks quantized, programs
    done) on ``device``: zero between launches (each launch's last program resets them)."""
    return cached_buffer(device, torch.int32, 4, zero=True, tag="w8a8_once")


def _once_maxima(device, M: int) -> torch.Tensor:
    """The fp32 (M,) row maxima a ``QUANT_ONCE`` launch gathers (per device, zero between launches)."""
    return cached_buffer(device, torch.float32, M, zero=True, tag="w8a8_once_amax")[:M]


def _gluon_launch(a_q, a_scale, w, w_scale, bias, out, cfg, row_bits=None, x=None, w_fp16=None, pdl=False) -> bool:
    """The Gluon kernel (``BACKEND="gluon"``: INT8 wgmmas kept in flight, sm_90 only) on quantized activations,
    if it applies here; False: the caller runs the tl.dot kernel.  ``row_bits``: mixed mode, FP16 rows from ``x``
    on ``w_fp16`` (or on ``w`` scaled per channel) in the same launch.  ``pdl``: launched programmatically right
    after the quantization (``_common.wants_pdl``)."""
    from quantkit.kernels import w8a8_gluon

    if not w8a8_gluon.applies(a_q, w, out, cfg):
        return False
    if row_bits is not None and not w8a8_gluon.applies_mixed(x, w_fp16, out, cfg):
        return False
    w8a8_gluon.launch(a_q, a_scale, w, w_scale, bias, out, cfg, row_bits, x, w_fp16, pdl)
    return True


def _block_kf(cfg: dict) -> int:
    """The FP16 loop's K step in mixed mode: a config's BLOCK_KF, else half its INT8 step (same bytes per tile)."""
    return cfg.get("BLOCK_KF", max(16, cfg["BLOCK_K"] // 2))


def _stages_f(cfg: dict) -> int:
    return cfg.get("STAGES_F", cfg["num_stages"])


def _desc_stages_f(cfg: dict) -> int:
    """Depth of an FP16 loop fed by tensor descriptors (the persistent kernel's, and the tl.dot kernel's with
    TMA_F): at most 2 outside the measured-right case. On an H100 (Triton 3.6; 4096 x 4096, M = 512, every row
    FP16: benchmarks/results/mixed-h100-2026-12-06-s35/tma-mixed.log) depth 3 in the persistent kernel wrote wrong
    FP16 rows (relative error 0.11-0.17; INT8 rows right) with 128 x 128 x 256 tiles (BLOCK_KF 64 and 128),
    128 x 128 x 128 with BLOCK_KF 128, and earlier 128 x 256 x 128 (error ~5); every depth <= 2 was right, and
    depth 3 with BLOCK_KF <= 64 on 128 x 128 x 128 and 256 x 128 x 128 tiles (the shipped mixed configs)."""
    sf = _stages_f(cfg)
    if sf > 2 and not (_block_kf(cfg) <= 64 and cfg["BLOCK_K"] <= 128 and cfg["BLOCK_N"] <= 128):
        return 2
    return sf


def gemv_bm(M: int) -> int:
    return max(1, 1 << (M - 1).bit_length())


def _launch_gemv(x, w, w_scale, bias, out, cfg, row_bits=None, w_fp16=None):
    """Per-token quantization into cached buffers (one small launch), then the dp4a GEMV
    (``row_bits`` given: mixed INT8/FP16 rows, see ``quantkit.kernels.mixed``)."""
    M, K = x.shape
    N = w.shape[0]
    rbits = row_bits is not None
    pkey = ("gemv", tuple(cfg.items()), M, N, K, x.get_device(), bias is not None, rbits, w_fp16 is not None)
    grid, part, lock, fuse, const, ckey = (
        _LAUNCH_PLANS.get(pkey) or remember(_LAUNCH_PLANS, pkey, _gemv_plan(cfg, M, N, K, x.device, *pkey[6:])))
    if fuse:  # one launch: the kernel quantizes x itself
        a_arg, a_s, stride_a = x, w_scale, x.stride(0)
    else:
        _, a_s, a_arg = _quantize_into_scratch(x, const["PDL"], const["CHAIN"])
        stride_a = K // 4
    wf = w_fp16 if w_fp16 is not None else w
    vary = (w.view(torch.int32), w_scale, bias if bias is not None else w_scale, out)
    tail = (x, wf, row_bits if rbits else w_scale)
    strides = (out.stride(0), x.stride(0), wf.stride(0))
    # as in _launch: part, lock (cached buffers) and M, N, K // 4 (in ckey) left out of the specialization key, and
    # so are a_arg, a_s and stride_a: with FUSE_QUANT (in ckey) x, w_scale and x's stride (in the key already),
    # without it the activation scratch (cached buffers, 16-byte aligned, one dtype each) and K // 4
    fast_launch(w8a8_gemv_kernel, grid, (a_arg, a_s, *vary, part, lock, *tail, M, N, K // 4, stride_a, K // 4,
                                         *strides), const, ckey, (*vary, *tail, *strides))
    return out


def _gemv_plan(cfg, M, N, K, device, has_bias, rbits, has_fp16_w):
    """What ``_launch_gemv`` derives from its config, shape and flags alone (memoised); ``PDL``: the two-launch
    form only (see ``_common.wants_pdl``)."""
    fuse = bool(cfg.get("FUSE_QUANT", False))
    pdl = not fuse and wants_pdl(cfg, device)
    bm = gemv_bm(M)
    tiles = cdiv(N, cfg["BLOCK_N"])
    split_k = int(cfg.get("SPLIT_K", 1))
    part, lock = splitk_buffers(device, tiles, split_k, bm * cfg["BLOCK_N"], 0)
    bc = cfg["BLOCK_K"] // 4
    KW = K // 4
    const, ckey = launch_consts(HAS_BIAS=has_bias, ROW_BITS=rbits, HAS_FP16_W=has_fp16_w,
                                EVEN_K=(KW % bc == 0), SPLIT_K=split_k, BLOCK_M=bm,
                                BLOCK_N=cfg["BLOCK_N"], BC=bc, USE_DP4A=device.type == "cuda", FUSE_QUANT=fuse,
                                EPS_C=EPS,
                                AMAX_K=min(next_pow2(K), max(16, 4096 // bm)) if fuse else 16,
                                LOAD_STAGES=int(cfg.get("LOAD_STAGES", 1)), PDL=pdl,
                                PREFETCH=prefetch_steps(cfg, pdl), CHAIN=pdl_chains(cfg, pdl),
                                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                                **pdl_option(pdl))
    return (tiles * split_k,), part, lock, fuse, const, (ckey, spec_key((M, N, KW)))


def mixed_config(cfg: dict) -> dict:
    """The config a mixed call (row bits) runs for W8A8 config ``cfg``: the entry's own ``MIXED`` config where it has
    one (a W8A8 winner whose form has no mixed mode keeps the tile mixed calls ran before it), else the plain Gluon
    kernel on a warp-specialized config's tile (``w8a8_gluon.mixed_tile``), else ``cfg``."""
    if "MIXED" in cfg:
        return dict(cfg["MIXED"])
    from quantkit.kernels import w8a8_gluon

    return w8a8_gluon.mixed_tile(cfg)


def _for_call(cfg: dict, mixed: bool, chained: bool = False) -> tuple[dict, Optional[dict]]:
    """The configs a call of entry ``cfg`` runs (``_common.call_configs``: under a CUDA-graph capture, outside one
    or None): a mixed call runs the plain entry's mixed config anywhere (its EAGER config is ranked on plain
    calls)."""
    cfg, eager = call_configs(cfg, chained)
    if mixed:
        return mixed_config(cfg), None
    strip = lambda c: {k: v for k, v in c.items() if k != "MIXED"}  # noqa: E731
    return strip(cfg), None if eager is None else strip(eager)


def _pick(x, M, N, K, config, mixed=False):
    chained = use_chained_configs(x.device)
    if config is not None:
        cfg, eager = _for_call(dict(config), mixed, chained)
    elif not x.is_cuda:
        if M <= 4 and K % 4 == 0 and x.is_floating_point():
            return dict(BACKEND="gemv", BLOCK_N=32, BLOCK_K=32, SPLIT_K=2 if K > 32 else 1, num_warps=4, num_stages=1)
        return dict(_INTERP_CFG, FUSE_QUANT=M <= 16)
    else:
        key = (x.get_device(), M, N, K, mixed, chained)
        cfg, eager = _CFG_CACHE.get(key) or remember(_CFG_CACHE, key, _for_call(CONFIGS.get(M, N, K, gpu_key(x)),
                                                                                mixed, chained))
    return cfg if eager is None or capturing(x) else eager


_CFG_CACHE: dict = {}


def w8a8_linear_triton(x, w, w_scale, bias=None, config: Optional[dict] = None, out=None, row_bits=None,
                       w_fp16=None):
    """Triton W8A8 linear incl. activation quantization. x: (M, K) -> (M, N) x.dtype
    (written into ``out`` when given).  ``row_bits`` ((M,) uint8, bit 0 = FP16 row): mixed mode
    of ``quantkit.kernels.mixed`` -- the same kernels and configs, FP16 rows on ``w_fp16`` (or
    on ``w * w_scale``), the choice hoisted per tile."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    M, K = x.shape
    N = w.shape[0]
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    cfg = _pick(x, M, N, K, config, row_bits is not None)
    if cfg.get("BACKEND") == "gemv" and M <= GEMV_MAX_M and K % 4 == 0:
        return _launch_gemv(x, w, w_scale, bias, out, cfg, row_bits, w_fp16)
    if cfg.get("BACKEND") == "tma" and tma_applies(x, w, out, row_bits, w_fp16):
        a_q, a_s, _ = _quantize_into_scratch(x)
        return _launch_tma(a_q, a_s, w, w_scale, bias, out, cfg, x, row_bits, w_fp16)
    if cfg.get("BACKEND") == "gluon":
        pdl = wants_pdl(cfg, x.device)
        a_q, a_s, _ = _quantize_into_scratch(x, pdl)
        if _gluon_launch(a_q, a_s, w, w_scale, bias, out, cfg, row_bits, x, w_fp16, pdl):
            return out
        return _launch(a_q, a_s, w, w_scale, bias, out, False, False, _mma_only(cfg, x, M, N, K), x, row_bits,
                       w_fp16, pdl=pdl)
    cfg = _mma_only(cfg, x, M, N, K)
    if cfg.get("QUANT_ONCE", False):
        return _launch(_scratch(x)[0], None, w, w_scale, bias, out, False, False, cfg, x, row_bits, w_fp16,
                       quant_once=True)
    if cfg.get("FUSE_QUANT", False):
        return _launch(x, None, w, w_scale, bias, out, True, False, cfg, x, row_bits, w_fp16)
    pdl = wants_pdl(cfg, x.device)
    a_q, a_s, _ = _quantize_into_scratch(x, pdl)
    return _launch(a_q, a_s, w, w_scale, bias, out, False, False, cfg, x, row_bits, w_fp16, pdl=pdl)


def w8a8_gemm_q_triton(a_q, a_scale, w, w_scale, bias=None, out_dtype=torch.float16, config=None, out=None):
    """Triton GEMM on pre-quantized activations. a_q: (M, K) int8, a_scale: (M, 1) -> (M, N)."""
    a_q = a_q.contiguous()
    M, K = a_q.shape
    N = w.shape[0]
    if out is None:
        out = torch.empty((M, N), dtype=out_dtype, device=a_q.device)
    if M == 0:
        return out
    cfg = _pick(a_q, M, N, K, config)
    a_scale = a_scale.reshape(-1).float().contiguous()
    if cfg.get("BACKEND") == "tma" and tma_applies(a_q, w, out):
        return _launch_tma(a_q, a_scale, w, w_scale, bias, out, cfg)
    if cfg.get("BACKEND") == "gluon" and _gluon_launch(a_q, a_scale, w, w_scale, bias, out, cfg):
        return out
    return _launch(a_q, a_scale, w, w_scale, bias, out, False, False, _mma_only(cfg, a_q, M, N, K))


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
    if x.dim() == 2 and eager_cuda(x):  # eager fast path: no custom-op dispatch, and the call's launches replayed
        # where this kind of call was recorded for this weight (``_replay``)
        return _replay.linear(weight, "w8a8_linear", (weight.w, weight.scale, bias), x, weight.N,
                              lambda out: w8a8_linear_triton(x, weight.w, weight.scale, bias, out=out))
    lead = x.shape[:-1]
    out = _w8a8_linear_op(x.reshape(-1, x.shape[-1]), weight.w, weight.scale, bias)
    return out.reshape(*lead, weight.N)


def w8a8_gemm_q(a_q, a_scale, weight: W8A8Weight, bias=None, out_dtype=torch.float16):
    """W8A8 GEMM on pre-quantized activations. a_q: (M, K) int8, a_scale: (M, 1) -> (M, N)."""
    return _w8a8_gemm_q_op(a_q, a_scale, weight.w, weight.scale, bias, out_dtype)
