"""What a checkpoint dir holds, for `quantkit inspect`: from config.json, each safetensors
header (read once) and, when there is one, the quantkit.json manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantkit.export.formats import format_of_config
from quantkit.files import load_small_json
from quantkit.export.manifest import MANIFEST_NAME, ManifestError, read_manifest
from quantkit.export.safetensors_header import SafetensorsFile, open_safetensors

# Local tensor names that mark a module as quantized (compressed-tensors, then awq / gptq layouts).
_QUANT_SUFFIXES = (
    "weight_packed",
    "weight_scale",
    "weight_zero_point",
    "weight_shape",
    "weight_g_idx",
    "qweight",
    "qzeros",
    "scales",
    "g_idx",
)
_MANIFEST_KEYS = ("format_version", "quantkit_version", "created", "format")


def read_checkpoint_summary(ckpt_dir: Path) -> dict[str, Any]:
    """Facts about a checkpoint dir (any format quantkit writes) for `quantkit inspect`.

    Returns {"path", "format", "quant_method", "version", "groups": [{"name",
    "format", "weights", "input_activations", "n_targets", "targets"}], "ignore",
    "kv_cache_scheme", "n_quantized_linears", "quantized_bytes", "unquantized_bytes",
    "total_bytes", "n_tensors", "manifest": {format_version, quantkit_version, created}
    or None, "source", "recipe", "warnings", "linear_bytes", "sensitivity", "shadow", "online_rotations",
    "resolved_options", "transform_config"}.
    Byte counts are tensor payloads; total_bytes is all files in the dir. Works without
    a quantkit.json (then the manifest fields are None).
    """
    ckpt_dir = Path(ckpt_dir)
    cfg_path = ckpt_dir / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{ckpt_dir} has no config.json; it is not a model checkpoint dir")
    cfg = load_small_json(cfg_path, ValueError, "it is not a readable model checkpoint dir")
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    qc = qc if isinstance(qc, dict) else {}
    fmt, groups, ignore = format_of_config(qc).describe(qc)
    files = [open_safetensors(p) for p in sorted(ckpt_dir.glob("*.safetensors"))]
    quantized_modules = _quantized_modules(files)
    for g in groups:  # a group that targets every quantized linear (implicit or a class target)
        if g["n_targets"] is None:
            g["n_targets"] = len(quantized_modules)
    manifest = None
    try:
        manifest = read_manifest(ckpt_dir)
    except ManifestError:
        if (ckpt_dir / MANIFEST_NAME).exists():
            raise
    m = manifest or {}  # without a manifest its fields are None
    return {
        "path": str(ckpt_dir),
        "format": fmt,
        "quant_method": qc.get("quant_method"),
        "version": qc.get("version"),
        "groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": qc.get("kv_cache_scheme"),
        "n_quantized_linears": len(quantized_modules),
        **_payload_split(files, quantized_modules),
        "total_bytes": sum(p.stat().st_size for p in ckpt_dir.rglob("*") if p.is_file()),
        "n_tensors": sum(len(f.tensors) for f in files),
        "manifest": None if manifest is None else {k: m.get(k) for k in _MANIFEST_KEYS},
        "linear_bytes": _linear_memory_split(files, quantized_modules, ignore),
        **{k: m.get(k) for k in ("source", "recipe", "warnings", "sensitivity", "shadow", "online_rotations",
                                 "resolved_options")},
        "transform_config": qc.get("transform_config") or None,
    }


def _nbytes(info: dict[str, Any]) -> int:
    return info["data_offsets"][1] - info["data_offsets"][0]


def _numel(info: dict[str, Any]) -> int:
    n = 1
    for d in info["shape"]:
        n *= d
    return n


def _quantized_modules(files: list[SafetensorsFile]) -> set[str]:
    return {key.rpartition(".")[0] for f in files for key in f.tensors if key.rpartition(".")[2] in _QUANT_SUFFIXES}


def _payload_split(files: list[SafetensorsFile], quantized_modules: set[str]) -> dict[str, int]:
    """quantized_bytes (the quantized linears' pieces, an int-quantized plain `weight` included) and
    unquantized_bytes (every other tensor)."""
    quantized = unquantized = 0
    for f in files:
        for key, info in f.tensors.items():
            mod, _, local = key.rpartition(".")
            if local in _QUANT_SUFFIXES or (local == "weight" and mod in quantized_modules):
                quantized += _nbytes(info)
            else:
                unquantized += _nbytes(info)
    return {"quantized_bytes": quantized, "unquantized_bytes": unquantized}


def _linear_memory_split(files: list[SafetensorsFile], quantized_modules: set[str], ignore: list[str]) -> dict[str, Any]:
    """Bytes of linear weights: quantized (packed + scales), kept in float (the ignore list, as
    stored), and what all of them would take in FP16; saving = 1 - (quantized + float) / all-FP16."""
    quantized = fp = fp16_equiv = 0
    ignored = set(ignore)
    for f in files:
        for key, info in f.tensors.items():
            mod, _, local = key.rpartition(".")
            if mod in quantized_modules and local in (*_QUANT_SUFFIXES, "weight"):
                if local == "weight_shape":
                    out_f, in_f = f.read_ints(key)
                    fp16_equiv += 2 * out_f * in_f
                    continue
                quantized += _nbytes(info)
                if local == "weight" and f"{mod}.weight_shape" not in f.tensors:
                    fp16_equiv += 2 * _numel(info)  # int-quantized: the int8 weight keeps its shape
            elif local == "weight" and mod in ignored:
                fp += _nbytes(info)
                fp16_equiv += 2 * _numel(info)
    total = quantized + fp
    return {
        "quantized": quantized,
        "float": fp,
        "all_fp16": fp16_equiv,
        "saving": 1 - total / fp16_equiv if fp16_equiv else 0.0,
    }
