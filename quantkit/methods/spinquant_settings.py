"""SpinQuant's tuned settings as recipes: what `quantkit spinquant` runs and what benchmarks/spinquant.py measures.

The rotation method itself is quantkit.methods.spinquant; this file turns a scheme name, a rotation kind and
"auto" choices into a Recipe (spinquant -> gptq|rtn) with the scheme's measured best values written in.
"""

from __future__ import annotations

from typing import Any

from quantkit.errors import short_repr

SCHEMES = ("W4A16", "W4A4KV4", "W8A8")
QUANTIZERS = ("gptq", "rtn")


def tuned_options(scheme: str, *, optimizer: str = "auto", estimator: str = "auto", objective: str = "auto",
                  iters: int | None = None, batch_size: int | None = None, lr: float | str | None = "auto"
                  ) -> dict[str, Any]:
    """The learned-rotation choices with every "auto" / None replaced by the scheme's measured best
    (spinquant.TUNED; the learning rate from the optimizer's LEARNING_RATES entry)."""
    from quantkit.methods.spinquant import LEARNING_RATES, TUNED

    tuned = TUNED[scheme]
    optimizer = tuned["optimizer"] if optimizer == "auto" else optimizer
    if lr in (None, "auto") and optimizer in LEARNING_RATES:  # the manifest's recipe says the number used
        lr = LEARNING_RATES[optimizer]
    return {
        "optimizer": optimizer,
        "estimator": tuned["estimator"] if estimator == "auto" else estimator,
        "objective": tuned["objective"] if objective == "auto" else objective,
        "iters": tuned["iters"] if iters is None else iters,
        "batch_size": tuned["batch_size"] if batch_size is None else batch_size,
        "lr": "auto" if lr is None else lr,  # an unknown optimizer keeps "auto": the method names it
    }


def build_recipe(scheme: str, rotation: str, quantizer: str, *, group_size=None, iters=None, lr="auto",
                 optimizer="auto", train_samples=1024, train_seqlen=512, seed=0, ignore=("lm_head",),
                 train_weights="auto", val_samples=24, val_every=20, estimator="auto", objective="auto",
                 train_batch=None, online="auto", r4_block="auto"):
    """The Recipe `quantkit spinquant` runs: spinquant -> gptq|rtn.

    "auto" / None learned-rotation settings are the scheme's measured best (`tuned_options`),
    written into the recipe as the values used. online: R3/R4 at run time ("auto": R4 when the scheme
    quantizes activations, R3 with a KV cache; False: everything folded, a checkpoint vLLM runs); r4_block:
    SpinQuantOptions.r4_block ("auto", "full" or a power of two)."""
    import dataclasses

    from quantkit.methods.spinquant import ROTATIONS, TUNED  # TUNED: the schemes with learned settings measured
    from quantkit.recipe import PRESETS, Recipe, RecipeError, Stage

    for flag, value, choices in (("--scheme", scheme, SCHEMES), ("--rotation", rotation, ("auto", *ROTATIONS)),
                                 ("--quantizer", quantizer, QUANTIZERS)):
        if value not in choices:
            raise RecipeError(f"{flag} {short_repr(value)} is not one of {', '.join(choices)}")
    s = PRESETS[scheme]
    if scheme == "W4A16":  # group 64 divides the default model's 576 / 1536 (128 does not divide 576)
        s = dataclasses.replace(s, weights=dataclasses.replace(s.weights, group_size=group_size or 64, symmetric=False))
    elif group_size is not None:
        raise RecipeError(f"{scheme} uses per-channel weights (the int {scheme[:4]} layout); drop --group-size")
    if rotation == "auto":  # learned where its settings were measured, else the random Hadamard
        rotation = "learned" if scheme in TUNED else "hadamard"
    if rotation == "learned" and scheme not in TUNED:
        raise RecipeError(f"--rotation learned has no measured settings for {scheme}; use --rotation hadamard "
                          "(measured for W8A8 in BENCHMARKS.md) or --scheme W4A16|W4A4KV4")
    opts: dict[str, Any] = {"rotation": rotation, "seed": seed}
    if online != "auto":
        opts["online"] = bool(online)
    if r4_block != "auto":
        opts["r4_block"] = r4_block
    if rotation == "learned":
        t = tuned_options(scheme, optimizer=optimizer, estimator=estimator, objective=objective, iters=iters,
                          batch_size=train_batch, lr=lr)
        opts.update(iters=t["iters"], lr=t["lr"], optimizer=t["optimizer"], train_samples=train_samples,
                    train_seqlen=train_seqlen, train_weights=train_weights, val_samples=val_samples,
                    val_every=val_every, estimator=t["estimator"], batch_size=t["batch_size"],
                    objective=t["objective"])
    return Recipe(s, (Stage("spinquant", opts), Stage(quantizer)), ignore=tuple(ignore))
