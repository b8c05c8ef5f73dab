"""Probe (issue 19): INT8 x INT8 -> INT32 GEMM in Triton's Gluon dialect (Triton 3.6), Hopper wgmma kept in flight.

Why: Triton's own pipeliner never overlaps INT8 wgmmas (it makes a wgmma async only with an fp32 accumulator;
benchmarks/wgmma_probe.py, BENCHMARKS.md), which bounds every W8A8 tensor-core kernel in quantkit/kernels. Gluon
issues the wgmmas itself, so one can stay in flight while the next tile loads. This file answers, before any
kernel work, whether that pays: statically on CPU (does the build keep a wgmma in flight?) and, on a GPU, whether
it is exact and how fast it is against torch._int_mm and quantkit's tl.dot INT8 accumulation.

C[M, N] (int32) = A[M, K] (int8, row-major) @ W[N, K]^T (int8, row-major, K-major like nn.Linear weights).

* STAGES-deep shared-memory ring filled by TMA (host-side gluon TensorDescriptors), one mbarrier per slot;
* ``warpgroup_mma(..., is_async=True)`` on an int32 accumulator in an NVMMADistributedLayout(version=[3, 0]);
* ``warpgroup_mma_wait(num_outstanding=1)`` right after each issue: wgmma k stays in flight while the
  TMA refill for tile k + STAGES - 1 goes into the slot that wgmma k - 1 read (known complete after the wait);
* epilogue: int32 tile -> shared -> TMA store (TMA clips the M/N edges).

``compile_report()`` compiles it for sm_90 without a GPU (triton.compile on a GluonASTSource, ptxas included) and
prints what the PTX holds.  ``main()`` also checks correctness against an int64 torch reference when CUDA exists.

Run (Triton 3.6; no GPU needed for the static report; --warps8 also builds num_warps 8, --dump DIR writes PTX/TTGIR):
    PYTHONPATH=. python benchmarks/gluon_int8_probe.py [--warps8] [--dump DIR]
"""

from __future__ import annotations

import re
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

BLOCK_M, BLOCK_N, BLOCK_K = 128, 128, 128
STAGES = 3
NUM_WARPS = 4

# --------------------------------------------------------------------------------------------------------------
# layout helpers (evaluated at compile time; gluon.constexpr_function -- 3.6 has no gl.constexpr_function)
# --------------------------------------------------------------------------------------------------------------

# wgmma with 8-bit integer inputs only accepts these instruction N values (PTX ISA, .s8/.u8 wgmma shapes).
_INT8_WGMMA_N = (256, 224, 208, 192, 176, 160, 144, 128, 112, 96, 80, 64, 48, 32, 24, 16, 8)


@gluon.constexpr_function
def mma_warps_per_cta(BM, BN, num_warps):
    """Start at the [4, 1] warpgroup atom; double along M while M still has 16-row slices left, else along N."""
    w = [4, 1]
    while w[0] * w[1] != num_warps:
        if BM > 16 * w[0]:
            w[0] *= 2
        else:
            w[1] *= 2
    return w


