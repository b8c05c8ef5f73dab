"""W8A8 GEMM for Hopper written in Triton's Gluon dialect (``BACKEND="gluon"`` in a W8A8 config).

Why a second tensor-core kernel: Triton's own pipeliner makes a Hopper wgmma asynchronous only when it
accumulates in fp32 (WGMMAPipeline, "Rule 2.1"), so every INT8 wgmma of the ``tl.dot`` kernels in ``w8a8.py``
is waited for before the next K tile is issued (``benchmarks/wgmma_probe.py``).  Gluon issues the wgmmas
itself: ``warpgroup_mma(is_async=True)`` then ``warpgroup_mma_wait(1)`` keeps wgmma k running while the TMA
ring refills the slot that wgmma k-1 read.  ``benchmarks/gluon_int8_probe.py`` measured the gain (BENCHMARKS.md).

C[M, N] = (A[M, K] @ W[N, K]^T) * a_scale[m] * w_scale[n] (+ bias[n]) with A the per-token quantized
activations (``w8a8.py`` quantizes them first, as for its persistent TMA kernel), or the raw int32 accumulator.
The epilogue is ``w8a8._int8_epilogue``'s formula (bias as an explicit fma), so outputs equal the ``tl.dot``
kernels' bit for bit.

Scope: W8A8 on sm_90 (wgmma).  Mixed INT8/FP16 rows (``row_bits``, ``quantkit.kernels.mixed``) in the same launch:
a tile without an FP16 row is the plain kernel's (two row-bit loads more); a tile holding one stores its INT8 rows
from registers, then runs an fp16/bf16 wgmma loop on x and the FP16 copy through the same ring's bytes (half the K
step, twice the element width: no shared memory beyond the plain kernel's, so no occupancy lost) and stores its
FP16 rows; with no FP16 copy the loop widens each int8 weight tile in shared memory and scales per channel after
it.  Where Gluon cannot run (``_gluon``: no Gluon, not sm_90, operands TMA cannot describe) ``applies`` /
``applies_mixed`` is false and the caller runs the ``tl.dot`` kernel (its mixed mode is one launch too).
``PDL``: launched programmatically right after the quantization, the kernel loads its first weight tiles before
it waits for that launch (``griddepcontrol.wait``) and its activations after.
``SPLIT_K`` (few tiles, e.g. 4096 x 14336 at M = 256): the grid's third axis splits K; the splits' exact int32
partials meet in a workspace and the last to arrive stores (outputs bit for bit the unsplit kernel's; mixed mode's
FP16 rows sum fp32 partials).
``WARP_SPECIALIZE`` (large M, plain calls): one program per SM walks the tiles in grouped order, split between a
one-warp TMA loader and two MMA warpgroups that take the program's tiles in turn, so one tile's epilogue overlaps
the next tile's wgmmas (``w8a8_gluon_ws_kernel``).  (Session 42's persistent kernel without warp specialization
was slower than the plain grid at every H100 shape and was removed in session 44.)
"""

from __future__ import annotations

import torch

from quantkit.kernels import _common, _gluon
from quantkit.kernels._gluon import GLUON_ERROR, fence_async_shared, gl, gluon, mbarrier, tma, warpgroup_mma, \
    warpgroup_mma_wait

_tma_load, _tma_store = _gluon.tma_load, _gluon.tma_store

# wgmma with 8-bit integer inputs accepts only these instruction N values (PTX ISA, .s8 wgmma shapes)
_INT8_WGMMA_N = (256, 224, 208, 192, 176, 160, 144, 128, 112, 96, 80, 64, 48, 32, 24, 16, 8)

