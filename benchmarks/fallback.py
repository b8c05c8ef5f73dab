"""Usefulness of the online fallback (issue 17): W8A8 perplexity with the monitor on vs off, on held-out text
like the calibration set (pydoc, second half) and unlike it (Python source code of standard-library modules).

    python benchmarks/fallback.py --device cpu --windows 8 --json fallback.json
    python benchmarks/fallback.py --checkpoint runs/sq-w8a8 --device cuda --windows 40

Rows per text, all on the runtime, the same windows (seqlen 512), every window from position 0:

* float: the default model itself (runtime float path) - the baseline;
* W8A8, fallback off: the checkpoint as exported (A8 per token on every quantized linear), in the same
  64-token chunks as the next row;
* W8A8, fallback on: the monitor (default layers and thresholds) watching every 64 tokens; a window whose
  statistics drift runs FP16 activations (on the W8 weights) from the next 64-token chunk on;
* W8A16: every linear forced to FP16 activations from the first token: what the fallback can win at most.

Reported: perplexity, the share of tokens that ran FP16 rows, the windows that switched, and on those windows
the share of the W8A8 gap (NLL of W8A8 minus NLL of W8A16) that the fallback won back.
Without --checkpoint, a SmoothQuant W8A8 checkpoint (alpha 0.5, 32 x 512 calibration) of the default model is
made first.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

def window_nll(rt, windows: torch.Tensor, batch_size: int, chunk: int | None):
    """Per-window (NLL sum, tokens) and the windows that ran FP16 rows at the end."""
    nll, fired = [], []
    for b0 in range(0, windows.shape[0], batch_size):
        ids = windows[b0:b0 + batch_size]
        logits = rt.prefill([r.tolist() for r in ids], chunk=chunk, all_logits=True)
        tgt = ids[:, 1:].to(logits.device)
        ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none")
        nll += ce.view(ids.shape[0], -1).double().sum(-1).tolist()
        fired += [b0 + s for s in rt.precision.fp16_samples()]
    return nll, fired


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--kl-threshold", type=float, default=0.02)
    ap.add_argument("--skew-threshold", type=float, default=3.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from quantkit import api, runtime
    from quantkit.calib.data import CODE_MODULES, heldout_windows
    from quantkit.recipe import PRESETS, Recipe, Stage
    from quantkit.runtime.calibrate import attach_fallback

    t0 = time.time()
    ckpt = args.checkpoint
    if ckpt is None:
        qm = api.quantize(api.load(device=args.device), Recipe(PRESETS["W8A8"], (Stage("smoothquant", {"alpha": 0.5}),)),
                          api.CalibConfig(samples=32, seqlen=512), device=args.device)
        ckpt = api.export(qm, Path(tempfile.mkdtemp()) / "sq-w8a8")
        del qm
        print(f"made {ckpt} in {time.time() - t0:.0f} s", flush=True)
    rt = runtime.load(ckpt, device=args.device)
    tok = rt.tokenizer
    texts = {"pydoc (in-domain)": None, "Python source (out of domain)": "builtin:code"}
    wins = {name: heldout_windows(tok, 512, args.windows, spec=spec) for name, spec in texts.items()}
    base_rt = runtime.from_float(api.load(device=args.device).model, device=args.device, tokenizer=tok)
    res = {"checkpoint": str(ckpt), "windows": args.windows, "seqlen": 512, "device": args.device,
           "code_modules": list(CODE_MODULES), "rows": []}
    mon = attach_fallback(rt, kl_threshold=args.kl_threshold, skew_threshold=args.skew_threshold)
    res["monitor"] = {"layers": mon.layers, "kl_threshold": mon.kl_threshold, "skew_threshold": mon.skew_threshold,
                      "calibration_skew": mon.skew_ref}
    for name, w in wins.items():
        n_tok = w.shape[0] * (w.shape[1] - 1)
        out = {"text": name}
        out["float"], _ = window_nll(base_rt, w, args.batch_size, None)
        rt.disable_monitor()
        # the same 64-token chunks as the fallback row: with A8 activations a last-bit difference between a
        # whole-window and a chunked prefill flips some roundings (+-0.02% ppl), which must not pass for a gain
        out["w8a8"], _ = window_nll(rt, w, args.batch_size, 64)
        units = {id(u): u for u in rt.linears.values()}.values()
        for u in units:
            u.force_fp16 = True
        out["w8a16"], _ = window_nll(rt, w, args.batch_size, None)
        for u in units:
            u.force_fp16 = u.pinned
        mon = attach_fallback(rt, layers=res["monitor"]["layers"], kl_threshold=args.kl_threshold,
                              skew_threshold=args.skew_threshold)
        rt.stats = type(rt.stats)()
        out["fallback"], fired = window_nll(rt, w, args.batch_size, 64)
        row = {"text": name, "tokens": n_tok, "fallback_rate": rt.stats.fallback_rate, "windows_fired": sorted(fired),
               "switches": [s.to_dict() for s in mon.switches]}
        for k in ("float", "w8a8", "w8a16", "fallback"):
            row[f"ppl_{k}"] = math.exp(sum(out[k]) / n_tok)
        if fired:
            gap = sum(out["w8a8"][i] - out["w8a16"][i] for i in fired)
            won = sum(out["w8a8"][i] - out["fallback"][i] for i in fired)
            row["gap_won_on_fired_windows"] = won / gap if gap > 0 else None
            row["ppl_fired_windows"] = {k: math.exp(sum(out[k][i] for i in fired) / (len(fired) * 511))
                                        for k in ("float", "w8a8", "w8a16", "fallback")}
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
    res["seconds"] = time.time() - t0
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    print("\n| text | float | W8A8 off | W8A8 + fallback | W8A16 (all FP16 act.) | tokens FP16 | windows switched | gap won on them |")
    print("|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        won = r.get("gap_won_on_fired_windows")
        print(f"| {r['text']} | {r['ppl_float']:.4f} | {r['ppl_w8a8']:.4f} | {r['ppl_fallback']:.4f} | {r['ppl_w8a16']:.4f} | "
              f"{r['fallback_rate']:.1%} | {len(r['windows_fired'])}/{args.windows} | "
              f"{'' if won is None else f'{won:.0%}'} |")


if __name__ == "__main__":
    main()
