"""Are the selection's per-unit measurements additive? (issue 24)

The scan's knapsack adds per-unit values. This measures, on calibration-text windows of the default model (or
--model), with the scheme's RTN weights, for every selection unit (a fused q/k/v or gate/up group, or a lone
linear):
  restore gain  NLL(all quantized) - NLL(all quantized but the unit)   (what the scan's `restore` rule adds)
  alone damage  NLL(only the unit quantized) - NLL(float)
and reports each one's sum over all units as a share of the whole gap NLL(all quantized) - NLL(float): 1.0 where
the units' effects add up, far from it where they interact. Whole forwards (2 x units of them), float32.

    nice python benchmarks/unit_additivity.py --windows 4 --seqlen 256 --scheme W8A8      # CPU, ~7 min
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--windows", type=int, default=4, help="calibration-text windows (the scan's selection text)")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--scheme", default="W8A8", help="a preset (W8A8, W4A16, ...)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    import torch

    from quantkit import api
    from quantkit.calib.data import calibration_windows
    from quantkit.eval.perplexity import window_nll
    from quantkit.models.adapter import ModelAdapter
    from quantkit.recipe import PRESETS
    from quantkit.sensitivity.partial import quantized_subset
    from quantkit.sensitivity.select import selection_units

    t0 = time.perf_counter()
    loaded = api.load(a.model, device=a.device, dtype="float32")
    model = loaded.model.to(a.device).eval()
    windows = calibration_windows(loaded.tokenizer, a.seqlen, a.windows).to(a.device)
    scheme = PRESETS[a.scheme]
    names = list(ModelAdapter.for_model(model).all_linears())
    units = selection_units(names)

    def nll():
        return window_nll(model, windows, batch_size=a.batch_size).double().sum().item()

    with torch.no_grad():
        base = nll()
        with quantized_subset(model, names, scheme) as q:
            allq = nll()
            restore = []
            for u in units:
                with q.restored(u):
                    restore.append(allq - nll())
        alone = []
        for u in units:
            with quantized_subset(model, list(u), scheme):
                alone.append(nll() - base)
    gap = allq - base
    rank = lambda v: torch.tensor(v).argsort().argsort().double()  # noqa: E731
    spearman = float(torch.corrcoef(torch.stack([rank(restore), rank(alone)]))[0, 1])
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    out = {"scheme": a.scheme, "windows": a.windows, "seqlen": a.seqlen, "units": len(units),
           "ppl_float": math.exp(base / tokens), "ppl_all_quantized": math.exp(allq / tokens), "gap_nll": gap,
           "restore_sum_share": sum(restore) / gap, "alone_sum_share": sum(alone) / gap,
           "restore_negative_units": sum(v < 0 for v in restore), "alone_negative_units": sum(v < 0 for v in alone),
           "spearman_restore_alone": spearman, "seconds": time.perf_counter() - t0,
           "per_unit": [{"unit": list(u), "restore": r, "alone": d} for u, r, d in zip(units, restore, alone)]}
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")
    print(f"{a.scheme}, {a.windows} x {a.seqlen} calibration windows, {len(units)} units: gap {gap:.2f} nats "
          f"(ppl {out['ppl_float']:.4f} -> {out['ppl_all_quantized']:.4f}); single restore gains sum to "
          f"{out['restore_sum_share']:+.2f}x the gap ({out['restore_negative_units']} negative), alone damages to "
          f"{out['alone_sum_share']:+.2f}x ({out['alone_negative_units']} negative); Spearman(restore, alone) "
          f"{spearman:+.2f}; {out['seconds']:.0f} s")


if __name__ == "__main__":
    main()
