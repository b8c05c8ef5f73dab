"""Kernels compiled for a real GPU target, on a machine without one.

The CPU suite runs the Triton kernels in the interpreter, which accepts Python that the compiler refuses (an
`if` on a float constexpr ran there and broke every decode-attention launch on the H200). Here Triton's own
front end and ptxas build chosen kernels (decode attention, the TMA W8A8 GEMM at every shipped config, plain and
mixed, the W4A16 tensor-core kernel with chained MMAs and the M=1 half2 GEMV's 2-D loop, the R4 Hadamard) for sm_90 (Hopper) and sm_80, so that class of error fails on CPU; the TMA builds' shared
memory must also fit an SM (a config over it fails only at launch, on the GPU).
Run in a child process: the compiled path needs a process where TRITON_INTERPRET was never set."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

from quantkit.kernels._common import HOPPER_SMEM_PER_BLOCK as SM90_MAX_SHARED  # noqa: E402

CHILD = textwrap.dedent(r'''
    import json, re, sys
    from quantkit.kernels import act_quant, attention, fused, hadamard, w8a8, wna16
    from quantkit.kernels._common import build_for_target, load_tuned

    def compiled(lazy, types, consts, cc, **options):
        # the compiled-mode triton.jit function (TRITON_INTERPRET unset here)
        return build_for_target(lazy.jitted(), types, consts, cc, **options)

    def build(lazy, types, consts, cc):
        return sorted(compiled(lazy, types, consts, cc).asm)

    def _prefetches(ptx):
        # (griddepcontrol waits, L2 prefetches, every prefetch before the first wait)
        wait = ptx.find("griddepcontrol.wait")
        return ptx.count("griddepcontrol.wait"), ptx.count("prefetch.global.L2"), ptx.rfind("prefetch.global.L2") < wait

    attn_types = {"q_ptr": "*fp16", "k_ptr": "*fp16", "v_ptr": "*fp16", "kri_ptr": "*i16", "vri_ptr": "*i16",
                  "krp_ptr": "*i8", "vrp_ptr": "*i8", "len_ptr": "*i32", "sm_scale_log2": "fp32"}
    out = {}
    for scales, res, window, cap in json.loads(sys.argv[1]):
        consts = dict(GROUP=4, GP=16, D=64, BLOCK_N=32, SCALES=scales, RES_BITS=res,
                      RW=32 if res == 4 else 64, WINDOW=window, SOFTCAP=cap, PDL=False)
        for cc in (80, 90):
            out[f"attention scales={scales} res={res} window={window} softcap={cap} sm_{cc}"] = build(
                attention.decode_attn_kernel, attn_types, consts, cc)
    tma_types = {"a_ptr": "*i8", "w_ptr": "*i8", "bias_ptr": "*fp16", "c_ptr": "*fp16", "x_ptr": "*fp16",
                 "wf_ptr": "*fp16", "rb_ptr": "*u8"}
    # every TMA config a GPU file ships, plain and in mixed mode (FP16 rows on an FP16 copy, the FP16 loop's
    # default step and depth): it must build, and its shared memory must fit the SM (checked by the parent)
    shared = {}
    cfgs = {(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["GROUP_M"], c["num_stages"], c["num_warps"])
            for c in load_tuned("w8a8").values() if c.get("BACKEND") == "tma"} or {(128, 128, 128, 8, 3, 8)}
    for bm, bn, bk, gm, st, nw in sorted(cfgs):
        for rows in (False, True):
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_stages=st)
            k = compiled(w8a8.w8a8_tma_kernel, tma_types,
                         dict(HAS_BIAS=True, ROW_BITS=rows, HAS_FP16_W=True,
                              BLOCK_KF=w8a8._block_kf(cfg) if rows else 16, STAGES_F=w8a8._desc_stages_f(cfg) if rows else 1,
                              BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, LOOP_STAGES=st),
                         90, num_warps=nw, num_stages=st)
            name = f"w8a8 tma {bm}x{bn}x{bk} stages {st}{' mixed' if rows else ''} sm_90"
            out[name] = sorted(k.asm)
            shared[name] = k.metadata.shared
    # W4A16 tensor cores, swapped operands with the weights scaled and the MMAs chained (SCALE_W), g128
    w4_types = {"x_ptr": "*fp16", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*i8", "bias_ptr": "*fp16",
                "c_ptr": "*fp16", "ws_ptr": "*fp32", "lock_ptr": "*i32"}
    for bm in (16, 128):
        out[f"w4a16 mma swap scale_w block_m {bm} sm_90"] = sorted(compiled(
            wna16.wna16_mma_kernel, w4_types,
            dict(BITS=4, PER=8, R=16, HAS_ZERO=True, HAS_BIAS=False, GS_SMALL=False, EVEN_K=True, SPLIT_K=1,
                 SWAP_AB=True, MAGIC16=0x6400, M16=1024.0, SCALE_W=True, BLOCK_M=bm, BLOCK_N=128, GROUP_M=8),
            90, num_warps=8, num_stages=3).asm)
    pdl = {}
    # W4A16 M=1 half2 GEMV, its 2-D (PER_BLOCK) loop with the half2 asm (the interpreter runs an fp32 stand-in)
    for zero in (False, True):
        out[f"w4a16 gemv_h2 per_block zero={zero} sm_90"] = sorted(compiled(
            wna16.wna16_gemv_h2_kernel, w4_types,
            dict(HAS_ZERO=zero, HAS_BIAS=True, EVEN_U=False, SPLIT_K=4, BLOCK_N=64, UNROLL=8, AMAX_K=4096,
                 USE_ASM=True, PER_BLOCK=True, LOAD_STAGES=1, SLICE_PRESCALE=zero,  # (asym: slice prescale)
                 PACKED_X=False, PDL=False, PREFETCH=0, CHAIN=False),
            90, num_warps=4, num_stages=1).asm)
    # ... on activations packed by a launch of its own (PACKED_X), launched programmatically after it (PDL): one
    # wait for the packing, and no row-max prologue (no x load or reduction before it); the packing launch
    # triggers its dependents
    for per_block in (False, True):
        for packed, prefetch in ((False, 0), (True, 0), (True, 2)):
            ptx = compiled(wna16.wna16_gemv_h2_kernel, dict(w4_types, x_ptr="*i32") if packed else w4_types,
                           dict(HAS_ZERO=True, HAS_BIAS=True, EVEN_U=False, SPLIT_K=2, BLOCK_N=64, UNROLL=4,
                                AMAX_K=4096, USE_ASM=True, PER_BLOCK=per_block, LOAD_STAGES=1, SLICE_PRESCALE=False,
                                PACKED_X=packed, PDL=packed, PREFETCH=prefetch, CHAIN=False), 90, num_warps=4,
                           num_stages=1, launch_pdl=packed).asm["ptx"]
            if prefetch:  # (L2 prefetches, all before the wait)
                pdl[f"w4a16 gemv_h2 prefetch per_block={per_block}"] = _prefetches(ptx)
                continue
            # (griddepcontrol waits, the row max's float max instructions)
            pdl[f"w4a16 gemv_h2 packed={packed} per_block={per_block}"] = (
                ptx.count("griddepcontrol.wait"), len(re.findall(r"\bmax(\.NaN)?\.f32", ptx)))
    # ... in one launch (x read in place), launched programmatically after whatever ran before: its weights asked
    # of L2, then the wait, then the row max; PDL_CHAIN also lets the next launch start ([triggers, waits, prefetch
    # lines, every prefetch before the wait, the wait before the first float max])
    for chain in (False, True):
        ptx = compiled(wna16.wna16_gemv_h2_kernel, w4_types,
                       dict(HAS_ZERO=False, HAS_BIAS=False, EVEN_U=True, SPLIT_K=4, BLOCK_N=64, UNROLL=8, AMAX_K=4096,
                            USE_ASM=True, PER_BLOCK=True, LOAD_STAGES=1, SLICE_PRESCALE=True, PACKED_X=False, PDL=True,
                            PREFETCH=2, CHAIN=chain), 90, num_warps=4, num_stages=1, launch_pdl=True).asm["ptx"]
        wait = ptx.find("griddepcontrol.wait")
        fmax = re.search(r"\bmax(\.NaN)?\.f32", ptx)
        pdl[f"w4a16 gemv_h2 in place pdl chain={chain}"] = [
            ptx.count("griddepcontrol.launch_dependents"), ptx.count("griddepcontrol.wait"),
            ptx.count("prefetch.global.L2") > 0, ptx.rfind("prefetch.global.L2") < wait,
            bool(fmax) and wait < fmax.start()]
    for wait in (False, True):  # (PDL_CHAIN: the packing is a programmatic launch itself, waiting first)
        ptx = compiled(wna16.h2_pack_x_kernel, {"x_ptr": "*bf16", "xp_ptr": "*i32", "xsc_ptr": "*fp32"},
                       dict(AMAX_K=4096, BLOCK_R=512, TRIGGER=True, WAIT=wait), 90, num_warps=4, num_stages=1,
                       launch_pdl=wait).asm["ptx"]
        pdl[f"w4a16 h2 pack wait={wait}"] = [ptx.count("griddepcontrol.launch_dependents"),
                                              ptx.count("griddepcontrol.wait")]
    # the M=1 GEMVs' loads through a cp.async ring (LOAD_STAGES > 1; 1: plain loads, no ring)
    ring = {}
    for ls in (1, 4):
        ptx = compiled(wna16.wna16_gemv_h2_kernel, w4_types,
                       dict(HAS_ZERO=False, HAS_BIAS=False, EVEN_U=True, SPLIT_K=4, BLOCK_N=64, UNROLL=2, AMAX_K=4096,
                            USE_ASM=True, PER_BLOCK=True, LOAD_STAGES=ls, SLICE_PRESCALE=False, PACKED_X=False,
                            PDL=False, PREFETCH=0, CHAIN=False),
                       90, num_warps=4, num_stages=1).asm["ptx"]
        ring[f"w4a16 gemv_h2 {ls}"] = ptx.count("cp.async.cg") + ptx.count("cp.async.ca")
        # PDL (with the plain loads): the programmatically launched GEMV waits for the quantization's grid
        for wait, prefetch, chain in (((False, 0, False), (True, 0, False), (True, 2, False), (True, 0, True))
                                      if ls == 1 else ((False, 0, False),)):
            ptx = compiled(w8a8.w8a8_gemv_kernel, {"a_ptr": "*i32", "w_ptr": "*i32", "bias_ptr": "*fp16",
                                                   "c_ptr": "*fp16", "part_ptr": "*i32", "lock_ptr": "*i32",
                                                   "x_ptr": "*fp16", "wf_ptr": "*i8", "rb_ptr": "*u8"},
                           dict(HAS_BIAS=False, ROW_BITS=False, HAS_FP16_W=False, EVEN_K=True, SPLIT_K=4, BLOCK_M=1,
                                BLOCK_N=32, BC=128, USE_DP4A=True, FUSE_QUANT=False, EPS_C=1e-8, AMAX_K=16,
                                LOAD_STAGES=ls, PDL=wait, PREFETCH=prefetch, CHAIN=chain), 90, num_warps=4,
                           num_stages=1, launch_pdl=wait).asm["ptx"]
            if chain:  # PDL_CHAIN: the next call's quantization may launch at once (and this one's wait stays)
                pdl["w8a8 gemv chain"] = [ptx.count("griddepcontrol.launch_dependents"),
                                          ptx.count("griddepcontrol.wait")]
            elif prefetch:
                pdl["w8a8 gemv prefetch"] = _prefetches(ptx)
            elif wait:
                pdl["w8a8 gemv wait"] = ptx.count("griddepcontrol.wait")
            else:
                ring[f"w8a8 gemv {ls}"] = ptx.count("cp.async.cg") + ptx.count("cp.async.ca")
                pdl[f"w8a8 gemv no pdl {ls}"] = ptx.count("griddepcontrol")
    # ... and the tl.dot kernel at a decode tile (16 rows, the quantization a separate launch)
    dot_types = {"a_ptr": "*i8", "w_ptr": "*i8", "bias_ptr": "*fp16", "c_ptr": "*fp16", "x_ptr": "*fp16",
                 "wf_ptr": "*i8", "sync_ptr": "*i32", "part_ptr": "*i32", "lock_ptr": "*i32"}
    for wait in (False, True):
        ptx = compiled(w8a8.w8a8_kernel, dot_types,
                       dict(HAS_BIAS=False, ROW_BITS=False, HAS_FP16_W=False, BLOCK_KF=16, STAGES_F=1, TMA_F=False,
                            FUSE_QUANT=False, QUANT_ONCE=False, CHUNK_K=16, CHUNK_M=1, OUT_INT32=False, EVEN_K=True,
                            EPS_C=1e-8, SPLIT_K=1, BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=1, PDL=wait),
                       90, num_warps=4, num_stages=3, launch_pdl=wait).asm["ptx"]
        pdl[f"w8a8 dot pdl={wait}"] = ptx.count("griddepcontrol.wait")
    for trigger, wait in ((False, False), (True, False), (True, True)):
        const, _ = act_quant._consts(4096, True, 127, False, trigger, wait)
        c = {k: v for k, v in const.items() if k not in ("num_warps", "num_stages", "maxnreg", "launch_pdl")}
        ptx = compiled(act_quant.act_quant_kernel, {"x_ptr": "*fp16", "q_ptr": "*i8"}, c, 90,
                       num_warps=const["num_warps"], launch_pdl=const.get("launch_pdl", False)).asm["ptx"]
        pdl[f"act_quant trigger={trigger} wait={wait}"] = [ptx.count("griddepcontrol.launch_dependents"),
                                                           ptx.count("griddepcontrol.wait")]
    # the runtime's own launches in its programmatic chain (PDL): one trigger and one wait each, none without
    chain = {}
    runtime = (
        (fused.add_rmsnorm_kernel, {"x_ptr": "*bf16", "d_ptr": "*bf16", "w_ptr": "*bf16", "xo_ptr": "*bf16",
                                    "h_ptr": "*bf16", "eps": "fp32"}, dict(HAS_D=True, BLOCK=4096)),
        (fused.silu_mul_kernel, {"gu_ptr": "*bf16", "o_ptr": "*bf16"}, dict(BLOCK=1024)),
        (fused.rope_store_kernel, {"qkv_ptr": "*bf16", "cos_ptr": "*bf16", "sin_ptr": "*bf16", "pos_ptr": "*i64",
                                   "q_ptr": "*bf16", "k_ptr": "*i8", "v_ptr": "*i8", "ks_ptr": "*fp32",
                                   "vs_ptr": "*fp32"}, dict(D=128, MODE=1, QMAX=127.0)),
        (attention.decode_attn_kernel, attn_types, dict(GROUP=4, GP=16, D=64, BLOCK_N=32, SCALES=2, RES_BITS=0,
                                                        RW=64, WINDOW=False, SOFTCAP=0.0)),
        (attention.decode_merge_kernel, {"m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "o_ptr": "*bf16"},
         dict(GROUP=4, GP=16, D=128)),
    )
    for lazy, types, consts in runtime:
        for on in (False, True):
            ptx = compiled(lazy, types, dict(consts, PDL=on), 90, num_warps=4, launch_pdl=on).asm["ptx"]
            chain[f"{lazy.__name__} pdl={on}"] = [ptx.count("griddepcontrol.launch_dependents"),
                                                  ptx.count("griddepcontrol.wait")]
    out["chain"] = chain
    out["ring"] = ring
    out["pdl"] = pdl
    out["shared"] = shared
    # W8A8 QUANT_ONCE: the first-arriving programs publish row maxima (atomic max, a CTA barrier, then one
    # thread's release add), then the quantized chunks (stores, a barrier, a release add); the others spin on an
    # acquire load. Those orderings are what make it correct.
    once_types = {"a_ptr": "*i8", "w_ptr": "*i8", "bias_ptr": "*fp16", "c_ptr": "*fp16", "x_ptr": "*fp16",
                  "wf_ptr": "*i8", "sync_ptr": "*i32", "part_ptr": "*i32", "lock_ptr": "*i32"}
    once = {}
    for bn, sk in ((32, 1), (64, 4)):
        k = compiled(w8a8.w8a8_kernel, once_types,
                     dict(HAS_BIAS=True, ROW_BITS=False, HAS_FP16_W=False, BLOCK_KF=16, STAGES_F=1,
                          FUSE_QUANT=False, QUANT_ONCE=True, CHUNK_K=256, CHUNK_M=16, OUT_INT32=False, EVEN_K=True,
                          EPS_C=1e-8, SPLIT_K=sk, BLOCK_M=16, BLOCK_N=bn, BLOCK_K=256, GROUP_M=1, PDL=False),
                     90, num_warps=4, num_stages=3)
        name = f"w8a8 quant_once 16x{bn}x256 split {sk} sm_90"
        out[name] = sorted(k.asm)
        lines = k.asm["ptx"].splitlines()
        # atom, or red where the result is unused (Triton 3.9)
        rel = [i for i, l in enumerate(lines) if re.search(r"(atom|red)\.global\.gpu\.release\.add", l)]
        maxima = sum(bool(re.search(r"(atom|red)\.global\.gpu\.relaxed\.(max|min)", l)) for l in lines)
        # each release's basic block passes a CTA barrier before it (walk back to the block's label)
        backs = [next((l for l in reversed(lines[:r]) if "bar.sync" in l or l.rstrip().split("//")[0].endswith(":")),
                      "") for r in rel]
        once[name] = dict(release=len(rel), maxima=maxima,
                          barrier_before=bool(backs) and all("bar.sync" in b for b in backs),
                          acquire_spin=sum("ld.global.gpu.acquire" in l for l in lines),
                          approx_div=sum("div.approx" in l for l in lines))
    out["once"] = once
    # per-token quantization: the row's scale in IEEE division (no div.approx), one division for the reciprocal, the
    # elements by x * rcp and one FMA correction (two fma.rn.f32 each); the fused W8A8 prologues' scales too
    quant = {}
    for K in (4096, 14336, 20000):
        const, _ = act_quant._consts(K, True, 127, False, False)
        c = {k: v for k, v in const.items() if k not in ("num_warps", "num_stages", "maxnreg")}
        ptx = compiled(act_quant.act_quant_kernel, {"x_ptr": "*fp16", "q_ptr": "*i8"}, c, 90,
                       num_warps=const["num_warps"]).asm["ptx"]
        quant[f"act_quant K={K}"] = dict(approx=len(re.findall(r"\bdiv\.approx", ptx)),
                                         rn=len(re.findall(r"\bdiv\.rn\.f32", ptx)),
                                         fma=len(re.findall(r"\bfma\.rn\.f32", ptx)))
    out["quant"] = quant
    # the online R4 as the runtime launches it: rows of a Sylvester block (512 of 1536, 2048 of 14336)
    for p in (512, 2048):
        out[f"fwht p={p} sm_90"] = build(hadamard.fwht_kernel, {"x_ptr": "*bf16", "y_ptr": "*bf16", "scale": "fp32"},
                                         dict(P=p, LOG_P=p.bit_length() - 1, BLOCK_ROWS=max(1, min(16, 4096 // p))),
                                         90)
    print(json.dumps(out))
''')

# (per-token/per-channel/float cache, residual bits, sliding window, Gemma 2 soft-cap)
ATTENTION_CASES = [(0, 0, False, 0.0), (1, 0, False, 0.0), (2, 0, True, 0.0), (1, 8, False, 0.0),
                   (2, 4, False, 0.0), (0, 0, False, 50.0), (2, 4, True, 30.0)]


def test_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(ATTENTION_CASES)], capture_output=True,
                       text=True, env=env, timeout=600)
    if p.returncode != 0 and "ptxas" in p.stderr and "not found" in p.stderr.lower():
        pytest.skip("this Triton has no ptxas to build with")
    assert p.returncode == 0, p.stderr[-3000:]
    built = json.loads(p.stdout.strip().splitlines()[-1])
    shared = built.pop("shared")
    once = built.pop("once")
    quant = built.pop("quant")
    ring = built.pop("ring")
    pdl = built.pop("pdl")
    chain = built.pop("chain")
    assert len(chain) == 10 and all(v == ([1, 1] if k.endswith("pdl=True") else [0, 0]) for k, v in chain.items()), chain
    # programmatic dependent launch: the GEMV's and the tl.dot kernel's one wait for the quantization, and the
    # quantization's one trigger, each only where asked for
    for ch in (False, True):  # the one-launch GEMV with PDL: [triggers, waits, prefetches, their order, wait order]
        assert pdl.pop(f"w4a16 gemv_h2 in place pdl chain={ch}") == [int(ch), 1, True, True, True], ch
    h2 = {k: pdl.pop(k) for k in [k for k in pdl if k.startswith("w4a16 gemv_h2")]}
    # PREFETCH: L2 prefetches of the first weights, all issued before the one wait (JSON: lists)
    for what in ("w8a8 gemv prefetch", *(f"w4a16 gemv_h2 prefetch per_block={pb}" for pb in (False, True))):
        waits, prefetches, all_before = (h2 if what.startswith("w4a16") else pdl).pop(what)
        assert waits == 1 and prefetches > 0 and all_before, (what, waits, prefetches, all_before)
    # PDL_CHAIN: the GEMV also lets the next launch start, and the next call's quantization / packing, launched
    # programmatically, waits once before it reads x or writes the scratch the GEMV reads ([triggers, waits])
    assert pdl == {"w8a8 gemv wait": 1, "w8a8 gemv no pdl 1": 0, "w8a8 gemv no pdl 4": 0, "w8a8 dot pdl=False": 0,
                   "w8a8 dot pdl=True": 1, "w8a8 gemv chain": [1, 1], "act_quant trigger=False wait=False": [0, 0],
                   "act_quant trigger=True wait=False": [1, 0], "act_quant trigger=True wait=True": [1, 1],
                   "w4a16 h2 pack wait=False": [1, 0], "w4a16 h2 pack wait=True": [1, 1]}, pdl
    # the h2 GEMV on packed activations (PACKED_X + PDL): one wait for the packing launch, and no row-max
    # prologue (which the in-loop form has)
    for per_block in (False, True):
        assert h2[f"w4a16 gemv_h2 packed=True per_block={per_block}"] == [1, 0], h2
        waits, fmax = h2[f"w4a16 gemv_h2 packed=False per_block={per_block}"]
        assert waits == 0 and fmax > 0, h2
    # LOAD_STAGES 1 keeps plain loads; 4 puts the loop's loads through cp.async (unaligned pointers here: the
    # compiler may pick 4- or 8-byte copies, but it must pick copies)
    assert ring["w4a16 gemv_h2 1"] == 0 and ring["w8a8 gemv 1"] == 0, ring
    assert ring["w4a16 gemv_h2 4"] > 0 and ring["w8a8 gemv 4"] > 0, ring
    tma = [k for k in built if k.startswith("w8a8 tma")]
    assert len(tma) >= 2 and len(tma) % 2 == 0 and len(shared) == len(tma)
    assert len(built) == 2 * len(ATTENTION_CASES) + len(tma) + 2 + 2 + 2 + len(once) and len(once) == 2
    # per chunk a release of its maxima and one of its integers, each after a CTA barrier; an acquire spin
    for what, o in once.items():
        assert o["release"] == 2 and o["maxima"] >= 1 and o["barrier_before"] and o["acquire_spin"] >= 1, (what, o)
        assert o["approx_div"] == 0, (what, o)  # row scales in IEEE division, as the reference (sym_scale)
    # per-token quantization: no approximate division (Triton's `/` was amax * div.approx(1, 127)); one IEEE
    # division for the scale and one for its reciprocal (per row, or per pass of the two-pass loop), and each
    # element's quotient by two FMAs, not a division: 32 elements a thread here
    assert len(quant) == 3
    for what, q in quant.items():
        assert q["approx"] == 0 and q["rn"] == 2 and q["fma"] >= 64, (what, q)
    for what, stages in built.items():
        assert "cubin" in stages and "ptx" in stages, what
    for what, nbytes in shared.items():  # Hopper: 227 KiB of shared memory per block at most (else launch fails)
        assert 0 < nbytes <= SM90_MAX_SHARED, f"{what}: {nbytes} bytes of shared memory"


GLUON_CHILD = textwrap.dedent(r'''
    import json, re, sys, torch
    from quantkit.kernels import w8a8_gluon
    if w8a8_gluon.GLUON_ERROR is not None:
        print(json.dumps({"skip": w8a8_gluon.GLUON_ERROR}))
        sys.exit(0)
    out = {}
    PLAIN_MIXED_PDL = ((torch.float16, True, False, False, False), (torch.bfloat16, False, False, False, False),
                       (torch.int32, False, False, False, False), (torch.float16, False, True, False, False),
                       (torch.bfloat16, True, True, True, False), (torch.float16, False, False, False, True),
                       (torch.bfloat16, True, True, True, True))
    # a K split (SPLIT_K 2): plain, int32, mixed on the int8 weight, mixed on a copy + PDL
    SPLIT = (PLAIN_MIXED_PDL[0], PLAIN_MIXED_PDL[2], PLAIN_MIXED_PDL[3], PLAIN_MIXED_PDL[6])

    def build(name, cfg, dt, bias, rb, copy, pdl):
        k = w8a8_gluon.build_for_target(cfg, dt, bias, row_bits=rb, fp16_copy=copy, pdl=pdl)
        ptx = k.asm["ptx"]
        tma = [m.start() for m in re.finditer(r"cp\.async\.bulk\.tensor\.2d\.shared", ptx)]
        gdc = [m.start() for m in re.finditer(r"griddepcontrol\.wait", ptx)]
        key = f"{name} {dt} bias={bias} row_bits={rb} copy={copy} pdl={pdl}" + (" sk2" if "SPLIT_K" in cfg else "")
        out[key] = dict(
            tile=name.split(" ")[0].replace("x128x", "x"), mixed=rb, pdl=pdl, cubin=bool(k.asm.get("cubin")),
            shared=k.metadata.shared, waits=re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx),
            gdc_waits=len(gdc), loads_before_gdc=sum(t < gdc[0] for t in tma) if gdc else 0,
            atomics=len(re.findall(r"atom\.global", ptx)))

    for bm, bk, st, nw in ((128, 128, 3, 4), (128, 64, 5, 4), (256, 128, 3, 8), (256, 64, 5, 8), (64, 128, 4, 4)):
        cfg = dict(BLOCK_M=bm, BLOCK_N=128, BLOCK_K=bk, num_stages=st, num_warps=nw)
        name = f"{bm}x128x{bk} s{st} w{nw}"
        for variant in PLAIN_MIXED_PDL:
            build(name, cfg, *variant)
        if bm != 256 and st != 5:
            for variant in SPLIT:
                build(name, dict(cfg, SPLIT_K=2), *variant)
    # the warp-specialized kernel (WARP_SPECIALIZE): a loader warp and two MMA warpgroups
    for bm, bk, st in ((128, 128, 4), (128, 64, 6), (64, 128, 5)):
        wc = dict(BLOCK_M=bm, BLOCK_N=128, BLOCK_K=bk, num_stages=st, num_warps=4, WARP_SPECIALIZE=True)
        assert w8a8_gluon.warp_specialized(wc)
        k = w8a8_gluon.build_for_target(wc, torch.float16, True)
        ptx = k.asm["ptx"]
        after = [re.search(r"bar\.sync|barrier\.sync|st\.shared", ptx[m.end():]).group(0)
                 for m in re.finditer(r"cp\.async\.bulk\.wait_group\.read", ptx)]
        out[f"{bm}x128x{bk} s{st} ws"] = dict(
            ws=True, cubin=bool(k.asm.get("cubin")), shared=k.metadata.shared, warps=k.metadata.num_warps,
            waits=sorted(set(re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx))),
            stores=len(re.findall(r"cp\.async\.bulk\.tensor\.2d\.global\.shared", ptx)),
            loads=len(re.findall(r"cp\.async\.bulk\.tensor\.2d\.shared::\w+\.global", ptx)),
            regs=sorted(set(re.findall(r"setmaxnreg\.(?:inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx)), key=int),
            # barriers of a partition's own 128 threads (named), and of every thread (the partitions' hand-off)
            named=sorted(set(re.findall(r"bar\.sync\s+(\d+),\s*128;", ptx))), after_store_wait=after)
    # MIXED_PASS's second launch (the FP16 rows' tiles after the warp-specialized kernel), on the plain tile: a
    # program a tile, or one an SM walking the tiles
    for copy, walk in ((False, False), (True, False), (False, True), (True, True)):
        pt = w8a8_gluon.plain_tile(dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_stages=4, num_warps=4,
                                        WARP_SPECIALIZE=True, MIXED_PASS="walk" if walk else True))
        k = w8a8_gluon.build_for_target(pt, torch.bfloat16, True, row_bits=True, fp16_copy=copy, fp16_pass=True,
                                        walk=walk)
        ptx = k.asm["ptx"]
        out[f"fp16 pass copy={copy} walk={walk}"] = dict(
            fp16_pass=True, cubin=bool(k.asm.get("cubin")), shared=k.metadata.shared, stages=pt["num_stages"],
            waits=sorted(set(re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx))),
            int8_mmas=len(re.findall(r"wgmma\.mma_async[^;]*\.s8", ptx)),
            fp_mmas=len(re.findall(r"wgmma\.mma_async[^;]*\.(?:f16|bf16)\.", ptx)))
    print(json.dumps(out))
''')


def _gluon_builds(child: str) -> dict:
    """Run a Gluon build script (``child``) in a process where TRITON_INTERPRET is unset: its JSON report, or a
    skip where this Triton has no ptxas or no usable Gluon."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env, timeout=600)
    if p.returncode != 0 and "ptxas" in p.stderr and "not found" in p.stderr.lower():
        pytest.skip("this Triton has no ptxas to build with")
    assert p.returncode == 0, p.stderr[-3000:]
    built = json.loads(p.stdout.strip().splitlines()[-1])
    if "skip" in built:
        pytest.skip(f"this Triton has no usable Gluon: {built['skip']}")
    return built


