"""Export a QuantizedModel as a compressed-tensors checkpoint (loadable by vLLM and transformers).

Layout written for each quantized linear `<name>` (weight W: (out, in), b bits,
n_groups = in // group_size, or 1 per-channel), format `pack-quantized`:

    <name>.weight_packed      int32  (out, ceil(in * b / 32))    values + 2^(b-1), packed along in
    <name>.weight_scale       model dtype (out, n_groups)         (out, 1) per-channel
    <name>.weight_shape       int64  (2,)                         [out, in]
    <name>.weight_zero_point  int32  (ceil(out * b / 32), n_groups)  asymmetric only; signed zero
                                                                  points packed along out (dim 0)

Dequantized weight = (q - zero) * scale, the same convention as quantkit.quant.core.
Everything else in the model's state dict (embeddings, norms, biases, ignored
linears, persistent buffers) is written unchanged, in its own dtype.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any

import torch

from quantkit.export.atomic import check_output_dir
from quantkit.export.common import (  # noqa: F401  (SAFE_* re-exported for callers)
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    Layout,
    validate_modules,
    write_checkpoint,
)
from quantkit.export.manifest import MANIFEST_NAME, ManifestError, read_manifest
from quantkit.quant.core import QuantizedTensor
from quantkit.quant.model import QuantizedModel
from quantkit.quant.pack import pack_int32, packed_length
from quantkit.recipe import QuantArgs, Scheme

logger = logging.getLogger(__name__)

FORMAT_NAME = "compressed-tensors"
# The compressed-tensors release whose on-disk layout this writer was checked
# against (tests compare our packed bytes with its packer); stamped as "version".
CT_FORMAT_VERSION = "0.20.0"

# Linears that vLLM fuses into one layer; the members must share one scheme
# (and be all quantized or all ignored) or vLLM refuses the checkpoint.
_VLLM_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


# ----------------------------------------------------------------------------- config


def ct_quant_args(args: QuantArgs) -> dict[str, Any]:
    """compressed-tensors QuantizationArgs (as a dict) for integer weights.

    Only keys every compressed-tensors release accepts (its QuantizationArgs
    forbids unknown keys), so older vLLM installs parse it too.
    """
    return {
        "num_bits": args.bits,
        "type": "int",
        "symmetric": args.symmetric,
        "group_size": args.group_size,
        "strategy": args.strategy,
        "dynamic": False,
    }


def ct_format(scheme: Scheme) -> str:
    """The compressed-tensors format for a scheme's tensors on disk.

    Weight-only integer schemes (WnA16, 1..8 bits, including W8A16) are
    `pack-quantized`; a scheme that also quantizes input activations to int
    (W8A8) is stored unpacked as `int-quantized`.
    """
    acts = getattr(scheme, "input_activations", None)
    if acts is not None:
        return "int-quantized"
    return "pack-quantized"


def ct_scheme(scheme: Scheme, targets: list[str]) -> dict[str, Any]:
    """One compressed-tensors config group: {targets, weights, input_activations, output_activations, format}.

    `scheme.input_activations` (when the Scheme grows one) must be an object
    with a `to_ct()` dict or a ready dict; today it is always None.
    """
    acts = getattr(scheme, "input_activations", None)
    if acts is not None and not isinstance(acts, dict):
        acts = acts.to_ct()
    return {
        "targets": list(targets),
        "weights": ct_quant_args(scheme.weights),
        "input_activations": acts,
        "output_activations": None,
        "format": ct_format(scheme),
    }


def build_quantization_config(
    groups: list[tuple[Scheme, list[str]]],
    ignore: list[str],
    kv_cache_scheme: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The `quantization_config` block of config.json.

    groups: (scheme, target module names or "re:" patterns), one per distinct
        scheme; written as group_0, group_1, ...
    ignore: names of linears left unquantized (vLLM needs every unquantized
        linear either here or unmatched by all targets).
    kv_cache_scheme: compressed-tensors QuantizationArgs dict for the KV cache, or None.
    """
    config_groups = {f"group_{i}": ct_scheme(s, t) for i, (s, t) in enumerate(groups)}
    formats = {g["format"] for g in config_groups.values()}
    fmt = formats.pop() if len(formats) == 1 else ("mixed-precision" if formats else "dense")
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": list(ignore),
        "kv_cache_scheme": kv_cache_scheme,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_FORMAT_VERSION,
    }


# ----------------------------------------------------------------------------- tensors


