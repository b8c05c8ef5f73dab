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
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from quantkit.errors import UsageError
from quantkit.export.manifest import MANIFEST_NAME, read_manifest
from quantkit.quant.core import QuantizedTensor
from quantkit.quant.pack import unpack_int32
from quantkit.quant.static import StaticScales
from quantkit.recipe import QuantArgs

READABLE_FORMATS = ("compressed-tensors", "awq", "gptq")
# Tensors beside the weights that are not model parameters (read_static_scales returns them).
STATIC_SUFFIXES = ("input_scale", "k_scale", "v_scale")


class CheckpointError(UsageError):
    """The checkpoint dir is damaged or not one of ours."""


def is_quantkit_checkpoint(path: Path) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file() and (Path(path) / "config.json").is_file()


class CheckpointTensors:
    """Lazy access to the tensors of a checkpoint dir's top-level *.safetensors files.

    Every header is validated first (a clear one-line error for a damaged file); tensors
    are read one at a time, so the runtime can repack and place each module before the
    next is read. ``keys()`` lists every tensor name."""

    def __init__(self, path: Path, files: list[Path] | None = None):
        from quantkit.export.compressed_tensors import read_safetensors_header

        self.path = Path(path)
        files = sorted(self.path.glob("*.safetensors")) if files is None else files
        if not files:
            raise CheckpointError(f"{self.path} has no .safetensors files")
        self._file_of: dict[str, Path] = {}
        for f in files:
            for key in read_safetensors_header(f):
                self._file_of[key] = f
        self._open: dict[Path, Any] = {}

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def get(self, key: str) -> torch.Tensor:
        """The tensor `key` (CPU); KeyError if no file holds it."""
        from safetensors import safe_open

        f = self._file_of[key]
        h = self._open.get(f)
        if h is None:
            try:
                h = self._open[f] = safe_open(str(f), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error type for bad files
                raise CheckpointError(f"{f.name} in {self.path} is not a valid safetensors file ({e})") from e
        try:
            return h.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{f.name} in {self.path}: tensor {key} cannot be read ({e})") from e


# ----------------------------------------------------------------------------- one quantized linear


def read_ct(get: Callable[[str], torch.Tensor], name: str, args: QuantArgs) -> QuantizedTensor:
    """The canonical quantized tensor of module `name` from its compressed-tensors tensors."""
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


def _readers() -> dict[str, Callable[..., QuantizedTensor]]:
    from quantkit.export.awq import read_awq
    from quantkit.export.gptq import read_gptq

    return {"compressed-tensors": read_ct, "awq": read_awq, "gptq": read_gptq}


def read_module(tensors, name: str, args: QuantArgs, format: str) -> tuple[QuantizedTensor, list[str]]:
    """(canonical quantized tensor, the tensor names it was read from) of module `name`.

    tensors: anything with get(key) (CheckpointTensors, or a dict wrapped by the caller);
    format: the manifest's format (compressed-tensors, awq or gptq)."""
    used: list[str] = []

    def get(key: str) -> torch.Tensor:
        t = tensors.get(key) if not isinstance(tensors, dict) else tensors[key]
        used.append(key)
        return t

    reader = _readers().get(format)
    if reader is None:
        raise CheckpointError(f"format {format!r} is not one of {', '.join(READABLE_FORMATS)}")
    try:
        return reader(get, name, args), used
    except KeyError as e:
        raise CheckpointError(f"tensor {e.args[0]} is missing; the checkpoint is incomplete") from e


def dense_state_dict(
    path: Path, modules: dict[str, dict[str, Any]], dtype: torch.dtype, format: str = "compressed-tensors"
) -> dict[str, torch.Tensor]:
    """State dict with every quantized linear replaced by its dequantized `weight` (out, in).

    format: the manifest's format (compressed-tensors, awq or gptq) saying how the linears are stored.
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
        if key not in taken and key.rpartition(".")[2] not in STATIC_SUFFIXES:
            out[key] = tensors.get(key)
    return out


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
        for key, t in load((path / kv_file).read_bytes()).items():
            mod, _, local = key.rpartition(".")
            e = st.kv.setdefault(mod, {})
            e[local] = float(t.item()) if local.endswith("_mean_eps") else t.float()
    return st if (st.act or st.kv) else None
