"""Do the mixed calls take the cached launch path? FAST_STATS deltas (cached, ordinary) per 100 calls, and host us."""
import sys
import time

import torch

sys.path.insert(0, ".")
from quantkit.kernels import _common, mixed, w8a8  # noqa: E402

for (N, K, M) in [(4096, 4096, 1), (6144, 4096, 256), (6144, 4096, 512)]:
    q = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
    W = w8a8.prepack_w8a8(q, torch.rand(N, 1, device="cuda") * 1e-3 + 1e-4)
    w16 = torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    rb = torch.zeros(M, dtype=torch.uint8, device="cuda")
    out = torch.empty(M, N, device="cuda", dtype=torch.float16)
    calls = {"plain": lambda: w8a8.w8a8_linear_triton(x, W.w, W.scale, None, out=out),
             "mixed": lambda: mixed.mixed_linear_triton(x, W.w, W.scale, w16, mixed.CTRL_ROW_BITS, rb, None, out=out),
             "public": lambda: mixed.mixed_linear(x, W, w16, mixed.CTRL_ROW_BITS, rb)}
    for name, f in calls.items():
        for _ in range(20):
            f()
        torch.cuda.synchronize()
        s0 = list(_common.FAST_STATS)
        t = time.perf_counter()
        for _ in range(100):
            f()
        dt = (time.perf_counter() - t) / 100 * 1e6
        torch.cuda.synchronize()
        print(f"N={N} K={K} M={M} {name}: host {dt:.1f} us/call, cached {_common.FAST_STATS[0] - s0[0]}, "
              f"ordinary {_common.FAST_STATS[1] - s0[1]} per 100 calls")