def compress_module(qt: QuantizedTensor, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """pack-quantized tensors of one linear, keyed by local name (weight_packed, ...).

    qt.q: int8 (out, in); qt.scale: (out, n_groups); qt.zero: int8 (out, n_groups) or None.
    """
    out_f, in_f = qt.q.shape
    q = qt.q.detach().to("cpu")
    t = {
        "weight_packed": pack_int32(q, qt.args.bits, dim=1),
        "weight_scale": qt.scale.detach().to("cpu", scale_dtype).contiguous(),
        "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
    }
    if qt.zero is not None and not qt.args.symmetric:
        t["weight_zero_point"] = pack_int32(qt.zero.detach().to("cpu", torch.int8), qt.args.bits, dim=0)
    return t


def _compressed_nbytes(qt: QuantizedTensor, scale_dtype: torch.dtype) -> int:
    out_f, in_f = qt.q.shape
    n_groups = qt.scale.shape[1]
    b = qt.args.bits
    n = 4 * out_f * packed_length(in_f, b) + out_f * n_groups * scale_dtype.itemsize + 16
    if qt.zero is not None and not qt.args.symmetric:
        n += 4 * packed_length(out_f, b) * n_groups
    return n


def _ct_pieces(qt: QuantizedTensor) -> list[str]:
    pieces = ["weight_packed", "weight_scale", "weight_shape"]
    return pieces + (["weight_zero_point"] if not qt.args.symmetric else [])


CT_LAYOUT = Layout(pieces=_ct_pieces, nbytes=_compressed_nbytes, compress=compress_module)


def vllm_fusion_warnings(modules: dict[str, QuantArgs], linears: list[str]) -> list[str]:
    """Warnings for layers vLLM fuses (q/k/v, gate/up) whose members differ in scheme.

    modules: quantized module name -> args; linears: all nn.Linear names.
    """
    out = []
    names = set(linears)
    for fused, parts in _VLLM_FUSED.items():
        prefixes = {n.rsplit(".", 1)[0] for n in names if n.rsplit(".", 1)[-1] == parts[0]}
        for p in sorted(prefixes):
            members = [f"{p}.{s}" for s in parts if f"{p}.{s}" in names]
            kinds = {modules[m].describe() if m in modules else "unquantized" for m in members}
            if len(kinds) > 1:
                out.append(
                    f"{p}.{{{','.join(parts)}}} have different schemes ({', '.join(sorted(kinds))}); "
                    f"vLLM fuses them into {fused} and will refuse this checkpoint"
                )
    return out


def _module_groups(modules: dict[str, QuantizedTensor]) -> list[tuple[Scheme, list[str]]]:
    """One group per distinct QuantArgs, targets = the exact module names, largest group first."""
    by_args: dict[QuantArgs, list[str]] = {}
    for name, qt in modules.items():
        by_args.setdefault(qt.args, []).append(name)
    ordered = sorted(by_args.items(), key=lambda kv: (-len(kv[1]), kv[0].bits, kv[0].group_size or 0))
    return [(Scheme(weights=a), sorted(names)) for a, names in ordered]


def export_compressed_tensors(
    qmodel: QuantizedModel,
    out: Path,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Write qmodel as a compressed-tensors `pack-quantized` checkpoint dir at `out`.

    Files: model.safetensors (or model-0000k-of-0000n.safetensors + index when the
    tensors exceed max_shard_bytes), config.json with quantization_config,
    generation_config.json (if the model has one), tokenizer files, then
    quantkit.json (hashes of all the others). Written atomically: a failure leaves
    nothing at `out` (and an existing `out` untouched). The model is not modified.

    Raises OutputExistsError for a non-empty `out` without overwrite, ValueError
    for modules that cannot be exported, ExportError for I/O failures.
    """
    out = Path(out)
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    check_output_dir(out, overwrite)
    quantized, ignore = validate_modules(qmodel)
    groups = _module_groups(qmodel.modules)
    qconfig = build_quantization_config(groups, ignore)
    export_warnings = vllm_fusion_warnings({n: qt.args for n, qt in qmodel.modules.items()}, [*quantized, *ignore])
    for w in export_warnings:
        logger.warning(w)

    return write_checkpoint(
        qmodel,
        out,
        overwrite=overwrite,
        format_name=FORMAT_NAME,
        quantized=quantized,
        layout=CT_LAYOUT,
        quantization_config=qconfig,
        export_warnings=export_warnings,
        max_shard_bytes=max_shard_bytes,
    )


# ----------------------------------------------------------------------------- reading


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file (tensor name -> dtype/shape/data_offsets), no data read."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


_QUANT_SUFFIXES = (
    "weight_packed",
    "weight_scale",
    "weight_zero_point",
    "weight_shape",
    "weight_g_idx",
    # awq / gptq layouts
    "qweight",
    "qzeros",
    "scales",
    "g_idx",
)


def _legacy_groups(qc: dict[str, Any]) -> tuple[str | None, list[dict[str, Any]]]:
    """(format, groups) for an awq or gptq quantization_config: one implicit group of every quantized linear."""
    method = qc.get("quant_method")
    if method == "awq":
        sym, fmt = False, f"{qc.get('version', 'gemm')}"
    else:
        sym, fmt = bool(qc.get("sym")), f"{qc.get('checkpoint_format', 'gptq')} v1"
    weights = {"num_bits": qc.get("bits"), "group_size": qc.get("group_size"), "symmetric": sym}
    return fmt, [{"name": "all", "format": fmt, "weights": weights, "input_activations": None, "n_targets": 0, "targets": []}]


def read_checkpoint_summary(ckpt_dir: Path) -> dict[str, Any]:
    """Facts about a compressed-tensors checkpoint dir for `quantkit inspect`.

    Returns {"path", "format", "quant_method", "version", "groups": [{"name",
    "format", "weights", "input_activations", "n_targets", "targets"}], "ignore",
    "kv_cache_scheme", "n_quantized_linears", "quantized_bytes", "unquantized_bytes",
    "total_bytes", "n_tensors", "manifest": {format_version, quantkit_version, created}
    or None, "source", "recipe", "warnings"}. Byte counts are tensor payloads;
    total_bytes is all files in the dir. Works without a quantkit.json (then the
    manifest fields are None).
    """
    ckpt_dir = Path(ckpt_dir)
    cfg_path = ckpt_dir / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{ckpt_dir} has no config.json; it is not a model checkpoint dir")
    with open(cfg_path, encoding="utf-8") as f:
        qc = json.load(f).get("quantization_config") or {}

    groups = []
    for gname, g in (qc.get("config_groups") or {}).items():
        targets = g.get("targets", []) if isinstance(g, dict) else list(g)
        groups.append(
            {
                "name": gname,
                "format": g.get("format") if isinstance(g, dict) else None,
                "weights": g.get("weights") if isinstance(g, dict) else None,
                "input_activations": g.get("input_activations") if isinstance(g, dict) else None,
                "n_targets": len(targets),
                "targets": targets,
            }
        )

    quantized_bytes = unquantized_bytes = n_tensors = 0
    quantized_modules: set[str] = set()
    for st in sorted(ckpt_dir.glob("*.safetensors")):
        for key, info in _safetensors_header(st).items():
            n_tensors += 1
            nbytes = info["data_offsets"][1] - info["data_offsets"][0]
            mod, _, local = key.rpartition(".")
            if local in _QUANT_SUFFIXES:
                quantized_modules.add(mod)
                quantized_bytes += nbytes
            else:
                unquantized_bytes += nbytes
    # int-quantized layers keep a plain `weight` beside their `weight_scale`
    for st in sorted(ckpt_dir.glob("*.safetensors")):
        for key, info in _safetensors_header(st).items():
            mod, _, local = key.rpartition(".")
            if local == "weight" and mod in quantized_modules:
                nbytes = info["data_offsets"][1] - info["data_offsets"][0]
                quantized_bytes += nbytes
                unquantized_bytes -= nbytes

    fmt = qc.get("format", "dense" if not qc else None)
    ignore = qc.get("ignore", [])
    if qc.get("quant_method") in ("awq", "gptq"):
        fmt, groups = _legacy_groups(qc)
        groups[0]["n_targets"] = len(quantized_modules)
        ignore = qc.get("modules_to_not_convert") or []
    manifest = None
    try:
        manifest = read_manifest(ckpt_dir)
    except ManifestError:
        if (ckpt_dir / MANIFEST_NAME).exists():
            raise
    total = sum(p.stat().st_size for p in ckpt_dir.rglob("*") if p.is_file())
    return {
        "path": str(ckpt_dir),
        "format": fmt,
        "quant_method": qc.get("quant_method"),
        "version": qc.get("version"),
        "groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": qc.get("kv_cache_scheme"),
        "n_quantized_linears": len(quantized_modules),
        "quantized_bytes": quantized_bytes,
        "unquantized_bytes": unquantized_bytes,
        "total_bytes": total,
        "n_tensors": n_tensors,
        "manifest": None
        if manifest is None
        else {k: manifest.get(k) for k in ("format_version", "quantkit_version", "created", "format")},
        "source": None if manifest is None else manifest.get("source"),
        "recipe": None if manifest is None else manifest.get("recipe"),
        "warnings": None if manifest is None else manifest.get("warnings"),
    }
