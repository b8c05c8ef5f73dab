"""Plain-torch simulation of W8A8 activations and an INT8 KV cache, and offline calibration of static scales.

`simulate(model, act=..., kv=...)` is a context manager: forward pre-hooks on
the quantized linears fake-quantize their inputs, and a wrapper around the
model's attention function (transformers 5 picks it from
`ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`) fake-quantizes K (after
RoPE) and V as the cache would store them. Everything is restored on exit, also
on error, so perplexity of W8A8 / W8A8C8 variants is measured on CPU before the
kernels exist.

`StaticScaleCollector` is a pipeline stage that records the static scales
(per-tensor activation scales, per-channel KV scales, the KV calibration mean
error for outlier residuals) block by block, on the model as quantized so far.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantkit.quant import kv as kvq
from quantkit.quant.core import fake_quantize_activations
from quantkit.recipe import ActQuantArgs, KVCacheArgs, RecipeError

# KVFn(attention module name, key, value) -> (key, value); key/value: (batch, kv_heads, seq, head_dim)
KVFn = Callable[[str, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class StaticScales:
    """Calibrated static scales, all float32 on CPU.

    act: linear full name -> per-tensor input scale, shape (1,) (max|x| / 127).
    kv: attention module full name -> {"k_scale": (kv_heads, head_dim), "v_scale": (kv_heads, head_dim),
        "k_mean_eps": float, "v_mean_eps": float}; the mean errors only when residuals were calibrated.
    """

    act: dict[str, torch.Tensor] = field(default_factory=dict)
    kv: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class SimStats:
    """What the simulated KV cache did: token vectors seen, patched with a residual, and their share."""

    tokens: int = 0
    patched: int = 0
    head_dim: int = 0
    strategy: str = "channel"
    residual_bits: int | None = None
    per_layer: dict[str, list[int]] = field(default_factory=dict)  # name -> [tokens, patched]

    @property
    def patched_fraction(self) -> float:
        return self.patched / self.tokens if self.tokens else 0.0

    @property
    def residual_memory_overhead(self) -> float:
        """Extra KV memory of the residuals relative to the INT8 cache (0.01 = 1%)."""
        if not self.residual_bits or not self.head_dim:
            return 0.0
        return kvq.residual_overhead(self.patched_fraction, self.head_dim, self.strategy, self.residual_bits)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kv_tokens": self.tokens,
            "kv_patched": self.patched,
            "patched_fraction": self.patched_fraction,
            "residual_memory_overhead": self.residual_memory_overhead,
        }


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Full name -> attention module (the parent of each block's k_proj), for every decoder block."""
    from quantkit.models.adapter import ModelAdapter

    adapter = ModelAdapter.for_model(model)
    k_rel = next(r for r in adapter.spec.linears if r.endswith("k_proj"))
    attn_rel = k_rel.rsplit(".", 1)[0]
    return {
        f"{adapter.block_name(i)}.{attn_rel}": blk.get_submodule(attn_rel) for i, blk in enumerate(adapter.blocks())
    }


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


def block_linear_names(model: nn.Module, ignore=("lm_head",)) -> dict[str, nn.Module]:
    """Full name -> linear of every decoder-block linear not in `ignore` (the ones W8A8 quantizes)."""
    from quantkit.calib.pipeline import linears_to_quantize

    return linears_to_quantize(model, ignore)


def _kv_static_tensor(entry: dict[str, Any], which: str, kv: KVCacheArgs) -> torch.Tensor | None:
    if kv.strategy == "token":
        return None
    return entry[f"{which}_scale"]


def kv_fake_quant_fn(
    kv: KVCacheArgs, static: StaticScales | None, stats: SimStats, residual: bool, k_rotation: torch.Tensor | None = None
) -> KVFn:
    """The KVFn that fake-quantizes K and V per `kv` (with residuals when asked) and counts tokens.

    k_rotation: an orthogonal (head_dim, head_dim) R3 applied to Q and K after RoPE (SpinQuant):
    K is quantized as K R3 (what the cache stores) and rotated back, which equals
    rotating Q too, since (Q R3)(K R3)^T = Q K^T.
    """

    def fn(name: str, key: torch.Tensor, value: torch.Tensor):
        entry = {} if static is None else static.kv.get(name, {})
        outs = []
        if k_rotation is not None:
            key = key @ k_rotation.to(key.device, key.dtype)
        for which, x in (("k", key), ("v", value)):
            st = None
            if kv.strategy != "token":
                if f"{which}_scale" not in entry:
                    raise RecipeError(f"no static KV scales for {name}; calibrate them (static KV needs calibration data)")
                st = entry[f"{which}_scale"].to(x.device)
            mean_eps = entry.get(f"{which}_mean_eps") if residual else None
            if residual and mean_eps is None:
                raise RecipeError(f"no KV residual statistics for {name}; calibrate with residuals on")
            res = kvq.fake_quantize_kv(
                x,
                kv.strategy,
                bits=kv.bits,
                static=st,
                mean_eps=mean_eps,
                tau=kv.residual_tau,
                residual_bits=(kv.residual_bits or 4) if residual else None,
            )
            n, p = res.patched.numel(), int(res.patched.sum())
            stats.tokens += n
            stats.patched += p
            layer = stats.per_layer.setdefault(name, [0, 0])
            layer[0] += n
            layer[1] += p
            stats.head_dim = x.shape[-1]
            outs.append(res.x_hat.to(x.dtype))
        if k_rotation is not None:
            outs[0] = outs[0] @ k_rotation.to(outs[0].device, outs[0].dtype).T
        return outs[0], outs[1]

    return fn


