"""Where does the W4A16 M=1 GEMV's time go? (issue 19 diagnostic, H200)

    PYTHONPATH=. python benchmarks/gemv_probe.py

Same grid and tiles as the tuned M=1 config, four variants, each timed by CUDA-graph replay over
rotated weight copies (no L2 residency): (1) load the packed words only, (2) + the dequant (no x),
(3) the full GEMV, (4) the full GEMV with the split-K epilogue but SPLIT_K programs merged (one split).
A torch reduction over the same bytes gives the read-bandwidth reference. The gaps between rows say
what each stage costs.
"""

import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from quantkit.kernels import wna16  # noqa: E402


@triton.jit
def _probe(w_ptr, o_ptr, N, K, R: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr, SPLIT_K: tl.constexpr,
           DEQUANT: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    tile = pid % num_pid_n
    pid_k = pid // num_pid_n
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_u = tl.arange(0, UNROLL)
    offs_r = tl.arange(0, R)
    rows = offs_u[:, None] * R + offs_r[None, :]
    w_ptrs = w_ptr + rows[:, :, None].to(tl.int64) * N + offs_n[None, None, :]
    n_steps = tl.cdiv(tl.cdiv(K, 128), UNROLL)
    per = tl.cdiv(n_steps, SPLIT_K)
    acc = tl.zeros((UNROLL, R, BLOCK_N), dtype=tl.float32)
    acci = tl.zeros((UNROLL, R, BLOCK_N), dtype=tl.int32)
    for st in range(pid_k * per, tl.minimum(n_steps, pid_k * per + per)):
        wp = tl.load(w_ptrs + st * UNROLL * R * N)
        if DEQUANT:
            wh = wp >> 16
            for j in tl.static_range(8):
                src = wp if j < 4 else wh
                b = ((src & (15 << (4 * (j % 4)))) | 0x4B000000).to(tl.float32, bitcast=True)
                acc += b - 8388608.0
        else:
            acci ^= wp
    if DEQUANT:
        tot = tl.sum(tl.sum(acc, axis=1), axis=0)
    else:
        tot = tl.sum(tl.sum(acci, axis=1), axis=0).to(tl.float32)
    tl.atomic_add(o_ptr + offs_n, tot, mask=offs_n < N, sem="relaxed")


def graph_time(fns, rep=30):
    return triton.testing.do_bench_cudagraph(lambda: [f() for f in fns], rep=rep, return_mode="median") * 1e3 / len(fns)


def main():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    lines = ["| N | K | variant | us | GB/s (packed bytes) | % of floor speed |", "|---|---|---|---|---|---|"]
    n = 1 << 28
    a = torch.empty(n, dtype=torch.float32, device=dev).uniform_()
    b = torch.empty_like(a)
    t = triton.testing.do_bench(lambda: b.copy_(a), rep=100, return_mode="median") * 1e-3
    bw = 2 * a.numel() * 4 / t
    del a, b
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    for N, K in [(28672, 4096), (4096, 14336)]:
        q = torch.randint(-8, 8, (N, K), device=dev, dtype=torch.int8)
        s = torch.rand(N, K // 128, device=dev) * 0.02 + 0.005
        rot = max(2, math.ceil(150e6 / (N * K / 2)))
        Ws = [wna16.prepack_wna16(q, s, None, 4) for _ in range(rot)]
        x = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
        o = torch.zeros(N, device=dev)
        outb = torch.empty(1, N, device=dev, dtype=torch.bfloat16)
        nbytes = Ws[0].qw.numel() * 4
        floor = (nbytes + Ws[0].scales.numel() * 2) / bw * 1e6
        cfg = wna16.CONFIGS.get(1, N, K, "H200")
        bn, sk, u = cfg["BLOCK_N"], cfg["SPLIT_K"], cfg.get("UNROLL", 4)
        grid = (triton.cdiv(N, bn) * sk,)
        rows = []
        rows.append(("torch sum of the packed words", graph_time([lambda W=W: W.qw.sum(dtype=torch.int64)
                                                                   for W in Ws])))
        for dq in (False, True):
            name = f"probe: load{' + dequant' if dq else ''} (BN {bn}, SK {sk}, U {u})"
            rows.append((name, graph_time([lambda W=W: _probe[grid](W.qw, o, N, K, R=16, BLOCK_N=bn, UNROLL=u,
                                                                    SPLIT_K=sk, DEQUANT=dq, num_warps=4)
                                           for W in Ws])))
        rows.append((f"gemv ({cfg})", graph_time([lambda W=W: wna16.wna16_linear_triton(
            x, W.qw, W.scales, None, None, 4, 128, N, K, config=cfg, out=outb) for W in Ws])))
        for sk2 in (1, 2, 8):
            c2 = dict(cfg, SPLIT_K=sk2)
            rows.append((f"gemv, SPLIT_K {sk2}", graph_time([lambda W=W: wna16.wna16_linear_triton(
                x, W.qw, W.scales, None, None, 4, 128, N, K, config=c2, out=outb) for W in Ws])))
        for name, us in rows:
            lines.append(f"| {N} | {K} | {name} | {us:.1f} | {nbytes / us / 1e3:.0f} | {100 * floor / us:.0f}% |")
        del Ws
        torch.cuda.empty_cache()
    print("\n".join(lines))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gemv_probe.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
