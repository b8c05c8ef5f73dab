"""AWQ's tensor math: per-channel scales, folding them into a producer, clipping search.

Pure functions of tensors (and, for folding, of the modules whose weights they
rewrite); the orchestration over a decoder block lives in `quantkit.methods.awq`.

Shapes: a linear weight is W (out, in); an input channel statistic is (in,);
tokens are X (n, in); per-group quantities are (out, n_groups).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from quantkit.quant.core import _grouped, compute_qparams, dequantize, group_size_for, quantize
from quantkit.quant.args import QuantArgs

# Scales are built from statistics normalised to mean 1 and floored here, so an
# all-zero channel cannot produce a zero (then infinite, once folded) scale.
SCALE_FLOOR = 1e-4


def sanitize_channel_stat(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Make a per-channel statistic (in,) usable for scales: finite and > 0.

    Non-finite entries (a channel that saw inf or NaN) are replaced by the median
    of the finite ones, which gives them a neutral scale (1 if nothing is finite);
    the result is normalised to mean 1 and floored at SCALE_FLOOR (all-zero
    channels). Returns (clean float32 (in,), n_nonfinite, n_zero) where n_zero
    counts the channels that hit the floor.
    """
    x = x.detach().float().abs()
    finite = torch.isfinite(x)
    n_bad = int((~finite).sum())
    if n_bad:
        fill = x[finite].median() if finite.any() else torch.tensor(1.0, device=x.device)
        x = torch.where(finite, x, fill)
    mean = x.mean()
    x = x / mean if mean > 0 else torch.ones_like(x)
    n_zero = int((x < SCALE_FLOOR).sum())
    return x.clamp_min(SCALE_FLOOR), n_bad, n_zero


def weight_channel_mean(weights: Sequence[torch.Tensor], group_size: int | None) -> torch.Tensor:
    """Per input channel mean |w| of the consumers' weights, each normalised per group.

    weights: consumer weights (out_i, in), stacked along out. Every quantization
    group (row, group of `group_size` columns) is divided by its max |w| first, so
    the statistic measures where a channel sits inside its group's range (what
    rounding cares about), not the layer's overall magnitude. Returns (in,) float32.
    """
    w = torch.cat([t.detach().float() for t in weights], dim=0).abs()
    g = w.shape[1] if group_size is None else group_size
    wg = _grouped(w, g)
    wg = wg / wg.amax(dim=-1, keepdim=True).clamp_min(1e-12)
    return wg.reshape(w.shape).mean(dim=0)


def awq_scales(x_mean: torch.Tensor, alpha: float, w_mean: torch.Tensor | None = None) -> torch.Tensor:
    """AWQ's per-input-channel scale s (in,) for one grid point alpha in [0, 1].

    s = x^alpha (or, with w_mean, x^alpha / w^(1-alpha): "duo" scaling), where x
    and w are mean-1 normalised and floored (`sanitize_channel_stat`); then s is
    divided by sqrt(max(s) * min(s)) as llm-awq does, which centres the scales on
    1 in log space so the folded weights keep their magnitude. alpha = 0 without
    w_mean gives s = 1 exactly. The result is always finite and > 0.
    """
    x, _, _ = sanitize_channel_stat(x_mean)
    s = x.pow(alpha)
    if w_mean is not None:
        w, _, _ = sanitize_channel_stat(w_mean)
        s = s / w.pow(1.0 - alpha)
    s = s / (s.max() * s.min()).sqrt()
    if not torch.isfinite(s).all():  # cannot happen with floored inputs; keep the guarantee anyway
        s = torch.where(torch.isfinite(s), s, torch.ones_like(s))
    return s.clamp_min(SCALE_FLOOR)


@torch.no_grad()
def fold_scales(producer: nn.Module, consumers: Sequence[nn.Linear], s: torch.Tensor, *,
                rows: slice | None = None, norm_offset: float = 0.0) -> None:
    """Fold scales s (in,) across producer -> consumers; float outputs are unchanged.

    The producer's output channel c is divided by s[c] (a norm's weight (and bias),
    or a linear's row c and bias[c]) and each consumer's input column c is
    multiplied by s[c]. Math in float32, written back in each weight's dtype.
    rows: the producer rows that feed the consumers (one part of a fused linear,
    e.g. the v rows of qkv_proj); default all. norm_offset: a norm that scales by
    (offset + weight) (Gemma: 1) gets weight' = (offset + weight) / s - offset.
    """
    s = s.float()
    if isinstance(producer, nn.Linear):
        rows = rows if rows is not None else slice(0, producer.out_features)
        w = producer.weight.data[rows]
        if w.shape[0] != s.numel():
            raise ValueError(f"scales of length {s.numel()} do not match producer out_features {w.shape[0]}")
        w.copy_(w.float().div(s.to(w.device)[:, None]))
    else:
        if producer.weight.numel() != s.numel():
            raise ValueError(f"scales of length {s.numel()} do not match norm weight {tuple(producer.weight.shape)}")
        g = producer.weight.float() + norm_offset
        producer.weight.data.copy_(g.div(s.to(producer.weight.device)) - norm_offset)
    bias = getattr(producer, "bias", None)
    if bias is not None:
        b = bias.data[rows] if rows is not None else bias.data
        b.copy_(b.float().div(s.to(b.device)))
    for c in consumers:  # a linear, or any module with a (out, in) weight reading the same input (a router)
        w = c.weight.data
        if w.shape[-1] != s.numel():
            raise ValueError(f"scales of length {s.numel()} do not match consumer in_features {w.shape[-1]}")
        w.copy_(w.float().mul(s.to(w.device)[None, :]))


