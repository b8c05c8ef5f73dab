"""Options shared by every method command, as Annotated aliases (one definition each)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="Hub id, local dir (safetensors), or .gguf file. Omitted: embedded SmolLM2-135M."),
]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output checkpoint directory (written atomically).")]
BitsOpt = Annotated[int, typer.Option("--bits", help="Weight bits: 2, 3, 4 or 8.")]
GroupSizeOpt = Annotated[
    Optional[int], typer.Option("--group-size", "-g", help="Columns per scale group. Omitted: per-channel.")
]
SymOpt = Annotated[bool, typer.Option("--sym/--asym", help="Symmetric (no zero point) or asymmetric weights.")]
CalibOpt = Annotated[
    Optional[str],
    typer.Option("--calib", help="Calibration text: builtin (default; = builtin:pydoc), builtin:mix (pydoc + stdlib source + package READMEs), a .txt/.jsonl file, or hf:NAME[:CONFIG[:SPLIT]]."),
]
CalibFieldOpt = Annotated[str, typer.Option("--calib-field", help="Text field for .jsonl and hf: data.")]
SamplesOpt = Annotated[int, typer.Option("--samples", help="Calibration windows.")]
SeqlenOpt = Annotated[int, typer.Option("--seqlen", help="Tokens per window.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for window selection (results are reproducible).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (fp32 on CPU, bf16 on GPU), float32, float16, bfloat16.")]
FormatOpt = Annotated[
    str,
    typer.Option(
        "--format",
        help="Checkpoint layout: compressed-tensors (vLLM, transformers), awq (AutoAWQ GEMM; 4-bit, grouped) "
        "or gptq (GPTQ v1 / GPTQModel; 2, 3, 4, 8 bits).",
    ),
]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace a checkpoint quantkit wrote at --out (only once the new one is complete); never other files.",
    ),
]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Run model code from the hub (off by default).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Calibration windows per forward.")]
EvalFlagOpt = Annotated[
    bool, typer.Option("--eval", help="Also measure held-out perplexity before and after quantizing (same windows).")
]
WindowsOpt = Annotated[int, typer.Option("--windows", help="Held-out windows to score (0 = all).")]
EvalSeqlenOpt = Annotated[int, typer.Option("--eval-seqlen", help="Tokens per held-out window.")]
JsonOpt = Annotated[Optional[Path], typer.Option("--json", help="Also write the run summary (times, memory, perplexities) here.")]

# Overrides for commands whose scheme comes from elsewhere (a recipe, a method's
# default): None means "not given on the command line", so the other source wins.
BitsOverrideOpt = Annotated[Optional[int], typer.Option("--bits", help="Weight bits: 2, 3, 4 or 8 (overrides the scheme).")]
GroupSizeOverrideOpt = Annotated[
    Optional[int],
    typer.Option("--group-size", "-g", help="Columns per scale group; 0 = per-channel (overrides the scheme)."),
]
SymOverrideOpt = Annotated[
    Optional[bool], typer.Option("--sym/--asym", help="Symmetric or asymmetric weights (overrides the scheme).", show_default=False)
]
ResumeOpt = Annotated[
    bool,
    typer.Option("--resume", help="Continue an interrupted run from the blocks saved in OUT.partial (same settings)."),
]
SkipMemOpt = Annotated[
    bool,
    typer.Option("--skip-memory-check", help="Run even when the memory plan says it will not fit."),
]
SensitiveOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--sensitive",
        help="sensitive_layers.json from `quantkit scan`: its flagged linears stay FP16 (mixed precision).",
    ),
]
StreamOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--stream/--no-stream",
        help="Read one decoder block at a time from the safetensors files (default: only when the model would "
        "not fit in host memory and the streamed run does).",
        show_default=False,
    ),
]
ShardSizeOpt = Annotated[
    float,
    typer.Option("--shard-size", help="Largest weights file in GiB; bigger checkpoints are written as "
                 "model-0000k-of-0000n.safetensors with model.safetensors.index.json."),
]
# The per-group range search of quant.mse (rtn, gptq); a flag left out adds nothing to the recipe (the method's
# default: off for rtn, "auto" for gptq, which searches at 3-4 bits).
MseOpt = Annotated[bool, typer.Option("--mse", help="Search each group's range (shrink factors) for the least "
                                                   "weight error instead of min/max (recipe option mse).")]
GptqMseOpt = Annotated[Optional[bool], typer.Option(
    "--mse/--no-mse", help="Search each group's range for the least Hessian-weighted error instead of min/max "
                           "(recipe option mse; default: on for weight-only schemes of 4 bits or fewer, off above).")]
MseGridOpt = Annotated[int, typer.Option("--mse-grid", help="Shrink factors --mse tries, from 1.0 down to 0.5.")]


# GPTQ's options, shared by `quantkit gptq` and `quantkit scan --method gptq` (None there: GPTQ's default).
DampOpt = Annotated[Optional[float], typer.Option("--damp", help="GPTQ: Hessian dampening, a fraction of its mean diagonal.")]
ActOrderOpt = Annotated[
    Optional[bool],
    typer.Option("--act-order/--no-act-order", help="GPTQ: solve columns by decreasing Hessian diagonal (static groups)."),
]


def check_damp(damp: float | None) -> None:
    from quantkit import validate as v

    v.check_float("--damp", damp, min=0, max=1, min_open=True, note=" (a fraction of the mean Hessian diagonal)")


MseWeightOpt = Annotated[Optional[str], typer.Option(
    "--mse-weight", help="hessian (the default): weigh each column's error by the Hessian diagonal; none: the "
                         "weights' own error, as GPTQModel's mse.")]


def mse_stage_options(mse: bool | None, mse_grid: int, mse_weight: str | None = None) -> dict:
    """The stage options --mse/--no-mse/--mse-grid/--mse-weight ask for; what was not given is left to the
    method's default (so plain runs record no range-search keys). --mse-grid and --mse-weight given with
    --no-mse are refused: they would do nothing."""
    from quantkit import validate as v
    from quantkit.quant.mse import DEFAULTS, MAX_GRID, WEIGHTS

    v.check_int("--mse-grid", mse_grid, min=1, max=MAX_GRID)
    if mse_weight is not None and mse_weight not in WEIGHTS:
        raise v.OptionError(f"--mse-weight {v.short(mse_weight, 40)} must be one of {', '.join(WEIGHTS)}")
    if mse is False and (mse_weight is not None or mse_grid != DEFAULTS["mse_grid"]):
        raise v.OptionError("--mse-grid and --mse-weight set the range search that --no-mse turns off; drop one")
    opts: dict = {} if mse is None else {"mse": mse}
    if mse is not False and mse_grid != DEFAULTS["mse_grid"]:
        opts["mse_grid"] = mse_grid
    if mse_weight is not None:
        opts["mse_weight"] = mse_weight
    return opts


# Learned rounding (quant.rounding; rtn, gptq); off adds nothing to the recipe.
LearnedRoundingOpt = Annotated[bool, typer.Option(
    "--learned-rounding/--no-learned-rounding",
    help="Learn each weight's rounding and each group's range against the block output (SignSGD, AutoRound-style) "
         "after the method's own quantization; needs calibration data (recipe option learned_rounding).")]
RoundingStepsOpt = Annotated[int, typer.Option("--rounding-steps", help="SignSGD steps per block for "
                                                                       "--learned-rounding (one calibration batch each).")]


def rounding_stage_options(on: bool, steps: int) -> dict:
    """The stage options --learned-rounding/--rounding-steps ask for: none when it is off."""
    from quantkit import validate as v

    v.check_int("--rounding-steps", steps, min=0, max=100_000)
    return {"learned_rounding": True, "rounding_steps": steps} if on else {}
