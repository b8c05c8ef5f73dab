"""Random-weight models of named shapes (used by the big-model benchmarks)."""

import pytest
import torch

from quantkit.errors import UsageError
from quantkit.models.random import SHAPES, random_model, shape_config


def test_random_model_is_seeded_and_has_working_rotary():
    kw = dict(num_hidden_layers=2, vocab_size=256, hidden_size=64, intermediate_size=128,
              num_attention_heads=4, num_key_value_heads=2, dtype=torch.float32)
    a = random_model("llama3-8b", seed=1, **kw)
    b = random_model("llama3-8b", seed=1, **kw)
    c = random_model("llama3-8b", seed=2, **kw)
    w = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], c.state_dict()[w])
    assert abs(a.state_dict()[w].std().item() - 0.02) < 0.002
    assert torch.all(a.model.layers[0].input_layernorm.weight == 1)
    # The rotary buffers were rebuilt, not left as uninitialized memory.
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    ref = LlamaRotaryEmbedding(config=a.config)
    assert torch.allclose(a.model.rotary_emb.inv_freq, ref.inv_freq)
    out = a(input_ids=torch.randint(0, 256, (2, 9))).logits
    assert out.shape == (2, 9, 256) and torch.isfinite(out).all()
    assert isinstance(a.config, LlamaConfig)


def test_shape_table_and_unknown_shape():
    cfg = shape_config("llama3-8b")
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (4096, 14336, 32)
    assert set(SHAPES) >= {"llama3-8b"}
    with pytest.raises(UsageError, match="unknown shape 'llama9'"):
        shape_config("llama9")
