"""Build a `RuntimeModel`: from a checkpoint dir (`load`), from a quantization run in memory
(`from_quantized`), or from a float model (`from_float`: the runtime's own BF16 path, same engine).

`load` verifies the manifest (every file's sha256), builds the transformers skeleton on the meta
device (no storage), and fills it one tensor at a time: each quantized linear is read in its
canonical form (`export.reader.read_module`: compressed-tensors pack-/int-quantized, AutoAWQ, GPTQ),
packed for its kernel on the target device and put in place as a `QuantLinear`; no dense copy of a
quantized weight is ever made. Sensitive linears of a mixed checkpoint (`--sensitive`) get their
FP16 weight plus the quantized shadow from `shadow/quantkit_shadow.safetensors`; everything else
(embeddings, norms, lm_head, linears kept in float) is loaded as stored, in the runtime dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from quantkit.errors import UsageError
from quantkit.models.checkpoint import rebuild_buffers
from quantkit.runtime.linear import QuantLinear
from quantkit.runtime.model import RuntimeModel, latent_cache_refusal


class RuntimeLoadError(UsageError):
    """The runtime cannot load this directory as asked."""


def resolve_runtime(device: str, dtype: str | torch.dtype | None, ckpt_dtype: torch.dtype = torch.float32):
    """(device, dtype): bf16 on CUDA unless asked (the kernels take fp16/bf16 activations), the
    checkpoint's own float dtype on CPU."""
    from quantkit.models.loading import resolve_device

    dev = torch.device(resolve_device(device))
    if isinstance(dtype, str):
        if dtype in ("auto", ""):
            dtype = None
        elif dtype in ("float16", "bfloat16", "float32"):
            dtype = getattr(torch, dtype)
        else:
            raise RuntimeLoadError(f"--dtype {dtype!r} is not one of auto, float16, bfloat16, float32")
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else ckpt_dtype
    if dev.type == "cuda" and dtype == torch.float32:
        raise RuntimeLoadError("the GPU kernels take float16 or bfloat16 activations; use --dtype bfloat16")
    return dev, dtype


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _kv_static_per_layer(model: nn.Module, static) -> list[dict] | None:
    """StaticScales.kv (keyed by attention module name) as a list per decoder layer."""
    if static is None or not static.kv:
        return None
    from quantkit.models.adapter import ModelAdapter

    ad = ModelAdapter.for_model(model)
    out = []
    for i in range(len(ad.blocks())):
        name = f"{ad.block_name(i)}.{ad.spec.attention}"
        if name not in static.kv:
            raise RuntimeLoadError(f"no KV cache scales for {name}; re-export the checkpoint")
        out.append(static.kv[name])
    return out


def _check_supported(config, online: dict | None = None) -> None:
    """The runtime runs the families whose adapter row has a BlockLayout; online: the checkpoint's online
    rotations (SpinQuant R3/R4), which latent attention has no place for."""
    from quantkit.errors import short_repr
    from quantkit.models.adapter import ARCH_SPECS, spec_for
    from quantkit.models.hooks import check_online_spec

    check_online_spec(online)  # a newer manifest's rotations would be applied wrongly

    mt = getattr(config, "model_type", None)
    runs = sorted(t for s in ARCH_SPECS if s.layout is not None for t in s.model_types)
    fix = "score this checkpoint with `quantkit eval --model DIR` without --runtime, or serve it with vLLM"
    if mt not in runs:
        why = next((f"{s.no_runtime}; " for s in ARCH_SPECS if mt in s.model_types and s.no_runtime), "")
        raise RuntimeLoadError(f"the runtime does not run model type {short_repr(mt)} yet ({why}it runs "
                               f"{', '.join(runs)}); {fix}")
    rope = getattr(config, "rope_parameters", None) or {}
    partial = getattr(config, "partial_rotary_factor", None) or (rope.get("partial_rotary_factor") if isinstance(rope, dict) else None)
    if partial not in (None, 1, 1.0):  # the fused RoPE kernel rotates whole heads
        raise RuntimeLoadError(f"the runtime does not run partial rotary embeddings yet (partial_rotary_factor={partial}); {fix}")
    if online and spec_for(mt).layout.latent is not None:
        # SpinQuant refuses these models (their adapter row has no rotation roles): a foreign manifest
        from quantkit.export.ct_transform import rotation_names

        rot = rotation_names(online)
        raise RuntimeLoadError(f"the runtime does not run online rotations ({rot}) with multi-head latent "
                               f"attention (model type {mt}); {fix}")


