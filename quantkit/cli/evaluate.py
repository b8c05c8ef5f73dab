"""`quantkit eval`: held-out perplexity of a model or checkpoint, optionally against a baseline."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from quantkit.cli.options import DeviceOpt, DtypeOpt, TrustOpt
from quantkit.cli.runtime_options import FallbackLayersOpt, HistOpt, KLOpt, LatentCacheOpt, SkewOpt, fallback_layers
from quantkit.cli.ui import console, handle_errors, status


@handle_errors
def eval_cmd(
    models: Annotated[
        Optional[list[str]],
        typer.Option("--model", "-m", help="Model or checkpoint dir to score; repeat to score several. Omitted: default."),
    ] = None,
    baseline: Annotated[
        Optional[str], typer.Option("--baseline", help="Also score this model (or 'default') on the same windows.")
    ] = None,
    data: Annotated[
        Optional[str], typer.Option("--data", help="Held-out text: builtin (default; = builtin:pydoc), builtin:code, builtin:prose, .txt/.jsonl, hf:NAME[:CONFIG[:SPLIT]].")
    ] = None,
    field: Annotated[str, typer.Option("--data-field", help="Text field for .jsonl and hf: data.")] = "text",
    seqlen: Annotated[int, typer.Option("--seqlen", help="Tokens per window.")] = 512,
    windows: Annotated[int, typer.Option("--windows", help="Windows to score (0 = all).")] = 40,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward.")] = 4,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the results here as JSON.")] = None,
    simulate_act: Annotated[
        str,
        typer.Option(
            "--simulate-act",
            help="Simulate A8 input activations: auto (a quantkit checkpoint's scheme), none, token, static.",
        ),
    ] = "auto",
    simulate_kv: Annotated[
        str,
        typer.Option(
            "--simulate-kv",
            help="Simulate an INT8 KV cache: auto, none, int8-dynamic, int8-static, int8-static-residual.",
        ),
    ] = "auto",
    kv_tau: Annotated[float, typer.Option("--kv-tau", help="Outlier threshold for KV residuals (x mean error).")] = 3.0,
    calib_samples: Annotated[
        int, typer.Option("--calib-samples", help="Calibration windows for static scales a model does not carry.")
    ] = 16,
    use_runtime: Annotated[
        bool, typer.Option("--runtime", help="Score quantkit checkpoints through the runtime's real kernels (packed weights, INT8 KV cache) instead of the simulation.")
    ] = False,
    fallback: Annotated[
        bool, typer.Option("--fallback/--no-fallback", help="With --runtime: the online fallback monitor (windows run in 64-token chunks).")
    ] = False,
    fallback_layers_: FallbackLayersOpt = None,
    kl_threshold: KLOpt = 0.02,
    skew_threshold: SkewOpt = 3.0,
    hist: HistOpt = None,
    latent_cache: LatentCacheOpt = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustOpt = False,
) -> None:
    """Perplexity on held-out text (default: second half of the built-in corpus).

    W8A8 / INT8-KV checkpoints written by quantkit are scored with their activation
    and KV quantization simulated in torch (--simulate-act/--simulate-kv auto), or with
    --runtime through the runtime's kernels (packed weights, real INT8 KV cache)."""
    from quantkit.api import EvalConfig
    from quantkit.errors import UsageError
    from quantkit.validate import check_eval_options, check_float

    for flag, on in (("--fallback", fallback), ("--latent-cache", latent_cache)):
        if on and not use_runtime:
            raise UsageError(f"{flag} needs --runtime (it is a setting of the runtime)")
    # Everything that can be refused without loading a model: one line, exit 2, before any work.
    check_eval_options(
        seqlen=seqlen, windows=windows, batch_size=batch_size, json_out=json_out, data=data, dtype=dtype,
        device=device, kv_tau=kv_tau, calib_samples=calib_samples,
        models=([baseline] if baseline else []) + list(models or [None]),
    )
    if fallback or use_runtime:
        check_float("--kl-threshold", kl_threshold, min=0, min_open=True)
        check_float("--skew-threshold", skew_threshold, min=0, min_open=True)
    cfg = EvalConfig(data=data, field=field, seqlen=seqlen, windows=windows or None, batch_size=batch_size)

    def score(role: str, spec: str | None):
        if role == "model" and use_runtime:
            return _eval_runtime(spec, cfg, device, dtype, fallback=fallback, layers=fallback_layers(fallback_layers_),
                                 hist=hist, kl_threshold=kl_threshold, skew_threshold=skew_threshold,
                                 latent_cache=latent_cache)
        return _eval_dense(role, spec, cfg, device, dtype, trust_remote_code, simulate_act, simulate_kv, kv_tau,
                           calib_samples, seqlen)

    jobs = ([("baseline", baseline)] if baseline else []) + [("model", m) for m in (models or [None])]
    rows = _score_rows(jobs, score)
    from quantkit.run import peak_rss_mib

    result = {"seqlen": seqlen, "data": data or "builtin", "rows": rows, "peak_rss_mib": peak_rss_mib()}
    if baseline:
        for r in rows[1:]:
            r["ratio_to_baseline"] = r["ppl"] / rows[0]["ppl"]
    console.print(_table(rows, seqlen, bool(baseline)))
    if json_out is not None:
        from quantkit.run import write_text_atomic

        write_text_atomic(json_out, json.dumps(result, indent=2) + "\n")


