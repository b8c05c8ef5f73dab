"""Export as a GPTQ v1 checkpoint (AutoGPTQ / GPTQModel `checkpoint_format: gptq`;
loadable by transformers' GPTQ integration and vLLM `gptq` / `gptq_marlin`).

Per quantized linear `<name>` (weight W: (out, in), b bits, n_groups = in / g, 1 per-channel):

    <name>.qweight  int32 (in * b / 32, out)        unsigned q, packed along in
    <name>.qzeros   int32 (n_groups, out * b / 32)  unsigned zero point MINUS ONE, packed along out
    <name>.scales   fp16  (n_groups, out)
    <name>.g_idx    int32 (in,)                     group of each input column (= col // g)

Packing: values form a little-endian bit stream over consecutive int32 words
(value j at bits [j*b, j*b + b)); for b = 2, 4, 8 that is 32/b values per word,
for b = 3 every 32 values fill 3 words and values 10 and 21 straddle a word
boundary. This is the same stream quantkit.quant.pack writes, so it is reused
(its +2^(b-1) offset is exactly our signed -> unsigned shift).
Unsigned convention: q_u = q + 2^(b-1), z_u = zero + 2^(b-1) (symmetric: 2^(b-1));
v1 stores z_u - 1 (loaders add the 1 back), so z_u = 0 cannot be stored.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from quantkit.export.common import (ExportOptions, Layout, WritePlan, fp16_scale_warnings, no_shadow_warnings,
                                    single_args)
from quantkit.quant.core import QuantizedTensor
from quantkit.quant.model import QuantizedModel
from quantkit.quant.pack import pack_int32, unpack_int32
from quantkit.recipe import QuantArgs, Recipe, RecipeError

FORMAT_NAME = "gptq"
GPTQ_BITS = (2, 3, 4, 8)


def _multiple(bits: int) -> int:
    # Smallest n with n * bits % 32 == 0: a dim packs into whole words without padding.
    return 32 // math.gcd(32, bits)


def pack_gptq_rows(u_signed: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed values (in, out) along dim 0 (in) into int32 (in * bits / 32, out), GPTQ v1 qweight."""
    return pack_int32(u_signed.to(torch.int8), bits, dim=0)


def check_gptq_args(args: QuantArgs) -> None:
    if args.bits not in GPTQ_BITS:
        raise RecipeError(f"--format gptq holds {', '.join(map(str, GPTQ_BITS))}-bit weights, got {args.bits}")


def check_gptq_shapes(shapes: dict[str, tuple[int, int]], args: QuantArgs) -> None:
    """shapes: module name -> (out_features, in_features). Both dims must pack into whole words of args.bits."""
    bits = args.bits
    m = _multiple(bits)
    for name, (out_f, in_f) in shapes.items():
        for what, n in (("in_features", in_f), ("out_features", out_f)):
            if n % m:
                raise RecipeError(
                    f"--format gptq at {bits} bits needs {what} divisible by {m}; {name} has {n}: "
                    "ignore that layer or use --format compressed-tensors"
                )


def _check_zero_point(qt: QuantizedTensor, name: str | None = None) -> None:
    """v1 stores zero - 1, so a zero point at the bottom of the range cannot be stored."""
    args = qt.args
    if qt.zero is not None and bool((qt.zero.to(torch.int16) == args.qmin).any()):
        raise RecipeError(
            f"{name + ': ' if name else ''}a zero point is at the bottom of the {args.bits}-bit range, which the "
            "gptq v1 layout cannot store (it keeps zero - 1); use --sym or --format compressed-tensors"
        )


