"""GPTQ speed: the whole calibration (Triton vs torch solve), the solver alone, and 8B-shaped blocks.

    python benchmarks/gptq_speed.py calib --device cuda --json gptq_calib.json
    python benchmarks/gptq_speed.py solver --device cuda --tune --json gptq_solver.json
    python benchmarks/gptq_speed.py blocks --device cuda --layers 2 --samples 128 --seqlen 2048
    # CPU smoke tests of the same code (Triton's interpreter; tiny sizes):
    TRITON_INTERPRET=1 python benchmarks/gptq_speed.py calib --device cpu --tiny --samples 4 --seqlen 32 --windows 2
    TRITON_INTERPRET=1 python benchmarks/gptq_speed.py solver --device cpu --shapes 40x96 24x200 --repeats 1

`calib`: the default model (SmolLM2-135M, bf16 on a GPU), 128 x 512 calibration windows, W4 g64
asym, GPTQ with its defaults (act-order, static groups), through `quantkit.api.quantize`, once
per solve backend in one process, every run from the same float weights. Per backend: wall
time of plain runs (the first Triton run of a process may include kernel compilation when the
Triton disk cache is cold: both runs are given), then one instrumented run with
`torch.cuda.synchronize()` around each timer: Hessian capture (GPTQ's per-step forwards with
the X^T X hooks), solve (`gptq_quantize`: factorization + column loop + error), write-back
(stacking, dequantized weights into the model, results to host), propagation (the block's
forward after quantization, plus moving the block on and off the device), other (catching the
block inputs, api overhead). Then the held-out perplexity of each result (all held-out
windows by default) and the relative difference between the backends.
`--tiny` swaps in a 2-layer random Llama (hidden 64) with the default tokenizer, so the run
finishes on a CPU under TRITON_INTERPRET=1.

`solver`: `gptq_quantize` alone on random W (bf16) and a random correlated H per shape
(out x in; W4 asym, group 128, or the largest power of 2 below that divides in; act-order unless
--no-act-order), torch vs triton: seconds (best of --repeats after a warm-up) and the
integer mismatch (max |dQ|, share of flips). `--tune` also times the block kernel alone (all
launches of one solve, no GEMMs) for a grid of tile configs (BLOCK_R x num_warps) and reports
the best next to the built-in heuristic.

`blocks`: a random Llama with the 8B shapes and a few layers through `run_layerwise`; seconds
per block (x32 for an 8B estimate).

Prints one JSON line per measurement and markdown tables last; --json writes everything.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from collections import defaultdict
from datetime import datetime, timezone

import torch

DEFAULT_SHAPES = ["960x576", "576x576", "3072x576", "576x1536", "6144x4096", "28672x4096", "4096x14336"]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _meta(dev: torch.device) -> dict:
    import triton

    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
    }


# ----------------------------------------------------------------------------- calib


class _Timers:
    """Wraps GPTQ's capture / solve / write-back and the pipeline's per-block stamps with synced timers."""

    def __init__(self, dev: torch.device):
        self.dev = dev
        self.acc: dict[str, float] = defaultdict(float)
        self.block_starts: list[float] = []
        self._undo: list = []

    def _wrap(self, owner, name: str, key: str) -> None:
        orig = getattr(owner, name)
        acc, dev = self.acc, self.dev

        def timed(*a, **k):
            _sync(dev)
            t0 = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                _sync(dev)
                acc[key] += time.perf_counter() - t0

        setattr(owner, name, timed)
        self._undo.append((owner, name, orig))

    def __enter__(self):
        import quantkit.methods.gptq as mg

        self._wrap(mg, "_capture", "capture")
        self._wrap(mg, "gptq_quantize", "solve")
        self._wrap(mg.GPTQ, "_solve_step", "solve_step")
        self._wrap(mg.GPTQ, "apply_block", "apply")
        return self

    def __exit__(self, *exc):
        for owner, name, orig in reversed(self._undo):
            setattr(owner, name, orig)

    def on_block(self, i, n, name, phase) -> None:
        _sync(self.dev)
        self.block_starts.append(time.perf_counter())

    def breakdown(self, t0: float, t1: float) -> dict:
        a = self.acc
        blocks = (t1 - self.block_starts[0]) if self.block_starts else 0.0
        return {
            "capture_s": a["capture"],
            "solve_s": a["solve"],
            "write_back_s": a["solve_step"] - a["solve"],
            "propagation_s": blocks - a["apply"],  # + block moves and the apply overhead outside the steps
            "apply_other_s": a["apply"] - a["capture"] - a["solve_step"],
            "other_s": (t1 - t0) - blocks,  # catching block inputs, api overhead before the first block
            "total_s": t1 - t0,
        }


def _tiny_model(vocab: int, dtype: torch.dtype):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def bench_calib(a) -> dict:
    from quantkit import api
    from quantkit.calib.data import calibration_set
    from quantkit.models.loading import resolve_device
    from quantkit.recipe import QuantArgs, Recipe, Scheme, Stage

    dev = torch.device(resolve_device(a.device))
    loaded = api.load(a.model, dtype=a.dtype, device=a.device)
    if a.tiny:
        from quantkit.models.loading import LoadedModel

        dt = next(loaded.model.parameters()).dtype
        loaded = LoadedModel(_tiny_model(len(loaded.tokenizer), dt), loaded.tokenizer, {"kind": "tiny random (benchmark)"})
    model, tok = loaded.model, loaded.tokenizer
    float_state = copy.deepcopy(model.state_dict())
    dtype = next(model.parameters()).dtype
    ecfg = api.EvalConfig(windows=a.windows or None, seqlen=a.seqlen)
    calib_cfg = api.CalibConfig(samples=a.samples, seqlen=a.seqlen, batch_size=a.batch_size)
    calib = calibration_set(tok, None, samples=a.samples, seqlen=a.seqlen, seed=0)
    base, windows = api.evaluate(model, tok, ecfg, device=a.device)
    print(json.dumps({"what": "baseline", "ppl": base.ppl}), flush=True)

    def recipe(backend: str) -> Recipe:
        return Recipe(Scheme(QuantArgs(4, a.group_size, False)), (Stage("gptq", {"backend": backend, "mse": False}),))  # min/max, as llm-compressor

    def run(backend: str) -> float:
        model.load_state_dict(float_state)
        _sync(dev)
        t0 = time.perf_counter()
        api.quantize(loaded, recipe(backend), calib_cfg, device=a.device, calib_set=calib)
        _sync(dev)
        return time.perf_counter() - t0

    rows = []
    for backend in a.backends:
        wall = [run(backend) for _ in range(a.runs)]
        ppl, _ = api.evaluate(model, tok, ecfg, device=a.device, windows=windows)
        with _Timers(dev) as timers:
            model.load_state_dict(float_state)
            _sync(dev)
            t0 = time.perf_counter()
            api.quantize(loaded, recipe(backend), calib_cfg, device=a.device, calib_set=calib, on_block=timers.on_block)
            _sync(dev)
            t1 = time.perf_counter()
        row = {"what": "calib", "backend": backend, "wall_s": wall, "ppl": ppl.ppl,
               "gap_pct": (ppl.ppl / base.ppl - 1) * 100, **timers.breakdown(t0, t1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if len(rows) == 2:
        rel = abs(rows[0]["ppl"] - rows[1]["ppl"]) / rows[1]["ppl"]
        for r in rows:
            r["ppl_rel_diff"] = rel
    meta = {**_meta(dev), "dtype": str(dtype), "calibration": calib.settings, "eval_windows": int(windows.shape[0]),
            "baseline_ppl": base.ppl, "group_size": a.group_size, "tiny": a.tiny}
    print(f"\n{meta['device']} · {meta['dtype']} · calib {a.samples}x{a.seqlen} · W4 g{a.group_size} asym · "
          f"GPTQ act-order · {meta['eval_windows']} held-out windows · baseline ppl {base.ppl:.4f} · {meta['date']}\n")
    print("| solve | wall s (runs in order) | instrumented s | capture | solve | write-back | propagation + moves "
          "| other | ppl | gap |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        walls = " / ".join(f"{w:.2f}" for w in r["wall_s"])
        print(f"| {r['backend']} | {walls} | {r['total_s']:.2f} | {r['capture_s']:.2f} | {r['solve_s']:.2f} | "
              f"{r['write_back_s']:.2f} | {r['propagation_s']:.2f} | {r['other_s'] + r['apply_other_s']:.2f} | "
              f"{r['ppl']:.4f} | {r['gap_pct']:+.2f}% |")
    if len(rows) == 2:
        print(f"\nppl relative difference between the backends: {rows[0]['ppl_rel_diff']:.2e}")
    return {"meta": meta, "rows": rows}


# ----------------------------------------------------------------------------- solver


def _problem(shape: str, dev: torch.device):
    out_f, in_f = (int(x) for x in shape.split("x"))
    g = torch.Generator(device=dev).manual_seed(0)
    w = torch.randn(out_f, in_f, device=dev, generator=g, dtype=torch.bfloat16) * 0.02
    n = max(2 * in_f, 512) if dev.type == "cpu" else 4096
    mix = torch.randn(in_f, in_f, device=dev, generator=g) / in_f**0.5 + torch.eye(in_f, device=dev)
    x = (torch.randn(n, in_f, device=dev, generator=g) @ mix) * torch.rand(in_f, device=dev, generator=g)
    del mix
    h = 2 * x.T @ x / n
    return w, h


def _time(fn, dev, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return best


def _tune_kernel(w, h, args, act_order: bool, dev, repeats: int) -> list[dict]:
    """The block kernel alone over one solve's blocks (no GEMMs), per tile config."""
    from quantkit.kernels.gptq import gptq_block_triton, tile_config
    from quantkit.quant.core import compute_qparams
    from quantkit.quant.gptq import _inverse_upper_cholesky

    out_f, in_f = w.shape
    hd = h.clone()
    hd.diagonal().add_(0.01 * hd.diagonal().mean())
    U, _ok = _inverse_upper_cholesky(hd)
    del hd
    W = w.float()
    scale, zero = compute_qparams(W, args, scale_dtype=w.dtype)
    g = args.group_size
    mode = "static" if act_order else "dynamic"
    gidx = (torch.randperm(in_f, device=dev) // g).to(torch.int32) if act_order else None
    Q = torch.empty(out_f, in_f, dtype=torch.int8, device=dev)
    E = torch.empty(out_f, 128, device=dev)
    sc = scale.clone()
    heur = tile_config(out_f, 128, dev)
    configs = [heur] + [{"BLOCK_R": br, "num_warps": nw} for br in (1, 2, 4, 8, 16, 32) for nw in (1, 2, 4, 8)
                        if br * 128 <= 4096 and {"BLOCK_R": br, "num_warps": nw} != heur]
    res = []
    for cfg in configs:
        def launch_all():
            for b0 in range(0, in_f, 128):
                gptq_block_triton(W, U, Q, E, sc, zero, gidx, b0, min(b0 + 128, in_f), args, mode=mode,
                                  group_size=g, scale_dtype=w.dtype, config=cfg)
        try:
            launch_all()  # compile
            secs = _time(launch_all, dev, repeats)
        except Exception as e:  # a config that does not compile or fit: say so, keep going
            res.append({**cfg, "seconds": None, "error": repr(e)[:200]})
            continue
        res.append({**cfg, "seconds": secs, "heuristic": cfg is heur})
    return res


def bench_solver(a) -> dict:
    from quantkit.quant.gptq import gptq_quantize
    from quantkit.recipe import QuantArgs

    dev = torch.device(a.device)
    rows = []
    for shape in a.shapes:
        w, h = _problem(shape, dev)
        out_f, in_f = w.shape
        args = QuantArgs(4, next(g for g in (128, 64, 32, 16, 8, 4, 2, 1) if in_f % g == 0), False)
        row = {"what": "solver", "shape": shape, "group_size": args.group_size, "act_order": a.act_order}
        res = {}
        for backend in a.backends:
            gptq_quantize(w[:, :256].contiguous(), h[:256, :256].contiguous(), args, act_order=a.act_order,
                          backend=backend)  # warm-up (compiles the kernel variants)
            out = {}

            def solve(backend=backend, out=out):
                out["r"] = gptq_quantize(w, h, args, act_order=a.act_order, backend=backend)

            row[f"{backend}_s"] = _time(solve, dev, a.repeats)
            res[backend] = out["r"]
        if len(res) == 2:
            d = (res["torch"].qt.q.int() - res["triton"].qt.q.int()).abs()
            row.update(max_dq=int(d.max()), flip_share=float((d > 0).float().mean()),
                       scales_equal=bool(torch.equal(res["torch"].qt.scale, res["triton"].qt.scale)),
                       error_rel_diff=abs(res["torch"].error - res["triton"].error) / res["torch"].error,
                       speedup=row["torch_s"] / row["triton_s"])
        del res
        if a.tune:
            row["tune"] = _tune_kernel(w, h, args, a.act_order, dev, a.repeats)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del w, h
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    meta = _meta(dev)
    print(f"\n{meta['device']} · GPTQ solve, W4 asym, act-order {a.act_order} · {meta['date']}\n")
    print("| shape (out x in) | group | torch s | triton s | speedup | max abs dQ | flip share | scales equal "
          "| error rel diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r.get("torch_s")
        k = r.get("triton_s")
        print(f"| {r['shape']} | {r['group_size']} | {t if t is None else f'{t:.4f}'} | "
              f"{k if k is None else f'{k:.4f}'} | {r.get('speedup', float('nan')):.1f}x | {r.get('max_dq', '-')} | "
              f"{r.get('flip_share', float('nan')):.2e} | {r.get('scales_equal', '-')} | "
              f"{r.get('error_rel_diff', float('nan')):.1e} |")
    if a.tune:
        print("\nBlock kernel alone (all launches of one solve, 128-column blocks), per tile config:\n")
        print("| shape | heuristic (BLOCK_R, warps) | its s | best (BLOCK_R, warps) | best s |")
        print("|---|---|---|---|---|")
        for r in rows:
            ok = [c for c in r["tune"] if c["seconds"] is not None]
            if not ok:
                print(f"| {r['shape']} | - | - | - | - |")
                continue
            hz = next((c for c in ok if c.get("heuristic")), None)
            best = min(ok, key=lambda c: c["seconds"])
            hs = "-" if hz is None else f"({hz['BLOCK_R']}, {hz['num_warps']}) | {hz['seconds'] * 1e3:.2f} ms"
            print(f"| {r['shape']} | {hs} | ({best['BLOCK_R']}, {best['num_warps']}) | {best['seconds'] * 1e3:.2f} ms |")
    return {"meta": meta, "rows": rows}


# ----------------------------------------------------------------------------- blocks


def bench_blocks(device: str, layers: int, samples: int, seqlen: int, batch_size: int, true_sequential: bool) -> dict:
    import transformers

    from quantkit.calib.pipeline import run_layerwise
    from quantkit.methods.base import get_method
    from quantkit.recipe import QuantArgs, Scheme

    cfg = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=max(seqlen, 2048),
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 32000, (samples, seqlen))
    method = get_method("gptq")(Scheme(QuantArgs(4, 128, False)), true_sequential=true_sequential, mse=False)
    stamps = []

    def on_block(i, n, name, phase):
        _sync(torch.device(device))
        stamps.append(time.perf_counter())

    t0 = time.perf_counter()
    res = run_layerwise(model, ids, [method], device=device, batch_size=batch_size, on_block=on_block)
    _sync(torch.device(device))
    t1 = time.perf_counter()
    stamps.append(t1)
    per_block = [b - a for a, b in zip(stamps, stamps[1:])]
    row = {
        "what": "blocks", "device": device, "layers": layers, "samples": samples, "seqlen": seqlen,
        "true_sequential": true_sequential, "total_seconds": t1 - t0, "block_seconds": per_block,
        "catch_seconds": stamps[0] - t0, "linears": len(res.results), "warnings": res.warnings[:3],
        "est_32_layers_seconds": (stamps[0] - t0) + 32 * (sum(per_block[1:]) / max(len(per_block) - 1, 1)
                                                           if len(per_block) > 1 else per_block[0]),
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
    }
    print(json.dumps(row), flush=True)
    return {"rows": [row]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calib", help="full calibration of the default model, Triton vs torch solve")
    c.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    c.add_argument("--device", default="cuda")
    c.add_argument("--dtype", default="auto")
    c.add_argument("--samples", type=int, default=128)
    c.add_argument("--seqlen", type=int, default=512)
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--group-size", type=int, default=64)
    c.add_argument("--windows", type=int, default=0, help="held-out windows (0 = all)")
    c.add_argument("--runs", type=int, default=2, help="plain (untimed-inside) runs per backend")
    c.add_argument("--backends", nargs="+", default=["triton", "torch"], choices=["triton", "torch"])
    c.add_argument("--tiny", action="store_true", help="a 2-layer random Llama instead of the model (CPU smoke test)")
    c.add_argument("--json", default=None)
    s = sub.add_parser("solver", help="gptq_quantize alone per shape, torch vs triton")
    s.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES)
    s.add_argument("--device", default="cuda")
    s.add_argument("--no-act-order", dest="act_order", action="store_false")
    s.add_argument("--backends", nargs="+", default=["torch", "triton"], choices=["torch", "triton"])
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--tune", action="store_true", help="also time the block kernel per tile config")
    s.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    s.add_argument("--json", default=None)
    b = sub.add_parser("blocks", help="8B-shaped blocks through the pipeline")
    b.add_argument("--device", default="cuda")
    b.add_argument("--layers", type=int, default=2)
    b.add_argument("--samples", type=int, default=128)
    b.add_argument("--seqlen", type=int, default=2048)
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--no-true-sequential", action="store_true")
    b.add_argument("--json", default=None)
    a = p.parse_args()
    if a.cmd == "calib":
        out = bench_calib(a)
    elif a.cmd == "solver":
        if a.threads:
            torch.set_num_threads(a.threads)
        out = bench_solver(a)
    else:
        out = bench_blocks(a.device, a.layers, a.samples, a.seqlen, a.batch_size, not a.no_true_sequential)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
