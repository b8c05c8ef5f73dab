"""The quantized weights a scan compares against: the scheme's RTN (default), or what GPTQ makes of them.

Everything the scan measures is a difference between float and quantized: the output
statistics (KL, rel_err), the gradient-weighted error, and the selection's losses (a unit's
restore gain = loss drop when it goes back to float while the rest stays quantized). With
RTN weights those describe what `quantkit rtn --sensitive` exports; `quantkit gptq` exports
other weights, and GPTQ already repairs much of what RTN loses, so a file chosen on RTN
weights spends its budget on the wrong units (BENCHMARKS.md, issue 24).

`method_weights(..., "gptq")` runs the GPTQ stage `quantkit gptq` runs (the same method
class and options, on the scan's calibration batches) over the model once, keeps each
linear's result and puts each block's float weights back as soon as the next block starts
(one block's copy held at a time); the scan then reads those weights wherever it would
compute RTN's.

Approximation (the cheap one): GPTQ runs once with every linear quantized, and a unit is
restored to float on top of that. In real use, with the unit kept FP16, GPTQ quantizes the
remaining linears on inputs the unit computed in float (other Hessians, other errors to
compensate), so the linears after it would come out slightly different. Measuring that
exactly takes one GPTQ run per measured unit (120 for the default model).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantkit.quant.args import QuantArgs
from quantkit.quant.core import QuantizedTensor, fake_quantize
from quantkit.recipe import Recipe, Scheme, Stage

SCAN_METHODS = ("rtn", "gptq")  # rtn: the scheme's round-to-nearest, computed where needed


@dataclass(frozen=True)
class ScanWeights:
    """How the scan quantizes a linear's weight. results: name -> the method's result (None for rtn)."""

    method: str = "rtn"
    options: dict[str, Any] = field(default_factory=dict)
    results: dict[str, QuantizedTensor] | None = None
    warnings: tuple[str, ...] = ()  # the method's own (e.g. a Hessian that needed more damping)

    def quantized(self, name: str, w: torch.Tensor, args: QuantArgs) -> torch.Tensor:
        """Linear `name`'s quantized weight for its float weight w (out, in): w's dtype and device."""
        if self.results is None:
            return fake_quantize(w, args)
        return self.results[name].dequantize(w.dtype).to(w.device)

    def record(self) -> dict[str, Any]:
        """What sensitive_layers.json records as "method"."""
        return {"name": self.method, "options": dict(self.options)}


RTN = ScanWeights()


def check_method(method: str) -> None:
    from quantkit.errors import UsageError, short_repr

    if method not in SCAN_METHODS:
        raise UsageError(f"unknown --method {short_repr(method)}; use {' or '.join(SCAN_METHODS)} "
                         "(the method the scanned file will be used with)")


@torch.no_grad()
def method_weights(
    model: nn.Module,
    input_ids: torch.Tensor,
    scheme: Scheme,
    method: str = "rtn",
    options: dict[str, Any] | None = None,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    ignore: Sequence[str] = (),
    on_block: Callable[[int, int, str, str], None] | None = None,
) -> ScanWeights:
    """The weights `method` gives the model's linears on `input_ids` (samples, seqlen); the model is left
    unchanged. options: the method's recipe-stage options (checked by the method: RecipeError, one line)."""
    from quantkit.calib.pipeline import run_layerwise
    from quantkit.methods.base import build_methods

    check_method(method)
    if method == "rtn":
        if options:
            raise ValueError(f"rtn takes no options here, got {sorted(options)}")
        return RTN
    (m,) = build_methods(Recipe(scheme, (Stage(method, dict(options or {})),), tuple(ignore)))
    keeper = FloatKeeper()
    try:
        result = run_layerwise(model, input_ids, [m], device=device, batch_size=batch_size, ignore=ignore,
                               on_block=on_block, consumers=[keeper])
    finally:
        keeper.restore()
    resolved = {k: m.opts[k] for k in m.opts.names()}
    return ScanWeights(method, resolved, dict(result.results), tuple(result.warnings))


class FloatKeeper:
    """A pipeline consumer that gives each block its float weights back once the next block starts.

    The method changes block i in place and the pipeline computes block i+1's inputs with those
    quantized weights (as `quantkit gptq` does); when block i+1 begins, block i's float weights are
    copied back. So one block's float copy is held at a time (host memory), not the whole model's.
    `restore()` puts back the last one (also after an error)."""

    name = ""  # not a stage of the run: the progress label stays the method's

    def __init__(self) -> None:
        self._held: list[tuple[nn.Module, torch.Tensor]] = []

    def begin(self, view) -> dict:
        self.restore()
        self._held = [(lin, lin.weight.data.to("cpu", copy=True)) for lin in view.linears.values()]
        return {}

    def end(self, view) -> None:
        pass

    @torch.no_grad()
    def restore(self) -> None:
        for lin, w in self._held:
            lin.weight.data.copy_(w)
        self._held = []
