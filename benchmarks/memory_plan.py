"""Estimate vs measured peak memory of a calibration run (checks quantkit.plan).

Builds a random-weight model from a named shape (or loads one), runs a recipe's
layer-by-layer calibration on N samples x seqlen random tokens on the chosen
device (optionally exports it), and prints the estimate next to the measured
peaks: host = ru_maxrss of this process, device = torch.cuda.max_memory_allocated.

    python benchmarks/memory_plan.py --shape llama3-8b --device cuda --samples 128 --seqlen 2048
    python benchmarks/memory_plan.py --model default --samples 8 --seqlen 256
    python benchmarks/memory_plan.py --model default --data-free   # what `quantkit rtn` does

Run one configuration per process: ru_maxrss never goes down.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from quantkit.models.random import SHAPES

def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _recipe(args):
    from quantkit.recipe import QuantArgs, Recipe, Scheme, Stage

    if args.recipe:
        from quantkit.methods.base import load_recipe

        return load_recipe(args.recipe)
    stages = tuple(Stage(m) for m in args.method.split("+"))  # e.g. awq+gptq
    return Recipe(Scheme(QuantArgs(bits=args.bits, group_size=args.group_size, symmetric=True)), stages)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--shape", choices=sorted(SHAPES))
    src.add_argument("--model", help="a model quantkit loads: default, a dir, a .gguf or a hub id")
    ap.add_argument("--recipe", help="recipe YAML")
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--data-free", action="store_true", help="no block forwards (what RTN does through the API)")
    ap.add_argument("--export", help="export the checkpoint here (default: a temp dir, removed after); the "
                    "estimate covers the export phase, so it is always measured")
    ap.add_argument("--json", help="write the result here too")
    args = ap.parse_args(argv)

    import torch

    from quantkit.api import CalibConfig
    from quantkit.calib.pipeline import run_layerwise
    from quantkit.methods.base import build_methods
    from quantkit.models.loading import resolve_device, resolve_dtype
    from quantkit.models.random import random_model
    from quantkit.plan import HOST_BASELINE_BYTES, estimate_memory, model_config

    device = resolve_device(args.device)
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    recipe = _recipe(args)
    calib = CalibConfig(samples=args.samples, seqlen=args.seqlen, batch_size=args.batch_size)
    baseline = _rss_bytes()
    t0 = time.perf_counter()
    if args.shape:
        model = random_model(args.shape, dtype=resolve_dtype(dtype_name, device), device="cpu")
        model.config.use_cache = False
        cfg = model.config.to_dict()
        tokenizer, source = None, {"kind": "random", "shape": args.shape}
        cfg["dtype"] = None  # built in memory, not mapped from a file
    else:
        from quantkit import api

        cfg = model_config(None if args.model == "default" else args.model)
        loaded = api.load(None if args.model == "default" else args.model, dtype=args.dtype, device=device)
        model, tokenizer, source = loaded.model, loaded.tokenizer, loaded.source
    plan = estimate_memory(cfg, recipe, calib, device, dtype=dtype_name, with_data=not args.data_free)
    load_s = time.perf_counter() - t0

    methods = build_methods(recipe)
    ids = None
    if not args.data_free:
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (args.samples, args.seqlen), generator=torch.Generator().manual_seed(0))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    t1 = time.perf_counter()
    def progress(i, n, name, phase):  # on stderr as it goes: a run cut short still shows how far it got
        print(f"[{time.perf_counter() - t1:7.1f} s] block {i + 1}/{n} {name} {phase}", file=sys.stderr, flush=True)

    res = run_layerwise(model, ids, methods, device=device, batch_size=args.batch_size, ignore=recipe.ignore,
                        on_block=progress)
    calib_s = time.perf_counter() - t1
    dev_peak = torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else 0
    host_after_calib = _rss_bytes()
    from quantkit.export.compressed_tensors import export_compressed_tensors
    from quantkit.quant.model import QuantizedModel

    tmp = None
    if args.export:
        out = Path(args.export)
    else:
        tmp = tempfile.mkdtemp(prefix="memory-plan-")
        out = Path(tmp) / "ckpt"
    print(f"calibration {calib_s:.1f} s, device peak {dev_peak / 2**30:.2f} GiB; exporting", file=sys.stderr, flush=True)
    export_compressed_tensors(QuantizedModel(model, tokenizer, recipe, res.results, source), out, overwrite=True)
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    host_peak = _rss_bytes()

    def gib(n):
        return round(n / 2**30, 3)

    result = {
        "source": source.get("shape") or source.get("name") or source.get("path"),
        "device": device, "dtype": dtype_name, "samples": args.samples, "seqlen": args.seqlen,
        "batch_size": args.batch_size, "data_free": args.data_free,
        "import_rss_gib": gib(baseline), "assumed_baseline_gib": gib(HOST_BASELINE_BYTES),
        "host_estimate_gib": gib(plan.host_peak), "host_measured_gib": gib(host_peak),
        "host_measured_after_calibration_gib": gib(host_after_calib),
        "host_error_pct": round((plan.host_peak / host_peak - 1) * 100, 1),
        "device_estimate_gib": gib(plan.device_peak), "device_measured_gib": gib(dev_peak),
        "device_error_pct": round((plan.device_peak / dev_peak - 1) * 100, 1) if dev_peak else None,
        "host_parts_gib": {k: gib(v) for k, v in plan.host_parts.items()},
        "device_parts_gib": {k: gib(v) for k, v in plan.device_parts.items()},
        "load_seconds": round(load_s, 1), "calibration_seconds": round(calib_s, 1),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
