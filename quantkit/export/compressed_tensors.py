"""Export a QuantizedModel as a compressed-tensors checkpoint (loadable by vLLM and transformers).

Layout written for each quantized linear `<name>` (weight W: (out, in), b bits,
n_groups = in // group_size, or 1 per-channel), format `pack-quantized`:

    <name>.weight_packed      int32  (out, ceil(in * b / 32))    values + 2^(b-1), packed along in
    <name>.weight_scale       model dtype (out, n_groups)         (out, 1) per-channel
    <name>.weight_shape       int64  (2,)                         [out, in]
    <name>.weight_zero_point  int32  (ceil(out * b / 32), n_groups)  asymmetric only; signed zero
                                                                  points packed along out (dim 0)

Schemes with input activations (W8A8) use format `int-quantized` instead:

    <name>.weight             int8   (out, in)                    signed integers, unpacked
    <name>.weight_scale       model dtype (out, n_groups)
    <name>.input_scale        model dtype (1,)                    static per-tensor activations only

A KV-cache scheme adds `kv_cache_scheme` to the config and, when static,
`<attn>.k_scale` / `<attn>.v_scale` (1,) per attention module: the per-tensor
scales the format defines (INT8: max|x| / 127; `kv_format="fp8"`: max|x| / 448,
the FP8 cache vLLM loads). Our runtime's per-channel INT8 KV scales and the
outlier-residual statistics go to `quantkit_kv_scales.st` (safetensors bytes
under a name no loader globs).

Dequantized weight = (q - zero) * scale, the same convention as quantkit.quant.core.
Everything else in the model's state dict (embeddings, norms, biases, ignored
linears, persistent buffers) is written unchanged, in its own dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import json
import logging
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantkit.errors import short, short_repr
from quantkit.export.atomic import check_output_dir, source_paths
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


KV_SCALES_NAME = "quantkit_kv_scales.st"
KV_FORMATS = ("int8", "fp8")
_FP8_MAX = 448.0  # float8_e4m3fn


def ct_act_args(acts) -> dict[str, Any]:
    """compressed-tensors QuantizationArgs (dict) for input activations (`ActQuantArgs`)."""
    return {
        "num_bits": acts.bits,
        "type": "int",
        "symmetric": acts.symmetric,
        "group_size": None,
        "strategy": acts.strategy,
        "dynamic": acts.dynamic,
    }


def ct_kv_args(kv, kv_format: str = "int8") -> dict[str, Any]:
    """`kv_cache_scheme` for a `KVCacheArgs`: what the format defines (per-tensor static or per-token dynamic).

    compressed-tensors has no per-channel KV strategy: a static per-channel cache is
    described as per-tensor (its scale is the max of the channel scales); the
    per-channel scales travel in KV_SCALES_NAME. kv_format "fp8": an FP8 per-tensor
    static cache, the only KV cache vLLM loads.
    """
    if kv_format not in KV_FORMATS:
        raise ValueError(f"kv_format {short_repr(kv_format)} is not one of {', '.join(KV_FORMATS)}")
    if kv_format == "fp8":
        return {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "tensor", "dynamic": False}
    dynamic = kv.dynamic
    return {
        "num_bits": kv.bits,
        "type": "int",
        "symmetric": True,
        "group_size": None,
        "strategy": "token" if dynamic else "tensor",
        "dynamic": dynamic,
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
        acts = ct_act_args(acts)
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


def _module_groups(modules: dict[str, QuantizedTensor], input_activations=None) -> list[tuple[Scheme, list[str]]]:
    """One group per distinct QuantArgs, targets = the exact module names, largest group first.

    input_activations: the recipe's `ActQuantArgs` (W8A8), shared by every group, or None.
    """
    by_args: dict[QuantArgs, list[str]] = {}
    for name, qt in modules.items():
        by_args.setdefault(qt.args, []).append(name)
    ordered = sorted(by_args.items(), key=lambda kv: (-len(kv[1]), kv[0].bits, kv[0].group_size or 0))
    return [(Scheme(weights=a, input_activations=input_activations), sorted(names)) for a, names in ordered]


def _static_tensors(qmodel: QuantizedModel, kv_format: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """input_scale per linear (static activations) and k_scale / v_scale per attention (static KV), (1,) each."""
    st = qmodel.static_scales
    scheme = qmodel.recipe.scheme
    out: dict[str, torch.Tensor] = {}
    if st is None:
        return out
    acts = scheme.input_activations
    if acts is not None and not acts.dynamic:
        for name in qmodel.modules:
            out[f"{name}.input_scale"] = st.act[name].reshape(1).to("cpu", dtype)
    kv = scheme.kv_cache
    if kv is not None and (not kv.dynamic or kv_format == "fp8"):
        for attn, e in st.kv.items():
            for which in ("k", "v"):
                if f"{which}_scale" not in e:
                    raise ValueError(f"{attn}: no static {which.upper()} scale was calibrated")
                amax = e[f"{which}_scale"].float().max() * ((1 << (kv.bits - 1)) - 1)
                s = amax / (_FP8_MAX if kv_format == "fp8" else 127.0)
                out[f"{attn}.{which}_scale"] = s.reshape(1).to("cpu", dtype)
    return out


def _write_kv_side_file(qmodel: QuantizedModel, tmp: Path) -> bool:
    """Per-channel INT8 KV scales (+ residual mean errors) for our runtime, in KV_SCALES_NAME. True if written."""
    st = qmodel.static_scales
    if st is None or not st.kv:
        return False
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    for attn, e in st.kv.items():
        for k, v in e.items():
            tensors[f"{attn}.{k}"] = (v if isinstance(v, torch.Tensor) else torch.tensor([float(v)])).float().contiguous()
    kv = qmodel.recipe.scheme.kv_cache
    # One metadata key: safetensors writes __metadata__ from a hash map, so several keys come out in a
    # different order from run to run and the file's bytes (and the manifest's hash) would change with them.
    info = {"format": "quantkit-kv-scales", "version": "1", "kv_cache": kv.to_dict() if kv else None}
    meta = {"quantkit": json.dumps(info, sort_keys=True)}
    (tmp / KV_SCALES_NAME).write_bytes(save(tensors, metadata=meta))
    return True


def export_compressed_tensors(
    qmodel: QuantizedModel,
    out: Path,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
    kv_format: str = "int8",
    float_modules: Sequence[str] = (),
) -> Path:
    """Write qmodel as a compressed-tensors checkpoint dir at `out` (`pack-quantized`,
    or `int-quantized` for schemes with input activations).

    Files: model.safetensors (or model-0000k-of-0000n.safetensors + index when the
    tensors exceed max_shard_bytes), config.json with quantization_config,
    generation_config.json (if the model has one), tokenizer files, the KV scales
    side file for static KV caches, then quantkit.json (hashes of all the others).
    Written atomically: a failure leaves nothing at `out` (and an existing `out`
    untouched). The model is not modified.

    float_modules: modules kept in high precision that are not nn.Linear here but that
    serving engines build as linears (MoE routers): listed in `ignore`. With them (an MoE
    model) a single-scheme checkpoint targets the class "Linear" rather than module names:
    vLLM looks a fused-MoE layer's scheme up under its own per-expert names
    (`experts.0.gate_proj`, also for Mixtral, whose checkpoint says w1), which only a
    class target matches.

    Raises OutputExistsError for a non-empty `out` without overwrite, ValueError
    for modules that cannot be exported, ExportError for I/O failures.
    """
    out = Path(out)
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    if kv_format not in KV_FORMATS:
        raise ValueError(f"kv_format {short_repr(kv_format)} is not one of {', '.join(KV_FORMATS)}")
    check_output_dir(out, overwrite, protect=source_paths(qmodel.source))
    quantized, ignore = validate_modules(qmodel)
    scheme = qmodel.recipe.scheme
    acts, kv = scheme.input_activations, scheme.kv_cache
    if acts is not None and any(qt.args.bits not in (4, 8) or qt.args.group_size is not None for qt in qmodel.modules.values()):
        raise ValueError("int-quantized export with input activations supports W8 or W4 per-channel weights only")
    fmt = "int-quantized" if acts is not None else "pack-quantized"
    groups = _module_groups(qmodel.modules, acts)
    if float_modules:
        ignore = sorted({*ignore, *float_modules})
        if len(groups) == 1:
            groups = [(groups[0][0], ["Linear"])]
    qconfig = build_quantization_config(groups, ignore, ct_kv_args(kv, kv_format) if kv is not None else None)
    model_dtype = next(iter(quantized.values())).weight.dtype
    export_warnings = vllm_fusion_warnings({n: qt.args for n, qt in qmodel.modules.items()}, [*quantized, *ignore])
    for w in export_warnings:
        logger.warning(w)

    def side_files(tmp: Path) -> dict[str, Any]:
        kv_file = _write_kv_side_file(qmodel, tmp)
        return {
            **_write_shadow(qmodel, tmp),
            "format_detail": fmt,
            "kv_format": kv_format if kv is not None else None,
            "kv_scales_file": KV_SCALES_NAME if kv_file else None,
            # SpinQuant's run-time Hadamards (R3 on Q/K, R4 on down_proj inputs): the weights assume them
            **({"online_rotations": qmodel.online_rotations} if getattr(qmodel, "online_rotations", None) else {}),
        }

    return write_checkpoint(
        qmodel,
        out,
        overwrite=overwrite,
        format_name=FORMAT_NAME,
        quantized=quantized,
        layout=ct_layout(fmt),
        quantization_config=qconfig,
        export_warnings=export_warnings,
        max_shard_bytes=max_shard_bytes,
        extra_tensors=_static_tensors(qmodel, kv_format, model_dtype),
        side_files=side_files,
    )


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


class SafetensorsHeaderError(ManifestError):
    """A .safetensors file's header is truncated or corrupted (a usage error: the file is bad)."""


