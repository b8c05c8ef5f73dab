"""The pipeline stage that records static activation / KV-cache scales, block by block.

Not a recipe method (not registered): `api.quantize` appends it when the scheme needs
static scales, and `calib.static.calibrate_static` runs it alone. It changes no weight.
"""

from __future__ import annotations

import torch

from quantkit.methods.base import BlockContext, Method
from quantkit.models.hooks import attention_modules_of_block, kv_hook
from quantkit.quant import kv as kvq
from quantkit.quant.static import StaticScales
from quantkit.quant.args import ActQuantArgs, KVCacheArgs


class StaticScaleCollector(Method):
    """Records static scales of each block as it is now (after the methods): per-tensor input
    scales of the quantized linears, per-channel KV scales and (with residuals) the KV
    calibration mean error, on the model as quantized so far."""

    name = "static-scales"
    stats = frozenset()

    def __init__(self, act: ActQuantArgs | None, kv: KVCacheArgs | None, k_rotation: torch.Tensor | None = None):
        self.act, self.kv, self.final = act, kv, False
        # SpinQuant's R3: the cache stores K R3, so K's scales and residual statistics are measured on K R3
        self.k_rotation = k_rotation
        self.scales = StaticScales()

    def _cached_k(self, key: torch.Tensor) -> torch.Tensor:
        """K as the cache stores it (rotated by R3 when the model has one)."""
        return key if self.k_rotation is None else key @ self.k_rotation.to(key.device, key.dtype)

    @torch.no_grad()
    def apply_block(self, ctx: BlockContext) -> None:
        attn = attention_modules_of_block(ctx)
        act_amax: dict[str, torch.Tensor] = {}
        kv_amax: dict[str, dict[str, torch.Tensor]] = {}
        handles = []

        def rec_kv(name, key, value):
            e = kv_amax.setdefault(name, {})
            for which, x in (("k", self._cached_k(key)), ("v", value)):
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
                for i, (which, x) in enumerate((("k", self._cached_k(key)), ("v", value))):
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


def static_scale_collector(act: ActQuantArgs | None, kv: KVCacheArgs | None,
                           k_rotation: torch.Tensor | None = None) -> StaticScaleCollector:
    """A pipeline stage (Method instance) that records StaticScales into `.scales`; k_rotation: R3 or None."""
    return StaticScaleCollector(act, kv, k_rotation)
