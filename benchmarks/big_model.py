"""Calibrate a random-weight model of a big shape on the GPU: wall time and peak memory.

    python benchmarks/big_model.py --shape llama3-8b --method gptq --samples 128 --seqlen 2048

Weights are random (real 8B weights cannot be downloaded here), so this measures
time and memory, not accuracy. The model stays in host memory (bf16) and one
decoder block at a time visits the GPU, as in any quantkit run. Reports the wall
time of the layer-wise calibration, the peak GPU memory (torch allocator), the
peak host RSS, and, when the memory planner is available, its estimate for the
same settings, printed as a table last.
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--method", default="gptq", help="one stage, or stages joined by + (awq+gptq)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (quick checks)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    from quantkit import api
    from quantkit.calib.data import CalibrationSet
    from quantkit.models.loading import LoadedModel
    from quantkit.models.random import random_model
    from quantkit.recipe import QuantArgs, Recipe, Scheme, Stage

    overrides = {} if args.layers is None else {"num_hidden_layers": args.layers}
    t0 = time.perf_counter()
    model = random_model(args.shape, dtype=torch.bfloat16, device="cpu", **overrides)
    build_s = time.perf_counter() - t0
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.samples, args.seqlen), generator=g)
    calib = CalibrationSet(ids, {"source": "random token ids", "samples": args.samples, "seqlen": args.seqlen, "seed": 0})
    recipe = Recipe(
        Scheme(QuantArgs(bits=args.bits, group_size=args.group_size, symmetric=True)),
        tuple(Stage(m) for m in args.method.split("+")),
    )
    loaded = LoadedModel(model, None, {"kind": "random", "shape": args.shape})

    estimate = None
    try:  # the memory planner (issue 9) when present
        from quantkit.plan import estimate_memory

        estimate = estimate_memory(
            cfg, recipe, api.CalibConfig(samples=args.samples, seqlen=args.seqlen, batch_size=args.batch_size),
            args.device,
        )
    except ImportError:
        pass

    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    q = api.quantize(
        loaded,
        recipe,
        api.CalibConfig(samples=args.samples, seqlen=args.seqlen, batch_size=args.batch_size),
        device=args.device,
        calib_set=calib,
        on_block=lambda i, n, name, label: print(f"({i + 1}/{n}) {name} · {label} {time.perf_counter() - t0:.1f}s", flush=True),
    )
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    peak_gpu = torch.cuda.max_memory_allocated() / 2**30
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    result = {
        "gpu": torch.cuda.get_device_name(),
        "shape": args.shape,
        "layers": cfg.num_hidden_layers,
        "params_b": sum(p.numel() for p in model.parameters()) / 1e9,
        "method": args.method,
        "scheme": recipe.scheme.describe(),
        "calibration": f"{args.samples} x {args.seqlen} tokens, batch {args.batch_size}",
        "build_seconds": build_s,
        "calibration_seconds": secs,
        "peak_gpu_gib": peak_gpu,
        "peak_host_rss_gib": peak_rss,
        "quantized_linears": len(q.modules),
        "warnings": q.warnings[:10],
    }
    if estimate is not None:
        result["estimate"] = estimate.to_dict() if hasattr(estimate, "to_dict") else str(estimate)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print("\n| shape | method | calibration | wall time | peak GPU | peak host RSS |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {args.shape} ({result['params_b']:.2f} B, {cfg.num_hidden_layers} layers) | {args.method} "
        f"{recipe.scheme.describe()} | {result['calibration']} | {secs / 60:.2f} min | {peak_gpu:.2f} GiB | "
        f"{peak_rss:.1f} GiB |"
    )


if __name__ == "__main__":
    main()
