"""MSE-optimal range per group: pick, per (row, group), the shrink of the min/max range that quantizes
the group's weights with the least error.

min/max scales spend grid steps on the group's largest weights; shrinking the range (clipping those
few weights) rounds the many small ones more finely. For each shrink p on a grid from 1.0 down to
1 - max_shrink the group's scale/zero are `compute_qparams(w, args, shrink=p)` (the range times p,
still containing 0), and the error is sum |w - dequant(quant(w))|^norm over the group's weights;
the smallest error wins (ties keep the larger shrink, so 1.0 = min/max unless something beats it).
This is the search GPTQ's reference quantizer runs with `mse` on (norm 2.4, a 0.01-step grid).

RTN runs it on the weight; GPTQ where it computes its group scales (static groups: the original
weights before the solve; dynamic groups: the group's error-compensated weights when the solve
reaches it). Shapes: w (out, in); scale/zero/shrink (out, n_groups).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from quantkit.errors import short_repr
from quantkit.quant.core import _grouped, compute_qparams, dequantize, group_size_for, quantize
from quantkit.recipe import QuantArgs, RecipeError

# Recipe options of every method that accepts the search (rtn, gptq); `from_options` reads them.
OPTIONS = ("mse", "mse_grid", "mse_max_shrink", "mse_norm", "mse_weight")
DEFAULTS = {"mse": False, "mse_grid": 50, "mse_max_shrink": 0.5, "mse_norm": 2.4, "mse_weight": "none"}
# mse_weight "hessian" (GPTQ only): each input column's error counts by its Hessian diagonal (the mean squared
# input it multiplies), so clipping a weight that meets large activations costs what it costs the output.
WEIGHTS = ("none", "hessian")
MAX_GRID = 1000  # a grid of 10^9 points would be a billion passes over the weight: refused

# Rows per chunk: bounds the search's temporaries to ~_CHUNK_ELEMS floats per tensor on any layer size.
_CHUNK_ELEMS = 1 << 22


@dataclass(frozen=True)
class MSESearch:
    """grid: shrink factors tried (>= 1), from 1.0 down to 1 - max_shrink; norm: the error's exponent p;
    weight: "none", or "hessian" (the caller passes col_weight = the Hessian diagonal)."""

    grid: int = DEFAULTS["mse_grid"]
    max_shrink: float = DEFAULTS["mse_max_shrink"]
    norm: float = DEFAULTS["mse_norm"]
    weight: str = DEFAULTS["mse_weight"]

    def describe(self) -> str:
        """One line for run summaries and manifests."""
        what = "Hessian-weighted" if self.weight == "hessian" else "unweighted"
        return f"{what} range search, p {self.norm:g}, {self.grid} shrinks down to {1 - self.max_shrink:g}"

    def shrinks(self) -> list[float]:
        if self.grid == 1:
            return [1.0]
        return [1.0 - self.max_shrink * i / (self.grid - 1) for i in range(self.grid)]

    def qparams(self, w: torch.Tensor, args: QuantArgs, *, scale_dtype: torch.dtype | None = None,
                col_weight: torch.Tensor | None = None):
        """(scale, zero or None) for w (out, in) like `compute_qparams`, with the best shrink per group;
        col_weight (in,): each column's error weight (None = 1)."""
        scale, zero, _ = mse_qparams(w, args, self.shrinks(), norm=self.norm, scale_dtype=scale_dtype,
                                     col_weight=col_weight)
        return scale, zero


def _errors(wg, s, z, args: QuantArgs, norm: float, buf: torch.Tensor, cw: torch.Tensor | None = None) -> torch.Tensor:
    """group_errors on grouped weights wg (rows, n_groups, g), in place in buf: the same float ops as
    quantize + dequantize (the int8 round trip is exact), so the same numbers, in fewer passes."""
    s3 = s.unsqueeze(-1)
    torch.div(wg, s3, out=buf).round_()
    if z is not None:
        z3 = z.unsqueeze(-1).float()
        buf.add_(z3).clamp_(args.qmin, args.qmax).sub_(z3)
    else:
        buf.clamp_(args.qmin, args.qmax)
    buf.mul_(s3).sub_(wg).abs_()
    err = buf.square_() if norm == 2 else buf.pow_(norm)
    return (err if cw is None else err.mul_(cw)).sum(-1)


