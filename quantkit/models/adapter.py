"""Model knowledge as data: where the blocks, norms and linears of a family live.

One `ArchSpec` table row per layout. Llama, Qwen2, Qwen3 and Mistral share the
same layout in transformers (Qwen2's and Qwen3's rows differ only in the q/k/v bias
and the q/k norms the memory plan counts); Granite differs from it only by scalar
multipliers (nothing a method folds or rotates changes). Phi-3/Phi-4
(fused qkv_proj / gate_up_proj), Gemma 2/3 ((1 + w) norms, norms after each
sub-block), OLMo 2 (norms only after the sub-blocks) and the mixture-of-experts
families (Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3: `ExpertsSpec`, names with `*`
repeated per expert) are rows of their own. A new family is a new row, never an
`isinstance` ladder.

Each row also lists its linears' sizes as expressions over the config (`LinearShape`), so
the memory plan and the weight-shape checks read a model's layout from its config alone.
This module imports only `quantkit.errors` (torch only for type hints): any floor above errors can read it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from quantkit.errors import UsageError, short_repr

if TYPE_CHECKING:
    from torch import nn


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
    # The producer's rows that feed the consumers, when the producer is a fused linear:
    # a part name of `ArchSpec.fused` (Phi-3: the "v" rows of qkv_proj feed o_proj).
    producer_part: str | None = None
    # Non-empty: there is nothing in front of the consumers to fold a scale into, and why
    # (OLMo 2: q/k/v read the raw residual stream). Methods skip the group and record this.
    unfoldable: str = ""
    # Modules that read the producer's output too but are not quantized (an MoE router): their
    # weight's input columns absorb the scales as well, so their function is unchanged.
    also_scales: tuple[str, ...] = ()


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
    # The part of `value` that holds V, when it is a fused linear (Phi-3: "v" of qkv_proj).
    value_part: str | None = None


@dataclass(frozen=True)
class LatentAttention:
    """Multi-head latent attention (DeepSeek-V2/V3), for the runtime. Names are relative to a block;
    sizes are the config fields named here.

    q = q_proj(h) when the config leaves `q_lora_rank` unset, else q_b(q_a_norm(q_a(h))): per head a
    "nope" part and a RoPE part. kv_a(h) = (latent [kv_lora_rank], k_pe [qk_rope_head_dim]);
    kv_b(kv_a_norm(latent)) = per head (k_nope, v). k_pe is one head shared by every query head.
    rope_interleave: the config field that says whether RoPE rotates interleaved pairs (x0, x1), (x2, x3)
    (unset: it does, DeepSeek-V2 always) or the two halves (rotate_half).
    pairs_out: where the rotated pairs go: back in place (V2's complex product) or the first elements of
    the pairs then the second ones (V3). q . k is the same either way; K's channel order is not, and per
    channel KV-cache scales are calibrated in the model's own order."""

    q: str = "self_attn.q_proj"
    q_a: str = "self_attn.q_a_proj"
    q_a_norm: str = "self_attn.q_a_layernorm"
    q_b: str = "self_attn.q_b_proj"
    kv_a: str = "self_attn.kv_a_proj_with_mqa"
    kv_a_norm: str = "self_attn.kv_a_layernorm"
    kv_b: str = "self_attn.kv_b_proj"
    q_lora_rank: str = "q_lora_rank"
    kv_lora_rank: str = "kv_lora_rank"
    nope_dim: str = "qk_nope_head_dim"
    rope_dim: str = "qk_rope_head_dim"
    v_dim: str = "v_head_dim"
    rope_interleave: str = "rope_interleave"
    pairs_out: str = "halves"  # or "in place"


@dataclass(frozen=True)
class BlockLayout:
    """Where each part of a decoder block lives, for the runtime, which runs the block itself.

    Names are relative to a block. q_norm / k_norm: per-head RMSNorms on Q and K before RoPE
    (Qwen3); the runtime uses them when the block has them. input_norm / post_norm: the norms in
    front of attention and of the MLP (None: there is none, OLMo 2); attn_out_norm / mlp_out_norm:
    norms of the sub-blocks' outputs before the residual add (OLMo 2).
    """

    input_norm: str | None
    post_norm: str | None
    q: str
    k: str
    v: str
    o: str
    gate: str
    up: str
    down: str
    q_norm: str | None = None
    k_norm: str | None = None
    # Config fields of scalar multipliers (Granite); unset or absent = 1. The attention scale is
    # read from the attention module (`scaling`), which Granite sets from attention_multiplier.
    embed_multiplier: str | None = None  # the embeddings are multiplied by it
    residual_multiplier: str | None = None  # each sub-block's output, before the residual add
    logits_divisor: str | None = None  # the LM head's output is divided by it
    attn_out_norm: str | None = None
    mlp_out_norm: str | None = None
    qk_norm_whole: bool = False  # q_norm / k_norm span all heads at once (OLMo 2), not one head
    final_softcap: str | None = None  # config field: logits -> tanh(logits / c) * c (Gemma)
    attn_softcap: str | None = None  # config field: attention scores -> tanh(s / c) * c (Gemma 2)
    # Set: the attention is latent (DeepSeek); q / k / v then name its query and kv input linears
    latent: LatentAttention | None = None

    @property
    def attention(self) -> str:
        """The attention module (the parent of q/k/v/o)."""
        return self.q.rsplit(".", 1)[0]


@dataclass(frozen=True)
class ExpertsSpec:
    """A sparse mixture-of-experts MLP: where its experts live and what the checkpoint calls them.

    Names in the ArchSpec that contain `*` (steps, scale groups, ops) repeat once per expert.
    path: the experts' module in a block, as named in memory and on disk (`mlp.experts`,
        Mixtral's `block_sparse_moe.experts`); transformers 5 keeps a fused 3-D experts module
        there, which the adapter swaps for per-expert linears (`quantkit.models.moe`).
    count: the config fields that may hold the number of experts (the first one set wins: configs
        on disk and transformers' attribute maps spell it differently).
    names: the (gate, up, down) linears of one expert as the checkpoint names them.
    router: the router module (kept in high precision: it is not a linear of the table).
    moe_module: (attribute in transformers, name in checkpoints) when they differ (Mixtral).
    shared / shared_gate: the shared expert every token goes through (a gate/up/down MLP) and its
        1-output gate, sigmoid(gate(x)) scaling the shared expert's output (Qwen2-MoE); None: absent.
    """

    path: str
    count: tuple[str, ...]
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    router: str = "mlp.gate"
    moe_module: tuple[str, str] | None = None
    # config fields of one expert's intermediate size and of the shared expert's (None: no shared expert;
    # a tuple: the product of those fields, DeepSeek's moe_intermediate_size x n_shared_experts)
    intermediate: str = "intermediate_size"
    shared_intermediate: str | tuple[str, ...] | None = None
    # config field naming the blocks that keep a dense MLP: a count of first blocks, or a list of indices
    dense_blocks: str | None = None
    shared: str | None = None
    shared_gate: str | None = None


@dataclass(frozen=True)
class LinearShape:
    """One linear of a block with its size from the config alone (the memory plan, the shape checks).

    out / in_: size expressions: terms joined by "+", each a product ("*") of names; a name is one of
    "hidden", "q" (heads x head_dim), "kv" (kv heads x head_dim), "intermediate", "expert" (one expert's
    intermediate size), "shared" (the shared experts' together) or a config field (DeepSeek's kv_lora_rank).
    A name the config leaves unset (or 0) means the linear is absent (DeepSeek-V2-Lite has no q_a_proj).
    only: "dense" / "moe": the linear exists only in blocks with a dense MLP / a mixture of experts.
    unless: a config field that, when set, means the linear is absent (DeepSeek's q_proj vs q_lora_rank).
    """

    name: str
    out: str
    in_: str
    only: str = ""
    unless: str | None = None


# Largest size any config field may set (no real model has a dimension or a layer count near it).
SIZE_LIMIT = 10_000_000

# Linears that vLLM fuses into one layer (fused name -> members' leaf names): the members must share one
# scheme and precision (all quantized alike, or all kept in high precision) or vLLM refuses the checkpoint.
VLLM_FUSED: dict[str, tuple[str, ...]] = {"qkv_proj": ("q_proj", "k_proj", "v_proj"),
                                          "gate_up_proj": ("gate_proj", "up_proj")}


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
    # Why the rotation table is missing, when it is (SpinQuant's refusal line).
    no_rotation: str = ""
    # Why the runtime has no block layout for this row, when it has none (the runtime's refusal line).
    no_runtime: str = ""
    # The attention module of a block (relative name): where K/V hooks attach.
    attention: str = "self_attn"
    # Norms scale by (offset + weight): 0 for the usual RMSNorm, 1 for Gemma's (1 + w).
    norm_offset: float = 0.0
    # Fused linears: relative name -> its parts in row order, each (part name, size key);
    # size keys: "q" (heads x head_dim), "kv" (kv heads x head_dim), "intermediate".
    fused: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    # Linears whose outputs go through softmax(q k^T): AWQ does not clip them.
    no_clip: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")
    # A sparse MoE MLP (Mixtral, Qwen2/3-MoE); names with `*` repeat per expert (see `for_config`).
    experts: ExpertsSpec | None = None
    # Every linear of `sequential` with its size from the config (see `linear_shapes`).
    shapes: tuple[LinearShape, ...] = ()
    # q/k/v carry a bias unless the config's attention_bias says otherwise (Qwen2 has no such field).
    qkv_bias: bool = False
    # Per-head RMSNorms on q and k (Qwen3), counted by the memory plan.
    qk_norm: bool = False

    def for_config(self, config) -> "ArchSpec":
        """This row with every `*` expanded to the config's experts: a true-sequential step or
        scale group per expert (experts see different tokens, so none shares a Hessian or a scale)."""
        if self.experts is None:
            return self
        n = expert_count(self.experts, config)

        def names(t: tuple[str, ...]) -> list[tuple[str, ...]]:
            if not any("*" in x for x in t):
                return [t]
            return [tuple(x.replace("*", str(e)) for x in t) for e in range(n)]

        groups = []
        for g in self.scale_groups:
            if "*" in g.producer:  # a group per expert (its up -> down)
                groups += [replace(g, producer=g.producer.replace("*", str(e)),
                                   consumers=tuple(c.replace("*", str(e)) for c in g.consumers)) for e in range(n)]
            else:  # one group whose consumers are every expert's (the MoE input feeds them all)
                plain = tuple(c for c in g.consumers if "*" not in c)
                per = tuple(c.replace("*", str(e)) for e in range(n) for c in g.consumers if "*" in c)
                groups.append(replace(g, consumers=plain + per))
        return replace(
            self,
            sequential=tuple(s for step in self.sequential for s in names(step)),
            scale_groups=tuple(groups),
            ops=tuple((r.replace("*", str(e)), op) for r, op in self.ops for e in (range(n) if "*" in r else [0])),
        )

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for step in self.sequential for name in step)

    def part_rows(self, rel: str, part: str, config) -> slice:
        """The rows of `part` in the fused linear `rel` (e.g. "v" of self_attn.qkv_proj)."""
        start = 0
        for name, key in dict(self.fused)[rel]:
            n = self.size(key, config)
            if name == part:
                return slice(start, start + n)
            start += n
        raise KeyError(f"{rel} has no part {part!r}")

    def size(self, expr: str, config) -> int | None:
        """The value of a size expression of `LinearShape` for a config (object or dict); None when
        a name in it is unset. ValueError names a config field that is not a sensible size."""
        total = 0
        for term in expr.split("+"):
            prod = 1
            for name in term.split("*"):
                v = self._named_size(name.strip(), config)
                if v is None:
                    return None
                prod *= v
            total += prod
        return total

    def _named_size(self, name: str, config) -> int | None:
        if name == "hidden":
            return config_size(config, "hidden_size")
        if name in ("q", "kv"):
            heads = config_size(config, "num_attention_heads")
            if name == "kv":
                heads = config_size(config, "num_key_value_heads") or heads
            if not heads or not config_size(config, "hidden_size"):
                return None
            hd = head_dim_of(config)
            if isinstance(hd, bool) or not isinstance(hd, int) or not 0 < hd <= SIZE_LIMIT:
                raise ValueError(f"field head_dim={short_repr(hd, 40)} is not a sensible size")
            return heads * hd
        if name in ("expert", "shared") and self.experts is not None:
            keys = self.experts.intermediate if name == "expert" else self.experts.shared_intermediate
            if keys is None:
                return None
            out = 1
            for k in (keys,) if isinstance(keys, str) else keys:
                v = config_size(config, k)
                if v is None:
                    return None
                out *= v
            return out
        return config_size(config, "intermediate_size" if name == "intermediate" else name)

    def linear_shapes(self, config, only: str | None = None, experts: int | None = None) -> dict[str, tuple[int, int]]:
        """Relative name -> (out_features, in_features) of a block's linears, from the config alone.

        only: "dense" / "moe": the linears of that kind of block (an MoE row lists both kinds; a
        dense row's MLP linears count as "dense"); None: every linear the config implies.
        `*` repeats per expert: `experts` of them (default: the config's count)."""
        n = experts
        if n is None and self.experts is not None:
            n = expert_count(self.experts, config) or 0
        out: dict[str, tuple[int, int]] = {}
        for ls in self.shapes:
            if only is not None and ls.only and ls.only != only:
                continue
            if ls.unless is not None and config_value(config, ls.unless) is not None:
                continue
            o, i = self.size(ls.out, config), self.size(ls.in_, config)
            if not o or not i:
                continue  # the config says this linear is absent
            for e in range(n) if "*" in ls.name else (None,):
                out[ls.name if e is None else ls.name.replace("*", str(e))] = (o, i)
        return out

    def dense_block_count(self, config) -> int:
        """How many blocks of an MoE model keep a dense MLP (the config names them: a count of first
        blocks, or a list of indices); 0 for a dense row."""
        if self.experts is None or self.experts.dense_blocks is None:
            return 0
        v = config_value(config, self.experts.dense_blocks)
        if isinstance(v, (list, tuple)):
            return len(v)
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