def test_gluon_w8a8_builds_for_sm90_with_a_wgmma_in_flight():
    """The Gluon W8A8 kernel builds for sm_90 at the tiles the tuner searches (fp16/bf16 out with and without
    bias, the raw int32 accumulator, mixed mode's row bits on the int8 weight and on an FP16 copy), fits the SM's shared
    memory (mixed mode at the plain kernel's CTAs per SM), and its K loop waits with one wgmma still in flight (wait_group 1) --
    the reason it exists; only the final wait drains (wait_group 0). Its programmatic launch's form (PDL) loads the
    first weight tiles before it waits for the quantization. With a K split (SPLIT_K) too. The warp-specialized
    kernel builds, with the same K loop and TMA store buffers reused safely."""
    built = _gluon_builds(GLUON_CHILD)
    ws = {what: built.pop(what) for what in [w for w, b in built.items() if b.get("ws")]}
    passes = {what: built.pop(what) for what in [w for w, b in built.items() if b.get("fp16_pass")]}
    assert len(passes) == 4, sorted(passes)
    for what, b in passes.items():
        # the FP16 loop alone (bf16 wgmmas, one in flight, no INT8 wgmma), on a ring that lets two CTAs share an SM
        assert b["cubin"] and b["stages"] == 3 and 0 < b["shared"] <= (228 * 1024) // 2 - 1024, (what, b)
        assert b["int8_mmas"] == 0 and b["fp_mmas"] > 0 and b["waits"] == ["0", "1"], (what, b)
    assert len(ws) == 3, sorted(ws)
    for what, b in ws.items():
        assert b["cubin"] and 0 < b["shared"] <= SM90_MAX_SHARED, (what, b["shared"])
        # 12 warps (the default MMA warpgroup, the worker's, the loader's warp in a warpgroup of its own) with the
        # register budget moved from the loader (40) to the MMA partitions (232 each)
        assert b["warps"] == 12 and {"40", "232"} <= set(b["regs"]), (what, b)
        # each MMA partition keeps a wgmma in flight and drains once a tile, and stores its tiles through TMA
        # (two store sites), reusing its buffer only after its bulk wait and a barrier of its own warps
        assert b["waits"] == ["0", "1"] and b["stores"] == 2 and b["loads"] == 2, (what, b)
        # (the loop's waits and the final ones, two a partition: a barrier before any shared store)
        assert len(b["named"]) >= 2 and len(b["after_store_wait"]) == 4, (what, b)
        assert set(b["after_store_wait"]) <= {"bar.sync", "barrier.sync"}, (what, b)
    sk = {what: b for what, b in built.items() if what.endswith(" sk2")}
    assert len(built) == 35 + 8 and len(sk) == 8, sorted(sk)
    # a K split: the counter taken and reset once a tile (one atomic add, one exchange), in mixed mode too
    assert all(b["atomics"] == 2 for b in sk.values()), {w: b["atomics"] for w, b in sk.items()}
    plain_shared = {b["tile"]: b["shared"] for b in built.values() if not b["mixed"]}
    for what, b in built.items():
        assert b["cubin"], what
        assert 0 < b["shared"] <= SM90_MAX_SHARED, (what, b["shared"])
        # mixed mode: the FP16 loop (fp16 wgmmas on the same ring) keeps one in flight too
        assert b["waits"] == (["1", "0", "1", "0"] if b["mixed"] else ["1", "0"]), (what, b["waits"])
        # ... and fits as many CTAs on an SM as the plain kernel (228 KiB an SM, 1 KiB reserved a CTA): the FP16
        # loop reuses the INT8 ring, only the row-bit reduction's few bytes are added
        ctas = lambda nbytes: (228 * 1024) // (nbytes + 1024)  # noqa: E731
        assert ctas(b["shared"]) == ctas(plain_shared[b["tile"]]), (what, b["shared"], plain_shared[b["tile"]])
        # PDL: one wait for the quantization, after the prologue's weight loads (STAGES - 1 of them), before any
        # load of its output; none without PDL
        stages = int(what.split(" s")[1].split()[0])
        assert (b["gdc_waits"], b["loads_before_gdc"]) == ((1, stages - 1) if b["pdl"] else (0, 0)), (what, b)


