"""Load a quantkit checkpoint dir back into a dense (dequantized) transformers model.

Why our own reader when transformers + compressed-tensors can load the dir:
it needs no extra package, it checks the manifest first, and it handles every
layout we write (asymmetric zero points and several config groups included,
which transformers 5.23 + compressed-tensors 0.20 mis-load; see
tests/test_export.py). The result is the exact model that was evaluated
before export: quantized linears hold (q - zero) * scale in the model dtype.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from quantkit.errors import UsageError
from quantkit.export.manifest import MANIFEST_NAME, read_manifest, verify_checkpoint
from quantkit.quant.core import dequantize
from quantkit.quant.pack import unpack_int32
from quantkit.recipe import QuantArgs


READABLE_FORMATS = ("compressed-tensors", "awq", "gptq")


class CheckpointError(UsageError):
    """The checkpoint dir is damaged or not one of ours."""


def is_quantkit_checkpoint(path: Path) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file() and (Path(path) / "config.json").is_file()


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no .safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    from quantkit.export.compressed_tensors import read_safetensors_header

    for f in files:
        read_safetensors_header(f)  # a clear error for a damaged header, before safetensors parses it
        try:
            tensors.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error type for bad headers
            raise CheckpointError(f"{f.name} in {path} is not a valid safetensors file ({e})") from e
    return tensors


def dense_state_dict(
    path: Path, modules: dict[str, dict[str, Any]], dtype: torch.dtype, format: str = "compressed-tensors"
) -> dict[str, torch.Tensor]:
    """State dict with every quantized linear replaced by its dequantized `weight` (out, in).

    format: the manifest's format (compressed-tensors, awq or gptq) saying how the linears are stored.
    """
    tensors = _load_tensors(path)
    out: dict[str, torch.Tensor] = {}
    for name, args_d in modules.items():
        args = QuantArgs.from_dict(args_d)
        try:
            if format == "awq":
                from quantkit.export.awq import dense_from_awq

                w = dense_from_awq(tensors, name, args)
            elif format == "gptq":
                from quantkit.export.gptq import dense_from_gptq

                w = dense_from_gptq(tensors, name, args)
            else:
                w = _dense_from_ct(tensors, name, args, path)
        except KeyError as e:
            raise CheckpointError(f"{path}: tensor {e.args[0]} is missing; the checkpoint is incomplete") from e
        # Multiply in float32 from the stored scale, then round once: same as the exporter's model.
        out[f"{name}.weight"] = w.to(dtype)
    # Static activation / KV scales are not model parameters: read_static_scales returns them.
    out.update({k: v for k, v in tensors.items() if k.rpartition(".")[2] not in _STATIC_SUFFIXES})
    return out


def _dense_from_ct(tensors: dict[str, torch.Tensor], name: str, args: QuantArgs, path) -> torch.Tensor:
    scale = tensors.pop(f"{name}.weight_scale")
    zp = tensors.pop(f"{name}.weight_zero_point", None)
    if f"{name}.weight_packed" in tensors:  # pack-quantized
        shape = tuple(int(x) for x in tensors.pop(f"{name}.weight_shape").tolist())
        q = unpack_int32(tensors.pop(f"{name}.weight_packed"), args.bits, shape, dim=1)
        zero = None if zp is None else unpack_int32(zp, args.bits, (shape[0], scale.shape[1]), dim=0)
    else:  # int-quantized (W8A8): plain int8 weight
        q = tensors.pop(f"{name}.weight")
        if q.dtype != torch.int8:
            raise CheckpointError(f"{path}: {name}.weight is {q.dtype}, expected int8 (int-quantized)")
        zero = zp
    return dequantize(q, scale.float(), zero, args)


_STATIC_SUFFIXES = ("input_scale", "k_scale", "v_scale")


def read_static_scales(path: str | Path, manifest: dict[str, Any] | None = None):
    """StaticScales (quantkit.quant.simulate) stored in a checkpoint, or None when it has none.

    act: from `<linear>.input_scale`; kv: our per-channel INT8 scales and residual
    statistics from the KV side file (the config's per-tensor k_scale/v_scale are for other loaders).
    """
    from safetensors.torch import load

    from quantkit.quant.simulate import StaticScales

    path = Path(path)
    manifest = read_manifest(path) if manifest is None else manifest
    st = StaticScales()
    for key, t in _load_tensors(path).items():
        mod, _, local = key.rpartition(".")
        if local == "input_scale":
            st.act[mod] = t.float().reshape(1)
    kv_file = manifest.get("kv_scales_file")
    if kv_file:
        for key, t in load((path / kv_file).read_bytes()).items():
            mod, _, local = key.rpartition(".")
            e = st.kv.setdefault(mod, {})
            e[local] = float(t.item()) if local.endswith("_mean_eps") else t.float()
    return st if (st.act or st.kv) else None


def _empty_model(config, dtype: torch.dtype):
    """The model skeleton on CPU, without spending time on random init (weights come next)."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def load_quantkit_checkpoint(path: str | Path, *, dtype: torch.dtype | None = None, verify: bool = True):
    """(model, tokenizer, manifest) from a quantkit checkpoint dir; model dense, eval mode, on CPU.

    verify: check every file's sha256 against the manifest first and refuse a mismatch.
    """
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        problems = verify_checkpoint(path)
        if problems:
            raise CheckpointError(f"{path} failed verification: {problems[0]}; do not use this checkpoint")
    fmt = manifest.get("format")
    if fmt not in READABLE_FORMATS:
        raise CheckpointError(f"{path} has format {fmt!r}; this reader loads {', '.join(READABLE_FORMATS)} checkpoints")
    cfg_dict = json.loads((path / "config.json").read_text())
    cfg_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**cfg_dict)
    if dtype is None:
        dtype = getattr(torch, str(cfg_dict.get("dtype") or cfg_dict.get("torch_dtype") or "float32"))
    sd = dense_state_dict(path, manifest["modules"], dtype, fmt)
    model = _empty_model(config, dtype)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected:
        raise CheckpointError(f"{path} holds tensors the model does not have, e.g. {unexpected[0]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing:
        raise CheckpointError(f"{path} is missing tensors, e.g. {missing[0]}")
    model.eval()
    model.config.use_cache = False
    if manifest.get("online_rotations"):
        # The weights of a rotated W4A4KV4 model assume the R4 Hadamard on down_proj inputs.
        from quantkit.quant.simulate import attach_online_rotations

        attach_online_rotations(model, manifest["online_rotations"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, manifest
