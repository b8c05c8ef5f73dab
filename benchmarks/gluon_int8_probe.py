"""Probe (issue 19): the Gluon W8A8 kernel (``quantkit/kernels/w8a8_gluon.py``), built statically and run.

Why: Triton's own pipeliner never overlaps INT8 wgmmas (it makes a wgmma async only with an fp32 accumulator;
benchmarks/wgmma_probe.py, BENCHMARKS.md), which bounds every W8A8 tl.dot kernel in quantkit/kernels. Gluon
issues the wgmmas itself, so one can stay in flight while the next tile loads. This file reports, without a GPU,
what the build holds (wgmma waits in the K loop, registers, spills, shared memory) and, on a GPU, checks the
kernel exactly against an int64 reference and times it at M=2048 on the Llama-3-8B shapes against
torch._int_mm, quantkit's tl.dot kernels and cuBLAS FP16 (a tile sweep, each tile checked first).

Run (no GPU needed for the static report; --warps8 also builds num_warps 8, --dump DIR writes PTX/TTGIR):
    PYTHONPATH=. python benchmarks/gluon_int8_probe.py [--warps8] [--dump DIR]
"""

from __future__ import annotations

import re
import sys

import torch
import triton

from quantkit.kernels import w8a8_gluon

BLOCK_M, BLOCK_N, BLOCK_K = 128, 128, 128
STAGES = 3
NUM_WARPS = 4


def _cfg(bm=BLOCK_M, bn=BLOCK_N, bk=BLOCK_K, stages=STAGES, num_warps=NUM_WARPS):
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_stages=stages, num_warps=num_warps)


def int8_gemm(a: torch.Tensor, w: torch.Tensor, **tiles) -> torch.Tensor:
    """C = a @ w.T in int32 on a CUDA device (a: [M, K] int8, w: [N, K] int8, both row-major)."""
    c = torch.empty(a.shape[0], w.shape[0], dtype=torch.int32, device=a.device)
    return w8a8_gluon.launch(a.contiguous(), None, w.contiguous(), None, None, c, _cfg(**tiles))


def w8a8_gemm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, **tiles) -> torch.Tensor:
    """W8A8 on pre-quantized activations: (a @ w.T) * a_scale[:, None] * w_scale[None, :] in fp16 (a_scale (M,),
    w_scale (N,) float32) -- what quantkit's W8A8 kernels compute after the per-token quantization."""
    c = torch.empty(a.shape[0], w.shape[0], dtype=torch.float16, device=a.device)
    return w8a8_gluon.launch(a.contiguous(), a_scale.float().contiguous(), w.contiguous(),
                             w_scale.float().contiguous(), None, c, _cfg(**tiles))


