"""W4A16 / W8A16 GEMM for Hopper in Triton's Gluon dialect (``BACKEND="gluon"`` in a W4A16 config).

Why: the ``tl.dot`` kernel of ``wna16.py`` dequantizes each 128-K weight block in registers and Triton then
either stores it to shared memory and waits for the wgmma (unswapped), or feeds it from registers with the
accumulation chained (``SWAP_AB``); its tiles are small (64 x 64 at M = 128), so x is re-read from L2 once per 64
columns and each weight is dequantized once per 64 rows.  Both kernels here take whole 128-K blocks through a
TMA ring of ``STAGES`` slots (x as [BM, 64] boxes, the packed words as one [R, BN] box) and dequantize each
weight once per CTA:

* ``wna16_gluon_kernel`` (shared operand; any bits / group size): the warps unpack the words (``wna16``'s 16-bit
  magic numbers: ``(u | MAGIC16)`` read as x.dtype is ``M16 + u`` exactly, one 16-bit subtraction gives
  ``q - zero``; ``NIBBLES_*`` does two fields per LOP3 for 4-bit), multiply by the group scale in x.dtype
  (``SCALE_W``'s rounding) and store the [128, BN] tile into one of two shared buffers; ``warpgroup_mma`` reads
  it while the next block is unpacked into the other (``warpgroup_mma_wait``: the previous block's wgmmas are
  then complete, their ring slot refilled).
* ``wna16_gluon_rs_kernel`` (``RS`` in the config; 4-bit, group >= 128): C^T = W x^T with the unpacked weights
  as the wgmma's register operand, read from shared memory straight into its fragment layout (no dequantized
  tile in shared memory, no fence or barrier before the wgmma); the next block is unpacked while this block's
  wgmmas run.
* ``wna16_gluon_rs_ws_kernel`` (``RS`` and ``WARP_SPECIALIZE``; BLOCK_N 128): the same loop, warp-specialized: a
  one-warp loader fills the ring and two MMA warpgroups take 64 weight rows each, handing each slot back through
  an "empty" mbarrier instead of refilling it themselves.

The next block's scales are loaded one iteration ahead, after the wgmmas are issued (a ``fence_async_shared``
before would wait for them).  K splits (grid axis 2) reduce in-kernel as the ``tl.dot`` kernels do: each split
stores its fp32 partial, the last to arrive at the tile's counter sums them and resets it
(``_common.splitk_sum``'s protocol).

Layout: ``wna16.prepack_wna16``'s (``qw`` (K_pad // PER, N) int32, N contiguous: a [R, BN] box per 128-K block).
Scope: 4-bit (fp16, bf16) and 8-bit (fp16) weights, any group size ``wna16`` accepts, on sm_90; x contiguous with
16-byte rows, N a multiple of 4, the tile's buffers within an SM's shared memory (``applies``).  No interpreter:
the CPU suite compiles both (``build_for_target``); ``tests/kernels/test_gpu.py`` checks them on the GPU.
"""

from __future__ import annotations

import torch

from quantkit.kernels import _common, _gluon
from quantkit.kernels._gluon import GLUON_ERROR, fence_async_shared, gl, gluon, mbarrier, tma_load, \
    warpgroup_mma, warpgroup_mma_init, warpgroup_mma_wait

PACK_K = 128  # wna16.PACK_K: one scale row per 128-K block when group_size >= 128
BLOCK_K = gl.constexpr(PACK_K) if GLUON_ERROR is None else PACK_K

# the TMA-fed GEMV's TIMELINE entries a program (int64, in this order): clock64 cycles at the multiplying
# partition's start, when its first slot has landed, at its loop's end and at its end; globaltimer nanoseconds at
# its start and end; clock64 cycles at the loader's start and after its last TMA
TIMELINE_FIELDS = ("start", "first", "loop_end", "end", "start_ns", "end_ns", "load_start", "load_end")
(TL_START, TL_FIRST, TL_LOOP_END, TL_END, TL_START_NS, TL_END_NS, TL_LOAD_START, TL_LOAD_END, TIMELINE_SLOTS) = (
    gl.constexpr(i) if GLUON_ERROR is None else i for i in range(len(TIMELINE_FIELDS) + 1))


# 16-bit magic number pair (M16 + u in each half), subtraction and multiplication of 16-bit pairs, per x.dtype
_PAIR_OPS = {"f16": (0x64006400, "sub.f16x2", "mul.rn.f16x2"), "bf16": (0x43004300, "sub.rn.bf16x2", "mul.rn.bf16x2")}


def _pair_fields(wa: str, wb: str, k: int, lo: str, hi: str, s: str, z: str, dt: str) -> list[str]:
    """PTX for fields k and k + 4 of two packed words (``wa``, ``wb``: columns or K rows side by side): one LOP3 a
    word masks both fields into 16-bit magic numbers (field k low, k + 4 high; a shift by 4k first brings field k
    down), two PRMTs regroup the two words' halves into field k's pair (``lo``) and field k + 4's (``hi``), then
    (M16 + u - z) * s on each pair: 2.4 instructions a weight, 3.5 with Triton's own unpacking.  Registers a, b, t
    are the caller's scratch."""
    magic, sub, mul = _PAIR_OPS[dt]
    out = []
    for w, r in ((wa, "a"), (wb, "b")):
        src = w
        if k:
            out.append(f"shr.u32 t, {w}, {4 * k};")
            src = "t"
        out.append(f"lop3.b32 {r}, {src}, 0x000F000F, {magic:#010x}, 0xEA;")
    out += [f"prmt.b32 {lo}, a, b, 0x5410;", f"prmt.b32 {hi}, a, b, 0x7632;"]
    for o in (lo, hi):
        out += [f"{sub} {o}, {o}, {z};", f"{mul} {o}, {o}, {s};"]
    return out


def _nibbles_asm(dt: str) -> str:
    """Two packed words (columns n, n + 1: $8, $9; pack 2) -> field j's two columns as one 16-bit pair in $j, with
    the columns' scale and zero-term pairs $10, $11 (the shared-operand kernel's 4-bit unpacking)."""
    lines = ["{", ".reg .b32 a, b, t;"]
    for k in range(4):
        lines += _pair_fields("$8", "$9", k, f"${k}", f"${k + 4}", "$10", "$11", dt)
    return "\n".join(lines + ["}"])


def _nibbles_frag_asm(k: int, dt: str) -> str:
    """A thread's whole A fragments of K-chunks k and k + 4 (the register-operand kernel, pack 8): eight words
    $8-$15 (four K pairs), the pairs' scales $16-$19 and zero terms $20-$23 -> field k's four registers $0-$3 and
    field k + 4's $4-$7, each fragment's registers in the order its wgmma reads them."""
    lines = ["{", ".reg .b32 a, b, t;"]
    for p in range(4):
        lines += _pair_fields(f"${8 + 2 * p}", f"${9 + 2 * p}", k, f"${p}", f"${4 + p}", f"${16 + p}", f"${20 + p}",
                              dt)
    return "\n".join(lines + ["}"])


def _hold_asm() -> str:
    """A use of a thread's 32 fragment registers ($4-$35) that ptxas must keep: eight stores predicated on a weight
    row index ($36) being negative, which it never is (so none runs; the outputs $0-$3 are zeros).  Placed after
    the wait for the wgmmas reading the fragments, it keeps them live, in their own registers, until then."""
    stores = " ".join(f"@p st.global.v4.b32 [ad], {{${4 + 4 * i}, ${5 + 4 * i}, ${6 + 4 * i}, ${7 + 4 * i}}};"
                      for i in range(8))
    return ("{ .reg .pred p; .reg .b64 ad; mov.b64 ad, 0; setp.lt.s32 p, $36, 0; " + stores
            + " mov.b32 $0, 0; mov.b32 $1, 0; mov.b32 $2, 0; mov.b32 $3, 0; }")


if GLUON_ERROR is None:
    FRAG_F16_0, FRAG_F16_1, FRAG_F16_2, FRAG_F16_3 = (gl.constexpr(_nibbles_frag_asm(k, "f16")) for k in range(4))
    FRAG_BF16_0, FRAG_BF16_1, FRAG_BF16_2, FRAG_BF16_3 = (gl.constexpr(_nibbles_frag_asm(k, "bf16")) for k in range(4))
    FRAG_CONSTRAINTS = gl.constexpr(",".join(["=r"] * 8 + ["r"] * 16))
    HOLD_ASM = gl.constexpr(_hold_asm())
    HOLD_CONSTRAINTS = gl.constexpr(",".join(["=r"] * 4 + ["r"] * 40))
    NIBBLES_F16 = gl.constexpr(_nibbles_asm("f16"))
    NIBBLES_BF16 = gl.constexpr(_nibbles_asm("bf16"))