_ATTN_SHAPES = (LinearShape("self_attn.q_proj", "q", "hidden"), LinearShape("self_attn.k_proj", "kv", "hidden"),
                LinearShape("self_attn.v_proj", "kv", "hidden"), LinearShape("self_attn.o_proj", "hidden", "q"))
_MLP_SHAPES = (LinearShape("mlp.gate_proj", "intermediate", "hidden", only="dense"),
               LinearShape("mlp.up_proj", "intermediate", "hidden", only="dense"),
               LinearShape("mlp.down_proj", "hidden", "intermediate", only="dense"))

_LLAMA_LIKE = ArchSpec(
    model_types=("llama", "mistral"),
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
    shapes=_ATTN_SHAPES + _MLP_SHAPES,
)
# Qwen2 / Qwen3: the Llama layout; Qwen2's q/k/v always carry a bias, Qwen3 norms q and k per head.
_QWEN2 = replace(_LLAMA_LIKE, model_types=("qwen2",), qkv_bias=True)
_QWEN3 = replace(_LLAMA_LIKE, model_types=("qwen3",), qk_norm=True)

# Granite = Llama + scalar multipliers (embedding, residual, attention, logits): every fold and
# rotation is exact through a scalar; the runtime applies them from the layout's config fields.
_GRANITE = replace(_LLAMA_LIKE, model_types=("granite",), layout=replace(
    _LLAMA_LIKE.layout, embed_multiplier="embedding_multiplier", residual_multiplier="residual_multiplier",
    logits_divisor="logits_scaling"))