# the Gluon children's SASS reader: a cubin's disassembly (cuobjdump -sass), None where this Triton has no cuobjdump
SASS_TEXT = textwrap.dedent(r'''
    def sass_text(cubin):
        import os, subprocess, tempfile
        from triton import knobs
        try:
            tool = knobs.nvidia.cuobjdump.path
        except Exception:
            return None
        with tempfile.TemporaryDirectory() as d:
            f = os.path.join(d, "k.cubin")
            open(f, "wb").write(cubin)
            return subprocess.run([tool, "-sass", f], capture_output=True, text=True).stdout
''')


W4_GLUON_CHILD = textwrap.dedent(r'''
    import json, re, sys, torch
    from quantkit.kernels import wna16_gluon
    from quantkit.kernels._common import load_tuned
    if wna16_gluon.GLUON_ERROR is not None:
        print(json.dumps({"skip": wna16_gluon.GLUON_ERROR}))
        sys.exit(0)
    cfgs = []
    for c in [c for m in (64, 128, 256, 512) for c in wna16_gluon.candidates(m)] + [
            c for c in load_tuned("w4a16").values() if c.get("BACKEND") == "gluon"]:
        c = {k: c[k] for k in ("BLOCK_M", "BLOCK_N", "SPLIT_K", "num_warps", "num_stages", "RS", "WARP_SPECIALIZE")
             if k in c}
        if c not in cfgs:
            cfgs.append(c)
    variants = [dict()] + [dict(has_zero=True, has_bias=True), dict(dtype=torch.bfloat16), dict(bits=8),
                           dict(gs_small=True, has_zero=True)]
    first_rs = next(i for i, c in enumerate(cfgs) if c.get("RS"))
    first_ws = next(i for i, c in enumerate(cfgs) if c.get("WARP_SPECIALIZE"))

    def sass_of(cubin):
        """The register-operand kernel's SASS in the loop: every wgmma wait (WARPGROUP.DEPBAR), and the fp16
        multiplications (HMUL2) between the last HGMMA and the wait after it (the next block's unpacking, in
        flight with the wgmmas); None without cuobjdump."""
        sass = sass_text(cubin)
        if sass is None:
            return None
        ops = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
        hg = [i for i, o in enumerate(ops) if o.startswith("HGMMA")]
        if not hg:
            return None
        dep = next(i for i in range(hg[-1], len(ops)) if ops[i].startswith("WARPGROUP.DEPBAR"))
        return dict(depbars=sum(o.startswith("WARPGROUP.DEPBAR") for o in ops),
                    hmul_in_flight=sum(o == "HMUL2" for o in ops[hg[-1]:dep]))

    out = {}
    for i, cfg in enumerate(cfgs):
        # (the warp-specialized tile's 8-bit and small-group forms run the shared-operand kernel, whose buffers do
        # not fit its 4-deep ring: plan() refuses them)
        for v in variants if i in (0, first_rs) else variants[:3] if i == first_ws else variants[:1]:
            k = wna16_gluon.build_for_target(cfg, **v)
            ptx = k.asm["ptx"]
            rs = wna16_gluon._rs(cfg, v.get("bits", 4), v.get("gs_small", False))
            ws = wna16_gluon.warp_specialized(cfg, v.get("bits", 4), v.get("gs_small", False))
            out[f"{cfg} {v}"] = dict(cubin=bool(k.asm.get("cubin")), shared=k.metadata.shared,
                                     planned=wna16_gluon.shared_bytes(cfg, v.get("bits", 4), v.get("gs_small", False)),
                                     rs=rs, ws=ws, warps=k.metadata.num_warps,
                                     maxnreg=sorted(set(re.findall(r"setmaxnreg\.(\w+)\.sync\.aligned\.u32\s+(\d+)", ptx))),
                                     waits=re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx),
                                     sass=sass_of(k.asm["cubin"]) if rs and "dtype" not in v else None)
    print(json.dumps(out))
''')