if GLUON_ERROR is None:

    @gluon.constexpr_function
    def _mma_instr_n(BM, BN, num_warps):
        m_reps = (BM + 15) // 16
        n_reps = (num_warps + m_reps - 1) // m_reps
        max_n = max(BN // n_reps, 8)
        for n in _INT8_WGMMA_N:
            if n <= max_n and BN % n == 0:
                return n
        raise ValueError("no int8 wgmma instruction N fits")

    @gluon.constexpr_function
    def _fp16_mma_layout(BM, BN, WARPS):
        """The fp16/bf16 wgmma accumulator's layout (mixed mode's FP16 loop): k = 256 bits of 16-bit elements."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=_gluon.mma_warps(BM, WARPS),
                                         instr_shape=[16, _mma_instr_n(BM, BN, WARPS), 16])

    @gluon.jit
    def _load_step(a_desc, b_desc, a_ring, b_ring, ready, slot, b_slot, off_m, off_n, kt, BK: gl.constexpr,
                   nbytes: gl.constexpr, live):
        """K tile ``kt`` of a ring: the A [BM, BK] and B [BN, BK] tiles into ``a_ring[slot]`` and
        ``b_ring[b_slot]``, landing on ``ready[slot]`` (predicated off where not ``live``: past the last K tile)."""
        mbarrier.expect(ready.index(slot), nbytes, pred=live)
        _tma_load(a_desc, [off_m, kt * BK], ready.index(slot), a_ring.index(slot), pred=live)
        _tma_load(b_desc, [off_n, kt * BK], ready.index(slot), b_ring.index(b_slot), pred=live)

    @gluon.jit
    def _mma_step(acc, a_ring, w_ring, ready, i, STAGES: gl.constexpr):
        """K step ``i`` of an INT8 ring: wait for its tiles, issue its wgmma (B = the W tile viewed as [BK, BN],
        K-major as 8-bit wgmma requires) and keep it in flight, waiting for the previous one instead: on return
        slot (i - 1) % STAGES, which that one read, is free to refill."""
        slot = i % STAGES
        mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
        a_s = a_ring.index(slot)
        w_s = w_ring.index(slot)
        acc = warpgroup_mma(a_s, w_s.permute((1, 0)), acc, is_async=True)
        acc, a_s, w_s = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a_s, w_s))
        return acc

    @gluon.jit
    def _fp_rows(rb_ptr, rows, M):
        """Mixed mode: which of ``rows`` are FP16 (row bit 0; rows past M are not)."""
        return (gl.load(rb_ptr + rows, mask=rows < M, other=0).to(gl.int32) & 1) != 0

    @gluon.jit
    def _fp16_acc(a_ring, w_ring, xf_desc, wf_desc, ws_ptr, off_m, off_n, N, kf_lo, kf_hi, STAGES: gl.constexpr,
                  WARPS: gl.constexpr, HAS_FP16_W: gl.constexpr):
        """Mixed mode, a tile holding an FP16 row: an fp16/bf16 wgmma loop over the K tiles [kf_lo, kf_hi) (of the
        FP16 step) on x and the FP16 weight (or the int8 weight, converted in shared memory and scaled per channel
        after the loop), through the INT8 loop's ring (the same bytes: half the K step at twice the width).
        Returns the fp32 accumulator and its rows and columns."""
        BM: gl.constexpr = xf_desc.block_type.shape[0]
        BKF: gl.constexpr = xf_desc.block_type.shape[1]
        BN: gl.constexpr = wf_desc.block_type.shape[0]
        DT: gl.constexpr = xf_desc.dtype
        TILE_BYTES: gl.constexpr = xf_desc.block_type.nbytes + wf_desc.block_type.nbytes
        x_ring = _gluon.reinterpret(a_ring, DT, [STAGES, BM, BKF], xf_desc.layout)
        # what TMA writes: the FP16 copy's tile fills a slot; an int8 tile half of one, so that view has two
        # sub-slots per slot (its slot s is sub-slot F * s: slots keep the ring's stride)
        F: gl.constexpr = 1 if HAS_FP16_W else 2
        f_ring = _gluon.reinterpret(w_ring, wf_desc.dtype, [STAGES * F, BN, BKF], wf_desc.layout)
        # no FP16 copy: the int8 tile is widened in place (the slot holds it twice over at 16 bits)
        h_ring = _gluon.reinterpret(w_ring, DT, [STAGES, BN, BKF], xf_desc.layout)
        ready = _gluon.ready_barriers(STAGES)
        k_tiles = kf_hi - kf_lo
        for s in gl.static_range(STAGES - 1):
            _load_step(xf_desc, wf_desc, x_ring, f_ring, ready, s, s * F, off_m, off_n, kf_lo + s, BKF, TILE_BYTES,
                       s < k_tiles)

        mma_f: gl.constexpr = _fp16_mma_layout(BM, BN, WARPS)
        widen: gl.constexpr = gl.BlockedLayout([1, 16], [32 * 16 // BKF, BKF // 16], [WARPS, 1], [1, 0])
        acc = gl.zeros((BM, BN), dtype=gl.float32, layout=mma_f)
        for ki in range(k_tiles):
            slot = ki % STAGES
            mbarrier.wait(ready.index(slot), (ki // STAGES) & 1)
            x_s = x_ring.index(slot)
            if HAS_FP16_W:
                b_s = f_ring.index(slot)
            else:
                q = f_ring.index(slot * F).load(widen)
                _gluon.cta_barrier()  # every thread has read the int8 tile before it is overwritten
                b_s = h_ring.index(slot)
                b_s.store(q.to(DT))
                fence_async_shared()
                _gluon.cta_barrier()  # both warpgroups' halves are written before either's wgmma reads them
            acc = warpgroup_mma(x_s, b_s.permute((1, 0)), acc, is_async=True)
            acc, x_s, b_s = warpgroup_mma_wait(num_outstanding=1, deps=(acc, x_s, b_s))
            nk = ki + STAGES - 1
            nslot = nk % STAGES
            _load_step(xf_desc, wf_desc, x_ring, f_ring, ready, nslot, nslot * F, off_m, off_n, kf_lo + nk, BKF,
                       TILE_BYTES, nk < k_tiles)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(s))

        rows = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, mma_f))
        cols = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, mma_f))
        if not HAS_FP16_W:
            acc = acc * gl.load(ws_ptr + cols, mask=cols < N, other=0.0)[None, :]
        return acc, rows, cols

    @gluon.jit
    def _fp16_rows(a_ring, w_ring, xf_desc, wf_desc, c_ptr, ws_ptr, bias_ptr, rb_ptr, off_m, off_n, M, N, K,
                   STAGES: gl.constexpr, WARPS: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_FP16_W: gl.constexpr):
        """Mixed mode without a K split: ``_fp16_acc`` over all of K, then the tile's FP16 rows stored (the
        tl.dot kernel's formula, ``w8a8._store_fp16_rows``)."""
        acc, rows, cols = _fp16_acc(a_ring, w_ring, xf_desc, wf_desc, ws_ptr, off_m, off_n, N, 0,
                                    gl.cdiv(K, xf_desc.block_type.shape[1]), STAGES, WARPS, HAS_FP16_W)
        if HAS_BIAS:
            acc += gl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(gl.float32)[None, :]
        _store_rows(c_ptr, acc, rows, cols, _fp_rows(rb_ptr, rows, M), M, N)

    @gluon.jit
    def _mixed_splitk(acc, rows, cols, a_ring, w_ring, xf_desc, wf_desc, c_ptr, as_ptr, ws_ptr, bias_ptr, rb_ptr,
                      part_ptr, lock_ptr, tile, pid_k, off_m, off_n, M, N, kt_lo, kt_hi, K, BK: gl.constexpr,
                      STAGES: gl.constexpr, WARPS: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_FP16_W: gl.constexpr,
                      SPLIT_K: gl.constexpr):
        """Mixed mode with a K split (``_common.splitk_sum_rows``' workspace protocol): this split parks its INT8
        rows' exact int32 partial and, if the tile holds an FP16 row, runs the FP16 loop over its share of K and
        parks its FP16 rows' fp32 partial (as bits) in the same slot; the split that arrives last sums each row set
        over the splits and stores it (INT8 rows: the plain kernel's epilogue, so bit for bit its output)."""
        BM: gl.constexpr = xf_desc.block_type.shape[0]
        BN: gl.constexpr = wf_desc.block_type.shape[0]
        BKF: gl.constexpr = xf_desc.block_type.shape[1]
        ELEMS: gl.constexpr = BM * BN
        mma_f: gl.constexpr = _fp16_mma_layout(BM, BN, WARPS)
        slots = part_ptr + tile.to(gl.int64) * (SPLIT_K * ELEMS)
        is_fp = _fp_rows(rb_ptr, rows, M)
        n_fp = gl.sum(is_fp.to(gl.int32), axis=0)
        offs = (rows - off_m)[:, None] * BN + (cols - off_n)[None, :]
        i8 = (is_fp == 0)[:, None] & (offs >= 0)
        gl.store(slots + pid_k * ELEMS + offs, acc, mask=i8)
        # the FP16 accumulator's places (its own layout)
        rows_f = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, mma_f))
        cols_f = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, mma_f))
        offs_f = (rows_f - off_m)[:, None] * BN + (cols_f - off_n)[None, :]
        fp = _fp_rows(rb_ptr, rows_f, M)[:, None] & (offs_f >= 0)
        if n_fp > 0:
            R: gl.constexpr = BK // BKF  # FP16 K tiles per INT8 K tile
            accf, _, _ = _fp16_acc(a_ring, w_ring, xf_desc, wf_desc, ws_ptr, off_m, off_n, N, kt_lo * R,
                                   gl.minimum(kt_hi * R, gl.cdiv(K, BKF)), STAGES, WARPS, HAS_FP16_W)
            gl.store(slots + pid_k * ELEMS + offs_f, accf.to(gl.int32, bitcast=True), mask=fp)
        _gluon.cta_barrier()  # every thread's partial is written before the counter moves
        if gl.atomic_add(lock_ptr + tile, 1, sem="acq_rel") == SPLIT_K - 1:
            tot = gl.zeros_like(acc)
            for sk in gl.static_range(SPLIT_K):
                tot += gl.load(slots + sk * ELEMS + offs, mask=i8, other=0)
            out = _scaled(tot, rows, cols, as_ptr, ws_ptr, bias_ptr, M, N, HAS_BIAS)
            _store_rows(c_ptr, out, rows, cols, is_fp == 0, M, N)
            if n_fp > 0:
                totf = gl.zeros((BM, BN), dtype=gl.float32, layout=mma_f)
                for sk in gl.static_range(SPLIT_K):
                    totf += gl.load(slots + sk * ELEMS + offs_f, mask=fp, other=0).to(gl.float32, bitcast=True)
                if HAS_BIAS:
                    totf += gl.load(bias_ptr + cols_f, mask=cols_f < N, other=0.0).to(gl.float32)[None, :]
                _store_rows(c_ptr, totf, rows_f, cols_f, _fp_rows(rb_ptr, rows_f, M), M, N)
            gl.atomic_xchg(lock_ptr + tile, 0)

    @gluon.jit
    def _store_rows(c_ptr, value, rows, cols, row_mask, M, N):
        """Mixed mode: the rows of a tile where ``row_mask``, stored from registers (a tile holding an FP16 row
        writes its INT8 and its FP16 rows apart, so no shared buffer outlives the ring the FP16 loop reuses)."""
        ptrs = c_ptr + rows[:, None].to(gl.int64) * N + cols[None, :]  # row stride N: ``applies`` wants out contiguous
        gl.store(ptrs, value.to(c_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & (rows[:, None] < M) & (cols[None, :] < N))

    @gluon.jit
    def _store_tile(c_desc, value, off_m, off_n):
        """registers -> shared -> TMA store (rows / columns past M, N are clipped by TMA)."""
        c_smem = gl.allocate_shared_memory(c_desc.dtype, c_desc.block_type.shape, c_desc.layout)
        c_smem.store(value.to(c_desc.dtype))
        fence_async_shared()
        _tma_store(c_desc, [off_m, off_n], c_smem)
        tma.store_wait(pendings=0)

    @gluon.jit
    def _scaled(acc, rows, cols, as_ptr, ws_ptr, bias_ptr, M, N, HAS_BIAS: gl.constexpr):
        """The int32 accumulator -> fp32 output: ``w8a8._int8_epilogue``'s formula (bias as an explicit fma), so
        the outputs equal the tl.dot kernels' bit for bit."""
        a_sc = gl.load(as_ptr + rows, mask=rows < M, other=0.0)
        w_sc = gl.load(ws_ptr + cols, mask=cols < N, other=0.0)
        if HAS_BIAS:
            b = gl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(gl.float32)
            return gl.fma(acc.to(gl.float32) * a_sc[:, None], w_sc[None, :], b[None, :])
        return acc.to(gl.float32) * a_sc[:, None] * w_sc[None, :]

    @gluon.jit
    def _store_reused(acc, c_desc, c_smem, pid_m, pid_n, as_ptr, ws_ptr, bias_ptr, M, N, OUT_INT32: gl.constexpr,
                      HAS_BIAS: gl.constexpr, LAYOUT: gl.constexpr):
        """A walking program's tile (pid_m, pid_n) out of the int32 accumulator (``LAYOUT``: its layout): scaled
        (raw with OUT_INT32) into ``c_smem`` once that buffer's previous TMA store has read it, then stored by TMA,
        the store left in flight."""
        BM: gl.constexpr = c_desc.block_type.shape[0]
        BN: gl.constexpr = c_desc.block_type.shape[1]
        if OUT_INT32:
            out = acc
        else:
            rows = pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, LAYOUT))
            cols = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, LAYOUT))
            out = _scaled(acc, rows, cols, as_ptr, ws_ptr, bias_ptr, M, N, HAS_BIAS)
        tma.store_wait(pendings=0)  # the previous store has read c_smem (the issuing thread knows) ...
        _gluon.cta_barrier()  # ... and every thread waits for it before overwriting the buffer
        c_smem.store(out.to(c_desc.dtype))
        fence_async_shared()
        _tma_store(c_desc, [pid_m * BM, pid_n * BN], c_smem)

    @gluon.jit
    def _grouped(tile, num_pid_m, num_pid_n, GROUP_M: gl.constexpr):
        """Tile index -> (pid_m, pid_n) in GROUP_M-grouped order (``_common.grouped_tile``'s, which Gluon cannot
        call: the tiles that share A rows run together, so A and W stay in L2)."""
        in_group = GROUP_M * num_pid_n
        first_m = tile // in_group * GROUP_M
        group_m = gl.minimum(num_pid_m - first_m, GROUP_M)
        return first_m + (tile % in_group) % group_m, (tile % in_group) // group_m

    @gluon.jit
    def w8a8_gluon_kernel(a_desc, w_desc, c_desc, xf_desc, wf_desc, c_ptr, as_ptr, ws_ptr, bias_ptr, rb_ptr,
                          part_ptr, lock_ptr, M, N, K,
                          STAGES: gl.constexpr, WARPS: gl.constexpr, OUT_INT32: gl.constexpr,
                          HAS_BIAS: gl.constexpr, ROW_BITS: gl.constexpr, HAS_FP16_W: gl.constexpr,
                          PDL: gl.constexpr, SPLIT_K: gl.constexpr):
        """Grid (M tiles, N tiles, SPLIT_K): each program computes one tile over its share of K; with SPLIT_K > 1 the
        splits' exact int32 partials meet in ``part`` (counters ``lock``, zero) and the last to arrive stores."""
        BM: gl.constexpr = c_desc.block_type.shape[0]
        BN: gl.constexpr = c_desc.block_type.shape[1]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        TILE_BYTES: gl.constexpr = a_desc.block_type.nbytes + w_desc.block_type.nbytes

        off_m = gl.program_id(0) * BM
        off_n = gl.program_id(1) * BN
        # this split's K tiles: [kt_lo, kt_hi), k_tiles of them (the whole K without a split)
        if SPLIT_K > 1:
            per_split = gl.cdiv(gl.cdiv(K, BK), SPLIT_K)
            kt_lo = gl.program_id(2) * per_split
            kt_hi = gl.minimum(gl.cdiv(K, BK), kt_lo + per_split)
            k_tiles = gl.maximum(kt_hi - kt_lo, 0)
        else:
            kt_lo = 0
            kt_hi = gl.cdiv(K, BK)
            k_tiles = kt_hi
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0],
            warps_per_cta=_gluon.mma_warps(BM, WARPS),
            instr_shape=[16, _mma_instr_n(BM, BN, WARPS), 32],  # k = 256 bits of 8-bit elements
        )
        rows = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, mma_layout))
        cols = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, mma_layout))
        if ROW_BITS:
            # mixed mode, before the loop only one row bit is read (a vector load and sum here delayed every tile's
            # first TMA loads: +6.8% at 28672x4096, M = 2048, H100): a tile whose first row is FP16 may be all FP16,
            # and one that is skips the INT8 loop
            if (gl.load(rb_ptr + off_m).to(gl.int32) & 1) != 0:
                all_fp = _fp_rows(rb_ptr, rows, M)
                if gl.sum(all_fp.to(gl.int32), axis=0) >= gl.minimum(M - off_m, BM):
                    k_tiles = 0

        # ring of STAGES slots for the A [BM, BK] and W [BN, BK] tiles, one "TMA landed" barrier per slot
        a_ring = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, BK], a_desc.layout)
        w_ring = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BN, BK], w_desc.layout)
        ready = _gluon.ready_barriers(STAGES)

        # prologue: fill slots 0 .. STAGES-2 (predicated off past the last K tile)
        if PDL:
            # launched programmatically while the quantization runs: the weight tiles (and the row bits above: no
            # launch in flight writes them) are read at once, the quantized activations once it has finished
            for s in gl.static_range(STAGES - 1):
                mbarrier.expect(ready.index(s), TILE_BYTES, pred=s < k_tiles)
                _tma_load(w_desc, [off_n, (kt_lo + s) * BK], ready.index(s), w_ring.index(s), pred=s < k_tiles)
            _gluon.grid_dep_wait()
            for s in gl.static_range(STAGES - 1):
                _tma_load(a_desc, [off_m, (kt_lo + s) * BK], ready.index(s), a_ring.index(s), pred=s < k_tiles)
        else:
            for s in gl.static_range(STAGES - 1):
                _load_step(a_desc, w_desc, a_ring, w_ring, ready, s, s, off_m, off_n, kt_lo + s, BK, TILE_BYTES,
                           s < k_tiles)

        acc = gl.zeros((BM, BN), dtype=gl.int32, layout=mma_layout)

        for ki in range(k_tiles):
            acc = _mma_step(acc, a_ring, w_ring, ready, ki, STAGES)
            # refill the freed slot with tile ki + STAGES - 1
            nk = ki + STAGES - 1
            nslot = nk % STAGES
            _load_step(a_desc, w_desc, a_ring, w_ring, ready, nslot, nslot, off_m, off_n, kt_lo + nk, BK, TILE_BYTES,
                       nk < k_tiles)

        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(s))

        if SPLIT_K > 1:
            tile = gl.program_id(0) * gl.num_programs(1) + gl.program_id(1)
            if ROW_BITS:
                _mixed_splitk(acc, rows, cols, a_ring, w_ring, xf_desc, wf_desc, c_ptr, as_ptr, ws_ptr, bias_ptr,
                              rb_ptr, part_ptr, lock_ptr, tile, gl.program_id(2), off_m, off_n, M, N, kt_lo, kt_hi, K,
                              BK, STAGES, WARPS, HAS_BIAS, HAS_FP16_W, SPLIT_K)
            else:
                offs = (rows - off_m)[:, None] * BN + (cols - off_n)[None, :]
                acc, last = _gluon.splitk_sum(acc, part_ptr, lock_ptr, tile, gl.program_id(2), offs, SPLIT_K, BM * BN)
                if last:
                    if OUT_INT32:
                        _store_rows(c_ptr, acc, rows, cols, rows >= 0, M, N)
                    else:
                        out = _scaled(acc, rows, cols, as_ptr, ws_ptr, bias_ptr, M, N, HAS_BIAS)
                        _store_rows(c_ptr, out, rows, cols, rows >= 0, M, N)
        elif OUT_INT32:
            _store_tile(c_desc, acc, off_m, off_n)
        else:
            out = _scaled(acc, rows, cols, as_ptr, ws_ptr, bias_ptr, M, N, HAS_BIAS)
            if ROW_BITS:  # mixed mode: the tile's row bits (bit 0 = FP16), read once the INT8 loop is done
                is_fp = _fp_rows(rb_ptr, rows, M)
                if gl.sum(is_fp.to(gl.int32), axis=0) > 0:
                    _store_rows(c_ptr, out, rows, cols, is_fp == 0, M, N)
                    _fp16_rows(a_ring, w_ring, xf_desc, wf_desc, c_ptr, ws_ptr, bias_ptr, rb_ptr, off_m, off_n,
                               M, N, K, STAGES, WARPS, HAS_BIAS, HAS_FP16_W)
                else:
                    _store_tile(c_desc, out, off_m, off_n)
            else:
                _store_tile(c_desc, out, off_m, off_n)

    @gluon.jit
    def _ws_walk(M, N, K, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr):
        """A walking program's tiles: (its first tile, the programs' stride, tiles in M and N, K steps a tile,
        its tile count); its tiles are pid, pid + n_progs, ... (at most one program a tile)."""
        pid = gl.program_id(0)
        n_progs = gl.num_programs(0)
        num_pid_m = gl.cdiv(M, BM)
        num_pid_n = gl.cdiv(N, BN)
        return pid, n_progs, num_pid_m, num_pid_n, gl.cdiv(K, BK), gl.cdiv(num_pid_m * num_pid_n - pid, n_progs)

    @gluon.jit
    def _ws_loader(a_desc, w_desc, a_ring, w_ring, ready, empty, M, N, K, GROUP_M: gl.constexpr,
                   STAGES: gl.constexpr):
        """Warp-specialized kernel, the load partition (one warp): every K step of this program's tiles, in order,
        into the ring, each slot once its last reader has released it (``empty``; a fresh barrier counts as
        released: the first pass waits on the phase before it)."""
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BN: gl.constexpr = w_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        TILE_BYTES: gl.constexpr = a_desc.block_type.nbytes + w_desc.block_type.nbytes
        pid, n_progs, num_pid_m, num_pid_n, k_tiles, my_tiles = _ws_walk(M, N, K, BM, BN, BK)
        p = 0
        for t in range(my_tiles):
            pid_m, pid_n = _grouped(pid + t * n_progs, num_pid_m, num_pid_n, GROUP_M)
            for ki in range(k_tiles):
                slot = p % STAGES
                mbarrier.wait(empty.index(slot), ((p // STAGES) & 1) ^ 1)
                _load_step(a_desc, w_desc, a_ring, w_ring, ready, slot, slot, pid_m * BM, pid_n * BN, ki, BK,
                           TILE_BYTES, p >= 0)
                p += 1

    @gluon.jit
    def _ws_consumer(a_desc, w_desc, c_desc, a_ring, w_ring, ready, empty, turn, c_bufs, as_ptr, ws_ptr, bias_ptr,
                     M, N, K, GROUP_M: gl.constexpr, STAGES: gl.constexpr, OUT_INT32: gl.constexpr,
                     HAS_BIAS: gl.constexpr, FIRST: gl.constexpr):
        """Warp-specialized kernel, an MMA partition (one warpgroup): this program's tiles FIRST, FIRST + 2, ...
        (the other MMA partition takes the rest, so one's epilogue runs while the other's wgmmas do), each K step's
        wgmma kept in flight and the slot of the one before released as it retires; the tile's output through its
        own store buffer (``c_bufs[FIRST]``) and a TMA store waited for only before that buffer is reused.

        The partitions' K loops take turns (``turn[FIRST]``: the other has issued its tile's last wgmma): a ring
        slot's "landed" barrier tells phases apart by parity only, so a partition must not wait on a slot's use
        while an earlier use of it (the other partition's tile) is still to land, or it would take that one's."""
        BM: gl.constexpr = c_desc.block_type.shape[0]
        BN: gl.constexpr = c_desc.block_type.shape[1]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=_gluon.mma_warps(BM, 4), instr_shape=[16, _mma_instr_n(BM, BN, 4), 32])
        c_smem = c_bufs.index(FIRST)
        pid, n_progs, num_pid_m, num_pid_n, k_tiles, my_tiles = _ws_walk(M, N, K, BM, BN, BK)
        for t in range(FIRST, my_tiles, 2):
            pid_m, pid_n = _grouped(pid + t * n_progs, num_pid_m, num_pid_n, GROUP_M)
            p0 = t * k_tiles  # the ring step of this tile's first K tile (the loader's order)
            # this partition's turn: the other one's previous tile has all its K tiles landed (a fresh barrier's
            # phase before the first counts as done: partition 0 starts at once)
            mbarrier.wait(turn.index(FIRST), ((t // 2) & 1) ^ (1 - FIRST))
            acc = gl.zeros((BM, BN), dtype=gl.int32, layout=mma_layout)
            for ki in range(k_tiles):
                acc = _mma_step(acc, a_ring, w_ring, ready, p0 + ki, STAGES)
                # wgmma p0 + ki - 1 has retired: its slot goes back to the loader (one elected arrive)
                mbarrier.arrive(empty.index((p0 + ki + STAGES - 1) % STAGES), count=1, pred=ki > 0)
            mbarrier.arrive(turn.index(1 - FIRST), count=1)  # the other partition's K loop may start
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(empty.index((p0 + k_tiles - 1) % STAGES), count=1, pred=k_tiles > 0)
            # (in a partition the barrier before the buffer's reuse is one of its own warps)
            _store_reused(acc, c_desc, c_smem, pid_m, pid_n, as_ptr, ws_ptr, bias_ptr, M, N, OUT_INT32, HAS_BIAS,
                          mma_layout)
        tma.store_wait(pendings=0)

    @gluon.jit
    def _ws_consumer_odd(a_desc, w_desc, c_desc, a_ring, w_ring, ready, empty, turn, c_bufs, as_ptr, ws_ptr,
                         bias_ptr, M, N, K, GROUP_M: gl.constexpr, STAGES: gl.constexpr, OUT_INT32: gl.constexpr,
                         HAS_BIAS: gl.constexpr):
        _ws_consumer(a_desc, w_desc, c_desc, a_ring, w_ring, ready, empty, turn, c_bufs, as_ptr, ws_ptr, bias_ptr, M,
                     N, K, GROUP_M, STAGES, OUT_INT32, HAS_BIAS, 1)

    @gluon.jit
    def w8a8_gluon_ws_kernel(a_desc, w_desc, c_desc, as_ptr, ws_ptr, bias_ptr, M, N, K,
                             STAGES: gl.constexpr, OUT_INT32: gl.constexpr, HAS_BIAS: gl.constexpr,
                             GROUP_M: gl.constexpr, MMA_REGS: gl.constexpr, LOAD_REGS: gl.constexpr):
        """The GEMM on a persistent grid, warp-specialized (``WARP_SPECIALIZE`` in the config; plain W8A8 only):
        one program an SM walks the tiles in grouped order (``_ws_walk``); a one-warp load partition keeps the TMA ring full across this program's tiles, and two MMA partitions of
        one warpgroup each (the default one and a worker) take its tiles in turn ("ping-pong"), so the int32 ->
        fp16 epilogue and the TMA store of one tile run while the other partition's wgmmas do. Launched with
        num_warps 4 (the default partition's; 12 warps in all) and ``maxnreg`` (``_gluon.WS_LAUNCH``): the worker
        MMA partition and the loader run with MMA_REGS and LOAD_REGS registers a thread, the default partition
        with what is left."""
        BM: gl.constexpr = c_desc.block_type.shape[0]
        BN: gl.constexpr = c_desc.block_type.shape[1]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        a_ring = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, BK], a_desc.layout)
        w_ring = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BN, BK], w_desc.layout)
        c_bufs = gl.allocate_shared_memory(c_desc.dtype, [2, BM, BN], c_desc.layout)
        ready = _gluon.ready_barriers(STAGES)
        empty = _gluon.ready_barriers(STAGES)
        turn = _gluon.ready_barriers(2)
        gl.warp_specialize([
            (_ws_consumer, (a_desc, w_desc, c_desc, a_ring, w_ring, ready, empty, turn, c_bufs, as_ptr, ws_ptr,
                            bias_ptr, M, N, K, GROUP_M, STAGES, OUT_INT32, HAS_BIAS, 0)),
            (_ws_consumer_odd, (a_desc, w_desc, c_desc, a_ring, w_ring, ready, empty, turn, c_bufs, as_ptr, ws_ptr,
                                bias_ptr, M, N, K, GROUP_M, STAGES, OUT_INT32, HAS_BIAS)),
            (_ws_loader, (a_desc, w_desc, a_ring, w_ring, ready, empty, M, N, K, GROUP_M, STAGES)),
        ], [4, 1], [MMA_REGS, LOAD_REGS])
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(s))
            mbarrier.invalidate(empty.index(s))
        for s in gl.static_range(2):
            mbarrier.invalidate(turn.index(s))

    @gluon.jit
    def _fp16_rows_walk(a_ring, w_ring, xf_desc, wf_desc, c_ptr, ws_ptr, bias_ptr, rb_ptr, M, N, K,
                        STAGES: gl.constexpr, WARPS: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_FP16_W: gl.constexpr,
                        CHUNK: gl.constexpr):
        """The walking form of the second pass: this program's tiles (t = program, program + programs, ..., N tiles
        fastest) whose M tile holds an FP16 row, through ``_fp16_rows``.  Which M tiles do is read CHUNK tiles at a
        time (their row bits in one load, a chunk without an FP16 row skipped whole), so with no FP16 row a
        program reads the row bits once per CHUNK tiles and stops."""
        BM: gl.constexpr = xf_desc.block_type.shape[0]
        BN: gl.constexpr = wf_desc.block_type.shape[0]
        BITS: gl.constexpr = gl.BlockedLayout([1, 16], [32 * 16 // BM, BM // 16], [WARPS, 1], [1, 0])
        tile_i = gl.arange(0, CHUNK, layout=gl.SliceLayout(1, BITS))
        row_i = gl.arange(0, BM, layout=gl.SliceLayout(0, BITS))
        m_tiles = gl.cdiv(M, BM)
        n_tiles = gl.cdiv(N, BN)
        pid = gl.program_id(0)
        P = gl.num_programs(0)
        for c0 in range(0, m_tiles, CHUNK):
            rows = (c0 + tile_i)[:, None] * BM + row_i[None, :]
            has_fp = gl.max(gl.load(rb_ptr + rows, mask=rows < M, other=0).to(gl.int32) & 1, axis=1)  # [CHUNK]
            if gl.sum(has_fp, axis=0) > 0:
                t_lo = c0 * n_tiles
                t_hi = gl.minimum(c0 + CHUNK, m_tiles) * n_tiles
                for t in range(t_lo + (pid + P - t_lo % P) % P, t_hi, P):
                    m = t // n_tiles
                    if gl.sum(gl.where(tile_i == m - c0, has_fp, 0), axis=0) > 0:
                        # every warp is done with the ring (the last tile's wgmmas) before TMA refills it
                        _gluon.cta_barrier()
                        _fp16_rows(a_ring, w_ring, xf_desc, wf_desc, c_ptr, ws_ptr, bias_ptr, rb_ptr, m * BM,
                                   (t - m * n_tiles) * BN, M, N, K, STAGES, WARPS, HAS_BIAS, HAS_FP16_W)

    @gluon.jit
    def w8a8_gluon_fp16_rows_kernel(a_desc, w_desc, xf_desc, wf_desc, c_ptr, ws_ptr, bias_ptr, rb_ptr, M, N, K,
                                    STAGES: gl.constexpr, WARPS: gl.constexpr, HAS_BIAS: gl.constexpr,
                                    HAS_FP16_W: gl.constexpr, WALK: gl.constexpr, CHUNK: gl.constexpr):
        """Mixed mode's second pass after the warp-specialized kernel (``MIXED_PASS``), which wrote every row as
        INT8: a tile holding an FP16 row recomputes and stores its FP16 rows with the plain kernel's FP16 loop
        (``_fp16_rows``, so bit for bit the plain kernel's mixed result).  Grid (M tiles, N tiles), every other
        tile reading its row bits and stopping; or with WALK (``MIXED_PASS: "walk"``) one program an SM walking
        the tiles (``_fp16_rows_walk``): with no FP16 row the first form still launches every tile's program (a
        wave costs about 1-2 us on an H100, 54 waves at M = 8192 on 28672 x 4096), the second one wave."""
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BN: gl.constexpr = w_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        a_ring = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, BK], a_desc.layout)
        w_ring = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BN, BK], w_desc.layout)
        if WALK:
            _fp16_rows_walk(a_ring, w_ring, xf_desc, wf_desc, c_ptr, ws_ptr, bias_ptr, rb_ptr, M, N, K, STAGES,
                            WARPS, HAS_BIAS, HAS_FP16_W, CHUNK)
        else:
            off_m = gl.program_id(0) * BM
            off_n = gl.program_id(1) * BN
            rows = off_m + gl.arange(0, BM, layout=gl.BlockedLayout([1], [32], [WARPS], [0]))
            if gl.sum(_fp_rows(rb_ptr, rows, M).to(gl.int32), axis=0) > 0:
                _fp16_rows(a_ring, w_ring, xf_desc, wf_desc, c_ptr, ws_ptr, bias_ptr, rb_ptr, off_m, off_n, M, N,
                           K, STAGES, WARPS, HAS_BIAS, HAS_FP16_W)