_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
_POST_NORMS = ("it normalizes each sub-block's output with a per-channel weight before adding it to the residual "
               "stream (post_attention_layernorm, post_feedforward_layernorm), which a residual rotation (R1) "
               "does not pass through")

# Gemma 2 / Gemma 3 (text): (1 + w) RMSNorms, an extra norm after attention and around the MLP
# (pre_feedforward_layernorm feeds gate/up), GELU-tanh MLP; soft-capping, scaled embeddings and
# sliding windows live outside the linears and the norms the methods fold into.
_GEMMA = replace(
    _LLAMA_LIKE,
    model_types=("gemma2", "gemma3_text"),
    scale_groups=(
        ScaleGroup("input_layernorm", _ATTN, output_module="self_attn"),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), requires_equal_shapes=True, output_module="self_attn"),
        ScaleGroup("pre_feedforward_layernorm", _GATE_UP, output_module="mlp"),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",), output_module="mlp"),
    ),
    rotation=None,
    no_rotation=f"Gemma: {_POST_NORMS}",
    layout=replace(_LLAMA_LIKE.layout, post_norm="pre_feedforward_layernorm", attn_out_norm="post_attention_layernorm",
                   mlp_out_norm="post_feedforward_layernorm", final_softcap="final_logit_softcapping",
                   attn_softcap="attn_logit_softcapping"),
    norm_offset=1.0,
)