def test_gluon_w4a16_builds_for_sm90_with_the_mmas_in_flight():
    """The Gluon W4A16 kernels (shared and register operand) build for sm_90 at every config the tuner searches
    and every shipped one (plus, on one tile of each, zero points with bias, bf16, 8-bit, small groups: the last
    two run the shared-operand kernel), take the shared memory the host's fit check counts, and wait for their
    wgmmas where their designs say (below)."""
    built = _gluon_builds(SASS_TEXT + W4_GLUON_CHILD)
    assert len(built) >= 16
    for what, b in built.items():
        assert b["cubin"], what
        assert 0 < b["shared"] <= SM90_MAX_SHARED, (what, b["shared"])
        if b["ws"]:  # the host's fit check counts an upper bound (wna16_gluon.WS_SCRATCH)
            assert b["planned"] - 64 <= b["shared"] <= b["planned"], (what, b)
            # 12 warps: the two MMA partitions' warpgroups at WS_MMA_REGS registers, the loader's at WS_LOAD_REGS
            assert b["warps"] == 12 and ["dec", "40"] in b["maxnreg"] and ["inc", "232"] in b["maxnreg"], (what, b)
        else:
            assert b["shared"] == b["planned"], (what, b)  # the host's fit check (applies) counts what is built
        # shared-operand kernel: one block's two wgmma groups (x in two 64-wide boxes) stay in flight; the
        # register-operand kernel: a block's eight wgmmas are waited for once, at the end of the iteration
        assert b["waits"] == (["0", "0"] if b["rs"] else ["2", "0"]), (what, b["waits"])
        if b["sass"] is not None:
            # ...and ptxas keeps them in flight together (one wait in the loop, one in the drain; the first form
            # of the kernel had one after every HGMMA) while the next block is unpacked (all its fragment
            # registers' multiplications, 32 a thread for a 64-row warpgroup tile, before the wait)
            assert b["sass"]["depbars"] == 2, (what, b["sass"])
            assert b["sass"]["hmul_in_flight"] >= 32, (what, b["sass"])
    assert sum(b["rs"] for b in built.values()) >= 8
    assert sum(b["sass"] is not None for b in built.values()) >= 8 or all(b["sass"] is None for b in built.values())


