"""Registers and spill stores of the W4A16 M=1 half2 GEMV (``gemv_h2``), 3-D loop vs PER_BLOCK, built for sm_90a
with Triton's compiler and ptxas on a machine without a GPU (issue 19). Use the Triton the GPU runs (its ptxas
must accept the PTX version that Triton emits):

    PYTHONPATH=. python benchmarks/h2_spills.py
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

TYPES = {"x_ptr": "*fp16", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*i8", "bias_ptr": "*fp16", "c_ptr": "*fp16",
         "ws_ptr": "*fp32", "lock_ptr": "*i32"}
# what a launch on the Llama shapes specialises on: 16-byte aligned pointers, N, K, groups and group size % 16 == 0
ALIGNED = (*TYPES, "N", "K", "n_groups", "group_size")
TILES = [(64, 4, 8, 4), (64, 4, 4, 4), (128, 4, 2, 4), (128, 2, 4, 4), (128, 4, 4, 8), (64, 8, 2, 4)]


def ptxas_usage(ptx: str, ptxas: str) -> str:
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, "-lineinfo", "-v", "--gpu-name=sm_90a", src, "-o", os.path.join(d, "k.o")],
                           capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spill = re.search(r"(\d+) bytes spill stores", r.stderr)
    if not regs or not spill:
        return "ptxas failed: " + r.stderr.strip().splitlines()[0] if r.stderr.strip() else "ptxas failed"
    return f"{regs.group(1)} / {spill.group(1)} B"


def main() -> None:
    import triton
    from triton import knobs

    from quantkit.kernels import wna16
    from quantkit.kernels._common import build_for_target

    print(f"triton {triton.__version__}, sm_90a; registers / spill stores per thread\n")
    print("| tile (BLOCK_N x SPLIT_K x UNROLL, warps) | weights | 3-D loop | PER_BLOCK |\n|---|---|---|---|")
    for bn, sk, u, w in TILES:
        for zero in (False, True):
            cells = []
            for per_block in (False, True):
                k = build_for_target(wna16.wna16_gemv_h2_kernel.jitted(), TYPES,
                                     dict(HAS_ZERO=zero, HAS_BIAS=False, EVEN_U=True, SPLIT_K=sk, BLOCK_N=bn, UNROLL=u,
                                          AMAX_K=4096, USE_ASM=True, PER_BLOCK=per_block, LOAD_STAGES=1, SLICE_PRESCALE=False),
                                     90, aligned=ALIGNED, num_warps=w, num_stages=1)
                cells.append(ptxas_usage(k.asm["ptx"], knobs.nvidia.ptxas.path))
            print(f"| {bn}x{sk}x{u} w{w} | {'asym' if zero else 'sym'} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