# OLMo 2: norms only after attention and after the MLP; q/k/v and gate/up read the raw residual
# stream, so no scale can fold in front of them (scaling the stream would change every later
# norm's input): those groups are skipped and recorded; v->o and up->down still fold.
_NO_NORM = "OLMo 2 has no norm in front of {} (its norms follow the sub-blocks): no scale can be folded there"
_OLMO2 = replace(
    _LLAMA_LIKE,
    model_types=("olmo2",),
    layout=replace(_LLAMA_LIKE.layout, input_norm=None, post_norm=None, attn_out_norm="post_attention_layernorm",
                   mlp_out_norm="post_feedforward_layernorm", qk_norm_whole=True),
    scale_groups=(
        ScaleGroup("", _ATTN, output_module="self_attn", unfoldable=_NO_NORM.format("q/k/v")),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), requires_equal_shapes=True, output_module="self_attn"),
        ScaleGroup("", _GATE_UP, output_module="mlp", unfoldable=_NO_NORM.format("gate/up")),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",), output_module="mlp"),
    ),
    rotation=None,
    no_rotation=f"OLMo 2: {_POST_NORMS}",
)

# Phi-3 / Phi-3.5 / Phi-4: q/k/v fused into qkv_proj and gate/up into gate_up_proj (vLLM keeps the
# same fused names). A fused linear's parts share one input, so GPTQ on it equals GPTQ per part,
# and its v / up rows are the producers of the v->o and up->down scale groups.
_PHI3 = replace(
    _LLAMA_LIKE,
    model_types=("phi3",),
    sequential=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    scale_groups=(
        ScaleGroup("input_layernorm", ("self_attn.qkv_proj",), output_module="self_attn"),
        ScaleGroup("self_attn.qkv_proj", ("self_attn.o_proj",), requires_equal_shapes=True, output_module="self_attn",
                   producer_part="v"),
        ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), output_module="mlp"),
        ScaleGroup("mlp.gate_up_proj", ("mlp.down_proj",), output_module="mlp", producer_part="up"),
    ),
    ops=(
        ("self_attn.qkv_proj", "qkv_proj"),
        ("self_attn.o_proj", "o_proj"),
        ("mlp.gate_up_proj", "gate_up"),
        ("mlp.down_proj", "down_proj"),
    ),
    rotation=RotationRoles(
        reads_residual=("self_attn.qkv_proj", "mlp.gate_up_proj"),
        writes_residual=("self_attn.o_proj", "mlp.down_proj"),
        value="self_attn.qkv_proj",
        value_part="v",
        attn_out="self_attn.o_proj",
        mlp_out="mlp.down_proj",
        norms=(("input_layernorm", ("self_attn.qkv_proj",)), ("post_attention_layernorm", ("mlp.gate_up_proj",))),
    ),
    # the runtime: one name for q/k/v (gate/up) = a linear fused already
    layout=BlockLayout(input_norm="input_layernorm", post_norm="post_attention_layernorm", q="self_attn.qkv_proj",
                       k="self_attn.qkv_proj", v="self_attn.qkv_proj", o="self_attn.o_proj", gate="mlp.gate_up_proj",
                       up="mlp.gate_up_proj", down="mlp.down_proj"),
    fused=(
        ("self_attn.qkv_proj", (("q", "q"), ("k", "kv"), ("v", "kv"))),
        ("mlp.gate_up_proj", (("gate", "intermediate"), ("up", "intermediate"))),
    ),
    no_clip=("self_attn.qkv_proj",),
    shapes=(LinearShape("self_attn.qkv_proj", "q+kv+kv", "hidden"), LinearShape("self_attn.o_proj", "hidden", "q"),
            LinearShape("mlp.gate_up_proj", "intermediate+intermediate", "hidden", only="dense"),
            LinearShape("mlp.down_proj", "hidden", "intermediate", only="dense")),
)

