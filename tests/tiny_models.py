"""Tiny random models and a local tokenizer for tests (no hub access needed)."""

from __future__ import annotations

import torch

# hidden 96 and intermediate 160 are divisible by 32 but not by 64 or 128, so
# group-size handling is exercised; head_dim 16 with GQA where the family allows.
_TINY = dict(
    vocab_size=512,
    hidden_size=96,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def make_tiny_model(arch: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    """A small random causal LM of a supported family, eval mode (float32 unless asked)."""
    import transformers

    cfg_cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "mistral": transformers.MistralConfig,
    }[arch]
    kw = dict(_TINY)
    if arch == "qwen3":
        kw["head_dim"] = 16
    kw.update(overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg_cls(**kw), dtype=dtype)
    return model.eval()


def make_tiny_tokenizer():
    """A byte-level tokenizer built locally (no hub), vocab <= 512."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import pydoc_data.topics as topics

    text = list(topics.topics.values())[:40]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_tiny_model_dir(path, tokenizer, arch: str = "llama", seed: int = 11):
    """A tiny model + tokenizer saved as a local safetensors dir (what `--model DIR` loads); returns path."""
    make_tiny_model(arch, seed=seed).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def run_cli(*args):
    """Run the quantkit CLI in-process; (exit code, output)."""
    from typer.testing import CliRunner

    from quantkit.cli.app import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    return res.exit_code, res.output
