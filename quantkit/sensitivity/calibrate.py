"""Threshold calibration (`--target-fraction`) and ground truth (`--measure-ppl`).

Both score fake-quantized perplexity on held-out windows with
`quantkit.sensitivity.partial.quantized_subset`.

Target-fraction search: with N linears and budget k = floor(fraction * N), the
candidates are, for each metric (kl, R, energy), "flag the k (and ceil(k/2))
layers with the largest value of that metric", expressed as a threshold on that
metric halfway between the last flagged and the first unflagged value, the other
metrics off. Each candidate is scored by the held-out perplexity of the model
with every other linear quantized; the lowest perplexity wins. 6 perplexity
evaluations plus the all-quantized and baseline ones.
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
from quantkit.sensitivity.scan import LayerScan, Thresholds, apply_thresholds

METRICS = ("kl", "R", "energy")


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
    on_step: Callable[[str], None] | None = None,
) -> tuple[Thresholds, list[dict[str, Any]], dict[str, float]]:
    """Pick thresholds that flag at most `fraction` of `layers` and recover the most held-out perplexity.

    Returns (thresholds, candidates [{metric, k, threshold, flagged, ppl, recovered}], ppl
    {baseline, all_quantized, mixed, recovered}). Sets each layer's flag for the winner.
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
    if not candidates:
        th = Thresholds(None, None, None)
        mixed = all_q
    else:
        best = min(candidates, key=lambda c: c["ppl"])
        th = Thresholds(**{m: (best["threshold"] if m == best["metric"] else None) for m in METRICS})
        mixed = best["ppl"]
    apply_thresholds(layers, th, scheme)
    ppl = {"baseline": base, "all_quantized": all_q, "mixed": mixed, "recovered": recovered_fraction(base, all_q, mixed)}
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
    out = {m: spearman([_value(e, m) if math.isfinite(_value(e, m)) else 1e300 for e in have], truth) for m in METRICS}
    out["abs_skew"] = spearman([abs(e.skew) for e in have], truth)
    return out
