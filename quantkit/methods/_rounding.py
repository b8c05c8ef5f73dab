"""Learned rounding (quantkit.quant.rounding) inside a block: what RTN and GPTQ run when `learned_rounding` is on.

The target is the block as the stage received it (float weights, after any earlier transform stage) run on the
block's calibration inputs as the pipeline holds them, i.e. the outputs of the blocks already quantized before
it. That is the objective GPTQ's Hessians describe too (H = X^T X of those same inputs), and the inputs the
quantized block will see in the model; the float model's own trajectory is not carried by the pipeline.

Every linear of the block is learned at once against the block's output (q/k/v under GQA, a fused qkv_proj,
gate/up are just linears the loss flows through). Mixture-of-experts expert linears are not learned: an
expert's loss would have to see only the tokens routed to it; they keep the method's own rounding, and the
block's warning says so.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from quantkit.methods.base import BlockContext
from quantkit.quant.core import QuantizedTensor
from quantkit.quant.rounding import BlockForward, RoundingConfig, RoundingStart, learn_rounding


def learned_names(ctx: BlockContext, method: str) -> list[str]:
    """The block's quantized linears that learned rounding optimizes (expert linears are left out, with a warning)."""
    ex = ctx.spec.experts.path if ctx.spec is not None and ctx.spec.experts is not None else None
    experts = [n for n in ctx.linears if ex and f".{ex}." in n]
    if experts:
        ctx.warnings.append(f"learned rounding: {len(experts)} expert linear(s) of {ctx.name} keep {method}'s "
                            "rounding (an expert's loss would see only its routed tokens; not learned)")
    return [n for n in ctx.linears if n not in experts]


def float_targets(ctx: BlockContext) -> list[torch.Tensor]:
    """The block's outputs per calibration batch as the block is now (before this stage quantizes it)."""
    if ctx.batch is None:
        raise ValueError("learned rounding needs the pipeline's calibration batches (BlockContext.batch)")
    return [y.detach() for y in ctx.forward()]


@contextmanager
def _frozen(block: nn.Module) -> Iterator[None]:
    """No gradient for the block's own parameters while the rounding parameters train; restored after."""
    flags = [(p, p.requires_grad) for p in block.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _block_forward(ctx: BlockContext) -> BlockForward:
    rel = {n: n.removeprefix(ctx.name + ".") + ".weight" for n in ctx.linears}

    def forward(weights: dict[str, torch.Tensor], i: int) -> torch.Tensor:
        h, kw = ctx.batch(i)
        params = {rel[n]: w.to(ctx.linears[n].weight.dtype) for n, w in weights.items()}
        out = torch.func.functional_call(ctx.block, params, (h,), kw)
        return out[0] if isinstance(out, tuple) else out

    return forward


def refine(ctx: BlockContext, args, starts: dict[str, RoundingStart], targets: list[torch.Tensor],
           cfg: RoundingConfig, method: str) -> None:
    """Learn the rounding of `starts`' linears against `targets`; write the weights back and record the results."""
    if not starts:
        return
    with _frozen(ctx.block):
        results, report = learn_rounding(starts, args, _block_forward(ctx), targets, cfg)
    for n, qt in results.items():
        put(ctx, n, qt)
    if report.kept == "start" and cfg.steps > 0:
        ctx.warnings.append(f"learned rounding: no step beat {method}'s block output error on {ctx.name} "
                            f"({report.start_loss:.4g}); kept {method}'s rounding")


def put(ctx: BlockContext, name: str, qt: QuantizedTensor) -> None:
    """Write one linear's quantized weight into the block and the results."""
    lin = ctx.linears[name]
    lin.weight.data.copy_(qt.dequantize(lin.weight.dtype))
    ctx.results[name] = qt.to("cpu")
