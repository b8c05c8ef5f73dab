"""Round-to-nearest: min/max scales, no calibration data needed (unless learned rounding is on)."""

from __future__ import annotations

import torch

from quantkit.methods import _rounding
from quantkit.methods.base import BlockContext, Method, register_method
from quantkit.methods.options import WeightQuantizerOptions
from quantkit.quant.core import QuantizedTensor, quantize, quantize_weight
from quantkit.quant.mse import mse_qparams
from quantkit.quant.rounding import rtn_start


class RTNOptions(WeightQuantizerOptions):
    METHOD = "rtn"


@register_method("rtn")
class RTN(Method):
    """Options: mse (false) with mse_grid, mse_max_shrink, mse_norm: the per-group range search
    of quantkit.quant.mse instead of plain min/max scales. learned_rounding (false) with rounding_steps,
    rounding_lr, rounding_seed: start from that rounding and learn it against the block output
    (quantkit.quant.rounding; needs calibration data)."""

    stats = frozenset()
    Options = RTNOptions

    def __init__(self, scheme, **options):
        super().__init__(scheme, **options)
        self.mse = self.opts.search_for(scheme)

    @property
    def uses_data(self) -> bool:
        return self.opts.rounding is not None

    @torch.no_grad()
    def apply_block(self, ctx: BlockContext) -> None:
        args = self.scheme.weights
        if self.opts.rounding is None:
            for name, linear in ctx.linears.items():
                _rounding.put(ctx, name, self._quantize(linear.weight.data))
            return
        targets = _rounding.float_targets(ctx)
        learned = _rounding.learned_names(ctx, "rtn")
        starts = {n: rtn_start(ctx.linears[n].weight.data, args, shrink=self._shrink(ctx.linears[n].weight.data))
                  for n in learned}
        for name, linear in ctx.linears.items():
            if name not in starts:
                _rounding.put(ctx, name, self._quantize(linear.weight.data))
        _rounding.refine(ctx, args, starts, targets, self.opts.rounding, "rtn")

    def _quantize(self, w: torch.Tensor) -> QuantizedTensor:
        args = self.scheme.weights
        if self.mse is None:
            return quantize_weight(w, args)
        scale, zero = self.mse.qparams(w, args)
        return QuantizedTensor(quantize(w, scale, zero, args), scale, zero, args)

    def _shrink(self, w: torch.Tensor) -> torch.Tensor | None:
        """The range search's chosen shrink per group (None: min/max), where learned rounding starts."""
        if self.mse is None:
            return None
        return mse_qparams(w, self.scheme.weights, self.mse.shrinks(), norm=self.mse.norm)[2]
