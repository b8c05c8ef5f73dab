"""Per-token (per-row) symmetric INT8 activation quantization, and THE definition of quantkit's
symmetric integer quantizer (``quantize_symmetric_ref``): activation fake-quant in
``quantkit.quant.core``, the KV cache in ``quantkit.quant.kv`` and every kernel reference use it.

Spec (``per_token_quant_ref``), for x: (M, K) fp16/bf16/fp32, qmax = 2^(bits-1) - 1 (127 for 8 bits):

    amax[m]  = max(max_k |x[m, k]|, EPS)            (computed in fp32, EPS = 1e-12)
    scale[m] = amax[m] / qmax                        (fp32, shape (M, 1))
    q[m, k]  = clamp(round_half_away(x[m, k] / scale[m]), -qmax, qmax)   (int8)

The range is the symmetric [-qmax, qmax] (never -128).  Rounding is to nearest with ties away
from zero (``floor(y + 0.5)`` / ``ceil(y - 0.5)``), the division is IEEE round-to-nearest
(the kernel: one ``tl.math.div_rn`` reciprocal per row and ``_common.quantize_sym_rcp``'s corrected
product, the same quotient), so the kernel reproduces the reference bit-for-bit except where a
compiled fp32 ``max`` or conversion differs in the last place (never seen in the tests).

The same quantization is fused into the W8A8 GEMM prologue (``quantkit.kernels.w8a8``) for
small M; this module is the separate fast kernel used for large M.
"""

import functools

import torch

from ._common import (LazyKernel, eager_cuda, fast_launch, launch_consts, next_pow2, pdl_enter, pdl_option,
                      quantize_sym_rcp, round_half_away_ref, sym_scale, tl, use_triton)

EPS = 1e-12

__all__ = ["per_token_quant", "per_token_quant_ref", "quantize_symmetric_ref", "scale_from_amax", "static_quant", "EPS"]


def quantize_symmetric_ref(x: torch.Tensor, scale: torch.Tensor, qmax: int = 127) -> torch.Tensor:
    """The symmetric integer quantizer: clamp(round_half_away(x / scale), -qmax, qmax) as int8.

    x: any shape, float; scale: broadcastable to x (fp32). Division in fp32 (IEEE, as the kernels'
    ``div_rn``); ties round away from zero (the kernels' ``floor(y + 0.5)`` / ``ceil(y - 0.5)``)."""
    return round_half_away_ref(x.float() / scale).clamp_(-qmax, qmax).to(torch.int8)


def scale_from_amax(amax: torch.Tensor, qmax: int) -> torch.Tensor:
    """The quantization scale of a max |x|: amax / qmax in IEEE division on every device, as the kernels divide
    (``_common.sym_scale``).  The divisor is a tensor: CUDA torch computes `t / number` as t * RN(1 / number),
    another float for some maxima.  Per-token activations here, the KV cache's scales in ``numerics``."""
    amax = amax.float()
    return amax / torch.full_like(amax, float(qmax))


