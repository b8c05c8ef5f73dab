"""`quantkit smoothquant`: SmoothQuant W8A8 (optionally with an INT8 KV cache, W8A8C8)."""

from __future__ import annotations

from typing import Annotated

import typer

from quantkit.cli.methods import method_command

_ACT = ("dynamic", "static")
_KV = ("none", "static", "dynamic")
_KV_FORMATS = ("int8", "fp8")


def build_recipe(alpha: float | str, act: str, kv: str, kv_residual: bool, kv_tau: float, ignore=("lm_head",)):
    """The Recipe `quantkit smoothquant` runs: smoothquant, final, W8 per-channel (alpha: `_alpha`'s value)."""
    from quantkit import validate as v
    from quantkit.recipe import PRESETS, ActQuantArgs, KVCacheArgs, Recipe, Scheme, Stage

    v.check_choice("--act", act, _ACT)
    v.check_choice("--kv", kv, _KV)
    acts = ActQuantArgs(8, "token", dynamic=True) if act == "dynamic" else ActQuantArgs(8, "tensor", dynamic=False)
    kv_args = None
    if kv != "none":
        kv_args = KVCacheArgs(
            8,
            "channel" if kv == "static" else "token",
            dynamic=kv == "dynamic",
            residual_bits=4 if kv_residual else None,
            residual_tau=kv_tau,
        )
    scheme = Scheme(PRESETS["W8A8"].weights, acts, kv_args)
    return Recipe(scheme, (Stage("smoothquant", {"alpha": alpha}),), ignore=tuple(ignore))


def _alpha(value: str) -> float | str:
    """--alpha as the method takes it: a number in [0, 1], or "auto"."""
    from quantkit import validate as v
    from quantkit.errors import short
    from quantkit.recipe import RecipeError

    if value == "auto":
        return value
    try:
        a = float(value)
    except ValueError:
        raise RecipeError(f"--alpha {short(value, 40)!r} must be a number in [0, 1] or 'auto'") from None
    v.check_float("--alpha", a, min=0, max=1, note=" (or auto)")
    return a


@method_command
def smoothquant(
    alpha: Annotated[str, typer.Option("--alpha", help="Migration strength in [0, 1], or 'auto' (grid search per block).")] = "0.5",
    act: Annotated[str, typer.Option("--act", help="Activations: dynamic (per-token) or static (per-tensor, calibrated).")] = "dynamic",
    kv: Annotated[str, typer.Option("--kv", help="INT8 KV cache: none, static (per-channel, calibrated) or dynamic (per-token).")] = "none",
    kv_residual: Annotated[
        bool, typer.Option("--kv-residual/--no-kv-residual", help="4-bit residuals for outlier KV tokens.")
    ] = False,
    kv_tau: Annotated[float, typer.Option("--kv-tau", help="Outlier threshold: tau x the mean relative KV error.")] = 3.0,
    kv_format: Annotated[
        str, typer.Option("--kv-format", help="kv_cache_scheme written: int8 (ours) or fp8 (vLLM); INT8 scales kept beside.")
    ] = "int8",
):
    """SmoothQuant W8A8: smooth activation outliers into the weights, W8 per-channel, A8 per-token (or static)."""
    from quantkit import validate as v
    from quantkit.recipe import RecipeError

    a = _alpha(alpha)
    v.check_float("--kv-tau", kv_tau, min=0, min_open=True)
    v.check_choice("--kv-format", kv_format, _KV_FORMATS)
    if kv == "none" and (kv_residual or kv_format != "int8"):
        raise RecipeError("--kv-residual and --kv-format need a KV cache: add --kv static or --kv dynamic")
    return build_recipe(a, act, kv, kv_residual, kv_tau), {"kv_format": kv_format}


def register(app: typer.Typer) -> None:
    app.command("smoothquant")(smoothquant)
