"""Registers, spill stores and main-loop instructions of the W4A16 M=1 half2 GEMV (``gemv_h2``), 3-D loop vs
PER_BLOCK, built for sm_90a with Triton's compiler, ptxas and cuobjdump on a machine without a GPU (issue 19).
Use the Triton the GPU runs (its ptxas must accept the PTX version that Triton emits):

    PYTHONPATH=. python benchmarks/h2_spills.py             # registers / spills over a tile grid
    PYTHONPATH=. python benchmarks/h2_spills.py --sass      # + SASS of each GPU file's shipped M = 1 configs

``--sass`` counts the instructions of the kernel's innermost hot loop (the longest backward branch) and divides by
the weights a thread handles per trip: a static cost per weight (no timing), with the instruction classes that
make it up, so that a change to the kernel's arithmetic can be judged before a GPU measures it.
"""

from __future__ import annotations

import argparse
import collections
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


def build(cfg: dict, zero: bool = False):
    """The GEMV compiled for sm_90a with a config's tile (``gemv_h2`` keys) as a launch on aligned operands."""
    from quantkit.kernels import wna16
    from quantkit.kernels._common import build_for_target

    packed = bool(cfg.get("PACKED_X", False))
    consts = dict(HAS_ZERO=zero, HAS_BIAS=False, EVEN_U=True, SPLIT_K=cfg["SPLIT_K"], BLOCK_N=cfg["BLOCK_N"],
                  UNROLL=cfg["UNROLL"], AMAX_K=4096, USE_ASM=True, PER_BLOCK=bool(cfg.get("PER_BLOCK", False)),
                  LOAD_STAGES=int(cfg.get("LOAD_STAGES", 1)),
                  SLICE_PRESCALE=bool(cfg.get("SLICE_PRESCALE", False)) and not packed, PACKED_X=packed,
                  PDL=bool(cfg.get("PDL", False)), PREFETCH=int(cfg.get("PREFETCH", 0)) if cfg.get("PDL") else 0,
                  CHAIN=bool(cfg.get("PDL") and cfg.get("PDL_CHAIN")))
    types = dict(TYPES, x_ptr="*i32") if packed else TYPES  # PACKED_X: x is the packed int32 pairs
    return build_for_target(wna16.wna16_gemv_h2_kernel.jitted(), types, consts, 90, aligned=ALIGNED,
                            num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 1))


def sass_lines(cubin: bytes, cuobjdump: str) -> list[tuple[int, str]]:
    """(address, instruction) of a cubin's SASS."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True).stdout
    out = []
    for line in text.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            out.append((int(m.group(1), 16), m.group(2).strip()))
    return out


def hot_loop(ins: list[tuple[int, str]]) -> list[str]:
    """The instructions of the longest loop: from a backward branch's target to the branch."""
    at = {a: i for i, (a, _) in enumerate(ins)}
    best: list[str] = []
    for i, (a, t) in enumerate(ins):
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", t)
        if m and int(m.group(1), 16) < a and int(m.group(1), 16) in at:
            body = [t_ for _, t_ in ins[at[int(m.group(1), 16)]: i + 1]]
            best = body if len(body) > len(best) else best
    return best


def opcode(t: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0]


def loop_cost(cfg: dict, cuobjdump: str) -> tuple[float, int, str]:
    """(instructions per weight, loop length, the top instruction classes) of a config's hot loop. A trip covers
    UNROLL 128-K blocks of BLOCK_N columns (PER_BLOCK unrolls its blocks inside one trip too)."""
    k = build(cfg)
    body = hot_loop(sass_lines(k.asm["cubin"], cuobjdump))
    per_thread = cfg["UNROLL"] * 128 * cfg["BLOCK_N"] / (32 * cfg["num_warps"])
    top = collections.Counter(opcode(t) for t in body).most_common(8)
    return len(body) / per_thread, len(body), ", ".join(f"{o} {n}" for o, n in top)


def main() -> None:
    import triton
    from triton import knobs

    ap = argparse.ArgumentParser()
    ap.add_argument("--sass", action="store_true", help="also: hot-loop SASS of the shipped M = 1 configs")
    args = ap.parse_args()
    print(f"triton {triton.__version__}, sm_90a; registers / spill stores per thread\n")
    print("| tile (BLOCK_N x SPLIT_K x UNROLL, warps) | weights | 3-D loop | PER_BLOCK |\n|---|---|---|---|")
    for bn, sk, u, w in TILES:
        for zero in (False, True):
            cells = [ptxas_usage(build(dict(BLOCK_N=bn, SPLIT_K=sk, UNROLL=u, num_warps=w, PER_BLOCK=pb),
                                       zero).asm["ptx"], knobs.nvidia.ptxas.path) for pb in (False, True)]
            print(f"| {bn}x{sk}x{u} w{w} | {'asym' if zero else 'sym'} | {cells[0]} | {cells[1]} |")
    if not args.sass:
        return
    from quantkit.kernels._common import load_tuned

    cuobjdump = os.path.join(os.path.dirname(knobs.nvidia.ptxas.path), "cuobjdump")
    print("\nHot loop of the shipped W4A16 M = 1 configs and their PACKED_X twins (x prescaled and packed by a launch "
          "of its own; sm_90a SASS; symmetric weights; registers / spills from ptxas)\n")
    print("| GPU | N x K | config | x | loop instructions | per weight | registers | top classes |\n"
          "|---|---|---|---|---|---|---|---|")
    for (gpu, m, n, k_), cfg in sorted(load_tuned("w4a16").items()):
        if m == 1 and cfg.get("BACKEND") == "gemv_h2":
            tile = (f"{cfg['BLOCK_N']}x{cfg['SPLIT_K']}x{cfg['UNROLL']} w{cfg['num_warps']}"
                    + (" PER_BLOCK" if cfg.get("PER_BLOCK") else "") + (" ring" if cfg.get("LOAD_STAGES", 1) > 1 else ""))
            for c in (cfg, dict(cfg, PACKED_X=True)):
                per_w, n_ins, top = loop_cost(c, cuobjdump)
                regs = ptxas_usage(build(c).asm["ptx"], knobs.nvidia.ptxas.path)
                print(f"| {gpu} | {n} x {k_} | {tile} | {'packed' if c.get('PACKED_X') else 'in-loop'} | {n_ins} | "
                      f"{per_w:.2f} | {regs} | {top} |")


if __name__ == "__main__":
    main()
