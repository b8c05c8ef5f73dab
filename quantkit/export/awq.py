"""Export as an AutoAWQ GEMM checkpoint (loadable by transformers' AWQ integration, vLLM `awq`).

Per quantized linear `<name>` (weight W: (out, in), group size g, 4 bits):

    <name>.qweight  int32 (in, out / 8)      unsigned q (0..15), 8 per word along out
    <name>.qzeros   int32 (in / g, out / 8)  unsigned zero points, packed the same way
    <name>.scales   fp16  (in / g, out)

Within a word, nibble i (bits 4i..4i+3) holds output column 8*word + AWQ_ORDER[i]:
AutoAWQ interleaves columns so its GEMM kernel can dequantize pairs cheaply.
Unsigned convention: q_u = q + 8, z_u = zero + 8 (symmetric: z_u = 8); the
dequantized weight (q_u - z_u) * scale equals ours, (q - zero) * scale.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quantkit.export.common import (ExportOptions, Layout, WritePlan, fp16_scale_warnings, no_shadow_warnings,
                                    single_args)
from quantkit.quant.core import QuantizedTensor
from quantkit.quant.model import QuantizedModel
from quantkit.recipe import QuantArgs, RecipeError

FORMAT_NAME = "awq"
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word <- column AWQ_ORDER[i] of its 8
_AWQ_UNDO = tuple(AWQ_ORDER.index(c) for c in range(8))  # column c <- nibble _AWQ_UNDO[c]


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    # Unsigned 32-bit patterns held in int64 -> the same bits as int32.
    words = words & 0xFFFFFFFF
    return torch.where(words >= (1 << 31), words - (1 << 32), words).to(torch.int32)


def pack_awq(u: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit values along dim 1 in AutoAWQ's interleaved order.

    u: integer (rows, cols) with values 0..15, cols % 8 == 0. Returns int32 (rows, cols / 8).
    """
    rows, cols = u.shape
    if cols % 8:
        raise ValueError(f"AWQ packs 8 values per int32 along dim 1; {cols} is not a multiple of 8")
    if u.numel() and (int(u.min()) < 0 or int(u.max()) > 15):
        raise ValueError(f"AWQ values must be in 0..15, got [{int(u.min())}, {int(u.max())}]")
    v = u.to(torch.int64).view(rows, cols // 8, 8)[:, :, list(AWQ_ORDER)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=u.device)
    return _to_int32((v << shifts).sum(dim=-1))


def unpack_awq(p: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_awq: int32 (rows, n) -> int64 (rows, 8n), values 0..15 in column order."""
    rows, n = p.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=p.device)
    nib = (p.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF  # (rows, n, 8): nibble i
    return nib[:, :, list(_AWQ_UNDO)].reshape(rows, n * 8)


def check_awq_args(args: QuantArgs) -> None:
    """Refuse weight args the AutoAWQ GEMM layout cannot hold."""
    if args.bits != 4:
        raise RecipeError(f"--format awq holds 4-bit weights only, got {args.bits}-bit; use --bits 4 or --format gptq")
    if args.group_size is None:
        raise RecipeError("--format awq needs grouped weights; pass a group size (e.g. --group-size 64)")


def check_awq_shapes(shapes: dict[str, tuple[int, int]], args: QuantArgs | None = None) -> None:
    """shapes: module name -> (out_features, in_features) of every linear to quantize.

    args: unused (the layout is always 4-bit); every format's shape check takes (shapes, args)."""
    for name, (out_f, _in_f) in shapes.items():
        if out_f % 8:
            raise RecipeError(
                f"--format awq needs out_features divisible by 8; {name} has {out_f}: "
                "add it to the recipe's ignore list or use --format compressed-tensors"
            )


def awq_tensors(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """qweight, qzeros, scales (fp16) of one linear; qt.q (out, in), qt.scale/zero (out, n_groups)."""
    q = qt.q.detach().to("cpu")
    zero = torch.zeros_like(qt.scale, dtype=torch.int8) if qt.zero is None else qt.zero.detach().to("cpu")
    return {
        "qweight": pack_awq((q.to(torch.int16) + 8).t()),  # (in, out/8)
        "qzeros": pack_awq((zero.to(torch.int16).cpu() + 8).t()),  # (n_groups, out/8)
        "scales": qt.scale.detach().to("cpu", torch.float16).t().contiguous(),  # (n_groups, out)
    }


def _nbytes(qt: QuantizedTensor, _dtype: torch.dtype) -> int:
    out_f, in_f = qt.q.shape
    n_groups = qt.scale.shape[1]
    return 4 * in_f * out_f // 8 + 4 * n_groups * out_f // 8 + 2 * n_groups * out_f


AWQ_LAYOUT = Layout(
    pieces=lambda qt: ["qweight", "qzeros", "scales"],
    nbytes=_nbytes,
    compress=lambda qt, dtype: awq_tensors(qt),
)


def plan_awq(qmodel: QuantizedModel, quantized: dict[str, nn.Linear], ignore: list[str], options: ExportOptions) -> WritePlan:
    """The AutoAWQ GEMM checkpoint of qmodel (options: unused, a weight-only layout).

    Raises RecipeError for weights the layout cannot hold (bits != 4, per-channel,
    mixed schemes, out_features not divisible by 8).
    """
    args = single_args(qmodel, FORMAT_NAME)
    check_awq_args(args)
    check_awq_shapes({n: tuple(qt.q.shape) for n, qt in qmodel.modules.items()})
    qconfig: dict[str, Any] = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": args.group_size,
        "zero_point": True,  # symmetric weights are stored with zero 8
        "version": "gemm",
        "modules_to_not_convert": ignore or None,
    }
    warnings = fp16_scale_warnings(qmodel.modules, FORMAT_NAME) + no_shadow_warnings(qmodel, FORMAT_NAME)
    return WritePlan(AWQ_LAYOUT, qconfig, warnings)


def describe_awq_config(qc: dict[str, Any]) -> tuple[str, dict[str, Any], list[str]]:
    """(format, weights, ignore) of an AutoAWQ quantization_config, for inspect's summary."""
    weights = {"num_bits": qc.get("bits"), "group_size": qc.get("group_size"), "symmetric": False}
    return f"{qc.get('version', 'gemm')}", weights, qc.get("modules_to_not_convert") or []


def read_awq(get, name: str, args: QuantArgs) -> QuantizedTensor:
    """The canonical quantized tensor of module `name` from its AWQ tensors; get(key) -> tensor."""
    qw, qz, sc = get(f"{name}.qweight"), get(f"{name}.qzeros"), get(f"{name}.scales")
    q = (unpack_awq(qw) - 8).t().to(torch.int8).contiguous()  # (out, in)
    zero = (unpack_awq(qz) - 8).t().to(torch.int8).contiguous()  # (out, n_groups)
    if args.symmetric and not bool(zero.any()):
        zero = None  # symmetric weights are stored with zero point 8 (signed 0)
    return QuantizedTensor(q, sc.float().t().contiguous(), zero, args)
