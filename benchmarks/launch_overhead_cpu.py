"""Python host cost of quantkit's own launch wrappers, with Triton's launcher replaced by a no-op (CPU, no GPU).

On a GPU the eager small-M W8A8 call is bound by host time (BENCHMARKS.md: the tl.dot GEMM launch alone 29.7 us
against 17.3 for ``F.linear`` on an H100's host). This splits that cost: what runs before Triton's launcher
(config dicts, ``_consts``, the specialization key over every argument, buffer lookups) is timed here on CPU
tensors, every compiled-kernel lookup answered by a stub, so the numbers are the wrappers' alone.

    PYTHONPATH=. python benchmarks/launch_overhead_cpu.py
"""

from __future__ import annotations

import time
import types

import torch


def per_call_us(f, n: int = 20000) -> float:
    for _ in range(200):
        f()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    from quantkit.kernels import _common, act_quant, w8a8

    class AnyHit(dict):  # every lookup finds a "compiled kernel" whose launcher does nothing
        def get(self, key, default=None):
            return stub, ()

    stub = types.SimpleNamespace(run=lambda *a: None, function=None, packed_metadata=None)
    _common._FAST = AnyHit()
    _common._FAST_ON = True
    _common._driver = types.SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda d: 0)
    _common._knobs = types.SimpleNamespace(runtime=types.SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None))
    _common.interpret_mode = lambda: False

    M, N, K = 16, 4096, 4096
    x = torch.randn(M, K).half()
    W = w8a8.prepack_w8a8(torch.randint(-127, 128, (N, K), dtype=torch.int8), torch.rand(N, 1))
    out = torch.empty(M, N, dtype=torch.half)
    aq, asc = torch.empty(M, K, dtype=torch.int8), torch.empty(M, 1)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=3, SPLIT_K=1)
    one = torch.ones(1)
    rows = [
        ("a 1-element add_ (torch, for scale)", lambda: one.add_(1)),
        ("arg_class over 20 arguments (the specialization key)", lambda: tuple(map(_common.arg_class, (x,) * 8 + (1,) * 12))),
        ("per_token_quant_triton into buffers", lambda: act_quant.per_token_quant_triton(x, out_q=aq, out_s=asc)),
        ("per_token_quant_triton allocating", lambda: act_quant.per_token_quant_triton(x)),
        ("w8a8._launch (the tl.dot GEMM)", lambda: w8a8._launch(aq, asc.reshape(-1), W.w, W.scale, None, out, False,
                                                                False, cfg)),
        ("w8a8_linear_triton, two launches", lambda: w8a8.w8a8_linear_triton(x, W.w, W.scale, config=cfg, out=out)),
        ("w8a8_linear_triton, QUANT_ONCE", lambda: w8a8.w8a8_linear_triton(x, W.w, W.scale,
                                                                           config=dict(cfg, QUANT_ONCE=True), out=out)),
    ]
    print(f"W8A8 M={M}, {N} x {K}; us per call, Triton's launcher stubbed out")
    for name, f in rows:
        print(f"| {name} | {per_call_us(f):.2f} |")


if __name__ == "__main__":
    main()
