"""Mixed-precision bitmask GEMM: per-row choice between INT8 (W8A8) and FP16, in one launch.

API
---
``mixed_linear(x, weight, w_fp16, control, row_bits, bias)``

* ``x``: (M, K) fp16/bf16 activations; row m is one token of the batch.
* ``weight``: :class:`~quantkit.kernels.w8a8.W8A8Weight` (per-channel symmetric int8, (N, K)).
* ``w_fp16``: (N, K) fp16/bf16 copy of the layer's weight, or None.  FP16 rows run on it when
  present, else on the dequantized int8 weight ``q * w_scale`` with FP16 activations.
* ``control``: 64-bit control word (a Python int, one per call):

  ======  =================  =========================================================
  bit     name               meaning
  ======  =================  =========================================================
  0       ``CTRL_FORCE_FP16``  layer forced to FP16 (sensitive layer): every row FP16,
                             ``row_bits`` ignored.  With ``w_fp16`` this is cuBLAS
                             (``F.linear``); without it, one launch of the kernel in
                             all-FP16 mode.
  1       ``CTRL_ROW_BITS``    ``row_bits`` is meaningful (some row may be FP16).  When
                             clear, every row is INT8 and the call is exactly the plain
                             W8A8 kernel (fast path; ``row_bits`` may be None).
  2..63   reserved           must be 0 (ValueError otherwise).
  ======  =================  =========================================================

* ``row_bits``: (M,) uint8; bit 0 set = that row runs in FP16, other bits reserved.  The caller
  derives it from per-sample bits and per-64-token-group bits with :func:`row_precision_bits`.

Grouping (how each tile stays uniform)
--------------------------------------
No permutation is materialised.  With ``CTRL_ROW_BITS`` the call runs the plain W8A8 kernels
(``quantkit.kernels.w8a8``: the dp4a GEMV for small M, split-K or tensor-core tiles above, the persistent TMA
kernel at large M on Hopper) with
W8A8's config for the shape and their ``ROW_BITS`` constexpr: each program loads its BLOCK_M row
bits once, counts FP16 rows, and sets the INT8 K loop's bound to zero when every row of the tile
is FP16 and the FP16 loop's bound to zero when none is (branches hoisted per tile; nothing is added
inside the INT8 K loop).  Only a tile that straddles a boundary runs both loops: its INT8 rows are
stored (or, split-K, parked as exact int32 partials) before the FP16 loop runs over the tile, and only
its FP16 rows are stored from that loop, so INT8 rows stay bit for bit the plain call's (the register
budget that keeps the plain kernel's occupancy is in ``w8a8._mixed_maxnreg``).  FP16 rows use
``w_fp16`` when given, else ``w * w_scale``.  The
runtime lays a batch out sample-contiguous with precision decided per 64-token group, so mixed
tiles are the exception.  No extra launch (no argsort / gather / scatter); the mask overhead is
measured in ``benchmarks/gemm.py``.  Where W8A8's config is the Gluon kernel (Hopper, large M) it does the same
in its own launch: a tile holding an FP16 row runs an fp16/bf16 wgmma loop through the INT8 loop's shared ring,
on ``w_fp16`` or on the int8 weight widened tile by tile (``w8a8_gluon``; it reads the tile's row bits after its
INT8 loop).  ``CTRL_FORCE_FP16`` without an FP16 copy still runs ``_mixed_kernel`` below (all-FP16 mode,
``MIXED_CONFIGS``); with a copy it is cuBLAS.
"""

from typing import Optional

import torch

from . import _replay
from ._common import (ConfigCache, LazyKernel, cdiv, eager_cuda, fast_launch, gpu_key, grouped_tile, load_k_tiles, tl,
                      use_triton)
from .w8a8 import W8A8Weight, _INTERP_CFG, w8a8_gemm_ref, w8a8_linear_triton

__all__ = [
    "CTRL_FORCE_FP16",
    "CTRL_ROW_BITS",
    "ROW_FP16",
    "mixed_linear",
    "mixed_gemm_ref",
    "row_precision_bits",
    "TOKEN_GROUP",
    "MIXED_CONFIGS",
]

