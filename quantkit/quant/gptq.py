"""GPTQ: quantize a weight column by column, pushing each column's rounding error
onto the columns not yet quantized so that the layer output moves as little as
possible (Frantar et al., "GPTQ", 2022, built on Optimal Brain Quantization).

The solver is a pure function of tensors, (W, H, args) -> quantized W; the
statistics (H = 2 X^T X / n over calibration inputs X) are collected elsewhere
(`quantkit.calib.capture`) and the block orchestration lives in
`quantkit.methods.gptq`.

Math, for one row w of W (rows are independent and share H):
  minimize (w - q) H (w - q)^T over the quantization grid, greedily:
  quantize column i, then w[i+1:] -= (w_i - q_i) / Hinv_ii * Hinv[i, i+1:],
  where Hinv is the inverse Hessian of the columns not yet quantized. The rows
  of that shrinking inverse are exactly the rows of the upper Cholesky factor
  U of H^-1 (scaled by sqrt of the diagonal), so one factorization replaces
  the per-column re-inversion: err_i = (w_i - q_i) / U_ii; w[i+1:] -= err_i * U[i, i+1:].
  Lazy batching applies the updates inside a block of `block_size` columns
  immediately and to the later columns once per block (one matmul).

Group scales:
  act_order=False: a group's scale/zero are computed when the solve reaches
    its first column, from the weights as updated so far (the usual GPTQ).
  act_order=True: columns are solved by descending H diagonal (most active
    inputs first), but scales/zeros are STATIC: computed per group of the
    ORIGINAL column order from the original weights before any update. So the
    result keeps the standard layout (group of column c = c // group_size; no
    g_idx reordering needed at export or in kernels).
  per-channel (group_size None): one scale per row from the original weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.quant.core import QuantizedTensor, compute_qparams, group_size_for
from quantkit.recipe import QuantArgs

# Damping tries: damp, damp*10, damp*100, damp*1000 (relative to the mean H diagonal).
DAMP_TRIES = 4


class CholeskyError(RuntimeError):
    """The Hessian could not be factored even with the highest damping (or is not finite)."""


@dataclass
class GPTQResult:
    """qt: the quantized weight in the ORIGINAL column order (standard layout).
    perm: (in,) long, the order columns were solved in (act_order), else None.
    damp: the relative damping actually used (> the asked one when H needed more).
    error: tr((W - Q) H (W - Q)^T) with the given (undamped) H: the Hessian-weighted
        output error summed over rows (RTN's value is the baseline to beat).
    dead: number of input columns with H_ii == 0 (never saw a non-zero input).
    """

    qt: QuantizedTensor
    perm: torch.Tensor | None
    damp: float
    error: float
    dead: int


def hessian_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W - W_hat) H (W - W_hat)^T) for W, W_hat (out, in) and H (in, in)."""
    dt = torch.promote_types(h.dtype, torch.float32)
    d = w.to(dt) - w_hat.to(dt)
    return float(((d @ h.to(dt)) * d).sum())


def _inverse_upper_cholesky(h: torch.Tensor) -> torch.Tensor | None:
    """Upper Cholesky factor U of H^-1 (H = damped Hessian), or None if H is not PD."""
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        return None
    hinv = torch.cholesky_inverse(chol)
    del chol
    u, info = torch.linalg.cholesky_ex(hinv, upper=True)
    if int(info) != 0 or not bool(torch.isfinite(u).all()):
        return None
    return u


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    args: QuantArgs,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    scale_dtype: torch.dtype | None = None,
) -> GPTQResult:
    """GPTQ-quantize one weight.

    w: (out, in) weight, any float dtype (not modified).
    h: (in, in) Hessian 2 X^T X / n of the layer's inputs, float32 (not modified).
    args: bits 2/3/4/8, group size (must divide in) or None, sym/asym.
    damp: added to H's diagonal as damp * mean(diag H) before factoring; raised
        x10 up to DAMP_TRIES times when H is not positive definite. damp=0 is
        allowed here (tests); recipes require (0, 1].
    block_size: columns per lazy update batch (any positive int; results equal
        the unbatched solve up to float rounding).
    act_order: solve columns by descending diag(H); group scales stay static in
        the original order (see module docstring).
    scale_dtype: the dtype scales are stored in (default w.dtype); scales are
        rounded to it exactly as RTN does, so export is exact.

    Runs on w's device in float32 (float64 when h is float64: the tests use that
    to compare against a slow reference bit for bit). Raises CholeskyError when H
    is not finite or stays non-PD at the highest damping.
    """
    out_f, in_f = w.shape
    if h.shape != (in_f, in_f):
        raise ValueError(f"Hessian shape {tuple(h.shape)} does not match weight in_features {in_f}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    g = group_size_for(args, in_f)
    if in_f % g:
        raise ValueError(f"group size {g} does not divide in_features {in_f}")
    cdt = torch.float64 if h.dtype == torch.float64 else torch.float32
    sdt = scale_dtype or w.dtype
    dev = w.device

    W = w.detach().to(device=dev, dtype=cdt).clone()  # W: (out, in)
    H = h.detach().to(device=dev, dtype=cdt).clone()  # H: (in, in)
    if not bool(torch.isfinite(H).all()):
        raise CholeskyError("Hessian has NaN/Inf entries (overflowing activations?)")
    diag = H.diagonal()  # a view: writes go into H
    # Dead inputs: a column whose input was always 0 (H_ii == 0, so its whole
    # row/column of H is 0) cannot change the output. Set H_ii = 1 so H stays
    # invertible and zero the weight column so it quantizes to exactly 0 and
    # passes no error on to other columns.
    dead = diag == 0
    n_dead = int(dead.sum())
    diag[dead] = 1.0
    W[:, dead] = 0.0
    mean_diag = float(diag.mean())
    if not mean_diag > 0:
        raise CholeskyError(f"Hessian diagonal has mean {mean_diag:g} <= 0; damping cannot make it positive definite")

    perm = torch.argsort(diag, descending=True, stable=True) if act_order else None
    # Static scales (per-channel, or act_order): from the original (dead-zeroed) weights.
    static = args.group_size is None or act_order
    if static:
        scale, zero = compute_qparams(W, args, scale_dtype=sdt)
    else:
        n_groups = in_f // g
        scale = torch.empty(out_f, n_groups, dtype=torch.float32, device=dev)
        zero = None if args.symmetric else torch.empty(out_f, n_groups, dtype=torch.int8, device=dev)

    used, U = damp, None
    for t in range(DAMP_TRIES if damp > 0 else 1):  # x10 of 0 is still 0: one try
        used = damp * 10.0**t
        Hd = H.clone()
        Hd.diagonal().add_(used * mean_diag)
        if perm is not None:
            Hd = Hd[perm][:, perm]
        U = _inverse_upper_cholesky(Hd)
        del Hd
        if U is not None:
            break
    if U is None:
        raise CholeskyError(f"Hessian is not positive definite even with damp {used:g}")
    del H, diag

    if perm is not None:
        W = W[:, perm]
        # Solve position j holds original column perm[j]; its static group is perm[j] // g.
        col_group = (perm // g).tolist()
    else:
        col_group = None
    Q = torch.empty_like(W)  # integers (as floats), solve order
    # Compute-dtype copies of scale/zero, so the column loop does no conversions.
    scale_c = scale.to(cdt)
    zero_c = None if zero is None else zero.to(cdt)
    qmin, qmax = float(args.qmin), float(args.qmax)

    for b0 in range(0, in_f, block_size):
        b1 = min(b0 + block_size, in_f)
        W1 = W[:, b0:b1].clone()  # W1: (out, b) this block's columns, updated in place
        E1 = torch.zeros_like(W1)  # E1: (out, b) scaled errors, applied to later blocks lazily
        U1 = U[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if static:
                gi = 0 if args.group_size is None else (col_group[col] if col_group is not None else col // g)
            else:
                gi = col // g
                if col % g == 0:
                    # The group's weights with every update so far: columns in this
                    # block are current in W1; later ones still owe this block's
                    # pending (lazy) updates, added here without storing them.
                    end = col + g
                    grp = W1[:, i : min(end, b1) - b0]
                    if end > b1:
                        grp = torch.cat([grp, W[:, b1:end] - E1[:, :i] @ U[b0:col, b1:end]], dim=1)
                    s_g, z_g = compute_qparams(grp, args, scale_dtype=sdt)
                    scale[:, gi] = s_g[:, 0]
                    scale_c[:, gi] = s_g[:, 0]
                    if zero is not None:
                        zero[:, gi] = z_g[:, 0]
                        zero_c[:, gi] = z_g[:, 0]
            s = scale_c[:, gi]
            w_col = W1[:, i]
            # Same ops as quant.core.quantize/dequantize, so a column with no
            # incoming error quantizes exactly as RTN would.
            q = torch.round(w_col / s)
            if zero is not None:
                z = zero_c[:, gi]
                q = (q + z).clamp_(qmin, qmax)
                dq = (q - z) * s
            else:
                q = q.clamp_(qmin, qmax)
                dq = q * s
            Q[:, col] = q
            err = (w_col - dq) / U1[i, i]
            W1[:, i + 1 :].addr_(err, U1[i, i + 1 :], alpha=-1.0)
            E1[:, i] = err
        if b1 < in_f:
            W[:, b1:].addmm_(E1, U[b0:b1, b1:], alpha=-1.0)
        del W1, E1

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    qt = QuantizedTensor(Q.to(torch.int8), scale, zero, args)
    err_total = hessian_error(w, qt.dequantize(cdt), h)
    return GPTQResult(qt=qt, perm=perm, damp=used, error=err_total, dead=n_dead)
