"""Quantization primitives: scales and zero points, quantize, dequantize, fake-quant.

Shapes: a weight is W (out_features, in_features). With group size g, the input
dimension splits into in_features // g groups; scale and zero are (out_features,
n_groups) (n_groups = 1 for per-channel). Integers are signed, in
[args.qmin, args.qmax], held in int8 tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.recipe import QuantArgs, RecipeError

# Smallest scale we allow: keeps all-zero groups from dividing by zero.
_MIN_SCALE = 1e-8


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


def group_size_for(args: QuantArgs, in_features: int) -> int:
    """The number of input columns sharing one scale (in_features for per-channel)."""
    return in_features if args.group_size is None else args.group_size


def _grouped(w: torch.Tensor, g: int) -> torch.Tensor:
    # w: (out, in) -> (out, n_groups, g)
    out_f, in_f = w.shape
    if in_f % g:
        raise ValueError(f"group size {g} does not divide in_features {in_f}")
    return w.reshape(out_f, in_f // g, g)


def round_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Scales as the checkpoint will store them: rounded to `dtype`, kept >0, returned as float32.

    Checkpoints store scales in the model dtype; rounding here keeps the
    in-memory model and the exported one bit-identical.
    """
    if dtype in (torch.float16, torch.bfloat16):
        scale = scale.to(dtype).clamp_min(torch.finfo(dtype).tiny)
    return scale.float().clamp_min(_MIN_SCALE)


def compute_qparams(
    w: torch.Tensor,
    args: QuantArgs,
    *,
    shrink: torch.Tensor | float = 1.0,
    scale_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min/max scales for w (out, in). Returns scale (out, n_groups) float32 and zero or None.

    shrink scales the range before the scale is computed (clipping search); a
    tensor must broadcast against (out, n_groups). scale_dtype (default: w's
    dtype) is the dtype the scale will be stored in; scales are rounded to it.
    """
    g = group_size_for(args, w.shape[1])
    wg = _grouped(w.float(), g)
    sdt = scale_dtype or w.dtype
    if args.symmetric:
        amax = wg.abs().amax(dim=-1) * shrink
        # Full signed range: [-2^(b-1), 2^(b-1)-1] spans 2^b - 1 steps around 0.
        scale = round_scale(amax / ((args.qmax - args.qmin) / 2), sdt)
        return scale, None
    # The range always includes 0 so that 0 is exactly representable.
    wmin = wg.amin(dim=-1).clamp_max(0) * shrink
    wmax = wg.amax(dim=-1).clamp_min(0) * shrink
    scale = round_scale((wmax - wmin) / (args.qmax - args.qmin), sdt)
    zero = torch.round(args.qmin - wmin / scale).clamp(args.qmin, args.qmax)
    return scale, zero.to(torch.int8)


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
