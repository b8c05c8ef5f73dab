"""Quantization arguments, schemes and recipes: data only, nothing runs here.

`QuantArgs` says how a weight is quantized, `ActQuantArgs` input activations,
`KVCacheArgs` the attention cache; a `Scheme` says which of them a model gets; a `Recipe` is an ordered list of method stages plus an ignore
list, stamped with a version so files written today load tomorrow.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.errors import UsageError, short, short_repr

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


@dataclass(frozen=True)
class ActQuantArgs:
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

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def describe(self) -> str:
        return f"A{self.bits} per-{self.strategy} {'dynamic' if self.dynamic else 'static'}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ActQuantArgs":
        return cls(**d)


@dataclass(frozen=True)
class KVCacheArgs:
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

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def describe(self) -> str:
        r = f" +r{self.residual_bits}" if self.residual_bits else ""
        return f"KV{self.bits} per-{self.strategy} {'dynamic' if self.dynamic else 'static'}{r}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "KVCacheArgs":
        return cls(**d)


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
        """The inverse of to_dict (also takes a preset name as scheme); validated, see recipe_from_dict."""
        return recipe_from_dict(d)

    def with_weights(self, **changes: Any) -> "Recipe":
        """The same recipe with some weight args overridden (CLI options beat recipe values)."""
        w = dataclasses.replace(self.scheme.weights, **changes)
        return dataclasses.replace(self, scheme=dataclasses.replace(self.scheme, weights=w))


# ----------------------------------------------------------------------------- recipe files
#
# A recipe file (YAML, or JSON) is the dict Recipe.to_dict() writes, except that
# `scheme` may be a preset name and derived keys (scheme.name, weights.strategy)
# may be left out. Everything is checked before a model is loaded; every error
# is a RecipeError naming the key and what is allowed.

_TOP_KEYS = ("version", "scheme", "ignore", "stages")
_SCHEME_KEYS = ("weights", "input_activations", "kv_cache", "name")  # name: derived, written by to_dict
_WEIGHT_STRATEGIES = ("channel", "group")


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _check_type(where: str, v: Any, kind: str, optional: bool = False) -> None:
    """Refuse a value of the wrong YAML type (bool is not an int; an int is a valid float)."""
    if v is None and optional:
        return
    ok = {
        "int": isinstance(v, int) and not isinstance(v, bool),
        "bool": isinstance(v, bool),
        "str": isinstance(v, str),
        "float": isinstance(v, (int, float)) and not isinstance(v, bool),
    }[kind]
    if not ok:
        want = {"int": "an integer", "bool": "true or false", "str": "a string", "float": "a number"}[kind]
        raise RecipeError(f"{where} must be {want}{' (or omitted)' if optional else ''}, got {short_repr(v)}")


def _check_keys(where: str, d: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(d, dict):
        raise RecipeError(f"{where} must be a mapping, got {_type_name(d)} {short_repr(d)}")
    unknown = [k for k in d if k not in allowed]
    if unknown:
        raise RecipeError(f"{where} has unknown key {short_repr(unknown[0])}; allowed: {', '.join(allowed)}")


def _args_from(where: str, cls: type, d: Any, types: dict[str, tuple[str, bool]]):
    """Build an args dataclass from a mapping, checking keys and value types first."""
    _check_keys(where, d, tuple(types))
    for k, v in d.items():
        kind, optional = types[k]
        _check_type(f"{where}.{k}", v, kind, optional)
    try:
        return cls(**d)
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}") from None


def _weights_from(d: Any) -> QuantArgs:
    where = "scheme.weights"
    types = {"bits": ("int", False), "group_size": ("int", True), "symmetric": ("bool", False), "strategy": ("str", False)}
    _check_keys(where, d, tuple(types))
    d = dict(d)
    strategy = d.pop("strategy", None)
    args = _args_from(where, QuantArgs, d, types)
    if strategy is not None:
        if strategy not in _WEIGHT_STRATEGIES:
            raise RecipeError(f"{where}.strategy {short_repr(strategy)} is unknown; allowed: {', '.join(_WEIGHT_STRATEGIES)}")
        if strategy != args.strategy:
            fix = "set group_size" if strategy == "group" else "remove group_size"
            raise RecipeError(f"{where}.strategy {short_repr(strategy)} contradicts group_size={args.group_size}; {fix}")
    return args


def _scheme_from(v: Any) -> Scheme:
    if isinstance(v, str):
        if v not in PRESETS:
            raise RecipeError(f"scheme {short_repr(v)} is not a preset; presets: {', '.join(PRESETS)} (or give a mapping)")
        return PRESETS[v]
    _check_keys("scheme", v, _SCHEME_KEYS)
    if "weights" not in v:
        raise RecipeError("scheme needs a 'weights' mapping (e.g. {bits: 4, group_size: 64, symmetric: false})")
    if v.get("name") is not None and not isinstance(v["name"], str):
        _check_type("scheme.name", v["name"], "str")
    acts, kv = v.get("input_activations"), v.get("kv_cache")
    act_types = {"bits": ("int", False), "strategy": ("str", False), "dynamic": ("bool", False), "symmetric": ("bool", False)}
    kv_types = {
        **act_types,
        "residual_bits": ("int", True),
        "residual_tau": ("float", False),
    }
    return Scheme(
        weights=_weights_from(v["weights"]),
        input_activations=None if acts is None else _args_from("scheme.input_activations", ActQuantArgs, acts, act_types),
        kv_cache=None if kv is None else _args_from("scheme.kv_cache", KVCacheArgs, kv, kv_types),
    )


def _stages_from(v: Any) -> tuple[Stage, ...]:
    if not isinstance(v, list):
        raise RecipeError(f"stages must be a list of {{method: NAME, ...options}}, got {_type_name(v)}")
    if not v:
        raise RecipeError("stages is empty; add at least one stage, e.g. '- method: rtn'")
    out = []
    for i, s in enumerate(v):
        if isinstance(s, str):  # `- rtn` is shorthand for `- method: rtn`
            s = {"method": s}
        if not isinstance(s, dict):
            raise RecipeError(f"stages[{i}] must be a mapping like {{method: gptq, damp: 0.01}}, got {short_repr(s)}")
        if "method" not in s:
            raise RecipeError(f"stages[{i}] has no 'method' key; e.g. '- method: rtn'")
        _check_type(f"stages[{i}].method", s["method"], "str")
        for k in s:
            _check_type(f"stages[{i}] option name", k, "str")
        out.append(Stage(s["method"], {k: x for k, x in s.items() if k != "method"}))
    return tuple(out)


def recipe_from_dict(d: Any) -> Recipe:
    """A validated Recipe from its dict form (scheme may be a preset name).

    Checks structure, keys, types and values; not the methods (see check_methods).
    """
    _check_keys("recipe", d, _TOP_KEYS)
    version = d.get("version", RECIPE_VERSION)
    _check_type("version", version, "int")
    if version != RECIPE_VERSION:
        raise RecipeError(
            f"recipe version {version} is not supported; this quantkit reads version {RECIPE_VERSION}"
            + (" (upgrade quantkit)" if version > RECIPE_VERSION else "")
        )
    if "scheme" not in d:
        raise RecipeError(f"recipe has no 'scheme'; use a preset ({', '.join(PRESETS)}) or a mapping")
    if "stages" not in d:
        raise RecipeError("recipe has no 'stages'; add e.g. 'stages: [{method: rtn}]'")
    ignore = d.get("ignore", ["lm_head"])
    if ignore is None:
        ignore = []
    if not isinstance(ignore, list) or not all(isinstance(x, str) for x in ignore):
        raise RecipeError(f"ignore must be a list of module names or 're:' patterns, got {short_repr(ignore)}")
    return Recipe(scheme=_scheme_from(d["scheme"]), stages=_stages_from(d["stages"]), ignore=tuple(ignore), version=version)


def check_methods(recipe: Recipe) -> None:
    """Every stage names a registered method and passes only options it accepts (imports torch)."""
    from quantkit.methods.base import available_methods, get_method

    names = available_methods()
    for i, st in enumerate(recipe.stages):
        if st.method not in names:
            raise RecipeError(f"stages[{i}].method {short_repr(st.method)} is unknown; available: {', '.join(names)}")
        try:
            get_method(st.method)(recipe.scheme, **st.options)
        except RecipeError as e:
            raise RecipeError(f"stages[{i}] ({st.method}): {e}") from None
        except (TypeError, ValueError) as e:  # a method's own option check
            raise RecipeError(f"stages[{i}] ({st.method}): bad option value: {e}") from None


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few hundred bytes
MAX_MANIFEST_BYTES = 256 << 20  # a quantkit.json lists every module of a checkpoint (JSON has no aliases)
MAX_RECIPE_NODES = 100_000  # values once YAML aliases are expanded (a real recipe has < 100)
MAX_RECIPE_DEPTH = 64


def _check_size(path: Path, d: Any) -> None:
    """Refuse a document that expands (through YAML aliases) or nests beyond any recipe.

    Walks the loaded value counting every value each time it is reached (an alias counts
    as the copy it stands for), and stops at MAX_RECIPE_NODES: bounded time and memory,
    self-referencing structures included.
    """
    count = 0
    stack = [(d, 0)]
    while stack:
        v, depth = stack.pop()
        count += 1
        if count > MAX_RECIPE_NODES:
            raise RecipeError(f"{path}: the document expands to more than {MAX_RECIPE_NODES} values (YAML aliases?); "
                              "a recipe is a few keys: write it out plainly")
        if depth > MAX_RECIPE_DEPTH:
            raise RecipeError(f"{path}: the document nests deeper than {MAX_RECIPE_DEPTH} levels; "
                              "a recipe is a few keys: write it out plainly")
        if isinstance(v, dict):
            stack.extend((x, depth + 1) for kv in v.items() for x in kv)
        elif isinstance(v, (list, tuple)):
            stack.extend((x, depth + 1) for x in v)


def _read_mapping(path: Path) -> Any:
    try:
        size = path.stat().st_size
        limit = MAX_MANIFEST_BYTES if path.suffix == ".json" else MAX_RECIPE_BYTES
        if size > limit:
            raise RecipeError(f"{path} is {size} bytes, more than any recipe ({limit} at most); "
                              "pass a recipe .yaml or a quantkit checkpoint dir")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path} is not UTF-8 text (byte {e.start}); pass a recipe .yaml file") from None
    except OSError as e:
        raise RecipeError(f"{path} cannot be read ({(e.strerror or str(e)).lower()})") from None
    if path.suffix == ".json":
        import json

        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecipeError(f"{path}: JSON syntax error at line {e.lineno}: {e.msg}") from None
        except RecursionError:
            raise RecipeError(f"{path}: the document nests deeper than any recipe; write it out plainly") from None
        return d  # load_recipe bounds the recipe part (_check_size)
    import yaml  # lazy: only recipe files need it

    try:
        d = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{path}: YAML syntax error{line}: {short(str(e.problem or e.context), 120)}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: YAML error: {short(str(e).splitlines()[0] if str(e) else '', 120)}") from None
    except RecursionError:
        raise RecipeError(f"{path}: the document nests deeper than any recipe; write it out plainly") from None
    _check_size(path, d)
    return d


def load_recipe(path: str | Path, *, check: bool = True) -> Recipe:
    """Read a recipe from a .yaml/.yml/.json file, a quantkit checkpoint dir, or its quantkit.json.

    A checkpoint's manifest stores the recipe that made it, so the same run can
    be repeated. check: also verify the methods and their options (imports torch).
    Raises RecipeError (a UsageError) for anything wrong, naming the key.
    """

    p = Path(path)
    try:
        p.stat()
    except FileNotFoundError:
        pass
    except OSError as e:  # a name too long, a loop of links...
        raise RecipeError(f"recipe {short(str(p), 160)} is not a usable path ({(e.strerror or str(e)).lower()})") from None
    if p.is_dir():
        if not (p / "quantkit.json").is_file():
            raise RecipeError(f"{p} is a directory without quantkit.json; pass a recipe .yaml or a quantkit checkpoint dir")
        p = p / "quantkit.json"
    if p.exists() and not p.is_file():
        raise RecipeError(f"recipe {p} is not a regular file (a device, pipe or socket); pass a recipe .yaml file")
    if not p.is_file():
        raise RecipeError(f"recipe {p} not found; pass a recipe .yaml file or a quantkit checkpoint dir")
    d = _read_mapping(p)
    if p.name == "quantkit.json" or (isinstance(d, dict) and "format_version" in d and "recipe" in d):
        if not isinstance(d, dict) or not isinstance(d.get("recipe"), dict):
            raise RecipeError(f"{p} holds no recipe; it was not written by a quantkit export")
        d = d["recipe"]
    if d is None:
        raise RecipeError(f"{p} is empty; a recipe needs 'scheme' and 'stages'")
    _check_size(p, d)
    try:
        recipe = recipe_from_dict(d)
    except RecipeError as e:
        raise RecipeError(f"{p}: {e}") from None
    if check:
        try:
            check_methods(recipe)
        except RecipeError as e:
            raise RecipeError(f"{p}: {e}") from None
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML that load_recipe reads back to an equal Recipe.

    The scheme is written as its preset name when it is one, else as a mapping
    without derived keys.
    """
    import yaml

    preset = next((n for n, s in PRESETS.items() if s == recipe.scheme), None)
    if preset is not None:
        scheme: Any = preset
    else:
        scheme = {"weights": {k: v for k, v in recipe.scheme.weights.to_dict().items() if k != "strategy"}}
        if recipe.scheme.input_activations is not None:
            scheme["input_activations"] = recipe.scheme.input_activations.to_dict()
        if recipe.scheme.kv_cache is not None:
            scheme["kv_cache"] = recipe.scheme.kv_cache.to_dict()
    d = {"version": recipe.version, "scheme": scheme, "ignore": list(recipe.ignore), "stages": [s.to_dict() for s in recipe.stages]}
    return yaml.safe_dump(d, sort_keys=False, default_flow_style=False)
