"""SpinQuant accuracy (default model) and rotation-training speed (8B-shaped random model).

Accuracy mode: baseline, W4A4KV4 {none, hadamard, learned} + GPTQ (per-channel W4, per-token
A4, per-token KV4, activations/KV simulated in torch), W4A16 g64 GPTQ alone vs hadamard+GPTQ
vs learned+GPTQ; all on the same held-out windows and one calibration set; gap closed
(W4A4KV4: share of the none->baseline gap) and rotation training time.

    python benchmarks/spinquant.py --device cuda --samples 256 --seqlen 512 --windows 40   # the tuned settings
    python benchmarks/spinquant.py --device cpu --samples 8 --seqlen 64 --windows 2 --iters 2 --val-samples 2  # CPU check
    python benchmarks/spinquant.py --device cuda --shape llama3-8b --iters 3     # s/iteration, peak memory
    python benchmarks/spinquant.py --device cuda --only w4a4kv4 --lr 1.5,0.5 --train-weights float,quantized  # sweep
    python benchmarks/spinquant.py --device cuda --only w4a4kv4 --configs "adam:1e-4:float:scale:300:8:ce;adam:1e-4:float:scale:200:8:kl"

Prints a markdown table last.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path


def _speed(args) -> None:
    import torch

    from quantkit.methods import spinquant as sq
    from quantkit.methods._spin_train import train_rotations
    from quantkit.models.random import random_model
    from quantkit.quant.rotation import normalized_hadamard
    from quantkit.recipe import PRESETS

    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    model = random_model(args.shape, dtype=dtype, device=str(dev))
    build_s = time.perf_counter() - t0
    sq.make_rotation_ready(model)
    r1, r2 = sq.initial_rotations(model, 0)
    scheme = PRESETS[args.scheme]
    from quantkit.methods.spinquant_settings import tuned_options

    # The "auto" choices resolved as `quantkit spinquant` resolves them.
    tuned = tuned_options(args.scheme, optimizer=args.optimizer.split(",")[0], estimator=args.estimator.split(",")[0],
                          objective=args.objective, iters=_int_or_auto(str(args.iters)), batch_size=args.train_batch,
                          lr=args.lr if args.lr == "auto" else float(args.lr))
    args.iters, args.train_batch = tuned["iters"], tuned["batch_size"]
    opt, est, obj = tuned["optimizer"], tuned["estimator"], tuned["objective"]
    use_act = scheme.input_activations is not None
    r4 = normalized_hadamard(model.config.intermediate_size) if use_act else None
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (max(args.train_batch, args.train_samples), args.train_seqlen),
                        generator=g)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    stage = sq.SpinQuant(scheme, rotation="learned", train_weights=args.train_weights.split(",")[0])
    stage.final = False  # as in the recipes: GPTQ follows
    quantize_weights = stage.train_quantized_weights()
    log = train_rotations(
        model, ids, scheme, r1, r2, r3=scheme.kv_cache is not None, r4=r4, iters=int(args.iters), optimizer=opt,
        lr=tuned["lr"], estimator=est,
        quantize_weights=quantize_weights, objective=obj, batch_size=args.train_batch,
        samples=args.train_samples, seqlen=args.train_seqlen, device=dev,
        on_step=lambda i, n, name, msg: print(f"{name} {i + 1}/{n}: {msg}", flush=True),
    ).log
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
    steady = [r["seconds"] for r in log[1:]] or [log[0]["seconds"]]
    print(json.dumps({"shape": args.shape, "scheme": args.scheme, "log": log, "peak_gib": peak}, indent=1))
    print()
    from quantkit.plan import GiB, ModelShape, rotation_training_bytes

    plan = sum(rotation_training_bytes(
        ModelShape.from_config(model.config.to_dict()), torch.finfo(dtype).bits // 8, seqlen=args.train_seqlen,
        quantize_weights=quantize_weights, act=use_act,
        kv=scheme.kv_cache is not None, estimator=est, batch_size=args.train_batch, objective=obj).values()) / GiB
    print(f"| shape | scheme | optimizer, estimator, weights in the loss | device | seqlen | iters | s/iter (first) | "
          "s/iter (rest, mean) | peak GPU GiB | plan estimate GiB | model build s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.shape} | {args.scheme} | {opt}, {est}, {'RTN' if quantize_weights else 'float'}, {obj}, "
          f"batch {args.train_batch} | "
          f"{_device_name(dev)} | {args.train_seqlen} | {args.iters} | "
          f"{log[0]['seconds']:.2f} | {sum(steady) / len(steady):.2f} | {peak:.1f} | {plan:.1f} | {build_s:.1f} |")


def _int_or_auto(v: str) -> int | None:
    """A number from the command line, or None for "auto" (the scheme's tuned value)."""
    return None if v == "auto" else int(v)


def _device_name(dev) -> str:
    import torch

    dev = torch.device(dev)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or 'x86'}, {torch.get_num_threads()} threads)"


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--samples", type=int, default=256, help="calibration windows (GPTQ; learned: training + held-out)")
    ap.add_argument("--seqlen", type=int, default=512, help="calibration and eval window length")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--iters", default="auto", help="rotation training steps (learned; auto: the scheme's tuned); a comma list sweeps")
    ap.add_argument("--optimizer", default="auto", help="learned: cayley-sgd|adam|auto; a comma list sweeps")
    ap.add_argument("--lr", default="auto", help="learned: learning rate (auto: the optimizer's); a comma list sweeps")
    ap.add_argument("--train-weights", default="auto", help="learned: auto|quantized|float; a comma list sweeps")
    ap.add_argument("--estimator", default="auto", help="learned: ste|scale|auto; a comma list sweeps")
    ap.add_argument("--configs", default=None,
                    help='learned W4A4KV4 rows instead of the product: "opt:lr:weights:est[:iters[:batch[:objective]]];..."')
    ap.add_argument("--w4a16-configs", default=None, help='learned W4A16 rows: "opt:lr:weights:est[:batch[:objective]];..."')
    ap.add_argument("--train-batch", type=int, default=None, help="learned: sequences per training step (default: tuned)")
    ap.add_argument("--objective", default="auto", help="learned: ce|kl|auto (the scheme's tuned one)")
    ap.add_argument("--val-samples", type=int, default=24, help="learned: held-out calibration sequences")
    ap.add_argument("--val-every", type=int, default=20)
    ap.add_argument("--train-samples", type=int, default=None, help="training sequences (default: --samples)")
    ap.add_argument("--train-seqlen", type=int, default=None, help="training length (default: --seqlen; 2048 for --shape)")
    ap.add_argument("--shape", default=None, help="speed mode: a random-weight shape (llama3-8b, tiny)")
    ap.add_argument("--scheme", default="W4A4KV4", help="speed mode: W4A4KV4 or W4A16")
    ap.add_argument("--only", default=None, help="comma list of rows to run: w4a4kv4,w4a16")
    ap.add_argument("--json", type=Path)
    return ap.parse_args()


def main() -> None:
    args = _parse_args()
    if args.shape:
        args.train_samples = args.train_samples or 1
        args.train_seqlen = args.train_seqlen or 2048
        return _speed(args)
    args.train_samples = args.train_samples or args.samples
    args.train_seqlen = args.train_seqlen or args.seqlen

    from quantkit import api
    from quantkit.calib.data import calibration_set
    from quantkit.methods.spinquant_settings import build_recipe
    from quantkit.models.loading import resolve_device
    from quantkit.recipe import Recipe, Stage

    dev = resolve_device(args.device)
    base = api.load(args.model, dtype=args.dtype, device="cpu")
    eval_cfg = api.EvalConfig(seqlen=args.seqlen, windows=args.windows or None, batch_size=4)
    calib = calibration_set(base.tokenizer, None, samples=args.samples, seqlen=args.seqlen, seed=0)
    ccfg = api.CalibConfig(samples=args.samples, seqlen=args.seqlen, batch_size=args.batch_size)
    t_all = time.perf_counter()
    res, windows = api.evaluate(base.model, base.tokenizer, eval_cfg, device=dev)
    baseline = res.ppl
    rows: list[dict] = [{"row": "baseline (float)", "ppl": baseline, "quantize_s": 0.0, "train_s": 0.0}]
    only = set((args.only or "w4a4kv4,w4a16").split(","))

    def run(label: str, recipe: Recipe) -> dict:
        loaded = api.load(args.model, dtype=args.dtype, device="cpu")
        t0 = time.perf_counter()
        qm = api.quantize(loaded, recipe, ccfg, device=str(dev), calib_set=calib)
        q_s = time.perf_counter() - t0
        with api.simulation(qm):
            r, _ = api.evaluate(qm.model, loaded.tokenizer, eval_cfg, device=dev, windows=windows)
        tr = qm.training.get("spinquant", {})
        log = tr.get("log", [])
        row = {"row": label, "ppl": r.ppl, "quantize_s": q_s,
               "train_s": sum(x["seconds"] + x.get("val_seconds", 0.0) for x in log),
               "train_iters": len(log), "loss_first": log[0]["loss"] if log else None,
               "loss_last": log[-1]["loss"] if log else None,
               "orth_max": max((max(x["orth_r1"], x["orth_r2"]) for x in log), default=None),
               **{k: tr[k] for k in ("best_step", "start_val_loss", "best_val_loss", "quantized_weights") if k in tr}}
        print(json.dumps(row), flush=True)
        rows.append(row)
        del loaded, qm
        return row

    kw = dict(train_samples=args.train_samples, train_seqlen=args.train_seqlen, val_samples=args.val_samples,
              val_every=args.val_every)
    grid = _learned_grid(args)

    def learned(scheme, it, o, lr, tw, est, bs=None, obj="auto"):
        return build_recipe(scheme, "learned", "gptq", iters=it, optimizer=o, lr=lr, train_weights=tw, estimator=est,
                            train_batch=bs, objective=obj, **kw)

    if "w4a4kv4" in only:
        for rot in ("none", "hadamard"):
            run(f"W4A4KV4 {rot} + GPTQ", build_recipe("W4A4KV4", rot, "gptq", **kw))
        for cfg in grid:
            run(learned_label("W4A4KV4", len(grid) > 1, *cfg), learned("W4A4KV4", *cfg))
    if "w4a16" in only:
        gptq_only = build_recipe("W4A16", "none", "gptq", **kw)
        run("W4A16 g64 GPTQ alone", Recipe(gptq_only.scheme, (Stage("gptq"),), gptq_only.ignore))
        run("W4A16 g64 hadamard + GPTQ", build_recipe("W4A16", "hadamard", "gptq", **kw))
        # weight-only: no activation quantization (the estimator has nothing to act on), and a float-weight
        # loss does not depend on the rotation: those rows collapse onto quantized-weight ones
        w16 = args.w4a16_configs.split(";") if args.w4a16_configs else None
        cfgs = ([tuple(c.split(":")) for c in w16] if w16 else
                [(o, lr, "quantized", "ste") for _, o, lr, *_ in grid])
        cfgs = list(dict.fromkeys(cfgs))
        for o, lr, tw, est, *rest in cfgs:
            it = _int_or_auto(str(args.iters).split(",")[0])
            lr = lr if lr == "auto" else float(lr)
            bs, obj = (int(rest[0]) if rest else args.train_batch), (rest[1] if len(rest) > 1 else args.objective)
            run(learned_label("W4A16 g64", len(cfgs) > 1, it, o, lr, tw, est, bs, obj),
                learned("W4A16", it, o, lr, tw, est, bs, obj))

    _report(args, rows, baseline, dev, time.perf_counter() - t_all)


def learned_label(prefix: str, many: bool, it: int, o: str, lr, tw: str, est: str, bs=None, obj="auto") -> str:
    """The row's name; with several learned rows of the scheme (`many`) it spells out their settings."""
    lr_s = lr if lr == "auto" else f"{lr:g}"
    return f"{prefix} learned + GPTQ" + (f" ({o}, {it} it, lr {lr_s}, weights {tw}, {est}, batch {bs or 'auto'}, "
                                          f"{obj})" if many else "")


def _learned_grid(args) -> list[tuple]:
    """The learned W4A4KV4 rows: one per (iters, optimizer, lr, train-weights, estimator) combination of the
    comma lists, or the ";"-separated list of --configs, each "optimizer:lr:weights:estimator[:iters]"."""
    if not args.configs:
        return [(_int_or_auto(i), o, lr if lr == "auto" else float(lr), tw, est, args.train_batch, args.objective)
                for i in str(args.iters).split(",")
                for o in args.optimizer.split(",") for lr in str(args.lr).split(",")
                for tw in args.train_weights.split(",") for est in args.estimator.split(",")]
    grid = []
    for c in args.configs.split(";"):
        o, lr, tw, est, *rest = c.split(":")  # [:iters[:batch[:objective]]]
        it = _int_or_auto(rest[0] if rest else str(args.iters).split(",")[0])
        grid.append((it, o, lr if lr == "auto" else float(lr), tw, est,
                     int(rest[1]) if len(rest) > 1 else args.train_batch, rest[2] if len(rest) > 2 else args.objective))
    return grid


def _report(args, rows: list[dict], baseline: float, dev, wall_s: float) -> None:
    """The JSON summary (--json) and the markdown table, with each row's share of the gap it closes."""
    by = {r["row"]: r["ppl"] for r in rows}
    notes = {}
    none4, had4 = by.get("W4A4KV4 none + GPTQ"), by.get("W4A4KV4 hadamard + GPTQ")
    g = by.get("W4A16 g64 GPTQ alone")
    for label, p in by.items():
        if none4 is not None and label.startswith("W4A4KV4") and label != "W4A4KV4 none + GPTQ":
            notes[label] = f"closes {(none4 - p) / (none4 - baseline) * 100:.2f}% of the none gap"
            if had4 is not None and label != "W4A4KV4 hadamard + GPTQ":
                # the (and the paper's vs QuaRot) measure: how much of Hadamard's remaining gap it removes
                notes[label] += f"; removes {(1 - (p - baseline) / (had4 - baseline)) * 100:+.1f}% of hadamard's gap"
        if g is not None and label.startswith("W4A16 g64") and label != "W4A16 g64 GPTQ alone":
            notes[label] = f"{(p / g - 1) * 100:+.2f}% vs GPTQ alone"
    summary = {"device": _device_name(dev), "samples": args.samples, "seqlen": args.seqlen, "windows": args.windows,
               "iters": args.iters, "lr": args.lr, "train_samples": args.train_samples,
               "train_seqlen": args.train_seqlen, "rows": rows, "wall_s": wall_s}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print()
    print(f"SpinQuant on {args.model or 'SmolLM2-135M-Instruct'}, {_device_name(dev)}; calibration {args.samples} x "
          f"{args.seqlen}, eval {args.windows} windows x {args.seqlen}; learned: {args.iters} iters, lr {args.lr}, "
          f"{args.train_samples} x {args.train_seqlen} training tokens")
    print()
    print("| row | ppl | vs baseline | note | quantize s | training s (s/iter) | train loss first -> last | "
          "held-out loss start -> kept (step) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        it = r.get("train_iters") or 0
        tr = f"{r['train_s']:.1f} ({r['train_s'] / it:.2f})" if it else ""
        loss = f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}" if it else ""
        held = (f"{r['start_val_loss']:.3f} -> {r['best_val_loss']:.3f} ({r['best_step'] + 1})"
                if r.get("best_val_loss") is not None else "")
        print(f"| {r['row']} | {r['ppl']:.4f} | {(r['ppl'] / baseline - 1) * 100:+.2f}% | {notes.get(r['row'], '')} | "
              f"{r['quantize_s']:.1f} | {tr} | {loss} | {held} |")


if __name__ == "__main__":
    main()
