"""SpinQuant: orthogonal rotations folded into the weights before quantization.

Liu et al., "SpinQuant: LLM quantization with learned rotations" (2024); the
Hadamard baseline is QuaRot (Ashkboos et al., 2024).

1. Rotation-ready model (`make_rotation_ready`): each RMSNorm's weight g is folded
   into the linears it feeds (W diag(g)), the norm's weight set to 1; tied
   embeddings are untied (the LM head gets the final norm folded in and its own
   rotation, so it can no longer share the embedding matrix). Exact in float.
2. R1 (hidden x hidden) rotates the residual stream: embeddings E R1, every linear
   reading it W R1, every linear writing it R1^T W (+ bias), the LM head W R1.
   RMSNorm with weight 1 commutes with an orthogonal R1, so the model is unchanged.
   R2 (head_dim x head_dim, one per layer) sits between v_proj (outputs per head
   R2^T W_v) and o_proj (inputs per head W_o R2). Both are folded offline.
3. For activation / KV quantization (W4A4KV4) two online Hadamards: R4 on
   down_proj's input (weight W H folded, x H applied at run time,
   `quantkit.models.hooks.attach_online_rotations`) and R3 on Q/K after RoPE
   (only K's quantization changes). The manifest records them (`online_rotations`).
4. rotation "hadamard": R1, R2 random Hadamard (seeded); "learned": start from
   those and train them on calibration text (Cayley SGD on the orthogonal matrices,
   or Adam on Cayley parameters) so the fake-quantized model's next-token loss drops,
   keeping the rotations that score best on held-out calibration rows
   (`quantkit.methods._spin_train`); "none": nothing.

As a non-final stage (spinquant -> gptq) the whole-model transform runs in
`prepare_model`, before the layer-wise pipeline, and the next stage quantizes the
rotated float weights; as the final stage it also quantizes with RTN per block.
`self.artifacts` keeps R1, R2 (CPU tensors) and the training log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantkit.methods._spin_rotate import fold_rotations, initial_rotations, make_rotation_ready
from quantkit.methods._spin_train import ESTIMATORS, OBJECTIVES, train_rotations
from quantkit.errors import RecipeError
from quantkit.methods.base import BlockContext, Method, register_method
from quantkit.methods.options import Int, IntOrWord, MethodOptions, Number, OneOf, option
from quantkit.quant import rotation as rot
from quantkit.quant.core import quantize_weight

ROTATIONS = ("learned", "hadamard", "none")
TRAIN_WEIGHTS = ("auto", "quantized", "float")
# cayley-sgd: the paper's 1.5 (each step is also capped at |a W|_1 <= 1); adam: per-entry steps, so small
LEARNING_RATES = {"cayley-sgd": 1.5, "adam": 1e-4}
# The best learned setting measured per scheme preset (BENCHMARKS.md, SpinQuant, H200, --samples 256): W4A16 g64
# cayley-sgd batch 1, 100 steps: 14.46 vs hadamard 14.66 (batch 8: 14.58); W4A4KV4 adam + scale, batch 8, 300 steps:
# 32.45 vs hadamard 38.62 (batch 1, 100 steps, --samples 128: 35.13 vs 35.88). The CLI's "auto" options read it.
TUNED = {"W4A16": {"optimizer": "cayley-sgd", "estimator": "ste", "objective": "ce", "batch_size": 1, "iters": 100},
         "W4A4KV4": {"optimizer": "adam", "estimator": "scale", "objective": "ce", "batch_size": 8, "iters": 300}}


@dataclass
class SpinQuantOptions(MethodOptions):
    """A spinquant recipe stage's options ("learned:" = only read by rotation learned)."""

    rotation: str = option("hadamard", OneOf(ROTATIONS))
    iters: int = option(100, Int(1))  # learned: optimizer steps (the paper uses 100 on 800 samples; fewer on CPU)
    # learned: SpinQuant's Riemannian SGD on R, or "adam" on Cayley parameters
    optimizer: str = option("cayley-sgd", OneOf(tuple(LEARNING_RATES)))
    # learned: auto (or null) = the optimizer's LEARNING_RATES entry, resolved on construction
    lr: float | str = option("auto", Number(0, low_open=True, auto=True), optional=True)
    train_samples: int = option(1024, Int(1))  # learned: at most; bounded by the calibration rows minus the held-out
    train_seqlen: int = option(512, Int(1))
    batch_size: int = option(1, Int(1))
    seed: int = option(0, Int(0))
    # R3/R4: auto = when the scheme quantizes activations or the KV cache
    online: bool | str = option("auto", OneOf(("auto", True, False)))
    # R4's Hadamard: "full" = one of the whole width (Sylvester x Paley, e.g. 1536 = 128 x 12), a power of two
    # = block-diagonal Sylvester blocks of that size (what compressed-tensors' transform_config describes and
    # vLLM runs), "auto" = the largest power of two dividing the width when R4 is the only online rotation
    # (a checkpoint vLLM can serve; 512 of 1536 scored like the full one for W8A8, BENCHMARKS.md), else full
    # (R3 needs quantkit's runtime anyway, and the W4A4KV4 settings were measured with it)
    r4_block: int | str = option("auto", IntOrWord(2, ("auto", "full")))
    reproject_tol: float = option(1e-4, Number(0, low_open=True))
    # learned: weights in the training loss. auto = float when a later stage (GPTQ) quantizes
    # them and the scheme quantizes activations/KV (SpinQuant's W16A4KV4 recipe), else RTN fake-quant
    train_weights: str = option("auto", OneOf(TRAIN_WEIGHTS))
    # learned: gradient of the activation/KV fake-quant: "ste" (identity, as SpinQuant) or "scale"
    # (also through the per-token scale, so fewer outliers pay off in the loss; see _spin_train)
    estimator: str = option("ste", OneOf(ESTIMATORS))
    # learned: "ce" (next-token cross-entropy, SpinQuant's) or "kl" (distil the float model's logits)
    objective: str = option("ce", OneOf(OBJECTIVES))
    val_samples: int = option(24, Int(0))  # learned: calibration rows held out of training, scored every val_every
    val_every: int = option(20, Int(1))

    def __post_init__(self) -> None:
        if self.lr in ("auto", None):
            self.lr = LEARNING_RATES[self.optimizer]


