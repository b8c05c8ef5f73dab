"""Ground truth for the scan (`--measure-ppl`) and each metric's rank correlation with it.

`measure_layer_ppl` scores fake-quantized perplexity on held-out windows with only one
linear quantized (`quantkit.sensitivity.partial`). The `--target-fraction` selection is
`quantkit.sensitivity.select`: it reads calibration text only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
import torch
from torch import nn

from quantkit.recipe import Scheme
from quantkit.sensitivity.metrics import spearman
from quantkit.sensitivity.partial import subset_perplexity
from quantkit.sensitivity.scan import LayerScan
from quantkit.sensitivity.weights import RTN, ScanWeights

METRICS = ("kl", "R", "energy", "rel_err", "fisher")


def _value(e: LayerScan, metric: str) -> float:
    v = getattr(e, metric)
    return -math.inf if v is None or math.isnan(v) else v


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
    weights: ScanWeights = RTN,
) -> float:
    """Set each layer's ppl_delta = ppl(only that layer quantized, with `weights`) - baseline. Returns the
    baseline."""
    if baseline is None:
        baseline = subset_perplexity(model, windows, [], scheme, device=device, batch_size=batch_size)
    for i, e in enumerate(layers):
        if on_step is not None:
            on_step(i, len(layers), e.name)
        e.ppl_delta = subset_perplexity(model, windows, [e.name], scheme, device=device, batch_size=batch_size,
                                        weights=weights) - baseline
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