if GLUON_ERROR is None:

    @gluon.constexpr_function
    def _fields_layout(PER, R, BN, num_warps):
        """Blocked layout of the [PER, R, BN] unpacked fields: a thread holds every field of its words (the
        unpack is register-local) and 8 (else 4, 2, 1) consecutive columns (16-byte stores of the dequantized
        fp16 values); the warp's threads along N first, no element held twice where possible."""
        for spt in (8, 4, 2, 1):
            tpw_n = min(32, max(1, BN // spt))
            tpw_r = 32 // tpw_n
            wr = max(1, min(num_warps, R // tpw_r))
            wn = num_warps // wr
            if wr * wn == num_warps and spt * tpw_n * wn <= BN and tpw_r * wr <= R:
                return gl.BlockedLayout([PER, 1, spt], [1, tpw_r, tpw_n], [1, wr, wn], [2, 1, 0])
        return gl.BlockedLayout([PER, 1, 1], [1, 1, 32], [1, 1, num_warps], [2, 1, 0])

    @gluon.constexpr_function
    def _mma_layout(rows, cols, num_warps):
        """fp16 / bf16 wgmma accumulator layout of a (rows, cols) tile (``_gluon.mma_warps``; instruction N =
        cols / warps along the columns): (BM, BN) in the shared-operand kernel, C^T's (BN, BM) in the RS one."""
        w = _gluon.mma_warps(rows, num_warps)
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=w, instr_shape=[16, cols // w[1], 16])

    @gluon.constexpr_function
    def _tile_layout(rows, cols, dtype):
        return gl.NVMMASharedLayout.get_default_for([rows, cols], dtype)

    @gluon.jit
    def _k_split(K, SPLIT_K: gl.constexpr):
        """This program's share of K (grid axis 2): its first 128-K block and how many it takes (0 past K)."""
        n_blocks = gl.cdiv(K, BLOCK_K)
        per_split = gl.cdiv(n_blocks, SPLIT_K)
        b_lo = gl.program_id(2) * per_split
        return b_lo, gl.maximum(gl.minimum(n_blocks, b_lo + per_split) - b_lo, 0)

    @gluon.jit
    def _load_block(x_desc, w_desc, x_ring, w_ring, ready, slot, blk, live, off_m, off_n):
        """TMA of 128-K block ``blk`` into ring slot ``slot`` (x's BLOCK_K // BKX boxes, then the packed words),
        all counted on the slot's barrier; predicated off where not ``live``."""
        BKX: gl.constexpr = x_desc.block_type.shape[1]
        XB: gl.constexpr = BLOCK_K // BKX
        bar = ready.index(slot)
        mbarrier.expect(bar, XB * x_desc.block_type.nbytes + w_desc.block_type.nbytes, pred=live)
        for h in gl.static_range(XB):
            tma_load(x_desc, [off_m, blk * BLOCK_K + h * BKX], bar, x_ring.index(slot * XB + h), pred=live)
        tma_load(w_desc, [blk * w_desc.block_type.shape[0], off_n], bar, w_ring.index(slot), pred=live)

    @gluon.jit
    def _ring_buffers(x_desc, w_desc, STAGES: gl.constexpr):
        """The x and word rings and their "landed" barriers."""
        x_ring = gl.allocate_shared_memory(x_desc.dtype, [STAGES * (BLOCK_K // x_desc.block_type.shape[1]),
                                                          x_desc.block_type.shape[0], x_desc.block_type.shape[1]],
                                           x_desc.layout)
        w_ring = gl.allocate_shared_memory(w_desc.dtype, [STAGES, w_desc.block_type.shape[0],
                                                          w_desc.block_type.shape[1]], w_desc.layout)
        return x_ring, w_ring, _gluon.ready_barriers(STAGES)

    @gluon.jit
    def _rings(x_desc, w_desc, b_lo, nb, off_m, off_n, STAGES: gl.constexpr, LOADED: gl.constexpr):
        """The rings (``_ring_buffers``), this split's first ``LOADED`` blocks requested."""
        x_ring, w_ring, ready = _ring_buffers(x_desc, w_desc, STAGES)
        for s in gl.static_range(LOADED):
            _load_block(x_desc, w_desc, x_ring, w_ring, ready, s, b_lo + s, s < nb, off_m, off_n)
        return x_ring, w_ring, ready

    @gluon.jit
    def _drain(acc, ready, STAGES: gl.constexpr):
        """After the K loop: the last wgmmas complete, the ring's barriers invalidated."""
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(s))
        return acc

    @gluon.jit
    def _grid_tile():
        """The split-K counter of this program's output tile (grid axes 0 and 1; the K split is axis 2)."""
        return gl.program_id(1) * gl.num_programs(0) + gl.program_id(0)

    @gluon.jit
    def _finish(acc, m, n, offs, tile, M, N, stride_cm, bias_ptr, c_ptr, ws_ptr, lock_ptr, HAS_BIAS: gl.constexpr,
                SPLIT_K: gl.constexpr):
        """The kernels' epilogue: the tile's output rows ``m`` and columns ``n`` (index tensors broadcasting to
        acc's shape, in either orientation), ``offs`` the split-K workspace places, ``tile`` its counter; the K
        splits summed (split 2), bias added, the tile stored."""
        c_mask = (m < M) & (n < N)
        if SPLIT_K > 1:
            acc, last = _gluon.splitk_sum(acc, ws_ptr, lock_ptr, tile, gl.program_id(2), offs, SPLIT_K,
                                          acc.shape[0] * acc.shape[1])
            c_mask = c_mask & last
        if HAS_BIAS:
            acc += gl.load(bias_ptr + n, mask=n < N, other=0.0).to(gl.float32)
        gl.store(c_ptr + m.to(gl.int64) * stride_cm + n, acc.to(c_ptr.dtype.element_ty), mask=c_mask)

    @gluon.jit
    def _scale_zero(s_ptr, z_ptr, rows, N, cols, cmask, HAS_ZERO: gl.constexpr, OFFSET: gl.constexpr,
                    M16: gl.constexpr, dt: gl.constexpr):
        """Scales of group rows ``rows`` (broadcast against ``cols``) in x.dtype, and what one 16-bit subtraction
        takes off a magic number: M16 + offset (+ the raw zero point)."""
        s = gl.load(s_ptr + rows * N + cols, mask=cmask, other=0.0).to(dt)
        if HAS_ZERO:
            z = gl.load(z_ptr + rows * N + cols, mask=cmask, other=0).to(gl.float32)
            zc = (z + (M16 + OFFSET)).to(dt)
        else:
            zc = gl.full(s.shape, M16 + OFFSET, dt, layout=s.type.layout)
        return s, zc

    @gluon.jit
    def _block_scales(s_ptr, z_ptr, blk, group_size, n_groups, N, cols, cmask, HAS_ZERO: gl.constexpr,
                      OFFSET: gl.constexpr, M16: gl.constexpr, dt: gl.constexpr):
        """``_scale_zero`` of 128-K block ``blk``'s group (group >= 128: one per block; past the last, the last)."""
        return _scale_zero(s_ptr, z_ptr, gl.minimum(blk * BLOCK_K // group_size, n_groups - 1), N, cols, cmask,
                           HAS_ZERO, OFFSET, M16, dt)

    @gluon.jit
    def wna16_gluon_kernel(x_desc, w_desc, s_ptr, z_ptr, bias_ptr, c_ptr, ws_ptr, lock_ptr,
                           M, N, K, n_groups, group_size, stride_cm,
                           BITS: gl.constexpr, HAS_ZERO: gl.constexpr, HAS_BIAS: gl.constexpr,
                           GS_SMALL: gl.constexpr, SPLIT_K: gl.constexpr, STAGES: gl.constexpr,
                           WARPS: gl.constexpr, MAGIC16: gl.constexpr, M16: gl.constexpr):
        BM: gl.constexpr = x_desc.block_type.shape[0]
        BKX: gl.constexpr = x_desc.block_type.shape[1]  # x box along K: 128 // BKX boxes per 128-K block
        R: gl.constexpr = w_desc.block_type.shape[0]  # word rows per 128-K block (128 // PER)
        BN: gl.constexpr = w_desc.block_type.shape[1]
        XB: gl.constexpr = BLOCK_K // BKX
        PER: gl.constexpr = 32 // BITS
        OFFSET: gl.constexpr = 1 << (BITS - 1)
        MASK: gl.constexpr = (1 << BITS) - 1
        dt: gl.constexpr = x_desc.dtype
        FL: gl.constexpr = _fields_layout(PER, R, BN, WARPS)
        ML: gl.constexpr = _mma_layout(BM, BN, WARPS)

        off_m = gl.program_id(0) * BM
        off_n = gl.program_id(1) * BN
        b_lo, nb = _k_split(K, SPLIT_K)
        x_ring, w_ring, ready = _rings(x_desc, w_desc, b_lo, nb, off_m, off_n, STAGES, STAGES - 1)
        d_ring = gl.allocate_shared_memory(dt, [2, BLOCK_K, BN], _tile_layout(BLOCK_K, BN, dt))

        WL: gl.constexpr = gl.SliceLayout(0, FL)  # the [R, BN] word tile
        cols = (off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, gl.SliceLayout(1, FL))))[None, None, :]
        cmask = cols < N
        cols2 = (off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, WL)))[None, :]
        cmask2 = cols2 < N
        fields = gl.arange(0, PER, layout=gl.SliceLayout(1, gl.SliceLayout(2, FL)))[:, None, None]
        acc = gl.zeros((BM, BN), dtype=gl.float32, layout=ML)
        # the next block's scales (and zeros) are loaded one iteration ahead, after this block's wgmmas are
        # issued: their latency is spent behind the wait, the refill and the next block's wait and unpacking (issued
        # before the fence instead, the fence's MEMBAR.ALL.CTA would wait for them)
        sc_next, zc_next = _block_scales(s_ptr, z_ptr, b_lo, group_size, n_groups, N, cols2, cmask2, HAS_ZERO, OFFSET,
                                         M16, dt)
        for ki in range(nb):
            slot = ki % STAGES
            blk = b_lo + ki
            sc2 = sc_next
            zc2 = zc_next
            mbarrier.wait(ready.index(slot), (ki // STAGES) & 1)
            wp = w_ring.index(slot).load(WL)
            d = d_ring.index(ki % 2)
            if BITS == 4 and not GS_SMALL:  # half2 asm (NIBBLES_*), then one [128, BN] store
                sc, zc = sc2, zc2
                if dt == gl.float16:
                    f0, f1, f2, f3, f4, f5, f6, f7 = gl.inline_asm_elementwise(
                        NIBBLES_F16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r", [wp, sc, zc],
                        dtype=(gl.float16, gl.float16, gl.float16, gl.float16, gl.float16, gl.float16, gl.float16,
                               gl.float16), is_pure=True, pack=2)
                else:
                    f0, f1, f2, f3, f4, f5, f6, f7 = gl.inline_asm_elementwise(
                        NIBBLES_BF16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r", [wp, sc, zc],
                        dtype=(gl.bfloat16, gl.bfloat16, gl.bfloat16, gl.bfloat16, gl.bfloat16, gl.bfloat16,
                               gl.bfloat16, gl.bfloat16), is_pure=True, pack=2)
                # [R, BN, 2, 2, 2] (field = i + 2 k + 4 l on the last three) -> field-major [PER, R, BN] -> rows
                t = gl.join(gl.join(gl.join(f0, f1), gl.join(f2, f3)), gl.join(gl.join(f4, f5), gl.join(f6, f7)))
                d.store(gl.reshape(gl.permute(t, (4, 3, 2, 0, 1)), [BLOCK_K, BN]))
            else:
                # group of each field (K rows j * R .. j * R + R - 1 of the block): one per block when group >= 128
                if GS_SMALL:
                    g = gl.minimum((blk * BLOCK_K + fields * R) // group_size, n_groups - 1)
                    sc, zc = _scale_zero(s_ptr, z_ptr, g, N, cols, cmask, HAS_ZERO, OFFSET, M16, dt)
                else:  # the prefetched (1, BN) pair, broadcast over the fields
                    sc = gl.expand_dims(gl.convert_layout(sc2, gl.SliceLayout(0, FL)), 0)
                    zc = gl.expand_dims(gl.convert_layout(zc2, gl.SliceLayout(0, FL)), 0)
                u = (wp[None, :, :] >> (fields * BITS)) & MASK  # [PER, R, BN]: row j * R + i of the block
                wq = (u | MAGIC16).to(gl.int16).to(dt, bitcast=True)
                d.store(gl.reshape((wq - zc) * sc, [BLOCK_K, BN]))
            fence_async_shared()
            for h in gl.static_range(XB):
                acc = warpgroup_mma(x_ring.index(slot * XB + h), d.slice(h * BKX, BKX, dim=0), acc, is_async=True)
            sc_next, zc_next = _block_scales(s_ptr, z_ptr, blk + 1, group_size, n_groups, N, cols2, cmask2,
                                             HAS_ZERO, OFFSET, M16, dt)
            # this block's wgmmas stay in flight; the previous block's (slot ki - 1, the other buffer) are complete
            acc = warpgroup_mma_wait(num_outstanding=XB, deps=(acc, ))
            nk = ki + STAGES - 1  # into the slot of block ki - 1
            _load_block(x_desc, w_desc, x_ring, w_ring, ready, nk % STAGES, b_lo + nk, nk < nb, off_m, off_n)
        acc = _drain(acc, ready, STAGES)
        rows_t = gl.arange(0, BM, layout=gl.SliceLayout(1, ML))
        cols_t = gl.arange(0, BN, layout=gl.SliceLayout(0, ML))
        _finish(acc, (off_m + rows_t)[:, None], (off_n + cols_t)[None, :], rows_t[:, None] * BN + cols_t[None, :],
                _grid_tile(), M, N, stride_cm, bias_ptr, c_ptr, ws_ptr, lock_ptr, HAS_BIAS, SPLIT_K)


    @gluon.constexpr_function
    def _store_layout_t(BN, BM, num_warps):
        """Blocked layout of the (BN, BM) result with 8 consecutive output columns (n) a thread: 16-byte stores."""
        t0 = min(32, max(1, BN // 8))
        return gl.BlockedLayout([8, 1], [t0, 32 // t0], [1, num_warps], [0, 1])

    @gluon.jit
    def _frag_pair(asm: gl.constexpr, wp, sc, zc, BF16: gl.constexpr):
        """Fields k and k + 4 of a thread's words as A fragments (``asm``: a ``_nibbles_frag_asm`` statement)."""
        if BF16:
            lo, hi = gl.inline_asm_elementwise(asm, FRAG_CONSTRAINTS, [wp, sc, zc], dtype=(gl.bfloat16, gl.bfloat16),
                                               is_pure=True, pack=8)
        else:
            lo, hi = gl.inline_asm_elementwise(asm, FRAG_CONSTRAINTS, [wp, sc, zc], dtype=(gl.float16, gl.float16),
                                               is_pure=True, pack=8)
        return lo, hi

    @gluon.jit
    def _frags(wp, sc, zc, dt: gl.constexpr):
        """A thread's A fragments of a whole 128-K block (K-chunks 0-7) from its words ``wp``."""
        if dt == gl.float16:
            f0, f4 = _frag_pair(FRAG_F16_0, wp, sc, zc, False)
            f1, f5 = _frag_pair(FRAG_F16_1, wp, sc, zc, False)
            f2, f6 = _frag_pair(FRAG_F16_2, wp, sc, zc, False)
            f3, f7 = _frag_pair(FRAG_F16_3, wp, sc, zc, False)
        else:
            f0, f4 = _frag_pair(FRAG_BF16_0, wp, sc, zc, True)
            f1, f5 = _frag_pair(FRAG_BF16_1, wp, sc, zc, True)
            f2, f6 = _frag_pair(FRAG_BF16_2, wp, sc, zc, True)
            f3, f7 = _frag_pair(FRAG_BF16_3, wp, sc, zc, True)
        return f0, f1, f2, f3, f4, f5, f6, f7

    @gluon.jit
    def _rs_mmas(f0, f1, f2, f3, f4, f5, f6, f7, x_ring, xi, acc):
        """acc += the block's fragments (registers, [BN, 16] each) x its two x boxes (ring entries xi, xi + 1),
        transposed (K-major B): eight async wgmmas, one fence and issue each, not waited for."""
        a = warpgroup_mma(f0, x_ring.index(xi).slice(0, 16, dim=1).permute((1, 0)), acc, is_async=True)
        a = warpgroup_mma(f1, x_ring.index(xi).slice(16, 16, dim=1).permute((1, 0)), a, is_async=True)
        a = warpgroup_mma(f2, x_ring.index(xi).slice(32, 16, dim=1).permute((1, 0)), a, is_async=True)
        a = warpgroup_mma(f3, x_ring.index(xi).slice(48, 16, dim=1).permute((1, 0)), a, is_async=True)
        a = warpgroup_mma(f4, x_ring.index(xi + 1).slice(0, 16, dim=1).permute((1, 0)), a, is_async=True)
        a = warpgroup_mma(f5, x_ring.index(xi + 1).slice(16, 16, dim=1).permute((1, 0)), a, is_async=True)
        a = warpgroup_mma(f6, x_ring.index(xi + 1).slice(32, 16, dim=1).permute((1, 0)), a, is_async=True)
        return warpgroup_mma(f7, x_ring.index(xi + 1).slice(48, 16, dim=1).permute((1, 0)), a, is_async=True)

    @gluon.jit
    def _hold(f0, f1, f2, f3, f4, f5, f6, f7, rows16):
        """Keep the fragments live up to here (``HOLD_ASM``; ``rows16``: the weight rows, never negative)."""
        gl.inline_asm_elementwise(HOLD_ASM, HOLD_CONSTRAINTS, [f0, f1, f2, f3, f4, f5, f6, f7, rows16],
                                  dtype=f0.dtype, is_pure=False, pack=8)

    @gluon.jit
    def _rs_words(w_ring, slot, AL: gl.constexpr, COL0: gl.constexpr, BNC: gl.constexpr):
        """Ring slot ``slot``'s packed words of weight rows COL0 .. COL0 + BNC - 1 of the box, in the A fragments'
        layout (``AL``; the whole box where BNC is its width)."""
        w = w_ring.index(slot)
        if BNC != w.shape[1]:
            w = w.slice(COL0, BNC, dim=1)
        return w.permute((1, 0)).load(AL)

    @gluon.jit
    def _rs_loop(x_desc, w_desc, x_ring, w_ring, ready, empty, s_ptr, z_ptr, N, n_groups, group_size, b_lo, nb,
                 off_m, off_n, HAS_ZERO: gl.constexpr, STAGES: gl.constexpr, M16: gl.constexpr, WARPS: gl.constexpr,
                 COL0: gl.constexpr, BNC: gl.constexpr, RELEASE: gl.constexpr):
        """The register-operand K loop over this split's ``nb`` blocks from ``b_lo``: C^T's (BNC, BM) tile of the
        box's weight rows COL0 .. COL0 + BNC - 1 (output columns off_n + COL0 ...), complete on return.  Each
        block's slot, once its wgmmas have completed and its words been read, is refilled with the block STAGES
        on (the plain kernel), or with RELEASE handed back to the load partition (one arrive on ``empty``)."""
        BM: gl.constexpr = x_desc.block_type.shape[0]
        BKX: gl.constexpr = x_desc.block_type.shape[1]
        XB: gl.constexpr = BLOCK_K // BKX
        OFFSET: gl.constexpr = 8
        dt: gl.constexpr = x_desc.dtype
        ML: gl.constexpr = _mma_layout(BNC, BM, WARPS)  # C^T: the weight rows are the wgmma's M
        AL: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ML, k_width=2)

        rows = (off_n + COL0 + gl.arange(0, BNC, layout=gl.SliceLayout(1, AL)))[:, None]  # weight rows
        rmask = rows < N
        sc_next, zc_next = _block_scales(s_ptr, z_ptr, b_lo, group_size, n_groups, N, rows, rmask, HAS_ZERO, OFFSET,
                                         M16, dt)
        # block 0's fragments before the loop; in the loop block ki + 1's are unpacked while block ki's wgmmas run
        mbarrier.wait(ready.index(0), 0, pred=nb > 0)
        f0, f1, f2, f3, f4, f5, f6, f7 = _frags(_rs_words(w_ring, 0, AL, COL0, BNC), sc_next, zc_next, dt)
        sc_next, zc_next = _block_scales(s_ptr, z_ptr, b_lo + 1, group_size, n_groups, N, rows, rmask, HAS_ZERO,
                                         OFFSET, M16, dt)
        rows16 = rows + gl.zeros((BNC, 16), gl.int32, layout=AL)
        acc = gl.zeros((BNC, BM), dtype=gl.float32, layout=ML)
        for ki in range(nb):
            slot = ki % STAGES
            a = _rs_mmas(f0, f1, f2, f3, f4, f5, f6, f7, x_ring, slot * XB, acc)
            nslot = (ki + 1) % STAGES
            mbarrier.wait(ready.index(nslot), ((ki + 1) // STAGES) & 1, pred=ki + 1 < nb)
            g0, g1, g2, g3, g4, g5, g6, g7 = _frags(_rs_words(w_ring, nslot, AL, COL0, BNC), sc_next, zc_next, dt)
            sc_next, zc_next = _block_scales(s_ptr, z_ptr, b_lo + ki + 2, group_size, n_groups, N, rows, rmask,
                                             HAS_ZERO, OFFSET, M16, dt)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(a, ))
            _hold(f0, f1, f2, f3, f4, f5, f6, f7, rows16)
            if RELEASE:  # block ki's wgmmas are complete, its words read: the slot goes back to the loader
                mbarrier.arrive(empty.index(slot), count=1)
            else:
                nk = ki + STAGES  # into block ki's slot
                _load_block(x_desc, w_desc, x_ring, w_ring, ready, slot, b_lo + nk, nk < nb, off_m, off_n)
            f0, f1, f2, f3, f4, f5, f6, f7 = g0, g1, g2, g3, g4, g5, g6, g7
        return acc

    @gluon.jit
    def _rs_finish(acc, off_m, off_n, tile, M, N, stride_cm, bias_ptr, c_ptr, ws_ptr, lock_ptr,
                   HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr, WARPS: gl.constexpr):
        """The register-operand epilogue: C^T's (BNC, BM) tile (output columns off_n ..., rows off_m ...) through
        ``_finish`` in 16-byte-store layout."""
        BNC: gl.constexpr = acc.shape[0]
        BM: gl.constexpr = acc.shape[1]
        SL: gl.constexpr = _store_layout_t(BNC, BM, WARPS)
        acc = gl.convert_layout(acc, SL)
        rows_t = gl.arange(0, BNC, layout=gl.SliceLayout(1, SL))  # C^T: the tile's rows are output columns
        cols_t = gl.arange(0, BM, layout=gl.SliceLayout(0, SL))
        _finish(acc, (off_m + cols_t)[None, :], (off_n + rows_t)[:, None], rows_t[:, None] + cols_t[None, :] * BNC,
                tile, M, N, stride_cm, bias_ptr, c_ptr, ws_ptr, lock_ptr, HAS_BIAS, SPLIT_K)

    @gluon.jit
    def wna16_gluon_rs_kernel(x_desc, w_desc, s_ptr, z_ptr, bias_ptr, c_ptr, ws_ptr, lock_ptr,
                              M, N, K, n_groups, group_size, stride_cm,
                              HAS_ZERO: gl.constexpr, HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr,
                              STAGES: gl.constexpr, WARPS: gl.constexpr, M16: gl.constexpr):
        """4-bit, group >= 128: C^T = W x^T with the dequantized weights as the wgmma's register operand A.

        The packed words are read from shared memory straight into the A fragment layout: the A fragment of
        K-chunk j (16 K) of a 16 x 16 tile holds, per thread, K pairs (2c, 2c + 1) and (2c + 8, 2c + 9) of two
        rows, and word row i of a 128-K block holds K = j * 16 + i in its field j, so a thread's words, unpacked
        field by field (NIBBLES_*: the pair of words (2c, 2c + 1) -> one register per field), are its A fragments
        for all eight K-chunks.  No dequantized tile goes through shared memory (no store, fence or barrier
        before the wgmma); x^T is the shared B operand (x's [BM, 64] TMA boxes, K-major).

        Software-pipelined by one block (``_rs_loop``): block ki's eight wgmmas are issued, then block ki + 1's
        fragments are unpacked into other registers while they run, then the wait.  Two things keep ptxas (Triton
        3.6, sm_90a) from serializing the wgmmas (``WARPGROUP.DEPBAR.LE gsb0, 0x0`` after every HGMMA, as the
        first form of this kernel had): the accumulator is a plain tensor between iterations (waited for inside
        the loop; an async accumulator carried across the back edge drew ptxas's C7515 "wgmma serialized: non
        wgmma instructions defining accumulator registers ... pipeline stage"), and ``_hold`` keeps block ki's
        fragments live until after the wait (else ptxas gives block ki + 1's the same registers and waits for
        the wgmmas before unpacking)."""
        BN: gl.constexpr = w_desc.block_type.shape[1]
        off_m = gl.program_id(0) * x_desc.block_type.shape[0]
        off_n = gl.program_id(1) * BN
        b_lo, nb = _k_split(K, SPLIT_K)
        x_ring, w_ring, ready = _rings(x_desc, w_desc, b_lo, nb, off_m, off_n, STAGES, STAGES)
        acc = _rs_loop(x_desc, w_desc, x_ring, w_ring, ready, ready, s_ptr, z_ptr, N, n_groups, group_size, b_lo, nb,
                       off_m, off_n, HAS_ZERO, STAGES, M16, WARPS, 0, BN, False)
        acc = _drain(warpgroup_mma_init(acc), ready, STAGES)  # (acc already complete)
        _rs_finish(acc, off_m, off_n, _grid_tile(), M, N, stride_cm, bias_ptr, c_ptr, ws_ptr, lock_ptr, HAS_BIAS,
                   SPLIT_K, WARPS)

    @gluon.jit
    def _rs_ws_loader(x_desc, w_desc, x_ring, w_ring, ready, empty, K, SPLIT_K: gl.constexpr, STAGES: gl.constexpr):
        """Warp-specialized register-operand kernel, the load partition (one warp): this split's blocks in order
        into the ring, each slot once both MMA partitions have released its last use (``empty``, two arrivals; a
        fresh barrier counts as released: the first pass waits on the phase before it)."""
        off_m = gl.program_id(0) * x_desc.block_type.shape[0]
        off_n = gl.program_id(1) * w_desc.block_type.shape[1]
        b_lo, nb = _k_split(K, SPLIT_K)
        for ki in range(nb):
            slot = ki % STAGES
            mbarrier.wait(empty.index(slot), ((ki // STAGES) & 1) ^ 1)
            _load_block(x_desc, w_desc, x_ring, w_ring, ready, slot, b_lo + ki, ki >= 0, off_m, off_n)

    @gluon.jit
    def _rs_ws_mma(x_desc, w_desc, x_ring, w_ring, ready, empty, s_ptr, z_ptr, bias_ptr, c_ptr, ws_ptr, lock_ptr,
                   M, N, K, n_groups, group_size, stride_cm, HAS_ZERO: gl.constexpr, HAS_BIAS: gl.constexpr,
                   SPLIT_K: gl.constexpr, STAGES: gl.constexpr, M16: gl.constexpr, HALF: gl.constexpr):
        """Warp-specialized register-operand kernel, an MMA partition (one warpgroup): weight rows HALF of the
        box's two halves, on every block of the split (both partitions read the same x boxes), its own output
        tile and split-K counter (tile 2 * grid column + HALF)."""
        BNC: gl.constexpr = w_desc.block_type.shape[1] // 2
        off_m = gl.program_id(0) * x_desc.block_type.shape[0]
        off_n = gl.program_id(1) * w_desc.block_type.shape[1]
        b_lo, nb = _k_split(K, SPLIT_K)
        acc = _rs_loop(x_desc, w_desc, x_ring, w_ring, ready, empty, s_ptr, z_ptr, N, n_groups, group_size, b_lo, nb,
                       off_m, off_n, HAS_ZERO, STAGES, M16, 4, HALF * BNC, BNC, True)
        tile = (gl.program_id(1) * 2 + HALF) * gl.num_programs(0) + gl.program_id(0)
        _rs_finish(acc, off_m, off_n + HALF * BNC, tile, M, N, stride_cm, bias_ptr, c_ptr, ws_ptr, lock_ptr,
                   HAS_BIAS, SPLIT_K, 4)

    @gluon.jit
    def _rs_ws_mma_odd(x_desc, w_desc, x_ring, w_ring, ready, empty, s_ptr, z_ptr, bias_ptr, c_ptr, ws_ptr, lock_ptr,
                       M, N, K, n_groups, group_size, stride_cm, HAS_ZERO: gl.constexpr, HAS_BIAS: gl.constexpr,
                       SPLIT_K: gl.constexpr, STAGES: gl.constexpr, M16: gl.constexpr):
        _rs_ws_mma(x_desc, w_desc, x_ring, w_ring, ready, empty, s_ptr, z_ptr, bias_ptr, c_ptr, ws_ptr, lock_ptr, M,
                   N, K, n_groups, group_size, stride_cm, HAS_ZERO, HAS_BIAS, SPLIT_K, STAGES, M16, 1)

    @gluon.jit
    def wna16_gluon_rs_ws_kernel(x_desc, w_desc, s_ptr, z_ptr, bias_ptr, c_ptr, ws_ptr, lock_ptr,
                                 M, N, K, n_groups, group_size, stride_cm,
                                 HAS_ZERO: gl.constexpr, HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr,
                                 STAGES: gl.constexpr, M16: gl.constexpr, MMA_REGS: gl.constexpr,
                                 LOAD_REGS: gl.constexpr):
        """The register-operand kernel, warp-specialized (``WARP_SPECIALIZE`` with ``RS``): a one-warp load
        partition keeps the TMA ring full, and two MMA partitions of one warpgroup each (the default one and a
        worker) take one half of the box's weight rows each, so neither waits on a CTA barrier or a refill: each
        hands a slot back as it is done with it, on its own schedule, and the other's wgmmas and unpacking run
        meanwhile.  Launched with num_warps 4 and ``maxnreg`` (``_gluon.WS_MAXNREG``); BLOCK_N is the CTA's
        columns (each partition's tile is BLOCK_N / 2 x BLOCK_M)."""
        x_ring, w_ring, ready = _ring_buffers(x_desc, w_desc, STAGES)
        empty = _gluon.counted_barriers(STAGES, 2)
        gl.warp_specialize([
            (_rs_ws_mma, (x_desc, w_desc, x_ring, w_ring, ready, empty, s_ptr, z_ptr, bias_ptr, c_ptr, ws_ptr,
                          lock_ptr, M, N, K, n_groups, group_size, stride_cm, HAS_ZERO, HAS_BIAS, SPLIT_K, STAGES,
                          M16, 0)),
            (_rs_ws_mma_odd, (x_desc, w_desc, x_ring, w_ring, ready, empty, s_ptr, z_ptr, bias_ptr, c_ptr, ws_ptr,
                              lock_ptr, M, N, K, n_groups, group_size, stride_cm, HAS_ZERO, HAS_BIAS, SPLIT_K,
                              STAGES, M16)),
            (_rs_ws_loader, (x_desc, w_desc, x_ring, w_ring, ready, empty, K, SPLIT_K, STAGES)),
        ], [4, 1], [MMA_REGS, LOAD_REGS])
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(s))
            mbarrier.invalidate(empty.index(s))

    # ------------------------------------------------------------------ decode GEMV (M = 1) through a TMA ring

    @gluon.constexpr_function
    def _gemv_layout(ROWS, BN, num_warps):
        """[ROWS, BN] word tile of the GEMV: a thread holds all ROWS word rows of BN / (32 num_warps) consecutive
        columns (its sums stay in the thread until the end), the warps side by side along N."""
        return gl.BlockedLayout([ROWS, BN // (32 * num_warps)], [1, 32], [1, num_warps], [1, 0])

    @gluon.jit
    def _gemv_half2(v):
        """fp32 tensor ``v`` -> its fp16 value in both halves of an int32 (``wna16._half2(v, v)``)."""
        h = v.to(gl.float16).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
        return h | (h << 16)

    @gluon.jit
    def _x_entry(slot, j):
        """The x ring entry of plane j of ring slot ``slot`` (entries of 64 bytes, every other one used)."""
        return (slot * 4 + j) * 2

    @gluon.jit
    def _gemv_load(w_desc, s_desc, z_desc, x_desc, w_ring, s_ring, z_ring, x_ring, ready, slot, blk, off_n, N, n_rows,
                   n_groups, group_size, HAS_ZERO: gl.constexpr, WEIGHTS: gl.constexpr, X: gl.constexpr):
        """TMA of 128-K block ``blk`` into ring slot ``slot``: with WEIGHTS its [ROWS, BN] words, its group's BN
        scales (and zero points) and the expected bytes of the whole slot; with X its activations' four half2
        planes (ROWS int32 each: the boxes' rows, ``GEMV_ROWS``)."""
        ROWS: gl.constexpr = w_desc.block_type.shape[0]
        bar = ready.index(slot)
        if WEIGHTS:
            ZB: gl.constexpr = z_desc.block_type.nbytes if HAS_ZERO else 0
            XB: gl.constexpr = 4 * x_desc.block_type.nbytes
            NBYTES: gl.constexpr = w_desc.block_type.nbytes + s_desc.block_type.nbytes + ZB + XB
            mbarrier.expect(bar, NBYTES)
            tma_load(w_desc, [blk * ROWS, off_n], bar, w_ring.index(slot))
            g = gl.minimum(blk * BLOCK_K // group_size, n_groups - 1)
            tma_load(s_desc, [g * N + off_n], bar, s_ring.index(slot))
            if HAS_ZERO:
                tma_load(z_desc, [g * N + off_n], bar, z_ring.index(slot))
        if X:
            for j in gl.static_range(4):
                tma_load(x_desc, [j * n_rows + blk * ROWS], bar, x_ring.index(_x_entry(slot, j)))

    @gluon.jit
    def _gemv_loader(w_desc, s_desc, z_desc, x_desc, w_ring, s_ring, z_ring, x_ring, ready, empty, tl_ptr, N, K,
                     n_groups, group_size, HAS_ZERO: gl.constexpr, SPLIT_K: gl.constexpr, STAGES: gl.constexpr,
                     PDL: gl.constexpr, CHAIN: gl.constexpr, TIMELINE: gl.constexpr):
        """The GEMV's load partition (one warp): this split's blocks in order into the ring, each slot once the
        multiplying warps have released its last use (``empty``; a fresh barrier counts as released).  The first
        STAGES blocks' weights are asked for before x's (with PDL, before the wait for the packing launch).  CHAIN:
        the next launch (the next call's packing, launched programmatically) may start now."""
        if TIMELINE:
            tl_at = _timeline_row(tl_ptr)
            gl.store(tl_at + TL_LOAD_START, _gluon.clock())
        if CHAIN:
            _gluon.grid_dep_launch_dependents()
        off_n = gl.program_id(0) * w_desc.block_type.shape[1]
        # x's plane length (wna16._h2_pack_x), from K: its buffer may be longer
        n_rows = gl.cdiv(K, BLOCK_K) * x_desc.block_type.shape[0]
        b_lo, nb = _k_split(K, SPLIT_K)
        n0 = gl.minimum(nb, STAGES)
        for ki in range(n0):
            _gemv_load(w_desc, s_desc, z_desc, x_desc, w_ring, s_ring, z_ring, x_ring, ready, ki, b_lo + ki, off_n, N,
                       n_rows, n_groups, group_size, HAS_ZERO, True, False)
        if PDL:
            _gluon.grid_dep_wait()
        for ki in range(n0):
            _gemv_load(w_desc, s_desc, z_desc, x_desc, w_ring, s_ring, z_ring, x_ring, ready, ki, b_lo + ki, off_n, N,
                       n_rows, n_groups, group_size, HAS_ZERO, False, True)
        for ki in range(STAGES, nb):
            slot = ki % STAGES
            mbarrier.wait(empty.index(slot), ((ki // STAGES) & 1) ^ 1)
            _gemv_load(w_desc, s_desc, z_desc, x_desc, w_ring, s_ring, z_ring, x_ring, ready, slot, b_lo + ki, off_n,
                       N, n_rows, n_groups, group_size, HAS_ZERO, True, True)
        if TIMELINE:
            gl.store(tl_at + TL_LOAD_END, _gluon.clock())

    @gluon.jit
    def _gemv_mul(w_ring, s_ring, z_ring, x_ring, ready, empty, xsc_ptr, bias_ptr, c_ptr, ws_ptr, lock_ptr, tl_ptr, N,
                  K, HAS_ZERO: gl.constexpr, HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr, STAGES: gl.constexpr,
                  WARPS: gl.constexpr, PDL: gl.constexpr, TIMELINE: gl.constexpr):
        """The GEMV's multiplying partition (the default one, WARPS warps): each block's slot read into
        registers and handed back, then its products (``_common.H2_ASM_*``) summed into a thread's columns; then
        the epilogue."""
        if TIMELINE:
            tl_at = _timeline_row(tl_ptr)
            gl.store(tl_at + TL_START_NS, _gluon.global_ns())
            gl.store(tl_at + TL_START, _gluon.clock())
        ROWS: gl.constexpr = w_ring.shape[1]
        BN: gl.constexpr = w_ring.shape[2]
        WL: gl.constexpr = _gemv_layout(ROWS, BN, WARPS)
        CL: gl.constexpr = gl.SliceLayout(0, WL)  # [BN] per-column values
        XL: gl.constexpr = gl.SliceLayout(1, WL)  # [ROWS] per-word-row values (every thread holds them all)
        b_lo, nb = _k_split(K, SPLIT_K)
        acc = gl.zeros((ROWS, BN), dtype=gl.float32, layout=WL)
        for ki in range(nb):
            slot = ki % STAGES
            mbarrier.wait(ready.index(slot), (ki // STAGES) & 1)
            if TIMELINE:
                if ki == 0:
                    gl.store(tl_at + TL_FIRST, _gluon.clock())
            wp = w_ring.index(slot).load(WL)
            p0 = x_ring.index(_x_entry(slot, 0)).load(XL)[:, None]
            p1 = x_ring.index(_x_entry(slot, 1)).load(XL)[:, None]
            p2 = x_ring.index(_x_entry(slot, 2)).load(XL)[:, None]
            p3 = x_ring.index(_x_entry(slot, 3)).load(XL)[:, None]
            sc = s_ring.index(slot).load(CL).to(gl.float32)[None, :]
            if HAS_ZERO:
                zc = z_ring.index(slot).load(CL).to(gl.float32) + 8.0
            mbarrier.arrive(empty.index(slot), count=1)  # in registers: the loader may refill the slot
            if HAS_ZERO:
                c0 = _gemv_half2(zc + 1024.0)[None, :]
                c1 = _gemv_half2(zc * 16.0 + 1024.0)[None, :]
                part = gl.inline_asm_elementwise(_common.H2_ASM_ZERO, "=f,r,r,r,r,r,r,r", [wp, p0, p1, p2, p3, c0, c1],
                                                 dtype=gl.float32, is_pure=True, pack=1)
            else:
                part = gl.inline_asm_elementwise(_common.H2_ASM_SYM, "=f,r,r,r,r,r", [wp, p0, p1, p2, p3],
                                                 dtype=gl.float32, is_pure=True, pack=1)
            acc += part * sc
        if TIMELINE:
            gl.store(tl_at + TL_LOOP_END, _gluon.clock())
        if PDL:  # (long since finished: the packed x has landed) before 1 / prescale is read
            _gluon.grid_dep_wait()
        tot = gl.sum(acc, axis=0) * gl.load(xsc_ptr)
        offs = gl.arange(0, BN, layout=CL)
        cols = gl.program_id(0) * BN + offs
        cmask = cols < N
        if SPLIT_K > 1:
            tot, last = _gluon.splitk_sum(tot, ws_ptr, lock_ptr, gl.program_id(0), gl.program_id(2), offs, SPLIT_K,
                                          BN)
            cmask = cmask & last
        if HAS_BIAS:
            tot += gl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(gl.float32)
        gl.store(c_ptr + cols, tot.to(c_ptr.dtype.element_ty), mask=cmask)
        if TIMELINE:
            gl.store(tl_at + TL_END, _gluon.clock())
            gl.store(tl_at + TL_END_NS, _gluon.global_ns())

    @gluon.jit
    def _timeline_row(tl_ptr):
        """This program's TIMELINE_SLOTS entries of the timeline buffer (grid axis 0 fastest)."""
        return tl_ptr + (gl.program_id(2) * gl.num_programs(0) + gl.program_id(0)) * TIMELINE_SLOTS

    @gluon.jit
    def wna16_gluon_gemv_kernel(w_desc, s_desc, z_desc, x_desc, xsc_ptr, bias_ptr, c_ptr, ws_ptr, lock_ptr, tl_ptr,
                                N, K, n_groups, group_size,
                                HAS_ZERO: gl.constexpr, HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr,
                                STAGES: gl.constexpr, WARPS: gl.constexpr, PDL: gl.constexpr,
                                LOAD_REGS: gl.constexpr, CHAIN: gl.constexpr, TIMELINE: gl.constexpr):
        """Decode (M = 1) 4-bit GEMV, group >= 128, on x packed by ``wna16._h2_pack_x`` (half2 pairs, prescaled):
        the half2 products of ``wna16``'s h2 GEMV (``_common.H2_ASM_*``: one word's eight products, two fp16 partials,
        their fp32 sum), with every operand streamed through a TMA ring of STAGES 128-K blocks (the words'
        [16, BN] box, the group's scales and zero points, x's 4 x 16 pairs) instead of loaded into registers.

        Why: the register-loading GEMVs (ours, tinygemm) move 4-bit weights at the same speed on an H100 and an
        H200 (BENCHMARKS.md, issue 19: 31.6 against 32.8 us at 28672 x 4096, 55-64% of the H100's copy floor, 41-
        44% of the H200's), so the bytes a thread keeps in flight hold them back, not memory.  Here a CTA's ring
        keeps STAGES blocks in flight whatever the registers, and the warps only unpack and multiply.

        Warp-specialized (``gl.warp_specialize``): a one-warp load partition (``_gemv_loader``) issues the TMAs
        (Triton puts a CTA barrier before each TMA issue: kept off the multiplying warps) and WARPS warps multiply
        (``_gemv_mul``), handing each slot back through an "empty" mbarrier as soon as it is in their registers.
        Grid (N tiles, 1, SPLIT_K): each program runs its K split's blocks over BN columns; a thread keeps its
        columns' [16, BN / (32 WARPS)] fp32 sums (the h2 PER_BLOCK loop's order: ``acc += part * s`` a block at a
        time, the 16 rows summed at the end).  ``PDL``: launched programmatically after the packing, the loader
        asks for the first STAGES blocks' weights before it waits for the packed x.  ``CHAIN`` (``PDL_CHAIN``): the
        loader lets the next launch start at once, so the next call's packing, launched programmatically too
        (``wna16._h2_pack_x``'s ``chain``), waits on the GPU for this call instead of starting after it ends, and the
        next GEMV, launched behind the packing, asks for its first weights while this one still streams.
        ``TIMELINE`` (a diagnostic, ``gemm.py --decode-timeline``): each program writes its timestamps into
        ``tl_ptr`` (``TL_*``: clock64 cycles, and globaltimer nanoseconds at the multiplying partition's start and end)."""
        ROWS: gl.constexpr = w_desc.block_type.shape[0]  # (GEMV_ROWS: a 128-K block's words, x's pairs a plane)
        BN: gl.constexpr = w_desc.block_type.shape[1]
        w_ring = gl.allocate_shared_memory(w_desc.dtype, [STAGES, ROWS, BN], w_desc.layout)
        s_ring = gl.allocate_shared_memory(s_desc.dtype, [STAGES, BN], s_desc.layout)
        if HAS_ZERO:
            z_ring = gl.allocate_shared_memory(z_desc.dtype, [STAGES, BN], z_desc.layout)
        else:  # never loaded
            z_ring = s_ring
        # x's planes in every other 64-byte entry: a TMA destination must be 128-byte aligned
        x_ring = gl.allocate_shared_memory(x_desc.dtype, [STAGES * 8, ROWS], x_desc.layout)
        ready = _gluon.ready_barriers(STAGES)
        empty = _gluon.counted_barriers(STAGES, 1)
        gl.warp_specialize([
            (_gemv_mul, (w_ring, s_ring, z_ring, x_ring, ready, empty, xsc_ptr, bias_ptr, c_ptr, ws_ptr, lock_ptr,
                         tl_ptr, N, K, HAS_ZERO, HAS_BIAS, SPLIT_K, STAGES, WARPS, PDL, TIMELINE)),
            (_gemv_loader, (w_desc, s_desc, z_desc, x_desc, w_ring, s_ring, z_ring, x_ring, ready, empty, tl_ptr, N,
                            K, n_groups, group_size, HAS_ZERO, SPLIT_K, STAGES, PDL, CHAIN, TIMELINE)),
        ], [1], [LOAD_REGS])
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(s))
            mbarrier.invalidate(empty.index(s))

def runs_on(x: torch.Tensor, qw: torch.Tensor) -> bool:
    """The per-call half of ``applies``: Gluon on an sm_90 GPU, x contiguous, x and the words 16-byte aligned."""
    return _gluon.available(x) and x.is_contiguous() and _gluon.aligned16(x, qw)


def plan(cfg: dict, M: int, N: int, K: int, dtype, bits: int, has_zero: bool, has_bias: bool,
         gs_small: bool) -> Plan | None:
    """The per-shape half of ``applies`` and what a launch needs (``wna16`` keeps it in its cached launch plan):
    None where the kernel cannot run at this shape whatever x is: fp16 (or bf16 with 4-bit) activations whose
    rows TMA can describe (16-byte rows), N a multiple of 4 (16-byte word rows), the buffers of the kernel ``cfg``
    picks (groups < 128 take the shared-operand one) within an SM's shared memory, a ring of at least
    ``_gluon.MIN_STAGES`` slots."""
    if GLUON_ERROR is not None or dtype not in (torch.float16, torch.bfloat16) or not _gluon.ring_ok(cfg):
        return None
    if bits not in (4, 8) or (bits == 8 and dtype != torch.float16):
        return None
    if (K * dtype.itemsize) % 16 or N % 4 or shared_bytes(cfg, bits, gs_small) > _common.HOPPER_SMEM_PER_BLOCK:
        return None
    return Plan(cfg, M, N, dtype, bits, _consts(cfg, dtype, bits, has_zero, has_bias, gs_small))


def applies(x: torch.Tensor, qw: torch.Tensor, bits: int, N: int, K: int, cfg: dict, gs_small: bool = False) -> bool:
    """Whether this kernel can run ``cfg`` on these operands (``runs_on`` and ``plan``)."""
    return runs_on(x, qw) and plan(cfg, x.shape[0], N, K, x.dtype, bits, False, False, gs_small) is not None


_LAUNCH = _gluon.DirectLaunch()
_X_BOX_K = 64  # x box along K (128 bytes of fp16: the 128-byte swizzle's width)


def _descriptors(x, qw, bm, bn, bits):
    return _gluon.descriptor(x, [bm, _X_BOX_K]), _gluon.descriptor(qw, [PACK_K * bits // 32, bn])


def _rs(cfg: dict, bits: int, gs_small: bool) -> bool:
    """The register-operand kernel: asked for (``RS``), 4-bit with one scale row per 128-K block."""
    return bool(cfg.get("RS", False)) and bits == 4 and not gs_small


WS_BLOCK_N = 128  # the warp-specialized kernel's box: two MMA partitions of one 64-row wgmma tile each
# shared memory the warp-specialized kernel takes beyond its rings and barriers, an upper bound: its partitions'
# epilogue layout conversion (32 KB, which the plain kernels put in the dead ring), plus 16-byte alignment of the
# barriers (Triton 3.6, sm_90a: 8 to 16 bytes at the tiles the tuner tries)
WS_SCRATCH = 32768 + 64


def warp_specialized(cfg: dict, bits: int = 4, gs_small: bool = False) -> bool:
    """The warp-specialized register-operand kernel (``WARP_SPECIALIZE`` on an ``_rs`` config): BLOCK_N
    :data:`WS_BLOCK_N` (each MMA partition's 64 weight rows: its accumulator BLOCK_M / 2 registers a thread, its two
    blocks' fragments 64 more, within ``_gluon.WS_MMA_REGS``), num_warps 4 (a partition's)."""
    return (bool(cfg.get("WARP_SPECIALIZE", False)) and _rs(cfg, bits, gs_small) and cfg["BLOCK_N"] == WS_BLOCK_N
            and cfg["num_warps"] == 4)


def splitk_tiles(cfg: dict, M: int, N: int, bits: int = 4, gs_small: bool = False) -> tuple[int, int]:
    """(output tiles with a split-K counter, elements a tile) for ``_common.splitk_buffers``: the grid's tiles, or
    the warp-specialized kernel's partitions' (two a CTA, half its columns each)."""
    tiles = -(-M // cfg["BLOCK_M"]) * -(-N // cfg["BLOCK_N"])
    if warp_specialized(cfg, bits, gs_small):
        return 2 * tiles, cfg["BLOCK_M"] * cfg["BLOCK_N"] // 2
    return tiles, cfg["BLOCK_M"] * cfg["BLOCK_N"]


def _consts(cfg: dict, dtype, bits: int, has_zero: bool, has_bias: bool, gs_small: bool) -> dict:
    """The kernel's constexprs (``_rs`` and ``warp_specialized`` pick which kernel), in parameter order."""
    m16 = 1024.0 if dtype == torch.float16 else 128.0
    sk, st, nw = int(cfg.get("SPLIT_K", 1)), cfg["num_stages"], cfg["num_warps"]
    if warp_specialized(cfg, bits, gs_small):
        return dict(HAS_ZERO=has_zero, HAS_BIAS=has_bias, SPLIT_K=sk, STAGES=st, M16=m16,
                    MMA_REGS=_gluon.WS_MMA_REGS, LOAD_REGS=_gluon.WS_LOAD_REGS)
    if _rs(cfg, bits, gs_small):
        return dict(HAS_ZERO=has_zero, HAS_BIAS=has_bias, SPLIT_K=sk, STAGES=st, WARPS=nw, M16=m16)
    return dict(BITS=bits, HAS_ZERO=has_zero, HAS_BIAS=has_bias, GS_SMALL=gs_small, SPLIT_K=sk, STAGES=st, WARPS=nw,
                MAGIC16=0x6400 if dtype == torch.float16 else 0x4300, M16=m16)


def _kernel(consts: dict):
    """The kernel ``_consts`` were made for (only the shared-operand kernel takes BITS, only the warp-specialized
    one MMA_REGS)."""
    if "MMA_REGS" in consts:
        return wna16_gluon_rs_ws_kernel
    return wna16_gluon_kernel if "BITS" in consts else wna16_gluon_rs_kernel


def _options(consts: dict, num_warps: int) -> dict:
    """Launch / compile options: the warp-specialized kernel's register cap."""
    return dict(_gluon.WS_LAUNCH) if "MMA_REGS" in consts else {"num_warps": num_warps}


class Plan:
    """A launch of one shape, tile and dtype, fixed once (``plan``): the kernel, its constexprs, the grid and the
    shape-independent part of the direct-launch key; ``launch`` adds the call's tensors."""

    __slots__ = ("consts", "cv", "grid", "bm", "bn", "bits", "options", "static_key")

    def __init__(self, cfg: dict, M: int, N: int, dtype, bits: int, consts: dict):
        self.consts, self.cv, self.bits = consts, tuple(consts.values()), bits
        self.options = _options(consts, cfg["num_warps"])
        self.bm, self.bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
        self.grid = ((M + self.bm - 1) // self.bm, (N + self.bn - 1) // self.bn, consts["SPLIT_K"])
        self.static_key = (self.bm, self.bn, dtype, self.cv)

    runs_on = staticmethod(runs_on)

    def launch(self, x, qw, scales, zeros, bias, out, ws, lock, group_size, N, K) -> torch.Tensor:
        """``out`` (M, N) = x @ W^T (+ bias) for the packed weight (``wna16.prepack_wna16``'s layout); ``runs_on``
        must hold.  ws, lock: the split-K workspace and counters (``_common.splitk_buffers``)."""
        args = (scales, zeros if zeros is not None else scales, bias if bias is not None else scales, out, ws, lock,
                x.shape[0], N, K, scales.shape[0], group_size, out.stride(0))
        # ws and lock (cached buffers: 16-byte aligned, one dtype each) left out of the specialization key
        key = lambda: (_common.current_device(), self.static_key, out.dtype,  # noqa: E731
                       _common.spec_key(args[:4] + args[6:]))
        _LAUNCH.launch(key, self.grid, (x, qw), (*args, *self.cv), lambda: _kernel(self.consts)[self.grid](
            *_descriptors(x, qw, self.bm, self.bn, self.bits), *args, **self.consts, **self.options))
        return out


def build_for_target(cfg: dict, dtype=torch.float16, bits: int = 4, has_zero: bool = False, has_bias: bool = False,
                     gs_small: bool = False, cc: int = 90):
    """Compile for sm_``cc`` without a GPU (descriptor signatures from CPU tensors, as a launch mangles them)."""
    x = torch.empty(256, 256, dtype=dtype)
    qw = torch.empty(256 * bits // 32, 256, dtype=torch.int32)
    x_d, w_d = _descriptors(x, qw, cfg["BLOCK_M"], cfg["BLOCK_N"], bits)
    t = "*fp16" if dtype == torch.float16 else "*bf16"
    sig = {"x_desc": _gluon.mangle(x_d), "w_desc": _gluon.mangle(w_d), "s_ptr": "*fp16",
           "z_ptr": "*i8" if has_zero else "*fp16", "bias_ptr": t if has_bias else "*fp16", "c_ptr": t,
           "ws_ptr": "*fp32", "lock_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "n_groups": "i32",
           "group_size": "i32", "stride_cm": "i32"}
    consts = _consts(cfg, dtype, bits, has_zero, has_bias, gs_small)
    sig.update({k: "constexpr" for k in consts})
    options = _options(consts, cfg["num_warps"])
    return _gluon.compile_for_target(_kernel(consts), sig, consts, options.pop("num_warps"), cc, **options)


def config(bm: int, bn: int, split_k: int = 1, warps: int = 8, stages: int = 3) -> dict:
    return dict(BACKEND="gluon", BLOCK_M=bm, BLOCK_N=bn, SPLIT_K=split_k, num_warps=warps, num_stages=stages)


def ws_config(bm: int, split_k: int, stages: int) -> dict:
    """A warp-specialized register-operand config (:func:`warp_specialized`): BLOCK_N :data:`WS_BLOCK_N`."""
    return dict(config(bm, WS_BLOCK_N, split_k, 4, stages), RS=True, WARP_SPECIALIZE=True)


def _register_operand(cfgs: list[dict]) -> list[dict]:
    """``cfgs`` as register-operand (``RS``) configs, BLOCK_N <= 128 only (at 256 the two blocks' fragments and the
    accumulator take 255 registers and spill)."""
    return [dict(c, RS=True) for c in cfgs if c["BLOCK_N"] <= 128]


def candidates(M: int) -> list[dict]:
    """The configs ``benchmarks/gemm.py --tune`` tries for M rows (4-bit: each fits Hopper's shared memory, see
    ``shared_bytes``; the 2-stage 64 x 128 and 128 x 64 tiles fit two CTAs an SM); from M = 128 each tile of
    BLOCK_N <= 128 also with the register-operand kernel (``RS``), plus a few RS-only tiles and the warp-specialized
    ones (``ws_config``: one CTA an SM, so its ring is deep)."""
    c, w = config, ws_config
    if M <= 64:
        return [c(64, 128, 1, 4, 4), c(64, 128, 2, 4, 4), c(64, 128, 4, 4, 4), c(64, 256, 1, 8, 3), c(64, 256, 2, 8, 3),
                c(64, 64, 4, 4, 4), c(64, 128, 2, 4, 2), c(64, 128, 4, 4, 2)]
    if M <= 128:
        shared = [c(128, 128, 1), c(128, 128, 2), c(128, 128, 4), c(128, 256, 1, 8, 2), c(128, 64, 2, 4, 4),
                  c(64, 128, 2, 4, 4), c(128, 64, 2, 4, 2), c(128, 64, 4, 4, 2), c(64, 128, 2, 4, 2),
                  c(64, 128, 4, 4, 2)]
        return shared + _register_operand(shared + [c(128, 128, 2, 8, 2), c(128, 128, 4, 8, 2)]) + [
            w(128, 1, 4), w(128, 2, 4), w(128, 4, 4), w(64, 2, 4)]
    if M <= 256:
        shared = [c(128, 128, 1), c(128, 128, 2), c(128, 128, 4), c(256, 128, 1, 8, 2), c(256, 128, 2, 8, 2),
                  c(128, 256, 1, 8, 2), c(128, 64, 1, 4, 2), c(128, 64, 2, 4, 2)]
        return shared + _register_operand(shared + [c(64, 128, 2, 4, 4), c(256, 128, 4, 8, 2), c(128, 64, 4, 4, 2),
                                                    c(128, 128, 2, 8, 2), c(256, 128, 1, 8, 3), c(256, 128, 4, 8, 3)]) + [
            w(128, 1, 4), w(128, 2, 4), w(128, 4, 4), w(256, 1, 2), w(256, 2, 2),
            # 64-row tiles: twice the CTAs of the 128-row ones at 4096 columns, and a ring of 6 fits beside them
            w(64, 1, 4), w(64, 1, 6), w(64, 2, 6)]
    shared = [c(128, 128, 1, 8, 4), c(128, 256, 1, 8, 2), c(256, 128, 1, 8, 2), c(256, 64, 1, 8, 2),
              c(128, 64, 1, 4, 2)]
    return shared + _register_operand([c(256, 128, 1, 8, 2), c(256, 128, 2, 8, 2), c(128, 128, 1, 8, 3),
                                       c(128, 64, 1, 4, 2), c(128, 64, 2, 4, 2), c(128, 64, 1, 4, 4)]) + [
        w(128, 1, 4), w(256, 1, 2)]


def shared_bytes(cfg: dict, bits: int = 4, gs_small: bool = False) -> int:
    """Shared memory the kernel takes with ``cfg``: the x ring (STAGES x BM x 128 x 2 B), the word ring (STAGES x
    128 * bits / 32 x BN x 4 B), one barrier a stage, and (not the register-operand kernel) two dequantized
    [128, BN] tiles."""
    st, bm, bn = cfg["num_stages"], cfg["BLOCK_M"], cfg["BLOCK_N"]
    rings = st * (bm * PACK_K * 2 + PACK_K * bits // 32 * bn * 4 + 8)
    if warp_specialized(cfg, bits, gs_small):  # + the "empty" barriers, the epilogue's layout-conversion scratch
        return rings + st * 8 + WS_SCRATCH
    return rings if _rs(cfg, bits, gs_small) else rings + 2 * PACK_K * bn * 2


# ----------------------------------------------------------------------------- decode GEMV (M = 1), TMA-fed

GEMV_ROWS = 16  # word rows of one 128-K block (4-bit: 8 fields a word)
_X_PLANES = 4  # the packed activations' half2 planes (``wna16._h2_pack_x``)


def gemv_ring(cfg: dict) -> int:
    """The TMA ring's depth a config asks for (``TMA_RING``; 0: not this kernel)."""
    return int(cfg.get("TMA_RING", 0))


GEMV_LOAD_REGS = 40  # registers a thread of the load partition's warpgroup (setmaxnreg: the rest go to the multipliers)


def gemv_maxnreg(cfg: dict) -> int:
    """The launch's register cap a thread (``maxnreg``), over the multiplying warpgroups and the loader's: with
    ``setmaxnreg`` the multipliers get 2 x this - GEMV_LOAD_REGS (one multiplying warpgroup), so 80 -> 120 (three
    CTAs an SM) ... ``MAXNREG`` in the config overrides the default: 80 for one column a thread, 128 for two."""
    return int(cfg.get("MAXNREG", 80 if cfg["BLOCK_N"] == 32 * cfg["num_warps"] else 128))


# shared memory the GEMV takes beyond its ring and barriers, an upper bound: the warp specialization's own (Triton
# 3.6 / 3.9, sm_90a: 132 to 164 bytes at the tiles the tuner tries, barrier alignment included)
GEMV_SCRATCH = 256


def gemv_shared_bytes(cfg: dict, has_zero: bool) -> int:
    """Shared memory of the GEMV, an upper bound: each ring slot's words (16 x BN int32), scales (BN fp16), zero
    points (BN int8), packed x (4 x 16 int32, each in 128 bytes) and its two barriers ("landed", "empty"), plus
    GEMV_SCRATCH."""
    bn = cfg["BLOCK_N"]
    slot = GEMV_ROWS * bn * 4 + bn * 2 + (bn if has_zero else 0) + 2 * _X_PLANES * GEMV_ROWS * 4 + 16
    return gemv_ring(cfg) * slot + GEMV_SCRATCH


def gemv_fits(cfg: dict, has_zero: bool = True) -> bool:
    """The tile the kernel's layout takes (BLOCK_N = 32 x num_warps x 1 or 2 columns a thread, BLOCK_N <= 256, the
    TMA box's limit; num_warps a multiple of 4, as warp specialization wants), its ring within an SM's shared
    memory."""
    bn, w = cfg["BLOCK_N"], cfg["num_warps"]
    return (gemv_ring(cfg) > 0 and w % 4 == 0 and bn % (32 * w) == 0 and bn // (32 * w) in (1, 2) and bn <= 256
            and gemv_shared_bytes(cfg, has_zero) <= _common.HOPPER_SMEM_PER_BLOCK)


def gemv_runs_on(x: torch.Tensor, qw: torch.Tensor, scales: torch.Tensor, zeros) -> bool:
    """The per-call half of ``gemv_plan``: Gluon on an sm_90 GPU, the words, scales and zero points 16-byte aligned,
    the scales and zero points contiguous (the kernel reads them as one flat row each), the scales 16-bit (the
    row alignment ``gemv_plan`` checks assumes 2 bytes)."""
    zs = (scales,) if zeros is None else (scales, zeros)
    return (_gluon.available(x) and scales.element_size() == 2 and _gluon.aligned16(qw, *zs)
            and all(t.is_contiguous() for t in zs))


def gemv_rows_aligned(N: int, has_zero: bool) -> bool:
    """Whether every row the GEMV's TMA boxes start in begins on a 16-byte boundary: the words' rows (N int32),
    each group's scales (N 16-bit) and zero points (N int8) in their flat rows.  A box starting off a 16-byte
    boundary is an illegal instruction on an H100 (session 47: N = 1000 with zero points, group g's at byte
    1000 g)."""
    return N % 8 == 0 and (not has_zero or N % 16 == 0)


def _gemv_tensors(xp, qw, scales, zeros) -> tuple:
    """What the GEMV's four descriptors describe: the words, the scales and the zero points as flat rows (without
    zero points the scales again, never loaded), the packed x."""
    s = scales.view(-1)
    return qw, s, (zeros.view(-1) if zeros is not None else s), xp


def _gemv_descriptors(tensors: tuple, bn: int):
    """``_gemv_tensors``' descriptors, in the kernel's boxes."""
    qw, s, z, xp = tensors
    return (_gluon.descriptor(qw, [GEMV_ROWS, bn]), _gluon.descriptor(s, [bn]), _gluon.descriptor(z, [bn]),
            _gluon.descriptor(xp, [GEMV_ROWS]))


_GEMV_LAUNCH = _gluon.DirectLaunch()


class GemvPlan:
    """A launch of the TMA-fed GEMV at one shape, fixed once (``gemv_plan``); ``launch`` adds the call's tensors."""

    __slots__ = ("consts", "cv", "grid", "bn", "options", "pdl", "chain", "static_key")

    def __init__(self, cfg: dict, N: int, consts: dict, pdl: bool):
        self.consts, self.cv, self.pdl, self.bn = consts, tuple(consts.values()), pdl, cfg["BLOCK_N"]
        self.chain = consts["CHAIN"]  # the call's packing is launched programmatically too (``_h2_pack_x``'s chain)
        self.options = {"num_warps": cfg["num_warps"], "maxnreg": gemv_maxnreg(cfg),
                        **_common.pdl_option(pdl)}
        self.grid = ((N + self.bn - 1) // self.bn, 1, consts["SPLIT_K"])
        self.static_key = (self.bn, self.cv, pdl, self.options["maxnreg"])

    runs_on = staticmethod(gemv_runs_on)

    def launch(self, xp, xsc, qw, scales, zeros, bias, out, ws, lock, group_size, N, K, timeline=None) -> torch.Tensor:
        """``out`` (1, N) = x @ W^T (+ bias) for the packed weight, x given as its packed pairs ``xp`` and 1 / their
        prescale ``xsc`` (``wna16._h2_pack_x``, launched just before: with ``pdl`` its launch must trigger this
        one); ``runs_on`` must hold.  ws, lock: the split-K workspace and counters; timeline: an int64 buffer of
        ``TIMELINE_SLOTS`` entries a program where the plan was made with ``timeline``."""
        args = (xsc, bias if bias is not None else scales, out, ws, lock, lock if timeline is None else timeline, N,
                K, scales.shape[0], group_size)
        # xsc, ws and lock (cached buffers: 16-byte aligned, one dtype each) left out of the specialization key
        key = lambda: (_common.current_device(), self.static_key, out.dtype, scales.dtype,  # noqa: E731
                       None if zeros is None else zeros.dtype, _common.spec_key(args[1:3] + args[5:]))
        tensors = _gemv_tensors(xp, qw, scales, zeros)
        _GEMV_LAUNCH.launch(key, self.grid, tensors, (*args, *self.cv), lambda: wna16_gluon_gemv_kernel[self.grid](
            *_gemv_descriptors(tensors, self.bn), *args, **self.consts, **self.options))
        return out


def _gemv_consts(cfg: dict, has_zero: bool, has_bias: bool, pdl: bool, timeline: bool = False) -> dict:
    return dict(HAS_ZERO=has_zero, HAS_BIAS=has_bias, SPLIT_K=int(cfg.get("SPLIT_K", 1)), STAGES=gemv_ring(cfg),
                WARPS=cfg["num_warps"], PDL=pdl, LOAD_REGS=GEMV_LOAD_REGS, CHAIN=_common.pdl_chains(cfg, pdl),
                TIMELINE=timeline)


def gemv_plan(cfg: dict, N: int, dtype, has_zero: bool, has_bias: bool, pdl: bool,
              timeline: bool = False) -> GemvPlan | None:
    """The per-shape half of whether the TMA-fed GEMV runs ``cfg`` (M = 1, 4-bit, group >= 128: the caller's
    ``h2`` conditions): None where it cannot (no Gluon, activations other than fp16 / bf16, rows the TMA boxes
    cannot start at (``gemv_rows_aligned``), a tile ``gemv_fits`` refuses).  ``timeline``: the diagnostic
    build whose launches write each program's timestamps (``GemvPlan.launch``'s ``timeline``)."""
    if GLUON_ERROR is not None or dtype not in (torch.float16, torch.bfloat16) or not gemv_rows_aligned(N, has_zero):
        return None
    if not gemv_fits(cfg, has_zero):
        return None
    return GemvPlan(cfg, N, _gemv_consts(cfg, has_zero, has_bias, pdl, timeline), pdl)


def build_gemv_for_target(cfg: dict, dtype=torch.float16, has_zero: bool = False, has_bias: bool = False,
                          pdl: bool = True, cc: int = 90, timeline: bool = False):
    """Compile the TMA-fed GEMV for sm_``cc`` without a GPU (descriptors from CPU tensors, as a launch mangles
    them)."""
    K, N = 512, 512
    qw = torch.empty(K // 8, N, dtype=torch.int32)
    scales = torch.empty(K // 128, N, dtype=torch.float16)
    zeros = torch.empty(K // 128, N, dtype=torch.int8) if has_zero else None
    xp = torch.empty(_X_PLANES * K // 8, dtype=torch.int32)
    w_d, s_d, z_d, x_d = _gemv_descriptors(_gemv_tensors(xp, qw, scales, zeros), cfg["BLOCK_N"])
    t = "*fp16" if dtype == torch.float16 else "*bf16"
    sig = {"w_desc": _gluon.mangle(w_d), "s_desc": _gluon.mangle(s_d), "z_desc": _gluon.mangle(z_d),
           "x_desc": _gluon.mangle(x_d), "xsc_ptr": "*fp32", "bias_ptr": t if has_bias else "*fp16", "c_ptr": t,
           "ws_ptr": "*fp32", "lock_ptr": "*i32", "tl_ptr": "*i64" if timeline else "*i32", "N": "i32", "K": "i32",
           "n_groups": "i32", "group_size": "i32"}
    consts = _gemv_consts(cfg, has_zero, has_bias, pdl, timeline)
    sig.update({k: "constexpr" for k in consts})
    return _gluon.compile_for_target(wna16_gluon_gemv_kernel, sig, consts, cfg["num_warps"], cc,
                                     maxnreg=gemv_maxnreg(cfg))
