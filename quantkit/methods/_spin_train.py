"""SpinQuant's rotation training: learn R1, R2 so the fake-quantized model predicts text better.

R starts at the random-Hadamard R0. Two optimizers: "cayley-sgd" (default, SpinQuant's):
Riemannian SGD on R itself, each step retracted onto the orthogonal matrices by the Cayley
transform (`rot.cayley_sgd_step`); "adam": R = R0 cayley(A), A = skew(P), Adam on P (P starts
at 0; the Cayley map keeps R orthogonal). Every step:
  1. rotated weights from the frozen float weights (`rotated_tensors`, differentiable in R),
  2. weights fake-quantized per the scheme (RTN, straight-through estimator),
  3. for activation schemes: per-token fake-quant of every quantized linear's input (STE),
     with the online Hadamard R4 before down_proj; for KV schemes: per-token K (after R3)
     and V fake-quant (STE),
  4. next-token cross-entropy on a calibration batch, backward into the rotations only.
||R^T R - I|| is logged every step; if it drifts past `reproject_tol` (float error),
R is re-projected onto the nearest orthogonal matrix (Adam: R0 <- polar(R), P <- 0).

Step 2 is skipped when GPTQ quantizes the weights afterwards and the scheme quantizes
activations or the KV cache (`quantize_weights=False`): SpinQuant's own recipe learns
rotations for W16A4KV4 and leaves the weights to GPTQ; RTN-quantized weights in the loss
teach the rotation to fix RTN's errors, which GPTQ does not make (measured on the default
model, BENCHMARKS.md). Held-out calibration sequences (`val_ids`) are scored with the same
fake-quantized loss at step 0 and every `val_every` steps; the rotations with the lowest
held-out loss are returned (step 0 is the random-Hadamard start, so training never returns
something that scores worse there than its start).
"""

from __future__ import annotations

from quantkit.errors import short_repr

import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from quantkit.methods._spin_rotate import rotated_tensors
from quantkit.models.adapter import ModelAdapter
from quantkit.quant import kv as kvq
from quantkit.quant import rotation as rot
from quantkit.quant.core import fake_quantize, fake_quantize_activations


def ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Straight-through: forward value q, gradient of the identity in x."""
    return x + (q - x).detach()


def _kv_token_fq(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token symmetric fake-quant over head_dim (the dynamic KV cache), through quant/kv's primitives."""
    xd = x.detach()
    scale = kvq.kv_scale(xd, "token", bits)
    return kvq.dequantize_kv(kvq.quantize_kv(xd, scale, bits), scale).to(x.dtype)


OPTIMIZERS = ("cayley-sgd", "adam")


@dataclass
class RotationFit:
    """What `train_rotations` returns: the chosen R1 and R2 (CPU, float32) and how it got there.

    log: one row per step (step, loss, orth_r1, orth_r2, seconds; val_loss on the steps the
    held-out loss was measured). start_val_loss: the held-out loss of the start. best_step:
    the step whose rotations were kept (-1: the start), best_val_loss: its held-out loss
    (both None / the last step without held-out data: the last step's rotations are kept)."""

    r1: torch.Tensor
    r2: list[torch.Tensor]
    log: list[dict] = field(default_factory=list)
    best_step: int = -1
    best_val_loss: float | None = None
    start_val_loss: float | None = None


