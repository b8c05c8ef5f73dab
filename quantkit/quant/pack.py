"""Pack signed low-bit integers into int32 words, as compressed-tensors' `pack-quantized` does.

Layout (compressed-tensors >= 0.20 "dense" packing, identical to older releases for
bit widths that divide 32, i.e. 1, 2, 4 and 8):

* values are signed in [-2^(b-1), 2^(b-1) - 1]; each is offset by +2^(b-1) to an
  unsigned b-bit field before packing;
* along the packed dim, element i occupies bits [i*b, i*b + b) of the little-endian
  bit stream formed by the int32 words (word i*b // 32, bit offset i*b % 32); for
  b = 3, 5, 6, 7 a value may straddle two words;
* a dim of n elements packs into ceil(n * b / 32) words; the tail is zero-padded
  (in the unsigned domain, so padding unpacks to -2^(b-1) and is cut off by `shape`);
* weights pack along dim 1 (in_features): (out, in) -> (out, ceil(in*b/32));
  zero points pack along dim 0 (out_features): (out, n_groups) -> (ceil(out*b/32), n_groups).

Older compressed-tensors releases (before dense packing) put 32 // b values per word
with spare high bits; that differs only for b = 3, 5, 6, 7, which vLLM's
compressed-tensors kernels do not accept anyway (they take 4 and 8).

Pure torch; compressed_tensors is not imported here (tests compare the bytes).
"""

from __future__ import annotations

import math
import sys

import torch

# Bit widths the format can hold: 32 consecutive values fill exactly `bits` words.
PACK_BITS = (1, 2, 3, 4, 5, 6, 7, 8)

# Bound on elements handled per chunk so the int64 temporaries stay small
# (about 16 M elements x 8 bytes = 128 MiB) on large layers.
_CHUNK_ELEMS = 1 << 24


def packed_length(n: int, bits: int) -> int:
    """Number of int32 words holding n values of `bits` bits."""
    _check_bits(bits)
    return math.ceil(n * bits / 32)


def _check_call(fn: str, t: torch.Tensor, dtype: torch.dtype, bits: int, dim: int) -> None:
    _check_bits(bits)
    if t.dtype != dtype:
        raise ValueError(f"{fn} expects {dtype} input, got {t.dtype}")
    if t.ndim != 2:
        raise ValueError(f"{fn} expects a 2-D tensor, got shape {tuple(t.shape)}")
    if dim not in (0, 1):
        raise ValueError(f"dim must be 0 or 1, got {dim}")


