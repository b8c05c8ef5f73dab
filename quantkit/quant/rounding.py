"""Learned rounding (AutoRound-style): signed-gradient descent on per-weight rounding offsets and per-group
range factors, minimizing the error of a block's output, not of each weight.

The quantizer of one weight w (out, in) with group size g:

    ends  = (lo, hi) per group, the range the scale is computed from: (out, 2 n_groups), [lo0, hi0, lo1, ...]
    scale, zero = compute_qparams(ends * F)           the project's one definition (quant.core), F = [beta, alpha]
    q     = clamp(round(w / scale + V) + zero, qmin, qmax)
    w_hat = (q - zero) * scale                         quant.core.dequantize

V (out, in) in [-0.5, 0.5] moves each weight's rounding to the other neighbour; beta, alpha in [0.5, 1] shrink
each group's low and high end (clipping). At V = 0, F = 1 and ends = the group's min/max this is RTN bit for
bit. Training differentiates a mirror of compute_qparams (round through a straight-through estimator); the
forward values of scale and zero are compute_qparams' own (`_scale_zero`), and the result is always rebuilt
with compute_qparams + quant.core.quantize's ops, so every exporter reads plain integer codes and scales.

The loop (`learn_rounding`) follows AutoRound: `steps` SignSGD updates (p -= lr_t * sign(grad)), lr = 1/steps
unless given, decaying linearly to 0, one calibration batch per step (seeded order), and the parameters of the
best step are kept. Steps see different batches, so "best" compares each step's loss to the starting point's
loss on the same batch. The best step is then scored on every batch against the starting point's exact
quantization; the lower total wins, so the result is never worse than the start on the calibration data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from quantkit.quant.args import QuantArgs
from quantkit.quant.core import QuantizedTensor, _grouped, compute_qparams, dequantize, group_size_for

V_RANGE = 0.5  # V in [-V_RANGE, V_RANGE]
F_MIN = 0.5  # beta, alpha in [F_MIN, 1]
CELL = 0.49  # grid_start: how far from its code (in steps) a rounded weight may sit; < 0.5 keeps clear of ties


@dataclass(frozen=True)
class RoundingConfig:
    """steps: SignSGD updates per block (0: the start unchanged); lr: the first step's size (None: 1/steps);
    seed: the batch order."""

    steps: int = 200
    lr: float | None = None
    seed: int = 0

    @property
    def rate(self) -> float:
        return self.lr if self.lr is not None else 1.0 / max(self.steps, 1)


@dataclass
class RoundingStart:
    """Where one linear's search starts (V = 0, F = 1). w: (out, in) the float weights that are rounded;
    ends: (out, 2 n_groups) the (lo, hi) range per group; qt: the start's exact quantization, the result to
    beat; scale_dtype: the dtype scales are stored in."""

    w: torch.Tensor
    ends: torch.Tensor
    qt: QuantizedTensor
    scale_dtype: torch.dtype


def _pair(args: QuantArgs) -> QuantArgs:
    # ends as groups of two: compute_qparams on [lo, hi] gives what it gives on a group with that min/max
    return dataclasses.replace(args, group_size=2)


def rtn_start(w: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype | None = None, *,
              shrink: torch.Tensor | None = None) -> RoundingStart:
    """Start at round-to-nearest (what quant.core.quantize_weight gives); shrink (out, n_groups): each group's
    range times that factor, as quant.mse's search picks it (None: min/max)."""
    sdt = scale_dtype or w.dtype
    wg = _grouped(w.float(), group_size_for(args, w.shape[1]))
    ends = torch.stack([wg.amin(-1), wg.amax(-1)], -1)
    if shrink is not None:
        ends = ends * shrink.unsqueeze(-1)
    ends = ends.flatten(1)
    scale, zero = compute_qparams(ends, _pair(args), scale_dtype=sdt)
    q = codes(w, torch.zeros_like(w, dtype=torch.float32), scale, zero, args)
    return RoundingStart(w.float(), ends, QuantizedTensor(q, scale, zero, args), sdt)