W4_GEMV_CHILD = textwrap.dedent(r'''
    import json, re, sys, torch
    from quantkit.kernels import wna16, wna16_gluon as wg
    if wg.GLUON_ERROR is not None:
        print(json.dumps({"skip": wg.GLUON_ERROR}))
        sys.exit(0)

    def mul_loop(cubin):
        """The multiplying partition's K loop in the SASS (the shortest backward branch over >= 32 HFMA2s): its
        opcodes; None without cuobjdump."""
        sass = sass_text(cubin)
        if sass is None:
            return None
        ins = [(int(a, 16), op) for a, op in re.findall(r"/\*([0-9a-f]{4})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)]
        best = None
        for a, t in re.findall(r"/\*([0-9a-f]{4})\*/\s+(?:@!?U?P\w+\s+)?BRA\s+(?:`\()?0x([0-9a-f]+)", sass):
            a, t = int(a, 16), int(t, 16)
            body = [op for ad, op in ins if t <= ad <= a]
            if t < a and sum(o.startswith("HFMA2") for o in body) >= 32 and (best is None or len(body) < len(best)):
                best = body
        return best

    out = {}
    for (bn, sk, w, ring), v in [((128, 1, 4, 8), dict()), ((128, 2, 4, 12), dict(has_zero=True, has_bias=True)),
                                 ((256, 2, 4, 6), dict(has_zero=True, dtype=torch.bfloat16, pdl=False)),
                                 ((256, 4, 8, 6), dict()), ((256, 1, 4, 12), dict(has_zero=True)),
                                 ((128, 8, 4, 6), dict(timeline=True)), ((128, 8, 4, 6), dict(chain=True))]:
        cfg = wna16._gemv_tma(bn, sk, w, ring, chain=v.pop("chain", False))
        k = wg.build_gemv_for_target(cfg, **v)
        ptx = k.asm["ptx"]
        body = mul_loop(k.asm["cubin"])
        out[f"{cfg} {v}"] = dict(
            chain=cfg.get("PDL_CHAIN", False), triggers=ptx.count("griddepcontrol.launch_dependents"),
            cubin=bool(k.asm.get("cubin")), shared=k.metadata.shared,
            planned=wg.gemv_shared_bytes(cfg, "has_zero" in v),
            warps=k.metadata.num_warps, cols=bn // (32 * w), pdl=v.get("pdl", True),
            maxnreg=sorted(set(re.findall(r"setmaxnreg\.(\w+)\.sync\.aligned\.u32\s+(\d+)", ptx))),
            gdc_waits=ptx.count("griddepcontrol.wait"), tma=ptx.count("cp.async.bulk.tensor"),
            timers=[ptx.count("%globaltimer"), ptx.count("%clock64")], timeline=v.get("timeline", False),
            loop=None if body is None else dict(n=len(body), tma=sum(o.startswith("UTMALDG") for o in body),
                                                bars=sum(o.startswith("BAR") for o in body),
                                                lds=sum(o.startswith("LDS") for o in body)))
    print(json.dumps(out))
''')


