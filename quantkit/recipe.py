"""Quantization arguments, schemes and recipes: data only, nothing runs here.

`QuantArgs` says how one tensor is quantized; a `Scheme` says which tensors of a
linear layer are quantized (weights now; input activations and the KV cache slot
in beside them); a `Recipe` is an ordered list of method stages plus an ignore
list, stamped with a version so files written today load tomorrow.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from quantkit.errors import UsageError

RECIPE_VERSION = 1
SUPPORTED_BITS = (2, 3, 4, 8)


class RecipeError(UsageError):
    """A recipe or a set of quantization options is invalid (a usage error)."""


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
            raise RecipeError(f"group_size={self.group_size!r} must be a positive integer (or omitted for per-channel)")

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


@dataclass(frozen=True)
class Scheme:
    """Which tensors of a linear are quantized. Weight-only today (WnA16)."""

    weights: QuantArgs = field(default_factory=QuantArgs)

    @property
    def name(self) -> str:
        return f"W{self.weights.bits}A16"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "weights": self.weights.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scheme":
        return cls(weights=QuantArgs.from_dict(d["weights"]))


# Presets users can name in recipes or on the command line.
PRESETS: dict[str, Scheme] = {
    "W8A16": Scheme(QuantArgs(bits=8, group_size=None, symmetric=True)),
    "W4A16": Scheme(QuantArgs(bits=4, group_size=128, symmetric=True)),
}


@dataclass(frozen=True)
class Stage:
    """One method run over the model, with its own options (e.g. {"method": "rtn"})."""

    method: str
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **self.options}


@dataclass(frozen=True)
class Recipe:
    """Ordered stages + scheme + ignore list. `ignore` holds module names or `re:` patterns."""

    scheme: Scheme
    stages: tuple[Stage, ...]
    ignore: tuple[str, ...] = ("lm_head",)
    version: int = RECIPE_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "scheme": self.scheme.to_dict(),
            "ignore": list(self.ignore),
            "stages": [s.to_dict() for s in self.stages],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        stages = tuple(Stage(s["method"], {k: v for k, v in s.items() if k != "method"}) for s in d["stages"])
        return cls(
            scheme=Scheme.from_dict(d["scheme"]),
            stages=stages,
            ignore=tuple(d.get("ignore", ("lm_head",))),
            version=d.get("version", RECIPE_VERSION),
        )

    def with_weights(self, **changes: Any) -> "Recipe":
        """The same recipe with some weight args overridden (CLI options beat recipe values)."""
        w = dataclasses.replace(self.scheme.weights, **changes)
        return dataclasses.replace(self, scheme=dataclasses.replace(self.scheme, weights=w))
