"""Export a QuantizedModel as a compressed-tensors checkpoint (loadable by vLLM and transformers).

Each quantized linear is stored as `ct_pack.py` describes (`pack-quantized`, or
`int-quantized` for schemes with input activations); config.json carries the
`quantization_config` that `ct_config.py` builds. Static schemes add per-tensor
scales beside the weights: `<name>.input_scale` (1,) per linear, and per attention
module `<attn>.k_scale` / `<attn>.v_scale` (1,), the scales the format defines
(INT8: max|x| / 127; `kv_format="fp8"`: max|x| / 448, the FP8 cache vLLM loads).

SpinQuant's online R4 (a block-diagonal Sylvester Hadamard, with no R3) is also written as the
config's `transform_config` plus its matrix (`ct_transform.py`), which vLLM applies.

Side files, each in a place no loader globs:
- `quantkit_kv_scales.st`: our runtime's per-channel INT8 KV scales and the
  outlier-residual statistics (safetensors bytes);
- `shadow/quantkit_shadow.safetensors`: quantized copies of the linears kept in
  FP16 (a mixed checkpoint), pack-quantized.

Everything else in the model's state dict (embeddings, norms, biases, ignored
linears, persistent buffers) is written unchanged, in its own dtype.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantkit.export.common import DEFAULT_SHARD_BYTES, ExportOptions, WritePlan, export_checkpoint
from quantkit.export.ct_config import (
    build_quantization_config,
    check_kv_format,
    ct_kv_args,
    module_groups,
)
from quantkit.export.ct_pack import compress_module, ct_layout
from quantkit.export.ct_transform import describable, transform_config, transform_tensors
from quantkit.export.vllm_compat import vllm_fusion_warnings
from quantkit.quant.model import QuantizedModel

FORMAT_NAME = "compressed-tensors"
KV_SCALES_NAME = "quantkit_kv_scales.st"
# In a subdirectory: vLLM globs *.safetensors at the top level when there is no index,
# and would trip over tensors of modules it loads unquantized.
SHADOW_FILE = "shadow/quantkit_shadow.safetensors"
# The shadow file holds pack-quantized compressed-tensors tensors, read back with this format's reader.
SHADOW_FORMAT = FORMAT_NAME
_FP8_MAX = 448.0  # float8_e4m3fn


def export_compressed_tensors(
    qmodel: QuantizedModel,
    out: Path,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    kv_format: str = "int8",
    float_modules: Sequence[str] = (),
) -> Path:
    """Write qmodel as a compressed-tensors checkpoint dir at `out`.

    Files: model.safetensors (or model-0000k-of-0000n.safetensors + index when the
    tensors exceed max_shard_bytes), config.json with quantization_config,
    generation_config.json (if the model has one), tokenizer files, the side files,
    then quantkit.json (hashes of all the others). Written atomically: a failure leaves
    nothing at `out` (and an existing `out` untouched). The model is not modified.
    kv_format and float_modules: see `plan_compressed_tensors`.

    Raises OutputExistsError for a non-empty `out` without overwrite, ValueError
    for modules that cannot be exported, ExportError for I/O failures.
    """
    check_kv_format(kv_format)
    return export_checkpoint(qmodel, out, format_name=FORMAT_NAME, plan=plan_compressed_tensors,
                             options=ExportOptions(kv_format, tuple(float_modules)), overwrite=overwrite,
                             max_shard_bytes=max_shard_bytes)


def plan_compressed_tensors(
    qmodel: QuantizedModel, quantized: dict[str, nn.Linear], ignore: list[str], options: ExportOptions
) -> WritePlan:
    """The compressed-tensors checkpoint of qmodel.

    options.kv_format: "int8" or "fp8" (the kv_cache_scheme vLLM loads), for schemes with a KV cache.
    options.float_modules: modules kept in high precision that are not nn.Linear here but that
    serving engines build as linears (MoE routers): listed in `ignore`. With them (an MoE
    model) a single-scheme checkpoint targets the class "Linear" rather than module names:
    vLLM looks a fused-MoE layer's scheme up under its own per-expert names
    (`experts.0.gate_proj`, also for Mixtral, whose checkpoint says w1), which only a
    class target matches.
    """
    kv_format = options.kv_format
    check_kv_format(kv_format)
    scheme = qmodel.recipe.scheme
    acts, kv = scheme.input_activations, scheme.kv_cache
    if acts is not None and any(qt.args.bits not in (4, 8) or qt.args.group_size is not None for qt in qmodel.modules.values()):
        raise ValueError("int-quantized export with input activations supports W8 or W4 per-channel weights only")
    fmt = "int-quantized" if acts is not None else "pack-quantized"
    groups = module_groups(qmodel.modules, acts)
    if options.float_modules:
        ignore = sorted({*ignore, *options.float_modules})
        if len(groups) == 1:
            groups = [(groups[0][0], ["Linear"])]
    qconfig = build_quantization_config(groups, ignore, ct_kv_args(kv, kv_format) if kv is not None else None)
    model_dtype = next(iter(quantized.values())).weight.dtype
    warnings = vllm_fusion_warnings({n: qt.args for n, qt in qmodel.modules.items()}, [*quantized, *ignore])
    online = qmodel.online_rotations
    in_config = describable(online)
    extra = _static_tensors(qmodel, kv_format, model_dtype)
    if in_config:  # R4 alone, block-diagonal Sylvester: vLLM applies it from the config
        qconfig["transform_config"] = transform_config(online, [*quantized, *ignore])
        extra.update(transform_tensors(online, model_dtype))

    def side_files(tmp: Path) -> dict[str, Any]:
        kv_file = _write_kv_side_file(qmodel, tmp)
        return {
            **_write_shadow(qmodel, tmp),
            "format_detail": fmt,
            "kv_format": kv_format if kv is not None else None,
            "kv_scales_file": KV_SCALES_NAME if kv_file else None,
        }

    return WritePlan(ct_layout(fmt), qconfig, warnings, extra_tensors=extra, side_files=side_files,
                     rotations_in_config=in_config)


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


def _write_shadow(qmodel: QuantizedModel, tmp: Path) -> dict[str, Any]:
    """Write the quantized copies of the FP16-kept linears (if any); returns the manifest keys for them."""
    shadow = getattr(qmodel, "shadow", None) or {}
    extra: dict[str, Any] = {}
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
