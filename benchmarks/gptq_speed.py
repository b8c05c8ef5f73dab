"""GPTQ speed: the solver alone, and whole blocks of an 8B-shaped model through the pipeline.

    python benchmarks/gptq_speed.py solver --device cuda --shapes 4096x4096 14336x4096 4096x14336
    python benchmarks/gptq_speed.py blocks --device cuda --layers 2 --samples 128 --seqlen 2048

`solver` times `gptq_quantize` on random W (out x in) and a random correlated H
(W4 g128 asym, g64 where 128 does not divide; block_size 128). `blocks` builds a random Llama with the 8B shapes
(hidden 4096, MLP 14336, 32 heads, 8 KV heads) and a few layers, runs
`run_layerwise` with GPTQ on random tokens and reports seconds per block
(x32 for an 8B estimate; the capture pass, re-captures and propagation included).
Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench_solver(shapes: list[str], device: str, act_order: bool, repeats: int) -> None:
    from quantkit.quant.gptq import gptq_quantize
    from quantkit.recipe import QuantArgs

    dev = torch.device(device)
    for shape in shapes:
        out_f, in_f = (int(x) for x in shape.split("x"))
        args = QuantArgs(4, 128 if in_f % 128 == 0 else 64, False)
        g = torch.Generator(device=dev).manual_seed(0)
        w = torch.randn(out_f, in_f, device=dev, generator=g, dtype=torch.bfloat16) * 0.02
        x = torch.randn(4096, in_f, device=dev, generator=g) @ (
            torch.randn(in_f, in_f, device=dev, generator=g) / in_f**0.5 + torch.eye(in_f, device=dev)
        )
        h = 2 * x.T @ x / x.shape[0]
        del x
        gptq_quantize(w[:, :256].contiguous(), h[:256, :256].contiguous(), args)  # warm-up
        times = []
        for _ in range(repeats):
            _sync(dev)
            t0 = time.perf_counter()
            gptq_quantize(w, h, args, act_order=act_order)
            _sync(dev)
            times.append(time.perf_counter() - t0)
        print(json.dumps({"what": "solver", "shape": shape, "group_size": args.group_size, "device": str(dev), "act_order": act_order,
                          "seconds": min(times), "all": times}), flush=True)


def bench_blocks(device: str, layers: int, samples: int, seqlen: int, batch_size: int, true_sequential: bool) -> None:
    import transformers

    from quantkit.calib.pipeline import run_layerwise
    from quantkit.methods.base import get_method
    from quantkit.recipe import QuantArgs, Scheme

    cfg = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=max(seqlen, 2048),
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 32000, (samples, seqlen))
    method = get_method("gptq")(Scheme(QuantArgs(4, 128, False)), true_sequential=true_sequential)
    stamps = []

    def on_block(i, n, name, phase):
        _sync(torch.device(device))
        stamps.append(time.perf_counter())

    t0 = time.perf_counter()
    res = run_layerwise(model, ids, [method], device=device, batch_size=batch_size, on_block=on_block)
    _sync(torch.device(device))
    t1 = time.perf_counter()
    stamps.append(t1)
    per_block = [b - a for a, b in zip(stamps, stamps[1:])]
    print(json.dumps({
        "what": "blocks", "device": device, "layers": layers, "samples": samples, "seqlen": seqlen,
        "true_sequential": true_sequential, "total_seconds": t1 - t0, "block_seconds": per_block,
        "catch_seconds": stamps[0] - t0, "linears": len(res.results), "warnings": res.warnings[:3],
        "est_32_layers_seconds": (stamps[0] - t0) + 32 * (sum(per_block[1:]) / max(len(per_block) - 1, 1)
                                                           if len(per_block) > 1 else per_block[0]),
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
    }), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("solver")
    s.add_argument("--shapes", nargs="+", default=["1536x576", "576x1536"])
    s.add_argument("--device", default="cpu")
    s.add_argument("--act-order", action="store_true")
    s.add_argument("--repeats", type=int, default=1)
    s.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default); 1 is steadier on a busy machine")
    b = sub.add_parser("blocks")
    b.add_argument("--device", default="cuda")
    b.add_argument("--layers", type=int, default=2)
    b.add_argument("--samples", type=int, default=128)
    b.add_argument("--seqlen", type=int, default=2048)
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--no-true-sequential", action="store_true")
    a = p.parse_args()
    if a.cmd == "solver":
        if a.threads:
            torch.set_num_threads(a.threads)
        bench_solver(a.shapes, a.device, a.act_order, a.repeats)
    else:
        bench_blocks(a.device, a.layers, a.samples, a.seqlen, a.batch_size, not a.no_true_sequential)


if __name__ == "__main__":
    main()
