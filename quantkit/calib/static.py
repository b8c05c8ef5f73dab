"""Offline calibration of static scales (activations per tensor, KV per channel, residual statistics)."""

from __future__ import annotations

import torch
from torch import nn

from quantkit.quant.static import StaticScales
from quantkit.recipe import ActQuantArgs, KVCacheArgs


@torch.no_grad()
def calibrate_static(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    act: ActQuantArgs | None,
    kv: KVCacheArgs | None,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    ignore=("lm_head",),
    k_rotation: torch.Tensor | None = None,
) -> StaticScales:
    """Calibrate static scales of an (already quantized or float) model on input_ids (samples, seqlen).

    Runs the layer-wise pipeline (one block on the device at a time); weights are not changed.
    k_rotation: the model's online R3 (K's scales are then those of K R3, what the cache stores), or None.
    """
    from quantkit.calib.pipeline import run_layerwise
    from quantkit.methods._static_scales import static_scale_collector

    col = static_scale_collector(act, kv, k_rotation)
    run_layerwise(model, input_ids, [col], device=device, batch_size=batch_size, ignore=ignore)
    return col.scales
