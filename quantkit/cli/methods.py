"""Method commands (`quantkit rtn`, ...): every one shares the same options and one run flow."""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from quantkit.cli.options import (
    BatchOpt,
    BitsOpt,
    CalibFieldOpt,
    CalibOpt,
    DeviceOpt,
    DtypeOpt,
    EvalFlagOpt,
    EvalSeqlenOpt,
    FormatOpt,
    GroupSizeOpt,
    JsonOpt,
    ModelOpt,
    OutOpt,
    OverwriteOpt,
    ResumeOpt,
    SkipMemOpt,
    SamplesOpt,
    SeedOpt,
    SensitiveOpt,
    SeqlenOpt,
    SymOpt,
    TrustOpt,
    WindowsOpt,
)
from quantkit.cli.ui import console, handle_errors, peak_rss_mib, progress_bar, status


def run_recipe(
    recipe,
    *,
    model: str | None,
    out: Path,
    calib,
    device: str,
    dtype: str,
    format: str,
    overwrite: bool,
    trust_remote_code: bool,
    eval_cfg=None,
    json_out: Path | None = None,
    kv_format: str = "int8",
    resume: bool = False,
    skip_memory_check: bool = False,
    sensitive: Path | None = None,
) -> dict:
    """Load → check → (baseline eval) → quantize layer by layer → (eval) → export. Returns a summary."""
    from quantkit import api
    from quantkit.calib.resume import discard_partial, partial_dir_for
    from quantkit.errors import OperationError
    from quantkit.export.atomic import check_output_dir

    from quantkit.recipe import check_methods

    t0 = time.perf_counter()
    # Refuse before loading the model (minutes of work), not after.
    check_methods(recipe)
    api.check_export_format(recipe, format)
    check_output_dir(out, overwrite)
    _memory_plan(recipe, model, calib, device, dtype, skip_memory_check)  # from the config: before loading
    status(f"loading {model or 'the embedded default model (SmolLM2-135M-Instruct)'} ...")
    loaded = api.load(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    api.check_recipe_fits(loaded.model, recipe)
    api.check_export_format(recipe, format, loaded.model)
    summary: dict = {
        "scheme": recipe.scheme.describe(),
        "stages": [s.method for s in recipe.stages],
        "recipe": recipe.to_dict(),
        "format": format,
    }
    windows = None
    if eval_cfg is not None:
        status("scoring the baseline on held-out text ...")
        base, windows = api.evaluate(loaded.model, loaded.tokenizer, eval_cfg, device=device)
        summary["baseline"] = base.to_dict()
    t_q = time.perf_counter()
    partial = partial_dir_for(out)  # finished blocks go here, so a crash costs at most one block
    try:
        with progress_bar("calibrating") as on_block:
            qmodel = api.quantize(
                loaded, recipe, calib, device=device, on_block=on_block,
                partial_dir=partial, resume=resume, overwrite_partial=overwrite, sensitive=sensitive,
            )
    except KeyboardInterrupt:
        status(f"finished blocks are saved in {partial}; rerun the same command with --resume to continue")
        raise
    summary["quantize_seconds"] = time.perf_counter() - t_q
    if eval_cfg is not None:
        status("scoring the quantized model on the same windows ...")
        # Activation / KV quantization is simulated in torch so the score covers the whole scheme.
        with api.simulation(qmodel) as sim:
            q, _ = api.evaluate(qmodel.model, loaded.tokenizer, eval_cfg, device=device, windows=windows)
        summary["quantized"] = q.to_dict()
        if recipe.scheme.kv_cache is not None:
            summary["kv_cache"] = sim.to_dict()
    try:
        path = api.export(qmodel, out, format=format, overwrite=overwrite, kv_format=kv_format)
    except OperationError as e:  # disk full, permissions: the calibrated blocks survive for --resume
        raise type(e)(f"{e}; the calibrated blocks are kept in {partial}: fix that and rerun with --resume") from e
    discard_partial(partial)  # only now: the checkpoint is complete on disk
    from quantkit.export.manifest import read_manifest

    summary.update(
        out=str(path),
        quantized_linears=len(qmodel.modules),
        fp16_linears=len(qmodel.shadow),
        warnings=read_manifest(path).get("warnings", qmodel.warnings),  # the run's and the export's
        wall_seconds=time.perf_counter() - t0,
        peak_rss_mib=peak_rss_mib(),
    )
    _print_summary(summary)
    if json_out is not None:
        import json

        json_out.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# The options every method command shares, in the order --help lists them (out and model first,
# then the command's own options, then these). One definition each; `method_command` adds them.
_SHARED_OPTIONS: tuple[tuple[str, object, object], ...] = (
    ("out", OutOpt, inspect.Parameter.empty),
    ("model", ModelOpt, None),
    ("calib", CalibOpt, None),
    ("calib_field", CalibFieldOpt, "text"),
    ("samples", SamplesOpt, 64),
    ("seqlen", SeqlenOpt, 512),
    ("seed", SeedOpt, 0),
    ("device", DeviceOpt, "cpu"),
    ("dtype", DtypeOpt, "auto"),
    ("format", FormatOpt, "compressed-tensors"),
    ("overwrite", OverwriteOpt, False),
    ("trust_remote_code", TrustOpt, False),
    ("batch_size", BatchOpt, 8),
    ("eval", EvalFlagOpt, False),
    ("windows", WindowsOpt, 40),
    ("eval_seqlen", EvalSeqlenOpt, 512),
    ("json_out", JsonOpt, None),
    ("resume", ResumeOpt, False),
    ("skip_memory_check", SkipMemOpt, False),
    ("sensitive", SensitiveOpt, None),
)
_LEADING = ("out", "model")


def method_command(build: Callable[..., Any]) -> Callable[..., None]:
    """Make a method command from `build(**its own options) -> Recipe` (or `(Recipe, run extras)`).

    The command takes build's options plus every shared option (_SHARED_OPTIONS), builds
    the recipe, and runs it with `run_command`; usage errors print one line (handle_errors).
    A shared option that build also declares (to change its default, or to read it) is
    passed to both. Typer reads the command's parameters from the `__signature__` set here.
    """
    own = inspect.signature(build, eval_str=True).parameters
    kw = inspect.Parameter.KEYWORD_ONLY
    shared = {
        name: inspect.Parameter(name, kw, default=default, annotation=ann) for name, ann, default in _SHARED_OPTIONS
    }
    for name, p in own.items():
        if name in shared:
            shared[name] = p.replace(kind=kw)
    params = [shared[n] for n in _LEADING]
    params += [p.replace(kind=kw) for n, p in own.items() if n not in _LEADING]
    params += [p for n, p in shared.items() if n not in _LEADING and n not in own]

    @functools.wraps(build)
    @handle_errors
    def command(**values: Any) -> None:
        made = build(**{n: values[n] for n in own})
        recipe, extras = made if isinstance(made, tuple) else (made, {})
        run_command(recipe, **extras, **{n: values[n] for n in shared})

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


def run_command(
    recipe, *, calib, calib_field, samples, seqlen, seed, batch_size, eval, windows, eval_seqlen, **rest
) -> dict:
    """A method command's run: the shared CLI options -> CalibConfig/EvalConfig -> run_recipe."""
    from quantkit.api import CalibConfig, EvalConfig

    return run_recipe(
        recipe,
        calib=CalibConfig(calib, calib_field, samples, seqlen, seed, batch_size),
        eval_cfg=EvalConfig(seqlen=eval_seqlen, windows=windows or None) if eval else None,
        **rest,
    )


def _memory_plan(recipe, model, calib, device, dtype, skip: bool) -> None:
    """One status line with the estimated peak memory; refuse a run that will not fit (unless skip)."""
    from quantkit.models.loading import resolve_device
    from quantkit.plan import check_memory, estimate_memory, model_config

    plan = estimate_memory(model_config(model), recipe, calib, resolve_device(device), dtype=dtype)
    status(plan.summary())
    if not skip:
        check_memory(plan)


def _print_summary(s: dict) -> None:
    from rich.table import Table

    t = Table(title="quantkit", show_header=False)
    t.add_row("scheme", f"{s['scheme']} · {' + '.join(s['stages'])}")
    t.add_row("quantized linears", str(s["quantized_linears"]))
    if s.get("fp16_linears"):
        t.add_row("kept FP16 (--sensitive)", f"{s['fp16_linears']} linears, quantized copies in the shadow sidecar")
    t.add_row("checkpoint", f"{s['out']} ({s.get('format', 'compressed-tensors')})")
    for i, st in enumerate(s.get("recipe", {}).get("stages", [])):
        opts = ", ".join(f"{k}={v}" for k, v in st.items() if k != "method")
        t.add_row(f"stage {i + 1}", f"{st['method']}" + (f" ({opts})" if opts else ""))
    if "baseline" in s:
        b, q = s["baseline"]["ppl"], s["quantized"]["ppl"]
        t.add_row("perplexity (baseline)", f"{b:.4f}")
        t.add_row("perplexity (quantized)", f"{q:.4f}  ({(q / b - 1) * 100:+.2f}%)")
        t.add_row("held-out tokens scored", str(s["baseline"]["tokens"]))
    if "kv_cache" in s:
        kv = s["kv_cache"]
        t.add_row(
            "KV tokens patched",
            f"{kv['patched_fraction'] * 100:.3f}%  (extra KV memory {kv['residual_memory_overhead'] * 100:.3f}%)",
        )
    t.add_row("quantize time", f"{s['quantize_seconds']:.1f} s")
    t.add_row("wall time", f"{s['wall_seconds']:.1f} s")
    t.add_row("peak RSS", f"{s['peak_rss_mib']:.0f} MiB")
    for w in s["warnings"]:
        t.add_row("[yellow]warning[/]", w)
    console.print(t)


@method_command
def rtn(bits: BitsOpt = 4, group_size: GroupSizeOpt = None, sym: SymOpt = True):
    """Round-to-nearest weight quantization (no calibration data needed)."""
    from quantkit.recipe import QuantArgs, Recipe, Scheme, Stage

    return Recipe(Scheme(QuantArgs(bits=bits, group_size=group_size, symmetric=sym)), (Stage("rtn"),))


def register(app: typer.Typer) -> None:
    app.command("rtn")(rtn)
