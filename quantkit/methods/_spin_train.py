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

import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from quantkit.errors import short_repr
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
                        r4_on: bool, estimator: str = "ste", r4_block: int | None = None):
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
                handles += attach_online_rotations(model, online_rotation_spec(model, r3=False, r4=True, r4_block=r4_block),
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


@dataclass(frozen=True)
class TrainSettings:
    """How `train_rotations` trains (checked on construction).

    iters: optimizer steps; lr: the step size (see `optimizer`). samples / seqlen: the first
    `samples` calibration rows, cut to `seqlen`, are used, `batch_size` per step, in order.
    reproject_tol: ||R^T R - I|| past which R is re-projected onto the orthogonal matrices.
    quantize_weights: RTN fake-quant of the weights in the loss (off when GPTQ follows an
    activation scheme). val_every: held-out check period (steps). optimizer: "cayley-sgd"
    (Riemannian SGD on R with the Cayley retraction, step min(lr (1 - step/iters), 1/|W|_1);
    SpinQuant's, lr ~1.5) or "adam" (on R = R0 cayley(skew(P)), lr ~1e-4). estimator: see
    `_fake_quant_runtime`. objective: "ce" (labels) or "kl" (distil the float model: its logits
    come from a no-grad pass of the model's own weights with the run-time side off; the float
    model does not depend on the rotation). The held-out check scores the same objective.
    """

    iters: int
    lr: float
    samples: int
    seqlen: int
    batch_size: int = 1
    seed: int = 0
    reproject_tol: float = 1e-4
    quantize_weights: bool = True
    val_every: int = 10
    optimizer: str = "cayley-sgd"
    estimator: str = "ste"
    objective: str = "ce"

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator {short_repr(self.estimator)} is not one of {', '.join(ESTIMATORS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {short_repr(self.optimizer)} is not one of {', '.join(OPTIMIZERS)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective {short_repr(self.objective)} is not one of {', '.join(OBJECTIVES)}")
        if self.val_every < 1:
            raise ValueError("val_every must be a positive integer")


class _Rotations:
    """The trained R1 (hidden, hidden) and stacked R2 (layers, head_dim, head_dim), and their optimizer.

    cayley-sgd: the rotations themselves are the leaves and each step retracts them
    (`rot.cayley_sgd_step`); adam: R = R0 cayley(skew(P)) with Adam on P (P starts at 0)."""

    def __init__(self, r1: torch.Tensor, r2: list[torch.Tensor], cfg: TrainSettings, device: torch.device):
        self.cfg = cfg
        self.sgd = cfg.optimizer == "cayley-sgd"
        self.base1 = r1.to(device, torch.float32, copy=True)  # updated in place: never the caller's tensor
        self.base2 = torch.stack(r2).to(device, torch.float32)
        if self.sgd:
            self.base1.requires_grad_(True)
            self.base2.requires_grad_(True)
        else:
            self.p1 = torch.zeros_like(self.base1, requires_grad=True)
            self.p2 = torch.zeros_like(self.base2, requires_grad=True)
            self.opt = torch.optim.Adam([self.p1, self.p2], lr=cfg.lr)

    def current(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.sgd:
            return self.base1, self.base2
        return self.base1 @ rot.cayley(rot.skew(self.p1)), self.base2 @ rot.cayley(rot.skew(self.p2))

    def zero_grad(self) -> None:
        if not self.sgd:
            self.opt.zero_grad(set_to_none=True)

    def update(self, step: int) -> float:
        """Apply the gradients in the leaves; returns the step size used (Cayley SGD: the mean a)."""
        if not self.sgd:
            self.opt.step()
            return self.cfg.lr
        lr_t = self.cfg.lr * (1 - step / self.cfg.iters)  # linear decay to 0, as SpinQuant's trainer schedules it
        with torch.no_grad():
            n1, a1 = rot.cayley_sgd_step(self.base1, self.base1.grad, lr_t)
            n2, a2 = rot.cayley_sgd_step(self.base2, self.base2.grad, lr_t)
            self.base1.copy_(n1)
            self.base2.copy_(n2)
        self.base1.grad = self.base2.grad = None
        return float(torch.cat([a1.reshape(1), a2]).mean())

    @torch.no_grad()
    def keep_orthogonal(self) -> tuple[float, float]:
        """(||R1^T R1 - I||, max over R2); past reproject_tol (float drift) re-base on the nearest
        orthogonal matrices (Adam: R0 <- polar(R), P <- 0)."""
        R1, R2 = self.current()
        e1, e2 = rot.orthogonality_error(R1), max(rot.orthogonality_error(r) for r in R2)
        if max(e1, e2) > self.cfg.reproject_tol:
            self.base1.copy_(rot.reproject(R1))
            self.base2.copy_(torch.stack([rot.reproject(r) for r in R2]))
            if not self.sgd:
                self.p1.zero_()
                self.p2.zero_()
                self.opt.state.clear()
        return e1, e2


class _Objective:
    """The fake-quantized model's loss for given rotations (differentiable in them)."""

    def __init__(self, model: nn.Module, scheme, linears: dict[str, nn.Module], r4: torch.Tensor | None,
                 cfg: TrainSettings, float_model):
        self.model, self.scheme, self.r4, self.cfg = model, scheme, r4, cfg
        self.dtype = next(model.parameters()).dtype
        self.wnames = {f"{n}.weight" for n in linears}
        self.float_model = float_model  # a context manager: the run-time side off (objective "kl"'s teacher)

    def weights_for(self, R1: torch.Tensor, R2: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rotated (and, with quantize_weights, fake-quantized) weights for R1, R2 (differentiable)."""
        tensors = rotated_tensors(self.model, R1, list(R2.unbind(0)), self.r4, dtype=self.dtype)
        if self.cfg.quantize_weights:
            for name in self.wnames:
                if name in tensors:
                    w = tensors[name]
                    tensors[name] = ste(w, fake_quantize(w.detach(), self.scheme.weights))
        return tensors

    @torch.no_grad()
    def teacher_logits(self, batch: torch.Tensor) -> torch.Tensor | None:
        """objective "kl": the float model's logits on `batch`: its own (unrotated) weights with the
        run-time side off; the rotations leave the float function unchanged, so nothing is rotated."""
        if self.cfg.objective != "kl":
            return None
        with self.float_model():
            return self.model(batch, use_cache=False).logits

    def loss(self, batch: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The objective on `batch` with the given weights: the next-token cross-entropy, or the KL
        from the float model's logits."""
        teacher = self.teacher_logits(batch)
        if teacher is None:
            return torch.func.functional_call(
                self.model, tensors, args=(batch,), kwargs={"labels": batch, "use_cache": False}, strict=False
            ).loss
        student = torch.func.functional_call(
            self.model, tensors, args=(batch,), kwargs={"use_cache": False}, strict=False).logits
        return distill_kl(student, teacher)

    @torch.no_grad()
    def held_out(self, rotations: _Rotations, vids: torch.Tensor) -> float:
        """Mean loss of the current rotations over the held-out rows."""
        tensors = self.weights_for(*rotations.current())  # once per check, not per held-out batch
        bs = self.cfg.batch_size
        total = 0.0
        for lo in range(0, vids.shape[0], bs):
            b = vids[lo: lo + bs]
            total += float(self.loss(b, tensors)) * b.shape[0]
        return total / vids.shape[0]


@contextmanager
def _frozen_on(model: nn.Module, device: torch.device):
    """The model on `device`, in eval mode, every parameter frozen; all restored on exit."""
    home = next(model.parameters()).device
    was_training = model.training
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        model.to(device)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.to(home)
        model.train(was_training)


def _train_steps(rotations: _Rotations, objective: _Objective, ids: torch.Tensor, vids: torch.Tensor | None,
                 cfg: TrainSettings, device: torch.device, on_step) -> dict:
    """The optimizer loop; returns the log and the best held-out rotations ("r": None without held-out rows)."""
    best: dict = {"step": -1, "val": None, "r": None, "start": None, "log": []}

    def consider(step: int, row: dict) -> None:
        """Score the current rotations on the held-out rows; keep them if they are the best so far."""
        v = objective.held_out(rotations, vids)
        row["val_loss"] = v
        if best["val"] is None or v < best["val"]:
            with torch.no_grad():
                R1, R2 = rotations.current()
                best.update(step=step, val=v, r=(R1.clone(), R2.clone()))

    if vids is not None:
        consider(-1, start := {})
        best["start"] = start["val_loss"]
        if on_step is not None:
            on_step(0, cfg.iters, "rotation training", f"held-out loss at the start {best['start']:.4f}")
    for step in range(cfg.iters):
        t0 = time.perf_counter()
        lo = (step * cfg.batch_size) % ids.shape[0]
        batch = ids[lo: lo + cfg.batch_size]
        loss = objective.loss(batch, objective.weights_for(*rotations.current()))
        rotations.zero_grad()
        loss.backward()
        step_size = rotations.update(step)
        e1, e2 = rotations.keep_orthogonal()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        row = {"step": step, "loss": float(loss.detach()), "orth_r1": e1, "orth_r2": e2,
               "step_size": step_size, "seconds": time.perf_counter() - t0}
        del loss
        if vids is not None and ((step + 1) % cfg.val_every == 0 or step + 1 == cfg.iters):
            t1 = time.perf_counter()
            consider(step, row)
            row["val_seconds"] = time.perf_counter() - t1
        best["log"].append(row)
        if on_step is not None:
            held = f", held-out {row['val_loss']:.4f}" if "val_loss" in row else ""
            on_step(step, cfg.iters, "rotation training", f"loss {row['loss']:.4f}{held}, "
                    f"||R^T R - I|| {max(e1, e2):.1e}, {row['seconds']:.2f} s")
    return best


def train_rotations(
    model: nn.Module,
    input_ids: torch.Tensor,
    scheme,
    r1: torch.Tensor,
    r2: list[torch.Tensor],
    *,
    r3: bool,
    r4: torch.Tensor | None,
    r4_block: int | None = None,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, int, str, str], None] | None = None,
    val_ids: torch.Tensor | None = None,
    **settings,
) -> RotationFit:
    """Train R1 (hidden, hidden) and R2 (one (head_dim, head_dim) per layer) from the given starts.

    model: rotation-ready (norms folded, untied), float, frozen; it is moved to `device` for
    the training and back. input_ids: (n, L) calibration tokens. r3: the online Hadamard on K
    in the loss; r4: the online Hadamard before down_proj (folded into its weight) or None, r4_block its
    block (None: the whole width; see `quantkit.models.hooks.online_rotation_spec`).
    val_ids: held-out rows (cut to `seqlen`) scored every `val_every` steps; the best are kept.
    settings: the fields of `TrainSettings` (iters, lr, samples, seqlen, ...).
    """
    cfg = TrainSettings(**settings)
    device = torch.device(device)
    ids = input_ids[:cfg.samples, :cfg.seqlen].to(device)
    if ids.shape[0] == 0 or ids.shape[1] < 2:
        raise ValueError("rotation training needs at least one calibration sequence of 2+ tokens")
    vids = None if val_ids is None or val_ids.shape[0] == 0 else val_ids[:, :cfg.seqlen].to(device)
    torch.manual_seed(cfg.seed)
    with _frozen_on(model, device):
        dtype = next(model.parameters()).dtype
        linears = ModelAdapter.for_model(model).all_linears()  # every decoder-block linear
        r3m = rot.normalized_hadamard(r2[0].shape[0]).to(device) if r3 else None
        r4d = None if r4 is None else r4.to(device, dtype)
        rotations = _Rotations(r1, r2, cfg, device)
        with _fake_quant_runtime(model, scheme, linears, r3m, r4d is not None, cfg.estimator,
                                r4_block) as float_model:
            objective = _Objective(model, scheme, linears, r4d, cfg, float_model)
            best = _train_steps(rotations, objective, ids, vids, cfg, device, on_step)
        with torch.no_grad():
            R1, R2 = best["r"] if best["r"] is not None else rotations.current()
            R1 = rot.reproject(R1) if rot.orthogonality_error(R1) > 1e-6 else R1
            R2 = torch.stack([rot.reproject(r) if rot.orthogonality_error(r) > 1e-6 else r for r in R2])
        return RotationFit(R1.detach().cpu(), [r.detach().cpu() for r in R2], best["log"],
                           best_step=best["step"] if best["r"] is not None else cfg.iters - 1,
                           best_val_loss=best["val"], start_val_loss=best["start"])