def grid_start(w: torch.Tensor, qt: QuantizedTensor, scale_dtype: torch.dtype | None = None) -> RoundingStart:
    """Start at a given quantization qt of w (e.g. GPTQ's) exactly. The ends are the range qt's grid spans.
    The rounded weights are w clipped into each code's rounding cell: in code units b = c + clamp(w/scale - c,
    -CELL, CELL) with c = q - zero, so V = 0 rounds to qt's codes, a weight whose code is its nearest keeps its
    float value (AutoRound's search), and one that GPTQ moved further sits at its cell's edge on the float
    weight's side: one step of V puts it back on that side."""
    args = qt.args
    g = group_size_for(args, w.shape[1])
    s, z = qt.scale.float(), (torch.zeros_like(qt.scale) if qt.zero is None else qt.zero.float())
    if args.symmetric:
        hi = s * ((args.qmax - args.qmin) / 2)
        lo = -hi
    else:
        lo, hi = (args.qmin - z) * s, (args.qmax - z) * s
    ends = torch.stack([lo, hi], -1).flatten(1)
    c = _grouped(qt.q.float(), g) - z.unsqueeze(-1)
    u = _grouped(w.float(), g) / s.unsqueeze(-1)
    base = ((c + (u - c).clamp(-CELL, CELL)) * s.unsqueeze(-1)).reshape(w.shape)
    return RoundingStart(base, ends, qt, scale_dtype or w.dtype)


def codes(w: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
          args: QuantArgs) -> torch.Tensor:
    """int8 (out, in): clamp(round(w / scale + v) + zero); at v = 0 quant.core.quantize's ops exactly."""
    g = w.shape[1] // scale.shape[1]
    q = torch.round(_grouped(w.float(), g) / scale.unsqueeze(-1) + _grouped(v, g))
    if zero is not None:
        q = q + zero.unsqueeze(-1).float()
    return q.clamp(args.qmin, args.qmax).to(torch.int8).reshape(w.shape)


def exact(start: RoundingStart, v: torch.Tensor, f: torch.Tensor, args: QuantArgs) -> QuantizedTensor:
    """The quantized tensor for offsets v (out, in) and factors f (out, 2 n_groups)."""
    with torch.no_grad():
        scale, zero = compute_qparams(start.ends * f, _pair(args), scale_dtype=start.scale_dtype)
        return QuantizedTensor(codes(start.w, v, scale, zero, args), scale, zero, args)


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _scale_zero(e: torch.Tensor, args: QuantArgs, sdt: torch.dtype):
    """Differentiable (scale, zero) from ends e (out, 2 n_groups): compute_qparams' values, the gradient of
    its formula with round as the identity."""
    with torch.no_grad():
        s_x, z_x = compute_qparams(e, _pair(args), scale_dtype=sdt)
    lo, hi = e[:, 0::2], e[:, 1::2]
    if args.symmetric:
        s = torch.maximum(lo.abs(), hi.abs()) / ((args.qmax - args.qmin) / 2)
        return s + (s_x - s).detach(), None
    lo, hi = torch.minimum(lo, hi).clamp_max(0), torch.maximum(lo, hi).clamp_min(0)
    s = (hi - lo) / (args.qmax - args.qmin)
    s = s + (s_x - s).detach()
    z = _ste_round(args.qmin - lo / s)
    return s, z + (z_x.float() - z).detach()