def group_errors(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, args: QuantArgs,
                 norm: float) -> torch.Tensor:
    """sum over each group of |w - dequant(quant(w))|^norm: (out, n_groups) float32, for w (out, in)."""
    g = w.shape[1] // scale.shape[1]
    d = _grouped(w.float() - dequantize(quantize(w, scale, zero, args), scale, zero, args), g)
    return d.abs_().pow_(norm).sum(-1)


@torch.no_grad()
def mse_qparams(w: torch.Tensor, args: QuantArgs, shrinks, *, norm: float = 2.4,
                scale_dtype: torch.dtype | None = None, col_weight: torch.Tensor | None = None):
    """Best shrink per (row, group) of w (out, in) among `shrinks`: (scale, zero or None, shrink), each
    (out, n_groups); scale/zero are exactly `compute_qparams(w, args, shrink=p)`'s for the chosen p.
    col_weight: (in,) >= 0, each column's error weight (None: all 1)."""
    out_f, in_f = w.shape
    sdt = scale_dtype or w.dtype
    g = group_size_for(args, in_f)
    pair = dataclasses.replace(args, group_size=2)
    step = max(1, _CHUNK_ELEMS // max(in_f, 1))
    cw = None if col_weight is None else col_weight.to(w.device, torch.float32).reshape(in_f // g, g)
    scales, zeros, picks = [], [], []
    for r0 in range(0, out_f, step):
        wg = _grouped(w[r0 : r0 + step].float(), g)  # (rows, n_groups, g)
        # Each group's range as a group of two, [min, max]: compute_qparams gives exactly the scale/zero it
        # gives on the whole group (min/max are exact), without reading the weights again per shrink.
        ends = torch.stack([wg.amin(-1), wg.amax(-1)], -1).flatten(1)  # (rows, 2 n_groups)
        buf = torch.empty_like(wg)
        best = best_s = best_z = best_p = None
        for p in shrinks:
            s, z = compute_qparams(ends, pair, shrink=float(p), scale_dtype=sdt)
            err = _errors(wg, s, z, args, norm, buf, cw)
            if best is None:
                best, best_s, best_z = err, s, z
                best_p = torch.full_like(err, float(p))
                continue
            better = err < best  # strict: ties keep the larger shrink
            best = torch.where(better, err, best)
            best_s = torch.where(better, s, best_s)
            best_z = None if z is None else torch.where(better, z, best_z)
            best_p = best_p.masked_fill(better, float(p))
        scales.append(best_s)
        zeros.append(best_z)
        picks.append(best_p)
    scale = torch.cat(scales)
    zero = None if zeros[0] is None else torch.cat(zeros)
    return scale, zero, torch.cat(picks)


def from_options(method: str, opts: dict[str, Any]) -> MSESearch | None:
    """The search a method's recipe options ask for (None when `mse` is off), checked: one line per mistake."""
    o = {**DEFAULTS, **{k: v for k, v in opts.items() if k in OPTIONS}}
    if not isinstance(o["mse"], bool):
        raise RecipeError(f"{method} option mse={short_repr(o['mse'])} must be true or false")
    grid = o["mse_grid"]
    if isinstance(grid, bool) or not isinstance(grid, int) or not 1 <= grid <= MAX_GRID:
        raise RecipeError(f"{method} option mse_grid={short_repr(grid)} must be an integer in 1..{MAX_GRID}; "
                          f"e.g. mse_grid: {DEFAULTS['mse_grid']}")
    ms = o["mse_max_shrink"]
    if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not 0 <= ms < 1:
        raise RecipeError(f"{method} option mse_max_shrink={short_repr(ms)} must be a number in [0, 1); "
                          f"e.g. mse_max_shrink: {DEFAULTS['mse_max_shrink']}")
    norm = o["mse_norm"]
    if isinstance(norm, bool) or not isinstance(norm, (int, float)) or not 0 < norm <= 10:
        raise RecipeError(f"{method} option mse_norm={short_repr(norm)} must be a number in (0, 10]; "
                          f"e.g. mse_norm: {DEFAULTS['mse_norm']}")
    if o["mse_weight"] not in WEIGHTS or (o["mse_weight"] != "none" and method != "gptq"):
        allowed = WEIGHTS if method == "gptq" else ("none",)
        raise RecipeError(f"{method} option mse_weight={short_repr(o['mse_weight'])} must be one of "
                          f"{', '.join(allowed)}" + ("" if method == "gptq" else " (only gptq has a Hessian)"))
    if not o["mse"]:
        return None
    return MSESearch(grid=grid, max_shrink=float(ms), norm=float(norm), weight=o["mse_weight"])
