"""Is the eager large-M W8A8 call host-bound? (issue 19; GPU only)

1. quantkit W8A8 with the shipped configs at M=2048 on the Llama-3-8B shapes: eager (`do_bench`, L2 flushed) vs
   CUDA-graph replay (`do_bench_cudagraph`) vs cuBLAS FP16, plus host issue time per call; three passes, the
   middle one in reverse shape order (a first-shape effect shows as a pass-to-pass difference).
2. Host time per call (300 back-to-back calls, before the final sync) of each piece of the eager Gluon path at
   6144 x 4096: the per-token quantization (allocating / into the scratch), the TMA descriptors (``from_tensor`` /
   the ``_HostDesc`` a cached launch uses), the kernel launch (Gluon's JIT path / the cached direct launch), the
   whole public call.

    PYTHONPATH=. python benchmarks/w8a8_host_time.py
"""

from __future__ import annotations

import time

import torch


def host_us(f, n: int = 200) -> float:
    for _ in range(20):
        f()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    t = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return t


def eager_vs_graph(M: int = 2048) -> None:
    from triton.testing import do_bench, do_bench_cudagraph

    from quantkit.kernels import w8a8
    from quantkit.kernels._common import gpu_key

    shapes = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
    layers = {}
    for N, K in shapes:
        q = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
        layers[(N, K)] = (w8a8.prepack_w8a8(q, torch.rand(N, 1, device="cuda") * 2e-3 + 5e-4),
                          torch.randn(N, K, device="cuda", dtype=torch.float16),
                          torch.randn(M, K, device="cuda", dtype=torch.float16))
    for p, order in enumerate([shapes, shapes[::-1], shapes]):
        for N, K in order:
            W, w16, x = layers[(N, K)]
            out = torch.empty(M, N, device="cuda", dtype=torch.float16)
            cfg = w8a8.CONFIGS.get(M, N, K, gpu_key(x))
            f = lambda: w8a8.w8a8_linear_triton(x, W.w, W.scale, out=out)  # noqa: E731
            te = do_bench(f, rep=300) * 1e3
            tg = do_bench_cudagraph(f, rep=300) * 1e3
            t16 = do_bench(lambda: torch.nn.functional.linear(x, w16), rep=300) * 1e3
            print(f"pass {p} {N}x{K} {cfg.get('BACKEND', 'mma')} {cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}: "
                  f"eager {te:.1f} us, graph {tg:.1f} us, host issue {host_us(f):.1f} us/call, cuBLAS fp16 {t16:.1f} us, "
                  f"x {t16 / te:.2f} (graph {t16 / tg:.2f})", flush=True)


def host_pieces(M: int = 2048, N: int = 6144, K: int = 4096) -> None:
    from quantkit.kernels import _gluon, w8a8, w8a8_gluon
    from quantkit.kernels.act_quant import per_token_quant_triton

    q = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
    W = w8a8.prepack_w8a8(q, torch.rand(N, 1, device="cuda") * 2e-3 + 5e-4)
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    w16 = torch.randn(N, K, device="cuda", dtype=torch.float16)
    out = torch.empty(M, N, device="cuda", dtype=torch.float16)
    glu = dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=5, BACKEND="gluon", GROUP_M=8)
    tma = dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3, BACKEND="tma", GROUP_M=8)
    a_q, a_s = per_token_quant_triton(x)
    a_s = a_s.reshape(-1)
    d = w8a8_gluon.descriptors(a_q, W.w, out, glu)
    args = (a_s, W.scale, a_s, a_s, M, N, K)  # as, ws, bias, row bits (unused: ROW_BITS off), M, N, K

    def kernel_only():
        w8a8_gluon.w8a8_gluon_kernel[(M // 256, N // 128)](*d, *args, STAGES=5, WARPS=8, OUT_INT32=False,
                                                           HAS_BIAS=False, ROW_BITS=False, num_warps=8)

    pieces = {"per_token_quant_triton (allocating)": lambda: per_token_quant_triton(x),
              "per_token_quant into the scratch": lambda: w8a8._quantize_into_scratch(x),
              "descriptors() (3 from_tensor)": lambda: w8a8_gluon.descriptors(a_q, W.w, out, glu),
              "3 HostDesc": lambda: [_gluon.HostDesc(t) for t in (a_q, W.w, out)],
              "gluon kernel JIT launch, descriptors given": kernel_only,
              "w8a8_gluon.launch (cached direct launch)": lambda: w8a8_gluon.launch(a_q, a_s, W.w, W.scale, None, out, glu),
              "w8a8_linear_triton gluon (quant + launch)": lambda: w8a8.w8a8_linear_triton(x, W.w, W.scale, config=glu, out=out),
              "w8a8_linear_triton tma (quant + launch)": lambda: w8a8.w8a8_linear_triton(x, W.w, W.scale, config=tma, out=out),
              "torch F.linear fp16": lambda: torch.nn.functional.linear(x, w16),
              "torch add_ (1 element)": lambda: a_s[:1].add_(0)}
    # inside the cached direct launch: its cache key, and the compiled kernel's own launcher (Triton's Python
    # wrapper: one cuTensorMapEncodeTiled per descriptor, then the C launch)
    from quantkit.kernels import _common

    w8a8_gluon.launch(a_q, a_s, W.w, W.scale, None, out, glu)
    k = next((v for key, v in (w8a8_gluon._LAUNCH.compiled or {}).items() if key[1:4] == (256, 128, 64)), None)
    pieces["launch cache key (spec_key over 7 arguments)"] = lambda: _common.spec_key(args)
    if k is not None:
        pieces["compiled kernel's launcher (run_compiled)"] = lambda: _common.run_compiled(
            k, (M // 256, N // 128), (*[_gluon.HostDesc(t) for t in (a_q, W.w, out)], *args, 5, 8, False, False,
                                      False))
    for name, f in pieces.items():
        print(f"host {name}: {host_us(f, 300):.1f} us/call", flush=True)


if __name__ == "__main__":
    print(torch.cuda.get_device_name())
    eager_vs_graph()
    host_pieces()
