"""Human-readable views of a scan: a rich table (flagged layers first) and a PNG chart."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from quantkit.errors import UsageError


def _fmt(v: float | None, spec: str) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, spec)


def scan_table(report, *, max_rows: int | None = 40):
    """A rich Table: flagged layers first (by KL), then the rest by KL; metrics over their threshold in red."""
    from rich.table import Table

    th = report.thresholds
    flagged = [e for e in report.layers if e.flag == "fp16"]
    rule = (report.ppl or {}).get("rule")
    if report.mode == "target-fraction":
        why = f"whole fused units chosen by {rule or 'no rule'} on calibration text"
    elif rule == "measured-restore":  # a version-2 file's rule
        why = "the largest measured restore gains"
    else:
        why = (f"KL>{_fmt(th.kl, '.3g')} or R>{_fmt(th.R, '.3g')} or energy>{_fmt(th.energy, '.3g')}"
               + (f" or rel_err>{_fmt(th.rel_err, '.3g')}" if th.rel_err is not None else "")
               + (f" or fisher>{_fmt(th.fisher, '.3g')}" if th.fisher is not None else ""))
    title = f"sensitivity · {report.scheme.describe()} · {len(flagged)}/{len(report.layers)} linears kept in FP16 ({why})"
    has_ppl = any(e.ppl_delta is not None for e in report.layers)
    has_gain = any(e.restore_gain is not None for e in report.layers)
    t = Table(title=title)
    has_fisher = any(not math.isnan(e.fisher) for e in report.layers)
    for col in ("name", "op", "flag", "KL", "R", "energy", "skew", "rel_err") + (("fisher",) if has_fisher else ()):
        t.add_column(col, justify="left" if col in ("name", "op", "flag") else "right")
    if has_gain:
        t.add_column("restore gain", justify="right")
    if has_ppl:
        t.add_column("Δppl alone", justify="right")
    order = sorted(report.layers, key=lambda e: (e.flag != "fp16", -e.kl))
    shown = order if max_rows is None else order[: max(max_rows, len(flagged))]

    def cell(v, t_, spec):
        s = _fmt(v, spec)
        return f"[red]{s}[/]" if t_ is not None and v is not None and v > t_ else s

    for e in shown:
        row = [
            e.name,
            e.op,
            "[bold yellow]fp16[/]" if e.flag == "fp16" else e.flag,
            cell(e.kl, th.kl, ".4f"),
            cell(e.R, th.R, ".1f"),
            cell(e.energy, th.energy, ".3f"),
            _fmt(e.skew, "+.2f"),
            cell(None if math.isnan(e.rel_err) else e.rel_err, th.rel_err, ".2e"),
        ]
        if has_fisher:
            row.append(cell(None if math.isnan(e.fisher) else e.fisher, th.fisher, ".2e"))
        if has_gain:
            row.append(_fmt(e.restore_gain, "+.4f"))
        if has_ppl:
            row.append(_fmt(e.ppl_delta, "+.4f"))
        t.add_row(*row)
    if len(shown) < len(order):
        t.caption = f"{len(order) - len(shown)} more unflagged linears in the JSON"
    return t


def summary_rows(report) -> list[tuple[str, str]]:
    rows = [("scan time", f"{report.seconds:.1f} s"), ("calibration", _calib(report.calibration)),
            ("quantized with", _method(report.method))]
    p = report.ppl or {}
    if "all_quantized" in p:
        n_sel = p.get("selection_windows")
        where = f"{n_sel} x {p.get('selection_seqlen')} calibration-text windows" if n_sel else "selection windows"
        rows.append(
            (f"selection ({where})", f"ppl baseline {p['baseline']:.4f} · all quantized {p['all_quantized']:.4f} · "
             f"chosen in FP16 {p['mixed']:.4f} (in-sample: {p['recovered']:.1%} of the gap)")
        )
        if "budget" in p:
            rows.append(("kept FP16", f"{p['fp16_linears']} of {len(report.layers)} linears (budget {p['budget']}; "
                         "fused q/k/v and gate/up kept or quantized whole, as --sensitive exports them)"))
        if p.get("rule"):
            why = f"; {p['rule_why']}" if p.get("rule_why") else ""
            rows.append(("selected by", f"{p['rule']} ({p.get('evaluations', '?')} forward passes over the windows{why})"))
        if p.get("seconds") is not None:
            rows.append(("selection time", f"{p['seconds']:.1f} s"))
        exp = p.get("expected")
        if exp:
            rows.append(("expected on unseen text", expected_statement(exp)))
    if "heldout_baseline" in p:
        rows.append(("held-out ppl (baseline)", f"{p['heldout_baseline']:.4f}"))
    elif "baseline" in p and "all_quantized" not in p:  # a version-2 file's --measure-ppl
        rows.append(("held-out ppl (baseline)", f"{p['baseline']:.4f}"))
    for m, r in (report.correlations or {}).items():
        rows.append((f"Spearman({m}, Δppl)", f"{r:+.3f}"))
    for w in report.warnings:
        rows.append(("[yellow]warning[/]", w))
    return rows


def expected_statement(exp: dict[str, Any]) -> str:
    """The recovery the selection expects on text it never saw, and how that number was measured."""
    folds = exp.get("per_fold") or []
    spread = f", folds {min(folds):.0%} to {max(folds):.0%}" if len(folds) > 1 else ""
    if not 0.0 <= exp["recovered"] <= 1.0:  # a share of a gap too small or noisy to measure on these windows
        text = (f"no usable estimate: the cross-validated recovery came out at {exp['recovered']:.0%} "
                f"({exp['how']}{spread}), outside 0-100%, so the quantized model's gap on the selection windows is "
                "too small or too noisy to take a share of; judge the file by `quantkit eval` on unseen text")
    else:
        text = (f"recovers about {exp['recovered']:.0%} of the perplexity gap ({exp['how']}{spread}); "
                "measured on text like the calibration text: other kinds of text may recover less")
    fit = exp.get("method_fit_overlap")
    if fit is not None and fit >= FIT_OVERLAP_WARN:
        text += (f"; {fit:.0%} of the selection windows' text is in the method's own calibration samples, so this "
                 "is measured on text the method was fit to and likely runs high (GPTQ on the default model: "
                 "BENCHMARKS.md); check the exported model with `quantkit eval` on text the calibration never read")
    return text


FIT_OVERLAP_WARN = 0.1  # share of the selection text the method was calibrated on, from which the report says so


def _method(m: dict[str, Any]) -> str:
    if m.get("name", "rtn") == "rtn":
        return "rtn (the scheme's round-to-nearest; use this file with `quantkit rtn`)"
    from quantkit.methods.base import get_method

    defaults = get_method(m["name"]).Options()
    changed = [f"{k} {v}" for k, v in m.get("options", {}).items() if k not in defaults.names() or defaults[k] != v]
    return (f"{m['name']} ({', '.join(changed) or 'default options'}): gains, baseline and expectation measured on its weights; use this file with "
            f"`quantkit {m['name']}`")


def _calib(c: dict[str, Any]) -> str:
    return f"{c.get('samples', '?')} x {c.get('seqlen', '?')} tokens from {c.get('source', '?')} (seed {c.get('seed', '?')})"


def plot_report(report, path: str | Path) -> Path:
    """PNG: KL, R and energy per linear (log scale where useful) with threshold lines, FP16 layers marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise UsageError("the --report chart needs matplotlib: pip install 'quantkit[report]'") from e

    layers = report.layers
    x = list(range(len(layers)))
    flagged = [i for i, e in enumerate(layers) if e.flag == "fp16"]
    th = report.thresholds
    fig, axes = plt.subplots(3, 1, figsize=(max(8, len(layers) * 0.06), 9), sharex=True)
    for ax, (key, label, t, log) in zip(
        axes, (("kl", "KL(P‖Q)", th.kl, True), ("R", "R = range / IQR", th.R, True), ("energy", "σ₁² / ‖W‖²_F", th.energy, False))
    ):
        vals = [getattr(e, key) if getattr(e, key) is not None and math.isfinite(getattr(e, key)) else float("nan")
                for e in layers]
        ax.plot(x, vals, ".", ms=3, color="tab:blue")
        if flagged:
            ax.plot(flagged, [vals[i] for i in flagged], "o", mfc="none", ms=6, color="tab:red", label="kept FP16")
        if t is not None:
            ax.axhline(t, color="tab:red", ls="--", lw=1, label=f"threshold {t:.3g}")
        if log and any(v > 0 for v in vals if v == v):
            ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.legend(loc="upper right", fontsize=7)
    # Block boundaries as light ticks: the x axis is linears in model order.
    blocks = sorted({e.layer for e in layers})
    starts = [next(i for i, e in enumerate(layers) if e.layer == b) for b in blocks]
    step = max(1, len(blocks) // 15)
    axes[-1].set_xticks(starts[::step], [str(b) for b in blocks[::step]])
    axes[-1].set_xlabel("decoder block (linears in model order)")
    fig.suptitle(f"sensitivity scan · {report.scheme.describe()} · {len(flagged)}/{len(layers)} in FP16")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