# Mixture of experts. The MoE input (post_attention_layernorm's output) feeds the router as well as
# every expert: its scales fold into the norm, every expert's gate/up and the router's columns (so
# routing is unchanged; the router stays in high precision), chosen on the mean |x| over all tokens;
# each expert's up -> down folds on its own, scored on the tokens routed to it.
# The runtime runs these rows with the Llama block layout (kept from _LLAMA_LIKE: its gate/up/down
# serve the dense blocks of an MoE model) and the MLP of a block with experts from the ExpertsSpec.
_ATTN_STEPS = (_ATTN, ("self_attn.o_proj",))
_ATTN_OPS = tuple((r, "qkv_proj") for r in _ATTN) + (("self_attn.o_proj", "o_proj"),)
_ATTN_GROUPS = (
    ScaleGroup("input_layernorm", _ATTN, output_module="self_attn"),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), requires_equal_shapes=True, output_module="self_attn"),
)
_NO_MOE_ROTATION = "rotations are not wired for mixture-of-experts blocks yet (the router and every expert read the residual stream)"

_MIXTRAL = replace(
    _LLAMA_LIKE,
    model_types=("mixtral",),
    sequential=_ATTN_STEPS + (("block_sparse_moe.experts.*.w1", "block_sparse_moe.experts.*.w3"),
                              ("block_sparse_moe.experts.*.w2",)),
    scale_groups=_ATTN_GROUPS + (
        ScaleGroup("post_attention_layernorm", ("block_sparse_moe.experts.*.w1", "block_sparse_moe.experts.*.w3"),
                   output_module="block_sparse_moe", also_scales=("block_sparse_moe.gate",)),
        ScaleGroup("block_sparse_moe.experts.*.w3", ("block_sparse_moe.experts.*.w2",), output_module="block_sparse_moe"),
    ),
    ops=_ATTN_OPS + (("block_sparse_moe.experts.*.w1", "expert_gate_up"), ("block_sparse_moe.experts.*.w3", "expert_gate_up"),
                     ("block_sparse_moe.experts.*.w2", "expert_down")),
    rotation=None,
    no_rotation=_NO_MOE_ROTATION,
    experts=ExpertsSpec(path="block_sparse_moe.experts", count=("num_local_experts",),
                        names=("w1", "w3", "w2"), router="block_sparse_moe.gate", moe_module=("mlp", "block_sparse_moe")),
    shapes=_ATTN_SHAPES + (LinearShape("block_sparse_moe.experts.*.w1", "expert", "hidden", only="moe"),
                           LinearShape("block_sparse_moe.experts.*.w3", "expert", "hidden", only="moe"),
                           LinearShape("block_sparse_moe.experts.*.w2", "hidden", "expert", only="moe")),
)

