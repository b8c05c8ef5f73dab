"""W8A8 at small M: one launch (``QUANT_ONCE``) against two (per-token quantization, then the GEMM). Issue 19; GPU.

For each Llama-3-8B shape and M in 16 and 64: the shipped config's tile with two launches, with QUANT_ONCE (the
first programs to arrive quantize x into the scratch by K chunks, the others wait), and with FUSE_QUANT alone (every
program takes its rows' maxima over all of K and quantizes its x tiles in registers). Each
variant is checked bit for bit against the two-launch call, then timed three ways: CUDA-graph replay over rotated
weight copies (no L2-resident weights: what a decode loop pays), eager ``do_bench`` (L2 flushed) and host time per
call (wall time of 200 back-to-back calls, before the final sync). Then the host pieces of the two-launch call at
4096 x 4096, M=16 (``F.linear`` for scale), down to Triton's own launcher on the cached kernel with its arguments
prebuilt (the floor a Python wrapper can reach; also with the tensors passed as raw pointers, which skips the
launcher's per-pointer device check) and Triton's ordinary launch (``JITFunction.run``, no cache), with
the cached/ordinary launch counts and whether a launch hook is installed (which would disable the cache). The table
is printed last.

    PYTHONPATH=. python benchmarks/w8a8_small_m.py [--md out.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--md", default=None)
    ap.add_argument("--ms", default="16,64")
    args = ap.parse_args()
    import triton

    from gemm import ROT_BYTES, bench, bench_graph_rot
    from w8a8_host_time import host_us
    from quantkit.kernels import _common, act_quant, w8a8
    from quantkit.kernels._common import gpu_key

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    rows, fails, skipped = [], [], []
    for N, K in SHAPES:
        q = torch.randint(-127, 128, (N, K), device=dev, dtype=torch.int8, generator=gen)
        s = torch.rand((N, 1), device=dev, generator=gen) * 2e-3 + 5e-4
        copies = [w8a8.prepack_w8a8(q, s) for _ in range(max(2, min(16, int(ROT_BYTES // (N * K)) + 1)))]
        for M in [int(v) for v in args.ms.split(",")]:
            x = torch.randn(M, K, device=dev, dtype=torch.float16, generator=gen)
            out = torch.empty(M, N, device=dev, dtype=torch.float16)
            base = w8a8.CONFIGS.get(M, N, K, gpu_key(x))
            if base.get("BACKEND") in ("gemv", "tma", "gluon"):
                print(f"skip {N}x{K} M={M}: shipped config is {base.get('BACKEND')}", flush=True)
                continue
            base = dict(base, FUSE_QUANT=False, QUANT_ONCE=False)  # the two-launch reference
            variants = {"two launches": base, "QUANT_ONCE": dict(base, QUANT_ONCE=True),
                        "FUSE_QUANT (row maxima per program)": dict(base, QUANT_ONCE=False, FUSE_QUANT=True)}
            ref = w8a8.w8a8_linear_triton(x, copies[0].w, copies[0].scale, config=base)
            row = dict(N=N, K=K, M=M, tile=f"{base['BLOCK_M']}x{base['BLOCK_N']}x{base['BLOCK_K']} "
                                            f"sk{base.get('SPLIT_K', 1)} s{base['num_stages']}")
            for name, cfg in variants.items():
                try:
                    y = w8a8.w8a8_linear_triton(x, copies[0].w, copies[0].scale, config=cfg,
                                                out=torch.full_like(out, float("nan")))
                except triton.runtime.errors.OutOfResources as e:  # a variant the shipped tile cannot hold
                    skipped.append(f"{name} {N}x{K} M={M}: {e}")
                    continue
                if not torch.equal(y, ref):
                    fails.append(f"{name} {N}x{K} M={M}: differs from the two-launch call")
                    continue

                def call(W=copies[0], cfg=cfg):
                    return w8a8.w8a8_linear_triton(x, W.w, W.scale, config=cfg, out=out)

                row[name] = (bench_graph_rot([lambda W=W, cfg=cfg: call(W, cfg) for W in copies]), bench(call),
                             host_us(call))
            rows.append(row)
            print(row, flush=True)

    # host pieces of the two-launch call, 4096 x 4096, M=16
    N, K, M = 4096, 4096, 16
    W = w8a8.prepack_w8a8(torch.randint(-127, 128, (N, K), device=dev, dtype=torch.int8),
                          torch.rand((N, 1), device=dev) * 2e-3 + 5e-4)
    x = torch.randn(M, K, device=dev, dtype=torch.float16)
    w16 = torch.randn(N, K, device=dev, dtype=torch.float16)
    out = torch.empty(M, N, device=dev, dtype=torch.float16)
    aq = torch.empty(M, K, device=dev, dtype=torch.int8)
    asc = torch.empty(M, 1, device=dev, dtype=torch.float32)
    cfg = dict(w8a8.CONFIGS.get(M, N, K, gpu_key(x)), QUANT_ONCE=False, FUSE_QUANT=False)  # two launches
    pieces = [("F.linear fp16", lambda: torch.nn.functional.linear(x, w16)),
              ("per_token_quant_triton, allocating", lambda: act_quant.per_token_quant_triton(x)),
              ("per_token_quant_triton, into buffers", lambda: act_quant.per_token_quant_triton(x, out_q=aq, out_s=asc)),
              ("GEMM launch alone (w8a8_gemm_q_triton)",
               lambda: w8a8.w8a8_gemm_q_triton(aq, asc, W.w, W.scale, config=cfg, out=out)),
              ("whole call, two launches", lambda: w8a8.w8a8_linear_triton(x, W.w, W.scale, config=cfg, out=out)),
              ("whole call, QUANT_ONCE", lambda: w8a8.w8a8_linear_triton(x, W.w, W.scale, config=dict(cfg, QUANT_ONCE=True),
                                                                         out=out))]
    host = [(n, host_us(f)) for n, f in pieces]

    # below the wrapper: Triton's launcher on the cached kernel, the arguments as the wrapper last built them
    def gemm():
        return w8a8.w8a8_gemm_q_triton(aq, asc, W.w, W.scale, config=cfg, out=out)

    seen, real = [], _common.run_compiled
    _common.run_compiled = lambda *a: (seen.append(a), real(*a))[1]
    try:
        gemm()
        gemm()
    finally:
        _common.run_compiled = real
    if seen:
        k, grid, kargs, kdev = seen[-1]
        host.append(("Triton's launcher alone (cached GEMM kernel, arguments prebuilt)",
                     host_us(lambda: real(k, grid, kargs, kdev))))
        # tensors passed as raw pointers: Triton's C launcher then skips data_ptr() and its cuPointerGetAttribute
        # check per pointer (what a launch that trusts its tensors' device could save)
        raw = tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in kargs)
        host.append(("Triton's launcher alone, tensors as raw pointers", host_us(lambda: real(k, grid, raw, kdev))))
    _common._FAST_ON = False
    try:
        host.append(("GEMM launch, Triton's ordinary launch (JITFunction.run)", host_us(gemm)))
    finally:
        _common._FAST_ON = True
    stats = (f"launches so far: {_common.FAST_STATS[0]} cached, {_common.FAST_STATS[1]} ordinary; launch hook "
             f"installed: {not _common._no_hooks() if _common._knobs is not None else 'unknown'}")

    names = ["two launches", "QUANT_ONCE", "FUSE_QUANT (row maxima per program)"]
    L = [f"Device: **{torch.cuda.get_device_name()}**; torch {torch.__version__}, triton {triton.__version__}; "
         f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d} UTC; `PYTHONPATH=. python benchmarks/w8a8_small_m.py`",
         f"Correctness: {'all variants bit for bit the two-launch call' if not fails else '; '.join(fails)}.",
         *(f"Not run (does not fit): {m}" for m in skipped), "",
         "us per call: graph (rotated weights) / eager do_bench / host issue time", "",
         "| N x K | M | tile (shipped) | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for r in rows:
        cells = [("%.1f / %.1f / %.1f" % r[n]) if n in r else "-" for n in names]
        L.append(f"| {r['N']} x {r['K']} | {r['M']} | {r['tile']} | " + " | ".join(cells) + " |")
    L += ["", "Host time per call, 4096 x 4096, M=16 (200 back-to-back calls):", "", "| call | host us |", "|---|---|"]
    L += [f"| {n} | {t:.1f} |" for n, t in host]
    L += ["", stats]
    md = "\n".join(L)
    print("\n" + md)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md + "\n")
    return 1 if fails else 0


if __name__ == "__main__":
    raise SystemExit(main())
