"""One lazy block of the GPTQ solve, fused: the sequential column loop in one launch.

Spec (``gptq_block_ref``, the torch backend's inner loop, unchanged from ``quantkit.quant.gptq``):
for the block's columns i = b0 .. b1-1 of W (out, in, solve order, float32) in turn,

    s, z    = the scale / zero of column i's group (static: read; dynamic: computed from the
              current weights of the group when the solve reaches its first column)
    q       = clamp(round(W[:, i] / s) + z, qmin, qmax)          (z = 0 when symmetric)
    err     = (W[:, i] - (q - z) * s) / U[i, i]
    W[:, j] -= err * U[i, j]        for the block's later columns j = i+1 .. b1-1
    Q[:, i] = q;  E[:, i - b0] = err

U (in, in) is the upper Cholesky factor of H^-1.  The caller then applies the block to the
later columns with one GEMM, ``W[:, b1:] -= E @ U[b0:b1, b1:]``.

GPTQ rows are independent given U, so each program owns a tile of BLOCK_R rows x the block's
columns (BLOCK_C >= b1 - b0, a power of 2) in registers and runs the whole column loop
itself: column i is pulled out of the register tile with a masked row sum, the rank-1 update
is one FMA over the tile, and Q (int8) and E are stored column by column.  One launch per
block instead of ~10 small torch ops per column.

Scale modes (``mode``):

* ``"channel"``: one scale (and zero) per row, ``scale[:, 0]``, loaded once;
* ``"static"``: column i uses group ``gidx[i]`` (act-order with static groups: the group of
  the ORIGINAL column solved at position i), loaded per column;
* ``"dynamic"``: groups of ``group_size`` consecutive solve positions; at a group's first
  column its scale/zero are computed in-kernel from the tile (the group's current weights),
  exactly as ``quant.core.compute_qparams`` does (min/max, range containing 0, the scale
  rounded to the checkpoint dtype by ``round_scale``) and written to ``scale``/``zero``.
  The kernel needs every group inside one block: the caller picks a block size that is a
  multiple of the group size (``kernel_block_size``).  Torch's path instead completes a group
  that straddles two blocks with the block's pending update; both equal the unbatched
  solve up to float rounding.

Numerics, so that the kernel reproduces the torch path bit for bit on CPU and up to float32
rounding (FMA contraction) on a GPU: divisions are IEEE (``div_rn``); rounding is half to
even like ``torch.round`` (``(y + 1.5 * 2**23) - 1.5 * 2**23``, exact for |y| < 2**22,
larger values are clamped anyway); the bf16 scale rounding is done on the bits (round to
nearest even), because Triton's interpreter truncates in ``.to(tl.bfloat16)``.  torch on
CUDA divides a tensor by a Python number as a multiplication by the float32 reciprocal
(``compute_qparams``' ``range / (qmax - qmin)``), on CPU as a true division: ``RECIP``
follows the device so that the in-kernel scales equal torch's on both.
"""

from __future__ import annotations

import torch

from ._common import LazyKernel, cdiv, fast_launch, next_pow2, sm_count, tl, use_triton

__all__ = ["gptq_block_ref", "gptq_block_triton", "kernel_block_size", "triton_solve_available", "MAX_BLOCK_C",
           "tile_config"]

MAX_BLOCK_C = 1024  # widest block the kernel holds in registers (BLOCK_R shrinks as BLOCK_C grows)
_MODES = {"static": 0, "channel": 1, "dynamic": 2}


# ----------------------------------------------------------------------------- reference