def _expert_shapes(prefix: str, size: str) -> tuple[LinearShape, ...]:
    """gate/up/down of an expert (or of the shared expert) of an MoE block, intermediate size `size`."""
    return (LinearShape(f"{prefix}.gate_proj", size, "hidden", only="moe"),
            LinearShape(f"{prefix}.up_proj", size, "hidden", only="moe"),
            LinearShape(f"{prefix}.down_proj", "hidden", size, only="moe"))


_EXPERT_STEPS = (("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj"), ("mlp.experts.*.down_proj",))
_EXPERT_OPS = (("mlp.experts.*.gate_proj", "expert_gate_up"), ("mlp.experts.*.up_proj", "expert_gate_up"),
               ("mlp.experts.*.down_proj", "expert_down"))
_DENSE_MLP = _LLAMA_LIKE.scale_groups[2:]  # Qwen MoE models may keep dense MLP blocks (mlp_only_layers)
_QWEN3_MOE = replace(
    _LLAMA_LIKE,
    model_types=("qwen3_moe",),
    sequential=_ATTN_STEPS + _EXPERT_STEPS + _LLAMA_LIKE.sequential[2:],
    scale_groups=_ATTN_GROUPS + _DENSE_MLP + (
        ScaleGroup("post_attention_layernorm", ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj"), output_module="mlp",
                   also_scales=("mlp.gate",)),
        ScaleGroup("mlp.experts.*.up_proj", ("mlp.experts.*.down_proj",), output_module="mlp"),
    ),
    ops=_LLAMA_LIKE.ops + _EXPERT_OPS,
    rotation=None,
    no_rotation=_NO_MOE_ROTATION,
    experts=ExpertsSpec(path="mlp.experts", count=("num_experts", "num_local_experts"),
                        intermediate="moe_intermediate_size", dense_blocks="mlp_only_layers"),
    shapes=_ATTN_SHAPES + _MLP_SHAPES + _expert_shapes("mlp.experts.*", "expert"),
    qk_norm=True,
)
# Qwen2-MoE (and the DeepSeek-style layout): a shared expert every token goes through, gated by a
# 1-output linear (shared_expert_gate, kept in high precision like the router).
_SHARED = ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj")
_QWEN2_MOE = replace(
    _QWEN3_MOE,
    model_types=("qwen2_moe",),
    sequential=_ATTN_STEPS + (_SHARED, ("mlp.shared_expert.down_proj",)) + _EXPERT_STEPS + _LLAMA_LIKE.sequential[2:],
    scale_groups=_ATTN_GROUPS + _DENSE_MLP + (
        ScaleGroup("post_attention_layernorm", (*_SHARED, "mlp.experts.*.gate_proj", "mlp.experts.*.up_proj"),
                   output_module="mlp", also_scales=("mlp.gate", "mlp.shared_expert_gate")),
        ScaleGroup("mlp.shared_expert.up_proj", ("mlp.shared_expert.down_proj",), output_module="mlp"),
        ScaleGroup("mlp.experts.*.up_proj", ("mlp.experts.*.down_proj",), output_module="mlp"),
    ),
    ops=_LLAMA_LIKE.ops + ((_SHARED[0], "shared_gate_up"), (_SHARED[1], "shared_gate_up"),
                           ("mlp.shared_expert.down_proj", "shared_down")) + _EXPERT_OPS,
    experts=replace(_QWEN3_MOE.experts, shared_intermediate="shared_expert_intermediate_size",
                    shared="mlp.shared_expert", shared_gate="mlp.shared_expert_gate"),
    shapes=_QWEN3_MOE.shapes + _expert_shapes("mlp.shared_expert", "shared"),
    qkv_bias=True,
    qk_norm=False,
)

