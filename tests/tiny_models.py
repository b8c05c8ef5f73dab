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


# What each family's tiny config sets beyond _TINY: the features that make it differ from Llama,
# switched on with values that matter at a few dozen tokens (short sliding windows, soft caps that bite).
_FAMILY = {
    "llama": {},
    "qwen2": {},
    "qwen3": dict(head_dim=16),
    "mistral": {},
    "phi3": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gemma2": dict(head_dim=16, sliding_window=8, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                   query_pre_attn_scalar=24, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gemma3_text": dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                        pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "olmo2": dict(attention_bias=True, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "granite": dict(embedding_multiplier=3.0, residual_multiplier=0.4, attention_multiplier=0.1,
                    logits_scaling=2.5, attention_bias=True, mlp_bias=True),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                      shared_expert_intermediate_size=128, mlp_only_layers=[1]),  # block 1: a dense MLP
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, head_dim=16, norm_topk_prob=True),
    "deepseek_v3": dict(num_key_value_heads=6, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                        moe_intermediate_size=64, first_k_dense_replace=1, q_lora_rank=64, kv_lora_rank=32,
                        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_group=2, topk_group=1,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2),  # block 0 dense
    # DeepSeek-V2-Lite's shape: no q compression (a plain q_proj)
    "deepseek_v2": dict(num_key_value_heads=6, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                        moe_intermediate_size=64, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=32,
                        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2),
}
FAMILIES = tuple(_FAMILY)  # every family a tiny model can be made of
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "deepseek_v2")
# The families quantkit's adapter table covers, beyond the Llama-like four.
NEW_FAMILIES = ("phi3", "gemma2", "gemma3_text", "olmo2", "granite")


def make_tiny_model(arch: str = "llama", seed: int = 0, dtype=torch.float32, randomize: bool = False, **overrides):
    """A small random causal LM of a supported family, eval mode (float32 unless asked).

    randomize: norms' weights and every bias drawn at random too (transformers starts them at
    1 / 0, which would hide a fold that forgets them)."""
    import transformers

    cfg = transformers.AutoConfig.for_model(arch, **{**_TINY, **_FAMILY[arch], **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    if randomize:
        randomize_norms_and_biases(model, seed)
    return model.eval()


@torch.no_grad()
def randomize_norms_and_biases(model, seed: int = 0) -> None:
    """Every 1-D parameter (norm weights, biases) drawn around its start value (a norm's weight
    around its identity value), seeded."""
    g = torch.Generator().manual_seed(seed + 1000)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            noise = torch.randn(p.shape, generator=g) * (0.3 if name.endswith("weight") else 0.1)
            p.add_(noise.to(p.dtype))


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


def rtn_checkpoint(model_dir, out, *args):
    """`quantkit rtn --model MODEL_DIR --out OUT ARGS` in-process, asserted to succeed; returns OUT."""
    code, text = run_cli("rtn", "--model", model_dir, "--out", out, *args)
    assert code == 0, text
    return out


def sigint_default() -> None:
    """preexec_fn for a child process that must receive Ctrl-C whatever the test run inherited (a run started
    in the background ignores SIGINT, and children inherit that)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def benchmark_script(name: str):
    """``benchmarks/<name>.py`` imported as a module (its helpers; nothing runs)."""
    import importlib
    import os
    import sys

    bench_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    if bench_dir not in sys.path:
        sys.path.insert(0, bench_dir)
    return importlib.import_module(name)