def fake_quant(start: RoundingStart, v: torch.Tensor, f: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """w_hat (out, in) float32, differentiable in v (out, in) and f (out, 2 n_groups); its values are
    dequantize(exact(start, v, f)) up to float rounding."""
    g = group_size_for(args, start.w.shape[1])
    s, z = _scale_zero(start.ends * f, args, start.scale_dtype)
    x = _grouped(start.w, g) / s.unsqueeze(-1) + _grouped(v, g)
    q = _ste_round(x)
    if z is not None:
        q = (q + z.unsqueeze(-1)).clamp(args.qmin, args.qmax) - z.unsqueeze(-1)
    else:
        q = q.clamp(args.qmin, args.qmax)
    return (q * s.unsqueeze(-1)).reshape(start.w.shape)


def block_loss(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of a block output against its target, in float32."""
    return (y.float() - target.float()).pow(2).mean()


# forward(weights, i): the block's output on calibration batch i with each named linear's weight replaced
# by weights[name] (float32, (out, in)); differentiable in the weights.
BlockForward = Callable[[dict[str, torch.Tensor], int], torch.Tensor]


@dataclass
class RoundingReport:
    """start_loss / final_loss: the block-output MSE summed over every batch, at the start and for the result;
    kept: "learned" or "start" (the learned result did not beat the start); best_step: the step kept."""

    start_loss: float
    final_loss: float
    kept: str
    best_step: int


def _total(forward: BlockForward, weights: dict[str, torch.Tensor], targets: list[torch.Tensor]) -> list[float]:
    with torch.no_grad():
        return [float(block_loss(forward(weights, i), t)) for i, t in enumerate(targets)]


def learn_rounding(starts: dict[str, RoundingStart], args: QuantArgs, forward: BlockForward,
                   targets: list[torch.Tensor], cfg: RoundingConfig) -> tuple[dict[str, QuantizedTensor], RoundingReport]:
    """SignSGD on every linear's offsets and range factors at once, against the block-output MSE.

    starts: name -> where that linear starts; targets: the block output to match per calibration batch
    (batch, seq, hidden); forward: see BlockForward. Returns name -> QuantizedTensor (on the starts' device)
    and a report. Deterministic for a given seed (the batch order) and inputs."""
    start_qt = {n: st.qt for n, st in starts.items()}
    if cfg.steps == 0 or not starts or not targets:
        return start_qt, RoundingReport(0.0, 0.0, "start", 0)
    base = _total(forward, {n: q.dequantize() for n, q in start_qt.items()}, targets)
    v = {n: torch.zeros_like(st.w).requires_grad_(True) for n, st in starts.items()}
    f = {n: torch.ones_like(st.ends).requires_grad_(True) for n, st in starts.items()}
    best = ({n: t.detach().clone() for n, t in v.items()}, {n: t.detach().clone() for n, t in f.items()})
    best_ratio, best_step = float("inf"), 0
    order = _batch_order(len(targets), cfg)
    for step in range(cfg.steps):
        i = order[step]
        with torch.enable_grad():
            weights = {n: fake_quant(starts[n], v[n], f[n], args) for n in starts}
            loss = block_loss(forward(weights, i), targets[i])
            loss.backward()
        ratio = float(loss.detach()) / max(base[i], 1e-30)
        if ratio < best_ratio:  # the parameters this loss was measured at (before this step's update)
            best_ratio, best_step = ratio, step
            best = ({n: t.detach().clone() for n, t in v.items()}, {n: t.detach().clone() for n, t in f.items()})
        lr = cfg.rate * (1.0 - step / cfg.steps)
        with torch.no_grad():
            for p, lo, hi in [(t, -V_RANGE, V_RANGE) for t in v.values()] + [(t, F_MIN, 1.0) for t in f.values()]:
                p.sub_(lr * torch.sign(p.grad)).clamp_(lo, hi)
                p.grad = None
    learned = {n: exact(starts[n], best[0][n], best[1][n], args) for n in starts}
    final = sum(_total(forward, {n: q.dequantize() for n, q in learned.items()}, targets))
    if final < sum(base):
        return learned, RoundingReport(sum(base), final, "learned", best_step)
    return start_qt, RoundingReport(sum(base), sum(base), "start", best_step)


def _batch_order(n: int, cfg: RoundingConfig) -> list[int]:
    """One batch per step: seeded permutations of the n batches, one after another."""
    gen = torch.Generator().manual_seed(cfg.seed)
    out: list[int] = []
    while len(out) < cfg.steps:
        out += torch.randperm(n, generator=gen).tolist()
    return out[: cfg.steps]
