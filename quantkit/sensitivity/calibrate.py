"""Threshold calibration (`--target-fraction`) and ground truth (`--measure-ppl`).

Both score fake-quantized perplexity on held-out windows with
`quantkit.sensitivity.partial.quantized_subset`.

Target-fraction search: with N linears and budget k = floor(fraction * N), two
kinds of candidates, all scored by the held-out perplexity of the model with
every other linear quantized; the lowest perplexity wins.

1. Metric rules: for each metric (kl, R, energy, rel_err, fisher), "flag the k (and
   ceil(k/2)) layers with the largest value of that metric", expressed as a
   threshold halfway between the last flagged and the first unflagged value, the
   other metrics off. Up to 10 evaluations (fewer when fisher is off or ties break the budget).
2. Measured restore (`shortlist` S, default 2k): the S layers ranked highest by
   fisher, rel_err, R and kl (taken in turn from each ranking, no repeats) each get a
   restore gain = ppl(all quantized) - ppl(all quantized except that layer), its
   damage with every other layer quantized, so interactions count. The k (and
   ceil(k/2)) largest gains form two more candidates. S + 2 evaluations. These
   candidates are explicit layer lists, not thresholds: the winner's flags are in
   the file, and its thresholds are recorded as all off (mode "target-fraction",
   rule "measured-restore").

Perplexity evaluations in all: 2 (baseline, all quantized) + 10 + S + 2; with the
default model (210 linears, k = 21, S = 42): 56.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from quantkit.recipe import Scheme
from quantkit.sensitivity.metrics import spearman
from quantkit.sensitivity.partial import recovered_fraction, subset_perplexity
from quantkit.sensitivity.scan import LayerScan, Thresholds, apply_thresholds, precision_label

METRICS = ("kl", "R", "energy", "rel_err", "fisher")
# metrics whose rankings build the measured shortlist, in turn; a metric not measured (all nan) is skipped
SHORTLIST_METRICS = ("fisher", "rel_err", "R", "kl")


def _value(e: LayerScan, metric: str) -> float:
    v = getattr(e, metric)
    return -math.inf if v is None or math.isnan(v) else v


def top_k_threshold(layers: Sequence[LayerScan], metric: str, k: int) -> float | None:
    """A threshold on `metric` that flags the top k layers (fewer when values tie at the cut); None for k=0."""
    if k <= 0:
        return None
    vals = sorted((_value(e, metric) for e in layers), reverse=True)
    if k >= len(vals):
        return vals[-1] - 1.0 if math.isfinite(vals[-1]) else -1e300
    hi, lo = vals[k - 1], vals[k]
    if math.isinf(hi) and math.isinf(lo):
        return 1e300
    if math.isinf(hi):
        return lo + 1.0 if math.isfinite(lo) else 1e300
    return (hi + lo) / 2


def shortlist_layers(layers: Sequence[LayerScan], size: int) -> list[LayerScan]:
    """Up to `size` layers: the next best of each ranking in SHORTLIST_METRICS in turn, without repeats."""
    measured = [m for m in SHORTLIST_METRICS if any(math.isfinite(_value(e, m)) for e in layers)]
    rankings = [sorted(layers, key=lambda e, m=m: _value(e, m), reverse=True) for m in measured] or [list(layers)]
    out: list[LayerScan] = []
    seen: set[str] = set()
    pos = [0] * len(rankings)
    size = min(size, len(layers))
    while len(out) < size:
        for r, ranking in enumerate(rankings):
            while pos[r] < len(ranking) and ranking[pos[r]].name in seen:
                pos[r] += 1
            if pos[r] < len(ranking) and len(out) < size:
                out.append(ranking[pos[r]])
                seen.add(ranking[pos[r]].name)
    return out


@torch.no_grad()
def calibrate_thresholds(
    model: nn.Module,
    layers: Sequence[LayerScan],
    scheme: Scheme,
    windows: torch.Tensor,
    fraction: float,
    *,
    device: torch.device | str | None = None,
    batch_size: int = 4,
    shortlist: int | None = None,
    on_step: Callable[[str], None] | None = None,
) -> tuple[Thresholds, list[dict[str, Any]], dict[str, float]]:
    """Pick the layers (at most `fraction` of `layers`) to keep in FP16 that recover the most held-out perplexity.

    shortlist: layers whose restore gain is measured (None = 2k, 0 = no measured candidates).
    Returns (thresholds, candidates [{metric, k, threshold, flagged, ppl, recovered, (layers)}], ppl
    {baseline, all_quantized, mixed, recovered, rule, evaluations}). Sets each layer's flag for the winner
    (and restore_gain for the shortlisted layers).
    """
    if not 0 < fraction < 1:
        from quantkit.errors import UsageError

        raise UsageError(f"--target-fraction {fraction} must be between 0 and 1 (e.g. 0.10)")
    names = [e.name for e in layers]
    k = int(math.floor(fraction * len(layers) + 1e-9))
    say = on_step or (lambda _m: None)
    say("perplexity: baseline")
    base = subset_perplexity(model, windows, [], scheme, device=device, batch_size=batch_size)
    say("perplexity: all quantized")
    all_q = subset_perplexity(model, windows, names, scheme, device=device, batch_size=batch_size)
    candidates: list[dict[str, Any]] = []
    for metric in METRICS:
        for kk in sorted({k, math.ceil(k / 2)}, reverse=True):
            t = top_k_threshold(layers, metric, kk)
            if t is None:
                continue
            th = Thresholds(**{m: (t if m == metric else None) for m in METRICS})
            flagged = apply_thresholds(layers, th, scheme)
            if len(flagged) > k:  # ties at the cut: this candidate breaks the budget
                continue
            say(f"perplexity: {metric} > {t:.4g} ({len(flagged)} layers in FP16)")
            keep = set(flagged)
            ppl = subset_perplexity(
                model, windows, [n for n in names if n not in keep], scheme, device=device, batch_size=batch_size
            )
            candidates.append(
                {"metric": metric, "k": kk, "threshold": t, "flagged": len(flagged), "ppl": ppl,
                 "recovered": recovered_fraction(base, all_q, ppl)}
            )
    n_evals = 2 + len(candidates)
    size = 2 * k if shortlist is None else shortlist
    if k > 0 and size > 0:
        short = shortlist_layers(layers, size)
        for i, e in enumerate(short):
            say(f"perplexity: ({i + 1}/{len(short)}) all quantized but {e.name}")
            ppl_i = subset_perplexity(
                model, windows, [n for n in names if n != e.name], scheme, device=device, batch_size=batch_size
            )
            e.restore_gain = all_q - ppl_i
        n_evals += len(short)
        # only layers whose restore helped on the selection windows; fewer than k when the shortlist is small
        by_gain = sorted((e for e in short if e.restore_gain > 0), key=lambda e: e.restore_gain, reverse=True)
        for kk in sorted({min(k, len(by_gain)), min(math.ceil(k / 2), len(by_gain))} - {0}, reverse=True):
            keep = {e.name for e in by_gain[:kk]}
            say(f"perplexity: {kk} layers with the largest measured restore gain in FP16")
            ppl_m = subset_perplexity(
                model, windows, [n for n in names if n not in keep], scheme, device=device, batch_size=batch_size
            )
            n_evals += 1
            candidates.append(
                {"metric": "measured-restore", "k": kk, "threshold": None, "flagged": len(keep), "ppl": ppl_m,
                 "recovered": recovered_fraction(base, all_q, ppl_m), "shortlist": len(short),
                 "layers": [n for n in names if n in keep]}
            )
    if not candidates:
        th = Thresholds(None, None, None)
        mixed, rule = all_q, None
        apply_thresholds(layers, th, scheme)
    else:
        best = min(candidates, key=lambda c: c["ppl"])
        mixed, rule = best["ppl"], best["metric"]
        if best["metric"] == "measured-restore":
            th = Thresholds(None, None, None)
            keep = set(best["layers"])
            label = precision_label(scheme)
            for e in layers:
                e.flag = "fp16" if e.name in keep else label
        else:
            th = Thresholds(**{m: (best["threshold"] if m == best["metric"] else None) for m in METRICS})
            apply_thresholds(layers, th, scheme)
    ppl = {"baseline": base, "all_quantized": all_q, "mixed": mixed, "recovered": recovered_fraction(base, all_q, mixed),
           "rule": rule, "evaluations": n_evals}
    return th, candidates, ppl


@torch.no_grad()
def measure_layer_ppl(
    model: nn.Module,
    layers: Sequence[LayerScan],
    scheme: Scheme,
    windows: torch.Tensor,
    *,
    device: torch.device | str | None = None,
    batch_size: int = 4,
    baseline: float | None = None,
    on_step: Callable[[int, int, str], None] | None = None,
) -> float:
    """Set each layer's ppl_delta = ppl(only that layer quantized) - baseline. Returns the baseline."""
    if baseline is None:
        baseline = subset_perplexity(model, windows, [], scheme, device=device, batch_size=batch_size)
    for i, e in enumerate(layers):
        if on_step is not None:
            on_step(i, len(layers), e.name)
        e.ppl_delta = subset_perplexity(model, windows, [e.name], scheme, device=device, batch_size=batch_size) - baseline
    return baseline


def correlations(layers: Sequence[LayerScan]) -> dict[str, float]:
    """Spearman rank correlation of each metric (and |skew|) with ppl_delta, over layers that have one."""
    have = [e for e in layers if e.ppl_delta is not None]
    truth = [e.ppl_delta for e in have]
    measured = [m for m in METRICS if any(math.isfinite(_value(e, m)) for e in have)]  # fisher may be off
    out = {m: spearman([_value(e, m) if math.isfinite(_value(e, m)) else 1e300 for e in have], truth) for m in measured}
    out["abs_skew"] = spearman([abs(e.skew) for e in have], truth)
    gained = [e for e in have if e.restore_gain is not None]
    if len(gained) >= 2:  # the shortlist's measured restore gains vs the single-layer damage
        out["restore_gain"] = spearman([e.restore_gain for e in gained], [e.ppl_delta for e in gained])
    return out
