"""Weight-only accuracy table on the embedded default model (issue 3 targets).

    python benchmarks/accuracy.py --device cuda                 # full table
    python benchmarks/accuracy.py --device cpu --samples 16 --windows 8 --rows rtn-w4,gptq-w4

Every row starts from the same float weights, calibrates on the same token
windows (seeded) and is scored on the same held-out windows as the baseline,
all in one process. Calibration time is also given as a ratio to one forward
pass of the float model over the same calibration tokens (measured in the same
run), so the numbers mean something across machines. Prints one JSON line per
row and a markdown table last; --json writes everything to a file.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from datetime import datetime, timezone

# name -> (description, bits, stages); every row is W{bits} group 64 asymmetric.
ROWS: dict[str, tuple[str, int, tuple[tuple[str, dict], ...]]] = {
    "rtn-w4": ("RTN", 4, (("rtn", {}),)),
    "awq-w4": ("AWQ (search on 8 windows, the default)", 4, (("awq", {}),)),
    "awq-all-w4": ("AWQ (search on all windows)", 4, (("awq", {"search_samples": None}),)),
    "gptq-w4": ("GPTQ (act-order, static groups: the default)", 4, (("gptq", {}),)),
    "gptq-noact-w4": ("GPTQ without act-order", 4, (("gptq", {"act_order": False}),)),
    "awq-gptq-w4": ("AWQ + GPTQ", 4, (("awq", {}), ("gptq", {}))),
    "awq-gptq-noact-w4": ("AWQ + GPTQ without act-order", 4, (("awq", {}), ("gptq", {"act_order": False}))),
    "rtn-w3": ("RTN", 3, (("rtn", {}),)),
    "awq-gptq-w3": ("AWQ + GPTQ", 3, (("awq", {}), ("gptq", {}))),
    "awq-gptq-noact-w3": ("AWQ + GPTQ without act-order", 3, (("awq", {}), ("gptq", {"act_order": False}))),
}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--windows", type=int, default=0, help="held-out windows of --seqlen tokens (0 = all)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of: {', '.join(ROWS)}")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    from quantkit import api
    from quantkit.calib.data import calibration_set
    from quantkit.models.loading import resolve_device
    from quantkit.recipe import QuantArgs, Recipe, Scheme, Stage

    device = torch.device(resolve_device(args.device))
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")

    loaded = api.load(args.model, dtype=args.dtype, device=args.device)
    model, tok = loaded.model, loaded.tokenizer
    float_state = copy.deepcopy(model.state_dict())
    dtype = next(model.parameters()).dtype
    ecfg = api.EvalConfig(windows=args.windows or None, seqlen=args.seqlen)
    calib_cfg = api.CalibConfig(samples=args.samples, seqlen=args.seqlen, batch_size=args.batch_size)
    calib = calibration_set(tok, None, samples=args.samples, seqlen=args.seqlen, seed=0)

    # Reference cost: one float forward over the calibration tokens, whole model on the device.
    model.to(device)
    with torch.no_grad():
        model(input_ids=calib.input_ids[: args.batch_size].to(device), use_cache=False)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        for chunk in calib.input_ids.split(args.batch_size):
            model(input_ids=chunk.to(device), use_cache=False)
        _sync(device)
    forward_s = time.perf_counter() - t0
    model.to("cpu")

    base, windows = api.evaluate(model, tok, ecfg, device=args.device)
    results = [{"row": "baseline", "method": f"float ({dtype})", "bits": None, "ppl": base.ppl, "seconds": None}]
    print(json.dumps(results[0]), flush=True)
    for key in rows:
        desc, bits, stages = ROWS[key]
        model.load_state_dict(float_state)
        recipe = Recipe(
            Scheme(QuantArgs(bits=bits, group_size=args.group_size, symmetric=False)),
            tuple(Stage(m, dict(o)) for m, o in stages),
        )
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _sync(device)
        t0 = time.perf_counter()
        q = api.quantize(loaded, recipe, calib_cfg, device=args.device, calib_set=calib)
        _sync(device)
        secs = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        ppl, _ = api.evaluate(model, tok, ecfg, device=args.device, windows=windows)
        row = {
            "row": key,
            "method": desc,
            "bits": bits,
            "ppl": ppl.ppl,
            "gap_pct": (ppl.ppl / base.ppl - 1) * 100,
            "seconds": secs,
            "x_forward": secs / forward_s,
            "peak_gpu_gib": peak,
            "warnings": q.warnings,
        }
        results.append(row)
        print(json.dumps(row), flush=True)

    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype),
        "calibration": calib.settings,
        "eval_windows": int(windows.shape[0]),
        "eval_tokens": base.tokens,
        "float_forward_seconds": forward_s,
        "group_size": args.group_size,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": results}, f, indent=2)
    print(f"\n{meta['device']} · {meta['dtype']} · calib {args.samples}x{args.seqlen} · "
          f"{meta['eval_windows']} held-out windows ({meta['eval_tokens']} tokens) · {meta['date']}")
    print(f"float forward over the calibration tokens: {forward_s:.2f} s\n")
    print("| row | method | scheme | ppl | gap vs baseline | calibration s | x float forward |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if r["bits"] is None:
            print(f"| baseline | {r['method']} | - | {r['ppl']:.4f} | - | - | - |")
        else:
            print(
                f"| {r['row']} | {r['method']} | W{r['bits']} g{args.group_size} asym | {r['ppl']:.4f} | "
                f"{r['gap_pct']:+.2f}% | {r['seconds']:.1f} | {r['x_forward']:.1f} |"
            )


if __name__ == "__main__":
    main()
