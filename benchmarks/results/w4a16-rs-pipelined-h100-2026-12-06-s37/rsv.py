"""RS-kernel variants (gpu/v/<name>.py stands in for quantkit.kernels.wna16_gluon): correctness, then timings.
usage: python gpu/rsv.py NAME check|time"""
import importlib.util, json, os, sys, time
sys.path.insert(0, ".")
name, mode = sys.argv[1], sys.argv[2]
if name != "tree":  # "tree": the checkout's own module
    spec = importlib.util.spec_from_file_location("quantkit.kernels.wna16_gluon", f"gpu/v/{name}.py")
    mod = importlib.util.module_from_spec(spec); sys.modules["quantkit.kernels.wna16_gluon"] = mod
    import quantkit.kernels
    spec.loader.exec_module(mod); quantkit.kernels.wna16_gluon = mod
import torch, triton
import torch.nn.functional as F
from quantkit.kernels import wna16
OUT = os.environ.get("OUT", "/tmp")
dev = "cuda"
gen = torch.Generator(device=dev).manual_seed(0)

def G(bm, bn, sk=1, w=8, s=3):
    return dict(BACKEND="gluon", BLOCK_M=bm, BLOCK_N=bn, SPLIT_K=sk, num_warps=w, num_stages=s, RS=True)

def make(N, K, gs, zero):
    q = torch.randint(-8, 8, (N, K), device=dev, dtype=torch.int8, generator=gen)
    s = torch.rand((N, K // gs), device=dev, generator=gen) * 2e-2 + 5e-3
    z = torch.randint(-3, 4, (N, K // gs), device=dev, dtype=torch.int8, generator=gen) if zero else None
    return q, wna16.prepack_wna16(q, s, z, 4)

def run(x, W, cfg, bias=None, out=None):
    return wna16.wna16_linear_triton(x, W.qw, W.scales, W.zeros, bias, 4, W.group_size, W.N, W.K, config=cfg, out=out)

def rel(a, b):
    a, b = a.float(), b.float()
    return float("inf") if not torch.isfinite(a).all() else ((a - b).norm() / b.norm()).item()

TILES = [G(128, 128, 1), G(128, 128, 2), G(128, 128, 4), G(256, 128, 1, 8, 2), G(128, 256, 1, 8, 2),
         G(64, 128, 2, 4, 4), G(128, 64, 2, 4, 2), G(128, 128, 1, 8, 2), G(128, 128, 2, 8, 2),
         G(256, 128, 2, 8, 2), G(256, 128, 4, 8, 2), G(128, 64, 4, 4, 2)]
TILES += [G(256, 128, 1, 8, 3), G(256, 128, 2, 8, 3), G(256, 128, 4, 8, 3), G(64, 64, 2, 4, 3), G(64, 64, 4, 4, 2),
          G(64, 128, 2, 4, 2), G(128, 128, 1, 8, 4), G(128, 128, 2, 8, 4)]  # 12-19: call 5's extra tiles
if os.environ.get("RSV_TILES"):  # indices into TILES
    TILES = [TILES[int(i)] for i in os.environ["RSV_TILES"].split(",")]
SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
if os.environ.get("RSV_SHAPES"):
    SHAPES = [tuple(int(v) for v in s.split("x")) for s in os.environ["RSV_SHAPES"].split(",")]
MS = [int(m) for m in os.environ.get("RSV_MS", "128,256").split(",")]
CHECK = os.environ.get("RSV_NOCHECK") != "1"
DT = torch.bfloat16 if os.environ.get("RSV_DTYPE") == "bf16" else torch.float16  # ablation variants compute wrong results on purpose
fails, t0 = [], time.time()
if mode == "check":
    cases = [(256, 384, 128, False, torch.float16, False), (512, 1024, 128, True, torch.float16, False),
             (768, 1024, 128, True, torch.bfloat16, True), (4096, 4096, 128, False, torch.float16, False),
             (768, 1024, 256, True, torch.float16, True), (640, 2048, 1024, False, torch.bfloat16, False)]
    for (N, K, gs, zero, dt, hb) in cases:
        q, W = make(N, K, gs, zero)
        bias = (torch.randn(N, device=dev, generator=gen) * 0.1).to(dt) if hb else None
        for M in (37, 128, 300):
            x = torch.randn(M, K, device=dev, generator=gen).to(dt)
            ref = wna16.wna16_gemm_ref(x, q, W.scales.t().float(), None if W.zeros is None else W.zeros.t(), bias)
            for cfg in TILES:
                try:
                    y1 = run(x, W, cfg, bias).clone(); y2 = run(x, W, cfg, bias)
                    e = rel(y1, ref)
                    if not (e <= 4e-3) or not torch.equal(y1, y2):
                        fails.append(f"{name} N={N} K={K} gs{gs} z{zero} {dt} M={M} {cfg}: rel {e:.3g}")
                except Exception as ex:
                    fails.append(f"{name} N={N} K={K} M={M} {cfg}: {type(ex).__name__} {str(ex)[:200]}")
    torch.cuda.synchronize()
    print(f"{name} check: {len(fails)} failures, {time.time() - t0:.0f} s", *fails[:10], sep="\n", flush=True)
    sys.exit(0)

def bench(fn): return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3
rows = []
for (N, K) in SHAPES:
    q, W = make(N, K, 128, False)
    w16 = (torch.randn((N, K), device=dev, generator=gen) * 0.02).to(DT)
    for M in MS:
        x = torch.randn(M, K, device=dev, dtype=DT, generator=gen)
        ref = wna16.wna16_gemm_ref(x, q, W.scales.t().float(), None)
        out = torch.empty(M, N, device=dev, dtype=DT)
        t16 = bench(lambda: F.linear(x, w16))
        res = {}
        for cfg in TILES:
            try:
                e = rel(run(x, W, cfg, None, out), ref)
                if CHECK and not e <= 4e-3:
                    fails.append(f"{name} timing check {N}x{K} M={M} {cfg}: {e:.3g}"); continue
                # a plan per call is cached per config; the timed call is the launch
                res[f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}/{cfg['SPLIT_K']}/w{cfg['num_warps']}s{cfg['num_stages']}"] = bench(lambda: run(x, W, cfg, None, out))
            except Exception as ex:
                print("skip", cfg, type(ex).__name__, str(ex)[:150])
        best = min(res, key=res.get)
        rows.append(dict(N=N, K=K, M=M, cublas=t16, best=best, best_us=res[best], all=res))
        print(json.dumps(rows[-1]), flush=True)
print(f"| {name} | N x K | M | cuBLAS | best RS | tile | x |")
for r in rows:
    print(f"| {name} | {r['N']}x{r['K']} | {r['M']} | {r['cublas']:.1f} | {r['best_us']:.1f} | {r['best']} | {r['cublas'] / r['best_us']:.2f} |")
print(f"{name} failures: {len(fails)}", *fails[:10], sep="\n")
json.dump(dict(rows=rows, fails=fails), open(os.path.join(OUT, f"rsv-{name}-{str(DT)[6:]}.json"), "w"), indent=1)
