"""SmoothQuant: move activation outliers into the weights, then W8 per-channel weights.

For a norm followed by linears (input_layernorm -> q/k/v, post_attention_layernorm
-> gate/up), with per-input-channel max|X_j| from calibration and max|W_j| over
the consumers' columns:

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

The norm's weight (and bias) is divided by s and every consumer's columns are
multiplied by s: exact in floating point (X diag(1/s) . diag(s) W^T = X W^T).
Only the norm groups of the adapter table are smoothed (the classic SmoothQuant; an MoE
block's input norm feeds every expert and the router, whose columns take the scales too;
Gemma's pre_feedforward_layernorm feeds gate/up, its (1 + w) norms fold as
(1 + w') = (1 + w) / s; OLMo 2 has no norm in front of q/k/v or gate/up, so its
blocks are not smoothed, and each such group is recorded in the run's warnings); linear->linear
groups (v->o, up->down) are left alone: v->o does not fold under GQA and up->down
would put the scale through the SiLU-gated product's other factor.

alpha "auto": per block, try each alpha of `alpha_grid` and keep the one whose
block output under W8 (RTN) + A8 (per-token dynamic) fake quantization is closest
(MSE) to the float block output.

As the final stage it quantizes W8 per output channel, symmetric (RTN); as an
earlier stage (before gptq) it only smooths, and rescales the captured statistics
so the next stage sees the smoothed inputs (H' = diag(1/s) H diag(1/s)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantkit.errors import RecipeError
from quantkit.methods.base import BlockContext, Method, register_method
from quantkit.methods.options import MethodOptions, Number, Numbers, option
from quantkit.models.hooks import linear_input_hooks
from quantkit.quant.awq import fold_scales
from quantkit.quant.core import fake_quantize, fake_quantize_activations, quantize_weight
from quantkit.quant.args import ActQuantArgs

DEFAULT_ALPHA = 0.5
DEFAULT_GRID = tuple(round(0.1 * i, 2) for i in range(11))  # 0.0, 0.1, ..., 1.0
_MIN = 1e-5


def smooth_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^alpha / max|W|^(1-alpha) per input channel, (in,) float32, kept >= 1e-5.

    x_absmax: (in,) max |activation| per channel; w_absmax: (in,) max |weight| per
    input column over all consumers. Zeros are floored so no channel divides by 0.
    """
    x = x_absmax.float().clamp_min(_MIN)
    w = w_absmax.float().clamp_min(_MIN)
    return (x.pow(alpha) / w.pow(1.0 - alpha)).clamp_min(_MIN)


@torch.no_grad()
def fold_smoothing(norm: nn.Module, consumers: list[nn.Linear], s: torch.Tensor, norm_offset: float = 0.0) -> None:
    """Divide the norm's output by s (weight, bias) and multiply each consumer's input columns by s.

    norm.weight: (in,); consumer.weight: (out, in); s: (in,). A norm that scales by
    (offset + weight) (Gemma: 1 + w) gets weight' = (offset + weight) / s - offset.
    """
    fold_scales(norm, consumers, s, norm_offset=norm_offset)  # the one definition of a scale fold


def _rescale_stats(stat, s: torch.Tensor) -> None:
    """Statistics of x become those of x / s (the consumers' new input)."""
    s = s.to(torch.float32)
    if stat.abs_max is not None:
        stat.abs_max = stat.abs_max / s.to(stat.abs_max.device)
    if stat.abs_sum is not None:
        stat.abs_sum = stat.abs_sum / s.to(stat.abs_sum.device)
    if stat.xtx is not None:
        inv = (1.0 / s).to(stat.xtx.device)
        stat.xtx = stat.xtx * inv.view(-1, 1) * inv.view(1, -1)


@dataclass
class SmoothQuantOptions(MethodOptions):
    """alpha: the migration strength in [0, 1], or "auto": per block, the alpha_grid value with the
    smallest fake-quantized output error."""

    alpha: float | str = option(DEFAULT_ALPHA, Number(0, 1, auto=True, parse=True))
    alpha_grid: tuple[float, ...] = option(DEFAULT_GRID, Numbers(0, 1))


