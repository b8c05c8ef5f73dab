"""Quantization primitives: scales and zero points, quantize, dequantize, fake-quant.

Shapes: a weight is W (out_features, in_features). With group size g, the input
dimension splits into in_features // g groups; scale and zero are (out_features,
n_groups) (n_groups = 1 for per-channel). Integers are signed, in
[args.qmin, args.qmax], held in int8 tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.errors import RecipeError
from quantkit.kernels.numerics import (  # noqa: F401  (re-exported: the weight quantizer's definition)
    _grouped,
    compute_qparams,
    group_size_for,
    round_scale,  # noqa: F401
)
from quantkit.quant.args import QuantArgs

@dataclass
class QuantizedTensor:
    """The canonical quantized form of one weight, shared by methods, export and runtime.

    q: int8 (out, in) signed integers; scale: float32 (out, n_groups);
    zero: int8 (out, n_groups) or None when symmetric.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    args: QuantArgs

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.q, self.scale, self.zero, self.args).to(dtype)

    def to(self, device: torch.device | str) -> "QuantizedTensor":
        zero = None if self.zero is None else self.zero.to(device)
        return QuantizedTensor(self.q.to(device), self.scale.to(device), zero, self.args)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, args: QuantArgs) -> torch.Tensor:
    """Integers for w (out, in) given per-group scale/zero (out, n_groups). Returns int8 (out, in)."""
    g = w.shape[1] // scale.shape[1]
    wg = _grouped(w.float(), g)
    q = torch.round(wg / scale.unsqueeze(-1))
    if zero is not None:
        q = q + zero.unsqueeze(-1).float()
    return q.clamp(args.qmin, args.qmax).to(torch.int8).reshape(w.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, args: QuantArgs) -> torch.Tensor:
    """Float32 weight (out, in) from integers q (out, in) and scale/zero (out, n_groups)."""
    g = q.shape[1] // scale.shape[1]
    qg = _grouped(q.float(), g)
    if zero is not None:
        qg = qg - zero.unsqueeze(-1).float()
    return (qg * scale.unsqueeze(-1)).reshape(q.shape)


def quantize_weight(w: torch.Tensor, args: QuantArgs) -> QuantizedTensor:
    """Round-to-nearest quantization of w (out, in) with min/max scales."""
    scale, zero = compute_qparams(w, args)
    return QuantizedTensor(quantize(w, scale, zero, args), scale, zero, args)


def fake_quantize(w: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """quantize then dequantize, in w's dtype."""
    return quantize_weight(w, args).dequantize(w.dtype)


def valid_group_sizes(in_features: list[int] | set[int], candidates=(16, 32, 64, 128, 256, 512, 1024)) -> list[int]:
    """Candidate group sizes that divide every given in_features."""
    return [g for g in candidates if all(k % g == 0 for k in in_features)]


def check_group_size(layers: dict[str, int], args: QuantArgs) -> None:
    """Refuse, before any work starts, a group size that does not divide some layers.

    layers: module name -> in_features. The message names the layers (a few) and
    the group sizes that would work for all of them.
    """
    if args.group_size is None:
        return
    bad = {name: k for name, k in layers.items() if k % args.group_size}
    if not bad:
        return
    sizes = sorted(set(bad.values()))
    shown = ", ".join(list(bad)[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    ok = valid_group_sizes(set(layers.values()))
    fix = (
        f"use --group-size {' or '.join(map(str, ok[-3:][::-1]))}" if ok else "omit --group-size for per-channel scales"
    )
    raise RecipeError(
        f"group size {args.group_size} does not divide in_features {'/'.join(map(str, sizes))} of {shown}; {fix}"
    )


def quantize_activations(x: torch.Tensor, args, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations as a W8A8 (or W4A4) kernel quantizes them: (q int8 of x's shape, scale broadcastable to x).

    x: (..., features). args: `ActQuantArgs`. Per-token dynamic scales are max|row| / qmax;
    per-tensor uses `scale` (static, calibrated) when given, else max|x| / qmax (dynamic).
    The integers come from `quantize_symmetric_ref` (quantkit.kernels.act_quant), the one
    definition the kernels implement: ties away from zero, range [-qmax, qmax].
    """
    from quantkit.kernels.act_quant import EPS, per_token_quant_ref, quantize_symmetric_ref

    qmax = args.qmax
    if scale is None and args.strategy == "token":
        return per_token_quant_ref(x, qmax)
    if scale is None:
        scale = x.detach().float().abs().amax().clamp_min(EPS) / qmax
    scale = scale.float().to(x.device)
    return quantize_symmetric_ref(x, scale, qmax), scale


def fake_quantize_activations(x: torch.Tensor, args, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize activations as a W8A8 kernel would see them (see `quantize_activations`).

    Returns a tensor of x's dtype and shape."""
    q, s = quantize_activations(x, args, scale)
    return (q.float() * s).to(x.dtype)
