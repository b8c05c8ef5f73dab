"""Sensitivity scan benchmark: does keeping the scan's top layers in FP16 recover perplexity?

For each scheme (W8A8 naive per-token, W4A16 group 64 RTN):
  1. scan the model (time it), thresholds calibrated with --target-fraction on
     held-out windows A (selection);
  2. on disjoint held-out windows B (scoring): baseline ppl, all-quantized ppl,
     ppl with the scan's flagged layers in FP16, and with the same number of
     randomly chosen layers in FP16 (mean of 5 seeded draws);
  3. recovered gap = (ppl_allq - ppl_mixed) / (ppl_allq - ppl_base); targets:
     scan >= 40% and >= 2x the random mean;
  4. optionally (--measure-layers N) the per-layer ground truth on N evenly spaced
     linears and the Spearman correlation of each metric with it.
The search measures restore gains of a shortlist (--shortlist, default 2 x budget)
on the selection windows: 2 + 8 + S + 2 perplexity evaluations there, then 8 on
the scoring windows (+ N with --measure-layers).
The table is printed last. Quantization is fake (quantized_subset), as the scan assumes.

    python benchmarks/sensitivity.py --device cuda --samples 128 --seqlen 512 --windows 40
    nice python benchmarks/sensitivity.py --samples 8 --seqlen 256 --windows 4 --eval-seqlen 256   # CPU, small
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--windows", type=int, default=20, help="held-out windows per half (selection, scoring)")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--fraction", type=float, default=0.10)
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--schemes", default="W8A8,W4A16g64")
    ap.add_argument("--measure-layers", type=int, default=0, help="per-layer ground truth on N linears (0 = off, -1 = all)")
    ap.add_argument("--shortlist", type=int, default=None, help="layers whose restore gain the search measures (default 2k)")
    ap.add_argument("--fisher-windows", type=int, default=8, help="calibration samples for the gradient-weighted metric (0 = off)")
    ap.add_argument("--stat-tokens", type=int, default=16384, help="token rows per linear for the statistics (0 = all)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    import dataclasses

    import torch

    from quantkit import api
    from quantkit.calib.data import calibration_set, heldout_windows
    from quantkit.models.loading import resolve_device
    from quantkit.recipe import PRESETS
    from quantkit.sensitivity.calibrate import correlations, measure_layer_ppl
    from quantkit.sensitivity.partial import recovered_fraction, subset_perplexity
    from quantkit.sensitivity.run import run_scan
    from quantkit.sensitivity.scan import Thresholds, apply_thresholds

    schemes = {
        "W8A8": PRESETS["W8A8"],
        "W4A16g64": dataclasses.replace(
            PRESETS["W4A16"], weights=dataclasses.replace(PRESETS["W4A16"].weights, group_size=64)
        ),
    }
    dev = resolve_device(a.device)
    t_load = time.perf_counter()
    loaded = api.load(a.model, dtype=a.dtype, device=a.device)
    print(f"  loaded in {time.perf_counter() - t_load:.1f} s", file=sys.stderr)
    model, tok = loaded.model, loaded.tokenizer
    cs = calibration_set(tok, None, samples=a.samples, seqlen=a.seqlen, seed=0)
    held = heldout_windows(tok, a.eval_seqlen, 2 * a.windows)
    sel, score = held[: a.windows], held[a.windows :]

    def ppl(names, scheme):
        return subset_perplexity(model, score, names, scheme, device=dev)

    rows, out = [], {"settings": vars(a) | {"json": str(a.json)}, "schemes": {}}
    base = None
    for key in a.schemes.split(","):
        scheme = schemes[key]
        t0 = time.perf_counter()
        rep = run_scan(model, cs.input_ids, scheme, target_fraction=a.fraction, eval_windows=sel, device=dev,
                       batch_size=a.batch_size, shortlist=a.shortlist, stat_tokens=a.stat_tokens or None,
                       fisher_windows=a.fisher_windows,
                       on_step=lambda m: print(f"  [{key}] {m}", file=sys.stderr),
                       on_block=lambda i, n, nm, ph: print(f"  [{key}] scan {i + 1}/{n}", file=sys.stderr) if i % 10 == 0 else None)
        print(f"  [{key}] scan took {rep.seconds:.1f} s", file=sys.stderr)
        scan_s, total_s = rep.seconds, time.perf_counter() - t0
        names = [e.name for e in rep.layers]
        flagged = rep.flagged
        if base is None:
            base = ppl([], scheme)
        allq = ppl(names, scheme)
        mixed = ppl([n for n in names if n not in set(flagged)], scheme)
        rand = []
        for seed in range(a.draws):
            pick = set(random.Random(seed).sample(names, len(flagged)))
            rand.append(ppl([n for n in names if n not in pick], scheme))
        rec = recovered_fraction(base, allq, mixed)
        rec_rand = [recovered_fraction(base, allq, r) for r in rand]
        rec_rand_mean = sum(rec_rand) / len(rec_rand) if rec_rand else float("nan")
        # the fixed default thresholds, for reference
        d_flag = apply_thresholds(rep.layers, Thresholds(), scheme)
        d_mixed = ppl([n for n in names if n not in set(d_flag)], scheme)
        apply_thresholds(rep.layers, rep.thresholds, scheme)
        corr = None
        if a.measure_layers:
            sub = rep.layers if a.measure_layers < 0 else rep.layers[:: max(1, len(rep.layers) // a.measure_layers)]
            measure_layer_ppl(model, sub, scheme, score, device=dev, baseline=base,
                              on_step=lambda i, n, nm: print(f"  [{key}] ({i + 1}/{n}) {nm}", file=sys.stderr))
            corr = correlations(sub) | {"n_layers": len(sub)}
        model.to("cpu")
        res = {
            "scan_seconds": scan_s, "scan_plus_search_seconds": total_s, "n_linears": len(names),
            "thresholds": rep.thresholds.to_dict(), "search": rep.search, "flagged": flagged,
            "ppl_base": base, "ppl_allq": allq, "ppl_scan": mixed, "ppl_random": rand,
            "recovered_scan": rec, "recovered_random": rec_rand, "recovered_random_mean": rec_rand_mean,
            "default_thresholds_flagged": len(d_flag), "ppl_default_thresholds": d_mixed,
            "recovered_default_thresholds": recovered_fraction(base, allq, d_mixed), "correlations": corr,
            "rule": rep.ppl.get("rule"), "selection_evaluations": rep.ppl.get("evaluations"),
            "selection_ppl": {k: rep.ppl.get(k) for k in ("baseline", "all_quantized", "mixed", "recovered")},
            "restore_gain": {e.name: e.restore_gain for e in rep.layers if e.restore_gain is not None},
            "rel_err": {e.name: e.rel_err for e in rep.layers},
            "fisher": {e.name: e.fisher for e in rep.layers},
        }
        out["schemes"][key] = res
        ratio = rec / rec_rand_mean if rec_rand_mean > 0 else float("inf")
        rows.append((key, len(flagged), len(names), base, allq, mixed, rec, rec_rand_mean, ratio, scan_s,
                     len(d_flag), res["recovered_default_thresholds"], corr, res["rule"], res["selection_evaluations"],
                     total_s))
        print(f"  [{key}] done: {json.dumps({k: v for k, v in res.items() if k not in ('search', 'flagged')}, default=float)}",
              file=sys.stderr)
        if a.json:  # after every scheme, so a cut-short run keeps what it measured
            a.json.write_text(json.dumps(out, indent=2, default=float) + "\n")
    # Notes first, the markdown table last (what BENCHMARKS.md takes).
    print(f"\nsensitivity benchmark · calib {a.samples}x{a.seqlen} · score {a.windows}x{a.eval_seqlen} held-out "
          f"(selection on another {a.windows}) · device {dev} · stat tokens {a.stat_tokens or 'all'}")
    for r in rows:
        k, nf, nl, b, q, m, rs, rr, ratio, s, nd, rd, corr, rule, n_ev, tot = r
        ok = rs >= 0.40 and (rr <= 0 or rs >= 2 * rr)
        print(f"{k}: target (>=40% and >=2x random): {'met' if ok else 'NOT met'}; selected by {rule} "
              f"({n_ev} selection evaluations; scan + search {tot:.1f} s); default thresholds flag {nd}/{nl} "
              f"(recover {rd:.1%})")
        if corr:
            print(f"{k}: Spearman vs per-layer dppl (n={corr['n_layers']}): "
                  + ", ".join(f"{m} {v:+.2f}" for m, v in corr.items() if m != "n_layers"))
    print()
    print("| scheme | kept FP16 | ppl base | ppl all-quantized | ppl with scan's FP16 layers | recovered (scan) "
          "| recovered (random) | scan / random | scan time | rule |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        k, nf, nl, b, q, m, rs, rr, ratio, s, nd, rd, corr, rule, n_ev, tot = r
        print(f"| {k} | {nf}/{nl} | {b:.3f} | {q:.3f} | {m:.3f} | {rs:.1%} | {rr:.1%} | {ratio:.2f}x | {s:.1f} s "
              f"| {rule} |")

if __name__ == "__main__":
    main()
