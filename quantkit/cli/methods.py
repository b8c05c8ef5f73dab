"""Method commands (`quantkit rtn`, ...): every one shares the same options and one run flow."""

from __future__ import annotations

import contextlib
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
    MseGridOpt,
    MseOpt,
    OutOpt,
    OverwriteOpt,
    ResumeOpt,
    SkipMemOpt,
    SamplesOpt,
    SeedOpt,
    SensitiveOpt,
    SeqlenOpt,
    ShardSizeOpt,
    StreamOpt,
    SymOpt,
    TrustOpt,
    WindowsOpt,
)
from quantkit.cli.ui import console, handle_errors, peak_rss_mib, progress_bar, status
from quantkit.errors import OperationError, short
from quantkit.interrupts import Interrupted, reached


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
    stream: bool | None = None,
    shard_size: float = 2.0,
) -> dict:
    """Check → load → (baseline eval) → quantize layer by layer → (eval) → export. Returns a summary.

    Everything that can be refused is refused before the model loads. Ctrl-C at any
    instant ends with one line saying what is on disk (quantkit.interrupts.Interrupted).
    stream: True reads one block at a time from the safetensors files, False loads the model
    whole, None lets the memory plan choose (streamed only when in memory would not fit).
    """
    from quantkit import api
    from quantkit.calib.resume import partial_dir_for

    t0 = time.perf_counter()
    out = Path(out)
    partial = partial_dir_for(out)  # finished blocks go here, so a crash costs at most one block
    done = _preflight(recipe, model=model, out=out, partial=partial, calib=calib, device=device, dtype=dtype,
                      format=format, overwrite=overwrite, eval_cfg=eval_cfg, json_out=json_out, resume=resume,
                      skip_memory_check=skip_memory_check, sensitive=sensitive, stream=stream, shard_size=shard_size)
    if isinstance(done, dict):
        return done
    plan = done
    existed = out.exists()
    exported = False
    try:
        status(f"loading {_describe(model)}{'; its blocks are read one at a time' if plan.streamed else ''} ...")
        loaded = api.load(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code, stream=plan.streamed)
        reached("loaded")
        api.check_recipe_fits(loaded.model, recipe)
        api.check_export_format(recipe, format, loaded.model)
        summary: dict = {
            "scheme": recipe.scheme.describe(),
            "stages": [s.method for s in recipe.stages],
            "recipe": recipe.to_dict(),
            "format": format,
        }
        # The text is tokenized now, before minutes of evaluation or calibration: too little of it is one line.
        calib_set = api.calibration_for(loaded, recipe, calib)
        windows = None
        if eval_cfg is not None:
            windows = api.eval_windows(loaded.tokenizer, eval_cfg)
            status("scoring the baseline on held-out text ...")
            base, windows = api.evaluate(loaded.model, loaded.tokenizer, eval_cfg, device=device, windows=windows)
            summary["baseline"] = base.to_dict()
        t_q = time.perf_counter()
        with progress_bar("calibrating") as on_block:
            qmodel = api.quantize(
                loaded, recipe, calib, device=device, on_block=on_block, calib_set=calib_set,
                partial_dir=partial, resume=resume, overwrite_partial=overwrite, sensitive=sensitive,
                activations=plan.activations,
            )
        reached("calibrated")
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
            path = api.export(qmodel, out, format=format, overwrite=overwrite, kv_format=kv_format,
                              max_shard_bytes=max(1, int(shard_size * 2**30)))
        except OperationError as e:  # disk full, permissions: the calibrated blocks survive for --resume
            raise type(e)(f"{e}; the calibrated blocks are kept in {partial}: fix that and rerun with --resume") from e
        exported = True
        reached("exported")
        from quantkit.calib.resume import discard_partial

        discard_partial(partial)  # only now: the checkpoint is complete on disk
        reached("done")
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

            write_text_atomic(json_out, json.dumps(summary, indent=2) + "\n")
        return summary
    except KeyboardInterrupt as e:
        exported = exported or getattr(e, "committed", False)
        raise Interrupted(_on_disk(out, partial, exported=exported, existed=existed)) from None


def _describe(model: str | None) -> str:
    from quantkit.models.loading import describe_source

    return describe_source(model)