CTRL_FORCE_FP16 = 1 << 0
CTRL_ROW_BITS = 1 << 1
_CTRL_KNOWN = CTRL_FORCE_FP16 | CTRL_ROW_BITS
ROW_FP16 = 1
TOKEN_GROUP = 64


def row_precision_bits(
    sample_ids: torch.Tensor,
    token_positions: torch.Tensor,
    sample_bits: Optional[torch.Tensor],
    group_bits: Optional[torch.Tensor],
) -> torch.Tensor:
    """Per-row precision bits from per-sample and per-64-token-group bits (pure torch, on device).

    sample_ids: (M,) int, the sample each row belongs to; token_positions: (M,) int, the row's
    position inside its sample; sample_bits: (S,) bool/uint8 (1 = whole sample FP16) or None;
    group_bits: (S, G) bool/uint8 (1 = 64-token group g of sample s FP16) or None; positions
    past the last group use the last group.  Returns (M,) uint8 with bit 0 = FP16.
    """
    sid = sample_ids.long()
    bits = torch.zeros(sid.shape, dtype=torch.uint8, device=sid.device)
    if sample_bits is not None:
        bits |= (sample_bits.to(torch.uint8)[sid] & 1)
    if group_bits is not None:
        G = group_bits.shape[1]
        g = torch.clamp(token_positions.long() // TOKEN_GROUP, 0, G - 1)
        bits |= (group_bits.to(torch.uint8)[sid, g] & 1)
    return bits


def _check_control(control: int) -> None:
    if control < 0 or control >= 1 << 64:
        raise ValueError("control must be a 64-bit unsigned word")
    if control & ~_CTRL_KNOWN:
        raise ValueError(f"reserved control bits set: {control:#x}")


def _fp16_rows(control: int, row_bits: Optional[torch.Tensor], M: int, device) -> torch.Tensor:
    if control & CTRL_FORCE_FP16:
        return torch.ones(M, dtype=torch.bool, device=device)
    if control & CTRL_ROW_BITS:
        return (row_bits.to(torch.int32) & ROW_FP16) != 0
    return torch.zeros(M, dtype=torch.bool, device=device)


def mixed_gemm_ref(x, w, w_scale, w_fp16, control: int, row_bits, bias=None):
    """Reference. x: (M, K); w: (N, K) int8; w_scale: (N,); w_fp16: (N, K) | None;
    row_bits: (M,) uint8 | None -> (M, N) x.dtype."""
    _check_control(control)
    fp = _fp16_rows(control, row_bits, x.shape[0], x.device)
    out_i = w8a8_gemm_ref(x, w, w_scale, bias)
    ct = torch.float64 if x.device.type == "cpu" else torch.float32
    wf = w_fp16.to(ct) if w_fp16 is not None else w.to(ct) * w_scale.reshape(-1, 1).to(ct)
    out_f = x.to(ct) @ wf.t()
    if bias is not None:
        out_f = out_f + bias.to(ct)
    return torch.where(fp[:, None], out_f.to(x.dtype), out_i)


def _mixed_kernel(
    x_ptr, w_ptr, ws_ptr, bias_ptr, c_ptr,
    # the all-FP16 mode (CTRL_FORCE_FP16 without an FP16 copy; every other mode runs the W8A8 kernels):
    # x: (M, K) fp16/bf16; w: (N, K) int8; ws: (N,) fp32; c: (M, N) = (x @ w^T) * ws (+ bias)
    M, N, K,
    stride_xm, stride_wn, stride_cm,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """All-FP16 GEMM on the int8 weight, scaled per output channel: one (BLOCK_M, BLOCK_N) output tile."""
    offs_m, offs_n, _, _ = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = offs_m % M
    rn = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    w_scale = tl.load(ws_ptr + rn)

    accf = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xf_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    wf_ptrs = w_ptr + rn[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    for k0 in range(0, K, BLOCK_K):
        xf, wt = load_k_tiles(xf_ptrs, wf_ptrs, offs_k, k0, K, EVEN_K)
        accf = tl.dot(xf, wt.to(x_ptr.dtype.element_ty), accf)
        xf_ptrs += BLOCK_K
        wf_ptrs += BLOCK_K
    out = accf * w_scale[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


mixed_kernel = LazyKernel(_mixed_kernel)


def _default_config(M: int, N: int, K: int) -> dict:
    # the all-FP16 kernel (a FUSE_QUANT key in a measured config is from its former INT8 path: ignored)
    if M <= 16:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=4)
    if M <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=3)
    if M <= 256:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)




# measured configs: quantkit/kernels/configs/<gpu>.json
MIXED_CONFIGS = ConfigCache(_default_config, "mixed")


def mixed_linear_triton(x, w, w_scale, w_fp16, control: int, row_bits, bias=None, config: Optional[dict] = None,
                        out=None):
    """Triton path. x: (M, K) -> (M, N) x.dtype.  One kernel launch (plus the per-token quant
    launch for large-M configs, as in the plain W8A8 path)."""
    _check_control(control)
    x = x if x.stride(-1) == 1 else x.contiguous()
    M, K = x.shape
    N = w.shape[0]
    force = bool(control & CTRL_FORCE_FP16)
    if not force and not (control & CTRL_ROW_BITS):
        return w8a8_linear_triton(x, w, w_scale, bias, config=config, out=out)  # all INT8: plain W8A8
    if force and w_fp16 is not None:
        y = torch.nn.functional.linear(x, w_fp16.to(x.dtype), None if bias is None else bias.to(x.dtype))
        return y if out is None else out.copy_(y)
    if not force:
        # row bits: the plain W8A8 kernels and configs (GEMV / split-K / tensor-core, whichever
        # W8A8 uses for this shape) in mixed mode -- per tile, the row bits are loaded once and the
        # INT8 and FP16 K loops are each skipped unless a row of the tile needs them.
        rb = row_bits if row_bits.dtype in (torch.uint8, torch.int8) else row_bits.to(torch.uint8)
        return w8a8_linear_triton(x, w, w_scale, bias, config=config, out=out, row_bits=rb, w_fp16=w_fp16)
    # forced to FP16 with no FP16 copy: the all-FP16 kernel on the int8 weight
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    if config is not None:
        cfg = dict(config)
    elif not x.is_cuda:
        cfg = dict(_INTERP_CFG)
    else:
        cfg = MIXED_CONFIGS.get(M, N, K, gpu_key(x))
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)
    const = dict(HAS_BIAS=bias is not None, EVEN_K=(K % cfg["BLOCK_K"] == 0),
                 BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
                 num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    fast_launch(mixed_kernel, grid, (x, w, w_scale, bias if bias is not None else w_scale, out,
                                     M, N, K, x.stride(0), w.stride(0), out.stride(0)), const, tuple(const.values()))
    return out


@torch.library.custom_op("quantkit::mixed_linear", mutates_args=())
def _mixed_linear_op(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, w_fp16: Optional[torch.Tensor],
    control: int, row_bits: Optional[torch.Tensor], bias: Optional[torch.Tensor],
) -> torch.Tensor:
    if use_triton(x, w):
        return mixed_linear_triton(x, w, w_scale, w_fp16, control, row_bits, bias)
    return mixed_gemm_ref(x, w, w_scale, w_fp16, control, row_bits, bias)


@_mixed_linear_op.register_fake
def _(x, w, w_scale, w_fp16, control, row_bits, bias):
    return x.new_empty((x.shape[0], w.shape[0]))


def mixed_linear(
    x: torch.Tensor, weight: W8A8Weight, w_fp16: Optional[torch.Tensor], control: int,
    row_bits: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mixed INT8/FP16 linear (see module docstring). x: (M, K) -> (M, N) x.dtype."""
    _check_control(control)
    if (control & CTRL_ROW_BITS) and not (control & CTRL_FORCE_FP16) and row_bits is None:
        raise ValueError("CTRL_ROW_BITS set but row_bits is None")
    if x.dim() == 2 and eager_cuda(x):  # eager fast path: no custom-op dispatch, and the call's launches replayed
        # where this kind of call (its control word and row bits' layout too) was recorded for this weight
        return _replay.linear(weight, "mixed_linear", (weight.w, weight.scale, w_fp16, bias), x, weight.N,
                              lambda out: mixed_linear_triton(x, weight.w, weight.scale, w_fp16, int(control),
                                                              row_bits, bias, out=out), (row_bits,), int(control))
    return _mixed_linear_op(x, weight.w, weight.scale, w_fp16, int(control), row_bits, bias)