@gluon.constexpr_function
def mma_instr_n(BM, BN, num_warps):
    m_reps = (BM + 15) // 16
    n_reps = (num_warps + m_reps - 1) // m_reps
    max_n = max(BN // n_reps, 8)
    for n in _INT8_WGMMA_N:
        if n <= max_n and BN % n == 0:
            return n
    raise ValueError("no int8 wgmma instruction N fits")


# --------------------------------------------------------------------------------------------------------------
# the kernel
# --------------------------------------------------------------------------------------------------------------


@gluon.jit
def int8_gemm_kernel(a_desc, w_desc, c_desc, as_ptr, ws_ptr, M, N, K, STAGES: gl.constexpr, WARPS: gl.constexpr,
                     SCALED: gl.constexpr):
    """SCALED: W8A8's epilogue, C (fp16) = acc * a_scale[row] * w_scale[col] (per-token, per-channel float32
    scales); else C (int32) = acc."""
    BM: gl.constexpr = c_desc.block_type.shape[0]
    BN: gl.constexpr = c_desc.block_type.shape[1]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    TILE_BYTES: gl.constexpr = a_desc.block_type.nbytes + w_desc.block_type.nbytes

    off_m = gl.program_id(0) * BM
    off_n = gl.program_id(1) * BN
    k_tiles = gl.cdiv(K, BK)

    # ring of STAGES slots for A [BM, BK] and W [BN, BK] tiles, one "TMA landed" barrier per slot
    a_ring = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, BK], a_desc.layout)
    w_ring = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BN, BK], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
    fence_async_shared()

    # prologue: fill slots 0 .. STAGES-2 (predicated off past the last K tile)
    for s in gl.static_range(STAGES - 1):
        live = s < k_tiles
        mbarrier.expect(ready.index(s), TILE_BYTES, pred=live)
        tma.async_copy_global_to_shared(a_desc, [off_m, s * BK], ready.index(s), a_ring.index(s), pred=live)
        tma.async_copy_global_to_shared(w_desc, [off_n, s * BK], ready.index(s), w_ring.index(s), pred=live)

    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0],
        warps_per_cta=mma_warps_per_cta(BM, BN, WARPS),
        instr_shape=[16, mma_instr_n(BM, BN, WARPS), 32],  # k = 256 bits / 8-bit elements
    )
    acc = gl.zeros((BM, BN), dtype=gl.int32, layout=mma_layout)

    for ki in range(k_tiles):
        slot = ki % STAGES
        phase = (ki // STAGES) & 1
        mbarrier.wait(ready.index(slot), phase)
        a_s = a_ring.index(slot)
        w_s = w_ring.index(slot)
        # B operand = W tile viewed as [BK, BN]; K-major, as 8-bit wgmma requires
        acc = warpgroup_mma(a_s, w_s.permute((1, 0)), acc, is_async=True)
        # keep this wgmma in flight; the previous one (which read slot (ki-1) % STAGES) is now complete
        acc, a_s, w_s = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a_s, w_s))
        # refill that freed slot with tile ki + STAGES - 1
        nk = ki + STAGES - 1
        nslot = nk % STAGES
        live = nk < k_tiles
        mbarrier.expect(ready.index(nslot), TILE_BYTES, pred=live)
        tma.async_copy_global_to_shared(a_desc, [off_m, nk * BK], ready.index(nslot), a_ring.index(nslot), pred=live)
        tma.async_copy_global_to_shared(w_desc, [off_n, nk * BK], ready.index(nslot), w_ring.index(nslot), pred=live)

    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(s))

    # epilogue: registers -> shared -> TMA store (out-of-bounds rows/cols are clipped by TMA)
    c_smem = gl.allocate_shared_memory(c_desc.dtype, c_desc.block_type.shape, c_desc.layout)
    if SCALED:
        rows = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, mma_layout))
        cols = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, mma_layout))
        a_s = gl.load(as_ptr + rows, mask=rows < M, other=0.0)
        w_s = gl.load(ws_ptr + cols, mask=cols < N, other=0.0)
        c_smem.store((acc.to(gl.float32) * a_s[:, None] * w_s[None, :]).to(c_desc.dtype))
    else:
        c_smem.store(acc)
    fence_async_shared()
    tma.async_copy_shared_to_global(c_desc, [off_m, off_n], c_smem)
    tma.store_wait(pendings=0)


# --------------------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------------------


def make_descs(a: torch.Tensor, w: torch.Tensor, c: torch.Tensor, bm=BLOCK_M, bn=BLOCK_N, bk=BLOCK_K):
    """Gluon host TMA descriptors. TMA needs 16-byte row strides: K % 16 == 0 (int8), N % 4 (int32 C) or 8 (fp16 C)."""
    a_l = gl.NVMMASharedLayout.get_default_for([bm, bk], gl.int8)
    w_l = gl.NVMMASharedLayout.get_default_for([bn, bk], gl.int8)
    c_l = gl.NVMMASharedLayout.get_default_for([bm, bn], gl.int32 if c.dtype == torch.int32 else gl.float16)
    return (TensorDescriptor.from_tensor(a, [bm, bk], a_l), TensorDescriptor.from_tensor(w, [bn, bk], w_l),
            TensorDescriptor.from_tensor(c, [bm, bn], c_l))


def int8_gemm(a: torch.Tensor, w: torch.Tensor, **tiles) -> torch.Tensor:
    """C = a @ w.T in int32 on a CUDA device (a: [M, K] int8, w: [N, K] int8, both row-major)."""
    return _run(a, w, None, None, torch.int32, **tiles)