def int8_gemm_ref(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Plain-torch reference: exact int64 matmul (on CPU), cast to int32."""
    return (a.cpu().to(torch.int64) @ w.cpu().to(torch.int64).T).to(torch.int32)


def build_for_sm90(bm=BLOCK_M, bn=BLOCK_N, bk=BLOCK_K, stages=STAGES, num_warps=NUM_WARPS, cc=90, scaled=False):
    """Compile the kernel for sm_`cc` without a GPU (quantkit.kernels.w8a8_gluon.build_for_target); scaled: the
    W8A8 epilogue (fp16 out), else the raw int32 accumulator."""
    return w8a8_gluon.build_for_target(_cfg(bm, bn, bk, stages, num_warps),
                                       torch.float16 if scaled else torch.int32, cc=cc)


def _loop_blocks(ptx: str):
    """Label -> lines for the PTX basic blocks that are targets of a backward branch (the loop bodies)."""
    lines = ptx.splitlines()
    labels = {}
    for i, ln in enumerate(lines):
        m = re.match(r"^\s*(\$L__\w+):", ln)
        if m:
            labels[m.group(1)] = i
    loops = []
    for i, ln in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__\w+);", ln)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            loops.append((m.group(1), labels[m.group(1)], i))
    return lines, loops


def compile_report(**kw) -> dict:
    print(f"triton {triton.__version__}; config {kw or 'default'}")
    try:
        k = build_for_sm90(**kw)
    except Exception as e:  # report the failure verbatim
        print("COMPILED: no")
        print(f"{type(e).__name__}: {e}")
        return {"compiled": False, "error": f"{type(e).__name__}: {e}"}
    ptx = k.asm["ptx"]
    has_cubin = bool(k.asm.get("cubin"))
    md = k.metadata
    print(f"COMPILED: yes (cubin from ptxas: {has_cubin}, {len(k.asm.get('cubin', b''))} bytes)")
    lines, loops = _loop_blocks(ptx)
    waits = [(i, ln.strip()) for i, ln in enumerate(lines) if "wgmma.wait_group" in ln]
    mmas = [i for i, ln in enumerate(lines) if "wgmma.mma_async" in ln]
    commits = [i for i, ln in enumerate(lines) if "wgmma.commit_group" in ln]

    def where(i):
        inside = [lab for lab, s, e in loops if s <= i <= e]
        return f"in loop {inside[0]}" if inside else "outside loops"

    print(f"wgmma.mma_async: {len(mmas)} total ({', '.join(f'{sum(1 for i in mmas if s <= i <= e)} in {lab}' for lab, s, e in loops) or 'no loops'})")
    print(f"wgmma.commit_group: {len(commits)}")
    print(f"wgmma.wait_group: {len(waits)}")
    for i, ln in waits:
        print(f"   PTX line {i + 1}: {ln}   [{where(i)}]")
    m = re.findall(r"wgmma\.mma_async[^\s]*", ptx)
    print(f"mma_async flavours: {sorted(set(m))}")
    n_regs = getattr(md, "n_regs", None)
    n_spills = getattr(md, "n_spills", None)
    print(f"shared memory (metadata.shared): {md.shared} bytes; num_warps {md.num_warps}")
    print(f"registers: {n_regs}; spills: {n_spills}")
    # ptxas-style info is not in metadata on 3.6 for a non-launched kernel; fall back to the PTX .reg declarations
    regdecl = re.findall(r"\.reg \.(\w+)\s+%\w+<(\d+)>;", ptx)
    print(f"PTX virtual register decls: {regdecl}")
    sass_report(k.asm.get("cubin"))
    ttgir = k.asm["ttgir"]
    print("TTGIR warp_group_dot ops:", len(re.findall(r"ttng\.warp_group_dot ", ttgir)),
          "| warp_group_dot_wait:", re.findall(r"ttng\.warp_group_dot_wait[^\n]*pendings = (\d+)", ttgir))
    return {"compiled": True, "kernel": k, "waits": waits, "n_mma": len(mmas), "shared": md.shared,
            "n_regs": n_regs, "n_spills": n_spills}


def _nv_tool(name):
    import os
    import triton.backends.nvidia as nv

    p = os.path.join(os.path.dirname(nv.__file__), "bin", name)
    return p if os.path.exists(p) else None


def sass_report(cubin):
    """Registers/spills from the cubin Triton produced (cuobjdump -res-usage; 3.6 fills metadata.n_regs only when a
    kernel is loaded on a GPU) and the wgmma waits as ptxas scheduled them (WARPGROUP.DEPBAR.LE in SASS)."""
    import subprocess
    import tempfile

    tool = _nv_tool("cuobjdump")
    if not cubin or tool is None:
        print("SASS: no cubin or no cuobjdump")
        return
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    if m:
        print(f"cubin resource usage: REG {m.group(1)}, STACK {m.group(2)}, static SHARED {m.group(3)} (dynamic smem is metadata.shared), "
              f"LOCAL (spill) {m.group(4)}")
    n_igmma = len(re.findall(r"IGMMA", sass))
    depbars = re.findall(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*(0x[0-9a-f]+)", sass)
    n_arrive = len(re.findall(r"WARPGROUP\.ARRIVE", sass))
    print(f"SASS: {n_igmma} IGMMA; WARPGROUP.DEPBAR.LE gsb0 values in order: {depbars}; WARPGROUP.ARRIVE x{n_arrive}")


def run_on_gpu():
    torch.manual_seed(0)
    for (M, N, K) in [(1024, 1024, 1024), (333, 1000, 720)]:
        a = torch.randint(-128, 128, (M, K), dtype=torch.int8, device="cuda")
        w = torch.randint(-128, 128, (N, K), dtype=torch.int8, device="cuda")
        c = int8_gemm(a, w)
        torch.cuda.synchronize()
        ref = int8_gemm_ref(a, w)
        ok = torch.equal(c.cpu(), ref)
        print(f"GPU M={M} N={N} K={K}: exact match {ok}"
              + ("" if ok else f" (mismatches {(c.cpu() != ref).sum().item()})"))
        a_s = torch.rand(M, device="cuda") * 1e-2 + 1e-3
        w_s = torch.rand(N, device="cuda") * 1e-2 + 1e-3
        y = w8a8_gemm(a, a_s, w, w_s).float()
        yr = (ref.cuda().double() * a_s.double()[:, None] * w_s.double()[None, :]).float()
        print(f"GPU W8A8 epilogue M={M} N={N} K={K}: max rel err {((y - yr).abs().max() / yr.abs().max()).item():.2e}")
    time_on_gpu()


# W8A8 tile sweep on the GPU: (BLOCK_M, BLOCK_N, BLOCK_K, STAGES, num_warps), each built statically for sm_90 with
# Triton 3.6 (`compile_report(bm=..., scaled=True)`: wait_group 1 in the loop, 254 registers, no spills). BLOCK_N
# 256 does not build there (the 3.6 pass pipeline fails at 8 warps), so the wide tile is 256 x 128.
SWEEP = [(128, 128, 128, 3, 4), (128, 128, 128, 4, 4), (128, 128, 64, 5, 4), (256, 128, 128, 3, 8),
         (256, 128, 64, 5, 8)]


def time_on_gpu():
    """At M=2048 on the Llama-3-8B shapes, in the same process, microseconds: int32 accumulation (this Gluon kernel
    at 128x128x128, torch._int_mm = cuBLAS INT8, quantkit's tl.dot kernel, every INT8 wgmma waited for), then W8A8
    on quantized activations: the best of SWEEP's Gluon tiles (each checked against quantkit's kernel first),
    quantkit's W8A8 with the shipped configs, and cuBLAS FP16."""
    from triton.testing import do_bench

    from quantkit.kernels.w8a8 import w8a8_gemm_q_triton, w8a8_int32_accumulate

    print("| M x N x K | gluon async wgmma us | torch._int_mm us | quantkit tl.dot us | gluon / _int_mm | gluon / quantkit |"
          " gluon W8A8 best (tile) us | quantkit W8A8 on quantized x (shipped configs) us | cuBLAS FP16 us |"
          " cuBLAS FP16 / gluon W8A8 | cuBLAS FP16 / quantkit W8A8 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (M, N, K) in [(2048, 4096, 4096), (2048, 6144, 4096), (2048, 28672, 4096), (2048, 4096, 14336)]:
        a = torch.randint(-128, 128, (M, K), dtype=torch.int8, device="cuda")
        w = torch.randint(-128, 128, (N, K), dtype=torch.int8, device="cuda")
        wt = w.t()
        assert torch.equal(int8_gemm(a, w), torch._int_mm(a, wt))
        tg = do_bench(lambda: int8_gemm(a, w), rep=200) * 1e3
        tc = do_bench(lambda: torch._int_mm(a, wt), rep=200) * 1e3
        tq = do_bench(lambda: w8a8_int32_accumulate(a, w), rep=200) * 1e3
        a_s = torch.rand(M, 1, device="cuda") * 1e-2 + 1e-3
        w_s = torch.rand(N, 1, device="cuda") * 1e-2 + 1e-3
        ref = w8a8_gemm_q_triton(a, a_s, w, w_s).float()
        sweep = []
        for (bm, bn, bk, st, nw) in SWEEP:
            cfg = dict(bm=bm, bn=bn, bk=bk, stages=st, num_warps=nw)
            try:
                y = w8a8_gemm(a, a_s.flatten(), w, w_s.flatten(), **cfg).float()
                err = ((y - ref).abs().max() / ref.abs().max()).item()
                if not err < 1e-2:
                    print(f"  tile {bm}x{bn}x{bk} s{st} w{nw}: WRONG (max rel err {err:.2e})")
                    continue
                t = do_bench(lambda: w8a8_gemm(a, a_s.flatten(), w, w_s.flatten(), **cfg), rep=200) * 1e3
                sweep.append((t, f"{bm}x{bn}x{bk} s{st} w{nw}"))
                print(f"  {M}x{N}x{K} tile {bm}x{bn}x{bk} s{st} w{nw}: {t:.1f} us")
            except Exception as e:  # a tile that does not build here is reported, not fatal
                print(f"  tile {bm}x{bn}x{bk} s{st} w{nw}: {type(e).__name__}: {str(e)[:160]}")
        tgw, tile = min(sweep) if sweep else (float("nan"), "-")
        tqw = do_bench(lambda: w8a8_gemm_q_triton(a, a_s, w, w_s), rep=200) * 1e3
        x16, w16 = torch.randn(M, K, device="cuda", dtype=torch.float16), torch.randn(N, K, device="cuda", dtype=torch.float16)
        t16 = do_bench(lambda: torch.nn.functional.linear(x16, w16), rep=200) * 1e3
        print(f"| {M} x {N} x {K} | {tg:.1f} | {tc:.1f} | {tq:.1f} | {tg / tc:.2f} | {tg / tq:.2f} | {tgw:.1f} ({tile}) | "
              f"{tqw:.1f} | {t16:.1f} | {t16 / tgw:.2f} | {t16 / tqw:.2f} |")


def main():
    r = compile_report()
    if "--dump" in sys.argv and r.get("compiled"):
        import os

        out = sys.argv[sys.argv.index("--dump") + 1]
        os.makedirs(out, exist_ok=True)
        for ext in ("ptx", "ttgir"):
            with open(os.path.join(out, f"int8_gemm.{ext}"), "w") as f:
                f.write(r["kernel"].asm[ext])
    if "--warps8" in sys.argv:
        compile_report(num_warps=8)
    compile_report(scaled=True)
    if torch.cuda.is_available():
        run_on_gpu()
    else:
        print("no CUDA device: skipped the run / exact check")


if __name__ == "__main__":
    main()