def _check_r4_block(n: int, block: int) -> None:
    from quantkit.kernels.numerics import is_hadamard_block

    if block & (block - 1) or not is_hadamard_block(n, block):  # a power of two ("full" says the whole width)
        raise RecipeError(f"spinquant r4_block {block} is not a power of two dividing the intermediate size {n}; "
                          f"use {rot.sylvester_block(n)} (the largest), 'auto' or 'full'")


def split_held_out(input_ids: torch.Tensor, train_samples: int, val_samples: int):
    """(training rows, held-out rows or None) from the calibration rows: the held-out ones are the
    last `val_samples` (at most half of them, and none of one row), training the first
    `train_samples` of the rest. The evaluation text is elsewhere (the corpus' second half)."""
    n = input_ids.shape[0]
    val = min(val_samples, n // 2)
    train = input_ids[: min(train_samples, n - val)]
    return train, (input_ids[n - val:] if val else None)


# ----------------------------------------------------------------------------- the recipe stage


@register_method("spinquant")
class SpinQuant(Method):
    Options = SpinQuantOptions
    needs_rotation_roles = True

    def __init__(self, scheme, **options: Any):
        super().__init__(scheme, **options)
        self.artifacts: dict[str, Any] = {}
        self.online_rotations: dict[str, Any] | None = None
        self._handles: list = []

    @property
    def uses_data(self) -> bool:
        return self.opts.rotation == "learned"

    def resolved_options(self) -> dict[str, Any]:
        # online / r4_block: the manifest's online_rotations records what they became
        if self.opts.train_weights == "auto" and self.opts.rotation == "learned":
            return {"train_weights": "quantized" if self.train_quantized_weights() else "float"}
        return {}

    def train_quantized_weights(self) -> bool:
        """Whether the training loss fake-quantizes the weights (see SpinQuantOptions.train_weights)."""
        if self.opts.train_weights != "auto":
            return self.opts.train_weights == "quantized"
        quantizes_runtime = self.scheme.input_activations is not None or self.scheme.kv_cache is not None
        return self.final or not quantizes_runtime  # without act/KV quant a float-weight loss ignores R

    def _online(self) -> tuple[bool, bool]:
        """(R3, R4) on or off."""
        if self.opts.rotation == "none":
            return False, False
        if self.opts.online == "auto":
            return self.scheme.kv_cache is not None, self.scheme.input_activations is not None
        return bool(self.opts.online), bool(self.opts.online)

    @classmethod
    def check_config(cls, cfg: dict[str, Any], options: dict[str, Any]) -> None:
        n, choice = cfg.get("intermediate_size"), options.get("r4_block")
        if isinstance(n, int) and isinstance(choice, int) and not isinstance(choice, bool):
            _check_r4_block(n, choice)

    def _r4_block(self, model: nn.Module, use_r3: bool) -> int:
        """R4's block for this model (see SpinQuantOptions.r4_block); RecipeError for a block the width refuses."""
        n = model.config.intermediate_size
        choice = self.opts.r4_block
        if choice == "full" or (choice == "auto" and use_r3):
            return n
        if choice == "auto":
            return rot.sylvester_block(n)
        _check_r4_block(n, choice)
        return choice

    def prepare_model(self, model: nn.Module, input_ids: torch.Tensor | None, device: torch.device,
                      on_step=None) -> None:
        """Rotate (and for "learned" first train) the whole float model in place; attach online R4."""
        if self.opts.rotation == "none":
            return
        from quantkit.models.hooks import attach_online_rotations, online_rotation_spec, r4_block_of, r4_matrix

        make_rotation_ready(model)
        r1, r2 = initial_rotations(model, self.opts.seed)
        use_r3, use_r4 = self._online()
        spec = online_rotation_spec(model, r3=use_r3, r4=use_r4,
                                    r4_block=self._r4_block(model, use_r3) if use_r4 else None)
        r4 = r4_matrix(spec)
        if self.opts.rotation == "learned":
            if input_ids is None:
                raise RecipeError("spinquant rotation=learned needs calibration data")
            train_ids, val_ids = split_held_out(input_ids, self.opts.train_samples, self.opts.val_samples)
            fit = train_rotations(
                model, train_ids, self.scheme, r1, r2,
                r3=use_r3, r4=r4, r4_block=r4_block_of(spec), iters=self.opts.iters, lr=float(self.opts.lr),
                samples=self.opts.train_samples, seqlen=self.opts.train_seqlen, batch_size=self.opts.batch_size,
                seed=self.opts.seed, reproject_tol=self.opts.reproject_tol, device=device, on_step=on_step,
                quantize_weights=self.train_quantized_weights(), val_ids=val_ids, val_every=self.opts.val_every,
                optimizer=self.opts.optimizer, estimator=self.opts.estimator, objective=self.opts.objective,
            )
            r1, r2 = fit.r1, fit.r2
            self.artifacts["training"] = {
                "log": fit.log, "best_step": fit.best_step, "best_val_loss": fit.best_val_loss,
                "start_val_loss": fit.start_val_loss, "quantized_weights": self.train_quantized_weights(),
                "val_samples": 0 if val_ids is None else int(val_ids.shape[0]),
            }
        fold_rotations(model, r1, r2, r4)
        self.artifacts.update(r1=r1.cpu(), r2=[r.cpu() for r in r2], orthogonality_error=max(
            [rot.orthogonality_error(r1)] + [rot.orthogonality_error(r) for r in r2]))
        self.online_rotations = spec
        self._handles = attach_online_rotations(model, self.online_rotations)

    @torch.no_grad()
    def apply_block(self, ctx: BlockContext) -> None:
        if not self.final:
            return  # the rotation was folded in prepare_model; the next stage quantizes
        for name, linear in ctx.linears.items():
            qt = quantize_weight(linear.weight.data, self.scheme.weights)
            linear.weight.data.copy_(qt.dequantize(linear.weight.dtype))
            ctx.results[name] = qt.to("cpu")