# ----------------------------------------------------------------------------- online rotations (SpinQuant R3/R4)

ONLINE_ROTATIONS_VERSION = 1


def online_rotation_spec(model: nn.Module, *, r3: bool, r4: bool) -> dict[str, Any] | None:
    """The manifest entry describing the online Hadamard rotations a rotated model needs (None: none).

    r4: the input of every block's mlp_out linear (down_proj) is multiplied by H_n / sqrt(n)
        at run time; its stored weight is already W H (so without it the model is wrong).
    r3: Q and K after RoPE are multiplied by H_d / sqrt(d) per head (only changes KV quantization).
    H is `quantkit.quant.rotation.normalized_hadamard` (deterministic, no seed).
    """
    if not (r3 or r4):
        return None
    from quantkit.models.adapter import ModelAdapter

    adapter = ModelAdapter.for_model(model)
    cfg = model.config
    spec: dict[str, Any] = {"version": ONLINE_ROTATIONS_VERSION, "construction": "sylvester x paley-I (rotation.py)"}
    if r4:
        rel = adapter.spec.rotation.mlp_out
        mods = [f"{adapter.block_name(i)}.{rel}" for i in range(len(adapter.blocks()))]
        spec["r4"] = {"kind": "hadamard", "size": cfg.intermediate_size, "apply": "linear input", "modules": mods}
    if r3:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        spec["r3"] = {"kind": "hadamard", "size": head_dim, "apply": "q and k after RoPE, per head",
                      "modules": sorted(attention_modules(model))}
    return spec


def attach_online_rotations(model: nn.Module, spec: dict[str, Any] | None,
                            active: Callable[[], bool] | None = None) -> list:
    """Register the R4 forward pre-hooks of `spec` on `model` (x -> x H / sqrt(n)); returns the handles.

    They stay for the model's lifetime: its down_proj weights hold W H, so the model is only
    correct with them. R3 needs no hook (see `k_rotation_of`). active: when given, the hooks
    pass x through unchanged while it returns False (rotation training's float teacher pass
    runs the model's own, unrotated weights)."""
    if not spec or "r4" not in spec:
        return []
    from quantkit.kernels.hadamard import hadamard_transform

    size = spec["r4"]["size"]

    def pre(_m, args):
        if active is not None and not active():
            return None
        x = args[0]
        if x.shape[-1] != size:
            raise RecipeError(f"online R4 expects {size} input features, got {x.shape[-1]}")
        return (hadamard_transform(x), *args[1:])

    return [model.get_submodule(n).register_forward_pre_hook(pre) for n in spec["r4"]["modules"]]


def k_rotation_of(spec: dict[str, Any] | None) -> torch.Tensor | None:
    """R3 as a (head_dim, head_dim) float32 matrix, or None."""
    if not spec or "r3" not in spec:
        return None
    from quantkit.quant.rotation import normalized_hadamard

    return normalized_hadamard(spec["r3"]["size"])


@contextmanager
def simulate(
    model: nn.Module,
    *,
    act: ActQuantArgs | None = None,
    kv: KVCacheArgs | None = None,
    static: StaticScales | None = None,
    linears: dict[str, nn.Module] | None = None,
    kv_residual: bool | None = None,
    k_rotation: torch.Tensor | None = None,
) -> Iterator[SimStats]:
    """Fake-quantize linear inputs per `act` and the KV cache per `kv` while inside the block.

    k_rotation: SpinQuant's R3 (see kv_fake_quant_fn), or None.
    linears: the linears whose inputs are quantized (default: every decoder-block
        linear; lm_head stays in float, as W8A8 checkpoints ignore it).
    static: calibrated scales, needed for static activations and static KV.
    kv_residual: outlier residuals on/off (default: on when kv.residual_bits is set).
    Yields SimStats (KV tokens seen / patched); hooks always come off.
    """
    stats = SimStats()
    handles = []
    linears = block_linear_names(model) if linears is None else linears
    if act is not None and not act.dynamic:
        missing = [n for n in linears if static is None or n not in static.act]
        if missing:
            raise RecipeError(f"static activation scales are missing for {missing[0]}; calibrate them first")
    try:
        if act is not None:
            for name, mod in linears.items():
                scale = None if act.dynamic else static.act[name]

                def pre(_m, args, _scale=scale):
                    x = args[0]
                    s = None if _scale is None else _scale.to(x.device)
                    return (fake_quantize_activations(x, act, s), *args[1:])

                handles.append(mod.register_forward_pre_hook(pre))
        if kv is None:
            yield stats
            return
        residual = bool(kv.residual_bits) if kv_residual is None else kv_residual
        stats.strategy, stats.residual_bits = kv.strategy, ((kv.residual_bits or 4) if residual else None)
        with kv_hook(model, kv_fake_quant_fn(kv, static, stats, residual, k_rotation)):
            yield stats
    finally:
        for h in handles:
            h.remove()


