"""SpinQuant's rotation training: learn R1, R2 so the fake-quantized model predicts text better.

R = R0 cayley(A) with R0 the random-Hadamard start and A = skew(P) trainable (P starts
at 0, so R starts at R0; the Cayley map keeps R orthogonal). Every step:
  1. rotated weights from the frozen float weights (`rotated_tensors`, differentiable in R),
  2. weights fake-quantized per the scheme (RTN, straight-through estimator),
  3. for activation schemes: per-token fake-quant of every quantized linear's input (STE),
     with the online Hadamard R4 before down_proj; for KV schemes: per-token K (after R3)
     and V fake-quant (STE),
  4. next-token cross-entropy on a calibration batch, backward into P only (Adam).
||R^T R - I|| is logged every step; if it drifts past `reproject_tol` (float error),
R0 <- polar(R0 cayley(A)) and P <- 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from quantkit.quant import rotation as rot
from quantkit.quant import kv as kvq
from quantkit.quant.core import fake_quantize, fake_quantize_activations


def ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Straight-through: forward value q, gradient of the identity in x."""
    return x + (q - x).detach()


def _kv_token_fq(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token symmetric fake-quant over head_dim (the dynamic KV cache), through quant/kv's primitives."""
    xd = x.detach()
    scale = kvq.kv_scale(xd, "token", bits)
    return kvq.dequantize_kv(kvq.quantize_kv(xd, scale, bits), scale).to(x.dtype)


@contextmanager
def _fake_quant_runtime(model: nn.Module, scheme, linears: dict[str, nn.Module], r3: torch.Tensor | None,
                        r4_on: bool):
    """Hooks for the run-time side of the scheme during training (all removed on exit)."""
    from quantkit.quant.simulate import attach_online_rotations, kv_hook, online_rotation_spec

    handles = []
    with ExitStack() as stack:
        try:
            if r4_on:  # registered first: pre-hooks run in order, so the act quant sees x H
                handles += attach_online_rotations(model, online_rotation_spec(model, r3=False, r4=True))
            act = scheme.input_activations
            if act is not None:
                for mod in linears.values():
                    handles.append(mod.register_forward_pre_hook(
                        lambda _m, args: (ste(args[0], fake_quantize_activations(args[0].detach(), act)), *args[1:])))
            kv = scheme.kv_cache
            if kv is not None:
                def fn(_name, key, value):
                    if r3 is not None:
                        r = r3.to(key.device, key.dtype)
                        key = ste(key @ r, _kv_token_fq(key @ r, kv.bits)) @ r.T
                    else:
                        key = ste(key, _kv_token_fq(key, kv.bits))
                    return key, ste(value, _kv_token_fq(value, kv.bits))

                stack.enter_context(kv_hook(model, fn))
            yield
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
    on_step: Callable[[str], None] | None = None,
    ignore=("lm_head",),
) -> tuple[torch.Tensor, list[torch.Tensor], list[dict]]:
    """Train R1 (hidden, hidden) and R2 (one (head_dim, head_dim) per layer) from the given starts.

    model: rotation-ready (norms folded, untied), float, frozen; it is moved to `device` for
    the training and back. input_ids: (n, L) calibration tokens; the first `samples` rows
    cut to `seqlen` are used, `batch_size` per step, in order. Returns (R1, R2 list, log);
    log rows: step, loss, orth_r1, orth_r2, seconds.
    """
    from quantkit.calib.pipeline import linears_to_quantize
    from quantkit.methods.spinquant import rotated_tensors
    from quantkit.quant.rotation import normalized_hadamard

    device = torch.device(device)
    home = next(model.parameters()).device
    was_training = model.training
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = input_ids[:samples, :seqlen].to(device)
    if ids.shape[0] == 0 or ids.shape[1] < 2:
        raise ValueError("rotation training needs at least one calibration sequence of 2+ tokens")
    torch.manual_seed(seed)
    model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    dtype = next(model.parameters()).dtype
    linears = linears_to_quantize(model, ignore)
    wnames = {f"{n}.weight" for n in linears}
    head_dim = r2[0].shape[0]
    r3m = normalized_hadamard(head_dim).to(device) if r3 else None
    r4d = None if r4 is None else r4.to(device, dtype)
    base1 = r1.to(device, torch.float32)
    base2 = torch.stack(r2).to(device, torch.float32)
    p1 = torch.zeros_like(base1, requires_grad=True)
    p2 = torch.zeros_like(base2, requires_grad=True)
    opt = torch.optim.Adam([p1, p2], lr=lr)
    log: list[dict] = []

    def current():
        return base1 @ rot.cayley(rot.skew(p1)), base2 @ rot.cayley(rot.skew(p2))

    try:
        with _fake_quant_runtime(model, scheme, linears, r3m, r4d is not None):
            for step in range(iters):
                t0 = time.perf_counter()
                lo = (step * batch_size) % ids.shape[0]
                batch = ids[lo: lo + batch_size]
                R1, R2 = current()
                tensors = rotated_tensors(model, R1, list(R2.unbind(0)), r4d, dtype=dtype)
                for name in wnames:
                    if name in tensors:
                        w = tensors[name]
                        tensors[name] = ste(w, fake_quantize(w.detach(), scheme.weights))
                out = torch.func.functional_call(
                    model, tensors, args=(batch,), kwargs={"labels": batch, "use_cache": False}, strict=False
                )
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                opt.step()
                with torch.no_grad():
                    R1, R2 = current()
                    e1, e2 = rot.orthogonality_error(R1), max(rot.orthogonality_error(r) for r in R2)
                    if max(e1, e2) > reproject_tol:  # float drift: re-base on the nearest orthogonal matrices
                        base1.copy_(rot.reproject(R1))
                        base2.copy_(torch.stack([rot.reproject(r) for r in R2]))
                        p1.zero_()
                        p2.zero_()
                        opt.state.clear()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                row = {"step": step, "loss": float(out.loss.detach()), "orth_r1": e1, "orth_r2": e2,
                       "seconds": time.perf_counter() - t0}
                log.append(row)
                if on_step is not None:
                    on_step(f"spinquant step {step + 1}/{iters}: loss {row['loss']:.4f}, "
                            f"||R^T R - I|| {max(e1, e2):.1e}, {row['seconds']:.2f} s")
                del out, tensors
        with torch.no_grad():
            R1, R2 = current()
            R1 = rot.reproject(R1) if rot.orthogonality_error(R1) > 1e-6 else R1
            R2 = torch.stack([rot.reproject(r) if rot.orthogonality_error(r) > 1e-6 else r for r in R2])
        return R1.detach().cpu(), [r.detach().cpu() for r in R2], log
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.to(home)
        model.train(was_training)
