"""Calibrated static scales for run-time quantization (static activations, static KV cache): data only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class StaticScales:
    """Calibrated static scales, all float32 on CPU.

    act: linear full name -> per-tensor input scale, shape (1,) (max|x| / 127).
    kv: attention module full name -> {"k_scale": (kv_heads, head_dim), "v_scale": (kv_heads, head_dim),
        "k_mean_eps": float, "v_mean_eps": float}; the mean errors only when residuals were calibrated.
    """

    act: dict[str, torch.Tensor] = field(default_factory=dict)
    kv: dict[str, dict[str, Any]] = field(default_factory=dict)


def needs_static_scales(act, kv) -> bool:
    """Whether a scheme (ActQuantArgs | None, KVCacheArgs | None) needs an offline calibration pass:
    static activations, a static KV cache, or KV residual statistics."""
    return (act is not None and not act.dynamic) or (kv is not None and (not kv.dynamic or bool(kv.residual_bits)))