_MAX_HEADER = 100 * 1024**2  # safetensors itself refuses headers above 100 MB
# Bits per element of every dtype safetensors 0.8 reads (its own list; sub-byte types pack).
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
    "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for k, v in pairs:
        if k in seen:
            raise _DuplicateKey(k)
        seen[k] = v
    return seen


class _DuplicateKey(ValueError):
    pass


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file (tensor name -> dtype/shape/data_offsets), no data read.

    Checks everything safetensors checks before it reads a byte of data, so a damaged file
    is one SafetensorsHeaderError naming it, never a SafetensorError deep in a loader:
    the 8-byte length, that the header fits in the file and is a JSON object without
    duplicate names, each entry {dtype: a known dtype, shape: [int >= 0], data_offsets:
    [begin, end]}, that each tensor's byte range is exactly its shape times its dtype's
    size, and that the ranges, sorted, tile the data section with no overlap, gap or
    trailing bytes.
    """
    path = Path(path)

    def bad(why: str) -> SafetensorsHeaderError:
        return SafetensorsHeaderError(f"{path.name} in {path.parent} is not a valid safetensors file ({why}); "
                                      "re-export or re-download it")

    try:
        import stat as stat_mod

        st = path.stat()
        if not stat_mod.S_ISREG(st.st_mode):  # a pipe would block the read forever
            raise bad("not a regular file")
        size = st.st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise bad("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, _MAX_HEADER):
                raise bad(f"header length {n} exceeds the file")
            text = f.read(n)
    except OSError as e:
        raise bad(f"unreadable: {e.strerror or e}") from e
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise bad(f"tensor name {short(str(e.args[0]), 60)!r} appears twice") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise bad("header is not JSON") from e
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise bad("__metadata__ is not a map of strings")
    data_len = size - 8 - n
    spans = []
    for key, info in header.items():
        name = short(str(key), 60)
        ok = (
            isinstance(info, dict)
            and isinstance(info.get("dtype"), str)
            and isinstance(info.get("shape"), list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"])
            and isinstance(info.get("data_offsets"), list)
            and len(info["data_offsets"]) == 2
            and all(isinstance(d, int) and not isinstance(d, bool) for d in info["data_offsets"])
            and 0 <= info["data_offsets"][0] <= info["data_offsets"][1] <= data_len
        )
        if not ok:
            raise bad(f"entry {short_repr(name)} is malformed or points outside the file")
        bits = SAFETENSORS_DTYPE_BITS.get(info["dtype"])
        if bits is None:
            raise bad(f"entry {name!r} has unknown dtype {short(info['dtype'], 20)!r}")
        numel = 1
        for d in info["shape"]:
            numel *= d
        begin, end = info["data_offsets"]
        if numel * bits != (end - begin) * 8:
            raise bad(f"entry {name!r}: {info['dtype']} of shape {short(info['shape'], 60)} needs "
                      f"{numel * bits / 8:g} bytes, its byte range holds {end - begin}")
        spans.append((begin, end, name))
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            why = "overlaps the tensor before it" if begin < pos else f"leaves a gap of {begin - pos} bytes before it"
            raise bad(f"entry {short_repr(name)} at bytes {begin}..{end} {why}")
        pos = end
    if pos != data_len:
        raise bad(f"{data_len - pos} bytes after the last tensor are not covered by the header")
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
        for key, info in read_safetensors_header(st).items():
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
        for key, info in read_safetensors_header(st).items():
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
    elif len(groups) == 1 and groups[0]["targets"] == ["Linear"]:  # a class target (MoE exports): count the modules
        groups[0]["n_targets"] = len(quantized_modules)
    linear_bytes = _linear_memory_split(ckpt_dir, quantized_modules, ignore)

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
        header = read_safetensors_header(st)
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