def gptq_tensors(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """qweight, qzeros, scales (fp16), g_idx of one linear; qt.q (out, in), qt.scale/zero (out, n_groups)."""
    args = qt.args
    out_f, in_f = qt.q.shape
    n_groups = qt.scale.shape[1]
    q = qt.q.detach().to("cpu")
    _check_zero_point(qt)
    zero = torch.zeros((out_f, n_groups), dtype=torch.int8) if qt.zero is None else qt.zero.detach().to("cpu")
    g = in_f // n_groups
    return {
        "qweight": pack_int32(q.t().contiguous(), args.bits, dim=0),  # (in*b/32, out)
        # signed (zero - 1) + 2^(b-1) == z_u - 1: the v1 stored zero
        "qzeros": pack_int32((zero.to(torch.int16) - 1).to(torch.int8).t().contiguous(), args.bits, dim=1),
        "scales": qt.scale.detach().to("cpu", torch.float16).t().contiguous(),  # (n_groups, out)
        "g_idx": (torch.arange(in_f, dtype=torch.int32) // g),
    }


def _nbytes(qt: QuantizedTensor, _dtype: torch.dtype) -> int:
    out_f, in_f = qt.q.shape
    b, n_groups = qt.args.bits, qt.scale.shape[1]
    return 4 * (in_f * b // 32) * out_f + 4 * n_groups * (out_f * b // 32) + 2 * n_groups * out_f + 4 * in_f


GPTQ_LAYOUT = Layout(
    pieces=lambda qt: ["qweight", "qzeros", "scales", "g_idx"],
    nbytes=_nbytes,
    compress=lambda qt, dtype: gptq_tensors(qt),
)


def gptq_config(args: QuantArgs, recipe: Recipe, ignore: list[str]) -> dict:
    """quantization_config (= quantize_config.json) in the GPTQModel v1 form."""
    from quantkit import __version__

    gptq_opts = next((s.options for s in recipe.stages if s.method == "gptq"), {})
    cfg = {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": args.bits,
        "group_size": -1 if args.group_size is None else args.group_size,
        "desc_act": False,  # static groups in column order (g_idx = col // g)
        "static_groups": False,
        "sym": args.symmetric,
        "lm_head": False,
        "pack_dtype": "int32",
        "true_sequential": bool(gptq_opts.get("true_sequential", True)),
        "damp_percent": float(gptq_opts.get("damp", 0.01)),
        "meta": {"quantizer": [f"quantkit:{__version__}"], "methods": [s.method for s in recipe.stages]},
    }
    # Linears left in float inside the blocks: GPTQModel's per-module "dynamic" rules skip them ("-:" = exclude).
    inner = [n for n in ignore if n != "lm_head"]
    if inner:
        cfg["dynamic"] = {f"-:^{re.escape(n)}$": {} for n in inner}
    return cfg


def plan_gptq(qmodel: QuantizedModel, quantized: dict[str, nn.Linear], ignore: list[str], options: ExportOptions) -> WritePlan:
    """The GPTQ v1 checkpoint of qmodel, with quantize_config.json (options: unused, a weight-only layout).

    Raises RecipeError for weights the layout cannot hold (bits, shapes, mixed
    schemes, a zero point at the bottom of the range).
    """
    args = single_args(qmodel, FORMAT_NAME)
    check_gptq_args(args)
    check_gptq_shapes({n: tuple(qt.q.shape) for n, qt in qmodel.modules.items()}, args)
    for n, qt in qmodel.modules.items():  # data-dependent refusal before any write
        _check_zero_point(qt, n)
    warnings = fp16_scale_warnings(qmodel.modules, FORMAT_NAME) + no_shadow_warnings(qmodel, FORMAT_NAME)
    qconfig = gptq_config(args, qmodel.recipe, ignore)
    return WritePlan(GPTQ_LAYOUT, qconfig, warnings, extra_json={"quantize_config.json": qconfig})


def describe_gptq_config(qc: dict[str, Any]) -> tuple[str, dict[str, Any], list[str]]:
    """(format, weights, ignore) of a GPTQ quantization_config, for inspect's summary."""
    weights = {"num_bits": qc.get("bits"), "group_size": qc.get("group_size"), "symmetric": bool(qc.get("sym"))}
    return f"{qc.get('checkpoint_format', 'gptq')} v1", weights, qc.get("modules_to_not_convert") or []


def read_gptq(get, name: str, args: QuantArgs) -> QuantizedTensor:
    """The canonical quantized tensor of module `name` from its GPTQ v1 tensors; get(key) -> tensor."""
    qw, qz, sc = get(f"{name}.qweight"), get(f"{name}.qzeros"), get(f"{name}.scales")
    g_idx = get(f"{name}.g_idx")
    n_groups, out_f = sc.shape
    in_f = g_idx.shape[0]
    g = in_f // n_groups
    if not torch.equal(g_idx.long(), torch.arange(in_f) // g):
        raise ValueError(f"{name}: g_idx is not col // group_size (act-order checkpoints are not supported)")
    q = unpack_int32(qw, args.bits, (in_f, out_f), dim=0).t().contiguous()  # (out, in) signed
    zero = (unpack_int32(qz, args.bits, (n_groups, out_f), dim=1).to(torch.int16) + 1).t()  # stored + 1 = signed zero
    zero = zero.to(torch.int8).contiguous()
    if args.symmetric and not bool(zero.any()):
        zero = None
    return QuantizedTensor(q, sc.float().t().contiguous(), zero, args)
