"""AWQ vs RTN at the same weight scheme: perplexity on held-out windows and run time.

Usage (default model, CPU, small):
    PYTHONPATH=$PWD nice -n 10 python benchmarks/awq_vs_rtn.py --samples 16 --seqlen 512 --windows 8
On a GPU: add --device cuda and use the full calibration size (--samples 128).
Prints one JSON object (per method: perplexity, quantize seconds; plus the fp baseline).
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="hub id or dir; default: the embedded default model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--symmetric", action="store_true")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8, help="calibration batch size")
    p.add_argument("--search-samples", type=int, default=None, help="AWQ search_samples (default: the method's)")
    p.add_argument("--no-fp", action="store_true", help="skip the unquantized baseline")
    a = p.parse_args()

    from quantkit import api
    from quantkit.calib.data import calibration_set
    from quantkit.recipe import QuantArgs, Recipe, Scheme, Stage

    scheme = Scheme(QuantArgs(bits=a.bits, group_size=a.group_size, symmetric=a.symmetric))
    awq_opts = {} if a.search_samples is None else {"search_samples": a.search_samples}
    out: dict = {"model": a.model or "default", "scheme": scheme.describe(), "samples": a.samples,
                 "seqlen": a.seqlen, "windows": a.windows, "batch_size": a.batch_size, "device": a.device, "awq_options": awq_opts}
    cfg = api.EvalConfig(seqlen=a.seqlen, windows=a.windows)
    windows = None
    loaded = api.load(a.model, device="cpu")
    calib = calibration_set(loaded.tokenizer, samples=a.samples, seqlen=a.seqlen)
    if not a.no_fp:
        ppl, windows = api.evaluate(loaded.model, loaded.tokenizer, cfg, device=a.device)
        out["fp"] = {"ppl": ppl.ppl}
    for method, opts in (("rtn", {}), ("awq", awq_opts)):
        loaded = api.load(a.model, device="cpu")
        recipe = Recipe(scheme=scheme, stages=(Stage(method, opts),))
        t = time.time()
        q = api.quantize(loaded, recipe, api.CalibConfig(batch_size=a.batch_size), device=a.device, calib_set=calib)
        secs = time.time() - t
        ppl, windows = api.evaluate(q.model, loaded.tokenizer, cfg, device=a.device, windows=windows)
        out[method] = {"ppl": ppl.ppl, "quantize_s": round(secs, 1),
                       "warnings": len(q.warnings)}
        print(json.dumps({method: out[method]}), flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
