"""Model-level hooks on a transformers model: where to intercept K/V and linear inputs, and the
online rotations a rotated (SpinQuant) checkpoint needs at run time.

Every hook here comes off again: context managers remove theirs on exit (also on error);
`attach_online_rotations` returns its handles, since a rotated model needs them for life.
Calibration (methods), simulation (runtime.simulate) and the dense checkpoint loader share them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from quantkit.errors import UsageError

# KVFn(attention module name, key, value) -> (key, value); key/value: (batch, kv_heads, seq, head_dim)
KVFn = Callable[[str, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# InputFn(linear full name, x) -> x': what the linear sees instead of x
InputFn = Callable[[str, torch.Tensor], torch.Tensor]


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Full name -> attention module (the parent of each block's k_proj), for every decoder block."""
    from quantkit.models.adapter import ModelAdapter

    adapter = ModelAdapter.for_model(model)
    attn_rel = adapter.spec.attention
    return {f"{adapter.block_name(i)}.{attn_rel}": blk.get_submodule(attn_rel) for i, blk in enumerate(adapter.blocks())}


def attention_modules_of_block(ctx) -> dict[str, nn.Module]:
    """Full name -> attention module of the block in a methods.base.BlockContext."""
    attn_rel = ctx.spec.attention
    return {ctx.full_name(attn_rel): ctx.block.get_submodule(attn_rel)}


@contextmanager
def kv_hook(model: nn.Module, fn: KVFn, modules: dict[str, nn.Module] | None = None) -> Iterator[None]:
    """Route K and V of the named attention modules through `fn` before attention reads them.

    Wraps the attention function registered for the model's `_attn_implementation`
    (a process-wide table, so the wrapper passes other models' calls through) and
    restores the table on exit.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    modules = attention_modules(model) if modules is None else modules
    names = {id(m): n for n, m in modules.items()}
    cfg = getattr(model, "config", None) or next(iter(modules.values())).config
    impl = cfg._attn_implementation or "eager"
    had_local = impl in ALL_ATTENTION_FUNCTIONS._local_mapping
    prev_local = ALL_ATTENTION_FUNCTIONS._local_mapping.get(impl)
    if impl in ALL_ATTENTION_FUNCTIONS:
        original = ALL_ATTENTION_FUNCTIONS[impl]
    else:  # "eager" is not in the table: each model file has its own eager function
        any_mod = next(iter(modules.values()))
        original = sys.modules[type(any_mod).__module__].eager_attention_forward

    def wrapper(module, query, key, value, *args, **kwargs):
        name = names.get(id(module))
        if name is not None:
            key, value = fn(name, key, value)
        return original(module, query, key, value, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS[impl] = wrapper
    try:
        yield
    finally:
        if had_local:
            ALL_ATTENTION_FUNCTIONS[impl] = prev_local
        else:
            del ALL_ATTENTION_FUNCTIONS[impl]


@contextmanager
def linear_input_hooks(linears: dict[str, nn.Module], fn: InputFn) -> Iterator[None]:
    """While inside, every named linear sees fn(name, x) instead of its input x (forward pre-hooks)."""
    handles = []
    try:
        for name, mod in linears.items():
            handles.append(mod.register_forward_pre_hook(lambda _m, args, _n=name: (fn(_n, args[0]), *args[1:])))
        yield
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------- online rotations (SpinQuant R3/R4)

# 2: r4 carries "block" (a block-diagonal Sylvester R4); a version-1 entry means block = size
ONLINE_ROTATIONS_VERSION = 2


def online_rotation_spec(model: nn.Module, *, r3: bool, r4: bool, r4_block: int | None = None) -> dict[str, Any] | None:
    """The manifest entry describing the online Hadamard rotations a rotated model needs (None: none).

    r4: the input of every block's mlp_out linear (down_proj) is multiplied by R4 at run time; its
        stored weight is already W R4 (so without it the model is wrong). R4 is H_n / sqrt(n) for
        r4_block None or n, else block-diagonal with n / r4_block Sylvester blocks (see
        `quantkit.quant.rotation.normalized_hadamard`, `r4_matrix`).
    r3: Q and K after RoPE are multiplied by H_d / sqrt(d) per head (only changes KV quantization).
    The matrices are deterministic (no seed).
    """
    if not (r3 or r4):
        return None
    from quantkit.models.adapter import ModelAdapter, head_dim_of

    adapter = ModelAdapter.for_model(model)
    cfg = model.config
    spec: dict[str, Any] = {"version": ONLINE_ROTATIONS_VERSION,
                            "construction": "sylvester x paley-I (rotation.py); block < size: block-diagonal sylvester"}
    if r4:
        rel = adapter.spec.rotation.mlp_out
        mods = [f"{adapter.block_name(i)}.{rel}" for i in range(len(adapter.blocks()))]
        size = cfg.intermediate_size
        block = size if r4_block is None else int(r4_block)
        _check_block(size, block)
        spec["r4"] = {"kind": "hadamard", "size": size, "block": block, "apply": "linear input", "modules": mods}
    if r3:
        spec["r3"] = {"kind": "hadamard", "size": head_dim_of(cfg), "apply": "q and k after RoPE, per head",
                      "modules": sorted(attention_modules(model))}
    return spec


def _check_block(size: int, block: int) -> None:
    from quantkit.kernels.numerics import is_hadamard_block

    if not is_hadamard_block(size, block):
        raise UsageError(f"an R4 block must be the width {size} or a power of two dividing it, got {block}")


def check_online_spec(spec: dict[str, Any] | None) -> None:
    """Refuse a manifest's online-rotation entry this quantkit cannot apply exactly (a newer version, a bad block)."""
    if not spec:
        return
    version = spec.get("version", 1)
    if not isinstance(version, int) or version > ONLINE_ROTATIONS_VERSION:
        raise UsageError(f"the checkpoint's online rotations are version {version!r}; this quantkit reads up to "
                         f"{ONLINE_ROTATIONS_VERSION}: upgrade quantkit")
    if "r4" in spec:
        _check_block(spec["r4"]["size"], r4_block_of(spec))