def applies(a_q: torch.Tensor, w: torch.Tensor, out: torch.Tensor, cfg: dict) -> bool:
    """Whether this kernel can run here: Gluon importable, an sm_90 GPU, int8 operands and an fp16 / bf16 /
    int32 output that TMA descriptors can describe (contiguous, 16-byte row strides and base addresses), and a tile
    of whole 64-row wgmmas and a ring of at least ``_gluon.MIN_STAGES`` slots (a config written for the tl.dot
    kernel, e.g. BLOCK_M 16 or num_stages 1, runs there instead)."""
    if not _gluon.available(a_q) or cfg["BLOCK_M"] % 64 or not _gluon.ring_ok(cfg):
        return False
    if a_q.dtype != torch.int8 or w.dtype != torch.int8 or out.dtype not in _gluon.GL_DTYPES:
        return False
    if not (a_q.is_contiguous() and w.is_contiguous() and out.is_contiguous()):
        return False
    if a_q.shape[1] % 16 or (out.shape[1] * out.element_size()) % 16:
        return False
    return _gluon.aligned16(a_q, w, out)


def applies_mixed(x: torch.Tensor, w_fp16, out: torch.Tensor, cfg: dict) -> bool:
    """Mixed mode (row bits) on top of :func:`applies`: the FP16 loop reads x and the FP16 copy (same dtype as
    x and the output) or the int8 weight through TMA descriptors, at half the INT8 K step (a whole 16-element
    wgmma at least)."""
    if x.dtype not in (torch.float16, torch.bfloat16) or out.dtype != x.dtype or cfg["BLOCK_K"] % 32:
        return False
    if w_fp16 is None:
        return x.is_contiguous() and _gluon.aligned16(x)
    return (w_fp16.dtype == x.dtype and w_fp16.shape[1] == x.shape[1] and x.is_contiguous()
            and w_fp16.is_contiguous() and _gluon.aligned16(x, w_fp16))


