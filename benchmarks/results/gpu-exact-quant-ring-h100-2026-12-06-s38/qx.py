"""Per-token quantization on the GPU: exact against the reference? and its time against a copy of the same bytes."""
import json, os, sys, torch, triton
from quantkit.kernels import act_quant
dev = "cuda"
out = {}
g = torch.Generator(device=dev).manual_seed(0)
tot = {}
for dtype in (torch.float16, torch.bfloat16, torch.float32):
    mism = n = 0
    for K in (96, 300, 4096, 14336, 20000):
        for trial in range(4):
            M = 2048 if K <= 14336 else 64
            x = (torch.randn(M, K, device=dev, generator=g) * torch.rand(M, 1, device=dev, generator=g) * 10 ** (trial - 1) + 0.01).to(dtype)
            q, s = torch.empty(M, K, dtype=torch.int8, device=dev), torch.empty(M, 1, dtype=torch.float32, device=dev)
            act_quant.per_token_quant_triton(x, out_q=q, out_s=s)
            qr, sr = act_quant.per_token_quant_ref(x)
            assert torch.equal(s, sr), (dtype, K, "scale differs", (s != sr).sum().item())
            mism += (q != qr).sum().item(); n += q.numel()
    # exact ties: values at half-integers of the step
    tot[str(dtype)] = [mism, n]
    print(dtype, "mismatched q", mism, "of", n, flush=True)
out["exact"] = tot
rows = []
for K in (4096, 14336):
    M = 2048
    x = torch.randn(M, K, device=dev, dtype=torch.float16)
    q, s = torch.empty(M, K, dtype=torch.int8, device=dev), torch.empty(M, 1, dtype=torch.float32, device=dev)
    fq = lambda: act_quant.per_token_quant_triton(x, out_q=q, out_s=s)
    y = torch.empty_like(x); qq = torch.empty_like(q)
    def fc():
        y.copy_(x)
    t_q = triton.testing.do_bench(fq, warmup=20, rep=200, return_mode="median") * 1e3
    t_c = triton.testing.do_bench(fc, warmup=20, rep=200, return_mode="median") * 1e3
    by = x.numel() * 2 + q.numel() + M * 4
    rows.append(dict(K=K, M=M, quant_us=t_q, copy_fp16_us=t_c, quant_TBps=by / t_q / 1e6, copy_TBps=2 * x.numel() * 2 / t_c / 1e6))
    print(rows[-1], flush=True)
out["time"] = rows
os.makedirs(os.environ.get("OUT", "."), exist_ok=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "qx.json"), "w"), indent=1)
