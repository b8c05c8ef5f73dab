"""Which persistent-TMA mixed configs write wrong FP16 rows (session 35 diagnostic): BLOCK_KF x STAGES_F. tma-mixed.log is its run before the depth cap (w8a8._desc_stages_f; then named _tma_stages_f, which capped only 256-wide N tiles)."""
import sys

import torch

sys.path.insert(0, ".")
from quantkit.kernels import mixed, w8a8  # noqa: E402

torch.manual_seed(0)
N, K, M = 4096, 4096, 512
q = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
W = w8a8.prepack_w8a8(q, torch.rand(N, 1, device="cuda") * 1e-3 + 1e-4)
w16 = torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02
x = torch.randn(M, K, device="cuda", dtype=torch.float16)
rb = torch.ones(M, dtype=torch.uint8, device="cuda")
ref = mixed.mixed_gemm_ref(x, W.w, W.scale, w16, mixed.CTRL_ROW_BITS, rb)
for bm, bn, bk, warps in [(128, 128, 256, 8), (128, 128, 128, 8), (128, 256, 128, 8), (256, 128, 128, 8)]:
    for kf in (32, 64, 128):
        for sf in (1, 2, 3):
            cfg = dict(BACKEND="tma", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=3,
                       BLOCK_KF=kf, STAGES_F=sf)
            try:
                y = mixed.mixed_linear_triton(x, W.w, W.scale, w16, mixed.CTRL_ROW_BITS, rb, None, config=cfg)
                err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
                print(f"{bm}x{bn}x{bk} w{warps} KF={kf} SF={sf} (used {w8a8._desc_stages_f(cfg)}): rel err {err:.3g}",
                      "WRONG" if err > 1e-2 else "")
            except Exception as e:
                print(f"{bm}x{bn}x{bk} w{warps} KF={kf} SF={sf}: {type(e).__name__} {str(e)[:80]}")
