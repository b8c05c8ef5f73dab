"""One quantized linear as compressed-tensors tensors, and back.

Layout for a linear `<name>` (weight W: (out, in), b bits, n_groups = in // group_size,
or 1 per-channel), format `pack-quantized`:

    <name>.weight_packed      int32  (out, ceil(in * b / 32))    values + 2^(b-1), packed along in
    <name>.weight_scale       model dtype (out, n_groups)         (out, 1) per-channel
    <name>.weight_shape       int64  (2,)                         [out, in]
    <name>.weight_zero_point  int32  (ceil(out * b / 32), n_groups)  asymmetric only; signed zero
                                                                  points packed along out (dim 0)

Schemes with input activations (W8A8) use format `int-quantized` instead:

    <name>.weight             int8   (out, in)                    signed integers, unpacked
    <name>.weight_scale       model dtype (out, n_groups)
    <name>.weight_zero_point  int8   (out, n_groups)              asymmetric only

Dequantized weight = (q - zero) * scale, the same convention as quantkit.quant.core.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from quantkit.export.checkpoint_tensors import CheckpointError
from quantkit.export.common import Layout
from quantkit.quant.core import QuantizedTensor
from quantkit.quant.pack import pack_int32, packed_length, unpack_int32
from quantkit.recipe import QuantArgs


def compress_module(
    qt: QuantizedTensor, scale_dtype: torch.dtype, fmt: str = "pack-quantized"
) -> dict[str, torch.Tensor]:
    """Tensors of one linear, keyed by local name (pack-quantized: weight_packed, ...; int-quantized: weight, ...).

    qt.q: int8 (out, in); qt.scale: (out, n_groups); qt.zero: int8 (out, n_groups) or None.
    """
    out_f, in_f = qt.q.shape
    q = qt.q.detach().to("cpu")
    scale = qt.scale.detach().to("cpu", scale_dtype).contiguous()
    asym = qt.zero is not None and not qt.args.symmetric
    if fmt == "int-quantized":
        t = {"weight": q.to(torch.int8).contiguous(), "weight_scale": scale}
        if asym:
            t["weight_zero_point"] = qt.zero.detach().to("cpu", torch.int8).contiguous()
        return t
    t = {
        "weight_packed": pack_int32(q, qt.args.bits, dim=1),
        "weight_scale": scale,
        "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
    }
    if asym:
        t["weight_zero_point"] = pack_int32(qt.zero.detach().to("cpu", torch.int8), qt.args.bits, dim=0)
    return t


def _compressed_nbytes(qt: QuantizedTensor, scale_dtype: torch.dtype, fmt: str = "pack-quantized") -> int:
    out_f, in_f = qt.q.shape
    n_groups = qt.scale.shape[1]
    b = qt.args.bits
    if fmt == "int-quantized":
        return out_f * in_f + out_f * n_groups * (scale_dtype.itemsize + 1)
    n = 4 * out_f * packed_length(in_f, b) + out_f * n_groups * scale_dtype.itemsize + 16
    if qt.zero is not None and not qt.args.symmetric:
        n += 4 * packed_length(out_f, b) * n_groups
    return n


def _ct_pieces(qt: QuantizedTensor, fmt: str = "pack-quantized") -> list[str]:
    pieces = ["weight", "weight_scale"] if fmt == "int-quantized" else ["weight_packed", "weight_scale", "weight_shape"]
    return pieces + (["weight_zero_point"] if not qt.args.symmetric else [])


def ct_layout(fmt: str = "pack-quantized") -> Layout:
    """The tensor layout of one linear for a compressed-tensors format."""
    return Layout(
        pieces=lambda qt: _ct_pieces(qt, fmt),
        nbytes=lambda qt, d: _compressed_nbytes(qt, d, fmt),
        compress=lambda qt, d: compress_module(qt, d, fmt),
    )


CT_LAYOUT = ct_layout("pack-quantized")


def read_ct(get: Callable[[str], torch.Tensor], name: str, args: QuantArgs) -> QuantizedTensor:
    """The canonical quantized tensor of module `name` from its compressed-tensors tensors; get(key) -> tensor."""
    scale = get(f"{name}.weight_scale")
    try:
        zp = get(f"{name}.weight_zero_point")
    except KeyError:
        zp = None
    try:
        packed = get(f"{name}.weight_packed")
    except KeyError:
        packed = None
    if packed is not None:  # pack-quantized
        shape = tuple(int(x) for x in get(f"{name}.weight_shape").tolist())
        q = unpack_int32(packed, args.bits, shape, dim=1)
        zero = None if zp is None else unpack_int32(zp, args.bits, (shape[0], scale.shape[1]), dim=0)
    else:  # int-quantized (W8A8): plain int8 weight
        q = get(f"{name}.weight")
        if q.dtype != torch.int8:
            raise CheckpointError(f"{name}.weight is {q.dtype}, expected int8 (int-quantized)")
        zero = None if zp is None else zp.to(torch.int8)
    return QuantizedTensor(q, scale.float(), zero, args)