def descriptors(a_q: torch.Tensor, w: torch.Tensor, out: torch.Tensor, cfg: dict, x=None, wf=None):
    """Host TMA descriptors of A [BM, BK], W [BN, BK] and C [BM, BN] tiles (128-byte swizzled shared layouts),
    and in mixed mode of the FP16 loop's x [BM, BK / 2] and weight [BN, BK / 2] tiles (``wf``: the FP16 copy or
    the int8 weight)."""
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    ds = (_gluon.descriptor(a_q, [bm, bk]), _gluon.descriptor(w, [bn, bk]), _gluon.descriptor(out, [bm, bn]))
    if x is None:
        return ds + (None, None)
    return ds + (_gluon.descriptor(x, [bm, bk // 2]), _gluon.descriptor(wf, [bn, bk // 2]))


_LAUNCH = _gluon.DirectLaunch()


def _epilogue_args(a_scale, w_scale, bias, out):
    """The epilogue's pointer arguments, a tensor standing in for each one absent (an int32 ``out`` needs no scale;
    the kernels do not read a pointer their constexprs switch off)."""
    scales = a_scale if a_scale is not None else out
    return scales, w_scale if w_scale is not None else out, bias if bias is not None else scales




def warp_specialized(cfg: dict, mixed: bool = False, out_bytes: int = 2) -> bool:
    """Whether a launch with ``cfg`` runs the warp-specialized kernel: the config asks for it (``WARP_SPECIALIZE``),
    the call is plain W8A8 without a K split, each MMA partition's tile is one warpgroup's (num_warps 4, BLOCK_M 64
    or 128, an int32 accumulator of at most 128 registers a thread: BLOCK_M x BLOCK_N <= 16384), and the ring plus
    the two partitions' store buffers fit one CTA's shared memory."""
    if not cfg.get("WARP_SPECIALIZE", False) or mixed or int(cfg.get("SPLIT_K", 1)) > 1:
        return False
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    if cfg["num_warps"] != 4 or bm not in (64, 128) or bm * bn > 16384:
        return False
    return cfg["num_stages"] * (bm + bn) * bk + 2 * bm * bn * out_bytes + 1024 <= _common.HOPPER_SMEM_PER_BLOCK


def walks(cfg: dict) -> bool:
    """A config of the form that walks the tiles one program an SM (``WARP_SPECIALIZE``): it has no mixed mode, so
    a mixed call runs :func:`mixed_tile`'s config instead."""
    return bool(cfg.get("WARP_SPECIALIZE"))


def mixed_pass(cfg: dict, out_bytes: int = 2) -> bool:
    """``MIXED_PASS`` on a warp-specialized config: a mixed call runs the warp-specialized kernel on every row (as
    INT8), then a second launch recomputes only the tiles holding an FP16 row (``w8a8_gluon_fp16_rows_kernel``:
    with ``True`` a program a tile, the others reading their row bits and stopping; with ``"walk"`` one program
    an SM walking the tiles, :func:`walks_fp16_rows`)."""
    return bool(cfg.get("MIXED_PASS")) and warp_specialized(cfg, False, out_bytes)


FP16_WALK_CHUNK = 64  # M tiles whose row bits the walking second pass reads at once (a test makes it small)


def walks_fp16_rows(cfg: dict) -> bool:
    """``MIXED_PASS: "walk"``: the second pass walks the tiles one program an SM (with no FP16 row: one wave of
    programs instead of one a tile)."""
    return cfg.get("MIXED_PASS") == "walk"


def mixed_tile(cfg: dict) -> dict:
    """The config a mixed call runs: a ``WARP_SPECIALIZE`` one (plain calls only) becomes the plain kernel on the same
    tile (:func:`plain_tile`); a ``MIXED_PASS`` one stays (:func:`mixed_pass`)."""
    if not walks(cfg) or mixed_pass(cfg):
        return cfg
    return plain_tile(cfg)


def plain_tile(cfg: dict) -> dict:
    """The plain kernel on a walking config's tile, its ring as deep as the config's but no deeper than lets two
    CTAs share an SM (on the H100 at 4096 x 4096, M = 8192, the 128 x 128 x 128 tile ran 265 us with 3 stages, two
    CTAs an SM, and 334 us with the warp-specialized config's 4: BENCHMARKS.md, session 43)."""
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    two_ctas = (_common.HOPPER_SMEM_PER_BLOCK + 1024) // 2 - 1024  # one CTA's share of an SM
    stages = min(cfg["num_stages"], max(2, (two_ctas - 1024) // ((bm + bn) * bk)))
    return dict({k: v for k, v in cfg.items() if k not in ("WARP_SPECIALIZE", "MIXED_PASS")}, num_stages=stages)


def walk_programs(M: int, N: int, cfg: dict, device) -> int:
    """The warp-specialized kernel's grid: one program per SM, never more programs than tiles."""
    tiles = -(-M // cfg["BLOCK_M"]) * -(-N // cfg["BLOCK_N"])
    return max(1, min(tiles, _common.sm_count(device)))


_LAUNCH_WS = _gluon.DirectLaunch()
_LAUNCH_FP16_ROWS = _gluon.DirectLaunch()


_PARAM_NAMES: dict = {}  # (kernel, the constexprs a launch names) -> those the kernel takes, in parameter order


def _cached_launch(direct: _gluon.DirectLaunch, kernel, grid, cfg: dict, out, tensors: tuple, ptrs: tuple,
                   named: dict, descs, options: dict, prefix: tuple = ()) -> torch.Tensor:
    """``kernel`` on ``grid``: the compiled variant ``direct`` holds for this device, tile, output dtype, constexprs
    (``named``, those the kernel takes, in its parameter order) and pointer specialisation, launched on descriptors
    of ``tensors`` (``prefix``: stand-ins for descriptor parameters the call leaves out); else through the JIT on the
    descriptors ``descs()`` builds, then remembered. ``ptrs``: the non-descriptor, non-constexpr arguments."""
    nkey = (kernel, tuple(named))
    names = _PARAM_NAMES.get(nkey) or _common.remember(_PARAM_NAMES, nkey, tuple(n for n in kernel.arg_names
                                                                                 if n in named))
    consts = tuple(named[n] for n in names)
    key = lambda: (_common.current_device(), cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], out.dtype,  # noqa: E731
                   consts, _common.spec_key(ptrs))
    direct.launch(key, grid, tensors, prefix + ptrs + consts,
                  lambda: kernel[grid](*descs(), *ptrs, **{n: named[n] for n in names}, **options))
    return out


def _launch_ws(a_q, a_scale, w, w_scale, bias, out, cfg: dict) -> torch.Tensor:
    """The warp-specialized kernel (one program of 12 warps an SM, launched with ``_gluon.WS_LAUNCH``)."""
    M, K = a_q.shape
    N = w.shape[0]
    named = {"STAGES": cfg["num_stages"], "OUT_INT32": out.dtype == torch.int32, "HAS_BIAS": bias is not None,
             "GROUP_M": cfg.get("GROUP_M", 8), "MMA_REGS": _gluon.WS_MMA_REGS,
             "LOAD_REGS": _gluon.WS_LOAD_REGS}
    return _cached_launch(_LAUNCH_WS, w8a8_gluon_ws_kernel, (walk_programs(M, N, cfg, a_q.device),), cfg, out,
                          (a_q, w, out), (*_epilogue_args(a_scale, w_scale, bias, out), M, N, K), named,
                          lambda: descriptors(a_q, w, out, cfg)[:3], dict(_gluon.WS_LAUNCH))


def _launch_fp16_rows(a_q, w, w_scale, bias, out, cfg: dict, row_bits, x, w_fp16, walk: bool) -> torch.Tensor:
    """``MIXED_PASS``'s second launch on ``cfg``'s tile (the plain kernel's, :func:`plain_tile`): a program a tile,
    or with ``walk`` one an SM (:func:`walks_fp16_rows`)."""
    M, K = a_q.shape
    N = w.shape[0]
    if walk:
        grid = (walk_programs(M, N, cfg, a_q.device),)
    else:
        grid = ((M + cfg["BLOCK_M"] - 1) // cfg["BLOCK_M"], (N + cfg["BLOCK_N"] - 1) // cfg["BLOCK_N"])
    wf = w_fp16 if w_fp16 is not None else w
    named = {"STAGES": cfg["num_stages"], "WARPS": cfg["num_warps"], "HAS_BIAS": bias is not None,
             "HAS_FP16_W": w_fp16 is not None, "WALK": walk, "CHUNK": FP16_WALK_CHUNK}

    def descs():
        a_d, w_d, _, xf_d, wf_d = descriptors(a_q, w, out, cfg, x, wf)
        return a_d, w_d, xf_d, wf_d

    return _cached_launch(_LAUNCH_FP16_ROWS, w8a8_gluon_fp16_rows_kernel, grid, cfg, out, (a_q, w, x, wf),
                          (out, w_scale, bias if bias is not None else w_scale, row_bits, M, N, K), named, descs,
                          {"num_warps": cfg["num_warps"]})


def launch(a_q, a_scale, w, w_scale, bias, out, cfg: dict, row_bits=None, x=None, w_fp16=None,
           pdl: bool = False) -> torch.Tensor:
    """``out`` = the W8A8 GEMM of quantized activations a_q (M, K) int8 with a_scale (M,) fp32 and w (N, K) int8
    with w_scale (N,) fp32 (an int32 ``out`` receives the raw accumulator).  ``applies`` must hold.
    ``row_bits`` ((M,) uint8, mixed mode; :func:`applies_mixed` must hold too): rows with bit 0 set are computed
    from ``x`` (the fp16 / bf16 activations a_q came from) on ``w_fp16``, or on w scaled per channel.
    ``pdl``: launched programmatically right after the launch that wrote a_q and a_scale (``_common.pdl_supported``
    must hold): the weight loads start while it runs.  A ``WARP_SPECIALIZE`` config runs the warp-specialized
    kernel on a plain call (:func:`warp_specialized`; ``pdl`` is ignored there)."""
    mixed = row_bits is not None
    if mixed and mixed_pass(cfg, out.element_size()):
        _launch_ws(a_q, a_scale, w, w_scale, bias, out, cfg)  # every row as INT8, then the FP16 rows' tiles
        return _launch_fp16_rows(a_q, w, w_scale, bias, out, plain_tile(cfg), row_bits, x, w_fp16,
                                 walks_fp16_rows(cfg))
    if mixed and walks(cfg):
        cfg = plain_tile(cfg)
    if warp_specialized(cfg, mixed, out.element_size()):  # launched after the quantization has finished (no PDL)
        return _launch_ws(a_q, a_scale, w, w_scale, bias, out, cfg)
    M, K = a_q.shape
    N = w.shape[0]
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    split_k = int(cfg.get("SPLIT_K", 1))
    grid = ((M + bm - 1) // bm, (N + bn - 1) // bn, split_k)
    scales, w_sc, b = _epilogue_args(a_scale, w_scale, bias, out)
    part, lock = _common.splitk_buffers(a_q.device, grid[0] * grid[1], split_k, bm * bn, 0)
    named = {"STAGES": cfg["num_stages"], "WARPS": cfg["num_warps"], "OUT_INT32": out.dtype == torch.int32,
             "HAS_BIAS": bias is not None, "ROW_BITS": mixed, "HAS_FP16_W": w_fp16 is not None, "PDL": pdl,
             "SPLIT_K": split_k}
    ptrs = (out, scales, w_sc, b, row_bits if mixed else scales, part, lock, M, N, K)
    wf = (w_fp16 if w_fp16 is not None else w) if mixed else None
    # a plain call's descriptor parameters for the FP16 loop are constexpr stand-ins (None)
    tensors, prefix = ((a_q, w, out, x, wf), ()) if mixed else ((a_q, w, out), (None, None))
    return _cached_launch(_LAUNCH, w8a8_gluon_kernel, grid, cfg, out, tensors, ptrs, named,
                          lambda: descriptors(a_q, w, out, cfg, x if mixed else None, wf),
                          {"num_warps": cfg["num_warps"], **_common.pdl_option(pdl)}, prefix)


def build_for_target(cfg: dict, out_dtype=torch.float16, has_bias: bool = False, cc: int = 90,
                     row_bits: bool = False, fp16_copy: bool = False, pdl: bool = False, fp16_pass: bool = False,
                     walk: bool = False):
    """Compile the kernel for sm_``cc`` without a GPU (the descriptor signatures mangled from CPU tensors as a
    launch would; Triton's Gluon pipeline, LLVM and ptxas): the CPU suite's build check and the probe's report.
    ``row_bits``: mixed mode (x of ``out_dtype``), FP16 rows on an FP16 copy of the weight or on the int8 one;
    ``pdl``: the programmatic launch's form.  A ``WARP_SPECIALIZE`` config of a plain call builds the
    warp-specialized kernel; ``fp16_pass`` (with ``row_bits``) ``MIXED_PASS``'s second launch (``walk``: its
    walking form)."""
    a = torch.empty(256, 256, dtype=torch.int8)
    w = torch.empty(256, 256, dtype=torch.int8)
    c = torch.empty(256, 256, dtype=out_dtype)
    x = torch.empty(256, 256, dtype=out_dtype) if row_bits else None
    wf = (torch.empty(256, 256, dtype=out_dtype) if fp16_copy else w) if row_bits else None
    a_d, w_d, c_d, xf_d, wf_d = descriptors(a, w, c, cfg, x, wf)
    ptr = "*fp32"
    types = {"a_desc": _gluon.mangle(a_d), "w_desc": _gluon.mangle(w_d), "c_desc": _gluon.mangle(c_d),
             "xf_desc": _gluon.mangle(xf_d) if row_bits else "constexpr",
             "wf_desc": _gluon.mangle(wf_d) if row_bits else "constexpr",
             "c_ptr": {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int32: "*i32"}[out_dtype],
             "as_ptr": ptr, "ws_ptr": ptr, "bias_ptr": "*fp16" if has_bias else ptr,
             "rb_ptr": "*u8" if row_bits else ptr, "part_ptr": "*i32", "lock_ptr": "*i32",
             "M": "i32", "N": "i32", "K": "i32"}
    consts = {"STAGES": cfg["num_stages"], "WARPS": cfg["num_warps"], "OUT_INT32": out_dtype == torch.int32,
              "HAS_BIAS": has_bias, "ROW_BITS": row_bits, "HAS_FP16_W": row_bits and fp16_copy, "PDL": pdl,
              "GROUP_M": cfg.get("GROUP_M", 8), "SPLIT_K": int(cfg.get("SPLIT_K", 1)),
              "MMA_REGS": _gluon.WS_MMA_REGS, "LOAD_REGS": _gluon.WS_LOAD_REGS, "WALK": walk,
              "CHUNK": FP16_WALK_CHUNK}
    options = {}
    if fp16_pass:
        kernel = w8a8_gluon_fp16_rows_kernel
    elif warp_specialized(cfg, row_bits, c.element_size()):
        kernel, options = w8a8_gluon_ws_kernel, {"maxnreg": _gluon.WS_MAXNREG}
    else:
        kernel = w8a8_gluon_kernel
    names = kernel.arg_names
    sig = {n: types.get(n, "constexpr") for n in names}  # in the kernel's parameter order
    consts = {n: v for n, v in consts.items() if n in names}
    if not row_bits and "xf_desc" in names:
        consts.update(xf_desc=None, wf_desc=None)
    return _gluon.compile_for_target(kernel, sig, consts, cfg["num_warps"], cc, **options)
