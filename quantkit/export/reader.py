"""Read a quantkit checkpoint dir back: each quantized linear in its canonical form, the rest as stored.

Why our own reader when transformers + compressed-tensors can load the dir:
it needs no extra package, it checks the manifest first, and it handles every
layout we write (asymmetric zero points and several config groups included,
which transformers 5.23 + compressed-tensors 0.20 mis-load; see
tests/test_export.py).

Two consumers: `dense_state_dict` (quantized linears as (q - zero) * scale in the model
dtype: the exact model that was evaluated before export; `quantkit.models.checkpoint`
builds a transformers model from it) and the runtime (`quantkit.runtime`), which takes
`read_module` and repacks the canonical integers for its kernels without a dense copy.
How each format stores one linear is its registry entry's `read` (export/formats.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from quantkit.export.checkpoint_tensors import CheckpointError, CheckpointTensors
from quantkit.export.formats import DEFAULT_FORMAT, FORMAT_NAMES, FORMATS
from quantkit.export.ct_transform import is_transform_tensor
from quantkit.export.manifest import MANIFEST_NAME, read_manifest
from quantkit.quant.core import QuantizedTensor
from quantkit.quant.static import StaticScales
from quantkit.recipe import QuantArgs

__all__ = ["CheckpointError", "CheckpointTensors", "STATIC_SUFFIXES", "dense_state_dict", "is_quantkit_checkpoint",
           "not_a_parameter", "read_module", "read_static_scales"]

# Tensors beside the weights that are not model parameters (read_static_scales returns them).
STATIC_SUFFIXES = ("input_scale", "k_scale", "v_scale")


def not_a_parameter(key: str) -> bool:
    """A checkpoint tensor that no model parameter takes: static scales (read_static_scales) and the
    transform matrices other engines read (the online rotations come from the manifest)."""
    return key.rpartition(".")[2] in STATIC_SUFFIXES or is_transform_tensor(key)


def is_quantkit_checkpoint(path: Path) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file() and (Path(path) / "config.json").is_file()


def read_module(tensors, name: str, args: QuantArgs, format: str) -> tuple[QuantizedTensor, list[str]]:
    """(canonical quantized tensor, the tensor names it was read from) of module `name`.

    tensors: anything with get(key) (CheckpointTensors, or a dict wrapped by the caller);
    format: the manifest's format (a name in formats.FORMATS)."""
    used: list[str] = []

    def get(key: str) -> torch.Tensor:
        t = tensors.get(key) if not isinstance(tensors, dict) else tensors[key]
        used.append(key)
        return t

    fmt = FORMATS.get(format)
    if fmt is None:
        raise CheckpointError(f"format {format!r} is not one of {', '.join(FORMAT_NAMES)}")
    try:
        return fmt.read(get, name, args), used
    except KeyError as e:
        raise CheckpointError(f"tensor {e.args[0]} is missing; the checkpoint is incomplete") from e


def dense_state_dict(
    path: Path, modules: dict[str, dict[str, Any]], dtype: torch.dtype, format: str = DEFAULT_FORMAT
) -> dict[str, torch.Tensor]:
    """State dict with every quantized linear replaced by its dequantized `weight` (out, in).

    format: the manifest's format (a name in formats.FORMATS) saying how the linears are stored.
    """
    tensors = CheckpointTensors(path)
    taken: set[str] = set()
    out: dict[str, torch.Tensor] = {}
    for name, args_d in modules.items():
        try:
            qt, used = read_module(tensors, name, QuantArgs.from_dict(args_d), format)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from e
        taken.update(used)
        # Multiply in float32 from the stored scale, then round once: same as the exporter's model.
        out[f"{name}.weight"] = qt.dequantize(torch.float32).to(dtype)
    for key in tensors.keys():
        if key not in taken and not not_a_parameter(key):
            out[key] = tensors.get(key)
    return out


def _kv_side_file(path: Path, name: Any) -> bytes:
    """The bytes of the KV side file quantkit.json names: a plain file name inside the checkpoint dir (never a
    path out of it), a regular file of sensible size."""
    from quantkit.errors import short_repr
    from quantkit.files import read_small_bytes

    if not isinstance(name, str) or name != Path(name).name or name in (".", ".."):
        raise CheckpointError(f"quantkit.json names kv_scales_file {short_repr(name, 80)}, not a file of {path}; "
                              "re-export the checkpoint")
    try:
        return read_small_bytes(path / name)
    except OSError as e:
        raise CheckpointError(f"{path / name} cannot be read ({(e.strerror or str(e)).lower()}); "
                              "re-export the checkpoint") from e


def read_static_scales(path: str | Path, manifest: dict[str, Any] | None = None) -> StaticScales | None:
    """StaticScales stored in a checkpoint, or None when it has none.

    act: from `<linear>.input_scale`; kv: our per-channel INT8 scales and residual
    statistics from the KV side file (the config's per-tensor k_scale/v_scale are for other loaders).
    """
    from safetensors.torch import load

    path = Path(path)
    manifest = read_manifest(path) if manifest is None else manifest
    st = StaticScales()
    tensors = CheckpointTensors(path)
    for key in tensors.keys():
        mod, _, local = key.rpartition(".")
        if local == "input_scale":
            st.act[mod] = tensors.get(key).float().reshape(1)
    kv_file = manifest.get("kv_scales_file")
    if kv_file:
        for key, t in load(_kv_side_file(path, kv_file)).items():
            mod, _, local = key.rpartition(".")
            e = st.kv.setdefault(mod, {})
            e[local] = float(t.item()) if local.endswith("_mean_eps") else t.float()
    return st if (st.act or st.kv) else None
