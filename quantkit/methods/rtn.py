"""Round-to-nearest: min/max scales, no calibration data needed."""

from __future__ import annotations

import torch

from quantkit.methods.base import BlockContext, Method, register_method
from quantkit.methods.options import RangeSearchOptions
from quantkit.quant.core import QuantizedTensor, quantize, quantize_weight


class RTNOptions(RangeSearchOptions):
    METHOD = "rtn"


@register_method("rtn")
class RTN(Method):
    """Options: mse (false) with mse_grid, mse_max_shrink, mse_norm: the per-group range search
    of quantkit.quant.mse instead of plain min/max scales."""

    stats = frozenset()
    Options = RTNOptions

    def __init__(self, scheme, **options):
        super().__init__(scheme, **options)
        self.mse = self.opts.search

    @torch.no_grad()
    def apply_block(self, ctx: BlockContext) -> None:
        args = self.scheme.weights
        for name, linear in ctx.linears.items():
            w = linear.weight.data
            if self.mse is None:
                qt = quantize_weight(w, args)
            else:
                scale, zero = self.mse.qparams(w, args)
                qt = QuantizedTensor(quantize(w, scale, zero, args), scale, zero, args)
            linear.weight.data.copy_(qt.dequantize(linear.weight.dtype))
            ctx.results[name] = qt.to("cpu")