def per_token_quant_ref(x: torch.Tensor, qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference. x: (..., K) float -> (q: (..., K) int8, scale: (..., 1) fp32)."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp_min(EPS)
    scale = scale_from_amax(amax, qmax)  # IEEE, as the kernels' `sym_scale`
    return quantize_symmetric_ref(xf, scale, qmax), scale


def _act_quant_kernel(
    x_ptr, q_ptr, s_ptr, st_ptr,  # x: (M, K) float, q: (M, K) int8, s: (M,) fp32; st: (1,) static scale
    K, stride_xm, stride_qm,
    EPS_C: tl.constexpr,
    QMAX: tl.constexpr,  # 2^(bits-1) - 1: 127 for A8, 7 for A4 (int8 storage either way)
    STATIC: tl.constexpr,  # per-tensor static scale read from st (no row max)
    BLOCK_K: tl.constexpr,
    ONE_PASS: tl.constexpr,
    TRIGGER: tl.constexpr,  # the next launch is programmatic (PDL): let it start now, it waits for our results
    WAIT: tl.constexpr,  # this launch is programmatic (PDL_CHAIN): the launch before may still run, wait for it
):
    pdl_enter(TRIGGER, WAIT)  # before x is read and before q / s, which the launch before may still read, are written
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    if STATIC:
        scale = tl.load(st_ptr).to(tl.float32)
    if ONE_PASS:
        # the whole row fits in one block: load once, keep in registers
        mask = offs < K
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        if not STATIC:
            scale = sym_scale(tl.max(tl.abs(x), axis=0), EPS_C, QMAX)
        # one division per row, per element the reciprocal form (with an IEEE division each the sm_90a build
        # took 1024 SASS instructions a thread for its 32 elements; 568 this way)
        rcp = tl.math.div_rn(1.0, scale)
        y = quantize_sym_rcp(x, scale, rcp, QMAX, not STATIC)
        tl.store(q_row + offs, y.to(tl.int8), mask=mask)
    else:
        if not STATIC:
            acc = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                mask = (k0 + offs) < K
                x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
                acc = tl.maximum(acc, tl.abs(x))
            scale = sym_scale(tl.max(acc, axis=0), EPS_C, QMAX)
        rcp = tl.math.div_rn(1.0, scale)
        for k0 in range(0, K, BLOCK_K):
            mask = (k0 + offs) < K
            x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
            y = quantize_sym_rcp(x, scale, rcp, QMAX, not STATIC)
            tl.store(q_row + k0 + offs, y.to(tl.int8), mask=mask)
    tl.store(s_ptr + row, scale)


act_quant_kernel = LazyKernel(_act_quant_kernel)

MAX_ONE_PASS = 16384


def per_token_quant_triton(x: torch.Tensor, out_q=None, out_s=None, *, qmax: int = 127,
                           static_scale: torch.Tensor | None = None,
                           trigger_dependents: bool = False,
                           wait_prior: bool = False, into_scratch: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launch. x: (M, K) -> (q (M, K) int8, scale (M, 1) fp32) (into out_q/out_s if given).

    static_scale: a (1,) fp32 per-tensor scale to quantize with instead of each row's max (the
    returned scale then repeats it per row, the layout ``w8a8_gemm_q`` reads).  trigger_dependents: the
    caller launches the consumer programmatically next (PDL, ``_common.pdl_supported`` must hold): it may start
    as soon as this kernel does.  wait_prior: this launch is programmatic itself (the launch before let it start
    early): it waits on the GPU for that launch before reading x or writing its outputs.  into_scratch: out_q and
    out_s are a caller's cached buffers (``_common.cached_buffer``: 16-byte aligned, contiguous, one dtype each), so
    the launch's specialization key leaves them out (less host time a call)."""
    assert x.dim() == 2
    if x.stride(-1) != 1:
        x = x.contiguous()
    M, K = x.shape
    q = out_q if out_q is not None else torch.empty((M, K), dtype=torch.int8, device=x.device)
    s = out_s if out_s is not None else torch.empty((M, 1), dtype=torch.float32, device=x.device)
    if M == 0:
        return q, s
    static = static_scale is not None
    const, ckey = _consts(K, x.is_cuda, qmax, static, trigger_dependents, wait_prior)
    args = (x, q, s, static_scale if static else s, K, x.stride(0), q.stride(0))
    # a cached q's stride is K; a static scale is the caller's own tensor, so it stays in the key
    fast_launch(act_quant_kernel, (M,), args, const, ckey,
                ((x, K, x.stride(0)) + ((static_scale,) if static else ())) if into_scratch else None)
    return q, s


@functools.lru_cache(maxsize=1024)
def _consts(K: int, cuda: bool, qmax: int, static: bool, trigger: bool, wait: bool = False) -> tuple[dict, tuple]:
    """The launch's constexprs and options and their key (memoised twice: on these arguments, the cheapest key
    per call, and in launch_consts)."""
    one_pass = K <= MAX_ONE_PASS
    block = next_pow2(K) if one_pass else 4096
    num_warps = max(1, min(16, block // 1024)) if cuda else 1
    return launch_consts(EPS_C=EPS, QMAX=float(qmax), STATIC=static, BLOCK_K=block, ONE_PASS=one_pass,
                         TRIGGER=trigger, WAIT=wait, num_warps=num_warps, **pdl_option(wait))


def static_quant(x: torch.Tensor, scale: torch.Tensor, qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor static quantization of x (M, K) with the calibrated scale (1,): (q int8, scale per row (M, 1)).

    The Triton kernel on CUDA (or in the interpreter), ``quantize_symmetric_ref`` otherwise."""
    scale = scale.reshape(1).to(device=x.device, dtype=torch.float32)
    if use_triton(x):
        return per_token_quant_triton(x, qmax=qmax, static_scale=scale)
    return quantize_symmetric_ref(x, scale, qmax), scale.expand(x.shape[0], 1)


@torch.library.custom_op("quantkit::per_token_quant", mutates_args=())
def _per_token_quant_op(x: torch.Tensor, qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x):
        return per_token_quant_triton(x, qmax=qmax)
    return per_token_quant_ref(x, qmax)


@_per_token_quant_op.register_fake
def _(x, qmax=127):
    M, K = x.shape
    return x.new_empty((M, K), dtype=torch.int8), x.new_empty((M, 1), dtype=torch.float32)


def per_token_quant(x: torch.Tensor, qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric quantization (qmax 127: INT8, 7: INT4 values in int8).
    x: (..., K) -> (q (..., K) int8, scale (..., 1) fp32)."""
    if x.dim() == 2 and eager_cuda(x):  # eager fast path: no custom-op dispatch
        return per_token_quant_triton(x, qmax=qmax)
    lead = x.shape[:-1]
    q, s = _per_token_quant_op(x.reshape(-1, x.shape[-1]), int(qmax))
    return q.reshape(*lead, x.shape[-1]), s.reshape(*lead, 1)
