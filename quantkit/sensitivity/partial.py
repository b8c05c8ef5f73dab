"""Quantize a chosen set of linears in place (fake quantization), score, restore.

One helper serves the target-fraction selection, `--measure-ppl` and the
benchmark: weights of the chosen linears are replaced by their quantized
values (the scheme's RTN, or a method's: quantkit.sensitivity.weights), and for schemes that quantize activations a pre-hook
fake-quantizes each chosen linear's input per token. Everything is restored on
exit, also on error.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from quantkit.quant.core import fake_quantize_activations
from quantkit.recipe import Scheme
from quantkit.sensitivity.weights import RTN, ScanWeights


class QuantizedSubset:
    """The state inside `quantized_subset`: which linears compute quantized, and their float weights."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.floats: dict[str, torch.Tensor] = {}  # name -> float weight (the original)
        self.off: set[str] = set()  # names temporarily back in float (weights and activations)

    @contextmanager
    def restored(self, names: Iterable[str]) -> Iterator[None]:
        """Within the block, these quantized linears compute in float again (weights and activations)."""
        names = [n for n in names if n in self.floats and n not in self.off]
        held = {}
        try:
            with torch.no_grad():
                for n in names:
                    w = self.model.get_submodule(n).weight.data
                    held[n] = w.clone()
                    w.copy_(self.floats[n])
                    self.off.add(n)
            yield
        finally:
            with torch.no_grad():
                for n, wq in held.items():
                    self.model.get_submodule(n).weight.data.copy_(wq)
                    self.off.discard(n)


@contextmanager
def quantized_subset(model: nn.Module, names: Iterable[str], scheme: Scheme,
                     weights: ScanWeights = RTN) -> Iterator[QuantizedSubset]:
    """Within the block, the named linears compute with quantized weights (`weights`; default the scheme's RTN)
    and the scheme's fake-quantized activations.

    Yields a QuantizedSubset whose `restored(names)` puts some of them back in float for a while.
    """
    state = QuantizedSubset(model)
    saved = state.floats
    handles = []
    acts = scheme.input_activations
    try:
        with torch.no_grad():
            for name in names:
                lin = model.get_submodule(name)
                if not isinstance(lin, nn.Linear):
                    raise ValueError(f"{name} is not an nn.Linear")
                saved[name] = lin.weight.data.clone()
                lin.weight.data.copy_(weights.quantized(name, lin.weight.data, scheme.weights))
                if acts is not None:

                    def pre(_mod, args, _a=acts, _n=name):
                        if _n in state.off:
                            return None
                        return (fake_quantize_activations(args[0], _a), *args[1:])

                    handles.append(lin.register_forward_pre_hook(pre))
        yield state
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
    weights: ScanWeights = RTN,
) -> float:
    """Held-out perplexity of `windows` (n, seqlen) with only `names` quantized (with `weights`)."""
    from quantkit.eval.perplexity import perplexity

    with quantized_subset(model, names, scheme, weights):
        return perplexity(model, windows, batch_size=batch_size, device=device).ppl


def recovered_fraction(base: float, all_q: float, mixed: float) -> float:
    """Share of the perplexity gap (all_q - base) that keeping some layers in FP16 wins back."""
    gap = all_q - base
    return (all_q - mixed) / gap if gap != 0 else float("nan")
