"""Simulated run-time quantization in plain torch: what `quantkit eval` measures for W8A8 / W8A8C8 /
W4A4KV4 checkpoints on a dense model, and which of it a checkpoint asks for.

`simulate(model, act=..., kv=...)` is a context manager: forward pre-hooks on the quantized
linears fake-quantize their inputs, and the model's attention function (transformers 5 picks it
from `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`) sees K (after RoPE) and V as the
cache would store them. Everything is restored on exit, also on error. The quantizers are the
ones the kernels implement (`quantkit.quant.core.quantize_activations`, `quantkit.quant.kv`).

`plan_simulation` resolves `--simulate-act / --simulate-kv` for a loaded model: a quantkit
checkpoint carries its scheme (manifest recipe) and static scales, so "auto" simulates exactly
what it was exported for; a plain model is simulated only when asked, with static scales
calibrated on the fly from calibration text (the same offline calibration a quantize run does).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantkit.export.ct_transform import rotation_names
from quantkit.models.hooks import KVFn, k_rotation_of, kv_hook, linear_input_hooks
from quantkit.quant import kv as kvq
from quantkit.quant.core import fake_quantize_activations
from quantkit.quant.static import StaticScales
from quantkit.recipe import ActQuantArgs, KVCacheArgs, RecipeError, Scheme

ACT_MODES = ("auto", "none", "token", "static")
KV_MODES = ("auto", "none", "int8-dynamic", "int8-static", "int8-static-residual")


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


def block_linear_names(model: nn.Module, ignore=("lm_head",)) -> dict[str, nn.Module]:
    """Full name -> linear of every decoder-block linear not in `ignore` (the ones W8A8 quantizes)."""
    from quantkit.calib.pipeline import linears_to_quantize

    return linears_to_quantize(model, ignore)


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
    linears = block_linear_names(model) if linears is None else linears
    if act is not None and not act.dynamic:
        missing = [n for n in linears if static is None or n not in static.act]
        if missing:
            raise RecipeError(f"static activation scales are missing for {missing[0]}; calibrate them first")

    def quant_input(name: str, x: torch.Tensor) -> torch.Tensor:
        s = None if act.dynamic else static.act[name].to(x.device)
        return fake_quantize_activations(x, act, s)

    with linear_input_hooks(linears if act is not None else {}, quant_input):
        if kv is None:
            yield stats
            return
        residual = bool(kv.residual_bits) if kv_residual is None else kv_residual
        stats.strategy, stats.residual_bits = kv.strategy, ((kv.residual_bits or 4) if residual else None)
        with kv_hook(model, kv_fake_quant_fn(kv, static, stats, residual, k_rotation)):
            yield stats


# ----------------------------------------------------------------------------- what eval simulates


@dataclass
class SimulationPlan:
    act: ActQuantArgs | None
    kv: KVCacheArgs | None
    static: Any = None  # StaticScales
    linears: list[str] | None = None  # None = every decoder-block linear
    kv_residual: bool | None = None
    online_rotations: dict[str, Any] | None = None  # SpinQuant R3 (K rotated before its quantization)

    def describe(self) -> str:
        parts = [x.describe() for x in (self.act, self.kv) if x is not None]
        if self.kv is not None and self.kv_residual is False and self.kv.residual_bits:
            parts[-1] += " (residuals off)"
        if self.online_rotations:
            parts.append("online " + rotation_names(self.online_rotations))
        return ", ".join(parts) or "none"

    def context(self, model):
        """The simulate(...) context manager for `model` (a no-op when nothing is simulated)."""
        if self.act is None and self.kv is None:
            return nullcontext(None)
        linears = None if self.linears is None else {n: model.get_submodule(n) for n in self.linears}
        return simulate(model, act=self.act, kv=self.kv, static=self.static, linears=linears,
                        kv_residual=self.kv_residual, k_rotation=k_rotation_of(self.online_rotations))


def kv_from_mode(mode: str, tau: float = 3.0) -> KVCacheArgs | None:
    """The KVCacheArgs an `--simulate-kv` / `--kv` mode name stands for (None: no KV quantization)."""
    if mode == "int8-dynamic":
        return KVCacheArgs(8, "token", dynamic=True)
    if mode == "int8-static":
        return KVCacheArgs(8, "channel", dynamic=False)
    if mode == "int8-static-residual":
        return KVCacheArgs(8, "channel", dynamic=False, residual_bits=4, residual_tau=tau)
    return None


def plan_simulation(
    loaded,
    *,
    act: str = "auto",
    kv: str = "auto",
    kv_tau: float = 3.0,
    calib_samples: int = 16,
    calib_seqlen: int = 512,
    device: str = "cpu",
) -> SimulationPlan:
    """Resolve --simulate-act / --simulate-kv for a loaded model (LoadedModel)."""
    if act not in ACT_MODES:
        raise RecipeError(f"--simulate-act {act!r} is not one of {', '.join(ACT_MODES)}")
    if kv not in KV_MODES:
        raise RecipeError(f"--simulate-kv {kv!r} is not one of {', '.join(KV_MODES)}")
    scheme, static, linears, online = None, None, None, None
    if loaded.source.get("kind") == "quantkit-checkpoint":
        from quantkit.export.manifest import read_manifest
        from quantkit.export.reader import read_static_scales

        path = Path(loaded.source["path"])
        manifest = read_manifest(path)
        scheme = Scheme.from_dict(manifest["recipe"]["scheme"])
        static = read_static_scales(path, manifest)
        linears = sorted(manifest["modules"])
        online = manifest.get("online_rotations")
    plan = SimulationPlan(None, None, static, linears, online_rotations=online)
    if act == "auto":
        plan.act = scheme.input_activations if scheme is not None else None
    elif act == "token":
        plan.act = ActQuantArgs(8, "token", dynamic=True)
    elif act == "static":
        plan.act = ActQuantArgs(8, "tensor", dynamic=False)
    if kv == "auto":
        plan.kv = scheme.kv_cache if scheme is not None else None
    else:
        plan.kv = kv_from_mode(kv, kv_tau)
        plan.kv_residual = plan.kv is not None and bool(plan.kv.residual_bits)
    ensure_static_scales(loaded, plan, calib_samples, calib_seqlen, device)
    return plan


def ensure_static_scales(loaded, plan, samples: int, seqlen: int, device: str) -> None:
    """Calibrate the static scales `plan` (act, kv, linears, static) needs and does not have
    (act per-tensor, KV per-channel, residual stats), on the built-in calibration text."""
    st = plan.static or StaticScales()
    names = plan.linears
    need_act = plan.act is not None and not plan.act.dynamic and (not st.act or (names and names[0] not in st.act))
    kv = plan.kv
    has_eps = bool(st.kv) and all("k_mean_eps" in e for e in st.kv.values())
    need_kv = kv is not None and ((not kv.dynamic and not st.kv) or (bool(kv.residual_bits) and not has_eps))
    if not (need_act or need_kv):
        return
    from quantkit.calib.data import calibration_set
    from quantkit.calib.static import calibrate_static
    from quantkit.models.loading import resolve_device

    calib = calibration_set(loaded.tokenizer, None, samples=samples, seqlen=seqlen, seed=0)
    new = calibrate_static(
        loaded.model,
        calib.input_ids,
        act=plan.act if need_act else None,
        kv=kv if need_kv else None,
        device=resolve_device(device),
        ignore=("lm_head",),
        k_rotation=k_rotation_of(plan.online_rotations),
    )
    if need_act:
        st.act.update(new.act)
    if need_kv:
        st.kv.update(new.kv)
    plan.static = st
