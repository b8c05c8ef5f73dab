"""Decode attention (one new query token per sample) that reads the KV cache as stored: INT8 (with
per-token or per-channel scales and optional outlier residuals) or float, split over the sequence.

Spec (``decode_attention_ref``), one decode step:

    q:        (B, Hq, D) float (fp16/bf16/fp32); query head i reads kv head i // (Hq // Hkv) (GQA)
    k, v:     (B, Hkv, T, D) cache: int8, or the model's float dtype
    scales:   k_scale / v_scale None (float cache) | (B, Hkv, T) per-token | (Hkv, D) per-channel, fp32
    residual: optional outlier residuals per K and V (``Residuals``): idx (B, Hkv, T) int16, the pool slot
              of a token's residual or -1; pool (B, Hkv, C + 1, D // 2) int8, two 4-bit values per byte
              (element d: byte d // 2, low nibble for even d), or (B, Hkv, C + 1, D) int8 for 8-bit
              residuals; pool_scale (B, Hkv, C + 1) fp32. Dequantized K = q_k * scale + r * r_scale.
    seq_lens: (B,) int32: sample b attends keys [max(0, L_b - window), L_b) (window None: all)

    out[b, i] = softmax(q[b, i] . K_b^T * sm_scale) V_b    -> (B, Hq, D) in q.dtype (fp32 softmax)
    softcap:  0 (off) or c > 0: the scores s become tanh(s / c) * c before masking and softmax (Gemma 2)

Kernel (``decode_attention``): grid (B * Hkv, n_splits). A program takes one kv head, all the query
heads that share it (padded to 16 rows for the tensor cores) and one slice of the sequence: it feeds
each (BLOCK_N, D) tile of K and V to the tensor cores as stored (int8 -> fp16/bf16 is exact; the
scales act on q, the score columns, p's columns or the accumulator, never on a tile), runs an online
softmax, and writes its partial (max, sum, acc) to a workspace; a second small kernel merges the
splits. Splits past a sample's length exit at once, so one launch shape serves every
length (CUDA-graph friendly). The reference dequantizes the cache in torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import (LazyKernel, cdiv, chain_pdl, fast_launch, jit_helper, next_pow2, pdl_enter, pdl_option, tl,
                      use_triton)

__all__ = ["Residuals", "decode_attention", "decode_attention_ref", "dequantize_cache_ref", "pack_nibbles",
           "unpack_nibbles"]


@dataclass
class Residuals:
    """Outlier residuals of one K or V cache (see module docstring); bits 4 (packed) or 8."""

    idx: torch.Tensor  # (B, H, T) int16, -1 = none
    pool: torch.Tensor  # (B, H, C + 1, D // 2) or (B, H, C + 1, D) int8; slot C is a write sink
    scale: torch.Tensor  # (B, H, C + 1) fp32
    bits: int = 4


def pack_nibbles(r: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit values (..., D) in int8 -> (..., D // 2) int8: element d in byte d // 2, low nibble
    for even d, high nibble for odd d."""
    r16 = r.to(torch.int16).reshape(*r.shape[:-1], r.shape[-1] // 2, 2)
    b = (r16[..., 0] & 0xF) | ((r16[..., 1] & 0xF) << 4)
    return torch.where(b >= 128, b - 256, b).to(torch.int8)


def unpack_nibbles(b: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_nibbles: (..., D // 2) int8 -> (..., D) int8."""
    b16 = b.to(torch.int16)
    lo = ((b16 & 0xF) ^ 8) - 8
    hi = (((b16 >> 4) & 0xF) ^ 8) - 8
    return torch.stack((lo, hi), dim=-1).reshape(*b.shape[:-1], b.shape[-1] * 2).to(torch.int8)


def _residual_values(res: Residuals, T: int) -> torch.Tensor:
    """Dense float residuals (B, H, T, D) (zeros where a token has none)."""
    B, H = res.idx.shape[:2]
    slot = res.idx[:, :, :T].long()
    has = slot >= 0
    slot = slot.clamp_min(0)
    pool = unpack_nibbles(res.pool) if res.bits == 4 else res.pool
    D = pool.shape[-1]
    vals = torch.gather(pool.float(), 2, slot.unsqueeze(-1).expand(B, H, T, D))
    sc = torch.gather(res.scale.float(), 2, slot)
    return torch.where(has.unsqueeze(-1), vals * sc.unsqueeze(-1), torch.zeros((), device=pool.device))


def dequantize_cache_ref(x: torch.Tensor, scale: torch.Tensor | None, T: int, residual: Residuals | None = None) -> torch.Tensor:
    """The first T positions of one cache as float32 (B, H, T, D): int8 * scale (+ residual), or float as is."""
    x = x[:, :, :T]
    if scale is None:
        return x.float()
    s = scale[:, :, :T].unsqueeze(-1) if scale.dim() == 3 else scale.reshape(1, *scale.shape[-2:]).unsqueeze(2)
    out = x.float() * s.float()
    if residual is not None:
        out = out + _residual_values(residual, T)
    return out


def decode_attention_ref(q, k, v, seq_lens, *, k_scale=None, v_scale=None, k_res=None, v_res=None, window=None,
                         sm_scale=None, softcap: float = 0.0):
    """Reference (see module docstring). Returns (B, Hq, D) in q.dtype."""
    B, Hq, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    sm_scale = D ** -0.5 if sm_scale is None else sm_scale
    kf = dequantize_cache_ref(k, k_scale, T, k_res)
    vf = dequantize_cache_ref(v, v_scale, T, v_res)
    g = Hq // Hkv
    kf = kf.repeat_interleave(g, dim=1)
    vf = vf.repeat_interleave(g, dim=1)
    s = torch.einsum("bhd,bhtd->bht", q.float(), kf) * sm_scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    pos = torch.arange(T, device=q.device)
    L = seq_lens.to(q.device).long().view(B, 1)
    valid = pos.view(1, T) < L
    if window is not None:
        valid &= pos.view(1, T) >= (L - window)
    s = s.masked_fill(~valid.view(B, 1, T), float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bht,bhtd->bhd", p, vf).to(q.dtype)


# ----------------------------------------------------------------------------- kernels


@jit_helper
def _residual_rows(ri_ptr, rp_ptr, rs_ptr, row, pos, nmask, pid, C1, col, shift, RW: tl.constexpr,
                   RES_BITS: tl.constexpr):
    """The residual rows of the cache positions ``pos`` (of (b, h) ``row``): their (BLOCK_N, D) int32 values
    (0 where a position has none) and scales. ri: slots (-1: none); rp: the pool (4-bit: two per byte,
    ``col``/``shift`` pick the nibble); rs: the rows' scales."""
    slot = tl.load(ri_ptr + row + pos, mask=nmask, other=-1).to(tl.int32)
    has = slot >= 0
    r_row = pid.to(tl.int64) * C1 + tl.maximum(slot, 0)
    r = tl.load(rp_ptr + r_row[:, None] * RW + col[None, :], mask=has[:, None], other=0).to(tl.int32)
    if RES_BITS == 4:
        r = (((r >> shift[None, :]) & 0xF) ^ 8) - 8
    rs = tl.load(rs_ptr + r_row, mask=has, other=0.0)
    return r, rs


def _decode_attn_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, kri_ptr, krp_ptr, krs_ptr, vri_ptr, vrp_ptr, vrs_ptr, len_ptr,
    m_ptr, l_ptr, acc_ptr,
    # q: (B, Hq, D); k, v: (B, Hkv, T, D); ks/vs: (B, Hkv, T) per-token or (Hkv, D) per-channel scales
    # kri/vri: (B, Hkv, T) int16 residual slots; krp/vrp: (B, Hkv, C + 1, D // PACK) int8 pools;
    # krs/vrs: (B, Hkv, C + 1) fp32 residual scales; len: (B,) int32
    # m, l: (B * Hkv, NSPLIT, GP) fp32; acc: (B * Hkv, NSPLIT, GP, D) fp32 (the split partials)
    Hkv, T, C1, window, sm_scale_log2,
    stride_qb, stride_qh,
    SPLIT, NSPLIT,  # keys per split (a multiple of BLOCK_N), number of splits
    GROUP: tl.constexpr,  # query heads per kv head
    GP: tl.constexpr,  # GROUP padded to >= 16 (a power of two)
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SCALES: tl.constexpr,  # 0 float cache, 1 per-token, 2 per-channel
    RES_BITS: tl.constexpr,  # 0 none, 4 (two per byte) or 8
    RW: tl.constexpr,  # bytes per residual row: D // 2 (4-bit) or D (8-bit)
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,  # 0.0: off; else scores -> tanh(s / SOFTCAP) * SOFTCAP (Gemma 2)
    PDL: tl.constexpr,  # the runtime's programmatic chain (``_common.chain_pdl``)
):
    pdl_enter(PDL, PDL)
    # The integer tiles go to the MMA as they are (int8 -> fp16/bf16 is exact): the scales act on
    # vectors, never on a (BLOCK_N, D) tile. Per-channel K scales fold into q once; per-token K scales
    # scale the score columns; per-token V scales scale p's columns; per-channel V scales scale the
    # accumulator at the end. Residuals add their own two small dots.
    pid = tl.program_id(0)  # b * Hkv + h
    sp = tl.program_id(1)
    b = pid // Hkv
    h = pid % Hkv
    L = tl.load(len_ptr + b)
    lo = sp * SPLIT
    hi = tl.minimum(lo + SPLIT, L)
    if WINDOW:
        lo = tl.maximum(lo, L - window)
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    gmask = offs_g < GROUP
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + (h * GROUP + offs_g)[:, None] * stride_qh + offs_d[None, :],
                mask=gmask[:, None], other=0.0).to(tl.float32) * sm_scale_log2
    cdt = q_ptr.dtype.element_ty
    if cdt == tl.float32:
        cdt = tl.float16
    if SCALES == 2:
        qk = (q * tl.load(ks_ptr + h * D + offs_d)[None, :]).to(cdt)
    else:
        qk = q.to(cdt)
    if RES_BITS != 0:
        qr = q.to(cdt)
        acc_r = tl.zeros((GP, D), dtype=tl.float32)
        if RES_BITS == 4:
            col = offs_d // 2
            shift = (offs_d % 2) * 4
        else:
            col = offs_d
            shift = 0  # unused (8-bit)
    m_i = tl.full((GP,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((GP,), dtype=tl.float32)
    acc = tl.zeros((GP, D), dtype=tl.float32)
    row = pid.to(tl.int64) * T  # (b, h) row of the (B * Hkv, T) views
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + offs_n
        nmask = pos < hi
        kv_off = (row + pos)[:, None] * D + offs_d[None, :]
        kt = tl.load(k_ptr + kv_off, mask=nmask[:, None], other=0).to(cdt)
        s = tl.dot(qk, tl.trans(kt))  # (GP, BLOCK_N), log2 units
        if SCALES == 1:
            s = s * tl.load(ks_ptr + row + pos, mask=nmask, other=0.0)[None, :]
        if RES_BITS != 0:
            k_r, k_rs = _residual_rows(kri_ptr, krp_ptr, krs_ptr, row, pos, nmask, pid, C1, col, shift, RW, RES_BITS)
            s += tl.dot(qr, tl.trans(k_r.to(cdt))) * k_rs[None, :]
        # SOFTCAP is a float constexpr: a compiled `if` takes only int/bool, so compare (the interpreter takes both).
        # s is in log2 units (q carries sm_scale * log2 e): cap c is c * log2 e there
        if SOFTCAP != 0.0:
            s = (1.0 - 2.0 / (tl.exp2(s * (2.0 / SOFTCAP)) + 1.0)) * (SOFTCAP * 1.4426950408889634)
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(v_ptr + kv_off, mask=nmask[:, None], other=0).to(cdt)
        if SCALES == 1:
            pv = p * tl.load(vs_ptr + row + pos, mask=nmask, other=0.0)[None, :]
        else:
            pv = p
        acc = acc * alpha[:, None] + tl.dot(pv.to(cdt), vt)
        if RES_BITS != 0:
            v_r, v_rs = _residual_rows(vri_ptr, vrp_ptr, vrs_ptr, row, pos, nmask, pid, C1, col, shift, RW, RES_BITS)
            acc_r = acc_r * alpha[:, None] + tl.dot((p * v_rs[None, :]).to(cdt), v_r.to(cdt))
        m_i = m_new
    if SCALES == 2:
        acc = acc * tl.load(vs_ptr + h * D + offs_d)[None, :]
    if RES_BITS != 0:
        acc += acc_r
    part = pid.to(tl.int64) * NSPLIT + sp
    tl.store(m_ptr + part * GP + offs_g, m_i)
    tl.store(l_ptr + part * GP + offs_g, l_i)
    tl.store(acc_ptr + (part * GP + offs_g)[:, None] * D + offs_d[None, :], acc)


decode_attn_kernel = LazyKernel(_decode_attn_kernel)


def _decode_merge_kernel(
    m_ptr, l_ptr, acc_ptr, o_ptr,
    # partials as written by _decode_attn_kernel; o: (B, Hq, D) q.dtype
    Hkv, NSPLIT, stride_ob, stride_oh,
    GROUP: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_enter(PDL, PDL)
    pid = tl.program_id(0)
    b = pid // Hkv
    h = pid % Hkv
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, D)
    m = tl.full((GP,), float("-inf"), dtype=tl.float32)
    for sp in range(NSPLIT):
        m = tl.maximum(m, tl.load(m_ptr + (pid.to(tl.int64) * NSPLIT + sp) * GP + offs_g))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l_tot = tl.zeros((GP,), dtype=tl.float32)
    acc = tl.zeros((GP, D), dtype=tl.float32)
    for sp in range(NSPLIT):
        part = pid.to(tl.int64) * NSPLIT + sp
        w = tl.exp2(tl.load(m_ptr + part * GP + offs_g) - m_safe)
        l_tot += tl.load(l_ptr + part * GP + offs_g) * w
        acc += tl.load(acc_ptr + (part * GP + offs_g)[:, None] * D + offs_d[None, :]) * w[:, None]
    out = acc / tl.where(l_tot > 0, l_tot, 1.0)[:, None]
    gmask = offs_g < GROUP
    tl.store(o_ptr + b.to(tl.int64) * stride_ob + (h * GROUP + offs_g)[:, None] * stride_oh + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=gmask[:, None])


decode_merge_kernel = LazyKernel(_decode_merge_kernel)


def plan_splits(B: int, Hkv: int, T: int, block_n: int = 64, target_programs: int = 1056, max_split_keys: int = 2048):
    """(keys per split, number of splits) for a cache of T positions: enough programs to keep the memory
    system busy (about 8 per SM of an H100/H200) while each split keeps at least one BLOCK_N tile."""
    blocks = cdiv(T, block_n)
    per = blocks
    while per > 1 and B * Hkv * cdiv(blocks, per) < target_programs:
        per = cdiv(per, 2)
    while per * block_n > max_split_keys and per > 1:
        per = cdiv(per, 2)
    split = per * block_n
    return split, cdiv(T, split)


# launch settings of the decode kernel (benchmarks/runtime.py --tune measures the alternatives)
CONFIG = {"block_n": 64, "num_warps": 4, "num_stages": 3, "target_programs": 1056}

_WS: dict = {}


def decode_attention(q, k, v, seq_lens, *, k_scale=None, v_scale=None, k_res: Residuals | None = None,
                     v_res: Residuals | None = None, window: int | None = None, sm_scale: float | None = None,
                     softcap: float = 0.0, out: torch.Tensor | None = None, block_n: int | None = None,
                     split: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                     target_programs: int | None = None):
    """Decode attention over the cache as stored (module docstring). q: (B, Hq, D) -> (B, Hq, D) q.dtype.

    CUDA tensors (or TRITON_INTERPRET=1): the Triton kernels; otherwise the reference. Launch settings
    left None come from `CONFIG` (measured: benchmarks/runtime.py --tune)."""
    B, Hq, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    sm = D ** -0.5 if sm_scale is None else sm_scale
    if not use_triton(q, k):
        y = decode_attention_ref(q, k, v, seq_lens, k_scale=k_scale, v_scale=v_scale, k_res=k_res, v_res=v_res,
                                 window=window, sm_scale=sm, softcap=softcap)
        return y if out is None else out.copy_(y)
    if D != next_pow2(D) or D < 16:
        raise ValueError(f"decode attention needs a power-of-two head_dim >= 16, got {D}")
    group = Hq // Hkv
    gp = max(16, next_pow2(group))
    cfg = CONFIG
    block_n = block_n or cfg["block_n"]
    if split is None:
        split, nsplit = plan_splits(B, Hkv, T, block_n, target_programs or cfg["target_programs"])
    else:
        nsplit = cdiv(T, split)
    dev = q.device
    key = (dev, B * Hkv, nsplit, gp, D)
    ws = _WS.get(key)
    if ws is None:
        ws = _WS[key] = (torch.empty(B * Hkv * nsplit * gp, device=dev, dtype=torch.float32),
                         torch.empty(B * Hkv * nsplit * gp, device=dev, dtype=torch.float32),
                         torch.empty(B * Hkv * nsplit * gp * D, device=dev, dtype=torch.float32))
    m_ws, l_ws, acc_ws = ws
    if out is None:
        out = torch.empty((B, Hq, D), device=dev, dtype=q.dtype)
    scales = 0 if k_scale is None else (1 if k_scale.dim() == 3 else 2)
    res_bits = 0 if k_res is None else k_res.bits
    dummy = seq_lens
    kr = k_res if k_res is not None else None
    vr = v_res if v_res is not None else None
    qc = q if q.stride(-1) == 1 else q.contiguous()
    pdl = chain_pdl(dev)
    const = dict(GROUP=group, GP=gp, D=D, BLOCK_N=block_n, SCALES=scales, RES_BITS=res_bits,
                 RW=D // 2 if res_bits == 4 else D, WINDOW=window is not None, SOFTCAP=float(softcap or 0.0),
                 PDL=pdl, num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"],
                 **pdl_option(pdl))
    fast_launch(decode_attn_kernel, (B * Hkv, nsplit),
                (qc, k, v, k_scale if scales else dummy, v_scale if scales else dummy,
                 kr.idx if kr else dummy, kr.pool if kr else dummy, kr.scale if kr else dummy,
                 vr.idx if vr else dummy, vr.pool if vr else dummy, vr.scale if vr else dummy, seq_lens,
                 m_ws, l_ws, acc_ws,
                 Hkv, T, kr.pool.shape[2] if kr else 1, int(window or 0), sm * 1.4426950408889634,
                 qc.stride(0), qc.stride(1), split, nsplit), const, tuple(const.values()))
    fast_launch(decode_merge_kernel, (B * Hkv,), (m_ws, l_ws, acc_ws, out, Hkv, nsplit, out.stride(0), out.stride(1)),
                dict(GROUP=group, GP=gp, D=D, PDL=pdl, num_warps=4, **pdl_option(pdl)), (group, gp, D, pdl))
    return out
