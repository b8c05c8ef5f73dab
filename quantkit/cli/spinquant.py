"""`quantkit spinquant`: rotations (learned, Hadamard or none) folded into the weights, then GPTQ or RTN."""

from __future__ import annotations

from typing import Annotated

import typer

from quantkit.cli.methods import method_command


@method_command
def spinquant(
    scheme: Annotated[str, typer.Option("--scheme", help="W4A16 (group 64), W4A4KV4 (per-channel W4, per-token A4 and KV4) or W8A8 (per-channel W8, per-token A8; with --rotation hadamard the best W8A8 measured).")] = "W4A16",
    rotation: Annotated[str, typer.Option("--rotation", help="learned (Cayley-trained), hadamard (random Hadamard), none, or auto (learned for W4A16 and W4A4KV4, hadamard for W8A8: the settings measured).")] = "auto",
    quantizer: Annotated[str, typer.Option("--quantizer", help="Weight quantizer after the rotation: gptq or rtn.")] = "gptq",
    group_size: Annotated[
        int | None, typer.Option("--group-size", help="W4A16 group size (default 64).")
    ] = None,
    iters: Annotated[int | None, typer.Option("--iters", help="learned: training steps (default: the scheme's measured best, 100 for W4A16, 300 for W4A4KV4; a batch-1 step of the default model takes ~2-7 s on 2 CPU cores, 0.4 s on an H200).")] = None,
    train_batch: Annotated[int | None, typer.Option("--train-batch", help="learned: calibration sequences per training step (default: 1 for W4A16, 8 for W4A4KV4, the measured best).")] = None,
    optimizer: Annotated[str, typer.Option("--optimizer", help="learned: cayley-sgd (SpinQuant's Riemannian SGD on the rotations), adam (on Cayley parameters), or auto (the best measured: cayley-sgd for W4A16, adam for W4A4KV4).")] = "auto",
    lr: Annotated[float | None, typer.Option("--lr", help="learned: learning rate (default: 1.5 for cayley-sgd, 1e-4 for adam).")] = None,
    train_samples: Annotated[int, typer.Option("--train-samples", help="learned: at most this many calibration sequences train (bounded by --samples minus --val-samples; each step takes the next ones).")] = 1024,
    train_seqlen: Annotated[int, typer.Option("--train-seqlen", help="learned: tokens per training sequence.")] = 512,
    train_weights: Annotated[str, typer.Option("--train-weights", help="learned: weights in the training loss: auto (float when GPTQ follows W4A4KV4, as SpinQuant does; else RTN fake-quant), quantized or float.")] = "auto",
    estimator: Annotated[str, typer.Option("--estimator", help="learned: gradient of the activation/KV fake-quant: ste (identity), scale (also through the per-token scale), or auto (scale for W4A4KV4).")] = "auto",
    objective: Annotated[str, typer.Option("--objective", help="learned: training loss: ce (next-token cross-entropy, SpinQuant's), kl (distil the float model's logits), or auto (ce).")] = "auto",
    val_samples: Annotated[int, typer.Option("--val-samples", help="learned: calibration sequences held out of training; the rotations with the lowest held-out loss are kept (0: keep the last).")] = 24,
    val_every: Annotated[int, typer.Option("--val-every", help="learned: steps between held-out checks.")] = 20,
    samples: Annotated[int, typer.Option("--samples", help="Calibration sequences (GPTQ; learned rotations train on them minus --val-samples). 256 measured best for learned W4A4KV4.")] = 256,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random Hadamard start and the calibration sample.")] = 0,
    online: Annotated[bool | None, typer.Option("--online/--no-online", help="Run-time Hadamards (R4 on down_proj inputs, R3 on Q/K). Default: on where the scheme quantizes activations (R4) or the KV cache (R3). --no-online folds everything: a plain checkpoint vLLM runs, less accurate for W8A8/W4A4KV4; quantkit eval and quantkit's runtime apply online ones; vLLM applies R4 alone when its Hadamard is block-diagonal (see --r4-block), R3 never.")] = None,
    r4_block: Annotated[str, typer.Option("--r4-block", help="R4's Hadamard: auto (the largest power of two dividing the intermediate size, e.g. 512 of 1536, when R4 is the only online rotation: written as compressed-tensors' transform_config, which vLLM applies; else full), full (one Hadamard of the whole width, quantkit only), or a power of two dividing the width.")] = "auto",
):
    """SpinQuant: rotate the model (R1/R2 folded, R3/R4 online for W4A4KV4 and R4 for W8A8), then quantize with GPTQ or RTN."""
    from quantkit import validate as v

    v.check_int("--group-size", group_size, min=1)
    v.check_int("--iters", iters, min=1)
    v.check_int("--train-batch", train_batch, min=1)
    v.check_float("--lr", lr, min=0, min_open=True)
    v.check_int("--train-samples", train_samples, min=1)
    v.check_seqlen("--train-seqlen", train_seqlen)
    v.check_int("--val-samples", val_samples, min=0, note=" (0 = no held-out check)")
    v.check_int("--val-every", val_every, min=1)
    block: int | str = r4_block
    if r4_block not in ("auto", "full"):
        if not r4_block.isdigit() or int(r4_block) < 2 or int(r4_block) & (int(r4_block) - 1):
            raise v.OptionError(f"--r4-block {r4_block!r} must be auto, full or a power of two >= 2")
        block = int(r4_block)
    if r4_block != "auto" and online is False:
        raise v.OptionError(f"--r4-block {r4_block} shapes the online R4, which --no-online turns off; drop one of them")
    from quantkit.methods.spinquant_settings import build_recipe

    return build_recipe(scheme, rotation, quantizer, group_size=group_size, iters=iters, lr=lr, optimizer=optimizer,
                        train_samples=train_samples, train_seqlen=train_seqlen, seed=seed,
                        train_weights=train_weights, val_samples=val_samples, val_every=val_every,
                        estimator=estimator, objective=objective, train_batch=train_batch,
                        online="auto" if online is None else online, r4_block=block)


def register(app: typer.Typer) -> None:
    app.command("spinquant")(spinquant)
