"""Side-by-side rows for llm-compressor on the same model, windows and scheme.

Runs in an environment that has `llmcompressor` (not a quantkit dependency):

    python benchmarks/llmcompressor_compare.py --method gptq --device cuda
    python benchmarks/llmcompressor_compare.py --method smoothquant-gptq --device cuda

The float model comes from `quantkit.api.load` (the same weights quantkit sees),
the calibration windows from `quantkit.calib.data.calibration_set` (same seed, so
the same token windows as benchmarks/accuracy.py), and perplexity from
`quantkit.api.evaluate` on the same held-out windows. llm-compressor evaluates
with its own fake quantization (weights, and per-token activations for W8A8).
Prints one JSON line per row and a markdown table last.
"""

from __future__ import annotations

import argparse
import json
import time


def _scheme_gptq_w4g64_asym():
    return {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 64},
        }
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=["gptq", "smoothquant-gptq"], default="gptq")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=0, help="held-out windows per text (0 = all)")
    ap.add_argument("--texts", default="pydoc,code,prose", help="held-out texts, as in benchmarks/accuracy.py")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    from quantkit import api
    from quantkit.calib.data import calibration_set, heldout_sets
    from quantkit.models.loading import resolve_device

    import torch as _t

    device = _t.device(resolve_device(args.device))
    loaded = api.load(None, dtype=args.dtype, device=args.device)  # auto: bf16 on a GPU, as quantkit runs
    model, tok = loaded.model, loaded.tokenizer
    ecfg = api.EvalConfig(windows=args.windows or None, seqlen=args.seqlen)
    wins = heldout_sets(tok, args.seqlen, args.windows or None, [t.strip() for t in args.texts.split(",") if t.strip()])

    def score(m) -> dict[str, float]:
        return {t: api.evaluate(m, tok, ecfg, device=args.device, windows=w)[0].ppl for t, w in wins.items()}

    rows = []
    base = score(model)
    rows.append({"row": "baseline (same run)", "ppl": base, "seconds": None})

    calib = calibration_set(tok, None, samples=args.samples, seqlen=args.seqlen, seed=0)
    ids = calib.input_ids
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})

    if args.method == "gptq":
        recipe = [GPTQModifier(config_groups=_scheme_gptq_w4g64_asym(), ignore=["lm_head"], dampening_frac=0.01)]
        label = "llm-compressor GPTQ W4 g64 asym (actorder static, its default)"
    else:
        from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

        recipe = [
            SmoothQuantModifier(smoothing_strength=0.8),
            GPTQModifier(scheme="W8A8", targets="Linear", ignore=["lm_head"], dampening_frac=0.01),
        ]
        label = "llm-compressor SmoothQuant(0.8)+GPTQ W8A8"

    model.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    oneshot(
        model=model,
        tokenizer=tok,
        dataset=ds,
        recipe=recipe,
        num_calibration_samples=args.samples,
        max_seq_length=args.seqlen,
        shuffle_calibration_samples=False,
        pipeline="sequential",
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    model.to("cpu")
    rows.append({"row": label, "ppl": score(model), "seconds": secs})

    for r in rows:
        print(json.dumps(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "windows": {t: int(w.shape[0]) for t, w in wins.items()}, "rows": rows},
                      f, indent=2)
    print("\n| row | " + " | ".join(f"ppl {t} | gap {t}" for t in wins) + " | calibration s |")
    print("|---|" + "---|---|" * len(wins) + "---|")
    for r in rows:
        cells = " | ".join(f"{r['ppl'][t]:.4f} | {(r['ppl'][t] / base[t] - 1) * 100:+.2f}%" for t in wins)
        s = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        print(f"| {r['row']} | {cells} | {s} |")


if __name__ == "__main__":
    main()