def load(path: str | Path, *, device: str = "auto", dtype=None, verify: bool = True,
         kv_residual: bool | None = None, kv_residual_slots: int | None = None,
         latent_cache: bool = False) -> RuntimeModel:
    """A RuntimeModel for a quantkit checkpoint dir (any format quantkit exports).

    device: "cpu", "cuda[:N]" or "auto"; dtype: activations/float weights (default bf16 on CUDA, the
    checkpoint's dtype on CPU); verify: check every file's sha256 first; kv_residual: override the
    checkpoint's KV outlier residuals (None: as exported); kv_residual_slots: residual pool slots per
    (sample, kv head) (None: max_len // 8); latent_cache: DeepSeek's multi-head latent attention caches its
    latent (kv_b absorbed) instead of K and V per head (weight-only checkpoints with a float KV cache)."""
    from transformers import AutoTokenizer

    from quantkit.export.reader import (CheckpointTensors, is_quantkit_checkpoint, not_a_parameter, read_module,
                                        read_static_scales)
    from quantkit.models.adapter import spec_for
    from quantkit.models.checkpoint import (checkpoint_config, checkpoint_config_dict, checkpoint_dtype, empty_model,
                                            load_into, verified_manifest)
    from quantkit.recipe import QuantArgs, Scheme

    path = Path(path)
    if not path.is_dir():
        raise RuntimeLoadError(f"{path} is not a directory; pass a checkpoint dir written by quantkit")
    if not is_quantkit_checkpoint(path):
        raise RuntimeLoadError(f"{path} is not a quantkit checkpoint (no quantkit.json); the runtime runs "
                               "checkpoints quantkit exported")
    manifest = verified_manifest(path, verify)
    cfg_dict = checkpoint_config_dict(path)
    config = checkpoint_config(path, cfg_dict)
    _check_supported(config, manifest.get("online_rotations"))
    dev, dt = resolve_runtime(device, dtype, checkpoint_dtype(cfg_dict))
    scheme = Scheme.from_dict(manifest["recipe"]["scheme"])
    act = scheme.input_activations
    if latent_cache:
        lat = spec_for(config.model_type).layout.latent
        refused = latent_cache_refusal(lat is not None, scheme.kv_cache, act, lat is not None and any(
            n.endswith(f".{lat.kv_b}") for n in (manifest.get("shadow") or {}).get("modules", {})))
        if refused:
            raise RuntimeLoadError(refused)
    fmt = manifest["format"]
    tensors = CheckpointTensors(path)
    static = read_static_scales(path, manifest)
    model = empty_model(config, dt, "meta")
    taken: set[str] = set()

    def take(key: str):
        if key in tensors:
            taken.add(key)
            return tensors.get(key)
        return None

    def act_scale(name):
        if act is None or act.dynamic:
            return None
        if static is None or name not in static.act:
            raise RuntimeLoadError(f"{path}: no static input scale for {name}; re-export the checkpoint")
        return static.act[name]

    for name, args_d in manifest["modules"].items():
        qt, used = read_module(tensors, name, QuantArgs.from_dict(args_d), fmt)
        taken.update(used)
        _set_module(model, name, QuantLinear.from_quantized(name, qt, bias=take(f"{name}.bias"), act=act,
                                                            act_scale=act_scale(name), device=dev, dtype=dt))
        del qt
    shadow = manifest.get("shadow")
    if shadow:
        _place_shadow(model, path, shadow, take, act, static, dev, dt)
    sd = {}
    for key in tensors.keys():
        if key in taken or not_a_parameter(key):
            continue
        t = tensors.get(key)
        sd[key] = t.to(dev, dt) if t.is_floating_point() else t.to(dev)
    load_into(model, sd, path, assign=True)
    rebuild_buffers(model, dev)
    _no_meta_left(model, path)
    model.eval()
    info = {"path": str(path), "format": fmt, "scheme": scheme.describe(), "source": manifest.get("source"),
            "sensitive": sorted((shadow or {}).get("modules", {}))}
    rt = RuntimeModel(model, device=dev, dtype=dt, kv=scheme.kv_cache, kv_static=_kv_static_per_layer(model, static),
                      kv_residual=kv_residual, online=manifest.get("online_rotations"), info=info,
                      kv_residual_slots=kv_residual_slots, latent_cache=latent_cache)
    rt.tokenizer = AutoTokenizer.from_pretrained(path)
    return rt


