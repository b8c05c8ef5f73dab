"""One launch each of the shipped W4A16 RS kernel at 4096 x 4096, M = 128 and 256 (for ncu)."""
import sys; sys.path.insert(0, ".")
import torch
from quantkit.kernels import wna16
dev = "cuda"
for M in (128, 256):
    N = K = 4096
    q = torch.randint(-8, 8, (N, K), device=dev, dtype=torch.int8)
    W = wna16.prepack_wna16(q, torch.rand((N, K // 128), device=dev) * 0.01 + 0.005, None, 4)
    x = torch.randn(M, K, device=dev, dtype=torch.float16)
    for _ in range(3):
        wna16.wna16_linear_triton(x, W.qw, W.scales, W.zeros, None, 4, 128, N, K)
    torch.cuda.synchronize()