def token_fq_scale_grad(x: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per-token symmetric fake-quant (scale max|row| / qmax) whose gradient also flows through the scale.

    Forward: the same values as `fake_quantize_activations` / the per-token KV quantizer. Backward:
    only the rounding is straight-through, so d/dx also carries ds/dx (round(x/s) - x/s): the
    rotation learns that a smaller per-token max (fewer outliers) lowers the rounding error, a
    signal the plain STE (identity gradient) does not give."""
    from quantkit.kernels._common import round_half_away_ref  # lazy: kernels' import tries triton
    from quantkit.kernels.act_quant import EPS

    xf = x.float()
    s = xf.abs().amax(dim=-1, keepdim=True).clamp(min=EPS) / qmax
    z = xf / s
    q = torch.clamp(z + (round_half_away_ref(z.detach()) - z).detach(), -qmax, qmax)
    return (q * s).to(x.dtype)


ESTIMATORS = ("ste", "scale")
# "ce": next-token cross-entropy on the calibration labels (SpinQuant's); "kl": KL(float model || fake-quantized
# model) over the whole vocabulary at every position: a distillation target with far more signal per token
OBJECTIVES = ("ce", "kl")


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(softmax(teacher) || softmax(student)), in float32 (nats per token)."""
    t = torch.log_softmax(teacher_logits.float(), dim=-1)
    s = torch.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


@contextmanager
def _fake_quant_runtime(model: nn.Module, scheme, linears: dict[str, nn.Module], r3: torch.Tensor | None,
                        r4_on: bool, estimator: str = "ste"):
    """Hooks for the run-time side of the scheme during training (all removed on exit).

    estimator "ste": identity gradient through every activation / KV fake-quant; "scale":
    `token_fq_scale_grad` (per-token schemes; others fall back to "ste"). Yields a context
    manager inside which the whole run-time side (R4, activation and KV fake-quant) is off: the
    model then runs as its own float self, the teacher of objective "kl"."""
    from quantkit.models.hooks import attach_online_rotations, kv_hook, online_rotation_spec

    state = {"on": True}

    def act_fq(x, act):
        if not state["on"]:
            return x
        if estimator == "scale" and act.strategy == "token":
            return token_fq_scale_grad(x, act.qmax)
        return ste(x, fake_quantize_activations(x.detach(), act))

    def kv_fq(x, kv):
        if not state["on"]:
            return x
        if estimator == "scale":
            return token_fq_scale_grad(x, kv.qmax)
        return ste(x, _kv_token_fq(x, kv.bits))

    handles = []
    with ExitStack() as stack:
        try:
            if r4_on:  # registered first: pre-hooks run in order, so the act quant sees x H
                handles += attach_online_rotations(model, online_rotation_spec(model, r3=False, r4=True),
                                                   active=lambda: state["on"])
            act = scheme.input_activations
            if act is not None:
                for mod in linears.values():
                    handles.append(mod.register_forward_pre_hook(
                        lambda _m, args: (act_fq(args[0], act), *args[1:])))
            kv = scheme.kv_cache
            if kv is not None:
                def fn(_name, key, value):
                    if r3 is not None:
                        r = r3.to(key.device, key.dtype)
                        key = kv_fq(key @ r, kv) @ r.T
                    else:
                        key = kv_fq(key, kv)
                    return key, kv_fq(value, kv)

                stack.enter_context(kv_hook(model, fn))
            @contextmanager
            def float_model():
                state["on"] = False
                try:
                    yield
                finally:
                    state["on"] = True

            yield float_model
        finally:
            for h in handles:
                h.remove()


def train_rotations(
    model: nn.Module,
    input_ids: torch.Tensor,
    scheme,
    r1: torch.Tensor,
    r2: list[torch.Tensor],
    *,
    r3: bool,
    r4: torch.Tensor | None,
    iters: int,
    lr: float,
    samples: int,
    seqlen: int,
    batch_size: int = 1,
    seed: int = 0,
    reproject_tol: float = 1e-4,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, int, str, str], None] | None = None,
    quantize_weights: bool = True,
    val_ids: torch.Tensor | None = None,
    val_every: int = 10,
    optimizer: str = "cayley-sgd",
    estimator: str = "ste",
    objective: str = "ce",
) -> RotationFit:
    """Train R1 (hidden, hidden) and R2 (one (head_dim, head_dim) per layer) from the given starts.

    model: rotation-ready (norms folded, untied), float, frozen; it is moved to `device` for
    the training and back. input_ids: (n, L) calibration tokens; the first `samples` rows
    cut to `seqlen` are used, `batch_size` per step, in order. quantize_weights: RTN
    fake-quant of the weights in the loss (off when GPTQ follows an activation scheme).
    val_ids: held-out rows (cut to `seqlen`) scored every `val_every` steps; the best are kept.
    optimizer: "cayley-sgd" (Riemannian SGD on R with the Cayley retraction, step
    min(lr (1 - step/iters), 1/|W|_1); SpinQuant's, lr ~1.5) or "adam" (on R = R0 cayley(skew(P)), lr ~1e-4).
    objective: "ce" (labels) or "kl" (distil the float model: its logits come from a no-grad
    pass of the model's own weights with the run-time side off; the float model does not depend
    on the rotation). The held-out check scores the same objective.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator {short_repr(estimator)} is not one of {', '.join(ESTIMATORS)}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer {short_repr(optimizer)} is not one of {', '.join(OPTIMIZERS)}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {short_repr(objective)} is not one of {', '.join(OBJECTIVES)}")
    if val_every < 1:
        raise ValueError("val_every must be a positive integer")
    device = torch.device(device)
    home = next(model.parameters()).device
    was_training = model.training
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = input_ids[:samples, :seqlen].to(device)
    if ids.shape[0] == 0 or ids.shape[1] < 2:
        raise ValueError("rotation training needs at least one calibration sequence of 2+ tokens")
    vids = None if val_ids is None or val_ids.shape[0] == 0 else val_ids[:, :seqlen].to(device)
    torch.manual_seed(seed)
    model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    dtype = next(model.parameters()).dtype
    linears = ModelAdapter.for_model(model).all_linears()  # every decoder-block linear
    wnames = {f"{n}.weight" for n in linears}
    head_dim = r2[0].shape[0]
    r3m = rot.normalized_hadamard(head_dim).to(device) if r3 else None
    r4d = None if r4 is None else r4.to(device, dtype)
    base1 = r1.to(device, torch.float32, copy=True)  # updated in place: never the caller's tensor
    base2 = torch.stack(r2).to(device, torch.float32)
    sgd = optimizer == "cayley-sgd"
    if sgd:  # the rotations themselves are the leaves; each step retracts them (rot.cayley_sgd_step)
        base1.requires_grad_(True)
        base2.requires_grad_(True)
    else:  # R = R0 cayley(skew(P)), Adam on P
        p1 = torch.zeros_like(base1, requires_grad=True)
        p2 = torch.zeros_like(base2, requires_grad=True)
        opt = torch.optim.Adam([p1, p2], lr=lr)
    log: list[dict] = []

    def current():
        if sgd:
            return base1, base2
        return base1 @ rot.cayley(rot.skew(p1)), base2 @ rot.cayley(rot.skew(p2))

    def update(step: int) -> float:
        """Apply the gradients in the leaves; returns the step size used (Cayley SGD: the mean a)."""
        if not sgd:
            opt.step()
            return lr
        lr_t = lr * (1 - step / iters)  # linear decay to 0, as SpinQuant's trainer schedules it
        with torch.no_grad():
            n1, a1 = rot.cayley_sgd_step(base1, base1.grad, lr_t)
            n2, a2 = rot.cayley_sgd_step(base2, base2.grad, lr_t)
            base1.copy_(n1)
            base2.copy_(n2)
        base1.grad = base2.grad = None
        return float(torch.cat([a1.reshape(1), a2]).mean())

    def weights_for(R1, R2) -> dict[str, torch.Tensor]:
        """The rotated (and, with quantize_weights, fake-quantized) weights for R1, R2 (differentiable)."""
        tensors = rotated_tensors(model, R1, list(R2.unbind(0)), r4d, dtype=dtype)
        if quantize_weights:
            for name in wnames:
                if name in tensors:
                    w = tensors[name]
                    tensors[name] = ste(w, fake_quantize(w.detach(), scheme.weights))
        return tensors

    runtime: dict = {}  # "float_model": the runtime's off switch, set inside the training's context below

    @torch.no_grad()
    def teacher_logits(batch) -> torch.Tensor | None:
        """objective "kl": the float model's logits on `batch`: its own (unrotated) weights with the
        run-time side off; the rotations leave the float function unchanged, so nothing is rotated."""
        if objective != "kl":
            return None
        with runtime["float_model"]():
            return model(batch, use_cache=False).logits

    def loss_on(batch, tensors, teacher: torch.Tensor | None) -> torch.Tensor:
        """The fake-quantized model's objective on `batch` with the given weights: the next-token
        cross-entropy, or with `teacher` logits the KL from them."""
        if teacher is None:
            return torch.func.functional_call(
                model, tensors, args=(batch,), kwargs={"labels": batch, "use_cache": False}, strict=False
            ).loss
        student = torch.func.functional_call(
            model, tensors, args=(batch,), kwargs={"use_cache": False}, strict=False).logits
        return distill_kl(student, teacher)

    @torch.no_grad()
    def val_loss() -> float:
        tensors = weights_for(*current())  # once per check, not per held-out batch
        total = 0.0
        for lo in range(0, vids.shape[0], batch_size):
            b = vids[lo: lo + batch_size]
            total += float(loss_on(b, tensors, teacher_logits(b))) * b.shape[0]
        return total / vids.shape[0]

    best = {"step": -1, "val": None, "r": None}
    start_val = None

    @torch.no_grad()
    def consider(step: int, row: dict) -> None:
        """Score the current rotations on the held-out rows; keep them if they are the best so far."""
        v = val_loss()
        row["val_loss"] = v
        if best["val"] is None or v < best["val"]:
            R1, R2 = current()
            best.update(step=step, val=v, r=(R1.clone(), R2.clone()))

    try:
        with _fake_quant_runtime(model, scheme, linears, r3m, r4d is not None, estimator) as float_model:
            runtime.update(float_model=float_model)
            if vids is not None:
                consider(-1, start := {})
                start_val = start["val_loss"]
                if on_step is not None:
                    on_step(0, iters, "rotation training", f"held-out loss at the start {start_val:.4f}")
            for step in range(iters):
                t0 = time.perf_counter()
                lo = (step * batch_size) % ids.shape[0]
                batch = ids[lo: lo + batch_size]
                target = teacher_logits(batch)
                loss = loss_on(batch, weights_for(*current()), target)
                if not sgd:
                    opt.zero_grad(set_to_none=True)
                loss.backward()
                step_size = update(step)
                with torch.no_grad():
                    R1, R2 = current()
                    e1, e2 = rot.orthogonality_error(R1), max(rot.orthogonality_error(r) for r in R2)
                    if max(e1, e2) > reproject_tol:  # float drift: re-base on the nearest orthogonal matrices
                        base1.copy_(rot.reproject(R1))
                        base2.copy_(torch.stack([rot.reproject(r) for r in R2]))
                        if not sgd:
                            p1.zero_()
                            p2.zero_()
                            opt.state.clear()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                row = {"step": step, "loss": float(loss.detach()), "orth_r1": e1, "orth_r2": e2,
                       "step_size": step_size, "seconds": time.perf_counter() - t0}
                del loss
                if vids is not None and ((step + 1) % val_every == 0 or step + 1 == iters):
                    t1 = time.perf_counter()
                    consider(step, row)
                    row["val_seconds"] = time.perf_counter() - t1
                log.append(row)
                if on_step is not None:
                    held = f", held-out {row['val_loss']:.4f}" if "val_loss" in row else ""
                    on_step(step, iters, "rotation training", f"loss {row['loss']:.4f}{held}, "
                            f"||R^T R - I|| {max(e1, e2):.1e}, {row['seconds']:.2f} s")
        with torch.no_grad():
            R1, R2 = best["r"] if best["r"] is not None else current()
            R1 = rot.reproject(R1) if rot.orthogonality_error(R1) > 1e-6 else R1
            R2 = torch.stack([rot.reproject(r) if rot.orthogonality_error(r) > 1e-6 else r for r in R2])
        return RotationFit(R1.detach().cpu(), [r.detach().cpu() for r in R2], log,
                           best_step=best["step"] if best["r"] is not None else iters - 1, best_val_loss=best["val"],
                           start_val_loss=start_val)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.to(home)
        model.train(was_training)