def _score_rows(jobs, score) -> list[dict]:
    """One row per (role, model) job, each scored by `score(role, spec)` on the same held-out windows."""
    import torch

    from quantkit.errors import UsageError

    rows, ref_windows = [], None
    for role, spec in jobs:
        t0 = time.perf_counter()
        res, win, extra = score(role, spec)
        if ref_windows is not None and not torch.equal(ref_windows, win):
            raise UsageError("the two models tokenize the held-out text differently; compare models that share a tokenizer")
        ref_windows = win
        rows.append(
            {"role": role, "model": spec or "default", **res.to_dict(), **extra, "seconds": time.perf_counter() - t0}
        )
    return rows


def _table(rows: list[dict], seqlen: int, baseline: bool):
    from rich.table import Table

    t = Table(title=f"held-out perplexity ({rows[0]['windows']} windows x {seqlen} tokens)")
    for col in ("role", "model", "simulated", "perplexity", "vs baseline", "seconds"):
        t.add_column(col)
    for r in rows:
        rel = f"{(r['ppl'] / rows[0]['ppl'] - 1) * 100:+.2f}%" if baseline else ""
        simd = r["simulated"]
        if "patched_fraction" in r and r["patched_fraction"]:
            simd += f" · {r['patched_fraction'] * 100:.2f}% tokens patched"
            if "residual_memory_overhead" in r:
                simd += f" (+{r['residual_memory_overhead'] * 100:.2f}% KV)"
        if r.get("fallback_rate") is not None:
            simd += f" · fallback {r['fallback_rate'] * 100:.1f}% of tokens ({r['fallback_switches']} switches)"
        t.add_row(r["role"], r["model"], simd, f"{r['ppl']:.4f}", rel, f"{r['seconds']:.1f}")
    return t


def _eval_dense(role, spec, cfg, device, dtype, trust_remote_code, simulate_act, simulate_kv, kv_tau, calib_samples,
                seqlen):
    """(Perplexity, windows, extra columns) of a model loaded dense, with its run-time quantization simulated."""
    from quantkit import api
    from quantkit.runtime.simulate import SimulationPlan, plan_simulation

    status(f"loading {spec or 'the embedded default model'} ...")
    loaded = api.load(spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    plan = SimulationPlan(None, None)
    if role == "model":  # the baseline is the float reference, never simulated
        plan = plan_simulation(
            loaded, act=simulate_act, kv=simulate_kv, kv_tau=kv_tau, calib_samples=calib_samples,
            calib_seqlen=seqlen, device=device,
        )
    status(f"scoring {role} ...")
    with plan.context(loaded.model) as sim:
        res, win = api.evaluate(loaded.model, loaded.tokenizer, cfg, device=device)
    extra = {"simulated": plan.describe()}
    if sim is not None and plan.kv is not None:
        extra.update(sim.to_dict())
    return res, win, extra


def _eval_runtime(spec, cfg, device, dtype, *, fallback, layers, hist, kl_threshold, skew_threshold, latent_cache):
    """(Perplexity, windows, extra columns) of a checkpoint scored through the runtime's kernels."""
    from quantkit import api, runtime
    from quantkit.errors import UsageError
    from quantkit.export.reader import is_quantkit_checkpoint
    from quantkit.runtime.calibrate import attach_fallback

    if spec is None or not is_quantkit_checkpoint(Path(spec)):
        raise UsageError(f"--runtime scores checkpoint dirs written by quantkit; {spec or 'the default model'} is not one")
    status(f"loading {spec} on the runtime ...")
    rt = runtime.load(spec, device=device, dtype=dtype, latent_cache=latent_cache)
    mon = None
    if fallback:
        mon = attach_fallback(rt, layers=layers, hist=hist, kl_threshold=kl_threshold, skew_threshold=skew_threshold)
    win = api.eval_windows(rt.tokenizer, cfg)
    status(f"scoring {spec} on the runtime ({rt.device}) ...")
    res = rt.perplexity(win, batch_size=cfg.batch_size, chunk=64 if mon is not None else None)
    from quantkit.export.ct_transform import rotation_names

    online = rotation_names(rt.online)
    extra = {"simulated": f"runtime kernels ({rt.info['scheme']}{', online ' + online if online else ''})"}
    if rt.kv_args is not None:
        extra.update(rt._cache.stats())
    if fallback:
        extra.update(fallback_rate=rt.stats.fallback_rate if mon is not None else 0.0,
                     fallback_switches=len(mon.switches) if mon is not None else 0,
                     fallback_log=[s.to_dict() for s in mon.switches] if mon is not None else [])
    return res, win, extra


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)
