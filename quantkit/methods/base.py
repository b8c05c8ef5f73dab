"""The method interface and registry.

A method is a class registered with `@register_method("name")`. The pipeline
builds one instance per recipe stage and calls `apply_block` once per decoder
block, after the capture pass has collected the statistics the method asked
for (`stats`). A method changes weights in place (so the propagation pass sees
the quantized block) and records each quantized linear in `ctx.results`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from quantkit.calib.capture import InputStats
from quantkit.errors import RecipeError, short_repr
from quantkit.methods.options import MethodOptions, parse_options
from quantkit.models.adapter import ArchSpec
from quantkit.quant.args import Scheme
from quantkit.quant.core import QuantizedTensor
from quantkit.recipe import Recipe, read_recipe, recipe_file


@dataclass
class BlockContext:
    """What a method sees of one decoder block.

    linears: full name -> nn.Linear for the linears of this block that the recipe
        quantizes (ignored ones are left out), in execution order.
    stats: full name -> statistics of that linear's inputs from the capture pass.
    forward: runs the block (as it is now) on every calibration batch and returns
        the outputs, a list of tensors (batch, seq, hidden); for search methods.
    batch: batch(i) -> (hidden_states, kwargs) of calibration batch i (in the order `forward` runs them), on
        the device, as the block receives them; for methods that run the block themselves (learned rounding).
    n_batches: how many calibration batches there are.
    reference: reference(i) -> (hidden_states, kwargs): batch i's inputs in the float model (no block before
        this one quantized), for a method whose `needs_reference` is true; else None.
    results: methods write full name -> QuantizedTensor here (on CPU).
    warnings: user-facing warnings; they end up in the manifest.
    spec: relative names of this block's parts (scale groups, true-sequential steps).
    """

    index: int
    name: str
    block: nn.Module
    linears: dict[str, nn.Linear]
    stats: dict[str, InputStats]
    forward: Callable[[], list[torch.Tensor]]
    device: torch.device
    spec: ArchSpec | None = None  # the model family's table (scale groups, sequential steps)
    batch: Callable[[int], tuple[torch.Tensor, dict[str, Any]]] | None = None
    n_batches: int = 0
    reference: Callable[[int], tuple[torch.Tensor, dict[str, Any]]] | None = None
    results: dict[str, QuantizedTensor] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def block_config(self):
        """The model config (sizes of fused parts); every transformers attention module keeps it."""
        return self.block.get_submodule(self.spec.attention).config

    def has(self, rel: str) -> bool:
        """Whether this block has the part `rel` (an MoE model's dense blocks lack the experts)."""
        try:
            self.block.get_submodule(rel)
        except AttributeError:
            return False
        return True

    def groups_here(self):
        """The scale groups of the table whose consumers this block has (a table may list variants:
        an MoE model's dense and expert blocks, DeepSeek's q_proj or q_a_proj)."""
        return [g for g in self.spec.scale_groups if all(self.has(c) for c in g.consumers)]

    def full_name(self, rel: str) -> str:
        return f"{self.name}.{rel}"

    def steps(self) -> list[list[str]]:
        """Full names of the quantized linears, grouped into true-sequential steps
        (linears of one step see the same input); empty steps are dropped."""
        if self.spec is None:
            return [[n] for n in self.linears]
        out = [[self.full_name(r) for r in step if self.full_name(r) in self.linears] for step in self.spec.sequential]
        return [s for s in out if s]


class Method:
    """Base class: subclasses set `name`, `stats`, `Options` and implement `apply_block`.

    The recipe stage's options arrive as keyword arguments and are kept typed in
    `self.opts` (an instance of `Options`); they also read as attributes (`m.damp`).
    """

    name: ClassVar[str] = ""
    stats: ClassVar[frozenset[str]] = frozenset()
    # Whether the method needs calibration data at all. Methods that collect their own
    # statistics inside apply_block (GPTQ re-captures Hessians per step) set this and
    # leave `stats` empty, so the shared capture pass computes nothing for them.
    needs_data: ClassVar[bool] = False
    # The options this method accepts in a recipe stage, typed and checked before any work
    # (quantkit.methods.options); the default takes none.
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    # True for the recipe's last stage: it quantizes and records ctx.results. Earlier
    # stages are transforms (AWQ scales, SmoothQuant smoothing, clipping) that
    # change float weights only, so the final stage quantizes what they left.
    final: bool = True
    # True for methods that rotate the residual stream (need the family's `ArchSpec.rotation`);
    # checked from the config before any weight loads (`api.check_arch`).
    needs_rotation_roles: ClassVar[bool] = False

    def __init__(self, scheme: Scheme, **options: Any):
        self.scheme = scheme
        self.opts = self.check_options(options)

    def resolved_options(self) -> dict[str, Any]:
        """What this stage's "auto" options became (under the scheme and, once the run is done, on this model),
        JSON-ready: the manifest and the run summary show it beside the recipe as written. {}: nothing was auto."""
        return {}

    @property
    def needs_reference(self) -> bool:
        """Whether apply_block reads `BlockContext.reference` (the float model's inputs to the block): the
        pipeline then carries a second activation stream through the float blocks (memory for activations x2)."""
        return False

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> MethodOptions:
        """The typed options of a recipe stage; RecipeError naming a bad key or value."""
        return parse_options(cls.Options, cls.name, options)

    @classmethod
    def check_config(cls, cfg: dict[str, Any], options: dict[str, Any]) -> None:
        """Refuse, from the model's config dict alone (before any weight loads), stage options this model
        cannot take (RecipeError); `api.check_arch` calls it. Most methods have nothing to check."""

    def __getattr__(self, name: str) -> Any:
        # only reached when normal lookup fails: an option read as an attribute (m.damp is m.opts.damp)
        opts = self.__dict__.get("opts")
        if opts is not None and name in opts.names():
            return getattr(opts, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def uses_data(self) -> bool:
        return self.needs_data or bool(self.stats)

    def prepare_model(self, model: nn.Module, input_ids: torch.Tensor | None, device: torch.device,
                      on_step: Callable[[int, int, str, str], None] | None = None) -> None:
        """Whole-model transform before the layer-wise pipeline (SpinQuant's rotations); default: nothing.

        input_ids: the calibration batch (samples, seqlen) when `uses_data`, else None.
        on_step(i, n, name, phase): progress of a long transform, shaped like the pipeline's on_block.
        A method that needs online (run-time) rotations sets `online_rotations` (the manifest entry).
        """

    # The manifest entry of run-time rotations this method's transform needs (see models.hooks).
    online_rotations: dict[str, Any] | None = None

    def apply_block(self, ctx: BlockContext) -> None:  # pragma: no cover - interface
        raise NotImplementedError


_REGISTRY: dict[str, type[Method]] = {}


def register_method(name: str):
    """Class decorator: make a Method available to recipes under `name`."""

    def wrap(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {short_repr(name)} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load_builtin_methods() -> None:
    # Importing every module of this package runs their @register_method decorators;
    # a new method is a new file here, nothing else to edit.
    import importlib
    import pkgutil

    import quantkit.methods as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_") and info.name != "base":
            importlib.import_module(f"quantkit.methods.{info.name}")


def get_method(name: str) -> type[Method]:
    _load_builtin_methods()
    if name not in _REGISTRY:
        raise RecipeError(f"unknown method {short_repr(name)}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build_methods(recipe) -> list[Method]:
    """One Method per recipe stage, in order; only the last one quantizes (see `Method.final`)."""
    methods = [get_method(s.method)(recipe.scheme, **s.options) for s in recipe.stages]
    for m in methods[:-1]:
        m.final = False
    return methods


def resolved_options(methods: list[Method]) -> list[dict[str, Any]]:
    """Per stage with "auto" options, what they became: {"stage": 1-based index, "method", option: value}."""
    return [{"stage": i + 1, "method": m.name, **r} for i, m in enumerate(methods) if (r := m.resolved_options())]


def describe_resolved(entry: dict[str, Any]) -> str:
    """One line of a `resolved_options` entry; a per-block choice (SmoothQuant's alpha) as its range and count."""
    parts = []
    for k, v in entry.items():
        if k in ("stage", "method"):
            continue
        if isinstance(v, dict):
            vals = list(v.values())
            v = f"{min(vals):g}-{max(vals):g} over {len(vals)} blocks" if vals else "no block searched"
        parts.append(f"{k}={v}")
    return ", ".join(parts)


def available_methods() -> list[str]:
    _load_builtin_methods()
    return sorted(_REGISTRY)


def check_methods(recipe: Recipe) -> None:
    """Every stage names a registered method and passes only options it accepts (each method checks its own)."""
    names = available_methods()
    for i, st in enumerate(recipe.stages):
        if st.method not in names:
            raise RecipeError(f"stages[{i}].method {short_repr(st.method)} is unknown; available: {', '.join(names)}")
        try:
            get_method(st.method).check_options(st.options)
        except RecipeError as e:
            raise RecipeError(f"stages[{i}] ({st.method}): {e}") from None


def load_recipe(path: str | Path, *, check: bool = True) -> Recipe:
    """`quantkit.recipe.read_recipe`, then (check) `check_methods`: the stages name real methods
    with valid options. Raises RecipeError naming the file and the key."""
    p = recipe_file(path)
    recipe = read_recipe(p)
    if check:
        try:
            check_methods(recipe)
        except RecipeError as e:
            raise RecipeError(f"{p}: {e}") from None
    return recipe