def _place_shadow(model: nn.Module, path: Path, shadow: dict, take, act, static, dev, dt) -> None:
    """The sensitive linears of a mixed checkpoint: each its FP16 weight (take(key) -> tensor or None)
    plus the quantized copy from the shadow file."""
    from quantkit.export.compressed_tensors import SHADOW_FORMAT
    from quantkit.export.reader import CheckpointTensors, read_module
    from quantkit.recipe import QuantArgs

    sh = CheckpointTensors(path, [path / shadow["file"]])
    for name, args_d in shadow["modules"].items():
        qt, _ = read_module(sh, name, QuantArgs.from_dict(args_d), SHADOW_FORMAT)
        w = take(f"{name}.weight")
        if w is None:
            raise RuntimeLoadError(f"{path}: the FP16 weight of sensitive linear {name} is missing")
        _set_module(model, name, QuantLinear.from_quantized(name, qt, bias=take(f"{name}.bias"), act=act,
                                                            act_scale=None if static is None else static.act.get(name),
                                                            w_fp16=w, device=dev, dtype=dt))


def _no_meta_left(model: nn.Module, where) -> None:
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type == "meta":
            raise RuntimeLoadError(f"{where}: tensor {n} was not loaded")


def from_quantized(qmodel, *, device: str = "auto", dtype=None, kv_residual: bool | None = None) -> RuntimeModel:
    """A RuntimeModel from a quantization run in memory (`api.quantize`'s QuantizedModel), without
    writing a checkpoint. Takes over `qmodel.model`: its quantized linears are replaced by
    QuantLinears (their dense weights dropped) and the rest moves to `device`."""
    model = qmodel.model
    dev, dt = resolve_runtime(device, dtype, next(model.parameters()).dtype)
    _check_supported(model.config, qmodel.online_rotations)
    scheme = qmodel.recipe.scheme
    act = scheme.input_activations
    static = qmodel.static_scales
    for name, qt in qmodel.modules.items():
        lin = model.get_submodule(name)
        s = None if act is None or act.dynamic else static.act[name]
        _set_module(model, name, QuantLinear.from_quantized(name, qt, bias=lin.bias, act=act, act_scale=s,
                                                            device=dev, dtype=dt))
        del lin
    for name, qt in (qmodel.shadow or {}).items():
        lin = model.get_submodule(name)
        s = None if (act is None or act.dynamic or static is None) else static.act.get(name)
        _set_module(model, name, QuantLinear.from_quantized(name, qt, bias=lin.bias, act=act, act_scale=s,
                                                            w_fp16=lin.weight.detach(), device=dev, dtype=dt))
    model.to(device=dev, dtype=dt)
    rebuild_buffers(model, dev)
    model.eval()
    info = {"path": None, "format": "in-memory", "scheme": scheme.describe(), "source": qmodel.source,
            "sensitive": sorted(qmodel.shadow or {})}
    rt = RuntimeModel(model, device=dev, dtype=dt, kv=scheme.kv_cache, kv_static=_kv_static_per_layer(model, static),
                      kv_residual=kv_residual, online=qmodel.online_rotations, info=info)
    rt.tokenizer = qmodel.tokenizer
    return rt


def from_float(model: nn.Module, *, device: str = "auto", dtype=None, tokenizer=None,
               latent_cache: bool = False) -> RuntimeModel:
    """The runtime's own float path for a transformers model (its BF16 baseline): the same engine,
    KV cache, decode kernel and CUDA graphs, with every decoder-block linear a dense QuantLinear
    (q/k/v and gate/up fused as in the quantized runs). Takes over `model`. latent_cache: as `load`'s."""
    from quantkit.models.adapter import ModelAdapter

    dev, dt = resolve_runtime(device, dtype, next(model.parameters()).dtype)
    _check_supported(model.config)
    model.to(device=dev, dtype=dt)
    for name, lin in ModelAdapter.for_model(model).all_linears().items():
        _set_module(model, name, QuantLinear.from_dense(name, lin.weight.detach(), lin.bias))
    rebuild_buffers(model, dev)
    model.eval()
    rt = RuntimeModel(model, device=dev, dtype=dt, latent_cache=latent_cache,
                      info={"path": None, "format": "float", "scheme": str(dt).replace("torch.", ""), "sensitive": []})
    rt.tokenizer = tokenizer
    return rt
