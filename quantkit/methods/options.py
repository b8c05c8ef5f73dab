"""Typed method options: one dataclass per method, checked one way.

A method declares its recipe-stage options as a dataclass deriving from
`MethodOptions`; each field has its default and a rule (`Int`, `Number`, `Flag`,
`OneOf`, `Numbers`) in its metadata (`option(default, rule)`). `parse_options`
refuses unknown keys and bad values with one line naming the method, the key, the
value and what is allowed:

    gptq option damp=0 must be a number in (0, 1] (default 0.01)

The registry exposes each method's class as `Method.Options`, so a recipe can be
checked without building the method (`quantkit.methods.base.check_methods`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from quantkit.errors import RecipeError, short_repr
from quantkit.quant.args import Scheme
from quantkit.quant.mse import DEFAULTS as MSE_DEFAULTS, MAX_GRID as MSE_MAX_GRID, OPTIONS as MSE_OPTIONS
from quantkit.quant.mse import WEIGHTS as MSE_WEIGHTS, MSESearch, from_options as mse_from_options
from quantkit.quant.rounding import RoundingConfig


class Rule:
    """What one option accepts; `check` returns the value to store, or None when refused."""

    allowed: str = ""

    def check(self, v: Any) -> Any:  # pragma: no cover - interface
        raise NotImplementedError


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class Int(Rule):
    """An integer (not a bool) in low..high (high None: no upper bound)."""

    low: int
    high: int | None = None

    @property
    def allowed(self) -> str:
        if self.high is not None:
            return f"an integer in {self.low}..{self.high}"
        return "a positive integer" if self.low == 1 else f"an integer >= {self.low}"

    def check(self, v: Any) -> Any:
        ok = isinstance(v, int) and not isinstance(v, bool) and v >= self.low and (self.high is None or v <= self.high)
        return v if ok else None


@dataclass(frozen=True)
class Number(Rule):
    """A number in [low, high] (low_open / high_open: that end excluded; None: unbounded), stored as float;
    finite unless finite=False. auto: the string "auto" is also allowed and kept; parse: a numeric string is read."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    auto: bool = False
    parse: bool = False
    finite: bool = True
    note: str = ""

    @property
    def allowed(self) -> str:
        if self.low is not None and self.high is not None:
            text = f"a number in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        elif self.low == 0 and self.low_open:
            text = "a positive number"
        elif self.low is not None:
            text = f"a number {'>' if self.low_open else '>='} {self.low:g}"
        else:
            text = "a number"
        return text + self.note + (" or 'auto'" if self.auto else "")

    def check(self, v: Any) -> Any:
        if self.auto and v == "auto":
            return "auto"
        if self.parse and isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                return None
        if not _is_number(v) or math.isnan(v) or (self.finite and math.isinf(v)):
            return None
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return None
        if self.high is not None and (v >= self.high if self.high_open else v > self.high):
            return None
        return float(v)


@dataclass(frozen=True)
class Flag(Rule):
    """true or false (a bool, not 1 or 0); auto: the string "auto" is also allowed and kept."""

    auto: bool = False

    @property
    def allowed(self) -> str:
        return "true, false or 'auto'" if self.auto else "true or false"

    def check(self, v: Any) -> Any:
        return v if isinstance(v, bool) or (self.auto and v == "auto") else None


@dataclass(frozen=True)
class OneOf(Rule):
    choices: tuple

    @property
    def allowed(self) -> str:
        names = {True: "true", False: "false"}
        return "one of " + ", ".join(names.get(c, str(c)) if isinstance(c, bool) else str(c) for c in self.choices)

    def check(self, v: Any) -> Any:
        try:
            return v if v in self.choices else None
        except TypeError:  # an unhashable/uncomparable value
            return None


@dataclass(frozen=True)
class IntOrWord(Rule):
    """An integer (not a bool) >= low, or one of `words`."""

    low: int
    words: tuple[str, ...]

    @property
    def allowed(self) -> str:
        return f"an integer >= {self.low} or one of {', '.join(self.words)}"

    def check(self, v: Any) -> Any:
        if isinstance(v, str):
            return v if v in self.words else None
        return v if isinstance(v, int) and not isinstance(v, bool) and v >= self.low else None


@dataclass(frozen=True)
class Numbers(Rule):
    """A non-empty list of numbers in [low, high], stored as a tuple of floats."""

    low: float
    high: float

    @property
    def allowed(self) -> str:
        return f"a non-empty list of numbers in [{self.low:g}, {self.high:g}]"

    def check(self, v: Any) -> Any:
        if not isinstance(v, (list, tuple)) or not v:
            return None
        if not all(_is_number(a) and self.low <= a <= self.high for a in v):
            return None
        return tuple(float(a) for a in v)


