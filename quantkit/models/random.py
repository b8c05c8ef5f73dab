"""Random-weight models of known shapes, for benchmarks of big models that cannot be downloaded here.

Weights are drawn N(0, 0.02) (norms 1), the same for a given seed; the model is
built on the meta device first, so nothing is initialized twice and an 8B model
takes seconds, not minutes.
"""

from __future__ import annotations

from typing import Any

from quantkit.errors import UsageError

# Llama-3 fields every size shares.
_LLAMA3 = dict(model_type="llama", num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
               max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)

# name -> transformers config fields (LlamaConfig-compatible).
SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32),
    # Planning only (`quantkit plan --shape llama3-70b`): 141 GB in BF16, never built here.
    "llama3-70b": dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64),
    "llama3-1b": dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      tie_word_embeddings=True),
    # A small Llama for quick checks of the benchmarks themselves.
    "tiny": dict(
        model_type="llama",
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=4096,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
}


def shape_config(shape: str, **overrides: Any):
    """A transformers config for a named shape (overrides e.g. num_hidden_layers=2)."""
    from transformers import AutoConfig

    if shape not in SHAPES:
        raise UsageError(f"unknown shape {shape!r}; known: {', '.join(sorted(SHAPES))}")
    fields = dict(SHAPES[shape], **overrides)
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields)


def random_model(shape: str, *, dtype=None, device="cpu", seed: int = 0, **overrides: Any):
    """A causal LM of `shape` with seeded random weights, on `device` in `dtype` (default bf16)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.bfloat16
    config = shape_config(shape, **overrides)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
        # Non-persistent buffers (rotary inv_freq) were never materialized: rebuild them.
        for module in model.modules():
            if "inv_freq" in dict(module.named_buffers(recurse=False)):
                with torch.device(device):
                    fresh = type(module)(config=model.config)
                for bname, buf in fresh.named_buffers(recurse=False):
                    setattr(module, bname, buf)
                module.attention_scaling = getattr(fresh, "attention_scaling", 1.0)
    model.eval()
    return model