def _on_disk(out: Path, partial: Path, *, exported: bool, existed: bool) -> str:
    """One line, read from the disk now, of what an interrupted run leaves."""
    from quantkit.calib.resume import finished_blocks

    shown = short(str(out), 160)
    shown_partial = f"{shown.rstrip('/')}.partial"
    if exported:
        line = f"the checkpoint at {shown} is complete"
        if partial.exists():
            line += f"; {shown_partial} is no longer needed: rerun with --resume to remove it"
        return line
    before = f"{shown} is unchanged" if existed else f"nothing was written at {shown}"
    fb = finished_blocks(partial)
    if fb is None or fb[0] == 0:
        with contextlib.suppress(OSError):
            partial.rmdir()  # only when empty: a run stopped before its first block leaves nothing
        return f"{before}; no block was finished"
    n, total = fb
    if n >= total:
        return f"{before}; {shown_partial} keeps all {total} blocks: rerun with --resume to export them"
    return f"{before}; {shown_partial} keeps {n}/{total} finished blocks: rerun the same command with --resume to continue"


def _preflight(recipe, *, model, out, partial, calib, device, dtype, format, overwrite, eval_cfg, json_out, resume,
               skip_memory_check, sensitive, stream=None, shard_size=2.0):
    """Every refusal that needs no model weights, in one place. Returns a summary when --resume finds
    the checkpoint already complete (nothing left to do), else the memory plan the run follows
    (streamed or not, where the activations go)."""
    from quantkit import api
    from quantkit.calib.resume import check_partial_dir, remove_stale_trash
    from quantkit.cli import validate as v
    from quantkit.export.atomic import check_output_dir, recover_stale
    from quantkit.recipe import check_methods

    check_methods(recipe)
    api.check_export_format(recipe, format)
    v.check_dtype(dtype)
    v.check_device(device)
    v.check_samples_batch(calib.samples, calib.batch_size)
    v.check_int("--seed", calib.seed, min=0, max=2**63 - 1)
    v.check_seqlen("--seqlen", calib.seqlen)
    if eval_cfg is not None:
        v.check_windows("--windows", eval_cfg.windows or 0)
        v.check_seqlen("--eval-seqlen", eval_cfg.seqlen)
    v.check_text_source("--calib", calib.data)
    v.check_float("--shard-size", shard_size, min=0, max=2**20, min_open=True, note=" GiB")
    if stream and eval_cfg is not None:
        raise v.OptionError("--eval scores the whole model in memory, which --stream avoids; drop one of them "
                            "(`quantkit eval --model OUT` scores the checkpoint afterwards)")
    if stream and not api.streams(recipe):
        raise v.OptionError(f"{', '.join(api.whole_model_methods(recipe))} transforms the whole model at once, so it "
                            "runs with the model in memory: drop --stream")
    if stream and model and Path(model).is_dir() and (Path(model) / "quantkit.json").is_file():
        raise v.OptionError(f"--model {short(model, 160)} is a quantkit checkpoint, which loads dequantized in memory: "
                            "drop --stream, or pass the float model it was made from")
    if sensitive is not None and not _is_file(sensitive):
        raise v.OptionError(f"--sensitive {short(str(sensitive), 160)} is not a file; pass the sensitive_layers.json "
                            "that `quantkit scan` wrote")
    for line in recover_stale(out):  # what a killed run left beside --out
        status(line)
    remove_stale_trash(out)
    if resume:
        done = _already_complete(recipe, model, out, partial)
        if done is not None:
            return done
    from quantkit.models.loading import check_source

    check_source(model)
    check_output_dir(out, overwrite, protect=_model_paths(model))
    check_partial_dir(out.with_name(out.name + ".partial"))  # the same dir, named as the user wrote --out
    v.check_output_file("--json", json_out, not_inside=(out, partial))
    cfg, plan = _memory_plan(recipe, model, calib, device, dtype, skip_memory_check, stream,
                             can_stream=eval_cfg is None and _can_stream(recipe, model))  # from the config: before loading
    if api.needs_calibration(recipe):  # a data-free run (RTN) never reads --seqlen tokens
        v.check_seqlen("--seqlen", calib.seqlen, cfg)
    if eval_cfg is not None:
        v.check_seqlen("--eval-seqlen", eval_cfg.seqlen, cfg)
    for i, st in enumerate(recipe.stages):
        if "train_seqlen" in st.options:
            v.check_seqlen("--train-seqlen", st.options["train_seqlen"], cfg)
    return plan


