"""W8A8 / W8A8C8 accuracy: naive W8A8 vs SmoothQuant (+GPTQ) and INT8 KV-cache variants, one process.

Every row is scored on the same held-out windows as the float baseline, on every held-out
text of --texts (`pydoc`: the builtin's second half, the calibration text's domain; `code`
and `prose`: texts no calibration set reads, see quantkit.calib.data.HELDOUT); activation
and KV quantization are simulated in torch (quantkit.runtime.simulate), so this runs on CPU
or GPU alike. All quantized runs share one calibration set (--calib, default builtin:pydoc).

    python benchmarks/accuracy_w8a8.py --device cuda --samples 128 --seqlen 512 --windows 40
    python benchmarks/accuracy_w8a8.py --device cpu --samples 8 --seqlen 512 --windows 8   # small CPU check
    python benchmarks/accuracy_w8a8.py --rows sq0.8-gptq,sq0.5-gptq --calib builtin:mix   # one recipe, mixed calibration

Prints one line per row, then a markdown table (ppl and gap vs the baseline per text, and vs
SmoothQuant 0.5 when that row ran) and the KV residual memory overhead; --out-md / --json write them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import time
from pathlib import Path

# GPTQ's range options, said explicitly per row: min/max (the default for 8-bit weights) or the
# Hessian-weighted search (the default for 4-bit weights; measured here at 8).
MINMAX = {"mse": False}
HADAMARD = {"rotation": "hadamard"}  # spinquant stage: random Hadamard R1/R2; "online" says whether R4 runs
MSEW = {"mse": True, "mse_weight": "hessian"}
# name -> (label, stages); every row is W8 per channel, A8 per token dynamic.
ROWS: dict[str, tuple[str, tuple[tuple[str, dict], ...]]] = {
    "naive": ("naive W8A8 (RTN W8 per-channel, A8 per-token)", (("rtn", {}),)),
    "sq0.5": ("SmoothQuant W8A8 alpha 0.5", (("smoothquant", {"alpha": 0.5}),)),
    "sq0.8": ("SmoothQuant W8A8 alpha 0.8", (("smoothquant", {"alpha": 0.8}),)),
    "sq-auto": ("SmoothQuant W8A8 alpha auto", (("smoothquant", {"alpha": "auto"}),)),
    "sq0.5-gptq": ("SmoothQuant 0.5 + GPTQ W8A8 (min/max ranges)", (("smoothquant", {"alpha": 0.5}), ("gptq", MINMAX))),
    "sq0.5-gptq-msew": ("SmoothQuant 0.5 + GPTQ W8A8 (Hessian-weighted range search)",
                        (("smoothquant", {"alpha": 0.5}), ("gptq", MSEW))),
    # 0.8 is llm-compressor's SmoothQuant strength in its W8A8 examples: a like-for-like row.
    "sq0.8-gptq": ("SmoothQuant 0.8 + GPTQ W8A8 (min/max ranges)", (("smoothquant", {"alpha": 0.8}), ("gptq", MINMAX))),
    "sq0.8-gptq-damp0.1": ("SmoothQuant 0.8 + GPTQ W8A8 (min/max ranges, damp 0.1)",
                           (("smoothquant", {"alpha": 0.8}), ("gptq", {**MINMAX, "damp": 0.1}))),
    "sq0.8-gptq-msew": ("SmoothQuant 0.8 + GPTQ W8A8 (Hessian-weighted range search)",
                        (("smoothquant", {"alpha": 0.8}), ("gptq", MSEW))),
    # Activation-side: a random Hadamard R1 (residual stream) and R2 (per head, V -> O) folded into the weights,
    # so the checkpoint stays plain W8A8 (recipes/w8a8-hadamard-folded-gptq.yaml); "+ online R4" also rotates
    # down_proj's input at run time (online: auto = R4 when activations are quantized, R3 only with a KV
    # cache; recipes/w8a8-hadamard-gptq.yaml).
    "had-gptq": ("Hadamard rotation (folded) + GPTQ W8A8 (min/max ranges)",
                 (("spinquant", {**HADAMARD, "online": False}), ("gptq", MINMAX))),
    "had-online-gptq": ("Hadamard rotation (folded + online R4 in Sylvester blocks, r4_block auto: vLLM-servable) + GPTQ W8A8 (min/max ranges)",
                        (("spinquant", {**HADAMARD, "online": "auto"}), ("gptq", MINMAX))),
    "had-online-full-gptq": ("Hadamard rotation (folded + online R4 over the whole width) + GPTQ W8A8 (min/max ranges)",
                             (("spinquant", {**HADAMARD, "online": "auto", "r4_block": "full"}), ("gptq", MINMAX))),
    "kv": ("the per-tensor static and KV-cache rows, on the SmoothQuant 0.5 model", ()),
}
SQ_REF = "SmoothQuant W8A8 alpha 0.5"
NAIVE = ROWS["naive"][0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40, help="held-out windows per text (0 = all)")
    ap.add_argument("--texts", default="pydoc,code,prose", help="held-out texts (builtin:NAME of quantkit.calib.data.HELDOUT)")
    ap.add_argument("--calib", default=None, help="calibration set of every row (default: builtin, i.e. builtin:pydoc)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--kv-tau", type=float, default=3.0)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of: {', '.join(ROWS)}")
    ap.add_argument("--no-auto", action="store_true", help="skip the alpha=auto row (the slowest)")
    ap.add_argument("--no-kv", action="store_true", help="skip the per-tensor static and KV-cache rows")
    ap.add_argument("--out-md", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows_wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows_wanted if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    skip = {"sq-auto"} if args.no_auto else set()
    skip |= {"kv"} if args.no_kv else set()
    rows_wanted = [r for r in rows_wanted if r not in skip]

    import torch

    from quantkit import api
    from quantkit.calib.data import calibration_set, heldout_sets
    from quantkit.calib.static import calibrate_static
    from quantkit.models.loading import LoadedModel, resolve_device
    from quantkit.recipe import PRESETS, ActQuantArgs, KVCacheArgs, Recipe, Stage
    from quantkit.runtime.simulate import simulate

    dev = resolve_device(args.device)
    base = api.load(args.model, dtype=args.dtype, device="cpu")
    texts = [t.strip() for t in args.texts.split(",") if t.strip()]
    eval_cfg = api.EvalConfig(seqlen=args.seqlen, windows=args.windows or None, batch_size=4)
    wins = heldout_sets(base.tokenizer, args.seqlen, args.windows or None, texts)
    calib = calibration_set(base.tokenizer, args.calib, samples=args.samples, seqlen=args.seqlen, seed=0)
    ccfg = api.CalibConfig(samples=args.samples, seqlen=args.seqlen, batch_size=args.batch_size)
    rows: list[tuple[str, dict[str, float], str]] = []
    t0 = time.perf_counter()

    def score(model, label, note="", **sim):
        ppl = {}
        for t, w in wins.items():
            with (simulate(model, **sim) if sim else contextlib.nullcontext()) as st:
                ppl[t] = api.evaluate(model, base.tokenizer, eval_cfg, device=dev, windows=w)[0].ppl
            if sim.get("kv") is not None and st.residual_bits and t == texts[0]:
                note = (note + " " if note else "") + (
                    f"{st.patched_fraction * 100:.3f}% KV tokens patched ({t}), "
                    f"+{st.residual_memory_overhead * 100:.3f}% KV memory")
        rows.append((label, ppl, note))
        print(f"{label}: ppl " + ", ".join(f"{t} {v:.4f}" for t, v in ppl.items()) + f" {note} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)

    def quantized(stages):
        lm = LoadedModel(copy.deepcopy(base.model), base.tokenizer, base.source)
        recipe = Recipe(PRESETS["W8A8"], tuple(Stage(m, dict(o)) for m, o in stages))
        return api.quantize(lm, recipe, ccfg, device=dev, calib_set=calib).model

    score(base.model, "FP baseline")
    a8 = ActQuantArgs(8, "token", dynamic=True)
    for key in rows_wanted:
        if key == "kv":
            continue
        label, stages = ROWS[key]
        m = quantized(stages)
        score(m, label, act=a8)
        del m

    if "kv" in rows_wanted:
        # KV-cache variants on the SmoothQuant alpha 0.5 model; static scales calibrated offline, once.
        sq = quantized(ROWS["sq0.5"][1])
        kv_dyn = KVCacheArgs(8, "token", dynamic=True)
        kv_res = KVCacheArgs(8, "channel", dynamic=False, residual_bits=4, residual_tau=args.kv_tau)
        static = calibrate_static(
            sq, calib.input_ids, act=ActQuantArgs(8, "tensor", dynamic=False), kv=kv_res, device=dev,
            batch_size=args.batch_size,
        )
        score(sq, "SmoothQuant W8A8, A8 per-tensor static", act=ActQuantArgs(8, "tensor", dynamic=False), static=static)
        score(sq, "W8A8C8, KV dynamic per-token", act=a8, kv=kv_dyn)
        score(sq, "W8A8C8, KV static per-channel", act=a8, kv=kv_res, static=static, kv_residual=False)
        score(sq, f"W8A8C8, KV static per-channel + 4-bit residuals (tau {args.kv_tau:g})", act=a8, kv=kv_res,
              static=static, kv_residual=True)

    _report(rows, args, dev, wins, calib)


def _report(rows, args, dev, wins, calib) -> None:
    """The markdown table (gap vs the float baseline per text, and vs SmoothQuant 0.5 when it ran), printed and
    written to --out-md / --json."""
    import torch

    texts = list(wins)
    base = rows[0][1]
    ref = {label: ppl for label, ppl, _ in rows}
    sq = ref.get(SQ_REF)
    head = (
        f"Machine: {platform.processor() or platform.machine()} ({dev}); model {args.model or 'default'}; "
        f"dtype {args.dtype}; calibration {args.samples} x {args.seqlen} of {args.calib or 'builtin'}; "
        + ", ".join(f"{t}: {int(w.shape[0])} windows" for t, w in wins.items())
        + f" x {args.seqlen} tokens; torch {torch.__version__}\n\n"
        "| run | " + " | ".join(f"{t} ppl (gap)" for t in texts)
        + (" | vs SmoothQuant W8A8 (" + texts[0] + ")" if sq else "") + " | notes |\n"
        "|---|" + "---|" * len(texts) + ("---|" if sq else "") + "---|\n"
    )
    body = ""
    for i, (label, ppl, note) in enumerate(rows):
        cells = " | ".join(f"{ppl[t]:.4f}" + ("" if i == 0 else f" ({(ppl[t] / base[t] - 1) * 100:+.2f}%)")
                           for t in texts)
        vs = "" if not sq else " | " + ("" if i == 0 else f"{(ppl[texts[0]] / sq[texts[0]] - 1) * 100:+.2f}%")
        body += f"| {label} | {cells}{vs} | {note} |\n"
    tail = ""
    if sq and NAIVE in ref:
        t = texts[0]
        naive_gap = ref[NAIVE][t] - base[t]
        tail = (f"\nSmoothQuant alpha 0.5 removes {(1 - (sq[t] - base[t]) / naive_gap) * 100:.0f}% of naive W8A8's "
                f"gap ({t}).\n" if naive_gap > 0 else f"\nnaive W8A8 shows no gap on {t}.\n")
    table = head + body + tail
    if args.out_md:
        args.out_md.write_text(table)
    if args.json:
        args.json.write_text(json.dumps({
            "device": str(dev), "calibration": calib.settings, "texts": {t: int(w.shape[0]) for t, w in wins.items()},
            "rows": [{"row": label, "ppl": ppl, "note": note} for label, ppl, note in rows]}, indent=2))
    print(table)


if __name__ == "__main__":
    main()
