"""`quantkit spinquant`: rotations (learned, Hadamard or none) folded into the weights, then GPTQ or RTN."""

from __future__ import annotations

from typing import Annotated

import typer

from quantkit.cli.methods import method_command

_SCHEMES = ("W4A16", "W4A4KV4")
_QUANTIZERS = ("gptq", "rtn")


def build_recipe(scheme: str, rotation: str, quantizer: str, *, group_size=None, iters=100, lr="auto",
                 optimizer="auto", train_samples=120, train_seqlen=512, seed=0, ignore=("lm_head",),
                 train_weights="auto", val_samples=8, val_every=10, estimator="auto"):
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
        from quantkit.methods.spinquant import LEARNING_RATES, TUNED

        if optimizer == "auto":  # the best setting measured for the scheme
            optimizer = TUNED[scheme]["optimizer"]
        if estimator == "auto":
            estimator = TUNED[scheme]["estimator"]
        if lr in (None, "auto") and optimizer in LEARNING_RATES:  # the manifest's recipe says the number used
            lr = LEARNING_RATES[optimizer]
        opts.update(iters=iters, lr="auto" if lr is None else lr, optimizer=optimizer, train_samples=train_samples,
                    train_seqlen=train_seqlen, train_weights=train_weights, val_samples=val_samples,
                    val_every=val_every, estimator=estimator)
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
    optimizer: Annotated[str, typer.Option("--optimizer", help="learned: cayley-sgd (SpinQuant's Riemannian SGD on the rotations), adam (on Cayley parameters), or auto (the best measured: cayley-sgd for W4A16, adam for W4A4KV4).")] = "auto",
    lr: Annotated[float | None, typer.Option("--lr", help="learned: learning rate (default: 1.5 for cayley-sgd, 1e-4 for adam).")] = None,
    train_samples: Annotated[int, typer.Option("--train-samples", help="learned: calibration sequences used for training (at most --samples minus --val-samples; each step takes the next one).")] = 120,
    train_seqlen: Annotated[int, typer.Option("--train-seqlen", help="learned: tokens per training sequence.")] = 512,
    train_weights: Annotated[str, typer.Option("--train-weights", help="learned: weights in the training loss: auto (float when GPTQ follows W4A4KV4, as SpinQuant does; else RTN fake-quant), quantized or float.")] = "auto",
    estimator: Annotated[str, typer.Option("--estimator", help="learned: gradient of the activation/KV fake-quant: ste (identity), scale (also through the per-token scale), or auto (scale for W4A4KV4).")] = "auto",
    val_samples: Annotated[int, typer.Option("--val-samples", help="learned: calibration sequences held out of training; the rotations with the lowest held-out loss are kept (0: keep the last).")] = 8,
    val_every: Annotated[int, typer.Option("--val-every", help="learned: steps between held-out checks.")] = 10,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random Hadamard start and the calibration sample.")] = 0,
):
    """SpinQuant: rotate the model (R1/R2 folded, R3/R4 online for W4A4KV4), then quantize with GPTQ or RTN."""
    return build_recipe(scheme, rotation, quantizer, group_size=group_size, iters=iters, lr=lr, optimizer=optimizer,
                        train_samples=train_samples, train_seqlen=train_seqlen, seed=seed,
                        train_weights=train_weights, val_samples=val_samples, val_every=val_every,
                        estimator=estimator)


def register(app: typer.Typer) -> None:
    app.command("spinquant")(spinquant)
