"""Side-by-side rows for llm-compressor on the same model, windows and scheme.

Runs in an environment that has `llmcompressor` (not a quantkit dependency):

    python benchmarks/llmcompressor_compare.py --method gptq --device cuda
    python benchmarks/llmcompressor_compare.py --method gptq,gptq-imatrix,awq,awq-gptq --device cuda
    python benchmarks/llmcompressor_compare.py --method smoothquant-gptq --device cuda

Methods (W4 g64 asymmetric unless W8A8): gptq (its default min/max observer), gptq-mse (observer
"mse": the weights' own error, as GPTQModel's mse), gptq-imatrix (observer "imatrix_mse": the error
weighted by each input channel's E[x^2], the peer of quantkit's Hessian-weighted search), awq (AWQ
scales + round-to-nearest), awq-gptq (AWQ scales, then GPTQ), smoothquant-gptq (SmoothQuant 0.8 +
GPTQ W8A8). Each method starts from a fresh copy of the float model; all share the baseline row.

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


def _scheme_gptq_w4g64_asym(observer: str | None = None):
    weights = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 64}
    if observer is not None:
        weights["observer"] = observer
    return {"group_0": {"targets": ["Linear"], "weights": weights}}


METHODS = ("gptq", "gptq-mse", "gptq-imatrix", "awq", "awq-gptq", "smoothquant-gptq")


def _recipe(method: str):
    """(llm-compressor modifiers, row label) for one method."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    def gptq(observer=None):
        return GPTQModifier(config_groups=_scheme_gptq_w4g64_asym(observer), ignore=["lm_head"], dampening_frac=0.01)

    if method == "gptq":
        return [gptq()], "llm-compressor GPTQ W4 g64 asym (actorder static, its default)"
    if method == "gptq-mse":
        return [gptq("mse")], "llm-compressor GPTQ W4 g64 asym, observer mse"
    if method == "gptq-imatrix":
        return [gptq("imatrix_mse")], "llm-compressor GPTQ W4 g64 asym, observer imatrix_mse (E[x^2]-weighted)"
    if method in ("awq", "awq-gptq"):
        from llmcompressor.modifiers.transform.awq import AWQModifier

        quant = (gptq() if method == "awq-gptq" else
                 QuantizationModifier(config_groups=_scheme_gptq_w4g64_asym(), ignore=["lm_head"]))
        label = "llm-compressor AWQ + GPTQ W4 g64 asym" if method == "awq-gptq" else "llm-compressor AWQ W4 g64 asym"
        return [AWQModifier(), quant], label
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    return ([SmoothQuantModifier(smoothing_strength=0.8),
             GPTQModifier(scheme="W8A8", targets="Linear", ignore=["lm_head"], dampening_frac=0.01)],
            "llm-compressor SmoothQuant(0.8)+GPTQ W8A8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="gptq", help=f"comma-separated, of: {', '.join(METHODS)}")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=0, help="held-out windows per text (0 = all)")
    ap.add_argument("--texts", default="pydoc,code,prose", help="held-out texts, as in benchmarks/accuracy.py")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown --method {unknown}; choose from {', '.join(METHODS)}")

    import copy

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot

    from quantkit import api
    from quantkit.calib.data import calibration_set, heldout_sets
    from quantkit.models.loading import resolve_device

    device = torch.device(resolve_device(args.device))
    loaded = api.load(None, dtype=args.dtype, device=args.device)  # auto: bf16 on a GPU, as quantkit runs
    float_model, tok = loaded.model, loaded.tokenizer
    ecfg = api.EvalConfig(windows=args.windows or None, seqlen=args.seqlen)
    wins = heldout_sets(tok, args.seqlen, args.windows or None, [t.strip() for t in args.texts.split(",") if t.strip()])

    def score(m) -> dict[str, float]:
        return {t: api.evaluate(m, tok, ecfg, device=args.device, windows=w)[0].ppl for t, w in wins.items()}

    rows = []
    base = score(float_model)
    rows.append({"row": "baseline (same run)", "ppl": base, "seconds": None})
    print(json.dumps(rows[-1]), flush=True)

    calib = calibration_set(tok, None, samples=args.samples, seqlen=args.seqlen, seed=0)
    ids = calib.input_ids
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})

    if device.type == "cpu":
        # llm-compressor 0.14's AWQ pins its cached activations unconditionally, which raises on a machine
        # without an accelerator: pinning only speeds host-to-device copies, so skip it there.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *a, **k: None

    for method in methods:
        recipe, label = _recipe(method)
        model = copy.deepcopy(float_model).to(device)
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
        rows.append({"row": label, "method": method, "ppl": score(model), "seconds": secs})
        print(json.dumps(rows[-1]), flush=True)
        del model

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