def _can_stream(recipe, model: str | None) -> bool:
    """Whether the run can read its blocks one at a time: no whole-model transform, and a float source
    (a quantkit checkpoint loads dequantized in memory)."""
    from quantkit import api

    if model and Path(model).is_dir() and (Path(model) / "quantkit.json").is_file():
        return False
    return api.streams(recipe)


def _is_file(path) -> bool:
    try:
        return Path(path).is_file()
    except OSError:  # a name too long, a loop of links
        return False


def _model_paths(model: str | None) -> tuple[Path, ...]:
    """Local paths the model is read from (never to be written over)."""
    import os

    if model is None or model == "default":
        from quantkit.models.loading import default_model_path

        try:
            return (default_model_path(),)
        except Exception:  # not installed: the load says so
            return ()
    p = Path(model).expanduser()
    return (p,) if os.path.exists(p) else ()


def _already_complete(recipe, model, out: Path, partial: Path) -> dict | None:
    """--resume when the checkpoint at out is already complete for this recipe: say so, tidy up, done."""
    from quantkit.calib.resume import finished_blocks
    from quantkit.errors import UsageError
    from quantkit.export.manifest import MANIFEST_NAME, read_manifest, verify_checkpoint

    if not (out / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = read_manifest(out)
        if verify_checkpoint(out):
            return None
    except UsageError:
        return None
    made = manifest.get("recipe") if isinstance(manifest.get("recipe"), dict) else {}
    want = recipe.to_dict()
    if made.get("scheme") != want.get("scheme") or made.get("stages") != want.get("stages"):
        return None
    if partial.exists() and finished_blocks(partial) is None and any(partial.iterdir()):
        return None  # not ours to remove: the usual checks refuse it
    from quantkit.calib.resume import discard_partial

    discard_partial(partial)
    status(f"the checkpoint at {short(str(out), 160)} is already complete (every file matches {MANIFEST_NAME}); "
           "nothing left to resume")
    return {"out": str(out), "complete": True}


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small output file via a temp file + rename (Ctrl-C leaves the old file or the new one)."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


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
    ("stream", StreamOpt, None),
    ("shard_size", ShardSizeOpt, 2.0),
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
    from quantkit.cli import validate as v

    # Checked even without --eval: a value no run could use is a typo worth hearing about now.
    v.check_windows("--windows", windows)
    v.check_seqlen("--eval-seqlen", eval_seqlen)
    return run_recipe(
        recipe,
        calib=CalibConfig(calib, calib_field, samples, seqlen, seed, batch_size),
        eval_cfg=EvalConfig(seqlen=eval_seqlen, windows=windows or None) if eval else None,
        **rest,
    )


def _memory_plan(recipe, model, calib, device, dtype, skip: bool, stream: bool | None = None,
                 can_stream: bool = True):
    """One status line with the estimated peak memory; refuse a run that will not fit (unless skip).
    Returns the model's config dict (read and checked without loading weights) and the plan the run
    follows (streamed when asked, or when only the streamed run fits; see quantkit.plan.plan_run)."""
    from quantkit import api
    from quantkit.models.loading import resolve_device
    from quantkit.plan import check_memory, model_config, plan_run

    cfg = model_config(model)
    api.check_arch(cfg, recipe)  # an unsupported family is one line here, before the memory plan and the load
    plan = plan_run(cfg, recipe, calib, resolve_device(device), dtype=dtype, stream=stream, can_stream=can_stream)
    status(plan.summary())
    if not skip:
        check_memory(plan)
    return cfg, plan


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
def rtn(bits: BitsOpt = 4, group_size: GroupSizeOpt = None, sym: SymOpt = True, mse: MseOpt = False,
        mse_grid: MseGridOpt = 50):
    """Round-to-nearest weight quantization (no calibration data needed)."""
    from quantkit.cli.options import mse_stage_options
    from quantkit.recipe import QuantArgs, Recipe, Scheme, Stage

    return Recipe(Scheme(QuantArgs(bits=bits, group_size=group_size, symmetric=sym)),
                  (Stage("rtn", mse_stage_options(mse, mse_grid)),))


def register(app: typer.Typer) -> None:
    app.command("rtn")(rtn)
