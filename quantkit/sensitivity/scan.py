"""The sensitivity scan: one layer-wise pass that measures every linear, changing nothing.

A consumer of the calibration pipeline (`quantkit.calib.pipeline.run_layerwise` with no
method and one `BlockConsumer`): a scan is not a quantization method, it must not touch
weights, and it needs each linear's *outputs*, which the methods' capture pass does not
record. So the pipeline taps every linear of each block while the block runs on the
calibration batches: the tap sees the linear's float input x and float output
y = x W^T + b, and computes on the same x the scheme's fake-quantized output
yq = fq_a(x) fq_w(W)^T + b (fq_a only for schemes that quantize activations, per-token
dynamic as the W8A8 kernels do; fq_w the scheme's RTN, or GPTQ's weights with `scan
--method gptq`: quantkit.sensitivity.weights). With no method, the block's float outputs feed the next
block, so every layer is measured on the inputs it gets in the float model; and the scan
streams blocks and keeps activations off the device wherever the pipeline can.

Histogram range: fixed per linear from the first batch (min/max of y and yq,
widened by 25% of the span on each side); later values outside it are clipped
into the edge bins. One pass, constant memory; the clip fraction is recorded.
R's quartiles come from a seeded random subsample of the inputs (at most
`r_sample` values per linear, spread evenly over batches); min and max are exact.

Token subsample (`stat_tokens`): the output statistics (histograms, KL, skew,
relative error) need yq = fq_a(x) fq_w(W)^T, a second matmul per linear, and two
(tokens, channels) histograms; both cost as much as the float forward itself. So
they are computed on at most `stat_tokens` rows per linear, a seeded random
subset spread evenly over the batches (default 16384 of the 65536 tokens of a
128 x 512 calibration set). The float forward that feeds the next block still
sees every token. fq_w(W) is computed once per linear (float32), not per batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.calib.pipeline import BlockView, LinearTap, run_layerwise
from quantkit.models.adapter import ModelAdapter
from quantkit.quant.core import fake_quantize_activations
from quantkit.recipe import Scheme
from quantkit.sensitivity import metrics
from quantkit.sensitivity.metrics import DEFAULT_BINS
from quantkit.sensitivity.weights import RTN, ScanWeights

RANGE_MARGIN = 0.25  # share of the first batch's span added on each side of the histogram range
R_SAMPLE = 1 << 16  # input values per linear kept for R's quartiles
STAT_TOKENS = 1 << 14  # token rows per linear for the output statistics (see module docstring)
# Fixed thresholds that flag more than this share of linears are almost surely not calibrated for the model.
MOST_FLAGGED = 0.5


@dataclass(frozen=True)
class Thresholds:
    """A linear stays in FP16 when any enabled metric exceeds its threshold (None = that metric is off)."""

    kl: float | None = 0.02
    R: float | None = 15.0
    energy: float | None = 0.42
    rel_err: float | None = None  # off by default; the target-fraction search may pick it
    fisher: float | None = None  # likewise

    def flags(
        self, kl: float, R: float, energy: float, rel_err: float | None = None, fisher: float | None = None
    ) -> bool:
        pairs = ((kl, self.kl), (R, self.R), (energy, self.energy), (rel_err, self.rel_err), (fisher, self.fisher))
        return any(t is not None and v is not None and not math.isnan(v) and v > t for v, t in pairs)

    def to_dict(self) -> dict[str, Any]:
        return {"kl": self.kl, "R": self.R, "energy": self.energy, "rel_err": self.rel_err, "fisher": self.fisher}


@dataclass
class LayerScan:
    """What the scan measured for one linear. hist: (bins,) float64 pooled float-output counts over [lo, hi]."""

    name: str
    layer: int
    op: str
    kl: float
    R: float
    energy: float
    skew: float
    hist: torch.Tensor
    lo: float
    hi: float
    clipped: float  # share of output values (float and quantized) outside [lo, hi]
    rel_err: float = math.nan  # sum ||yq - y||^2 / sum ||y||^2 over the sampled tokens
    fisher: float = math.nan  # gradient-weighted output error (quantkit.sensitivity.fisher); nan = not measured
    flag: str = ""
    ppl_delta: float | None = None  # held-out ppl change with only this layer quantized (--measure-ppl)
    # ppl(all quantized) - ppl(all quantized but this layer): its damage with every other layer quantized
    # (measured for the target-fraction shortlist only)
    restore_gain: float | None = None

    def metrics(self) -> dict[str, float]:
        return {"kl": self.kl, "R": self.R, "energy": self.energy, "skew": self.skew, "rel_err": self.rel_err,
                "fisher": self.fisher}


def precision_label(scheme: Scheme) -> str:
    return f"int{scheme.weights.bits}"


def apply_thresholds(layers: Sequence[LayerScan], thresholds: Thresholds, scheme: Scheme) -> list[str]:
    """Set each layer's flag ("fp16" or the scheme's int label); returns the flagged names in order."""
    q = precision_label(scheme)
    out = []
    for e in layers:
        e.flag = "fp16" if thresholds.flags(e.kl, e.R, e.energy, e.rel_err, e.fisher) else q
        if e.flag == "fp16":
            out.append(e.name)
    return out


class _Observer:
    """Accumulates one linear's statistics over calibration batches (everything on the linear's device)."""

    def __init__(
        self, linear: nn.Linear, wq: torch.Tensor, scheme: Scheme, bins: int, r_per_batch: int, rows_per_batch: int,
        gen: torch.Generator,
    ):
        self.linear = linear
        self.scheme = scheme
        self.bins = bins
        self.r_per_batch = r_per_batch
        self.rows_per_batch = rows_per_batch
        self.gen = gen
        self.err2 = self.ref2 = 0.0  # float64 sums of ||yq - y||^2 and ||y||^2
        self.wq = wq  # (out, in) float32: the quantized weight (ScanWeights)
        self.p = self.q = None
        self.lo = self.hi = 0.0
        self.clipped = 0
        self.total = 0
        self.xmin, self.xmax = math.inf, -math.inf
        self.samples: list[torch.Tensor] = []
        self.moments = metrics.Moments()

    @torch.no_grad()
    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        # x: (..., in_features) float input; y: (..., out_features) float output
        x = x.reshape(-1, x.shape[-1])
        y = y.reshape(-1, y.shape[-1])
        self.xmin = min(self.xmin, float(x.min()))  # extremes over every token, statistics on a subsample
        self.xmax = max(self.xmax, float(x.max()))
        flat = x.reshape(-1)
        k = min(self.r_per_batch, flat.numel())
        # with replacement: a randperm of a (tokens x in_features) batch per linear cost more than the matmuls
        idx = torch.randint(flat.numel(), (k,), generator=self.gen).to(flat.device)
        self.samples.append(flat[idx].float().cpu())
        if x.shape[0] > self.rows_per_batch:
            rows = torch.randperm(x.shape[0], generator=self.gen)[: self.rows_per_batch].to(x.device)
            x, y = x[rows], y[rows]
        x, y = x.float(), y.float()
        acts = self.scheme.input_activations
        xq = fake_quantize_activations(x, acts) if acts is not None else x
        bias = None if self.linear.bias is None else self.linear.bias.float()
        yq = F.linear(xq, self.wq, bias)
        if self.p is None:
            lo = min(float(y.min()), float(yq.min()))
            hi = max(float(y.max()), float(yq.max()))
            span = max(hi - lo, 1e-6)
            self.lo, self.hi = lo - RANGE_MARGIN * span, hi + RANGE_MARGIN * span
        self.clipped += int(((y < self.lo) | (y > self.hi)).sum()) + int(((yq < self.lo) | (yq > self.hi)).sum())
        self.total += 2 * y.numel()
        p = metrics.channel_histograms(y, self.lo, self.hi, self.bins)
        q = metrics.channel_histograms(yq, self.lo, self.hi, self.bins)
        self.p = p if self.p is None else self.p + p
        self.q = q if self.q is None else self.q + q
        self.err2 += float((yq - y).double().square().sum())
        self.ref2 += float(y.double().square().sum())
        self.moments.add(y)

    def result(self, name: str, layer: int, op: str) -> LayerScan:
        if self.p is None:
            raise RuntimeError(f"{name} never ran during the scan; is it used by the block's forward?")
        return LayerScan(
            name=name,
            layer=layer,
            op=op,
            kl=metrics.kl_divergence(self.p, self.q),
            R=metrics.range_ratio(torch.cat(self.samples), self.xmin, self.xmax),
            energy=metrics.energy_ratio(self.linear.weight.data),
            skew=self.moments.skewness,
            hist=self.p.sum(dim=0).cpu(),
            lo=self.lo,
            hi=self.hi,
            clipped=self.clipped / max(self.total, 1),
            rel_err=metrics.relative_error(self.err2, self.ref2),
        )


class _ScanConsumer:
    """The scan as a pipeline consumer: an observer per linear of each block, a LayerScan per linear at its end."""

    name = "scan"

    def __init__(self, adapter: ModelAdapter, scheme: Scheme, weights: ScanWeights, bins: int, r_per_batch: int,
                 rows_per_batch: int, gen: torch.Generator):
        self.adapter = adapter
        self.weights = weights
        self._observer_args = (scheme, bins, r_per_batch, rows_per_batch, gen)
        self.layers: list[LayerScan] = []
        self._observers: dict[str, _Observer] = {}

    def begin(self, view: BlockView) -> dict[str, LinearTap]:
        args = self._observer_args[0].weights
        self._observers = {k: _Observer(v, self.weights.quantized(k, v.weight.data.float(), args), *self._observer_args)
                           for k, v in view.linears.items()}
        return {k: obs.add for k, obs in self._observers.items()}

    def end(self, view: BlockView) -> None:
        for k, obs in self._observers.items():
            if obs.p is None and self.adapter.is_expert(k):
                continue  # an MoE expert no calibration token was routed to: nothing to score (run_scan says so)
            self.layers.append(obs.result(k, view.index, self.adapter.op_of(k[len(view.name) + 1 :])))
        self._observers = {}


@torch.no_grad()
def scan_layers(
    model: nn.Module,
    input_ids: torch.Tensor,
    scheme: Scheme,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    ignore: Sequence[str] = (),
    bins: int = DEFAULT_BINS,
    r_sample: int = R_SAMPLE,
    stat_tokens: int | None = STAT_TOKENS,
    seed: int = 0,
    on_block: Callable[[int, int, str, str], None] | None = None,
    stream=None,
    activations: str = "device",
    weights: ScanWeights = RTN,
) -> list[LayerScan]:
    """Measure every non-ignored linear of the decoder blocks on `input_ids` (samples, seqlen).

    One block on `device` at a time; weights are never changed (tested). Returns
    one LayerScan per linear, in model order, flags unset (see `apply_thresholds`).
    stat_tokens: token rows per linear for the output statistics (None = all).
    stream (quantkit.models.streaming.StreamedModel; `model` is its skeleton) and activations
    ("device", "host", "disk"): as `run_layerwise` takes them; the results do not depend on either.
    weights: the quantized weights compared against (quantkit.sensitivity.weights; default the scheme's RTN).
    """
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    if stat_tokens is not None and stat_tokens < 1:
        raise ValueError(f"stat_tokens must be >= 1 (or None for all tokens), got {stat_tokens}")
    n_batches = math.ceil(input_ids.shape[0] / batch_size)
    r_per_batch = max(1, math.ceil(r_sample / n_batches))
    rows_per_batch = input_ids.numel() if stat_tokens is None else max(1, math.ceil(stat_tokens / n_batches))
    scan = _ScanConsumer(ModelAdapter.for_model(model), scheme, weights, bins, r_per_batch, rows_per_batch,
                         torch.Generator().manual_seed(seed))
    run_layerwise(model, input_ids, [], consumers=[scan], device=device, batch_size=batch_size, ignore=ignore,
                  on_block=on_block, stream=stream, activations=activations)
    return scan.layers


@dataclass
class ScanReport:
    """A finished scan: what `sensitive_layers.json` holds (see `quantkit.sensitivity.io`)."""

    layers: list[LayerScan]
    scheme: Scheme
    thresholds: Thresholds
    source: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    bins: int = DEFAULT_BINS
    mode: str = "fixed"  # or "target-fraction"
    target_fraction: float | None = None
    search: list[dict[str, Any]] | None = None  # the target-fraction candidates and their scores
    ppl: dict[str, Any] | None = None  # baseline / all-quantized / flagged-FP16 perplexities
    selection_data: dict[str, Any] | None = None  # the target-fraction search's measurements (Selection.measurements)
    correlations: dict[str, float] | None = None  # Spearman of each metric with ppl_delta
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    method: dict[str, Any] = field(default_factory=lambda: {"name": "rtn", "options": {}})  # ScanWeights.record()

    @property
    def flagged(self) -> list[str]:
        return [e.name for e in self.layers if e.flag == "fp16"]