# DeepSeek-V2/V3: multi-head latent attention (q and kv compressed through their own norms; V-2-Lite
# has a plain q_proj) and an MoE with shared experts; the first `first_k_dense_replace` blocks are
# dense. kv_b_proj's output interleaves K and V per head, so V has no contiguous rows: no v -> o group.
# MLA's query heads: each a "nope" part and a RoPE part
_MLA_Q = "num_attention_heads*qk_nope_head_dim+num_attention_heads*qk_rope_head_dim"
_MLA_IN = ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa")
_DS_SHARED = ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj")
_DEEPSEEK_V3 = replace(
    _LLAMA_LIKE,
    model_types=("deepseek_v3",),
    sequential=(_MLA_IN + ("self_attn.q_proj",), ("self_attn.q_b_proj",), ("self_attn.kv_b_proj",), ("self_attn.o_proj",),
                _DS_SHARED, ("mlp.shared_experts.down_proj",)) + _EXPERT_STEPS + _LLAMA_LIKE.sequential[2:],
    scale_groups=(
        ScaleGroup("input_layernorm", _MLA_IN, output_module="self_attn"),
        ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa"), output_module="self_attn"),
        ScaleGroup("self_attn.q_a_layernorm", ("self_attn.q_b_proj",), output_module="self_attn"),
        ScaleGroup("self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",), output_module="self_attn"),
        *_DENSE_MLP,
        ScaleGroup("post_attention_layernorm", (*_DS_SHARED, "mlp.experts.*.gate_proj", "mlp.experts.*.up_proj"),
                   output_module="mlp", also_scales=("mlp.gate",)),
        ScaleGroup("mlp.shared_experts.up_proj", ("mlp.shared_experts.down_proj",), output_module="mlp"),
        ScaleGroup("mlp.experts.*.up_proj", ("mlp.experts.*.down_proj",), output_module="mlp"),
    ),
    ops=tuple((r, "q_kv_a") for r in (*_MLA_IN, "self_attn.q_proj")) + (
        ("self_attn.q_b_proj", "q_b"), ("self_attn.kv_b_proj", "kv_b"), ("self_attn.o_proj", "o_proj"),
        (_DS_SHARED[0], "shared_gate_up"), (_DS_SHARED[1], "shared_gate_up"), ("mlp.shared_experts.down_proj", "shared_down"),
    ) + _LLAMA_LIKE.ops[4:] + _EXPERT_OPS,
    rotation=None,
    no_rotation=_NO_MOE_ROTATION,
    layout=replace(_LLAMA_LIKE.layout, q="self_attn.q_proj", k="self_attn.kv_a_proj_with_mqa", v="self_attn.kv_b_proj",
                   q_norm=None, k_norm=None, latent=LatentAttention()),
    no_clip=("self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.q_proj"),
    experts=ExpertsSpec(path="mlp.experts", count=("n_routed_experts", "num_local_experts"),
                        intermediate="moe_intermediate_size", shared_intermediate=("moe_intermediate_size", "n_shared_experts"),
                        dense_blocks="first_k_dense_replace", shared="mlp.shared_experts"),
    shapes=(
        LinearShape("self_attn.q_a_proj", "q_lora_rank", "hidden"),
        LinearShape("self_attn.q_proj", _MLA_Q, "hidden", unless="q_lora_rank"),
        LinearShape("self_attn.q_b_proj", _MLA_Q, "q_lora_rank"),
        LinearShape("self_attn.kv_a_proj_with_mqa", "kv_lora_rank+qk_rope_head_dim", "hidden"),
        LinearShape("self_attn.kv_b_proj", "num_attention_heads*qk_nope_head_dim+num_attention_heads*v_head_dim",
                    "kv_lora_rank"),
        LinearShape("self_attn.o_proj", "hidden", "num_attention_heads*v_head_dim"),
    ) + _MLP_SHAPES + _expert_shapes("mlp.shared_experts", "shared") + _expert_shapes("mlp.experts.*", "expert"),
)
_DEEPSEEK_V2 = replace(_DEEPSEEK_V3, model_types=("deepseek_v2",),
                       layout=replace(_DEEPSEEK_V3.layout, latent=LatentAttention(pairs_out="in place")))

ARCH_SPECS: tuple[ArchSpec, ...] = (_LLAMA_LIKE, _QWEN2, _QWEN3, _GRANITE, _GEMMA, _OLMO2, _PHI3, _MIXTRAL, _QWEN2_MOE, _QWEN3_MOE,
                                    _DEEPSEEK_V2, _DEEPSEEK_V3)


def config_value(config, key: str):
    """A field of a config, given as a transformers config object or as a dict (config.json)."""
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def config_size(config, key: str) -> int | None:
    """A size field of a config: None when unset; ValueError (naming the field) unless a whole
    number from 0 to SIZE_LIMIT."""
    v = config_value(config, key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v > SIZE_LIMIT:
        raise ValueError(f"field {key}={short_repr(v, 40)} is not a sensible size")
    return v


def expert_count(ex: ExpertsSpec, config) -> int | None:
    """The number of experts a config (object or dict) declares, by the spec's field names."""
    return next((config_size(config, k) for k in ex.count if config_value(config, k) is not None), None)


def head_dim_of(config) -> int:
    """Attention head size (config object or dict): the config's `head_dim` when it sets one (Qwen3),
    else hidden / heads."""
    return config_value(config, "head_dim") or config_value(config, "hidden_size") // config_value(
        config, "num_attention_heads")


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


