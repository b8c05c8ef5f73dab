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
from quantkit.quant.args import QuantArgs
from quantkit.quant.mse import MSESearch

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
        output error summed over rows (RTN's value is the baseline to beat). Kept as a
        0-dim tensor on the solve's device (`error_t`) and turned into a float on first
        access, so a caller that never reads it never waits for the GPU.
    dead: number of input columns with H_ii == 0 (never saw a non-zero input).
    backend: "torch" or "triton", the solve that ran.
    """

    qt: QuantizedTensor
    perm: torch.Tensor | None
    damp: float
    error_t: torch.Tensor
    dead: int
    backend: str = "torch"

    @property
    def error(self) -> float:
        return float(self.error_t)


def hessian_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W - W_hat) H (W - W_hat)^T) for W, W_hat (out, in) and H (in, in)."""
    dt = torch.promote_types(h.dtype, torch.float32)
    d = w.to(dt) - w_hat.to(dt)
    return float(((d @ h.to(dt)) * d).sum())


# Rows per chunk of the error and static-scale passes: bounds their temporaries to
# ~_CHUNK_ELEMS floats (64 MiB) however large the layer is.
_CHUNK_ELEMS = 1 << 24


def _row_chunks(out_f: int, in_f: int):
    step = max(1, _CHUNK_ELEMS // max(in_f, 1))
    return [(r, min(r + step, out_f)) for r in range(0, out_f, step)]


def _hessian_error_t(w: torch.Tensor, qt: QuantizedTensor, h: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """hessian_error as a 0-dim tensor on h's device (no host sync), in row chunks."""
    from quantkit.quant.core import dequantize

    total = torch.zeros((), dtype=dt, device=h.device)
    hd = h.to(dt)
    for r0, r1 in _row_chunks(*w.shape):
        zero = None if qt.zero is None else qt.zero[r0:r1]
        d = w[r0:r1].to(dt) - dequantize(qt.q[r0:r1], qt.scale[r0:r1], zero, qt.args).to(dt)
        total += ((d @ hd) * d).sum()
    return total


def _static_qparams(w: torch.Tensor, dead: torch.Tensor, args: QuantArgs, cdt: torch.dtype, sdt: torch.dtype,
                    mse: MSESearch | None = None, col_weight: torch.Tensor | None = None):
    """compute_qparams (or the mse search's) of w (out, in) in compute dtype with the dead columns zeroed,
    in row chunks."""
    scales, zeros = [], []
    for r0, r1 in _row_chunks(*w.shape):
        part = w[r0:r1].to(cdt, copy=True).masked_fill_(dead, 0.0)
        if mse is None:
            s, z = compute_qparams(part, args, scale_dtype=sdt)
        else:
            s, z = mse.qparams(part, args, scale_dtype=sdt, col_weight=col_weight)
        scales.append(s)
        zeros.append(z)
    scale = scales[0] if len(scales) == 1 else torch.cat(scales)
    if zeros[0] is None:
        return scale, None
    return scale, zeros[0] if len(zeros) == 1 else torch.cat(zeros)


def _inverse_upper_cholesky(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor U of H^-1 (H = damped Hessian, (in, in)) and a 0-dim bool
    "U is valid" (both factorizations succeeded, U finite), without a host sync.

    U is the transpose of the lower factor of H^-1 (the same matrix: the factor with a
    positive diagonal is unique); LAPACK/cuSOLVER return that lower factor column-major, so
    U is a row-major view, which the Triton solve reads row by row without a copy."""
    return _inverse_chain([torch.linalg.cholesky_ex(h)])


def _inverse_chain(box: list) -> tuple[torch.Tensor, torch.Tensor]:
    """box: [(L, info)] of H = L L^T; taken out of the list so that L is freed as soon as
    H^-1 is formed (the caller keeps no reference)."""
    chol, info = box.pop()
    hinv = torch.cholesky_inverse(chol)
    del chol
    low, info2 = torch.linalg.cholesky_ex(hinv)
    del hinv
    u = low.mT
    ok = (info == 0) & (info2 == 0) & torch.isfinite(u).all()
    return u, ok


def _factor(h: torch.Tensor, dead: torch.Tensor, perm: torch.Tensor | None, add: torch.Tensor,
            cdt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """U for the damped Hessian: h (in, in) with dead diagonal entries set to 1, `add` added to
    the diagonal, rows/columns in solve order. Never more than three (in, in) matrices alive
    at once, h included (each intermediate is freed as soon as the next one exists)."""
    if perm is None:
        hd = h.to(cdt, copy=True)
        d_dead = dead
    else:
        hd = h.index_select(0, perm).index_select(1, perm).to(cdt)
        d_dead = dead[perm]
    diag = hd.diagonal()
    diag.masked_fill_(d_dead, 1.0)
    diag.add_(add)
    box = [torch.linalg.cholesky_ex(hd)]
    del hd, diag
    return _inverse_chain(box)


BACKENDS = ("auto", "torch", "triton")


def _pick_backend(backend: str, cdt: torch.dtype, device: torch.device, args: QuantArgs, dynamic: bool,
                  block_size: int, mse: bool = False) -> str:
    """The solve to run: "torch" or "triton" (see gptq_quantize)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    if mse and dynamic:  # the kernel computes dynamic groups' scales itself, by min/max only
        if backend == "auto":
            return "torch"
        raise ValueError("the mse search with dynamic groups (act_order off) runs in the torch solve; "
                         "use backend='torch' or 'auto'")
    from quantkit.kernels._common import triton_available

    if backend == "auto" and not (device.type == "cuda" and cdt == torch.float32 and triton_available()):
        return "torch"
    from quantkit.kernels.gptq import MAX_BLOCK_C, kernel_block_size, triton_solve_available

    kb = kernel_block_size(block_size, args.group_size, dynamic)
    problem = None
    if cdt != torch.float32:
        problem = "the Triton solve runs in float32 (this Hessian is float64); use backend='torch'"
    elif kb > MAX_BLOCK_C:
        problem = f"group size {args.group_size} is wider than the kernel's {MAX_BLOCK_C}-column block; use backend='torch'"
    elif not triton_solve_available(device):
        problem = (f"no Triton for tensors on {device} (needs CUDA, or TRITON_INTERPRET=1 set before triton "
                   "is imported on CPU); use backend='torch'")
    if problem is None:
        return "triton"
    if backend == "auto":
        return "torch"
    raise ValueError(problem)


def _factor_damped(H, dead, perm, finite, mean_diag, n_dead, damp: float, cdt):
    """(U, damp used, dead columns): the Cholesky factor of the damped H^-1, damping raised x10 up to
    DAMP_TRIES times until H is positive definite. One host sync per try (all checks read at once)."""
    used, U = damp, None
    for t in range(DAMP_TRIES if damp > 0 else 1):  # x10 of 0 is still 0: one try
        used = damp * 10.0**t
        U, ok = _factor(H, dead, perm, used * mean_diag, cdt)
        is_finite, mean_val, ok_val, dead_val = torch.stack(
            [finite.to(cdt), mean_diag, ok.to(cdt), n_dead.to(cdt)]).tolist()
        if t == 0:
            if not is_finite:
                raise CholeskyError("Hessian has NaN/Inf entries (overflowing activations?)")
            if not mean_val > 0:
                raise CholeskyError(
                    f"Hessian diagonal has mean {mean_val:g} <= 0; damping cannot make it positive definite")
        if ok_val:
            return U, used, dead_val
    raise CholeskyError(f"Hessian is not positive definite even with damp {used:g}")


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    args: QuantArgs,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    scale_dtype: torch.dtype | None = None,
    backend: str = "auto",
    mse: MSESearch | None = None,
    refit_scales: bool = False,
    cross: torch.Tensor | None = None,
) -> GPTQResult:
    """GPTQ-quantize one weight.

    w: (out, in) weight, any float dtype (not modified).
    h: (in, in) Hessian 2 X^T X / n of the layer's inputs, float32 (not modified).
    args: bits 2/3/4/8, group size (must divide in) or None, sym/asym.
    damp: added to H's diagonal as damp * mean(diag H) before factoring; raised
        x10 up to DAMP_TRIES times when H is not positive definite. damp=0 is
        allowed here (tests); recipes require (0, 1].
    block_size: columns per lazy update batch (any positive int; results equal
        the unbatched solve up to float rounding). The Triton solve uses at most 256,
        and with dynamic groups a multiple of the group size (no group straddles a block).
    act_order: solve columns by descending diag(H); group scales stay static in
        the original order (see module docstring).
    scale_dtype: the dtype scales are stored in (default w.dtype); scales are
        rounded to it exactly as RTN does, so export is exact.
    backend: "torch" (the column loop in torch ops), "triton" (one fused kernel launch
        per lazy block, `quantkit.kernels.gptq`; CUDA, or CPU under TRITON_INTERPRET=1;
        float32 only) or "auto" (Triton on CUDA for a float32 Hessian when triton is
        installed, torch otherwise). Both give the same integers up to float32
        rounding (a rare +-1 where a value sits on a rounding boundary).
    mse: the per-group range search (`quant.mse`) where the group scales are computed: on the
        original weights for static groups, on the error-compensated weights of a dynamic group
        when the solve reaches it (torch solve). None = min/max scales.
    refit_scales: after the solve, keep the integers and zero points and set each row's group scales to
        the least-squares optimum of GPTQ's own objective, (w - w_hat) H (w - w_hat)^T (`refit_group_scales`).
    cross: (in, in) 2 (X_float - X)^T X / n, the float model's inputs X_float to this layer against the
        inputs X it sees in the quantized model (H's tokens, the same normalisation): asymmetric calibration
        (GPTAQ). The solve then quantizes `asymmetric_target(w, ...)` instead of w, so that w_hat X matches
        w X_float, not w X (see there). The error reported is against that target. A cross term scaled by
        alpha in [0, 1] moves the target that fraction of the way from w.

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
    # Static scales (per-channel, or act_order): from the original (dead-zeroed) weights.
    static = args.group_size is None or act_order
    solver = _pick_backend(backend, cdt, dev, args, not static, block_size, mse is not None)

    H = h.detach().to(device=dev)  # H: (in, in), not modified (copies are damped and factored)
    finite = torch.isfinite(H).all()
    # Dead inputs: a column whose input was always 0 (H_ii == 0, so its whole
    # row/column of H is 0) cannot change the output. Set H_ii = 1 so H stays
    # invertible and zero the weight column so it quantizes to exactly 0 and
    # passes no error on to other columns. (masked_fill, not boolean indexing:
    # no host sync on a GPU.)
    dead = H.diagonal() == 0
    n_dead = dead.sum()
    diag = H.diagonal().to(cdt).masked_fill(dead, 1.0)  # (in,)
    mean_diag = diag.mean()
    perm = torch.argsort(diag, descending=True, stable=True) if act_order else None
    del diag

    U, used, dead_val = _factor_damped(H, dead, perm, finite, mean_diag, n_dead, damp, cdt)

    wd = w.detach().to(dev)
    if cross is not None:  # asymmetric calibration: the solve quantizes the weight that matches the float model
        wd = w = asymmetric_target(wd, H, cross.to(dev), dead, used * mean_diag, cdt)
    if static:
        scale, zero = _static_qparams(wd, dead, args, cdt, sdt, mse, _mse_col_weight(mse, H))
    else:
        n_groups = in_f // g
        scale = torch.empty(out_f, n_groups, dtype=torch.float32, device=dev)
        zero = None if args.symmetric else torch.empty(out_f, n_groups, dtype=torch.int8, device=dev)

    def solve(fn) -> torch.Tensor:  # on fresh solve-order weights (a failed Triton solve may have updated its copy)
        return fn(_solve_order_weights(wd, perm, dead, cdt), U, scale, zero, perm, args, g, static, sdt, block_size)

    if solver == "triton":
        try:
            Q = solve(_solve_triton)
        except Exception as e:  # noqa: BLE001 - only "auto" falls back; an explicit "triton" raises
            if backend != "auto":
                raise
            _warn_fallback(e)
            solver = "torch"
    if solver == "torch":
        Q = solve(lambda *a: _solve_torch(*a, mse, H))
    del solve
    wd = U = None  # free them before the error pass (U is in x in)
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    qt = QuantizedTensor(Q, scale, zero, args)
    if refit_scales:
        qt = refit_group_scales(w, qt, H, sdt)
    err_total = _hessian_error_t(w, qt, H, cdt)
    return GPTQResult(qt=qt, perm=perm, damp=used, error_t=err_total, dead=int(dead_val), backend=solver)


def asymmetric_target(w: torch.Tensor, h: torch.Tensor, cross: torch.Tensor, dead: torch.Tensor, lam,
                      cdt: torch.dtype) -> torch.Tensor:
    """The weight GPTQ quantizes under asymmetric calibration (GPTAQ: match the float model's output).

    With token rows X (tokens, in): GPTQ minimizes |X w^T - X w_hat^T|^2 over the inputs X the layer sees once the
    layers before it are quantized; the float model computed X_float w^T. Asymmetric calibration minimizes
    |X_float w^T - X w_hat^T|^2. Its normal equations give the continuous optimum
    w* = w X_float^T X (X^T X)^-1 = w + w D H^-1 with D = (X_float - X)^T X, and the objective equals
    |X (w* - w_hat)^T|^2 plus a constant, so GPTQ's solve run on
    w* (with the same H) minimizes it. With the damping, H + lam I, w* is the optimum of the objective plus
    lam |w - w_hat|^2 (a ridge towards w, not towards 0). h and cross share one normalisation (2/n);
    dead inputs (H_ii = 0) have D's column zero and get H_ii = 1, as in the solve. Returns (out, in) in cdt."""
    hd = h.to(cdt, copy=True)
    diag = hd.diagonal()
    diag.masked_fill_(dead, 1.0)
    diag.add_(lam)
    chol, info = torch.linalg.cholesky_ex(hd)
    del hd, diag
    if int(info) != 0:
        raise CholeskyError("damped Hessian not positive definite for the asymmetric target")
    wc = w.to(cdt)
    return wc + torch.cholesky_solve((wc @ cross.to(cdt)).T, chol).T


def refit_group_scales(w: torch.Tensor, qt: QuantizedTensor, h: torch.Tensor, scale_dtype: torch.dtype,
                       ridge: float = 1e-6) -> QuantizedTensor:
    """The same integers and zero points with each row's group scales re-solved for GPTQ's objective.

    For a row w (in,) with codes d = q - z grouped in G groups, w_hat = X s where X (in, G) holds d in its
    group's column: the scales s minimizing (w - X s) H (w - X s)^T solve (X^T H X) s = X^T H w (G x G per
    row; `ridge` x the mean diagonal pulls a group with no signal to its old scale). GPTQ fixed the scales
    before it chose the integers (from the original weights, or a dynamic group's first column), so after
    it they are no longer the best ones for those integers. A row keeps its old scales unless the new ones
    are finite, positive and lower its error after rounding to `scale_dtype` (what is stored)."""
    q, scale, zero, args = qt.q, qt.scale, qt.zero, qt.args
    out_f, in_f = q.shape
    n_groups = scale.shape[1]
    gs = in_f // n_groups
    H = h.to(torch.float64)
    hb = H.reshape(n_groups, gs, n_groups, gs)
    d = q.to(torch.float64).reshape(out_f, n_groups, gs)
    if zero is not None:
        d = d - zero.to(torch.float64).unsqueeze(-1)
    wh = (w.to(torch.float64) @ H).reshape(out_f, n_groups, gs)  # (H w_r) per row: H is symmetric
    new = torch.empty(out_f, n_groups, dtype=torch.float64, device=q.device)
    step = max(1, (1 << 24) // max(1, n_groups * in_f))  # rows per chunk: the (rows, G, G, gs) product stays small
    eye = torch.eye(n_groups, dtype=torch.float64, device=q.device)
    for r0 in range(0, out_f, step):
        dc = d[r0:r0 + step]
        t = torch.einsum("rgc,gchd->rghd", dc, hb)  # (rows, G, G, gs): d_g H_{g h}
        a = torch.einsum("rghd,rhd->rgh", t, dc)
        b = (dc * wh[r0:r0 + step]).sum(-1)
        lam = ridge * a.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)[:, None, None]
        old = scale[r0:r0 + step].to(torch.float64)
        new[r0:r0 + step] = torch.linalg.solve(a + lam * eye, (b + lam[:, :, 0] * old).unsqueeze(-1)).squeeze(-1)
    new = new.to(scale_dtype).to(scale.dtype)
    ok = torch.isfinite(new).all(dim=1) & (new > 0).all(dim=1)
    cand = QuantizedTensor(q, torch.where(ok[:, None], new, scale), zero, args)
    better = _row_hessian_error(w, cand, H) < _row_hessian_error(w, qt, H)
    return QuantizedTensor(q, torch.where(better[:, None], cand.scale, scale), zero, args)


def _row_hessian_error(w: torch.Tensor, qt: QuantizedTensor, h: torch.Tensor) -> torch.Tensor:
    """(out,) float64: (w_r - w_hat_r) H (w_r - w_hat_r)^T per row."""
    e = w.to(torch.float64) - qt.dequantize(torch.float64)
    return ((e @ h.to(torch.float64)) * e).sum(-1)


def _solve_order_weights(w: torch.Tensor, perm: torch.Tensor | None, dead: torch.Tensor, cdt: torch.dtype):
    """W: (out, in) in solve order, compute dtype, dead columns zero (permuted in w's own
    dtype: one compute-dtype copy, not two)."""
    if perm is not None:
        return w.index_select(1, perm).to(cdt).masked_fill_(dead[perm], 0.0)
    return w.to(cdt, copy=True).masked_fill_(dead, 0.0)


_fallback_warned = False


def _warn_fallback(e: Exception) -> None:
    global _fallback_warned
    if not _fallback_warned:
        import warnings

        warnings.warn(f"the Triton GPTQ solve failed ({type(e).__name__}: {str(e)[:200]}); using the torch solve "
                      "(pass backend='triton' to see the error)", RuntimeWarning, stacklevel=3)
        _fallback_warned = True


def _mse_col_weight(mse: MSESearch | None, h: torch.Tensor) -> torch.Tensor | None:
    """The search's per-column error weight: the Hessian diagonal (original column order) for weight "hessian"."""
    return h.diagonal() if mse is not None and mse.weight == "hessian" else None


def _dynamic_qparams(mse: MSESearch | None, h: torch.Tensor):
    """gptq_block_ref's qparams for dynamic groups (solve order = column order): the search on the group's
    current weights, its columns weighted as `_mse_col_weight` says."""
    if mse is None:
        return None
    cw = _mse_col_weight(mse, h)

    def qparams(grp, args, *, scale_dtype, first):
        return mse.qparams(grp, args, scale_dtype=scale_dtype,
                           col_weight=None if cw is None else cw[first : first + grp.shape[1]])

    return qparams


def _solve_torch(W, U, scale, zero, perm, args, g, static, sdt, block_size, mse=None, h=None) -> torch.Tensor:
    """The column loop in torch ops (`quantkit.kernels.gptq.gptq_block_ref` per lazy block).
    W (out, in) solve order is updated in place. Returns the integers (out, in) int8, solve order."""
    from quantkit.kernels.gptq import gptq_block_ref

    in_f = W.shape[1]
    # Solve position j holds original column perm[j]; its static group is perm[j] // g.
    col_group = (perm // g).tolist() if perm is not None else None
    Q = torch.empty_like(W)  # integers (as floats), solve order
    # Compute-dtype copies of scale/zero, so the column loop does no conversions.
    scale_c = scale.to(W.dtype)
    zero_c = None if zero is None else zero.to(W.dtype)
    for b0 in range(0, in_f, block_size):
        b1 = min(b0 + block_size, in_f)
        E1 = gptq_block_ref(W, U, Q, b0, b1, args, g=g, static=static, col_group=col_group, scale=scale, zero=zero,
                            scale_c=scale_c, zero_c=zero_c, scale_dtype=sdt,
                            qparams=_dynamic_qparams(mse, h))
        if b1 < in_f:
            W[:, b1:].addmm_(E1, U[b0:b1, b1:], alpha=-1.0)
        del E1
    return Q.to(torch.int8)


def _solve_triton(W, U, scale, zero, perm, args, g, static, sdt, block_size) -> torch.Tensor:
    """One fused kernel launch per lazy block + one GEMM for the later columns.
    W (out, in) float32 solve order is updated in place. Returns the integers (out, in) int8, solve order."""
    from quantkit.kernels.gptq import gptq_block_triton, kernel_block_size

    out_f, in_f = W.shape
    if args.group_size is None:
        mode, gidx = "channel", None
    elif static:
        mode, gidx = "static", (perm // g).to(torch.int32)
    else:
        mode, gidx = "dynamic", None
    kb = kernel_block_size(block_size, args.group_size, not static)
    if U.stride(1) != 1:  # not the row-major view of a column-major factor (see _inverse_upper_cholesky)
        U = U.contiguous()
    Q = torch.empty(out_f, in_f, dtype=torch.int8, device=W.device)
    E = torch.empty(out_f, min(kb, in_f), dtype=torch.float32, device=W.device)  # E: (out, kb) scaled errors
    for b0 in range(0, in_f, kb):
        b1 = min(b0 + kb, in_f)
        gptq_block_triton(W, U, Q, E, scale, zero, gidx, b0, b1, args, mode=mode, group_size=g, scale_dtype=sdt)
        if b1 < in_f:
            W[:, b1:].addmm_(E[:, : b1 - b0], U[b0:b1, b1:], alpha=-1.0)
    return Q
