"""Which activation / KV-cache quantization `quantkit eval` simulates for a model, and its static scales.

A quantkit checkpoint carries its scheme (manifest recipe) and static scales, so
"auto" simulates exactly what it was exported for; a plain model is simulated
only when asked (--simulate-act / --simulate-kv), with static scales calibrated
on the fly from calibration text (the same offline calibration a quantize run does).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.recipe import ActQuantArgs, KVCacheArgs, RecipeError, Scheme

ACT_MODES = ("auto", "none", "token", "static")
KV_MODES = ("auto", "none", "int8-dynamic", "int8-static", "int8-static-residual")


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
            parts.append("online " + "/".join(k.upper() for k in ("r3", "r4") if k in self.online_rotations))
        return ", ".join(parts) or "none"

    def context(self, model):
        """The simulate(...) context manager for `model` (a no-op when nothing is simulated)."""
        if self.act is None and self.kv is None:
            return nullcontext(None)
        from quantkit.quant.simulate import simulate

        linears = None if self.linears is None else {n: model.get_submodule(n) for n in self.linears}
        from quantkit.quant.simulate import k_rotation_of

        return simulate(model, act=self.act, kv=self.kv, static=self.static, linears=linears,
                        kv_residual=self.kv_residual, k_rotation=k_rotation_of(self.online_rotations))


def _kv_from_mode(mode: str, tau: float) -> KVCacheArgs | None:
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
        plan.kv = _kv_from_mode(kv, kv_tau)
        plan.kv_residual = plan.kv is not None and bool(plan.kv.residual_bits)
    _ensure_static(loaded, plan, calib_samples, calib_seqlen, device)
    return plan


def _ensure_static(loaded, plan: SimulationPlan, samples: int, seqlen: int, device: str) -> None:
    """Calibrate the static scales the plan needs and does not have (act per-tensor, KV per-channel, residual stats)."""
    from quantkit.quant.simulate import StaticScales

    st = plan.static or StaticScales()
    names = plan.linears
    need_act = plan.act is not None and not plan.act.dynamic and (not st.act or (names and names[0] not in st.act))
    kv = plan.kv
    has_eps = bool(st.kv) and all("k_mean_eps" in e for e in st.kv.values())
    need_kv = kv is not None and ((not kv.dynamic and not st.kv) or (bool(kv.residual_bits) and not has_eps))
    if not (need_act or need_kv):
        return
    from quantkit.calib.data import calibration_set
    from quantkit.models.loading import resolve_device
    from quantkit.quant.simulate import calibrate_static

    calib = calibration_set(loaded.tokenizer, None, samples=samples, seqlen=seqlen, seed=0)
    ignore = ("lm_head",)
    new = calibrate_static(
        loaded.model,
        calib.input_ids,
        act=plan.act if need_act else None,
        kv=kv if need_kv else None,
        device=resolve_device(device),
        ignore=ignore,
    )
    if need_act:
        st.act.update(new.act)
    if need_kv:
        st.kv.update(new.kv)
    plan.static = st
