"""Sensitivity scan benchmark (issue 24): what a user gets, on text the scan never saw.

For each scheme the path a user takes, in one process (the same functions the commands call):

  1. `quantkit scan --target-fraction F` (api.scan -> sensitive_layers.json): the choice is made on
     calibration text only (the builtin corpus's first half), with cross-validation;
  2. the method command with `--sensitive` (api.quantize(sensitive=...) -> api.export): fused
     siblings are kept with their group, and the FP16 count after that is what is reported and
     held against the budget;
  3. `quantkit eval` of the exported checkpoint (api.load(ckpt) + plan_simulation + api.evaluate) on
     texts the scan never read: the builtin's second half (pydoc) and Python standard-library source
     (another domain; `builtin:code`, quantkit.calib.data.HELDOUT).
  Against: the same method with no --sensitive (all quantized), and --draws random selections of the
  same FP16 count made the same way (whole fused units, through --sensitive), and (--score-rules, on by
  default) every other candidate rule's final choice, scored the same way: which rule carries over.

Rows (--schemes): W4A16g64 = W4 g64 asym RTN (`quantkit rtn --bits 4 --group-size 64 --asym`), W8A8 = naive
W8A8 (W8 per channel, A8 per token, RTN: a recipe `{scheme: W8A8, stages: [rtn]}`), GPTQ = `quantkit gptq`
(W4 g64 asym, act-order) with a scan made for it (`quantkit scan --method gptq`: the restore gains measured on
GPTQ's weights), its random draws through GPTQ too. With W4A16g64 run, also GPTQ with the W4A16g64 RTN scan's
file (--gptq-rtn-file; the row issue 24 measured first). recovered = (ppl_allq - ppl_mixed) / (ppl_allq - ppl_float).
Targets: recovered >= 40% and >= 2x the random mean (RTN W4A16, W8A8) on each text; GPTQ + scan removes
>= 25% of GPTQ's gap.

    python benchmarks/sensitivity.py --device cuda            # full size: every held-out window (GPU)
    nice python benchmarks/sensitivity.py --device cpu --samples 16 --seqlen 256 --eval-seqlen 256 \\
        --select-windows 8 --windows 8 --ood-windows 8 --schemes W4A16g64   # CPU, small
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

TEXTS = ("pydoc held-out (2nd half)", "Python stdlib source")
# row -> scheme, method (of the scan and the user's command), target: least share of the gap recovered on every
# text, least multiple of the random mean (None: no ratio target)
ROWS = {"W4A16g64": ("W4A16g64", "rtn", 0.40, 2.0), "W8A8": ("W8A8", "rtn", 0.40, 2.0),
        "GPTQ": ("W4A16g64", "gptq", 0.25, None)}


def log(msg: str) -> None:
    print(f"  {msg}", file=sys.stderr, flush=True)


def random_units(units: list[tuple[str, ...]], count: int, seed: int) -> list[str]:
    """Whole fused units drawn at random until they hold exactly `count` linears (lone linears fill up)."""
    order = list(units)
    random.Random(seed).shuffle(order)
    out, left = [], count
    for u in order:
        if len(u) <= left:
            out += u
            left -= len(u)
    return out


def with_flags(scan_json: Path, fp16: list[str], path: Path) -> Path:
    """A copy of the scan's sensitive_layers.json that flags exactly `fp16`."""
    d = json.loads(scan_json.read_text())
    label = next(e["flag"] for e in d["layers"] if e["flag"] != "fp16")
    keep = set(fp16)
    for e in d["layers"]:
        e["flag"] = "fp16" if e["name"] in keep else label
    path.write_text(json.dumps(d))
    return path


