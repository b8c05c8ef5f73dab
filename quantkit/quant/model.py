"""The result of a quantization run, handed from the pipeline to export and eval."""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from quantkit.quant.core import QuantizedTensor
from quantkit.recipe import Recipe


@dataclass
class QuantizedModel:
    """A model whose quantized linears hold their dequantized weights in place.

    model: the transformers model; each name in `modules` is an nn.Linear whose
        `.weight` equals modules[name].dequantize() (so evaluating `model` measures
        the quantized model, and propagation during calibration sees it too).
    modules: full module name (e.g. "model.layers.0.self_attn.q_proj") -> its
        canonical quantized tensor (a streamed run: a mapping that reads each from disk).
    source: JSON-ready facts about the source model (kind, path/id, fingerprint).
    calibration: JSON-ready calibration settings (data source, samples, seqlen, seed).
    static_scales: per-tensor input scales and per-channel KV scales when the
        scheme has static activations or a static KV cache (else None).
    warnings: things the user must know (fallbacks taken, clamped scales), also
        written to the manifest.
    shadow: full name -> quantized tensor of a linear left in float (FP16 kept by
        sensitivity); the runtime can switch it to this version.
    """

    model: nn.Module
    tokenizer: Any
    recipe: Recipe
    modules: Mapping[str, QuantizedTensor]
    source: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # Calibrated static activation / KV-cache scales (quantkit.quant.static.StaticScales), or None.
    static_scales: Any = None
    # Mixed precision (`--sensitive`): linears kept in float in `model` (listed in the
    # checkpoint's ignore) whose quantized versions ship in a sidecar for the runtime,
    # and the mask from sensitive_layers.json that chose them (recorded in the manifest).
    shadow: dict[str, QuantizedTensor] = field(default_factory=dict)
    sensitivity: dict[str, Any] | None = None
    # Run-time rotations the weights assume (SpinQuant R3/R4; quantkit.models.hooks.online_rotation_spec),
    # recorded in the manifest; the model in memory already has their hooks attached.
    online_rotations: dict[str, Any] | None = None
    # Per method name, what a training transform did (SpinQuant: {"log": per-step loss, orthogonality
    # error, seconds, held-out loss; "best_step", "best_val_loss", "start_val_loss", ...}).
    training: dict[str, dict] = field(default_factory=dict)
    # What the recipe's "auto" options became, one entry per stage that had any: {"stage": 1-based index,
    # "method", option: value} (Method.resolved_options); in the manifest and the run summary.
    resolved_options: list[dict[str, Any]] = field(default_factory=list)
    # A streamed run (quantkit.models.streaming): `model` is a meta skeleton and this reads any of its
    # state-dict tensors (the saved blocks from OUT.partial, the rest from the source shards); None otherwise.
    tensors: Callable[[str], Any] | None = None
    # A streamed run: whether a quantized linear's weight (full state-dict name) was already proved equal to
    # its quantized tensor's dequantization when its block was saved (export need not read it back to check).
    weight_checked: Callable[[str], bool] | None = None
