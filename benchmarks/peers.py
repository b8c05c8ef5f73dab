"""Peer kernels timed beside quantkit's in ``benchmarks/gemm.py --peers`` (issue 19).

Each peer is built from the same integer weights as ours and checked against the same
reference before it is timed; a peer that is missing (GemLite not on the path) or fails its
check is a blank column with the reason logged, never a crash.

* tinygemm W4A16: ``torch._weight_int4pack_mm`` (bf16 activations, group 128; torchao's int4
  weight-only path), weights packed by ``torch._convert_weight_to_int4pack``;
* GemLite ``A16Wn`` (W4, group 128) and ``A8W8_int8_dynamic`` (pure Triton; its source is put on
  ``sys.path`` with ``--gemlite DIR``);
* cuBLAS: ``F.linear`` in the activation dtype; ``torch._int_mm`` after our per-token
  quantization (M <= 16 padded to 32 rows, which ``_int_mm`` needs; no dequant epilogue).
"""

from __future__ import annotations

import os
import sys

import torch

GEMLITE_ERR = None


def import_gemlite(path: str | None):
    """GemLite from ``path`` (its unpacked sdist) or the environment; None (reason kept) if absent."""
    global GEMLITE_ERR
    if path:
        sys.path.insert(0, path)
    try:
        import gemlite
        from gemlite.core import GemLiteLinear

        if torch.cuda.is_available() and "h200" in torch.cuda.get_device_name().lower():
            # GemLite ships tuned configs for the H100 (the same chip), none for the H200: use them
            # rather than autotuning inside the timed run
            cfg = os.path.join(os.path.dirname(gemlite.__file__), "configs", "h100.json")
            if os.path.exists(cfg):
                GemLiteLinear.load_config(cfg)
        return gemlite
    except Exception as e:  # pragma: no cover - depends on the machine
        GEMLITE_ERR = f"{type(e).__name__}: {str(e)[:200]}"
        return None


def tinygemm_layers(q4, s4, n, x, ref, rel, tol):
    """``n`` tinygemm copies of the weight, with the nibble order (even k high or low) that matches ``ref``
    on ``x``: each entry (packed weight, scales-and-zeros, order)."""
    errs = {}
    for high in (True, False):
        w, sz = tinygemm_pack(q4, s4, high_first=high)
        errs[high] = rel(tinygemm_run(x, w, sz), ref)
        if errs[high] <= tol:
            order = "even k in the high nibble" if high else "even k in the low nibble"
            return [(w, sz, order)] + [(w.clone(), sz.clone(), order) for _ in range(n - 1)]
    raise RuntimeError(f"tinygemm output does not match the reference in either nibble order: {errs}")


def tinygemm_pack(q4: torch.Tensor, s4: torch.Tensor, group_size: int = 128, inner_k_tiles: int = 8,
                  high_first: bool = True):
    """(q (N, K) int8 in [-8, 7], scale (N, K // gs)) -> (packed weight, scales-and-zeros (G, N, 2) bf16).

    tinygemm dequantizes ``(u - 8) * scale + zero`` with u the unsigned nibble, so u = q + 8 and a
    zero of 0 give our symmetric weight."""
    u = (q4.to(torch.int16) + 8).to(torch.uint8)
    hi, lo = (u[:, ::2], u[:, 1::2]) if high_first else (u[:, 1::2], u[:, ::2])
    packed = (hi << 4 | lo).contiguous()  # two nibbles per byte
    w = torch._convert_weight_to_int4pack(packed, inner_k_tiles)
    sz = torch.stack([s4.t().to(torch.bfloat16), torch.zeros_like(s4.t(), dtype=torch.bfloat16)], dim=-1)
    return w, sz.contiguous()


def tinygemm_run(x_bf16, w, sz, group_size=128, out=None):
    y = torch._weight_int4pack_mm(x_bf16, w, group_size, sz)
    if out is not None:
        out.copy_(y)
        return out
    return y


def gemlite_w4(gemlite, q4, s4, dtype, group_size=128):
    """GemLite A16Wn layer: unsigned nibbles with a zero point of 8 (``(u - z) * s``)."""
    u = (q4.to(torch.int16) + 8).to(torch.uint8)
    z = torch.full_like(s4, 8.0)
    return gemlite.helper.A16Wn(device=str(q4.device), dtype=dtype).from_weights(
        u, s4.to(dtype), z.to(dtype), 4, group_size)


def gemlite_w8a8(gemlite, w_dense, dtype):
    """GemLite A8W8 int8 dynamic from the dense (dequantized int8) weight: it re-derives per-channel
    scales, which reproduces our integers to rounding."""
    return gemlite.helper.A8W8_int8_dynamic(device=str(w_dense.device), dtype=dtype).from_weights(
        w_dense.to(dtype).clone())
