"""Round-to-nearest: min/max scales, no calibration data needed."""

from __future__ import annotations

import torch

from quantkit.methods.base import BlockContext, Method, register_method
from quantkit.quant.core import quantize_weight


@register_method("rtn")
class RTN(Method):
    stats = frozenset()

    @torch.no_grad()
    def apply_block(self, ctx: BlockContext) -> None:
        args = self.scheme.weights
        for name, linear in ctx.linears.items():
            qt = quantize_weight(linear.weight.data, args)
            linear.weight.data.copy_(qt.dequantize(linear.weight.dtype))
            ctx.results[name] = qt.to("cpu")