def r4_block_of(spec: dict[str, Any] | None) -> int | None:
    """R4's block (its width when the whole row is one Hadamard; version-1 entries have no block), None without R4."""
    from quantkit.export.ct_transform import r4_block

    return r4_block(spec) if spec and "r4" in spec else None


def r4_matrix(spec: dict[str, Any] | None) -> torch.Tensor | None:
    """R4 as an (n, n) float32 matrix (what the fold multiplies down_proj's weight by), or None."""
    if not spec or "r4" not in spec:
        return None
    from quantkit.quant.rotation import normalized_hadamard

    return normalized_hadamard(spec["r4"]["size"], block=r4_block_of(spec))


def attach_online_rotations(model: nn.Module, spec: dict[str, Any] | None,
                            active: Callable[[], bool] | None = None) -> list:
    """Register the R4 forward pre-hooks of `spec` on `model` (x -> x R4); returns the handles.

    They stay for the model's lifetime: its down_proj weights hold W R4, so the model is only
    correct with them. R3 needs no hook (see `k_rotation_of`). active: when given, the hooks
    pass x through unchanged while it returns False (rotation training's float teacher pass
    runs the model's own, unrotated weights)."""
    if not spec or "r4" not in spec:
        return []
    check_online_spec(spec)
    from quantkit.kernels.hadamard import hadamard_transform

    size, block = spec["r4"]["size"], r4_block_of(spec)

    def pre(_m, args):
        if active is not None and not active():
            return None
        x = args[0]
        if x.shape[-1] != size:
            raise UsageError(f"online R4 expects {size} input features, got {x.shape[-1]}")
        return (hadamard_transform(x, block), *args[1:])

    return [model.get_submodule(n).register_forward_pre_hook(pre) for n in spec["r4"]["modules"]]


def k_rotation_of(spec: dict[str, Any] | None) -> torch.Tensor | None:
    """R3 as a (head_dim, head_dim) float32 matrix, or None."""
    if not spec or "r3" not in spec:
        return None
    from quantkit.quant.rotation import normalized_hadamard

    return normalized_hadamard(spec["r3"]["size"])