def w8a8_gemm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, **tiles) -> torch.Tensor:
    """W8A8 on pre-quantized activations: (a @ w.T) * a_scale[:, None] * w_scale[None, :] in fp16 (a_scale (M,),
    w_scale (N,) float32) -- what quantkit's W8A8 kernels compute after the per-token quantization."""
    return _run(a, w, a_scale.float().contiguous(), w_scale.float().contiguous(), torch.float16, **tiles)


def _run(a, w, a_scale, w_scale, out_dtype, bm=BLOCK_M, bn=BLOCK_N, bk=BLOCK_K, stages=STAGES, num_warps=NUM_WARPS):
    assert a.dtype == torch.int8 and w.dtype == torch.int8 and a.shape[1] == w.shape[1]
    a, w = a.contiguous(), w.contiguous()
    M, K = a.shape
    N = w.shape[0]
    c = torch.empty(M, N, dtype=out_dtype, device=a.device)
    a_d, w_d, c_d = make_descs(a, w, c, bm, bn, bk)
    scaled = a_scale is not None
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    int8_gemm_kernel[grid](a_d, w_d, c_d, a_scale if scaled else c, w_scale if scaled else c, M, N, K,
                           STAGES=stages, WARPS=num_warps, SCALED=scaled, num_warps=num_warps)
    return c


def int8_gemm_ref(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Plain-torch reference: exact int64 matmul (on CPU), cast to int32."""
    return (a.cpu().to(torch.int64) @ w.cpu().to(torch.int64).T).to(torch.int32)


def build_for_sm90(bm=BLOCK_M, bn=BLOCK_N, bk=BLOCK_K, stages=STAGES, num_warps=NUM_WARPS, cc=90, scaled=False):
    """Compile int8_gemm_kernel for sm_`cc` without a GPU: the descriptor signatures are mangled from CPU tensors
    exactly as a launch would; triton.compile runs the gluon pipeline, LLVM and ptxas. scaled: the W8A8 epilogue."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    M = N = K = 1024
    a = torch.empty(M, K, dtype=torch.int8)
    w = torch.empty(N, K, dtype=torch.int8)
    c = torch.empty(M, N, dtype=torch.float16 if scaled else torch.int32)
    a_d, w_d, c_d = make_descs(a, w, c, bm, bn, bk)
    fn = int8_gemm_kernel
    ptr = "*fp32" if scaled else "*i32"  # unused without the epilogue: any pointer
    sig = {"a_desc": mangle_type(a_d), "w_desc": mangle_type(w_d), "c_desc": mangle_type(c_d), "as_ptr": ptr,
           "ws_ptr": ptr, "M": "i32", "N": "i32", "K": "i32",
           "STAGES": "constexpr", "WARPS": "constexpr", "SCALED": "constexpr"}
    src = GluonASTSource(fn=fn, signature=sig, constexprs={"STAGES": stages, "WARPS": num_warps, "SCALED": scaled})
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": num_warps})


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


def time_on_gpu():
    """int32 accumulation at M=2048 on the Llama-3-8B shapes, in the same process: this Gluon kernel, torch._int_mm
    (cuBLAS INT8) and quantkit's tensor-core kernel (tl.dot; every INT8 wgmma waited for), in microseconds."""
    from triton.testing import do_bench

    from quantkit.kernels.w8a8 import w8a8_int32_accumulate

    from quantkit.kernels.w8a8 import w8a8_gemm_q_triton

    print("| M x N x K | gluon async wgmma us | torch._int_mm us | quantkit tl.dot us | gluon / _int_mm | gluon / quantkit |"
          " gluon W8A8 (fp16 out) us | quantkit W8A8 on quantized x (shipped configs) us | cuBLAS FP16 us |"
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
        tgw = do_bench(lambda: w8a8_gemm(a, a_s, w, w_s), rep=200) * 1e3
        tqw = do_bench(lambda: w8a8_gemm_q_triton(a, a_s, w, w_s), rep=200) * 1e3
        x16, w16 = torch.randn(M, K, device="cuda", dtype=torch.float16), torch.randn(N, K, device="cuda", dtype=torch.float16)
        t16 = do_bench(lambda: torch.nn.functional.linear(x16, w16), rep=200) * 1e3
        print(f"| {M} x {N} x {K} | {tg:.1f} | {tc:.1f} | {tq:.1f} | {tg / tc:.2f} | {tg / tq:.2f} | {tgw:.1f} | "
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