def option(default: Any, rule: Rule, *, optional: bool = False) -> Any:
    """A dataclass field for one option: its default and rule (optional: null is also allowed)."""
    return dataclasses.field(default=default, metadata={"rule": rule, "optional": optional})


@dataclass
class MethodOptions:
    """Base of every method's options; subclasses add fields made with `option`."""

    def __getitem__(self, key: str) -> Any:
        """Options by their recipe key (`opts["lr"]`), as a recipe stage names them."""
        return getattr(self, key)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


@dataclass
class RangeSearchOptions(MethodOptions):
    """The per-group range search of quantkit.quant.mse, which RTN and GPTQ offer (off: min/max ranges).
    `search_for(scheme)` is the MSESearch a method runs under a scheme, or None; the rule that spans
    keys (mse_weight hessian is GPTQ's alone) is quant.mse.from_options', checked here so a recipe check
    catches it too. mse "auto" (a method's default where measurements chose one, see GPTQOptions) turns the
    search on for weight-only schemes of AUTO_MAX_BITS bits or fewer."""

    METHOD: ClassVar[str] = ""
    # Widest weights "auto" searches: measured better at 3 and 4 bits, worse at 8 with 8-bit activations
    # (BENCHMARKS.md, issue 23); schemes that quantize activations (W4A4) are not measured, so they keep min/max.
    AUTO_MAX_BITS: ClassVar[int] = 4
    mse: bool | str = option(MSE_DEFAULTS["mse"], Flag())
    mse_grid: int = option(MSE_DEFAULTS["mse_grid"], Int(1, MSE_MAX_GRID))
    mse_max_shrink: float = option(MSE_DEFAULTS["mse_max_shrink"], Number(0, 1, high_open=True))
    mse_norm: float = option(MSE_DEFAULTS["mse_norm"], Number(0, 10, low_open=True))
    mse_weight: str = option(MSE_DEFAULTS["mse_weight"], OneOf(MSE_WEIGHTS))

    def __post_init__(self) -> None:
        given = {k: getattr(self, k) for k in MSE_OPTIONS}
        self._search: MSESearch | None = mse_from_options(self.METHOD, {**given, "mse": self.mse is not False})

    def auto_on(self, scheme: Scheme) -> bool:
        """Whether an "auto" option of this method is on under `scheme`: weight-only, AUTO_MAX_BITS bits or fewer."""
        return scheme.weights.bits <= self.AUTO_MAX_BITS and scheme.input_activations is None

    def search_for(self, scheme: Scheme) -> MSESearch | None:
        """The range search to run under `scheme`: None = min/max ranges."""
        if self.mse == "auto" and not self.auto_on(scheme):
            return None
        return self._search


@dataclass
class WeightQuantizerOptions(RangeSearchOptions):
    """The range search plus learned rounding (quantkit.quant.rounding), which RTN and GPTQ both offer.
    `rounding` is the RoundingConfig to run after the method's own quantization, or None (off)."""

    learned_rounding: bool = option(False, Flag())
    rounding_steps: int = option(200, Int(0, 100_000))
    rounding_lr: float | None = option(None, Number(0, 1, low_open=True), optional=True)  # null: 1/rounding_steps
    rounding_seed: int = option(0, Int(0))

    def __post_init__(self) -> None:
        super().__post_init__()
        self.rounding: RoundingConfig | None = (
            RoundingConfig(self.rounding_steps, self.rounding_lr, self.rounding_seed) if self.learned_rounding
            else None)


def parse_options(cls: type[MethodOptions], method: str, given: dict[str, Any]) -> MethodOptions:
    """The typed options of `method` from a recipe stage's mapping; RecipeError on an unknown key or a
    value its rule refuses. The options' own `__post_init__` then checks what spans several keys."""
    allowed = cls.names()
    unknown = set(given) - set(allowed)
    if unknown:
        raise RecipeError(f"method {short_repr(method)} has no option(s) {sorted(unknown)}; "
                          f"allowed: {', '.join(allowed) or 'none'}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in given:
            continue
        v, rule = given[f.name], f.metadata["rule"]
        if v is None and f.metadata["optional"]:
            values[f.name] = None
            continue
        got = rule.check(v)
        if got is None:
            default = "" if f.default is dataclasses.MISSING else f" (default {_show(f.default)})"
            null = " or null" if f.metadata["optional"] else ""
            raise RecipeError(f"{method} option {f.name}={short_repr(v)} must be {rule.allowed}{null}{default}")
        values[f.name] = got
    return cls(**values)


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, tuple):
        return "[" + ", ".join(_show(a) for a in v) + "]"
    return f"{v:g}" if isinstance(v, float) else str(v)