def gptq_block_ref(
    W: torch.Tensor,
    U: torch.Tensor,
    Q: torch.Tensor,
    b0: int,
    b1: int,
    args,
    *,
    g: int,
    static: bool,
    col_group: list[int] | None,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    scale_c: torch.Tensor,
    zero_c: torch.Tensor | None,
    scale_dtype: torch.dtype,
    qparams=None,
) -> torch.Tensor:
    """One lazy block of the GPTQ solve in plain torch: the torch backend's column loop.

    W: (out, in) weights in solve order, compute dtype; columns b0:b1 are read, not
        written (a dynamic group straddling the block also reads W[:, b1:b0+...]).
    U: (in, in) upper Cholesky factor of H^-1 in solve order.
    Q: (out, in) float; the block's integers are written to Q[:, b0:b1].
    static: scales fixed before the solve (per-channel when args.group_size is None,
        else group col_group[col] of solve position col); otherwise groups of g
        consecutive columns, computed (into scale/zero and their compute-dtype copies
        scale_c/zero_c) when the solve reaches a group's first column.
    scale/zero: (out, n_groups) float32 / int8 or None; scale_c/zero_c: compute-dtype copies.
    qparams: computes a dynamic group's (scale, zero) as ``qparams(grp, args, scale_dtype=, first=col)`` instead of
        ``compute_qparams`` (e.g. the mse search of ``quant.gptq``; the kernel has only min/max).
    Returns E1 (out, b1 - b0): the scaled errors, for W[:, b1:] -= E1 @ U[b0:b1, b1:].
    """
    from .numerics import compute_qparams

    W1 = W[:, b0:b1].clone()  # W1: (out, b) this block's columns, updated in place
    E1 = torch.zeros_like(W1)  # E1: (out, b) scaled errors, applied to later blocks lazily
    U1 = U[b0:b1, b0:b1]
    qmin, qmax = float(args.qmin), float(args.qmax)
    for i in range(b1 - b0):
        col = b0 + i
        if static:
            gi = 0 if args.group_size is None else (col_group[col] if col_group is not None else col // g)
        else:
            gi = col // g
            if col % g == 0:
                # The group's weights with every update so far: columns in this
                # block are current in W1; later ones still owe this block's
                # pending (lazy) updates, added here without storing them.
                end = col + g
                grp = W1[:, i : min(end, b1) - b0]
                if end > b1:
                    grp = torch.cat([grp, W[:, b1:end] - E1[:, :i] @ U[b0:col, b1:end]], dim=1)
                if qparams is None:
                    s_g, z_g = compute_qparams(grp, args, scale_dtype=scale_dtype)
                else:  # first: the group's first column, for per-column weights
                    s_g, z_g = qparams(grp, args, scale_dtype=scale_dtype, first=col)
                scale[:, gi] = s_g[:, 0]
                scale_c[:, gi] = s_g[:, 0]
                if zero is not None:
                    zero[:, gi] = z_g[:, 0]
                    zero_c[:, gi] = z_g[:, 0]
        s = scale_c[:, gi]
        w_col = W1[:, i]
        # Same ops as quant.core.quantize/dequantize, so a column with no
        # incoming error quantizes exactly as RTN would.
        q = torch.round(w_col / s)
        if zero is not None:
            z = zero_c[:, gi]
            q = (q + z).clamp_(qmin, qmax)
            dq = (q - z) * s
        else:
            q = q.clamp_(qmin, qmax)
            dq = q * s
        Q[:, col] = q
        err = (w_col - dq) / U1[i, i]
        W1[:, i + 1 :].addr_(err, U1[i, i + 1 :], alpha=-1.0)
        E1[:, i] = err
    return E1


# ----------------------------------------------------------------------------- kernel


def _gptq_block_kernel(
    w_ptr, u_ptr, q_ptr, e_ptr, s_ptr, z_ptr, gidx_ptr,  # W (out, in) f32, U (in, in) f32, Q (out, in) i8,
    n_rows, b0, ncols, u_off,                          # E (out, >=ncols) f32, scale/zero (out, G) f32/i8, gidx (in,) i32
    stride_w, stride_u, stride_q, stride_e, stride_s,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    MODE: tl.constexpr,  # 0 static groups (gidx), 1 per-channel, 2 dynamic groups of G
    G: tl.constexpr,
    ASYM: tl.constexpr,
    QMIN: tl.constexpr,
    QMAX: tl.constexpr,
    SCALE_ROUND: tl.constexpr,  # dynamic scales rounded to: 0 float32 (none), 1 float16, 2 bfloat16
    RECIP: tl.constexpr,  # range / (qmax - qmin) as torch on CUDA computes it (x * (1/d)); else x / d
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < ncols
    wt = tl.load(w_ptr + rows64[:, None] * stride_w + (b0 + cols)[None, :],
                 mask=rmask[:, None] & cmask[None, :], other=0.0)  # wt: (BLOCK_R, BLOCK_C) the block's columns
    ccols = tl.where(cmask, cols, -1)  # columns past the block never pass "> i"
    s_row = s_ptr + rows64 * stride_s
    z_row = z_ptr + rows64 * stride_s
    q_row = q_ptr + rows64 * stride_q + b0
    e_row = e_ptr + rows64 * stride_e
    u_blk = u_ptr + u_off  # U[b0, b0] (u_off = b0 * stride_u + b0, from the host: may exceed int32)
    s = tl.full([BLOCK_R], 1.0, tl.float32)
    z = tl.full([BLOCK_R], 0.0, tl.float32)
    if MODE == 1:
        s = tl.load(s_row, mask=rmask, other=1.0)
        if ASYM:
            z = tl.load(z_row, mask=rmask, other=0).to(tl.float32)
    for i in range(0, ncols):
        if MODE == 0:
            gi = tl.load(gidx_ptr + b0 + i)
            s = tl.load(s_row + gi, mask=rmask, other=1.0)
            if ASYM:
                z = tl.load(z_row + gi, mask=rmask, other=0).to(tl.float32)
        if MODE == 2:
            if i % G == 0:
                # a group starts: its scale/zero from the current weights (compute_qparams)
                gm = (cols[None, :] >= i) & (cols[None, :] < i + G)
                if ASYM:
                    wmin = tl.minimum(tl.min(tl.where(gm, wt, float("inf")), axis=1), 0.0)
                    wmax = tl.maximum(tl.max(tl.where(gm, wt, float("-inf")), axis=1), 0.0)
                    if RECIP:
                        s = (wmax - wmin) * (1.0 / (QMAX - QMIN))
                    else:
                        s = tl.math.div_rn(wmax - wmin, (QMAX - QMIN) * 1.0)
                else:
                    amax = tl.max(tl.where(gm, tl.abs(wt), 0.0), axis=1)
                    if RECIP:
                        s = amax * (1.0 / ((QMAX - QMIN) / 2))
                    else:
                        s = tl.math.div_rn(amax, (QMAX - QMIN) / 2)
                # round_scale: to the checkpoint dtype (>= its smallest normal), then >= 1e-8
                if SCALE_ROUND == 1:
                    s = tl.maximum(s.to(tl.float16).to(tl.float32), 6.103515625e-05)
                if SCALE_ROUND == 2:
                    bits = s.to(tl.int32, bitcast=True)
                    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
                    s = tl.maximum(bits.to(tl.float32, bitcast=True), 1.1754943508222875e-38)
                s = tl.maximum(s, 1e-8)
                gcol = (b0 + i) // G
                tl.store(s_row + gcol, s, mask=rmask)
                if ASYM:
                    zq = QMIN - tl.math.div_rn(wmin, s)
                    zq = (zq + 12582912.0) - 12582912.0
                    z = tl.minimum(tl.maximum(zq, QMIN), QMAX)
                    tl.store(z_row + gcol, z.to(tl.int8), mask=rmask)
        w = tl.sum(tl.where(cols[None, :] == i, wt, 0.0), axis=1)  # (BLOCK_R,) column i, current
        q = tl.math.div_rn(w, s)
        q = (q + 12582912.0) - 12582912.0  # round half to even (torch.round)
        if ASYM:
            q = tl.minimum(tl.maximum(q + z, QMIN), QMAX)
            dq = (q - z) * s
        else:
            q = tl.minimum(tl.maximum(q, QMIN), QMAX)
            dq = q * s
        u_row = u_blk + i * stride_u  # U[b0 + i, b0:]
        err = tl.math.div_rn(w - dq, tl.load(u_row + i))
        u = tl.load(u_row + cols, mask=ccols > i, other=0.0)
        wt = wt - err[:, None] * u[None, :]
        tl.store(q_row + i, q.to(tl.int8), mask=rmask)
        tl.store(e_row + i, err, mask=rmask)


gptq_block_kernel = LazyKernel(_gptq_block_kernel)


# ----------------------------------------------------------------------------- launch




def tile_config(n_rows: int, block_c: int, device: torch.device) -> dict:
    """BLOCK_R (rows per program) and num_warps for a block of ``block_c`` (power of 2) columns.

    GPU: the widest row tile that still gives ~4 programs per SM (a block is a chain of
    ``block_c`` dependent steps, so more programs in flight beat wider tiles), capped so a
    tile is <= 4096 float32 (<= 32 registers per thread at 4 warps); ~16 elements per thread.
    Interpreter: one program for up to 64 rows (numpy ops on whole tiles are cheap, programs
    are not).
    """
    cap = max(1, 4096 // block_c)
    if device.type != "cuda":
        return {"BLOCK_R": min(next_pow2(n_rows), 64, cap), "num_warps": 1}
    target = 4 * sm_count(device)
    br = 1
    while br * 2 <= cap and cdiv(n_rows, br * 2) >= target:
        br *= 2
    warps = max(1, min(8, br * block_c // 512))
    return {"BLOCK_R": br, "num_warps": warps}


def kernel_block_size(block_size: int, group_size: int | None, dynamic: bool) -> int:
    """Columns per kernel launch: ``block_size`` (at most 256); with dynamic groups a multiple
    of the group size (so no group straddles two blocks), at least one group."""
    if not dynamic:
        return max(1, min(block_size, 256))
    g = int(group_size)
    return g * max(1, min(block_size, 256) // g)


def triton_solve_available(device: torch.device) -> bool:
    """Whether the fused block kernel can run for tensors on ``device`` (CUDA, or CPU under
    ``TRITON_INTERPRET=1``)."""
    return use_triton(torch.empty(0, device=device))


def gptq_block_triton(
    W: torch.Tensor,
    U: torch.Tensor,
    Q: torch.Tensor,
    E: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    gidx: torch.Tensor | None,
    b0: int,
    b1: int,
    args,
    *,
    mode: str,
    group_size: int | None = None,
    scale_dtype: torch.dtype = torch.float32,
    config: dict | None = None,
) -> None:
    """Fused launch of one lazy block (see the module docstring for the math).

    W: (out, in) float32 contiguous, solve order (columns b0:b1 read, nothing written).
    U: (in, in) float32 contiguous.  Q: (out, in) int8, columns b0:b1 written.
    E: (out, >= b1 - b0) float32, row stride E.stride(0); columns 0 .. b1-b0-1 written.
    scale: (out, n_groups) float32, zero: (out, n_groups) int8 or None (symmetric); read
    (``static``/``channel``), or written at group starts (``dynamic``; b0 and b1 - b0 must
    then be multiples of group_size, except a last block ending at in_features).
    gidx: (in,) int32 group per solve position (``static``), else unused (may be None).
    config: {"BLOCK_R", "num_warps"} (default: ``tile_config``).
    """
    n_rows, in_f = W.shape
    ncols = b1 - b0
    block_c = next_pow2(ncols)
    if block_c > MAX_BLOCK_C:
        raise ValueError(f"GPTQ kernel block of {ncols} columns exceeds {MAX_BLOCK_C}")
    m = _MODES[mode]
    if m == 2 and (b0 % group_size or (ncols % group_size and b1 != in_f)):
        raise ValueError(f"dynamic-group block {b0}:{b1} is not aligned to group size {group_size}")
    for t, name in ((W, "W"), (U, "U"), (E, "E")):
        if t.dtype != torch.float32 or t.stride(-1) != 1:
            raise ValueError(f"{name} must be float32 with unit column stride")
    cfg = dict(config) if config is not None else tile_config(n_rows, block_c, W.device)
    sround = {torch.float16: 1, torch.bfloat16: 2}.get(scale_dtype, 0)
    asym = zero is not None
    z = zero if asym else scale  # unused pointer when symmetric
    gi = gidx if gidx is not None else scale  # unused pointer unless static
    consts = dict(BLOCK_R=cfg["BLOCK_R"], BLOCK_C=block_c, MODE=m, G=int(group_size or 1), ASYM=asym,
                  QMIN=int(args.qmin), QMAX=int(args.qmax), SCALE_ROUND=sround, RECIP=W.is_cuda,
                  num_warps=cfg["num_warps"])
    grid = (cdiv(n_rows, cfg["BLOCK_R"]),)
    fast_launch(gptq_block_kernel, grid,
                (W, U, Q, E, scale, z, gi, n_rows, b0, ncols, b0 * U.stride(0) + b0,
                 W.stride(0), U.stride(0), Q.stride(0), E.stride(0), scale.stride(0)),
                consts, tuple(sorted(consts.items())))
