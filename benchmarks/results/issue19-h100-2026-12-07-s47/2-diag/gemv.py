"""Diagnose the TMA-fed GEMV on a GPU: one variant per process (argv: json of overrides)."""
import json, os, sys, torch
sys.path.insert(0, ".")
from quantkit.kernels import wna16, wna16_gluon as wg, _gluon
ov = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
N, K = ov.get("N", 4096), ov.get("K", 4096)
bn, sk, w, ring = ov.get("tile", (128, 1, 4, 8))
has_zero = ov.get("zero", False)
pdl = ov.get("pdl", False)
outer = ov.get("outlier", False)
g = torch.Generator().manual_seed(1)
q4 = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8).cuda()
s4 = (torch.rand(N, K // 128, generator=g) * 2e-2 + 5e-3).cuda()
z4 = torch.randint(-8, 8, (N, K // 128), generator=g, dtype=torch.int8).cuda() if has_zero else None
W = wna16.prepack_wna16(q4, s4, z4, 4)
x = torch.randn(1, K, device="cuda", dtype=torch.float16)
if outer:
    x *= 3.0
    x[0, K // 3] = 3000.0
cfg = wna16._gemv_tma(bn, sk, w, ring, pdl=pdl)
h2 = {k: v for k, v in cfg.items() if k != "TMA_RING"}
ref = wna16.wna16_linear_triton(x, W.qw, W.scales, W.zeros, None, 4, W.group_size, N, K, config=h2)
torch.cuda.synchronize()
print("shapes qw", tuple(W.qw.shape), W.qw.stride(), "scales", tuple(W.scales.shape), W.scales.stride(), W.scales.dtype,
      "zeros", None if W.zeros is None else (tuple(W.zeros.shape), W.zeros.dtype), flush=True)
consts = wg._gemv_consts(cfg, has_zero, False, pdl)
consts.update(ov.get("consts", {}))
opts = {"num_warps": w}
mx = ov.get("maxnreg", wg.gemv_maxnreg(cfg))
if mx:
    opts["maxnreg"] = mx
if pdl:
    opts["launch_pdl"] = True
xp, xsc = wna16._h2_pack_x(x, K, trigger=pdl)
tensors = wg._gemv_tensors(xp, W.qw, W.scales, W.zeros)
descs = wg._gemv_descriptors(tensors, bn)
for d in descs:
    print("desc", tuple(d.shape), d.strides, d.block_shape, d.layout, flush=True)
out = torch.full((1, N), float("nan"), device="cuda", dtype=torch.float16)
ws, lock = wna16.splitk_buffers(x.device, (N + bn - 1) // bn, sk, bn, 4)
grid = ((N + bn - 1) // bn, 1, sk)
args = (xsc, W.scales, out, ws, lock, N, K, W.scales.shape[0], W.group_size)
k = wg.wna16_gluon_gemv_kernel[grid](*descs, *args, **consts, **opts)
if ov.get("dump"):
    os.makedirs(os.environ["OUT"], exist_ok=True)
    open(os.path.join(os.environ["OUT"], ov["dump"] + ".cubin"), "wb").write(k.asm["cubin"])
    open(os.path.join(os.environ["OUT"], ov["dump"] + ".ptx"), "w").write(k.asm["ptx"])
print("n_regs", k.n_regs, "spills", k.n_spills, "shared", k.metadata.shared, flush=True)
torch.cuda.synchronize()
err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
print("RESULT ok rel_err %.3g" % err, json.dumps(ov), flush=True)
