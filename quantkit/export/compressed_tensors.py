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

import copy
import json
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantkit.export.atomic import ExportError, atomic_output_dir, check_output_dir
from quantkit.export.manifest import MANIFEST_NAME, ManifestError, build_manifest, read_manifest, write_manifest
from quantkit.quant.core import QuantizedTensor
from quantkit.quant.model import QuantizedModel
from quantkit.quant.pack import PACK_BITS, pack_int32, packed_length
from quantkit.recipe import QuantArgs, Scheme

logger = logging.getLogger(__name__)

FORMAT_NAME = "compressed-tensors"
# The compressed-tensors release whose on-disk layout this writer was checked
# against (tests compare our packed bytes with its packer); stamped as "version".
CT_FORMAT_VERSION = "0.20.0"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# Quantized copies of the linears kept in FP16 (mixed precision). In a subdirectory:
# vLLM globs *.safetensors at the top level when there is no index, and would trip
# over tensors of modules it loads unquantized.
SHADOW_FILE = "shadow/quantkit_shadow.safetensors"

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


@dataclass
class _Unit:
    """Tensors written together (one linear's pieces, or one plain tensor)."""

    nbytes: int
    keys: list[str]
    make: Callable[[], dict[str, torch.Tensor]]


def _tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys that alias another parameter (e.g. lm_head.weight) when the config ties them."""
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if not getattr(text_cfg, "tie_word_embeddings", False):
        return set()
    mapping = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None)
    if isinstance(mapping, dict) and mapping:
        return set(mapping)
    return {"lm_head.weight"}


def _validate(qmodel: QuantizedModel) -> tuple[dict[str, nn.Linear], list[str]]:
    """Check every quantized module before anything is written; returns (quantized linears, ignored linears)."""
    linears = {n: m for n, m in qmodel.model.named_modules() if isinstance(m, nn.Linear)}
    if not qmodel.modules:
        raise ValueError("nothing to export: the QuantizedModel has no quantized modules")
    quantized: dict[str, nn.Linear] = {}
    for name, qt in qmodel.modules.items():
        mod = linears.get(name)
        if mod is None:
            raise ValueError(f"quantized module {name} is not an nn.Linear of the model; cannot export it")
        if qt.args.bits not in PACK_BITS:
            raise ValueError(f"{name}: {qt.args.bits}-bit weights cannot be stored as pack-quantized")
        if tuple(qt.q.shape) != tuple(mod.weight.shape):
            raise ValueError(f"{name}: quantized shape {tuple(qt.q.shape)} != weight shape {tuple(mod.weight.shape)}")
        in_f = qt.q.shape[1]
        n_groups = 1 if qt.args.group_size is None else in_f // qt.args.group_size
        if qt.args.group_size is not None and in_f % qt.args.group_size:
            raise ValueError(f"{name}: group size {qt.args.group_size} does not divide in_features {in_f}")
        if tuple(qt.scale.shape) != (qt.q.shape[0], n_groups):
            raise ValueError(f"{name}: scale shape {tuple(qt.scale.shape)} != expected {(qt.q.shape[0], n_groups)}")
        if not qt.args.symmetric and (qt.zero is None or tuple(qt.zero.shape) != tuple(qt.scale.shape)):
            raise ValueError(f"{name}: asymmetric quantization needs a zero point of shape {tuple(qt.scale.shape)}")
        if not mod.weight.dtype.is_floating_point:
            raise ValueError(f"{name}: weight dtype {mod.weight.dtype} is not a float dtype")
        quantized[name] = mod
    tied = _tied_keys(qmodel.model)
    for name in quantized:
        if f"{name}.weight" in tied:
            raise ValueError(
                f"{name} shares its weight with the embeddings (tie_word_embeddings); leave it unquantized "
                "(add it to the ignore list)"
            )
    ignore = sorted(n for n in linears if n not in quantized)
    return quantized, ignore


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


def _weight_matches(weight: torch.Tensor, qt: QuantizedTensor) -> bool:
    """Whether the model's weight (out, in) rounds to qt: within half a quantization step everywhere.

    The QuantizedModel contract says the linear holds qt's dequantized values; a
    method that updated one but not the other would export a checkpoint that
    differs from the model it evaluated.
    """
    deq = qt.dequantize(torch.float32)
    g = qt.q.shape[1] // qt.scale.shape[1]
    half_step = 0.5 * qt.scale.float().to(deq.device).repeat_interleave(g, dim=1)
    return bool(((weight.detach().float().to(deq.device) - deq).abs() <= half_step).all())


def _plan_units(
    qmodel: QuantizedModel, quantized: dict[str, nn.Linear], mismatched: list[str] | None = None
) -> list[_Unit]:
    """Every tensor to write, in state-dict order, grouped per module, without materializing packs.

    mismatched: when given, collects (while the units are made) the quantized
    linears whose model weight does not round to their quantized tensor.
    """
    model = qmodel.model
    sd = model.state_dict()
    skip = _tied_keys(model) | {f"{n}.weight" for n in quantized}
    units: list[_Unit] = []
    for key, t in sd.items():
        if key in skip:
            mod_name = key[: -len(".weight")]
            if mod_name in quantized:
                qt = qmodel.modules[mod_name]
                dtype = quantized[mod_name].weight.dtype
                pieces = ["weight_packed", "weight_scale", "weight_shape"]
                if not qt.args.symmetric:
                    pieces.append("weight_zero_point")

                def make(n=mod_name, q=qt, d=dtype, w=quantized[mod_name].weight) -> dict[str, torch.Tensor]:
                    if mismatched is not None and not _weight_matches(w, q):
                        mismatched.append(n)
                    return {f"{n}.{k}": v for k, v in compress_module(q, d).items()}

                units.append(_Unit(_compressed_nbytes(qt, dtype), [f"{mod_name}.{p}" for p in pieces], make))
            continue
        if t.device.type == "meta":
            raise ExportError(
                f"tensor {key} is on the meta device (offloaded without data); load the model without "
                "disk offload or onload it before export"
            )
        units.append(_Unit(t.numel() * t.element_size(), [key], lambda k=key, v=t: {k: v.detach().to("cpu")}))
    return units


def _shard(units: list[_Unit], max_bytes: int) -> list[list[_Unit]]:
    """Greedy shards of at most max_bytes (a unit larger than that gets a shard of its own)."""
    shards: list[list[_Unit]] = [[]]
    size = 0
    for u in units:
        if shards[-1] and size + u.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(u)
        size += u.nbytes
    return shards


def _materialize(units: list[_Unit]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for u in units:
        for k, v in u.make().items():
            v = v.contiguous()
            # safetensors refuses tensors sharing storage; copy any alias left.
            ptr = v.untyped_storage().data_ptr()
            if ptr in seen and v.numel():
                v = v.clone()
            seen.add(v.untyped_storage().data_ptr())
            tensors[k] = v
    return tensors


def _write_weights(units: list[_Unit], tmp: Path, max_shard_bytes: int) -> list[str]:
    """Write safetensors file(s) (+ index when sharded); returns file names."""
    from safetensors.torch import save_file

    shards = _shard(units, max_shard_bytes)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(_materialize(shards[0]), str(tmp / SAFE_WEIGHTS_NAME), metadata=meta)
        return [SAFE_WEIGHTS_NAME]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    for fname, shard in zip(names, shards):
        save_file(_materialize(shard), str(tmp / fname), metadata=meta)  # one shard in memory at a time
        for u in shard:
            weight_map.update({k: fname for k in u.keys})
    index = {"metadata": {"total_size": sum(u.nbytes for u in units)}, "weight_map": dict(sorted(weight_map.items()))}
    with open(tmp / SAFE_WEIGHTS_INDEX_NAME, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    return [*names, SAFE_WEIGHTS_INDEX_NAME]


def _config_dict(model: nn.Module, quantization_config: dict[str, Any]) -> dict[str, Any]:
    """config.json content: the model config (on a copy) with our quantization_config."""
    cfg = copy.deepcopy(model.config)
    # A config loaded from .gguf (or a quantized hub model) carries a quantization
    # config that is not ours; drop it on the copy, never on the model.
    if "quantization_config" in cfg.__dict__:
        del cfg.__dict__["quantization_config"]
    cfg.architectures = cfg.architectures or [type(model).__name__]
    cfg.dtype = str(model.dtype).split(".")[1]
    d = json.loads(cfg.to_json_string(use_diff=True))
    d.pop("quantization_config", None)
    d["quantization_config"] = quantization_config
    return d


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
    quantized, ignore = _validate(qmodel)
    model = qmodel.model
    groups = _module_groups(qmodel.modules)
    qconfig = build_quantization_config(groups, ignore)
    export_warnings = vllm_fusion_warnings({n: qt.args for n, qt in qmodel.modules.items()}, [*quantized, *ignore])
    for w in export_warnings:
        logger.warning(w)

    mismatched: list[str] = []
    units = _plan_units(qmodel, quantized, mismatched)  # refuses offloaded (meta) tensors before any write

    with atomic_output_dir(out, overwrite) as tmp:
        with torch.no_grad():
            _write_weights(units, tmp, max_shard_bytes)
        if mismatched:
            export_warnings.append(
                f"the model weights of {len(mismatched)} quantized linear(s) (e.g. {mismatched[0]}) do not round "
                "to their quantized tensors; the checkpoint holds the quantized tensors, so it differs from "
                "the in-memory model"
            )
            logger.warning(export_warnings[-1])
        extra = _write_shadow(qmodel, tmp)
        with open(tmp / "config.json", "w", encoding="utf-8") as f:
            json.dump(_config_dict(model, qconfig), f, indent=2, sort_keys=True)
            f.write("\n")
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.to_json_file(str(tmp / "generation_config.json"), use_diff=True)
        if qmodel.tokenizer is not None:
            qmodel.tokenizer.save_pretrained(str(tmp))
        manifest = build_manifest(
            tmp,
            format=FORMAT_NAME,
            recipe=qmodel.recipe.to_dict(),
            modules={n: qt.args.to_dict() for n, qt in qmodel.modules.items()},
            source=qmodel.source,
            calibration=qmodel.calibration,
            warnings=[*qmodel.warnings, *export_warnings],
            extra=extra,
        )
        write_manifest(tmp, manifest)
    return out


def _write_shadow(qmodel: QuantizedModel, tmp: Path) -> dict[str, Any]:
    """Write the quantized copies of the FP16-kept linears (if any); returns the manifest keys for them."""
    shadow = getattr(qmodel, "shadow", None) or {}
    sensitivity = getattr(qmodel, "sensitivity", None)
    extra: dict[str, Any] = {}
    if sensitivity is not None:
        extra["sensitivity"] = sensitivity
    if not shadow:
        return extra
    from safetensors.torch import save_file

    linears = {n: m for n, m in qmodel.model.named_modules() if isinstance(m, nn.Linear)}
    tensors: dict[str, torch.Tensor] = {}
    for name, qt in sorted(shadow.items()):
        mod = linears.get(name)
        if mod is None or tuple(qt.q.shape) != tuple(mod.weight.shape):
            raise ValueError(f"shadow module {name} does not match a linear of the model")
        if name in qmodel.modules:
            raise ValueError(f"{name} is both quantized and kept in FP16 with a shadow copy")
        for k, v in compress_module(qt, mod.weight.dtype).items():
            tensors[f"{name}.{k}"] = v
    (tmp / SHADOW_FILE).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp / SHADOW_FILE), metadata={"format": "pack-quantized"})
    extra["shadow"] = {
        "file": SHADOW_FILE,
        "format": "pack-quantized",
        "modules": {n: qt.args.to_dict() for n, qt in sorted(shadow.items())},
    }
    return extra


# ----------------------------------------------------------------------------- reading


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file (tensor name -> dtype/shape/data_offsets), no data read."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


_QUANT_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")


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

    linear_bytes = _linear_memory_split(ckpt_dir, quantized_modules, qc.get("ignore", []))

    manifest = None
    try:
        manifest = read_manifest(ckpt_dir)
    except ManifestError:
        if (ckpt_dir / MANIFEST_NAME).exists():
            raise
    total = sum(p.stat().st_size for p in ckpt_dir.rglob("*") if p.is_file())
    return {
        "path": str(ckpt_dir),
        "format": qc.get("format", "dense" if not qc else None),
        "quant_method": qc.get("quant_method"),
        "version": qc.get("version"),
        "groups": groups,
        "ignore": qc.get("ignore", []),
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
        "linear_bytes": linear_bytes,
        "sensitivity": None if manifest is None else manifest.get("sensitivity"),
        "shadow": None if manifest is None else manifest.get("shadow"),
    }


def _linear_memory_split(ckpt_dir: Path, quantized_modules: set[str], ignore: list[str]) -> dict[str, Any]:
    """Bytes of linear weights: quantized (packed + scales), kept in float (the ignore list, as
    stored), and what all of them would take in FP16; saving = 1 - (quantized + float) / all-FP16."""
    from safetensors import safe_open

    quantized = fp = fp16_equiv = 0
    ignored = set(ignore)
    for st in sorted(ckpt_dir.glob("*.safetensors")):
        header = _safetensors_header(st)
        with safe_open(str(st), framework="pt") as f:
            for key, info in header.items():
                mod, _, local = key.rpartition(".")
                nbytes = info["data_offsets"][1] - info["data_offsets"][0]
                if mod in quantized_modules and local in (*_QUANT_SUFFIXES, "weight"):
                    quantized += nbytes if local != "weight_shape" else 0
                    if local == "weight_shape":
                        out_f, in_f = f.get_tensor(key).tolist()
                        fp16_equiv += 2 * out_f * in_f
                    elif local == "weight" and f"{mod}.weight_shape" not in header:
                        n = 1
                        for d in info["shape"]:
                            n *= d
                        fp16_equiv += 2 * n  # int-quantized: the int8 weight keeps its shape
                elif local == "weight" and mod in ignored:
                    fp += nbytes
                    n = 1
                    for d in info["shape"]:
                        n *= d
                    fp16_equiv += 2 * n
    total = quantized + fp
    return {
        "quantized": quantized,
        "float": fp,
        "all_fp16": fp16_equiv,
        "saving": 1 - total / fp16_equiv if fp16_equiv else 0.0,
    }
