"""The scan's `--target-fraction` selection with restore gains measured from each unit's block vs whole forwards.

One process, the default model (or --model), the same scan statistics and selection windows for both runs:
`select_fp16(..., start_at_block=True)` then `start_at_block=False`. Prints each run's wall time and forward-pass
count, the ratio, and whether the restore gains and the choice are equal (they must be: the block-started passes
compute the same numbers). Issue 24 (scan cost); runs on CPU or GPU.

    PYTHONPATH=. python benchmarks/selection_speed.py [--windows 8] [--seqlen 128] [--scheme W8A8] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--scheme", default="W8A8")
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    from quantkit import api
    from quantkit.calib.data import calibration_windows
    from quantkit.recipe import PRESETS
    from quantkit.sensitivity.scan import scan_layers
    from quantkit.sensitivity.select import select_fp16

    loaded = api.load(args.model, device=args.device)
    windows = calibration_windows(loaded.tokenizer, args.seqlen, args.windows)
    scheme = PRESETS[args.scheme]
    layers = scan_layers(loaded.model, windows[:2], scheme, batch_size=2, bins=32)
    runs = {}
    for start in (True, False):
        t0 = time.perf_counter()
        sel = select_fp16(loaded.model, layers, scheme, windows, args.fraction, folds=args.folds, device=args.device,
                          start_at_block=start)
        if args.device != "cpu":
            torch.cuda.synchronize()
        runs[start] = (time.perf_counter() - t0, sel)
        print(f"start_at_block={start}: {runs[start][0]:.1f} s, {sel.ppl['evaluations']} forward passes, "
              f"rule {sel.rule}, {len(sel.chosen)} linears", flush=True)
    (t_new, new), (t_old, old) = runs[True], runs[False]
    diff = float((new.measurements["gains"] - old.measurements["gains"]).abs().max())
    print(f"| {args.scheme} | {args.windows} x {args.seqlen} | {args.device} | whole forwards {t_old:.1f} s | "
          f"from the unit's block {t_new:.1f} s | {t_old / t_new:.2f}x | gains max diff {diff:.3g} | "
          f"same choice {new.chosen == old.chosen} |")
    return 0 if new.chosen == old.chosen else 1


if __name__ == "__main__":
    raise SystemExit(main())
