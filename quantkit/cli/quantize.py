"""`quantkit quantize --recipe FILE` and the one-stage shorthands `quantkit awq` / `quantkit gptq`.

All of them build a Recipe; `method_command` (cli/methods.py) adds the shared options and hands it to
`quantkit.run.run_recipe`, the same load → quantize → eval → export flow `quantkit rtn` uses.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any, Optional

import typer

from quantkit.cli.methods import method_command
from quantkit.cli.options import (
    ActOrderOpt,
    BitsOverrideOpt,
    DampOpt,
    GptqMseOpt,
    GroupSizeOverrideOpt,
    LearnedRoundingOpt,
    MseGridOpt,
    MseWeightOpt,
    RoundingStepsOpt,
    SymOverrideOpt,
)

# Default scheme of `quantkit awq` / `quantkit gptq`: 4-bit, group 64, asymmetric.
# 64 divides the default model's in_features (576 and 1536; 128 does not divide
# 576), and a zero point helps 4-bit noticeably on small models.
DEFAULT_BITS, DEFAULT_GROUP, DEFAULT_SYM = 4, 64, False
# The weight options a recipe-building command takes over its scheme (None: not given, keep the scheme's).
_WEIGHT_OVERRIDES = (("bits", BitsOverrideOpt), ("group_size", GroupSizeOverrideOpt), ("sym", SymOverrideOpt))

RecipeOpt = Annotated[
    str,
    typer.Option(
        "--recipe",
        "-r",
        help="Recipe .yaml (see recipes/), or a quantkit checkpoint dir / its quantkit.json to re-run the recipe that made it.",
    ),
]


def override_weights(recipe, bits: int | None, group_size: int | None, sym: bool | None):
    """The recipe with the weight options that were given on the command line (None = keep the recipe's).

    group_size 0 means per-channel.
    """
    changes: dict[str, Any] = {}
    if group_size is not None and group_size > 2**31:
        from quantkit.recipe import RecipeError

        raise RecipeError(f"--group-size {group_size} is larger than any layer; use e.g. 64, or 0 for per-channel")
    if bits is not None:
        changes["bits"] = bits
    if group_size is not None:
        if group_size < 0:
            from quantkit.recipe import RecipeError

            raise RecipeError(f"--group-size {group_size} must be positive, or 0 for per-channel")
        changes["group_size"] = group_size or None
    if sym is not None:
        changes["symmetric"] = sym
    return recipe.with_weights(**changes) if changes else recipe


def one_stage_recipe(method: str, options: dict[str, Any], bits, group_size, sym):
    """A one-stage recipe with the awq/gptq default scheme (W4 g64 asym) and the given overrides."""
    from quantkit.recipe import QuantArgs, Recipe, Scheme, Stage

    base = Recipe(Scheme(QuantArgs(DEFAULT_BITS, DEFAULT_GROUP, DEFAULT_SYM)), (Stage(method, options),))
    return override_weights(base, bits, group_size, sym)


def one_stage_command(method: str) -> Callable[[Callable[..., dict[str, Any]]], Callable[..., None]]:
    """Decorator: a method command whose recipe is one `method` stage over the awq/gptq default scheme.

    The decorated function takes the method's own options and returns the stage's options dict;
    the command also takes --bits/--group-size/--sym/--asym (`one_stage_recipe`) and, through
    `method_command`, every shared option.
    """
    kw = inspect.Parameter.KEYWORD_ONLY
    overrides = [inspect.Parameter(n, kw, default=None, annotation=a) for n, a in _WEIGHT_OVERRIDES]

    def wrap(stage_options: Callable[..., dict[str, Any]]) -> Callable[..., None]:
        own = inspect.signature(stage_options, eval_str=True).parameters.values()

        def build(*, bits=None, group_size=None, sym=None, **values: Any):
            return one_stage_recipe(method, stage_options(**values), bits, group_size, sym)

        functools.update_wrapper(build, stage_options)
        build.__signature__ = inspect.Signature(overrides + [p.replace(kind=kw) for p in own])  # type: ignore[attr-defined]
        return method_command(build)

    return wrap


@method_command
def quantize(
    recipe: RecipeOpt,
    bits: BitsOverrideOpt = None,
    group_size: GroupSizeOverrideOpt = None,
    sym: SymOverrideOpt = None,
):
    """Run a recipe (ordered method stages + scheme + ignore list) and export the checkpoint.

    --bits/--group-size/--sym/--asym override the recipe's weight scheme only when given.
    """
    from quantkit.methods.base import load_recipe

    return override_weights(load_recipe(recipe), bits, group_size, sym)


@one_stage_command("awq")
def awq(
    awq_grid: Annotated[int, typer.Option("--awq-grid", help="Scale exponents tried per group (alpha in [0, 1)).")] = 20,
    awq_duo: Annotated[bool, typer.Option("--awq-duo", help="Search activation and weight exponents separately.")] = False,
    clip: Annotated[bool, typer.Option("--clip/--no-clip", help="Search a per-group weight clipping range after scaling.")] = True,
    clip_grid: Annotated[int, typer.Option("--clip-grid", help="Clipping ratios tried.")] = 20,
    max_shrink: Annotated[float, typer.Option("--max-shrink", help="Smallest clip ratio tried is 1 - this.")] = 0.5,
    search_samples: Annotated[
        int,
        typer.Option(
            "--search-samples",
            help="Calibration windows the scale/clip searches score (0 = all; statistics always use all).",
        ),
    ] = 8,
):
    """AWQ: activation-aware scales (and clipping) searched per block, then quantize.

    Default scheme: 4-bit, group 64, asymmetric (64 divides every in_features of the
    default model; 128 does not divide 576). Change it with --bits/--group-size/--sym.
    """
    from quantkit import validate as v

    from quantkit.methods.awq import MAX_GRID

    v.check_int("--awq-grid", awq_grid, min=1, max=MAX_GRID)
    v.check_int("--clip-grid", clip_grid, min=1, max=MAX_GRID)
    v.check_float("--max-shrink", max_shrink, min=0, max=1, max_open=True)
    v.check_int("--search-samples", search_samples, min=0, note=" (0 = every calibration window)")
    return dict(grid=awq_grid, duo=awq_duo, clip=clip, clip_grid=clip_grid, max_shrink=max_shrink,
                search_samples=search_samples or None)


@one_stage_command("gptq")
def gptq(
    damp: DampOpt = 0.01,
    block_size: Annotated[int, typer.Option("--block-size", help="Columns solved per lazy-update block.")] = 128,
    act_order: ActOrderOpt = True,
    true_sequential: Annotated[
        bool,
        typer.Option("--true-sequential/--no-true-sequential", help="Re-capture inputs after each sub-layer step of a block."),
    ] = True,
    mse: GptqMseOpt = None,
    mse_grid: MseGridOpt = 50,
    mse_weight: MseWeightOpt = None,
    learned_rounding: LearnedRoundingOpt = False,
    rounding_steps: RoundingStepsOpt = 200,
    gptaq: Annotated[Optional[float], typer.Option(
        "--gptaq", help="Asymmetric calibration (GPTAQ, 'GPTQ v2'), strength 0-1: fit each layer to the float "
                        "model's outputs, repairing the error of the layers before it; twice the calibration "
                        "activations. 0 = off; default: 0.25 for weight-only schemes of 4 bits or fewer, else 0.")] = None,
):
    """GPTQ: quantize column by column, compensating the error with the inputs' Hessian.

    Default scheme: 4-bit, group 64, asymmetric (64 divides every in_features of the
    default model; 128 does not divide 576). Change it with --bits/--group-size/--sym.
    """
    from quantkit import validate as v
    from quantkit.cli.options import check_damp, mse_stage_options, rounding_stage_options

    check_damp(damp)
    v.check_int("--block-size", block_size, min=1)
    v.check_float("--gptaq", gptaq, min=0, max=1, note=" (the strength of asymmetric calibration; 0 = off)")

    return dict(damp=damp, block_size=block_size, act_order=act_order, true_sequential=true_sequential,
                **mse_stage_options(mse, mse_grid, mse_weight), **rounding_stage_options(learned_rounding, rounding_steps),
                **({"gptaq": gptaq} if gptaq is not None else {}))


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize)
    app.command("awq")(awq)
    app.command("gptq")(gptq)
