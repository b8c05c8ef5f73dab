"""A quantkit checkpoint dir as a dense transformers model: quantized linears hold (q - zero) * scale.

This is the model `quantkit eval` scores (with run-time quantization simulated on top, see
`quantkit.runtime.simulate`); `quantkit.runtime` runs the packed weights instead.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from quantkit.export.formats import FORMAT_NAMES
from quantkit.export.manifest import read_manifest, verify_checkpoint
from quantkit.export.reader import CheckpointError, dense_state_dict
from quantkit.files import load_small_json


def checkpoint_config_dict(path: Path) -> dict:
    """The checkpoint dir's config.json as a dict; CheckpointError (one line) when it cannot be read or is not
    a JSON object (a pipe, a device or an endless file is refused before it is read: quantkit.files)."""
    p = Path(path) / "config.json"
    cfg = load_small_json(p, CheckpointError, "re-export the checkpoint")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{p} is not a JSON object; re-export the checkpoint")
    return cfg


def checkpoint_config(path: Path, cfg_dict: dict | None = None):
    """The transformers config of a checkpoint dir, without its quantization_config."""
    from transformers import AutoConfig

    cfg_dict = checkpoint_config_dict(path) if cfg_dict is None else dict(cfg_dict)
    cfg_dict.pop("quantization_config", None)
    return AutoConfig.for_model(**cfg_dict)


def checkpoint_dtype(cfg_dict: dict) -> torch.dtype:
    """The dtype the checkpoint's float tensors were written in (config's dtype; float32 if unset)."""
    return getattr(torch, str(cfg_dict.get("dtype") or cfg_dict.get("torch_dtype") or "float32"))


def verified_manifest(path: Path, verify: bool = True) -> dict:
    """The manifest of a quantkit checkpoint, after checking every file's sha256 (when `verify`)."""
    manifest = read_manifest(path)
    if verify:
        problems = verify_checkpoint(path)
        if problems:
            raise CheckpointError(f"{path} failed verification: {problems[0]}; do not use this checkpoint")
    fmt = manifest.get("format")
    if fmt not in FORMAT_NAMES:
        raise CheckpointError(f"{path} has format {fmt!r}; this reader loads {', '.join(FORMAT_NAMES)} checkpoints")
    return manifest


def empty_model(config, dtype: torch.dtype, device: str | torch.device = "cpu"):
    """The model skeleton, without spending time on random init (weights come next).

    device "meta": no storage at all (the runtime fills in what it keeps)."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from contextlib import nullcontext as no_init_weights
    from quantkit.models.adapter import ModelAdapter, UnsupportedModelError

    with no_init_weights(), torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    try:
        ModelAdapter.for_model(model)  # the layout the checkpoint was written in (MoE: one linear per expert)
    except UnsupportedModelError:
        pass  # the callers refuse (or do not need) a family without a table row
    return model


def load_into(model, state_dict: dict, path, *, assign: bool = False) -> None:
    """Load `state_dict` into `model` (tying lm_head to the embeddings when the config ties them); refuse
    tensors the model does not have and parameters the checkpoint lacks, naming the first of each.
    assign: the tensors replace the model's (a meta skeleton takes them as they are)."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=assign)
    if unexpected:
        raise CheckpointError(f"{path} holds tensors the model does not have, e.g. {unexpected[0]}")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing:
        raise CheckpointError(f"{path} is missing tensors, e.g. {missing[0]}")


def load_quantkit_checkpoint(path: str | Path, *, dtype: torch.dtype | None = None, verify: bool = True):
    """(model, tokenizer, manifest) from a quantkit checkpoint dir; model dense, eval mode, on CPU.

    verify: check every file's sha256 against the manifest first and refuse a mismatch.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    manifest = verified_manifest(path, verify)
    cfg_dict = checkpoint_config_dict(path)
    config = checkpoint_config(path, cfg_dict)
    if dtype is None:
        dtype = checkpoint_dtype(cfg_dict)
    sd = dense_state_dict(path, manifest["modules"], dtype, manifest["format"])
    model = empty_model(config, dtype)
    load_into(model, sd, path)
    model.eval()
    model.config.use_cache = False
    if manifest.get("online_rotations"):
        # The weights of a rotated W4A4KV4 model assume the R4 Hadamard on down_proj inputs.
        from quantkit.models.hooks import attach_online_rotations

        attach_online_rotations(model, manifest["online_rotations"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, manifest


def rebuild_buffers(model: nn.Module, device) -> None:
    """Non-persistent buffers are in no checkpoint: rebuild the modules that hold rotary tables (inv_freq) on
    `device`, and set scalar buffers a module also keeps as a number (Gemma's embed_scale)."""
    for name, mod in list(model.named_modules()):
        bufs = dict(mod.named_buffers(recurse=False))
        freqs = [b for k, b in bufs.items() if k.endswith("inv_freq")]  # Gemma 3: one table per layer type
        if freqs and any(b.device.type == "meta" or b.device != device for b in freqs):
            with torch.device(device):
                fresh = type(mod)(config=model.config)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, fresh)
            continue
        for k, b in bufs.items():  # a scalar the module also keeps as a number (Gemma's embed_scale)
            if b.device.type == "meta" and b.dim() == 0 and isinstance(getattr(mod, f"scalar_{k}", None), (int, float)):
                setattr(mod, k, torch.tensor(float(getattr(mod, f"scalar_{k}")), dtype=b.dtype, device=device))
