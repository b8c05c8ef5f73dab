"""Quantize a chosen set of linears in place (fake quantization), score, restore.

One helper serves the target-fraction search, `--measure-ppl` and the
benchmark: weights of the chosen linears are replaced by their RTN
fake-quantized values, and for schemes that quantize activations a pre-hook
fake-quantizes each chosen linear's input per token. Everything is restored on
exit, also on error.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from quantkit.quant.core import fake_quantize, fake_quantize_activations
from quantkit.recipe import Scheme


@contextmanager
def quantized_subset(model: nn.Module, names: Iterable[str], scheme: Scheme) -> Iterator[None]:
    """Within the block, the named linears compute with the scheme's fake-quantized weights (and activations)."""
    saved: dict[str, torch.Tensor] = {}
    handles = []
    acts = scheme.input_activations
    try:
        with torch.no_grad():
            for name in names:
                lin = model.get_submodule(name)
                if not isinstance(lin, nn.Linear):
                    raise ValueError(f"{name} is not an nn.Linear")
                saved[name] = lin.weight.data.clone()
                lin.weight.data.copy_(fake_quantize(lin.weight.data, scheme.weights))
                if acts is not None:

                    def pre(_mod, args, _a=acts):
                        return (fake_quantize_activations(args[0], _a), *args[1:])

                    handles.append(lin.register_forward_pre_hook(pre))
        yield
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for name, w in saved.items():
                model.get_submodule(name).weight.data.copy_(w)


def subset_perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    names: Sequence[str],
    scheme: Scheme,
    *,
    device: torch.device | str | None = None,
    batch_size: int = 4,
) -> float:
    """Held-out perplexity of `windows` (n, seqlen) with only `names` quantized."""
    from quantkit.eval.perplexity import perplexity

    with quantized_subset(model, names, scheme):
        return perplexity(model, windows, batch_size=batch_size, device=device).ppl


def recovered_fraction(base: float, all_q: float, mixed: float) -> float:
    """Share of the perplexity gap (all_q - base) that keeping some layers in FP16 wins back."""
    gap = all_q - base
    return (all_q - mixed) / gap if gap != 0 else float("nan")
