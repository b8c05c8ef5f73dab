"""`quantkit spinquant`: rotations (learned, Hadamard or none) folded into the weights, then GPTQ or RTN."""

from __future__ import annotations

from typing import Annotated

import typer

from quantkit.cli.methods import method_command

_SCHEMES = ("W4A16", "W4A4KV4")
_QUANTIZERS = ("gptq", "rtn")


def build_recipe(scheme: str, rotation: str, quantizer: str, *, group_size=None, iters=100, lr=1e-3,
                 train_samples=32, train_seqlen=512, seed=0, ignore=("lm_head",)):
    """The Recipe `quantkit spinquant` runs (also used by benchmarks): spinquant -> gptq|rtn."""
    import dataclasses

    from quantkit.methods.spinquant import ROTATIONS
    from quantkit.recipe import PRESETS, Recipe, RecipeError, Stage

    if scheme not in _SCHEMES:
        raise RecipeError(f"--scheme {scheme!r} is not one of {', '.join(_SCHEMES)}")
    if rotation not in ROTATIONS:
        raise RecipeError(f"--rotation {rotation!r} is not one of {', '.join(ROTATIONS)}")
    if quantizer not in _QUANTIZERS:
        raise RecipeError(f"--quantizer {quantizer!r} is not one of {', '.join(_QUANTIZERS)}")
    s = PRESETS[scheme]
    if scheme == "W4A16":  # group 64 divides the default model's 576 / 1536 (128 does not divide 576)
        s = dataclasses.replace(s, weights=dataclasses.replace(s.weights, group_size=group_size or 64, symmetric=False))
    elif group_size is not None:
        raise RecipeError("W4A4KV4 uses per-channel weights (the int W4A4 layout); drop --group-size")
    opts = {"rotation": rotation, "seed": seed}
    if rotation == "learned":
        opts.update(iters=iters, lr=lr, train_samples=train_samples, train_seqlen=train_seqlen)
    return Recipe(s, (Stage("spinquant", opts), Stage(quantizer)), ignore=tuple(ignore))


@method_command
def spinquant(
    scheme: Annotated[str, typer.Option("--scheme", help="W4A16 (group 64) or W4A4KV4 (per-channel W4, per-token A4 and KV4).")] = "W4A16",
    rotation: Annotated[str, typer.Option("--rotation", help="learned (Cayley-trained), hadamard (random Hadamard) or none.")] = "learned",
    quantizer: Annotated[str, typer.Option("--quantizer", help="Weight quantizer after the rotation: gptq or rtn.")] = "gptq",
    group_size: Annotated[
        int | None, typer.Option("--group-size", help="W4A16 group size (default 64).")
    ] = None,
    iters: Annotated[int, typer.Option("--iters", help="learned: training steps (100 on a GPU; each ~3-7 s on 2 CPU cores for the default model).")] = 100,
    lr: Annotated[float, typer.Option("--lr", help="learned: Adam learning rate on the Cayley parameters.")] = 1e-3,
    train_samples: Annotated[int, typer.Option("--train-samples", help="learned: calibration sequences used for training.")] = 32,
    train_seqlen: Annotated[int, typer.Option("--train-seqlen", help="learned: tokens per training sequence.")] = 512,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random Hadamard start and the calibration sample.")] = 0,
):
    """SpinQuant: rotate the model (R1/R2 folded, R3/R4 online for W4A4KV4), then quantize with GPTQ or RTN."""
    return build_recipe(scheme, rotation, quantizer, group_size=group_size, iters=iters, lr=lr,
                        train_samples=train_samples, train_seqlen=train_seqlen, seed=seed)


def register(app: typer.Typer) -> None:
    app.command("spinquant")(spinquant)
