"""Does Triton keep a wgmma in flight across K steps? A static check for sm_90, no GPU needed (issue 19).

    python benchmarks/wgmma_probe.py

Builds, with Triton's compiler for sm_90 (the launch's 16-byte divisibility hints given), a minimal
TMA GEMM with int8 and fp16 operands, and quantkit's own tensor-core kernels (W8A8 persistent TMA,
plain and mixed; W4A16 with and without SCALE_W), and prints the `warp_group_dot_wait` pending counts
of each TTGIR. A count >= 1 inside the K loop means the next wgmma is issued before the previous one
is waited for; 0 means every MMA is waited for before the next K step (the tensor cores idle while
the next operands are prepared). Run it with the Triton version the GPU machine has.

Why INT8 is always 0: Triton's Hopper pipeliner makes a wgmma asynchronous only when its accumulator is fp32
(WGMMAPipeline.cpp, dotCanBeProperlyAsync, "Rule 2.1"); INT8 wgmmas accumulate in int32 (BENCHMARKS.md, issue 19).
"""

from __future__ import annotations

import os
import re

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from quantkit.kernels._common import build_for_target  # noqa: E402


@triton.jit
def _minimal(a_ptr, w_ptr, c_ptr, M, N, K, IS_INT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
             BK: tl.constexpr, ST: tl.constexpr):
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
    m0 = tl.program_id(0) * BM
    n0 = tl.program_id(1) * BN
    acc = tl.zeros((BM, BN), dtype=tl.int32 if IS_INT else tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=ST):
        a = a_desc.load([m0, k0])
        w = w_desc.load([n0, k0]).T
        if IS_INT:
            acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, w, acc)
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
    c_desc.store([m0, n0], acc.to(tl.float16))


def pendings(fn, types: dict, consts: dict, num_warps: int, num_stages: int) -> list[int]:
    aligned = [n for n in fn.arg_names if n.endswith("_ptr") or n in ("M", "N", "K", "stride_xm", "stride_cm")]
    k = build_for_target(fn, types, consts, 90, aligned=aligned, num_warps=num_warps, num_stages=num_stages)
    return [int(p) for p in re.findall(r"warp_group_dot_wait[^\n]*pendings = (\d+)", k.asm["ttgir"])]


def main() -> None:
    from quantkit.kernels import w8a8, wna16

    rows = []
    for is_int in (True, False):
        dt = "*i8" if is_int else "*fp16"
        rows.append((f"minimal TMA GEMM, {'int8' if is_int else 'fp16'}", pendings(
            _minimal, {"a_ptr": dt, "w_ptr": dt, "c_ptr": "*fp16"},
            dict(IS_INT=is_int, BM=128, BN=128, BK=128 if is_int else 64, ST=3), 8, 3)))
    tma_types = {"a_ptr": "*i8", "w_ptr": "*i8", "bias_ptr": "*fp16", "c_ptr": "*fp16", "x_ptr": "*fp16",
                 "wf_ptr": "*fp16", "rb_ptr": "*u8"}
    for mixed in (False, True):
        rows.append((f"quantkit W8A8 TMA 256x128x128{' mixed' if mixed else ''}", pendings(
            w8a8.w8a8_tma_kernel.jitted(), tma_types,
            dict(HAS_BIAS=False, ROW_BITS=mixed, HAS_FP16_W=True, BLOCK_KF=64 if mixed else 16,
                 STAGES_F=3 if mixed else 1, BLOCK_M=256, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, LOOP_STAGES=3), 8, 3)))
    w4_types = {"x_ptr": "*fp16", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*i8", "bias_ptr": "*fp16",
                "c_ptr": "*fp16", "ws_ptr": "*fp32", "lock_ptr": "*i32"}
    for swap, scale_w, bm in ((False, False, 64), (True, False, 64), (True, True, 64), (True, True, 256)):
        rows.append((f"quantkit W4A16 g128 mma BLOCK_M {bm}{' swap' if swap else ''}{' SCALE_W' if scale_w else ''}",
                     pendings(wna16.wna16_mma_kernel.jitted(), w4_types,
                              dict(BITS=4, PER=8, R=16, HAS_ZERO=False, HAS_BIAS=False, GS_SMALL=False, EVEN_K=True,
                                   SPLIT_K=1, SWAP_AB=swap, MAGIC16=0x6400, M16=1024.0, SCALE_W=scale_w, BLOCK_M=bm,
                                   BLOCK_N=128, GROUP_M=8), 8, 3)))
    print(f"Triton {triton.__version__}, sm_90: warp_group_dot_wait pendings (in program order)\n")
    print("| kernel | pendings | an MMA in flight across K steps |")
    print("|---|---|---|")
    for name, p in rows:
        print(f"| {name} | {p} | {'yes' if any(x > 0 for x in p) else 'no'} |")


if __name__ == "__main__":
    main()
