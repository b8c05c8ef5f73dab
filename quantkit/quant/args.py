"""Quantization arguments and schemes: how a weight, an activation or the KV cache is quantized.

Data only, checked on construction (a bad value raises RecipeError). The tensor
primitives (quant/) read these; recipe.py builds recipes from them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from quantkit.errors import RecipeError, short_repr

SUPPORTED_BITS = (2, 3, 4, 8)



@dataclass(frozen=True)
class QuantArgs:
    """How one tensor is quantized.

    bits: 2, 3, 4 or 8.
    group_size: None = one scale per output channel; else this many consecutive
        input columns share a scale (must divide every quantized layer's in_features).
    symmetric: True = zero point 0; False = a per-group zero point.

    Integers are stored signed in [-2^(bits-1), 2^(bits-1) - 1] with signed zero
    points (the compressed-tensors convention); exporters for other layouts shift
    them. Dequantized value = (q - zero) * scale.
    """

    bits: int = 4
    group_size: int | None = None
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise RecipeError(f"bits={self.bits} is not supported; use one of {', '.join(map(str, SUPPORTED_BITS))}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise RecipeError(f"group_size={short_repr(self.group_size)} must be a positive integer (or omitted for per-channel)")

    @property
    def strategy(self) -> str:
        return "channel" if self.group_size is None else "group"

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def describe(self) -> str:
        g = "per-channel" if self.group_size is None else f"group {self.group_size}"
        return f"W{self.bits} {g} {'sym' if self.symmetric else 'asym'}"

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric, "strategy": self.strategy}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantArgs":
        return cls(bits=d["bits"], group_size=d.get("group_size"), symmetric=d.get("symmetric", True))


ACT_STRATEGIES = ("token", "tensor")
KV_STRATEGIES = ("channel", "token", "tensor")


class _SymmetricArgs:
    """Activation and KV-cache arguments: symmetric integers in [-qmax, qmax], stored as their fields."""

    bits: int

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        return cls(**d)


@dataclass(frozen=True)
class ActQuantArgs(_SymmetricArgs):
    """How a linear's input activations are quantized at run time (the A in W8A8).

    strategy "token": one scale per row, computed at run time (dynamic=True).
    strategy "tensor": one scale per layer; static (calibrated offline) or dynamic.
    Symmetric signed integers, the compressed-tensors convention.
    """

    bits: int = 8
    strategy: str = "token"
    dynamic: bool = True
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise RecipeError(f"activation bits={self.bits} is not supported; use 4 or 8")
        if self.strategy not in ACT_STRATEGIES:
            raise RecipeError(f"activation strategy {short_repr(self.strategy)} is not supported; use one of {', '.join(ACT_STRATEGIES)}")
        if self.strategy == "token" and not self.dynamic:
            raise RecipeError("per-token activation scales are computed at run time: use dynamic=true (or strategy tensor)")

    def describe(self) -> str:
        return f"A{self.bits} per-{self.strategy} {'dynamic' if self.dynamic else 'static'}"


@dataclass(frozen=True)
class KVCacheArgs(_SymmetricArgs):
    """How the attention K/V cache is quantized (the C8 in W8A8C8).

    strategy "channel": static per-channel (head dim) scales calibrated offline;
    "token": per-token scales computed at run time (dynamic=True); "tensor": one
    static scale. K is quantized as stored in the cache (after RoPE).
    residual_bits / residual_tau: outlier tokens whose relative quantization error
    exceeds residual_tau x the mean error get a residual of residual_bits (None = off).
    """

    bits: int = 8
    strategy: str = "channel"
    dynamic: bool = False
    symmetric: bool = True
    residual_bits: int | None = None
    residual_tau: float = 3.0

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise RecipeError(f"kv_cache bits={self.bits} is not supported; use 4 or 8")
        if self.strategy not in KV_STRATEGIES:
            raise RecipeError(f"kv_cache strategy {short_repr(self.strategy)} is not supported; use one of {', '.join(KV_STRATEGIES)}")
        if self.strategy == "token" and not self.dynamic:
            raise RecipeError("per-token KV scales are computed at run time: use dynamic=true")
        if self.residual_bits not in (None, 4, 8):
            raise RecipeError(f"kv_cache residual_bits={self.residual_bits} is not supported; use 4, 8 or omit it")
        if not (self.residual_tau > 0 and self.residual_tau != float("inf")):
            raise RecipeError(f"kv_cache residual_tau={self.residual_tau} must be a finite number > 0")

    def describe(self) -> str:
        r = f" +r{self.residual_bits}" if self.residual_bits else ""
        return f"KV{self.bits} per-{self.strategy} {'dynamic' if self.dynamic else 'static'}{r}"


@dataclass(frozen=True)
class Scheme:
    """Which tensors of a linear are quantized: weights always; input activations
    (W8A8) and the KV cache (C8) when set."""

    weights: QuantArgs = field(default_factory=QuantArgs)
    input_activations: ActQuantArgs | None = None
    kv_cache: KVCacheArgs | None = None

    @property
    def name(self) -> str:
        a = self.input_activations.bits if self.input_activations else 16
        kv = f"C{self.kv_cache.bits}" if self.kv_cache else ""
        return f"W{self.weights.bits}A{a}{kv}"

    def describe(self) -> str:
        parts = [self.weights.describe()]
        parts += [x.describe() for x in (self.input_activations, self.kv_cache) if x is not None]
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "weights": self.weights.to_dict()}
        if self.input_activations is not None:
            d["input_activations"] = self.input_activations.to_dict()
        if self.kv_cache is not None:
            d["kv_cache"] = self.kv_cache.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scheme":
        acts, kv = d.get("input_activations"), d.get("kv_cache")
        return cls(
            weights=QuantArgs.from_dict(d["weights"]),
            input_activations=ActQuantArgs.from_dict(acts) if acts else None,
            kv_cache=KVCacheArgs.from_dict(kv) if kv else None,
        )


# Presets users can name in recipes or on the command line.
PRESETS: dict[str, Scheme] = {
    "W8A16": Scheme(QuantArgs(bits=8, group_size=None, symmetric=True)),
    "W4A16": Scheme(QuantArgs(bits=4, group_size=128, symmetric=True)),
    "W8A8": Scheme(QuantArgs(bits=8, group_size=None, symmetric=True), ActQuantArgs(8, "token", dynamic=True)),
    "W8A8C8": Scheme(
        QuantArgs(bits=8, group_size=None, symmetric=True),
        ActQuantArgs(8, "token", dynamic=True),
        KVCacheArgs(8, "channel", dynamic=False),
    ),
    "W4A4KV4": Scheme(
        QuantArgs(bits=4, group_size=None, symmetric=True),
        ActQuantArgs(4, "token", dynamic=True),
        KVCacheArgs(4, "token", dynamic=True),
    ),
}
