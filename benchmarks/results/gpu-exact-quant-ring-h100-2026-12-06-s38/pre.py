"""W4A16 M=1 h2 GEMV: whole-row vs per-split (SLICE_PRESCALE) prescale, same tiles, graph replay over rotated
weights, A/B interleaved three rounds; every config checked against the reference."""
import json, math, os, sys
import torch
sys.path.insert(0, "benchmarks")
import gemm as G
from quantkit.kernels import wna16
SM = os.environ.get("PRE_SMOKE") == "1"
dev = "cpu" if SM else "cuda"
G.SMOKE = SM
gen = torch.Generator(device=dev).manual_seed(0)
rows = []
H = wna16._gemv_h2
extra = [H(64, 8, 2, 4), H(64, 8, 2, 4, per_block=True), H(64, 16, 1, 4, per_block=True), H(128, 8, 2, 8)]
for N, K in ((64, 1024),) if SM else ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)):
    n_copies = 2 if SM else max(2, math.ceil(G.ROT_BYTES / (N * K / 2)))
    copies = []
    for i in range(n_copies):
        q4 = torch.randint(-8, 8, (N, K), device=dev, dtype=torch.int8, generator=gen)
        s4 = torch.rand((N, K // 128), device=dev, generator=gen) * 2e-2 + 5e-3
        copies.append((q4, s4, wna16.prepack_wna16(q4, s4, None, 4)))
    x = torch.randn(1, K, device=dev, dtype=torch.float16, generator=gen)
    x[0, 11] = 40.0  # an outlier: the whole-row prescale is set by it
    q4, s4, W0 = copies[0]
    ref = wna16.wna16_gemm_ref(x, q4, s4, None).float()
    shipped = dict(wna16.CONFIGS.get(1, 6144 if SM else N, 4096 if SM else K, "H100"))
    for base in [shipped] + extra:
        base = {k: v for k, v in base.items() if k != "SLICE_PRESCALE"}
        pair = [base, dict(base, SLICE_PRESCALE=True)]
        errs = []
        for cfg in pair:
            y = wna16.wna16_linear_triton(x, W0.qw, W0.scales, None, None, 4, 128, N, K, config=cfg)
            errs.append(G.rel(y, ref))
        ts = [[], []]
        for _ in range(3):
            for j, cfg in enumerate(pair):
                fns = [lambda W=W, cfg=cfg: wna16.wna16_linear_triton(x, W.qw, W.scales, None, None, 4, 128, N, K, config=cfg)
                       for _, _, W in copies]
                ts[j].append(G.bench_graph_rot(fns))
        r = dict(N=N, K=K, cfg=base, shipped=base == {k: v for k, v in shipped.items() if k != "SLICE_PRESCALE"},
                 row_us=min(ts[0]), slice_us=min(ts[1]), row_all=ts[0], slice_all=ts[1], err_row=errs[0], err_slice=errs[1])
        rows.append(r)
        print(json.dumps(r), flush=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "pre.json"), "w"), indent=1)
print("\n| N x K | tile | shipped | whole-row us | slice us | ratio | err row / slice |\n|---|---|---|---|---|---|---|")
for r in rows:
    c = r["cfg"]
    t = f'{c["BLOCK_N"]}x{c.get("SPLIT_K",1)}x{c.get("UNROLL")} w{c["num_warps"]}{" PB" if c.get("PER_BLOCK") else ""}'
    print(f'| {r["N"]}x{r["K"]} | {t} | {"yes" if r["shipped"] else ""} | {r["row_us"]:.2f} | {r["slice_us"]:.2f} | {r["row_us"]/r["slice_us"]:.3f} | {r["err_row"]:.2e} / {r["err_slice"]:.2e} |')