def fake_quant(w: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """RTN quantize-dequantize of w (out, in) in float32; scales rounded to scale_dtype."""
    scale, zero = compute_qparams(w, args, scale_dtype=scale_dtype)
    return dequantize(quantize(w, scale, zero, args), scale, zero, args)


def scaled_fake_quant(w: torch.Tensor, s: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype | None = None):
    """Q(W diag(s)) diag(s)^-1 for w (out, in), s (in,): what a consumer computes once s
    is folded and it is quantized, seen from its unscaled input. Returns float32."""
    ws = w.float() * s.float()[None, :]
    return fake_quant(ws, args, scale_dtype or w.dtype) / s.float()[None, :]


def _group_range(wg: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    # wg: (out, n_groups, g) -> lo, hi (out, n_groups), the range compute_qparams uses.
    if args.symmetric:
        hi = wg.abs().amax(dim=-1)
        return -hi, hi
    return wg.amin(dim=-1).clamp_max(0), wg.amax(dim=-1).clamp_min(0)


def apply_clip(w: torch.Tensor, shrink: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Clamp w (out, in) per (row, group) to its min/max range times shrink (out, n_groups).

    RTN of the result uses exactly the shrunk range (min/max of the clamped group).
    Returns a tensor of w's dtype.
    """
    g = group_size_for(args, w.shape[1])
    wg = _grouped(w.float(), g)
    lo, hi = _group_range(wg, args)
    sh = shrink.to(wg.device).float()
    out = torch.maximum(torch.minimum(wg, (hi * sh).unsqueeze(-1)), (lo * sh).unsqueeze(-1))
    return out.reshape(w.shape).to(w.dtype)


@torch.no_grad()
def clip_search(
    w: torch.Tensor,
    x: torch.Tensor,
    args: QuantArgs,
    shrinks: Sequence[float],
    *,
    scale_dtype: torch.dtype | None = None,
    oc_batch: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (output channel, group) max-shrink search for RTN of w (out, in) on tokens x (n, in).

    For each shrink the weight is clamped (`apply_clip`) and fake-quantized; the
    loss of a (row, group) is the MSE over tokens of that group's partial output
    x[:, group] @ w[row, group] against the float one (AutoAWQ's criterion: groups
    are chosen independently). Include 1.0 in `shrinks` to make "no clipping" a
    candidate; ties keep the earlier shrink. Returns (best shrink, best loss, loss at
    the first shrink), each (out, n_groups) float32. Output rows go `oc_batch` at a
    time to bound memory at about n * n_groups * oc_batch floats per tensor.
    """
    out_f, in_f = w.shape
    g = group_size_for(args, in_f)
    n_g = in_f // g
    sdt = scale_dtype or w.dtype
    xg = _grouped(x.float(), g).permute(1, 0, 2)  # (n_g, n, g)
    best = torch.ones(out_f, n_g, device=w.device)
    best_err = torch.full((out_f, n_g), float("inf"), device=w.device)
    first_err = torch.empty(out_f, n_g, device=w.device)
    for o0 in range(0, out_f, oc_batch):
        wb = w[o0 : o0 + oc_batch].float()  # (ob, in)
        ref = torch.bmm(xg, _grouped(wb, g).permute(1, 2, 0))  # (n_g, n, ob)
        for i, sh in enumerate(shrinks):
            shrink = torch.full((wb.shape[0], n_g), float(sh), device=w.device)
            wq = fake_quant(apply_clip(wb, shrink, args), args, sdt)
            cur = torch.bmm(xg, _grouped(wq, g).permute(1, 2, 0))
            err = (cur - ref).pow(2).mean(dim=1).T  # (ob, n_g)
            if i == 0:
                first_err[o0 : o0 + oc_batch] = err
            better = err < best_err[o0 : o0 + oc_batch]
            best_err[o0 : o0 + oc_batch] = torch.where(better, err, best_err[o0 : o0 + oc_batch])
            best[o0 : o0 + oc_batch] = torch.where(better, shrink, best[o0 : o0 + oc_batch])
    return best, best_err, first_err
