"""`quantkit scan`: which linears a scheme hurts, written to sensitive_layers.json."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from quantkit.cli.options import (
    ActOrderOpt,
    BatchOpt,
    CalibFieldOpt,
    CalibOpt,
    DampOpt,
    DeviceOpt,
    DtypeOpt,
    EvalSeqlenOpt,
    GroupSizeOpt,
    ModelOpt,
    SamplesOpt,
    SeedOpt,
    SeqlenOpt,
    SymOverrideOpt,
    TrustOpt,
)
from quantkit.cli.ui import console, handle_errors, progress_bar, status
from quantkit.errors import short_repr


@handle_errors
def scan(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write sensitive_layers.json (+ .hist.safetensors).")],
    model: ModelOpt = None,
    scheme: Annotated[str, typer.Option("--scheme", help="Preset: W8A8, W4A16, W8A16, W8A8C8, W4A4KV4.")] = "W8A8",
    group_size: GroupSizeOpt = None,
    sym: SymOverrideOpt = None,
    calib: CalibOpt = None,
    calib_field: CalibFieldOpt = "text",
    samples: SamplesOpt = 128,
    seqlen: SeqlenOpt = 512,
    seed: SeedOpt = 0,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    batch_size: BatchOpt = 8,
    trust_remote_code: TrustOpt = False,
    kl: Annotated[float, typer.Option("--kl", help="Keep a layer in FP16 when its KL exceeds this.")] = 0.02,
    r: Annotated[float, typer.Option("--r", help="... or its input range/IQR ratio R exceeds this.")] = 15.0,
    energy: Annotated[float, typer.Option("--energy", help="... or its top singular direction's energy share exceeds this.")] = 0.42,
    target_fraction: Annotated[
        Optional[float],
        typer.Option("--target-fraction", help="Instead of thresholds: keep at most this share of linears in FP16 (fused q/k/v, gate/up counted whole), chosen on calibration text with cross-validation."),
    ] = None,
    select_windows: Annotated[
        int, typer.Option("--select-windows", help="--target-fraction: calibration-text windows of --eval-seqlen tokens it chooses on (0 = all). Cost: about 247 forward passes over them on the default model, 240 of them starting at the measured unit's block (about 75 s on an H100 at the default 64; on 2 CPU cores, lower it).")
    ] = 64,
    folds: Annotated[
        int, typer.Option("--folds", help="--target-fraction: cross-validation folds that measure the recovery to expect.")
    ] = 4,
    measure_ppl: Annotated[
        bool, typer.Option("--measure-ppl", help="Also measure each layer's held-out ppl change alone (slow: one eval per linear).")
    ] = False,
    windows: Annotated[int, typer.Option("--windows", help="Held-out windows for --measure-ppl.")] = 8,
    eval_seqlen: EvalSeqlenOpt = 512,
    bins: Annotated[int, typer.Option("--bins", help="Histogram bins per output channel.")] = 512,
    stat_tokens: Annotated[
        int, typer.Option("--stat-tokens", help="Token rows per linear for the output statistics (0 = all tokens).")
    ] = 16384,
    fisher_windows: Annotated[
        Optional[int],
        typer.Option("--fisher-windows", help="Calibration samples for the gradient-weighted error (one forward+backward each; 0 = off; 4 x 512 took 207 s on the loaded 2-core CPU). With --target-fraction it is on by default and measured on every selection window (one forward+backward each; any N > 0 = on, 0 = off); without it, off by default."),
    ] = None,
    shortlist: Annotated[
        Optional[int],
        typer.Option("--shortlist", help="--target-fraction: fused units whose restore gain and alone damage are measured (default all; 0 = none)."),
    ] = None,
    greedy: Annotated[
        Optional[int],
        typer.Option("--greedy", help="--target-fraction: also try choosing one unit at a time, re-measuring the N "
                     "best remaining units with the picks restored (units that repair the same error are not counted "
                     "twice); costs up to N forward passes over the selection windows per pick, per fold. Default off."),
    ] = None,
    method: Annotated[
        str,
        typer.Option("--method", help="The method the file is for: rtn (the scheme's round-to-nearest) or gptq (GPTQ "
                     "quantizes the model once on this scan's calibration windows, and every measurement, the restore "
                     "gains and the expected recovery use its weights; then `quantkit gptq --sensitive`)."),
    ] = "rtn",
    cross_fit: Annotated[
        Optional[bool],
        typer.Option("--cross-fit/--no-cross-fit", help="--method gptq with --target-fraction: also run GPTQ once "
                     "per cross-validation fold on the calibration samples that share no text with that fold's "
                     "selection windows, and measure each window on its fold's weights (otherwise the selection "
                     "windows are calibration text GPTQ was fit to, and the expected recovery runs high: measured "
                     "on the default model, 58.7% expected vs 29.5% / 21.0% held out without it, 44.0% vs 46.7% / "
                     "37.1% with it). Costs one GPTQ run per fold. Default: on for --method gptq --target-fraction "
                     "(not with --greedy)."),
    ] = None,
    damp: DampOpt = None,
    act_order: ActOrderOpt = None,
    report: Annotated[Optional[Path], typer.Option("--report", help="Also write a PNG chart + the JSON into this dir.")] = None,
) -> None:
    """Measure every linear's sensitivity to a scheme (KL, R, energy, skew) and flag the ones to keep in FP16."""
    from quantkit import api
    from quantkit.recipe import RecipeError
    from quantkit.sensitivity.io import hist_path_for, save_sensitive_layers
    from quantkit.sensitivity.scan import Thresholds

    from quantkit import validate as chk

    sch = _scheme(scheme, group_size, sym)
    method_options = _method_options(method, damp, act_order)
    chk.check_int("--bins", bins, min=2, max=65536)
    chk.check_int("--stat-tokens", stat_tokens, min=0, note=" (0 = every calibration token)")
    if fisher_windows is not None:
        chk.check_int("--fisher-windows", fisher_windows, min=0, max=samples,
                      note=" (0 = no gradient-weighted metric; at most --samples)")
    chk.check_int("--shortlist", shortlist, min=0, note=" (0 = no measured candidates)")
    chk.check_int("--greedy", greedy, min=1, note=" (candidates re-measured per pick)")
    if greedy is not None and target_fraction is None:
        raise chk.OptionError("--greedy chooses for --target-fraction; pass --target-fraction 0.10")
    if cross_fit:  # asked for explicitly: refused where it cannot be done (the default adapts)
        from quantkit.sensitivity.run import check_cross_fit

        check_cross_fit(method, target_fraction, greedy)
    chk.check_samples_batch(samples, batch_size)
    chk.check_int("--seed", seed, min=0, max=2**63 - 1)
    chk.check_windows("--windows", windows)
    chk.check_windows("--select-windows", select_windows)
    chk.check_int("--folds", folds, min=2, max=64, note=" (cross-validation folds)")
    if select_windows and select_windows < folds:
        raise chk.OptionError(f"--select-windows {select_windows} must be at least --folds {folds} (or 0 = all)")
    chk.check_float("--kl", kl, min=0)
    chk.check_float("--r", r, min=0)
    chk.check_float("--energy", energy, min=0, max=1)
    chk.check_float("--target-fraction", target_fraction, min=0, max=1, min_open=True)
    chk.check_dtype(dtype)
    chk.check_device(device)
    chk.check_text_source("--calib", calib)
    chk.check_seqlen("--seqlen", seqlen)
    chk.check_seqlen("--eval-seqlen", eval_seqlen)
    chk.check_output_file("--out", out)
    chk.check_output_file("--out", hist_path_for(out))
    chk.check_output_tree("--report", report)
    if report is not None:  # fail before the scan, not after, when the chart cannot be drawn
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise RecipeError("--report needs matplotlib: pip install 'quantkit[report]'") from None
    _check_model(model, seqlen, eval_seqlen if target_fraction is not None or measure_ppl else None)
    from quantkit.models.loading import describe_source

    status(f"loading {describe_source(model)} ...")
    outputs = [out, hist_path_for(out)]
    if report is not None:
        outputs += [report / "sensitivity.png", report / out.name, report / hist_path_for(out).name]
    before = {p: _stamp(p) for p in outputs}
    try:
        loaded = api.load(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        with progress_bar("scanning") as on_block:
            rep = api.scan(
                loaded,
                sch,
                api.CalibConfig(calib, calib_field, samples, seqlen, seed, batch_size),
                device=device,
                thresholds=Thresholds(kl, r, energy),
                target_fraction=target_fraction,
                measure_ppl=measure_ppl,
                eval_cfg=api.EvalConfig(seqlen=eval_seqlen, windows=windows or None),
                bins=bins,
                stat_tokens=stat_tokens or None,
                shortlist=shortlist,
                greedy=greedy,
                fisher_windows=fisher_windows,
                select_windows=select_windows or None,
                folds=folds,
                method=method,
                method_options=method_options,
                cross_fit=cross_fit,
                on_block=on_block,
                on_step=status,
            )
        path = save_sensitive_layers(rep, out)
        _show(rep, path, report)
    except KeyboardInterrupt:
        from quantkit.interrupts import Interrupted

        # Each file is written whole (temp + rename): say which ones this run wrote before the Ctrl-C.
        done = [str(p) for p in outputs if _stamp(p) is not None and _stamp(p) != before[p]]
        raise Interrupted(f"wrote {', '.join(done)}; the rest was not written" if done else "nothing was written") \
            from None


def _scheme(name: str, group_size: int | None, sym: bool | None):
    """The preset `name` with --group-size / --sym / --asym applied (as the method commands apply them)."""
    import dataclasses

    from quantkit import validate as chk
    from quantkit.recipe import PRESETS, RecipeError

    if name not in PRESETS:
        raise RecipeError(f"unknown --scheme {short_repr(name)}; use one of {', '.join(PRESETS)}")
    sch = PRESETS[name]
    chk.check_int("--group-size", group_size, min=1)
    if group_size is None and sym is None:
        return sch
    w = sch.weights
    w = dataclasses.replace(w, group_size=w.group_size if group_size is None else group_size,
                            symmetric=w.symmetric if sym is None else sym)
    return dataclasses.replace(sch, weights=w)


def _method_options(method: str, damp: float | None, act_order: bool | None) -> dict:
    """The recipe-stage options of --method from the GPTQ flags that were given (checked as `quantkit gptq`
    checks them); flags of a method that is not run are refused."""
    from quantkit import validate as chk
    from quantkit.cli.options import check_damp
    from quantkit.methods.base import get_method
    from quantkit.sensitivity.weights import check_method

    check_method(method)
    given = {k: v for k, v in (("damp", damp), ("act_order", act_order)) if v is not None}
    if method == "rtn":
        if given:
            flags = " and ".join("--damp" if k == "damp" else "--act-order/--no-act-order" for k in given)
            raise chk.OptionError(f"{flags} set GPTQ's options: add --method gptq, or drop them")
        return {}
    check_damp(damp)
    get_method(method).check_options(given)
    return given


def _check_model(model: str | None, seqlen: int, eval_seqlen: int | None) -> None:
    """From the model's config alone (before the load): a broken config or a family without an adapter
    row is one line, and the window lengths must fit its positions (--eval-seqlen only when used)."""
    from quantkit import validate as chk
    from quantkit.api import check_arch
    from quantkit.models.loading import check_source

    check_source(model)
    cfg = chk.model_config_of(model)
    check_arch(cfg)
    chk.check_seqlen("--seqlen", seqlen, cfg)
    if eval_seqlen is not None:
        chk.check_seqlen("--eval-seqlen", eval_seqlen, cfg)


def _show(rep, path: Path, report: Path | None) -> None:
    """The scan's tables; with --report, the chart and copies of the two files in that dir."""
    import shutil

    from rich.table import Table

    from quantkit.sensitivity.io import hist_path_for
    from quantkit.sensitivity.report import plot_report, scan_table, summary_rows

    console.print(scan_table(rep))
    t = Table(show_header=False)
    for k, v in summary_rows(rep):
        t.add_row(k, v)
    t.add_row("written", f"{path} (+ {hist_path_for(path).name})")
    if report is not None:
        report.mkdir(parents=True, exist_ok=True)
        png = plot_report(rep, report / "sensitivity.png")
        for p in (path, hist_path_for(path)):
            if p.resolve() != (report / p.name).resolve():
                shutil.copy2(p, report / p.name)
        t.add_row("report", f"{png} + {path.name}")
    console.print(t)


def _stamp(p: Path):
    try:
        st = p.stat()
        return (st.st_mtime_ns, st.st_size, st.st_ino)
    except OSError:
        return None


def register(app: typer.Typer) -> None:
    app.command("scan")(scan)
