"""Method commands (`quantkit rtn`, ...): every one shares the same options and one run flow."""

from __future__ import annotations

import time
from pathlib import Path

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
    sensitive: Path | None = None,
) -> dict:
    """Load → check → (baseline eval) → quantize layer by layer → (eval) → export. Returns a summary."""
    from quantkit import api
    from quantkit.export.atomic import check_output_dir

    t0 = time.perf_counter()
    if format not in api.EXPORT_FORMATS:
        from quantkit.recipe import RecipeError

        raise RecipeError(f"--format {format!r} is not supported yet; use one of {', '.join(api.EXPORT_FORMATS)}")
    check_output_dir(out, overwrite)  # refuse before minutes of work, not after
    status(f"loading {model or 'the embedded default model (SmolLM2-135M-Instruct)'} ...")
    loaded = api.load(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    api.check_recipe_fits(loaded.model, recipe)
    summary: dict = {"scheme": recipe.scheme.describe(), "stages": [s.method for s in recipe.stages]}
    windows = None
    if eval_cfg is not None:
        status("scoring the baseline on held-out text ...")
        base, windows = api.evaluate(loaded.model, loaded.tokenizer, eval_cfg, device=device)
        summary["baseline"] = base.to_dict()
    t_q = time.perf_counter()
    with progress_bar("calibrating") as on_block:
        qmodel = api.quantize(loaded, recipe, calib, device=device, on_block=on_block, sensitive=sensitive)
    summary["quantize_seconds"] = time.perf_counter() - t_q
    if eval_cfg is not None:
        status("scoring the quantized model on the same windows ...")
        q, _ = api.evaluate(qmodel.model, loaded.tokenizer, eval_cfg, device=device, windows=windows)
        summary["quantized"] = q.to_dict()
    path = api.export(qmodel, out, format=format, overwrite=overwrite)
    summary.update(
        out=str(path),
        quantized_linears=len(qmodel.modules),
        fp16_linears=len(qmodel.shadow),
        warnings=qmodel.warnings,
        wall_seconds=time.perf_counter() - t0,
        peak_rss_mib=peak_rss_mib(),
    )
    _print_summary(summary)
    if json_out is not None:
        import json

        json_out.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _print_summary(s: dict) -> None:
    from rich.table import Table

    t = Table(title="quantkit", show_header=False)
    t.add_row("scheme", f"{s['scheme']} · {' + '.join(s['stages'])}")
    t.add_row("quantized linears", str(s["quantized_linears"]))
    if s.get("fp16_linears"):
        t.add_row("kept FP16 (--sensitive)", f"{s['fp16_linears']} linears, quantized copies in the shadow sidecar")
    t.add_row("checkpoint", s["out"])
    if "baseline" in s:
        b, q = s["baseline"]["ppl"], s["quantized"]["ppl"]
        t.add_row("perplexity (baseline)", f"{b:.4f}")
        t.add_row("perplexity (quantized)", f"{q:.4f}  ({(q / b - 1) * 100:+.2f}%)")
        t.add_row("held-out tokens scored", str(s["baseline"]["tokens"]))
    t.add_row("quantize time", f"{s['quantize_seconds']:.1f} s")
    t.add_row("wall time", f"{s['wall_seconds']:.1f} s")
    t.add_row("peak RSS", f"{s['peak_rss_mib']:.0f} MiB")
    for w in s["warnings"]:
        t.add_row("[yellow]warning[/]", w)
    console.print(t)


@handle_errors
def rtn(
    out: OutOpt,
    model: ModelOpt = None,
    bits: BitsOpt = 4,
    group_size: GroupSizeOpt = None,
    sym: SymOpt = True,
    calib: CalibOpt = None,
    calib_field: CalibFieldOpt = "text",
    samples: SamplesOpt = 64,
    seqlen: SeqlenOpt = 512,
    seed: SeedOpt = 0,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    format: FormatOpt = "compressed-tensors",
    overwrite: OverwriteOpt = False,
    trust_remote_code: TrustOpt = False,
    batch_size: BatchOpt = 8,
    eval: EvalFlagOpt = False,
    windows: WindowsOpt = 40,
    eval_seqlen: EvalSeqlenOpt = 512,
    json_out: JsonOpt = None,
    sensitive: SensitiveOpt = None,
) -> None:
    """Round-to-nearest weight quantization (no calibration data needed)."""
    from quantkit.api import CalibConfig, EvalConfig
    from quantkit.recipe import QuantArgs, Recipe, Scheme, Stage

    recipe = Recipe(Scheme(QuantArgs(bits=bits, group_size=group_size, symmetric=sym)), (Stage("rtn"),))
    run_recipe(
        recipe,
        model=model,
        out=out,
        calib=CalibConfig(calib, calib_field, samples, seqlen, seed, batch_size),
        device=device,
        dtype=dtype,
        format=format,
        overwrite=overwrite,
        trust_remote_code=trust_remote_code,
        eval_cfg=EvalConfig(seqlen=eval_seqlen, windows=windows or None) if eval else None,
        json_out=json_out,
        sensitive=sensitive,
    )


def register(app: typer.Typer) -> None:
    app.command("rtn")(rtn)
