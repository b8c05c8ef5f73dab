"""Recipes: data only, nothing runs here.

A `Recipe` is an ordered list of method stages plus a `Scheme` and an ignore list,
stamped with a version so files written today load tomorrow. The argument types
(`QuantArgs`, `ActQuantArgs`, `KVCacheArgs`, `Scheme`, `PRESETS`) live in
quantkit.quant.args and are re-exported here. Reading a file checks its structure;
whether the stages name real methods with valid options is the method registry's
check (quantkit.methods.base.check_methods / load_recipe).
"""

from __future__ import annotations

import dataclasses
import errno
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.errors import RecipeError, short, short_repr
from quantkit.files import read_small_text
from quantkit.quant.args import (  # noqa: F401  (re-exported: users import them from here)
    PRESETS,
    ActQuantArgs,
    KVCacheArgs,
    QuantArgs,
    Scheme,
)

RECIPE_VERSION = 1


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

    Checks structure, keys, types and values; not the methods (see quantkit.methods.base.check_methods).
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
    limit = MAX_MANIFEST_BYTES if path.suffix == ".json" else MAX_RECIPE_BYTES
    try:
        text = read_small_text(path, limit)  # a regular file within the limit (checked again here: no race)
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path} is not UTF-8 text (byte {e.start}); pass a recipe .yaml file") from None
    except OSError as e:
        if e.errno == errno.EFBIG:
            raise RecipeError(f"{path} is more than any recipe ({limit} bytes at most); "
                              "pass a recipe .yaml or a quantkit checkpoint dir") from None
        raise RecipeError(f"{path} cannot be read ({(e.strerror or str(e)).lower()})") from None
    if path.suffix == ".json":
        import json

        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecipeError(f"{path}: JSON syntax error at line {e.lineno}: {e.msg}") from None
        except RecursionError:
            raise RecipeError(f"{path}: the document nests deeper than any recipe; write it out plainly") from None
        return d  # read_recipe bounds the recipe part (_check_size)
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


def recipe_file(path: str | Path) -> Path:
    """The file a recipe is read from: `path` itself, or a checkpoint dir's quantkit.json.

    Raises RecipeError when there is no such regular file."""
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
    return p


def read_recipe(path: str | Path) -> Recipe:
    """Read a recipe from a .yaml/.yml/.json file, a quantkit checkpoint dir, or its quantkit.json.

    A checkpoint's manifest stores the recipe that made it, so the same run can
    be repeated. Checks the structure only; quantkit.methods.base.load_recipe also
    checks the methods and their options. Raises RecipeError (a UsageError) for
    anything wrong, naming the file and the key.
    """
    p = recipe_file(path)
    d = _read_mapping(p)
    if p.name == "quantkit.json" or (isinstance(d, dict) and "format_version" in d and "recipe" in d):
        if not isinstance(d, dict) or not isinstance(d.get("recipe"), dict):
            raise RecipeError(f"{p} holds no recipe; it was not written by a quantkit export")
        d = d["recipe"]
    if d is None:
        raise RecipeError(f"{p} is empty; a recipe needs 'scheme' and 'stages'")
    _check_size(p, d)
    try:
        return recipe_from_dict(d)
    except RecipeError as e:
        raise RecipeError(f"{p}: {e}") from None


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML that read_recipe reads back to an equal Recipe.

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
