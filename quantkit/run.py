"""One method run, end to end: the flow behind every method command (`quantkit gptq`, `quantkit quantize`, ...).

`run_recipe(recipe, RunOptions(...))`, top to bottom:
  1. build the recipe's methods (once) and refuse, before any weight loads, what cannot work: option values,
     the export format, --stream conflicts, the output path, a resumable or finished OUT.partial, the memory
     plan read from the model's config (which also decides whether the blocks are streamed);
  2. load the model, (score the baseline), quantize block by block into OUT.partial, (score the result);
  3. export OUT atomically, drop OUT.partial, read the manifest back, return the summary (and write it to
     --json).
Silent: status lines go to `on_status(text)`, progress to the `progress(label)` context manager's
on_block callback; the CLI renders both. Ctrl-C at any instant ends in quantkit.interrupts.Interrupted,
whose message says what is on disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager

from quantkit import api
from quantkit import validate as v
from quantkit.api import CalibConfig, EvalConfig
from quantkit.errors import OperationError, UsageError, short
from quantkit.interrupts import Interrupted, reached

OnBlock = Callable[[int, int, str, str], None]


@dataclass(frozen=True)
class RunOptions:
    """What a method command's shared options ask of a run (see cli/options.py for each one's meaning).

    stream: True reads one block at a time from the safetensors files, False loads the model whole,
    None lets the memory plan choose (streamed only when in memory would not fit)."""

    out: Path
    model: str | None = None
    calib: CalibConfig = CalibConfig()
    device: str = "cpu"
    dtype: str = "auto"
    format: str = "compressed-tensors"
    overwrite: bool = False
    trust_remote_code: bool = False
    eval_cfg: EvalConfig | None = None
    json_out: Path | None = None
    kv_format: str = "int8"
    resume: bool = False
    skip_memory_check: bool = False
    sensitive: Path | None = None
    stream: bool | None = None
    shard_size: float = 2.0  # GiB per weights file

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))

    @property
    def partial(self) -> Path:
        """Where finished blocks wait (OUT.partial), so a crash costs at most one block."""
        from quantkit.calib.resume import partial_dir_for

        return partial_dir_for(self.out)


def _quiet(_message: str) -> None:
    pass


def _no_progress(_label: str) -> ContextManager[OnBlock | None]:
    return contextlib.nullcontext()


def run_recipe(recipe, options: RunOptions, *, on_status: Callable[[str], None] | None = None,
               progress: Callable[[str], ContextManager[OnBlock | None]] | None = None) -> dict:
    """Check → load → (baseline eval) → quantize layer by layer → (eval) → export. Returns the summary.

    Everything that can be refused is refused before the model loads. With options.resume and a
    checkpoint at OUT that is already complete for this recipe, returns {"out", "complete": True}.
    """
    t0 = time.perf_counter()
    o, say = options, on_status or _quiet
    methods = _build_methods(recipe)
    plan = _preflight(recipe, methods, o, say)
    if isinstance(plan, dict):
        return plan
    existed = o.out.exists()
    exported = False
    try:
        qmodel, summary = _quantize_and_score(recipe, methods, plan, o, say, progress or _no_progress)
        path = _export(qmodel, o)
        exported = True
        reached("exported")
        from quantkit.calib.resume import discard_partial
        from quantkit.export.manifest import read_manifest

        discard_partial(o.partial)  # only now: the checkpoint is complete on disk
        reached("done")
        summary.update(
            out=str(path),
            quantized_linears=len(qmodel.modules),
            fp16_linears=len(qmodel.shadow),
            warnings=read_manifest(path).get("warnings", qmodel.warnings),  # the run's and the export's
            wall_seconds=time.perf_counter() - t0,
            peak_rss_mib=peak_rss_mib(),
        )
        if o.json_out is not None:
            write_text_atomic(o.json_out, json.dumps(summary, indent=2) + "\n")
        return summary
    except KeyboardInterrupt as e:
        exported = exported or getattr(e, "committed", False)
        raise Interrupted(_on_disk(o.out, o.partial, exported=exported, existed=existed)) from None


def _build_methods(recipe) -> list:
    """The recipe's methods, built once for the whole run (each checks its own options).

    A stage that cannot be built is named the way methods.base.check_methods names it."""
    from quantkit.methods.base import build_methods
    from quantkit.methods.base import check_methods

    try:
        return build_methods(recipe)
    except (TypeError, ValueError):  # UsageError is a ValueError
        check_methods(recipe)  # raises, naming the stage
        raise


def _quantize_and_score(recipe, methods, plan, o: RunOptions, say, progress):
    """Load, (score the baseline), quantize into OUT.partial, (score the result). Returns (qmodel, summary)."""
    from quantkit.models.loading import describe_source

    say(f"loading {describe_source(o.model)}{'; its blocks are read one at a time' if plan.streamed else ''} ...")
    loaded = api.load(o.model, dtype=o.dtype, device=o.device, trust_remote_code=o.trust_remote_code,
                      stream=plan.streamed)
    reached("loaded")
    api.check_recipe_fits(loaded.model, recipe, methods)
    api.check_export_format(recipe, o.format, loaded.model)
    summary: dict[str, Any] = {
        "scheme": recipe.scheme.describe(),
        "stages": [s.method for s in recipe.stages],
        "recipe": recipe.to_dict(),
        "format": o.format,
    }
    # The text is tokenized now, before minutes of evaluation or calibration: too little of it is one line.
    calib_set = api.calibration_for(loaded, recipe, o.calib, methods=methods)
    windows = None
    if o.eval_cfg is not None:
        windows = api.eval_windows(loaded.tokenizer, o.eval_cfg)
        say("scoring the baseline on held-out text ...")
        base, windows = api.evaluate(loaded.model, loaded.tokenizer, o.eval_cfg, device=o.device, windows=windows)
        summary["baseline"] = base.to_dict()
    t_q = time.perf_counter()
    with progress("calibrating") as on_block:
        qmodel = api.quantize(
            loaded, recipe, o.calib, device=o.device, on_block=on_block, calib_set=calib_set,
            partial_dir=o.partial, resume=o.resume, overwrite_partial=o.overwrite, sensitive=o.sensitive,
            activations=plan.activations, methods=methods,
        )
    reached("calibrated")
    summary["quantize_seconds"] = time.perf_counter() - t_q
    summary["resolved_options"] = qmodel.resolved_options
    if o.eval_cfg is not None:
        say("scoring the quantized model on the same windows ...")
        # Activation / KV quantization is simulated in torch so the score covers the whole scheme.
        with api.simulation(qmodel) as sim:
            q, _ = api.evaluate(qmodel.model, loaded.tokenizer, o.eval_cfg, device=o.device, windows=windows)
        summary["quantized"] = q.to_dict()
        if recipe.scheme.kv_cache is not None:
            summary["kv_cache"] = sim.to_dict()
    return qmodel, summary


def _export(qmodel, o: RunOptions) -> Path:
    try:
        return api.export(qmodel, o.out, format=o.format, overwrite=o.overwrite, kv_format=o.kv_format,
                          max_shard_bytes=max(1, int(o.shard_size * 2**30)))
    except OperationError as e:  # disk full, permissions: the calibrated blocks survive for --resume
        raise type(e)(f"{e}; the calibrated blocks are kept in {o.partial}: fix that and rerun with --resume") from e


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


def _preflight(recipe, methods, o: RunOptions, say):
    """Every refusal that needs no model weights, in one place. Returns a summary when --resume finds
    the checkpoint already complete (nothing left to do), else the memory plan the run follows
    (streamed or not, where the activations go)."""
    from quantkit.calib.resume import check_partial_dir, remove_stale_trash
    from quantkit.export.atomic import check_output_dir, recover_stale
    from quantkit.models.loading import check_source

    api.check_export_format(recipe, o.format)
    _check_values(o)
    _check_combinations(recipe, o)
    for line in recover_stale(o.out):  # what a killed run left beside --out
        say(line)
    remove_stale_trash(o.out)
    if o.resume:
        done = _already_complete(recipe, o.out, o.partial, say)
        if done is not None:
            return done
    check_source(o.model)
    check_output_dir(o.out, o.overwrite, protect=_model_paths(o.model))
    check_partial_dir(o.out.with_name(o.out.name + ".partial"))  # the same dir, named as the user wrote --out
    v.check_output_file("--json", o.json_out, not_inside=(o.out, o.partial))
    cfg, plan = _memory_plan(recipe, o, say)  # from the config: before loading
    if api.needs_calibration(recipe, methods):  # a data-free run (RTN) never reads --seqlen tokens
        v.check_seqlen("--seqlen", o.calib.seqlen, cfg)
    if o.eval_cfg is not None:
        v.check_seqlen("--eval-seqlen", o.eval_cfg.seqlen, cfg)
    for st in recipe.stages:
        if "train_seqlen" in st.options:
            v.check_seqlen("--train-seqlen", st.options["train_seqlen"], cfg)
    return plan


def _check_values(o: RunOptions) -> None:
    """The option values alone (no file but --calib's is looked at)."""
    v.check_dtype(o.dtype)
    v.check_device(o.device)
    v.check_samples_batch(o.calib.samples, o.calib.batch_size)
    v.check_int("--seed", o.calib.seed, min=0, max=2**63 - 1)
    v.check_seqlen("--seqlen", o.calib.seqlen)
    if o.eval_cfg is not None:
        v.check_windows("--windows", o.eval_cfg.windows or 0)
        v.check_seqlen("--eval-seqlen", o.eval_cfg.seqlen)
    v.check_text_source("--calib", o.calib.data)
    v.check_float("--shard-size", o.shard_size, min=0, max=2**20, min_open=True, note=" GiB")


def _check_combinations(recipe, o: RunOptions) -> None:
    """--stream against what needs the whole model in memory; --sensitive names a file."""
    if o.stream and o.eval_cfg is not None:
        raise v.OptionError("--eval scores the whole model in memory, which --stream avoids; drop one of them "
                            "(`quantkit eval --model OUT` scores the checkpoint afterwards)")
    if o.stream:
        api.check_streams(recipe)
    if o.stream and _is_quantkit_dir(o.model):
        raise v.OptionError(f"--model {short(o.model, 160)} is a quantkit checkpoint, which loads dequantized in "
                            "memory: drop --stream, or pass the float model it was made from")
    if o.sensitive is not None and not _is_file(o.sensitive):
        raise v.OptionError(f"--sensitive {short(str(o.sensitive), 160)} is not a file; pass the sensitive_layers.json "
                            "that `quantkit scan` wrote")


def _memory_plan(recipe, o: RunOptions, say):
    """One status line with the estimated peak memory; refuse a run that will not fit (unless
    skip_memory_check). Returns the model's config dict (read and checked without loading weights) and
    the plan the run follows (streamed when asked, or when only the streamed run fits; see plan.plan_run)."""
    from quantkit.models.loading import resolve_device
    from quantkit.plan import check_memory, model_config, plan_run

    cfg = model_config(o.model)
    api.check_arch(cfg, recipe)  # an unsupported family is one line here, before the memory plan and the load
    # A whole-model transform, --eval and a quantkit checkpoint (it loads dequantized) need the model in memory.
    can_stream = o.eval_cfg is None and not _is_quantkit_dir(o.model) and api.streams(recipe)
    plan = plan_run(cfg, recipe, o.calib, resolve_device(o.device), dtype=o.dtype, stream=o.stream,
                    can_stream=can_stream, shard_bytes=max(1, int(o.shard_size * 2**30)))  # the export's shard
    say(plan.summary())
    if not o.skip_memory_check:
        check_memory(plan)
    return cfg, plan


def _is_quantkit_dir(model: str | None) -> bool:
    return bool(model) and Path(model).is_dir() and (Path(model) / "quantkit.json").is_file()


def _is_file(path) -> bool:
    try:
        return Path(path).is_file()
    except OSError:  # a name too long, a loop of links
        return False


def _model_paths(model: str | None) -> tuple[Path, ...]:
    """Local paths the model is read from (never to be written over)."""
    if model is None or model == "default":
        from quantkit.models.loading import default_model_path

        try:
            return (default_model_path(),)
        except Exception:  # not installed: the load says so
            return ()
    p = Path(model).expanduser()
    return (p,) if os.path.exists(p) else ()


def _already_complete(recipe, out: Path, partial: Path, say) -> dict | None:
    """--resume when the checkpoint at out is already complete for this recipe: say so, tidy up, done."""
    from quantkit.calib.resume import discard_partial, finished_blocks
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
    discard_partial(partial)
    say(f"the checkpoint at {short(str(out), 160)} is already complete (every file matches {MANIFEST_NAME}); "
        "nothing left to resume")
    return {"out": str(out), "complete": True}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small output file via a temp file + rename (Ctrl-C leaves the old file or the new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
