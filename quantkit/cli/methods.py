"""Method commands (`quantkit rtn`, ...): every one shares the same options and one run (quantkit.run).

A command is `build(**its own options) -> Recipe` wrapped by `method_command`, which adds the shared
options; `run_command` turns them into RunOptions, calls `quantkit.run.run_recipe` and prints the summary."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
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
    LearnedRoundingOpt,
    ModelOpt,
    MseGridOpt,
    MseOpt,
    OutOpt,
    OverwriteOpt,
    ResumeOpt,
    RoundingStepsOpt,
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
from quantkit.cli.ui import console, handle_errors, progress_bar, status


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
    """A method command's run: the shared CLI options -> RunOptions -> quantkit.run.run_recipe, rendered."""
    from quantkit import validate as v
    from quantkit.api import CalibConfig, EvalConfig
    from quantkit.run import RunOptions, run_recipe

    # Checked even without --eval: a value no run could use is a typo worth hearing about now.
    v.check_windows("--windows", windows)
    v.check_seqlen("--eval-seqlen", eval_seqlen)
    options = RunOptions(
        calib=CalibConfig(calib, calib_field, samples, seqlen, seed, batch_size),
        eval_cfg=EvalConfig(seqlen=eval_seqlen, windows=windows or None) if eval else None,
        **rest,
    )
    summary = run_recipe(recipe, options, on_status=status, progress=progress_bar)
    if not summary.get("complete"):  # --resume found it done: the status line said so
        _print_summary(summary)
    return summary


def _print_summary(s: dict) -> None:
    from rich.table import Table

    from quantkit.methods.base import describe_resolved

    t = Table(title="quantkit", show_header=False)
    t.add_row("scheme", f"{s['scheme']} · {' + '.join(s['stages'])}")
    t.add_row("quantized linears", str(s["quantized_linears"]))
    if s.get("fp16_linears"):
        t.add_row("kept FP16 (--sensitive)", f"{s['fp16_linears']} linears, quantized copies in the shadow sidecar")
    t.add_row("checkpoint", f"{s['out']} ({s.get('format', 'compressed-tensors')})")
    auto = {r["stage"]: r for r in s.get("resolved_options", [])}
    for i, st in enumerate(s.get("recipe", {}).get("stages", [])):
        opts = ", ".join(f"{k}={v}" for k, v in st.items() if k != "method")
        t.add_row(f"stage {i + 1}", f"{st['method']}" + (f" ({opts})" if opts else ""))
        if i + 1 in auto:
            t.add_row("", "auto: " + describe_resolved(auto[i + 1]))
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
        mse_grid: MseGridOpt = 50, learned_rounding: LearnedRoundingOpt = False, rounding_steps: RoundingStepsOpt = 200):
    """Round-to-nearest weight quantization (no calibration data needed, unless --learned-rounding)."""
    from quantkit.cli.options import mse_stage_options, rounding_stage_options
    from quantkit.recipe import QuantArgs, Recipe, Scheme, Stage

    return Recipe(Scheme(QuantArgs(bits=bits, group_size=group_size, symmetric=sym)),
                  (Stage("rtn", {**mse_stage_options(mse or None, mse_grid),
                                 **rounding_stage_options(learned_rounding, rounding_steps)}),))


def register(app: typer.Typer) -> None:
    app.command("rtn")(rtn)