def spec_for(model_type) -> ArchSpec:
    """The table row of `model_type`; UnsupportedModelError (one line, the supported list) otherwise."""
    for spec in ARCH_SPECS:
        if model_type in spec.model_types:
            return spec
    raise UnsupportedModelError(
        f"model type {short_repr(model_type)} is not supported yet; supported: {', '.join(supported_model_types())}"
    )


# The key under which `quantkit.plan.model_config` keeps a multimodal wrapper's own model_type
# (the dict it returns is the wrapper's text config).
WRAPPER_KEY = "_quantkit_wrapper_model_type"


def check_config_supported(cfg: dict) -> ArchSpec:
    """Refuse, from a config dict alone (before any weight is read), a model no adapter row covers.

    A multimodal wrapper (`quantkit.plan.model_config` returns its text config and keeps the
    wrapper's type under WRAPPER_KEY) is refused by the wrapper's type: quantkit
    would load the wrapper's class, whose decoder blocks live elsewhere than the text model's."""
    if not isinstance(cfg, dict):
        return spec_for(None)
    wrapper = cfg.get(WRAPPER_KEY)
    if wrapper is not None and not any(wrapper in s.model_types for s in ARCH_SPECS):
        raise UnsupportedModelError(
            f"model type {short_repr(wrapper)} (a multimodal model around a {short_repr(cfg.get('model_type'))} "
            f"text model) is not supported yet; quantkit quantizes text-only decoders: "
            f"{', '.join(supported_model_types())}"
        )
    return spec_for(cfg.get("model_type"))


class ModelAdapter:
    """Finds a model's parts by the names in its `ArchSpec`."""

    def __init__(self, model: nn.Module, spec: ArchSpec):
        self.model = model
        self.spec = spec.for_config(model.config) if spec.experts is not None else spec
        if spec.experts is not None:  # per-expert nn.Linear in place of transformers' fused 3-D experts (once)
            from quantkit.models.moe import unfuse_experts

            ex = spec.experts
            unfuse_experts(model, spec.blocks, ex.path, ex.names, ex.moe_module)

    @classmethod
    def for_model(cls, model: nn.Module) -> "ModelAdapter":
        return cls(model, spec_for(getattr(getattr(model, "config", None), "model_type", None)))

    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.spec.blocks)

    def block_name(self, index: int) -> str:
        return f"{self.spec.blocks}.{index}"

    def block_linears(self, index: int) -> dict[str, nn.Linear]:
        """Full module name -> linear, in execution order, for block `index`.

        An MoE row lists the dense MLP's linears and the experts' both: a block has one kind
        (Qwen2-MoE's mlp_only_layers are dense), so names it lacks are left out there."""
        block = self.blocks()[index]
        prefix = self.block_name(index)
        if self.spec.experts is None:
            return {f"{prefix}.{rel}": block.get_submodule(rel) for rel in self.spec.linears}
        out = {}
        for rel in self.spec.linears:
            try:
                out[f"{prefix}.{rel}"] = block.get_submodule(rel)
            except AttributeError:
                continue
        return out

    def all_linears(self) -> dict[str, nn.Linear]:
        out: dict[str, nn.Linear] = {}
        for i in range(len(self.blocks())):
            out.update(self.block_linears(i))
        return out

    def part_rows(self, rel: str, part: str) -> slice:
        """Rows of one part of a fused linear of this model (see `ArchSpec.part_rows`)."""
        return self.spec.part_rows(rel, part, self.model.config)

    def is_expert(self, name: str) -> bool:
        """Whether the full linear name belongs to an MoE expert (sees only the tokens routed to it)."""
        return self.spec.experts is not None and f".{self.spec.experts.path}." in name

    def routers(self) -> list[str]:
        """Full names of the MoE routers (kept in high precision; serving engines build them as linears,
        so a checkpoint lists them as unquantized)."""
        if self.spec.experts is None:
            return []
        rel = self.spec.experts.router
        out = []
        for i, blk in enumerate(self.blocks()):
            try:
                blk.get_submodule(rel)
            except AttributeError:
                continue  # a dense block
            out.append(f"{self.block_name(i)}.{rel}")
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


@contextmanager
def stubbed_forwards(stubs: Iterable[tuple["nn.Module", Callable]]) -> Iterator[None]:
    """Within the block, each (module, fn) pair's module runs fn instead of its forward (an instance attribute,
    so hooks and __call__ still apply); always restored, also on error. What skips decoder blocks: catching
    their inputs (quantkit.calib.pipeline) and starting a forward at a block (quantkit.sensitivity.prefix)."""
    done = []
    try:
        for module, fn in stubs:
            module.forward = fn
            done.append(module)
        yield
    finally:
        for module in done:
            del module.forward  # the instance attribute goes; the class's forward shows again