def _ratio(r: float) -> str:
    return f"{r:.2f}x" if r != float("inf") else "n/a (random <= 0)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--samples", type=int, default=128, help="calibration windows (scan statistics, GPTQ)")
    ap.add_argument("--calib", default=None, help="calibration text of the scan, its selection and the methods "
                    "(default: builtin, i.e. builtin:pydoc; e.g. builtin:mix)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-seqlen", type=int, default=512, help="tokens per window (selection and scoring)")
    ap.add_argument("--eval-batch-size", type=int, default=8, help="windows per forward (selection and scoring)")
    ap.add_argument("--select-windows", type=int, default=64,
                    help="calibration-text windows the scan chooses on (0 = all; default: the scan's)")
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--shortlist", type=int, default=None, help="units whose restore gain is measured (default all)")
    ap.add_argument("--cross-fit", action=argparse.BooleanOptionalAction, default=None,
                    help="scans with --method gptq: GPTQ once per fold without the samples sharing its windows' text "
                    "(default: the scan's, on for GPTQ without --greedy)")
    ap.add_argument("--greedy", type=int, default=None,
                    help="also try the selection's greedy rule, re-measuring N candidates per pick (default off)")
    ap.add_argument("--fisher-windows", type=int, default=1, help="> 0: the gradient-weighted rule too (0 = off)")
    ap.add_argument("--stat-tokens", type=int, default=16384)
    ap.add_argument("--windows", type=int, default=0, help="pydoc held-out windows scored (0 = all)")
    ap.add_argument("--ood-windows", type=int, default=0, help="other-domain windows scored (0 = as many as pydoc's)")
    ap.add_argument("--fraction", type=float, default=0.10)
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--score-rules", action=argparse.BooleanOptionalAction, default=True,
                    help="also score each other candidate rule's final choice on the held-out texts (one more "
                    "method run + export + eval per rule whose choice differs): which rule carries over to unseen text")
    ap.add_argument("--schemes", default="W4A16g64,W8A8,GPTQ", help=f"rows, of {', '.join(ROWS)}")
    ap.add_argument("--gptq-rtn-file", action=argparse.BooleanOptionalAction, default=True,
                    help="with W4A16g64: also GPTQ with the W4A16g64 (RTN) scan's file")
    ap.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/sensitivity-<device>-<date>.json")
    a = ap.parse_args()

    import dataclasses

    import torch

    from quantkit import api
    from quantkit.calib.data import CODE_MODULES, calibration_set, heldout_windows
    from quantkit.models.loading import resolve_device
    from quantkit.recipe import PRESETS, Recipe, Stage
    from quantkit.runtime.simulate import plan_simulation
    from quantkit.sensitivity.io import save_sensitive_layers
    from quantkit.sensitivity.partial import recovered_fraction
    from quantkit.sensitivity.select import selection_units

    t_start = time.perf_counter()
    dev = torch.device(resolve_device(a.device))
    w4 = dataclasses.replace(PRESETS["W4A16"].weights, group_size=64, symmetric=False)
    schemes = {"W4A16g64": dataclasses.replace(PRESETS["W4A16"], weights=w4), "W8A8": PRESETS["W8A8"]}
    keys = [k for k in a.schemes.split(",") if k]
    if not keys or set(keys) - set(ROWS):
        ap.error(f"--schemes {a.schemes!r}: give some of {', '.join(ROWS)}")
    loaded = api.load(a.model, dtype=a.dtype, device=a.device)
    model, tok = loaded.model, loaded.tokenizer
    float_state = copy.deepcopy(model.state_dict())
    tmp = Path(tempfile.mkdtemp(prefix="qk-sens-"))
    pydoc = heldout_windows(tok, a.eval_seqlen, a.windows or None)
    ood = heldout_windows(tok, a.eval_seqlen, a.ood_windows or pydoc.shape[0], spec="builtin:code")
    wins = dict(zip(TEXTS, (pydoc, ood)))
    cfgs = {TEXTS[0]: api.EvalConfig(seqlen=a.eval_seqlen, batch_size=a.eval_batch_size),
            TEXTS[1]: api.EvalConfig(data="builtin:code", seqlen=a.eval_seqlen, batch_size=a.eval_batch_size)}
    calib_cfg = api.CalibConfig(data=a.calib, samples=a.samples, seqlen=a.seqlen, batch_size=a.batch_size)
    calib = calibration_set(tok, a.calib, samples=a.samples, seqlen=a.seqlen, seed=0)

    def score(m) -> dict[str, float]:
        return {t: api.evaluate(m, tok, cfgs[t], device=a.device, windows=w)[0].ppl for t, w in wins.items()}

    def reset() -> None:
        model.load_state_dict(float_state)
        model.to("cpu")

    def user_path(recipe, sensitive: Path | None, tag: str) -> dict:
        """method command (--sensitive) -> export -> quantkit eval of the checkpoint; ppl per text."""
        reset()
        t0 = time.perf_counter()
        qm = api.quantize(loaded, recipe, calib_cfg, device=a.device, calib_set=calib, sensitive=sensitive)
        fp16 = len((qm.sensitivity or {}).get("fp16_exported", []))
        ckpt = api.export(qm, tmp / f"ckpt-{tag}")
        del qm
        ck = api.load(str(ckpt), device=a.device)
        plan = plan_simulation(ck, device=a.device)
        with plan.context(ck.model):
            ppl = score(ck.model)
        del ck
        shutil.rmtree(ckpt, ignore_errors=True)
        log(f"{tag}: {fp16} FP16 linears, ppl " + ", ".join(f"{k} {v:.4f}" for k, v in ppl.items())
            + f" ({time.perf_counter() - t0:.1f} s)")
        return {"ppl": ppl, "fp16_linears": fp16}

    reset()
    base = score(model)
    log("float: " + ", ".join(f"{k} {v:.4f}" for k, v in base.items()))
    out: dict = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else (platform.processor() or "cpu"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "texts": {TEXTS[0]: {"windows": int(pydoc.shape[0]), "source": "builtin eval half (pydoc_data.topics, 2nd half)"},
                  TEXTS[1]: {"windows": int(ood.shape[0]), "source": f"inspect.getsource of {', '.join(CODE_MODULES)}"}},
        "ppl_float": base, "schemes": {},
    }
    path = a.json or ROOT / "benchmarks" / "results" / f"sensitivity-{dev.type}-{out['date'][:10]}.json"
    scan_files: dict[str, Path] = {}
    rows = []
    for key in keys:
        scheme, method = schemes[ROWS[key][0]], ROWS[key][1]
        reset()
        t0 = time.perf_counter()
        rep = api.scan(loaded, scheme, calib_cfg, device=a.device, target_fraction=a.fraction,
                       eval_cfg=api.EvalConfig(seqlen=a.eval_seqlen, batch_size=a.eval_batch_size), stat_tokens=a.stat_tokens or None,
                       shortlist=a.shortlist, greedy=a.greedy, fisher_windows=a.fisher_windows, select_windows=a.select_windows or None,
                       folds=a.folds, method=method, cross_fit=a.cross_fit if method != "rtn" else False,
                       on_step=lambda m, k=key: log(f"[{k}] {m}") if "fold" not in m else None)
        scan_s = time.perf_counter() - t0
        sl = save_sensitive_layers(rep, tmp / f"sl-{key}.json")
        scan_files[key] = sl
        names = [e.name for e in rep.layers]
        units = selection_units(names)
        log(f"[{key}] scan + selection {scan_s:.1f} s: {len(rep.flagged)} linears by {rep.ppl['rule']}, "
            f"expected {rep.ppl['expected']['recovered']:.1%}")
        recipe = Recipe(scheme, (Stage(method),))
        allq = user_path(recipe, None, f"{key}-all")
        mixed = user_path(recipe, sl, f"{key}-scan")
        rand = [user_path(recipe, with_flags(sl, random_units(units, mixed["fp16_linears"], s), tmp / f"r{s}.json"),
                          f"{key}-random{s}") for s in range(a.draws)]
        # every candidate rule's own final choice, scored the same way (the chosen rule's is `mixed`)
        def scored(r: dict, same: bool) -> dict:
            return {"ppl": r["ppl"], "fp16_linears": r["fp16_linears"], "same_as_chosen": same,
                    "recovered": {t: recovered_fraction(base[t], allq["ppl"][t], r["ppl"][t]) for t in TEXTS}}

        by_rule = {}
        for c in rep.search if a.score_rules else []:
            if c["rule"] == rep.ppl["rule"] or not c["layers"]:
                continue
            same = sorted(c["layers"]) == sorted(rep.flagged)
            r = mixed if same else user_path(recipe, with_flags(sl, c["layers"], tmp / f"rule-{c['rule']}.json"),
                                             f"{key}-rule-{c['rule']}")
            by_rule[c["rule"]] = scored(r, same)
        cands = [{k: c.get(k) for k in ("rule", "cv_recovered", "per_fold", "fold_nll", "beats_default", "layers")}
                 for c in rep.search]
        res = {"label": f"{ROWS[key][0]} {method.upper()}", "scan_method": rep.method, "scan_seconds": scan_s,
               "n_linears": len(names), "budget": rep.ppl["budget"], "rule": rep.ppl["rule"],
               "expected": rep.ppl["expected"], "selection": {k: rep.ppl[k] for k in
                                                              ("baseline", "all_quantized", "mixed", "recovered",
                                                               "evaluations", "selection_windows")},
               "candidates": cands,
               "rule_why": rep.ppl.get("rule_why"),
               "rule_scores": by_rule,
               "flagged": rep.flagged, "all": allq, "scan": mixed, "random": rand, "texts": {}}
        for t in TEXTS:
            rec = recovered_fraction(base[t], allq["ppl"][t], mixed["ppl"][t])
            rr = [recovered_fraction(base[t], allq["ppl"][t], r["ppl"][t]) for r in rand]
            rm = statistics.mean(rr) if rr else float("nan")
            res["texts"][t] = {"recovered_scan": rec, "recovered_random": rr, "recovered_random_mean": rm,
                               "ratio": rec / rm if rm > 0 else float("inf")}
            rows.append((key, t, res, rec, rr, rm))
        out["schemes"][key] = res
        path.parent.mkdir(parents=True, exist_ok=True)
        if rep.selection_data:  # what the selection rules read, to replay their choices offline
            from safetensors.torch import save_file

            res["selection_data"] = path.with_name(f"{path.stem}-{key}-selection.safetensors").name
            res["selection_units"] = [list(u) for u in units]
            save_file({k: v.contiguous() for k, v in rep.selection_data.items()}, path.parent / res["selection_data"])
        path.write_text(json.dumps(out, indent=2, default=float) + "\n")  # after every scheme: a cut run keeps it
    gptq_rows = []
    if a.gptq_rtn_file and "W4A16g64" in scan_files:
        recipe = Recipe(schemes["W4A16g64"], (Stage("gptq"),))
        gptq_only = out["schemes"]["GPTQ"]["all"] if "GPTQ" in out["schemes"] else user_path(recipe, None, "gptq-all")
        mixed = user_path(recipe, scan_files["W4A16g64"], "gptq-rtn-file")
        g = {"alone": gptq_only, "scan": mixed, "texts": {}}
        for t in TEXTS:
            g["texts"][t] = {"removed": recovered_fraction(base[t], gptq_only["ppl"][t], mixed["ppl"][t])}
            gptq_rows.append((t, gptq_only, mixed, g["texts"][t]["removed"]))
        out["gptq_rtn_file"] = g
    out["seconds"] = time.perf_counter() - t_start
    path.write_text(json.dumps(out, indent=2, default=float) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nsensitivity benchmark · {out['device']} · {out['date']} · calib {a.calib or 'builtin'} {a.samples}x{a.seqlen} · selection on "
          f"{a.select_windows or 'all'} calibration-text windows x {a.eval_seqlen}, {a.folds} folds · scored on "
          f"{pydoc.shape[0]} pydoc held-out + {ood.shape[0]} stdlib-source windows x {a.eval_seqlen} · "
          f"{a.draws} random draws · {out['seconds']:.0f} s · {path}")
    for key, res in out["schemes"].items():
        least, times = ROWS[key][2:]
        ok = all(res["texts"][t]["recovered_scan"] >= least and (times is None or res["texts"][t]["ratio"] >= times)
                 for t in TEXTS)
        goal = f">={least:.0%}" + (f" and >={times:g}x random" if times is not None else "")
        print(f"{res['label']}: {res['scan']['fp16_linears']}/{res['n_linears']} FP16 after sibling expansion (budget "
              f"{res['budget']}), rule {res['rule']}, scan expected {res['expected']['recovered']:.1%}; "
              f"target ({goal} on every text): {'met' if ok else 'NOT met'}")
    print()
    print("| scheme | text | ppl float | all quantized | scan FP16 | random FP16 (mean) | FP16 linears | "
          "scan recovers | random recovers | scan / random | scan expected |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for key, t, res, rec, rr, rm in rows:
        q, m = res["all"]["ppl"][t], res["scan"]["ppl"][t]
        r = statistics.mean(x["ppl"][t] for x in res["random"]) if res["random"] else float("nan")
        sd = f" ± {statistics.stdev(rr):.0%}" if len(rr) > 1 else ""
        print(f"| {res['label']} | {t} | {base[t]:.3f} | {q:.3f} ({q / base[t] - 1:+.1%}) | {m:.3f} ({m / base[t] - 1:+.1%}) "
              f"| {r:.3f} ({r / base[t] - 1:+.1%}) | {res['scan']['fp16_linears']}/{res['n_linears']} | {rec:.1%} "
              f"| {rm:.1%}{sd} | {_ratio(res['texts'][t]['ratio'])} | {res['expected']['recovered']:.1%} |")
    for t, gptq_only, mixed, removed in gptq_rows:
        q, m = gptq_only["ppl"][t], mixed["ppl"][t]
        print(f"| W4A16g64 GPTQ, RTN scan's file | {t} | {base[t]:.3f} | {q:.3f} ({q / base[t] - 1:+.1%}) | {m:.3f} "
              f"({m / base[t] - 1:+.1%}) | - | {mixed['fp16_linears']} | {removed:.1%} (target >= 25%) | - | - | - |")
    scored = [(key, res) for key, res in out["schemes"].items() if res.get("rule_scores")]
    if scored:
        print("\nEvery candidate rule's final choice on the held-out texts (cross-validated estimate on the "
              "calibration windows; * = the rule the scan chose):\n")
        print("| scheme | rule | CV expected | beats the default in every fold | "
              + " | ".join(f"{t} recovers" for t in TEXTS) + " |")
        print("|---|---|---|---|" + "---|" * len(TEXTS))
        for key, res in scored:
            for c in res["candidates"]:
                if c["rule"] == res["rule"]:
                    rec = [res["texts"][t]["recovered_scan"] for t in TEXTS]
                elif c["rule"] in res["rule_scores"]:
                    rec = [res["rule_scores"][c["rule"]]["recovered"][t] for t in TEXTS]
                else:
                    continue
                star = "*" if c["rule"] == res["rule"] else ""
                beats = {None: "(default)", True: "yes", False: "no"}[c.get("beats_default")]
                cv = f"{c['cv_recovered']:.1%}" if c["cv_recovered"] is not None else "-"
                print(f"| {res['label']} | {c['rule']}{star} | {cv} | {beats} | "
                      + " | ".join(f"{v:.1%}" for v in rec) + " |")


if __name__ == "__main__":
    main()
