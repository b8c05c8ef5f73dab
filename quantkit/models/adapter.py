"""Model knowledge as data: where the blocks, norms and linears of a family live.

One `ArchSpec` table row per layout. Llama, Qwen2, Qwen3 and Mistral share the
same layout in transformers, so one spec covers all four; a new family is a new
row, never an `isinstance` ladder.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from quantkit.errors import UsageError, short_repr


class UnsupportedModelError(UsageError):
    """The model's architecture has no adapter."""


@dataclass(frozen=True)
class ScaleGroup:
    """A producer (norm or linear) whose output feeds `consumers`: scales fold across it.

    Names are relative to a decoder block. `requires_equal_shapes` marks groups
    (v_proj -> o_proj) that only fold when head counts line up (not under GQA).
    `output_module` is the sub-block whose output a scale search scores (AWQ's
    loss): the attention or MLP module that contains the consumers.
    """

    producer: str
    consumers: tuple[str, ...]
    requires_equal_shapes: bool = False
    output_module: str = ""


@dataclass(frozen=True)
class RotationRoles:
    """Which block linears read and write the residual stream, for rotations (SpinQuant R1/R2/R4).

    reads_residual: take the (normed) residual stream as input (their inputs rotate by R1).
    writes_residual: add their output to it (their outputs rotate by R1).
    value / attn_out: the per-head pair R2 sits between (v_proj outputs, o_proj inputs).
    mlp_out: the linear whose input gets the online Hadamard R4 (down_proj).
    norms: (norm, the linears it feeds): norms folded into their consumers before rotating.
    """

    reads_residual: tuple[str, ...]
    writes_residual: tuple[str, ...]
    value: str
    attn_out: str
    mlp_out: str
    norms: tuple[tuple[str, tuple[str, ...]], ...]


@dataclass(frozen=True)
class BlockLayout:
    """Where each part of a decoder block lives, for the runtime, which runs the block itself.

    Names are relative to a block. q_norm / k_norm: per-head RMSNorms on Q and K before RoPE
    (Qwen3); the runtime uses them when the block has them.
    """

    input_norm: str
    post_norm: str
    q: str
    k: str
    v: str
    o: str
    gate: str
    up: str
    down: str
    q_norm: str | None = None
    k_norm: str | None = None

    @property
    def attention(self) -> str:
        """The attention module (the parent of q/k/v/o)."""
        return self.q.rsplit(".", 1)[0]


@dataclass(frozen=True)
class ArchSpec:
    model_types: tuple[str, ...]
    blocks: str
    embed: str
    final_norm: str
    rotary: str | None
    lm_head: str
    # Linear layers of a block in execution order, grouped into the steps that
    # see the same input (GPTQ's true-sequential order).
    sequential: tuple[tuple[str, ...], ...]
    scale_groups: tuple[ScaleGroup, ...]
    # Short op label for reports, keyed by relative linear name.
    ops: tuple[tuple[str, str], ...]
    rotation: RotationRoles | None = None
    layout: BlockLayout | None = None

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for step in self.sequential for name in step)

    @property
    def attention(self) -> str:
        """The attention module of a block (relative name): where K/V hooks attach."""
        if self.layout is not None:
            return self.layout.attention
        k_rel = next(r for r in self.linears if r.endswith("k_proj"))
        return k_rel.rsplit(".", 1)[0]


_LLAMA_LIKE = ArchSpec(
    model_types=("llama", "qwen2", "qwen3", "mistral"),
    blocks="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    rotary="model.rotary_emb",
    lm_head="lm_head",
    sequential=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    scale_groups=(
        ScaleGroup(
            "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), output_module="self_attn"
        ),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), requires_equal_shapes=True, output_module="self_attn"),
        ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), output_module="mlp"),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",), output_module="mlp"),
    ),
    ops=(
        ("self_attn.q_proj", "qkv_proj"),
        ("self_attn.k_proj", "qkv_proj"),
        ("self_attn.v_proj", "qkv_proj"),
        ("self_attn.o_proj", "o_proj"),
        ("mlp.gate_proj", "gate_up"),
        ("mlp.up_proj", "gate_up"),
        ("mlp.down_proj", "down_proj"),
    ),
    rotation=RotationRoles(
        reads_residual=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"),
        writes_residual=("self_attn.o_proj", "mlp.down_proj"),
        value="self_attn.v_proj",
        attn_out="self_attn.o_proj",
        mlp_out="mlp.down_proj",
        norms=(
            ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ),
    ),
    layout=BlockLayout(
        input_norm="input_layernorm",
        post_norm="post_attention_layernorm",
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        o="self_attn.o_proj",
        gate="mlp.gate_proj",
        up="mlp.up_proj",
        down="mlp.down_proj",
        q_norm="self_attn.q_norm",
        k_norm="self_attn.k_norm",
    ),
)

ARCH_SPECS: tuple[ArchSpec, ...] = (_LLAMA_LIKE,)


def head_dim_of(config) -> int:
    """Attention head size: the config's `head_dim` when it sets one (Qwen3), else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_windows(config) -> list[int | None]:
    """Per decoder layer, the sliding attention window in tokens (None = full attention).

    Follows transformers: with `layer_types`, the "sliding_attention" layers use `sliding_window`;
    without it, a set `sliding_window` applies to every layer (Mistral). A query at position i
    sees keys j with i - j < window."""
    n = config.num_hidden_layers
    w = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        return [w if t == "sliding_attention" else None for t in types]
    return [w] * n


def supported_model_types() -> list[str]:
    return sorted(t for spec in ARCH_SPECS for t in spec.model_types)


class ModelAdapter:
    """Finds a model's parts by the names in its `ArchSpec`."""

    def __init__(self, model: nn.Module, spec: ArchSpec):
        self.model = model
        self.spec = spec

    @classmethod
    def for_model(cls, model: nn.Module) -> "ModelAdapter":
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        for spec in ARCH_SPECS:
            if model_type in spec.model_types:
                return cls(model, spec)
        raise UnsupportedModelError(
            f"model type {short_repr(model_type)} is not supported yet; supported: {', '.join(supported_model_types())}"
        )

    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.spec.blocks)

    def block_name(self, index: int) -> str:
        return f"{self.spec.blocks}.{index}"

    def block_linears(self, index: int) -> dict[str, nn.Linear]:
        """Full module name -> linear, in execution order, for block `index`."""
        block = self.blocks()[index]
        prefix = self.block_name(index)
        return {f"{prefix}.{rel}": block.get_submodule(rel) for rel in self.spec.linears}

    def all_linears(self) -> dict[str, nn.Linear]:
        out: dict[str, nn.Linear] = {}
        for i in range(len(self.blocks())):
            out.update(self.block_linears(i))
        return out

    def op_of(self, rel_name: str) -> str:
        return dict(self.spec.ops)[rel_name]

    def embed(self) -> nn.Module:
        return self.model.get_submodule(self.spec.embed)

    def final_norm(self) -> nn.Module:
        return self.model.get_submodule(self.spec.final_norm)

    def rotary(self) -> nn.Module | None:
        if self.spec.rotary is None:
            return None
        try:
            return self.model.get_submodule(self.spec.rotary)
        except AttributeError:
            return None

    def lm_head(self) -> nn.Module:
        return self.model.get_submodule(self.spec.lm_head)