def pack_int32(values: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack signed integers into int32 words along `dim` (0 or 1).

    values: int8 (rows, cols), every entry in [-2^(bits-1), 2^(bits-1) - 1].
    Returns int32 (rows, packed_length(cols, bits)) for dim=1, or
    (packed_length(rows, bits), cols) for dim=0; contiguous, on values.device.
    """
    _check_call("pack_int32", values, torch.int8, bits, dim)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if values.numel() and (int(values.min()) < lo or int(values.max()) > hi):
        raise ValueError(
            f"values span [{int(values.min())}, {int(values.max())}], outside the {bits}-bit range [{lo}, {hi}]"
        )
    v = values.t() if dim == 0 else values
    rows, cols = v.shape
    out = torch.empty((rows, packed_length(cols, bits)), dtype=torch.int32, device=values.device)
    step = max(1, _CHUNK_ELEMS // max(cols, 1))
    for r0 in range(0, rows, step):
        out[r0 : r0 + step] = _pack_rows(v[r0 : r0 + step], bits)
    return out.t().contiguous() if dim == 0 else out


def unpack_int32(packed: torch.Tensor, bits: int, shape: tuple[int, int] | torch.Size, dim: int = 1) -> torch.Tensor:
    """Inverse of `pack_int32`.

    packed: int32 words as pack_int32 returned them; shape: the (rows, cols) of the
    original values (it says how much padding to drop). Returns int8 `shape`.
    """
    _check_call("unpack_int32", packed, torch.int32, bits, dim)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2:
        raise ValueError(f"shape must have 2 dims, got {shape}")
    p = packed.t() if dim == 0 else packed
    rows, cols = (shape[1], shape[0]) if dim == 0 else shape
    if p.shape != (rows, packed_length(cols, bits)):
        raise ValueError(
            f"packed shape {tuple(packed.shape)} does not match {bits}-bit values of shape {shape} "
            f"packed along dim {dim}"
        )
    out = torch.empty((rows, cols), dtype=torch.int8, device=packed.device)
    step = max(1, _CHUNK_ELEMS // max(cols, 1))
    for r0 in range(0, rows, step):
        out[r0 : r0 + step] = _unpack_rows(p[r0 : r0 + step], bits, cols)
    return out.t().contiguous() if dim == 0 else out


def _check_bits(bits: int) -> None:
    if bits not in PACK_BITS:
        raise ValueError(f"bits={bits} cannot be packed; supported: {', '.join(map(str, PACK_BITS))}")


def _slots(bits: int) -> list[tuple[int, int, int]]:
    """For each of 32 values in a block of `bits` words: (word, bit offset, low-part width)."""
    return [((i * bits) // 32, (i * bits) % 32, min(bits, 32 - (i * bits) % 32)) for i in range(32)]


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    # Reinterpret unsigned 32-bit patterns held in int64 as signed int32 (two's complement).
    words = words & 0xFFFFFFFF
    return torch.where(words >= (1 << 31), words - (1 << 32), words).to(torch.int32)


def _pack_rows(v: torch.Tensor, bits: int) -> torch.Tensor:
    # v: (rows, cols) int8 -> (rows, ceil(cols*bits/32)) int32
    return _pack_rows_bytes(v, bits) if 8 % bits == 0 else _pack_rows_general(v, bits)


def _unpack_rows(p: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    # p: (rows, ceil(cols*bits/32)) int32 -> (rows, cols) int8
    return _unpack_rows_bytes(p, bits, cols) if 8 % bits == 0 else _unpack_rows_general(p, bits, cols)


def _pack_rows_general(v: torch.Tensor, bits: int) -> torch.Tensor:
    """Any width 1..8: 32 values -> `bits` words, a value may straddle two words."""
    rows, cols = v.shape
    n_blocks = math.ceil(cols / 32)
    u = torch.zeros((rows, n_blocks * 32), dtype=torch.int64, device=v.device)
    u[:, :cols] = v.to(torch.int64) + (1 << (bits - 1))  # unsigned fields; padding stays 0
    u = u.view(rows, n_blocks, 32)
    words = torch.zeros((rows, n_blocks, bits), dtype=torch.int64, device=v.device)
    for i, (w, off, low) in enumerate(_slots(bits)):
        words[:, :, w] |= u[:, :, i] << off
        if low < bits:  # the high part spills into the next word
            words[:, :, w + 1] |= u[:, :, i] >> low
    return _to_int32(words.view(rows, n_blocks * bits)[:, : packed_length(cols, bits)])


def _unpack_rows_general(p: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    rows, n_words = p.shape
    n_blocks = math.ceil(cols / 32)
    words = torch.zeros((rows, n_blocks * bits), dtype=torch.int64, device=p.device)
    words[:, :n_words] = p.to(torch.int64) & 0xFFFFFFFF
    words = words.view(rows, n_blocks, bits)
    u = torch.empty((rows, n_blocks, 32), dtype=torch.int64, device=p.device)
    for i, (w, off, low) in enumerate(_slots(bits)):
        val = (words[:, :, w] >> off) & ((1 << low) - 1)
        if low < bits:
            val |= (words[:, :, w + 1] & ((1 << (bits - low)) - 1)) << low
        u[:, :, i] = val
    return (u.view(rows, n_blocks * 32)[:, :cols] - (1 << (bits - 1))).to(torch.int8)


def _pack_rows_bytes(v: torch.Tensor, bits: int) -> torch.Tensor:
    """Fast path for 1, 2, 4, 8 bits: build the little-endian bytes, then view them as int32.

    Same bits as the general path (value k of a word at bit k*bits), without int64 temporaries.
    """
    rows, cols = v.shape
    per_word, per_byte = 32 // bits, 8 // bits
    n_words = math.ceil(cols / per_word)
    u = torch.zeros((rows, n_words * per_word), dtype=torch.uint8, device=v.device)
    u[:, :cols] = (v.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
    if per_byte > 1:
        u = u.view(rows, n_words * 4, per_byte)
        b = u[:, :, 0].clone()
        for k in range(1, per_byte):
            b |= u[:, :, k] << (k * bits)
        u = b
    u = u.view(rows, n_words, 4)
    if sys.byteorder == "big" and v.device.type == "cpu":
        u = u.flip(-1)  # the int32 view must read byte 0 as the least significant
    return u.contiguous().view(torch.int32).view(rows, n_words)


def _unpack_rows_bytes(p: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    rows, n_words = p.shape
    per_byte = 8 // bits
    b = p.contiguous().view(torch.uint8).view(rows, n_words, 4)
    if sys.byteorder == "big" and p.device.type == "cpu":
        b = b.flip(-1)
    b = b.reshape(rows, n_words * 4)
    if per_byte > 1:
        mask = (1 << bits) - 1
        b = torch.stack([(b >> (k * bits)) & mask for k in range(per_byte)], dim=-1).view(rows, -1)
    return (b[:, :cols].to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