def needs_static_scales(act: ActQuantArgs | None, kv: KVCacheArgs | None) -> bool:
    """Whether a scheme needs an offline calibration pass (static acts, static KV, or KV residual statistics)."""
    return (act is not None and not act.dynamic) or (kv is not None and (not kv.dynamic or bool(kv.residual_bits)))


def _make_collector_cls():
    # Defined lazily so that importing this module does not import the methods package.
    from quantkit.methods.base import BlockContext, Method

    class StaticScaleCollector(Method):
        """Pipeline stage that records static scales of each block as it is now (after the methods).

        Not registered as a recipe method: `api.quantize` appends it when the scheme
        needs static scales. It changes no weight and records no results.
        """

        name = "static-scales"
        stats = frozenset()

        def __init__(self, act: ActQuantArgs | None, kv: KVCacheArgs | None):
            self.act, self.kv, self.final = act, kv, False
            self.scales = StaticScales()

        @torch.no_grad()
        def apply_block(self, ctx: BlockContext) -> None:
            attn = {n: m for n, m in attention_modules_of_block(ctx).items()}
            act_amax: dict[str, torch.Tensor] = {}
            kv_amax: dict[str, dict[str, torch.Tensor]] = {}
            handles = []

            def rec_kv(name, key, value):
                e = kv_amax.setdefault(name, {})
                for which, x in (("k", key), ("v", value)):
                    a = kvq.channel_amax(x)
                    e[which] = a if which not in e else torch.maximum(e[which], a)
                return key, value

            try:
                if self.act is not None and not self.act.dynamic:
                    for name, mod in ctx.linears.items():

                        def pre(_m, args, _n=name):
                            a = args[0].detach().float().abs().amax()
                            act_amax[_n] = a if _n not in act_amax else torch.maximum(act_amax[_n], a)

                        handles.append(mod.register_forward_pre_hook(pre))
                if self.kv is not None:
                    with kv_hook(ctx.block, rec_kv, attn):
                        ctx.forward()
                else:
                    ctx.forward()
            finally:
                for h in handles:
                    h.remove()
            for name, a in act_amax.items():
                self.scales.act[name] = kvq.static_scale(a, self.act.bits).reshape(1).cpu()
            if self.kv is None:
                return
            for name, e in kv_amax.items():
                self.scales.kv[name] = {
                    "k_scale": kvq.static_scale(e["k"], self.kv.bits).cpu(),
                    "v_scale": kvq.static_scale(e["v"], self.kv.bits).cpu(),
                }
            if self.kv.residual_bits:
                # Second pass: the mean relative error of the INT8 entries under these scales.
                sums: dict[str, list[float]] = {}

                def rec_eps(name, key, value):
                    e = self.scales.kv[name]
                    s = sums.setdefault(name, [0.0, 0.0, 0])
                    for i, (which, x) in enumerate((("k", key), ("v", value))):
                        st = None if self.kv.strategy == "token" else e[f"{which}_scale"].to(x.device)
                        r = kvq.fake_quantize_kv(x, self.kv.strategy, bits=self.kv.bits, static=st)
                        s[i] += float(r.eps.double().sum())
                    s[2] += key.shape[0] * key.shape[1] * key.shape[2]
                    return key, value

                with kv_hook(ctx.block, rec_eps, attn):
                    ctx.forward()
                for name, (ks, vs, n) in sums.items():
                    self.scales.kv[name]["k_mean_eps"] = ks / max(n, 1)
                    self.scales.kv[name]["v_mean_eps"] = vs / max(n, 1)

    return StaticScaleCollector


def attention_modules_of_block(ctx) -> dict[str, nn.Module]:
    """Full name -> attention module of the block in a BlockContext."""
    spec = ctx.spec
    k_rel = next(r for r in spec.linears if r.endswith("k_proj"))
    attn_rel = k_rel.rsplit(".", 1)[0]
    return {ctx.full_name(attn_rel): ctx.block.get_submodule(attn_rel)}


def static_scale_collector(act: ActQuantArgs | None, kv: KVCacheArgs | None):
    """A pipeline stage (Method instance) that records StaticScales into `.scales`."""
    return _make_collector_cls()(act, kv)


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
) -> StaticScales:
    """Calibrate static scales of an (already quantized or float) model on input_ids (samples, seqlen).

    Runs the layer-wise pipeline (one block on the device at a time); weights are not changed.
    """
    from quantkit.calib.pipeline import run_layerwise

    col = static_scale_collector(act, kv)
    run_layerwise(model, input_ids, [col], device=device, batch_size=batch_size, ignore=ignore)
    return col.scales
