"""The checkpoint formats quantkit writes and reads: one entry each, asked by every place that
depends on the format (the export dispatch, the recipe check before a run, the readers, `inspect`).

Adding a format = one `ExportFormat` entry in FORMATS: its writer plan, its reader of one
quantized linear, what it can hold, and how inspect describes its config.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quantkit.errors import short_repr
from quantkit.export import awq, compressed_tensors, gptq
from quantkit.export.common import DEFAULT_SHARD_BYTES, ExportOptions, Planner, export_checkpoint
from quantkit.export.ct_config import describe_ct_config
from quantkit.export.ct_pack import read_ct
from quantkit.quant.core import QuantizedTensor
from quantkit.quant.model import QuantizedModel
from quantkit.recipe import QuantArgs, RecipeError, Scheme

DEFAULT_FORMAT = compressed_tensors.FORMAT_NAME

# (get(key) -> tensor, module name, its args) -> the canonical quantized tensor of that module
Reader = Callable[[Callable[[str], torch.Tensor], str, QuantArgs], QuantizedTensor]
# quantization_config -> (format label, groups, ignore): see ct_config.describe_ct_config for a group's keys
Describer = Callable[[dict[str, Any]], tuple[Any, list[dict[str, Any]], list[str]]]


@dataclass(frozen=True)
class ExportFormat:
    """One checkpoint format.

    name: what --format and the manifest's "format" say; quant_method: what config.json's
    quantization_config says (how inspect recognizes a checkpoint without a manifest);
    plan: how the writer lays a model out (common.export_checkpoint does the writing);
    read: one quantized linear back from its tensors; describe: the config for inspect;
    weight_only: refuses schemes that quantize activations or the KV cache;
    check_args / check_shapes: refuse weight args / linear shapes ({name: (out, in)}) the layout cannot hold.
    """

    name: str
    quant_method: str
    plan: Planner
    read: Reader
    describe: Describer
    weight_only: bool = False
    check_args: Callable[[QuantArgs], None] | None = None
    check_shapes: Callable[[dict[str, tuple[int, int]], QuantArgs], None] | None = None

    def check_scheme(self, scheme: Scheme, shapes: Callable[[], dict[str, tuple[int, int]]] | None = None) -> None:
        """Refuse, before any work, a scheme this format cannot hold; shapes() (when given) lists the
        linears to quantize as {name: (out_features, in_features)}."""
        if self.weight_only and (scheme.input_activations is not None or scheme.kv_cache is not None):
            raise RecipeError(f"--format {self.name} holds weight-only schemes, not {scheme.name}; "
                              f"use --format {DEFAULT_FORMAT}")
        if self.check_args is not None:
            self.check_args(scheme.weights)
        if shapes is not None and self.check_shapes is not None:
            self.check_shapes(shapes(), scheme.weights)

    def write(self, qmodel: QuantizedModel, out: Path, *, overwrite: bool = False,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, kv_format: str = "int8",
              float_modules: Sequence[str] = ()) -> Path:
        """Write qmodel as a checkpoint dir of this format (see common.export_checkpoint); a scheme the format
        cannot hold is refused first (the CLI checks it before calibrating, the Python API only here)."""
        self.check_scheme(qmodel.recipe.scheme)
        return export_checkpoint(qmodel, Path(out), format_name=self.name, plan=self.plan,
                                 options=ExportOptions(kv_format, tuple(float_modules)), overwrite=overwrite,
                                 max_shard_bytes=max_shard_bytes)


def _one_group(describe: Callable[[dict[str, Any]], tuple[str, dict[str, Any], list[str]]]) -> Describer:
    """A one-scheme format's (format, weights, ignore) as a single implicit group of every quantized linear."""

    def described(qc: dict[str, Any]):
        fmt, weights, ignore = describe(qc)
        group = {"name": "all", "format": fmt, "weights": weights, "input_activations": None, "n_targets": None,
                 "targets": []}
        return fmt, [group], ignore

    return described


_ENTRIES = (
    ExportFormat(compressed_tensors.FORMAT_NAME, "compressed-tensors", compressed_tensors.plan_compressed_tensors,
                 read_ct, describe_ct_config),
    ExportFormat(awq.FORMAT_NAME, "awq", awq.plan_awq, awq.read_awq, _one_group(awq.describe_awq_config),
                 weight_only=True, check_args=awq.check_awq_args, check_shapes=awq.check_awq_shapes),
    ExportFormat(gptq.FORMAT_NAME, "gptq", gptq.plan_gptq, gptq.read_gptq, _one_group(gptq.describe_gptq_config),
                 weight_only=True, check_args=gptq.check_gptq_args, check_shapes=gptq.check_gptq_shapes),
)
FORMATS: dict[str, ExportFormat] = {f.name: f for f in _ENTRIES}
FORMAT_NAMES = tuple(FORMATS)


def export_format(name: str) -> ExportFormat:
    """The format called `name`; RecipeError (a usage error) naming the choices otherwise."""
    fmt = FORMATS.get(name) if isinstance(name, str) else None
    if fmt is None:
        raise RecipeError(f"--format {short_repr(name)} is not supported; use one of {', '.join(FORMAT_NAMES)}")
    return fmt


def format_of_config(qc: dict[str, Any]) -> ExportFormat:
    """The format a config.json's quantization_config describes (by quant_method); compressed-tensors
    for anything else, whose config_groups it reads as far as they go."""
    method = qc.get("quant_method")
    return next((f for f in _ENTRIES if f.quant_method == method), FORMATS[DEFAULT_FORMAT])