@register_method("smoothquant")
class SmoothQuant(Method):
    stats = frozenset({"abs_max"})
    Options = SmoothQuantOptions

    def __init__(self, scheme, **options: Any):
        super().__init__(scheme, **options)
        self.chosen: dict[str, float] = {}  # block name -> alpha used (the artifact of an auto search)

    def resolved_options(self) -> dict[str, Any]:
        # block -> alpha the search kept, for the blocks this process ran (a resumed run's restored blocks are not in it)
        return {"alpha": dict(self.chosen)} if self.opts.alpha == "auto" else {}

    def _groups(self, ctx: BlockContext) -> list[tuple[nn.Module, list[str], list[nn.Module]]]:
        """(norm module, consumer full names, unquantized readers) for each norm-producer group whose
        consumers are all quantized; the readers (an MoE router) take the scales into their columns too."""
        out = []
        linear_rels = set(ctx.spec.linears)
        for g in ctx.groups_here():
            if g.producer in linear_rels:
                continue  # linear -> linear groups: not smoothed (see module docstring)
            names = [ctx.full_name(c) for c in g.consumers]
            if g.unfoldable:  # nothing to smooth into: these inputs are quantized as they are
                ctx.warnings.append(f"smoothquant: {', '.join(names)} not smoothed: {g.unfoldable}")
                continue
            if not all(n in ctx.linears for n in names):
                ctx.warnings.append(f"smoothquant: {', '.join(names)} not smoothed: a consumer is not quantized (ignored)")
                continue
            extra = [ctx.block.get_submodule(r) for r in g.also_scales if ctx.has(r)]
            out.append((ctx.block.get_submodule(g.producer), names, extra))
        return out

    def _scales(self, ctx: BlockContext, groups, alpha: float) -> list[torch.Tensor]:
        scales = []
        for _norm, names, _extra in groups:
            # max |x| over every token: one shared input, or MoE experts' routed tokens together
            x_max = torch.stack([ctx.stats[n].abs_max for n in names if ctx.stats[n].count]).amax(dim=0)
            w_max = torch.cat([ctx.linears[n].weight.detach().float() for n in names], dim=0).abs().amax(dim=0)
            scales.append(smooth_scales(x_max.to(w_max.device), w_max, alpha))
        return scales

    @torch.no_grad()
    def _search_alpha(self, ctx: BlockContext, groups) -> float:
        """The alpha of the grid whose W8A8-fake-quantized block output is closest to the float one."""

        ref = ctx.forward()
        params = {n: m.weight.detach().clone() for n, m in ctx.linears.items()}
        norms = {id(nm): (nm, nm.weight.detach().clone()) for nm, _, _ in groups}
        extras = [(m, m.weight.detach().clone()) for _, _, ex in groups for m in ex]
        act = self.scheme.input_activations or ActQuantArgs(8, "token", dynamic=True)
        if not act.dynamic:  # static scales do not exist yet: a per-tensor scale of each batch stands in
            act = ActQuantArgs(act.bits, "tensor", dynamic=True)
        best, best_err = self.opts.alpha_grid[0], float("inf")
        for alpha in self.opts.alpha_grid:
            self._restore(groups, norms, params, extras, ctx)
            for (nm, names, ex), s in zip(groups, self._scales(ctx, groups, alpha)):
                fold_smoothing(nm, [ctx.linears[n] for n in names] + ex, s, ctx.spec.norm_offset)
            for m in ctx.linears.values():
                m.weight.copy_(fake_quantize(m.weight.data, self.scheme.weights))
            with linear_input_hooks(ctx.linears, lambda _n, x: fake_quantize_activations(x, act)):
                outs = ctx.forward()
            err = sum(float((o.float() - r.float()).pow(2).sum()) for o, r in zip(outs, ref))
            if err < best_err:
                best, best_err = alpha, err
        self._restore(groups, norms, params, extras, ctx)
        return best

    @staticmethod
    def _restore(groups, norms, params, extras, ctx: BlockContext) -> None:
        """Every weight the search touched back to its value before the search."""
        for nm, _, _ in groups:
            nm.weight.copy_(norms[id(nm)][1])
        for n, m in ctx.linears.items():
            m.weight.copy_(params[n])
        for m, w in extras:
            m.weight.copy_(w)

    @torch.no_grad()
    def apply_block(self, ctx: BlockContext) -> None:
        if ctx.spec is None:
            raise RecipeError("smoothquant needs the model's scale groups (an ArchSpec)")
        groups = self._groups(ctx)
        alpha = self._search_alpha(ctx, groups) if self.opts.alpha == "auto" and groups else self.opts.alpha
        if groups:
            self.chosen[ctx.name] = float(alpha)
            for (norm, names, ex), s in zip(groups, self._scales(ctx, groups, float(alpha))):
                fold_smoothing(norm, [ctx.linears[n] for n in names] + ex, s, ctx.spec.norm_offset)
                for n in names:
                    _rescale_stats(ctx.stats[n], s)
        if not self.final:
            return
        for name, linear in ctx.linears.items():
            qt = quantize_weight(linear.weight.data, self.scheme.weights)
            linear.weight.data.copy_(qt.dequantize(linear.weight.dtype))
            ctx.results[name] = qt.to("cpu")
