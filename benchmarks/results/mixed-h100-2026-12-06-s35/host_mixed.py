"""Host time of the mixed call vs plain W8A8 (eager), and where it goes (cProfile), session 35 diagnostic."""
import cProfile
import pstats
import sys
import time

import torch

sys.path.insert(0, ".")
from quantkit.kernels import mixed, w8a8  # noqa: E402


def host(fn, n=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t) / n * 1e6


for (N, K, M) in [(6144, 4096, 512), (6144, 4096, 256), (4096, 4096, 1)]:
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
    W = w8a8.prepack_w8a8(q, torch.rand(N, 1, device="cuda") * 1e-3 + 1e-4)
    w16 = torch.randn(N, K, device="cuda", dtype=torch.float16, generator=g) * 0.02
    x = torch.randn(M, K, device="cuda", dtype=torch.float16, generator=g)
    rb = torch.zeros(M, dtype=torch.uint8, device="cuda")
    out = torch.empty(M, N, device="cuda", dtype=torch.float16)
    plain = lambda: w8a8.w8a8_linear_triton(x, W.w, W.scale, None, out=out)  # noqa: E731
    mix = lambda: mixed.mixed_linear_triton(x, W.w, W.scale, w16, mixed.CTRL_ROW_BITS, rb, None, out=out)  # noqa
    pub = lambda: mixed.mixed_linear(x, W, w16, mixed.CTRL_ROW_BITS, rb)  # noqa: E731
    print(f"N={N} K={K} M={M} cfg={w8a8.CONFIGS.get(M, N, K, 'H100')}")
    print(f"  host us/call: plain {host(plain):.1f}  mixed_linear_triton {host(mix):.1f}  mixed_linear {host(pub):.1f}")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(300):
        mix()
    torch.cuda.synchronize()
    pr.disable()
    st = pstats.Stats(pr)
    st.sort_stats("tottime").print_stats(14)