def test_gluon_w4a16_gemv_builds_for_sm90_with_the_loads_off_the_multipliers():
    """The TMA-fed decode GEMV builds for sm_90 (one and two columns a thread, one and two multiplying warpgroups,
    zero points, bias, bf16, with and without PDL) within the shared memory the host's fit check counts, as a
    one-warp loader plus the multiplying warps with the registers moved to them (``setmaxnreg``), and with the
    TIMELINE diagnostic's timestamps, and with PDL_CHAIN's trigger; in the SASS the
    multipliers' K loop issues no TMA and takes one or two barriers of their own warps (the slot's release) and at
    most 2.9 instructions a weight, about the register-loading h2 GEMV's 2.5."""
    built = _gluon_builds(SASS_TEXT + W4_GEMV_CHILD)
    assert len(built) == 7
    for what, b in built.items():
        assert b["cubin"], what
        # PDL_CHAIN: the loader lets the next launch start (one trigger); no trigger otherwise
        assert b["triggers"] == (1 if b["chain"] else 0), (what, b["triggers"])
        # the TIMELINE diagnostic build (gemm.py --decode-timeline) reads globaltimer at the multipliers' start and
        # end and clock64 six times; the others read no timer
        assert b["timers"] == ([2, 6] if b["timeline"] else [0, 0]), (what, b["timers"])
        # an upper bound: the warp specialization's own few bytes (wna16_gluon.GEMV_SCRATCH)
        assert b["planned"] - 256 <= b["shared"] <= b["planned"] <= SM90_MAX_SHARED, (what, b)
        assert b["warps"] in (8, 12) and ["dec", "24"] in b["maxnreg"] and ["inc", "40"] in b["maxnreg"], (what, b)
        # PDL: the loader waits for the packing before x's loads (ptxas may copy that wait into the path where the
        # split has no block), the multipliers before reading its scale; no wait without PDL
        assert (b["gdc_waits"] >= 2) if b["pdl"] else (b["gdc_waits"] == 0), (what, b)
        if b["loop"] is not None:
            # (Triton 3.6 adds a partition barrier before the wait for the slot)
            assert b["loop"]["tma"] == 0 and 1 <= b["loop"]["bars"] <= 2, (what, b["loop"])
            assert b["loop"]["lds"] >= 16, (what, b["loop"])  # 16 x planes' LDS.128 (+ words, scales)
            assert b["loop"]["n"] <= 2.9 * 128 * b["cols"], (what, b["loop"])
