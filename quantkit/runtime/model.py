"""`RuntimeModel`: runs a quantized checkpoint's decoder on the kernels, with its own KV cache.

The decoder program is written here once for the llama-like layout (`models.adapter.BlockLayout`:
Llama, Qwen2, Qwen3, Mistral, Granite with its scalar multipliers named by the layout, Phi-3 whose
q/k/v and gate/up come fused, OLMo 2 and Gemma 2/3 with norms after the sub-blocks, Gemma's (1 + w)
norms, per-layer-type rotary tables and Gemma 2's attention soft-capping): RMSNorm (the model's own
modules), fused q/k/v and gate/up QuantLinears, RoPE from precomputed tables, optional per-head q/k norms
(Qwen3), SpinQuant's online Hadamards (R3 on Q/K after RoPE, R4 on the down_proj input), and attention
over `KVCache`. The MLP is a dense gated `Mlp`, or an `MoE` where the adapter row has experts (Mixtral,
Qwen2-MoE, Qwen3-MoE, DeepSeek: see `RuntimeModel._run_moe` for the dispatch and why decode differs from
prefill). DeepSeek-V2/V3's multi-head latent attention (`Latent`, `RuntimeModel._latent_qkv`) rebuilds K
and V per head from the kv latent and caches them like any other model's (zero-padded to one head size),
or, with `latent_cache=True`, caches the latent itself and absorbs kv_b into the query and the output
(`LatentCache`, `RuntimeModel._latent_attend`).
Attention:

* prefill (any number of tokens per sample, right-padded batches): K/V are written to the cache
  first and attention reads them back (dequantized), so every token sees K/V exactly as stored;
* decode (one token per sample): `kernels.attention.decode_attention` reads the cache as stored.

Shapes are static per (batch, max_len): a decode step on CUDA is captured once as a CUDA graph per
precision signature (layer flags, row bits on/off) and replayed (`DecodeGraph`), which removes the
~20 us of host time each Triton launch costs. Sampling (greedy, temperature, top-p) runs on the
device with a seeded generator, so `generate` is deterministic under `seed`.
"""

from __future__ import annotations

import inspect

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.errors import UsageError
from quantkit.kernels._common import runtime_chain
from quantkit.kernels.fused import add_rmsnorm, rope, silu_mul, split_heads
from quantkit.kernels.hadamard import hadamard_transform
from quantkit.kernels.mixed import TOKEN_GROUP
from quantkit.models.hooks import r4_block_of
from quantkit.runtime.kvcache import KVCache, LatentCache
from quantkit.runtime.linear import QuantLinear, StepControl, can_fuse, fuse
from quantkit.runtime.monitor import FallbackMonitor
from quantkit.runtime.precision import PrecisionState


class RequestError(UsageError):
    """A request the runtime cannot serve as asked (too long, empty prompt, ...)."""


class PartOf(nn.Module):
    """Stands in the transformers skeleton for a linear the runtime fused: its slice of the fused output."""

    def __init__(self, fused: QuantLinear, start: int, size: int):
        super().__init__()
        self.fused, self.start, self.size = [fused], start, size  # list: not a registered submodule

    def forward(self, x):
        return self.fused[0](x)[..., self.start:self.start + self.size]


@dataclass
class Mlp:
    """A gated MLP: down(act(gate(x)) * up(x)), gate and up as one unit (fused when they can be)."""

    gate_up: nn.Module
    down: nn.Module
    act: Callable
    act_is_silu: bool

    def units(self) -> list[nn.Module]:
        return [self.gate_up, self.down]


@dataclass
class MoE:
    """A sparse mixture-of-experts MLP (`models.adapter.ExpertsSpec`): the family's own router (float, never
    quantized) picks each token's top-k experts with the family's weights; the experts (and the shared
    expert, scaled by sigmoid(shared_gate(x)) when the family has that gate) are `Mlp`s of QuantLinears."""

    router: nn.Module  # transformers' TopKRouter: x (T, H) -> (logits, weights (T, k), expert ids (T, k))
    experts: list[Mlp]
    shared: Mlp | None = None
    shared_gate: nn.Module | None = None

    def units(self) -> list[nn.Module]:
        return [u for m in self.experts + ([self.shared] if self.shared else []) for u in m.units()]


@dataclass
class Latent:
    """A block's multi-head latent attention (DeepSeek, `models.adapter.LatentAttention`): the block's input
    linear (`Block.qkv`, q's and the kv latent's linears fused) gives [q or q's latent | kv latent | k_pe];
    q_b and kv_b expand the latents, each behind its RMSNorm."""

    q_a_norm: nn.Module | None  # None with q_b: q comes straight from the input linear (no q_lora_rank)
    q_b: nn.Module | None
    kv_a_norm: nn.Module
    kv_b: nn.Module
    q_width: int  # columns of the input linear that are q (or q's latent)
    rank: int  # kv_lora_rank
    nope: int
    rope: int
    v_dim: int
    interleave: bool  # RoPE on interleaved pairs (x0, x1), (x2, x3), ...; else on the two halves
    pairs_in_place: bool  # interleaved: the rotated pairs go back in place (else: firsts, then seconds)

    def units(self) -> list[nn.Module]:
        return [u for u in (self.q_b, self.kv_b) if u is not None]


@dataclass
class Block:
    ln1: nn.Module | None  # None: no norm in front of attention (OLMo 2)
    ln2: nn.Module | None
    qkv: QuantLinear
    o: nn.Module
    mlp: Mlp | MoE
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    window: int | None
    sm_scale: float
    rope_type: str | None = None  # the rotary table this layer uses (Gemma 3: its layer type)
    attn_out_norm: nn.Module | None = None  # OLMo 2: the sub-blocks' outputs are normed before the add
    mlp_out_norm: nn.Module | None = None
    qk_norm_whole: bool = False  # q/k norms over all heads at once (OLMo 2)
    softcap: float = 0.0  # attention scores -> tanh(s / c) * c before the mask (Gemma 2); 0: off
    latent: Latent | None = None  # multi-head latent attention (DeepSeek); None: q/k/v from qkv

    def attn_units(self) -> list[nn.Module]:
        return [self.qkv] + (self.latent.units() if self.latent is not None else []) + [self.o]


def _fuse_into(block: nn.Module, prefix: str, rels: list[str], name: str) -> QuantLinear | None:
    """Fuse the block's linears `rels` (same input) into one QuantLinear, leaving PartOf stand-ins."""
    mods = [block.get_submodule(r) for r in rels]
    if not all(isinstance(m, QuantLinear) for m in mods) or not can_fuse(mods):
        return None
    fused = fuse(mods, f"{prefix}.{name}")
    start = 0
    for r, m in zip(rels, mods):
        parent, _, leaf = r.rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, leaf, PartOf(fused, start, m.out_features))
        start += m.out_features
    return fused


def _mlp(parent: nn.Module, prefix: str, names: tuple[str, str, str], fused_name: str, act_is_silu: bool,
         mod: nn.Module) -> Mlp:
    """The gated MLP whose (gate, up, down) linears are `names` under `parent` (one name for gate and up:
    fused already, Phi-3); act: `mod`'s act_fn."""
    gate, up, down = names
    gate_up = parent.get_submodule(gate) if gate == up else \
        _fuse_into(parent, prefix, [gate, up], fused_name) or _Unfused([parent.get_submodule(r) for r in (gate, up)])
    return Mlp(gate_up=gate_up, down=parent.get_submodule(down), act=getattr(mod, "act_fn", F.silu),
               act_is_silu=act_is_silu)


def _moe(blk: nn.Module, prefix: str, ex, act_is_silu: bool) -> MoE | None:
    """The block's MoE MLP from the adapter row's ExpertsSpec `ex`; None for a block with a dense MLP."""
    try:
        experts = blk.get_submodule(ex.path)
    except AttributeError:
        return None
    path = f"{prefix}.{ex.path}"
    shared = None
    if ex.shared is not None:
        sh = blk.get_submodule(ex.shared)  # transformers' plain MLP module: gate_proj / up_proj / down_proj
        shared = _mlp(sh, f"{prefix}.{ex.shared}", ("gate_proj", "up_proj", "down_proj"), "gate_up_proj",
                      act_is_silu, sh)
    return MoE(router=blk.get_submodule(ex.router),
               experts=[_mlp(e, f"{path}.{j}", ex.names, "gate_up_proj", act_is_silu, e)
                        for j, e in enumerate(experts)],
               shared=shared, shared_gate=blk.get_submodule(ex.shared_gate) if ex.shared_gate else None)


def _latent(blk: nn.Module, prefix: str, lat, cfg) -> tuple[nn.Module, Latent]:
    """The block's latent attention from the layout's `LatentAttention` `lat`: (input unit, Latent)."""
    size = {f: getattr(cfg, getattr(lat, f)) for f in ("q_lora_rank", "kv_lora_rank", "nope_dim", "rope_dim", "v_dim")}
    q_in = lat.q_a if size["q_lora_rank"] else lat.q
    attn = lat.kv_a.rsplit(".", 1)[0]
    qkv = _fuse_into(blk, prefix, [q_in, lat.kv_a], f"{attn}.q_kv_a_proj") or \
        _Unfused([blk.get_submodule(r) for r in (q_in, lat.kv_a)])
    heads = cfg.num_attention_heads
    low_rank = bool(size["q_lora_rank"])
    return qkv, Latent(
        q_a_norm=blk.get_submodule(lat.q_a_norm) if low_rank else None,
        q_b=blk.get_submodule(lat.q_b) if low_rank else None,
        kv_a_norm=blk.get_submodule(lat.kv_a_norm), kv_b=blk.get_submodule(lat.kv_b),
        q_width=size["q_lora_rank"] or heads * (size["nope_dim"] + size["rope_dim"]), rank=size["kv_lora_rank"],
        nope=size["nope_dim"], rope=size["rope_dim"], v_dim=size["v_dim"],
        interleave=bool(getattr(cfg, lat.rope_interleave, True)), pairs_in_place=lat.pairs_out == "in place")


class _Unfused(nn.Module):
    """Several linears that could not be fused, run one after another (outputs concatenated)."""

    def __init__(self, mods: list[nn.Module]):
        super().__init__()
        self.mods = nn.ModuleList(mods)

    def forward(self, x):
        return torch.cat([m(x) for m in self.mods], dim=-1)


@dataclass
class StepStats:
    """Counters of a run: tokens processed, tokens that ran FP16 rows, fallback switches."""

    tokens: int = 0
    fp16_tokens: int = 0
    windows_checked: int = 0

    @property
    def fallback_rate(self) -> float:
        return self.fp16_tokens / self.tokens if self.tokens else 0.0


class RuntimeModel:
    def __init__(self, hf_model: nn.Module, *, device, dtype: torch.dtype, kv=None, kv_static: list | None = None,
                 kv_residual: bool | None = None, online: dict | None = None, info: dict | None = None,
                 kv_residual_slots: int | None = None, latent_cache: bool = False):
        from quantkit.models.adapter import ModelAdapter, head_dim_of, sliding_windows

        self.hf = hf_model.requires_grad_(False)
        self.config = cfg = hf_model.config
        self.device, self.dtype = torch.device(device), dtype
        self.kv_args, self.kv_static, self.kv_residual = kv, kv_static, kv_residual
        self.kv_residual_slots = kv_residual_slots  # per (sample, kv head); None: max_len // 8
        self.online = online or {}
        self.info = dict(info or {})
        adapter = ModelAdapter.for_model(hf_model)
        lay = adapter.spec.layout
        if lay is None:
            raise RequestError(f"the runtime has no block layout for model type {cfg.model_type!r}")
        refused = latent_cache_refusal(lay.latent is not None, kv, None) if latent_cache else None
        if refused:
            raise UsageError(refused)
        self.latent_cache = latent_cache
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = head_dim_of(cfg)
        self.v_dim = self.head_dim  # attention output per head
        if lay.latent is not None:
            # every query head gets its own K (nope + rope) and V, rebuilt from the latent; both are cached
            # zero-padded to one power-of-two size >= 16 (what the decode kernel takes; zeros add nothing)
            lat = lay.latent
            qk, self.v_dim = getattr(cfg, lat.nope_dim) + getattr(cfg, lat.rope_dim), getattr(cfg, lat.v_dim)
            self.n_kv, self.head_dim = self.n_heads, max(16, 1 << (max(qk, self.v_dim) - 1).bit_length())
        self.vocab = cfg.vocab_size
        windows = sliding_windows(cfg)
        self.ctl = StepControl()
        self.blocks: list[Block] = []
        self.linears: dict[str, QuantLinear] = {}
        rot = adapter.rotary()
        layer_types = getattr(cfg, "layer_types", None) or [None] * cfg.num_hidden_layers
        # a rotary module that takes the layer type keeps a table per type (Gemma 3's local / global)
        rope_by_type = rot is not None and "layer_type" in inspect.signature(rot.forward).parameters
        for i, blk in enumerate(adapter.blocks()):
            prefix = adapter.block_name(i)
            attn = blk.get_submodule(lay.attention)
            latent = None
            if lay.latent is not None:
                qkv, latent = _latent(blk, prefix, lay.latent, cfg)
                if latent_cache:  # kv_b is absorbed: a float linear that attention reads, never runs per token
                    latent.kv_b = _dense_linear(latent.kv_b, f"{prefix}.{lay.latent.kv_b}", self.device, dtype)
                    parent, _, leaf = lay.latent.kv_b.rpartition(".")
                    setattr(blk.get_submodule(parent), leaf, latent.kv_b)
            elif lay.q == lay.k == lay.v:  # one linear for q, k and v (gate and up): fused already (Phi-3)
                qkv = blk.get_submodule(lay.q)
            else:
                qkv = _fuse_into(blk, prefix, [lay.q, lay.k, lay.v], f"{lay.attention}.qkv_proj") or \
                    _Unfused([blk.get_submodule(r) for r in (lay.q, lay.k, lay.v)])
            act_is_silu = (getattr(cfg, "hidden_act", None) or getattr(cfg, "hidden_activation", None)
                           or "silu") in ("silu", "swish")
            mlp = _moe(blk, prefix, adapter.spec.experts, act_is_silu) if adapter.spec.experts else None
            if mlp is None:  # a dense MLP (also the dense blocks of an MoE model)
                mlp_parent = lay.gate.rsplit(".", 1)[0]
                mlp = _mlp(blk, prefix, (lay.gate, lay.up, lay.down), f"{mlp_parent}.gate_up_proj", act_is_silu,
                           blk.get_submodule(mlp_parent))

            def opt(rel):
                try:
                    return blk.get_submodule(rel) if rel else None
                except AttributeError:
                    return None

            self.blocks.append(Block(
                ln1=opt(lay.input_norm), ln2=opt(lay.post_norm), qkv=qkv, o=blk.get_submodule(lay.o), mlp=mlp,
                q_norm=opt(lay.q_norm), k_norm=opt(lay.k_norm),
                window=windows[i], sm_scale=float(getattr(attn, "scaling", self.head_dim ** -0.5)),
                attn_out_norm=opt(lay.attn_out_norm), mlp_out_norm=opt(lay.mlp_out_norm), qk_norm_whole=lay.qk_norm_whole,
                rope_type=layer_types[i] if rope_by_type else None,
                softcap=self._field(cfg, lay.attn_softcap, 0.0), latent=latent))
            for unit in self.blocks[-1].attn_units() + mlp.units():
                for m in (unit.mods if isinstance(unit, _Unfused) else [unit]):
                    if isinstance(m, QuantLinear):
                        m.ctl = self.ctl
                        for pname, _ in m.parts:
                            self.linears[pname] = m
        self.norm_offset = adapter.spec.norm_offset
        self.final_softcap = self._field(cfg, lay.final_softcap, 0.0)
        # Granite's multipliers; 1 (skipped) for the other families
        self.embed_mult = self._field(cfg, lay.embed_multiplier)
        self.res_mult = self._field(cfg, lay.residual_multiplier)
        self.logits_div = self._field(cfg, lay.logits_divisor)
        self.embed = adapter.embed()
        self.norm = adapter.final_norm()
        self.lm_head = adapter.lm_head()
        self.rotary = adapter.rotary()
        self.r3 = "r3" in self.online
        self.r4_block = r4_block_of(self.online)  # None: no R4; else its Hadamard block (the width: one block)
        self.precision: PrecisionState | None = None
        self.monitor: FallbackMonitor | None = None
        self.monitor_layers: list[str] = []
        self._cache: KVCache | None = None
        self._rope: dict = {}  # layer type (None: one table for all) -> (cos, sin) tables
        self._graphs: dict = {}
        self.use_graphs = self.device.type == "cuda"
        self.stats = StepStats()

    @staticmethod
    def _field(cfg, field: str | None, unset: float = 1.0) -> float:
        """A scalar the layout names by config field (multipliers, soft caps); `unset` when unnamed or unset."""
        return float(getattr(cfg, field, None) or unset) if field else unset

    # ------------------------------------------------------------------ sizes and state

    def weight_bytes(self) -> int:
        """Bytes of every tensor the model keeps on its device (packed linears, FP16 copies, the rest)."""
        n = sum(u.weight_bytes() for u in {id(m): m for m in self.linears.values()}.values())
        ptrs = set()
        for t in list(self.hf.parameters()) + list(self.hf.buffers()):
            if t.device.type != "meta" and t.data_ptr() not in ptrs:
                ptrs.add(t.data_ptr())
                n += t.numel() * t.element_size()
        return n

    def ensure(self, batch: int, max_len: int) -> KVCache | LatentCache:
        """The KV cache, precision state (and monitor buffers) for `batch` x `max_len`, reused when big enough."""
        limit = getattr(self.config, "max_position_embeddings", None)
        if limit and max_len > limit:
            raise RequestError(f"{max_len} positions exceed the model's max_position_embeddings {limit}; "
                                "shorten the prompt or --max-new-tokens")
        c = self._cache
        if c is None or c.batch < batch or c.max_len < max_len:
            self.drop_graphs()
            self._cache = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if self.latent_cache:
                lt = self.blocks[0].latent
                c = self._cache = LatentCache(len(self.blocks), batch, max_len, lt.rank + lt.rope, dtype=self.dtype,
                                              device=self.device)
            else:
                c = self._cache = KVCache(len(self.blocks), batch, self.n_kv, max_len, self.head_dim, dtype=self.dtype,
                                          device=self.device, kv=self.kv_args, static=self.kv_static,
                                          residual=self.kv_residual, residual_slots=self.kv_residual_slots)
            # layer flags live on the modules: a new state keeps them
            self.precision = PrecisionState(self.linears, batch, max_len, self.device)
            self._rope = {}
            if self.monitor is not None and self.monitor.batch < batch:
                self.monitor.resize(batch)
        c.reset()
        return c

    def _rope_at(self, pos: torch.Tensor, x: torch.Tensor, layer_type: str | None = None):
        """cos, sin (B, S, D) for positions pos (B, S), from tables built once per cache size; layer_type:
        the rotary module's table for that kind of layer (Gemma 3: local and global layers differ)."""
        if self.rotary is None:
            raise RequestError("the model has no rotary embedding module")
        extra = (layer_type,) if layer_type is not None else ()
        rt = str(getattr(self.rotary, "rope_type", "default"))
        if "dynamic" in rt or "longrope" in rt:
            return _cos_sin(self.rotary(x, pos, *extra))
        t = self._rope.get(layer_type)
        if t is None or t[0].shape[0] < self._cache.max_len:
            ids = torch.arange(self._cache.max_len, device=self.device).view(1, -1)
            cos, sin = _cos_sin(self.rotary(torch.zeros(1, dtype=self.dtype, device=self.device), ids, *extra))
            t = self._rope[layer_type] = (cos[0], sin[0])
        return t[0][pos], t[1][pos]

    # ------------------------------------------------------------------ the decoder program

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, *, decode: bool, length: int | None = None,
                 seq_lens: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                 last: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for ids (B, S) at positions pos (B, S).

        decode: S == 1 and seq_lens (B,) int32 = pos + 1 (the decode kernel); else prefill over cache
        positions [0, length). valid: (B, S) bool, tokens that count (right padding excluded), for the
        monitor. last: (B,) long, return only the logits at these token indices (B, V); else (B, S, V)."""
        cache = self._cache
        B, S = ids.shape
        Hq, Dv = self.n_heads, self.v_dim
        x = self.embed(ids)
        if self.embed_mult != 1.0:
            x = x * self.embed_mult
        rm = self.res_mult
        ropes = {}
        for t in dict.fromkeys(b.rope_type for b in self.blocks):
            c_, s_ = self._rope_at(pos, x, t)
            ropes[t] = (c_.to(x.dtype), s_.to(x.dtype))
        prec = self.precision
        self.ctl.row_bits = prec.row_bits(pos) if prec.any_rows else None
        mon = self.monitor
        if mon is not None:
            mon.row_sample = torch.arange(B, device=self.device).view(B, 1).expand(B, S).reshape(-1)
            w = torch.ones(B, S, device=self.device) if valid is None else valid.float()
            mon.row_weight = w.reshape(-1)
        masks = {}  # window (or "latent") -> attention mask (B, 1, S, length), built once per forward
        n = len(self.blocks)
        x, h = self._norm(self.blocks[0].ln1, x, None)
        for i, blk in enumerate(self.blocks):
            cos, sin = ropes[blk.rope_type]
            if blk.latent is not None:
                q = self._latent_qkv(i, blk, h, cos, sin, pos)
            else:
                qkv = self._run(blk.qkv, h, i, "qkv")
                if blk.q_norm is None and not self.r3:  # one fused launch: RoPE on q and k, k and v into the cache
                    q = cache.rope_write(i, qkv, cos, sin, pos, Hq)
                else:
                    q = self._qkv_torch(i, blk, qkv, cos, sin, pos)
            if self.latent_cache:
                a = self._latent_attend(i, blk, q, pos, cache.max_len if decode else length, masks)  # (B, S, Hq, Dv)
            else:
                a = self._attend(i, blk, q, pos, seq_lens if decode else None, length, masks)  # (B, S, Hq, D)
            a = (a if a.shape[-1] == Dv else a[..., :Dv]).reshape(B, S, Hq * Dv)
            o = self._run(blk.o, a, i, "o")
            if blk.attn_out_norm is not None:
                o = blk.attn_out_norm(o)
            x, h = self._norm(blk.ln2, x, o if rm == 1.0 else o * rm)
            d = self._run_mlp(blk.mlp, h, i) if isinstance(blk.mlp, Mlp) else \
                self._run_moe(blk.mlp, h, i, static=decode and self.use_graphs)
            if blk.mlp_out_norm is not None:
                d = blk.mlp_out_norm(d)
            x, h = self._norm(self.blocks[i + 1].ln1 if i + 1 < n else self.norm, x, d if rm == 1.0 else d * rm)
        if last is not None:
            h = h[torch.arange(B, device=self.device), last].unsqueeze(1)
        logits = self.lm_head(h)
        if self.logits_div != 1.0:
            logits = logits / self.logits_div
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits[:, 0] if last is not None else logits

    def _attend(self, i: int, blk: Block, q: torch.Tensor, pos: torch.Tensor, seq_lens: torch.Tensor | None,
                length: int | None, masks: dict) -> torch.Tensor:
        """Attention of q (B, Hq, S, D) over the cache -> (B, S, Hq, D). seq_lens (B,) int32: a decode step
        (S == 1, the decode kernel); None: prefill over cache positions [0, length) (masks: the forward's
        window -> mask cache)."""
        cache = self._cache
        B, Hq, S, _ = q.shape
        gqa = Hq != self.n_kv
        if seq_lens is not None:
            a = cache.decode_attention(i, q[:, :, 0], seq_lens, window=blk.window, sm_scale=blk.sm_scale,
                                       softcap=blk.softcap)
            return a.unsqueeze(1)
        kf, vf = cache.read(i, length, B)
        if length == S and (blk.window is None or blk.window >= length) and not blk.softcap:
            # from position 0: plain causal
            a = F.scaled_dot_product_attention(q, kf, vf, is_causal=True, scale=blk.sm_scale, enable_gqa=gqa)
            return a.transpose(1, 2)
        mask = masks.get(blk.window)
        if mask is None:
            j = torch.arange(length, device=self.device)
            mask = j.view(1, 1, length) <= pos.view(B, S, 1)
            if blk.window is not None:
                mask = mask & (pos.view(B, S, 1) - j.view(1, 1, length) < blk.window)
            mask = masks[blk.window] = mask.unsqueeze(1)
        if blk.softcap:
            a = _softcapped_attention(q, kf, vf, mask, blk.sm_scale, blk.softcap)
        else:
            a = F.scaled_dot_product_attention(q, kf, vf, attn_mask=mask, scale=blk.sm_scale, enable_gqa=gqa)
        return a.transpose(1, 2)

    def _latent_qkv(self, i: int, blk: Block, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    pos: torch.Tensor) -> torch.Tensor:
        """Multi-head latent attention's q, K and V (DeepSeek) from h (B, S, hidden): K (nope + rope; the rope
        part one head shared by all) and V of every head, rebuilt from the kv latent, go into the cache
        zero-padded to its head size; returns q (B, Hq, S, D) padded alike (the zeros add nothing to q . k).
        With the latent cache: the normed latent and k_pe go into it; returns q (B, Hq, S, nope + rope)."""
        lt = blk.latent
        B, S, _ = h.shape
        H, D = self.n_heads, self.head_dim
        q, c, k_pe = self._run(blk.qkv, h, i, "qkv").split([lt.q_width, lt.rank, lt.rope], dim=-1)
        if lt.q_b is not None:
            q = self._run(lt.q_b, lt.q_a_norm(q), i, "q_b")
        c = lt.kv_a_norm(c)
        q = q.view(B, S, H, lt.nope + lt.rope).transpose(1, 2)
        q_nope, q_pe = q.split([lt.nope, lt.rope], dim=-1)
        k_pe = k_pe.view(B, S, 1, lt.rope).transpose(1, 2)
        if lt.interleave:  # pairs (x0, x1), (x2, x3), ... -> halves (rope rotates halves)
            q_pe, k_pe = (torch.cat([t[..., 0::2], t[..., 1::2]], dim=-1) for t in (q_pe, k_pe))
        q_pe, k_pe = rope(q_pe, cos, sin), rope(k_pe, cos, sin)
        if lt.interleave and lt.pairs_in_place:  # K's channels in the model's order (per-channel KV scales)
            q_pe, k_pe = (torch.stack(t.chunk(2, dim=-1), dim=-1).flatten(-2) for t in (q_pe, k_pe))
        if self.latent_cache:
            self._cache.write(i, torch.cat([c.unsqueeze(1), k_pe], dim=-1), pos)
            return torch.cat([q_nope, q_pe], dim=-1)
        kv = self._run(lt.kv_b, c, i, "kv_b").view(B, S, H, lt.nope + lt.v_dim).transpose(1, 2)
        k_nope, v = kv.split([lt.nope, lt.v_dim], dim=-1)
        pad = (0, D - lt.nope - lt.rope)
        k = F.pad(torch.cat([k_nope, k_pe.expand(B, H, S, lt.rope)], dim=-1), pad)
        self._cache.write(i, k, F.pad(v, (0, D - lt.v_dim)), pos)
        return F.pad(torch.cat([q_nope, q_pe], dim=-1), pad)

    def _latent_attend(self, i: int, blk: Block, q: torch.Tensor, pos: torch.Tensor, length: int,
                       masks: dict) -> torch.Tensor:
        """Attention over the latent cache, kv_b absorbed: q (B, Hq, S, nope + rope) at positions pos (B, S)
        over cache positions [0, length) (a decode step: the whole cache, masked, so its shapes are static)
        -> (B, S, Hq, v_dim). Per head, q_nope . (W_k c) = (W_k^T q_nope) . c and the output
        W_v (sum_j p_j c_j): one K head [c | k_pe] shared by every query head, its first kv_lora_rank
        columns the values."""
        lt = blk.latent
        B, H, S, _ = q.shape
        w = lt.kv_b.weight.view(H, lt.nope + lt.v_dim, lt.rank)
        q_nope, q_pe = q.split([lt.nope, lt.rope], dim=-1)
        q_lat = torch.cat([torch.matmul(q_nope, w[:, :lt.nope]), q_pe], dim=-1)  # (B, H, S, rank + rope)
        x = self._cache.read(i, length, B)  # (B, 1, length, rank + rope)
        mask = masks.get("latent")  # the same causal mask for every layer: built once per forward
        if mask is None:
            mask = masks["latent"] = (torch.arange(length, device=self.device).view(1, 1, length)
                                      <= pos.view(B, S, 1)).unsqueeze(1)
        o = F.scaled_dot_product_attention(q_lat, x, x[..., :lt.rank], attn_mask=mask, scale=blk.sm_scale,
                                           enable_gqa=True)  # (B, H, S, rank)
        return torch.matmul(o, w[:, lt.nope:].transpose(1, 2)).transpose(1, 2)

    def _run_mlp(self, mlp: Mlp, h: torch.Tensor, i: int) -> torch.Tensor:
        gu = self._run(mlp.gate_up, h, i, "gate_up")
        inter = mlp.down.in_features
        m = silu_mul(gu, inter) if mlp.act_is_silu else mlp.act(gu[..., :inter]) * gu[..., inter:]
        if self.r4_block is not None:
            m = hadamard_transform(m, self.r4_block)
        return self._run(mlp.down, m, i, "down")

    def _run_moe(self, moe: MoE, h: torch.Tensor, i: int, *, static: bool) -> torch.Tensor:
        """The MoE MLP on h (..., H): sum over each token's top-k experts of weight * expert(x), plus the
        (gated) shared expert, in the order transformers adds them.

        Grouped (prefill, CPU): the (token, slot) pairs sorted by expert; each expert runs once on its
        tokens (index_select) and adds its weighted rows back (index_add). The per-expert counts are read
        on the host (one sync per MoE layer on CUDA), so this path is never captured.
        static (a decode step on CUDA, captured as a graph): a graph needs shapes and launches fixed at
        capture, so every expert runs on every row and its output is scaled by the row's routing weight,
        0 where the router did not pick it: no host sync, the same sum (exact zeros added). It reads every
        expert's weights each step, which costs E / k times the expert GEMM work of an ideal dispatch (a
        grouped-GEMM kernel that reads the routing on the device would remove that)."""
        lead = h.shape[:-1]
        x = h.reshape(-1, h.shape[-1])  # (T, H)
        _, w, idx = moe.router(x)  # (T, k) each: the family's top-k and normalization (transformers' router)
        out = torch.zeros_like(x)
        n_exp = len(moe.experts)
        if static:
            dense = torch.zeros(x.shape[0], n_exp, dtype=w.dtype, device=x.device).scatter_(1, idx, w)
            for e, ex in enumerate(moe.experts):
                out += (self._run_mlp(ex, x, i) * dense[:, e:e + 1]).to(out.dtype)
        else:
            k = idx.shape[1]
            flat = idx.reshape(-1)
            order = torch.argsort(flat, stable=True)  # per expert, its tokens in order (as transformers adds them)
            tok = order // k
            xs, ws = x.index_select(0, tok), w.reshape(-1).index_select(0, order)
            rb = self.ctl.row_bits  # per-row FP16 bits follow the rows into each expert's group
            start = 0
            for e, n in enumerate(torch.bincount(flat, minlength=n_exp).tolist()):
                if n:
                    rows = tok[start:start + n]
                    if rb is not None:
                        self.ctl.row_bits = rb.index_select(0, rows)
                    y = self._run_mlp(moe.experts[e], xs[start:start + n], i) * ws[start:start + n, None]
                    out.index_add_(0, rows, y.to(out.dtype))
                start += n
            self.ctl.row_bits = rb
        if moe.shared is not None:
            s = self._run_mlp(moe.shared, x, i)
            if moe.shared_gate is not None:
                s = torch.sigmoid(moe.shared_gate(x)) * s
            out = out + s
        return out.reshape(*lead, out.shape[-1])

    def _norm(self, norm: nn.Module | None, x: torch.Tensor, delta: torch.Tensor | None):
        """(x + delta, norm(x + delta)): one fused launch for the llama-style RMSNorm, the module otherwise
        (also a (1 + w) norm, Gemma's); norm None (no norm in front of the next sub-block): (x + delta, x + delta)."""
        if norm is None or self.norm_offset:
            x = x if delta is None else x + delta
            return x, (x if norm is None else norm(x))
        eps = getattr(norm, "variance_epsilon", None)
        if eps is not None and type(norm).__name__.endswith("RMSNorm") and norm.weight.dim() == 1:
            return add_rmsnorm(x, delta, norm.weight, eps)
        x = x if delta is None else x + delta
        return x, norm(x)

    def _qkv_torch(self, i, blk, qkv, cos, sin, pos):
        """RoPE with the per-head q/k norms (Qwen3) and SpinQuant's R3, in torch; K and V into the cache."""
        if blk.qk_norm_whole:  # one norm over all of q's (k's) heads, before they are split (OLMo 2)
            nq, nk = self.n_heads * self.head_dim, self.n_kv * self.head_dim
            qkv = torch.cat([blk.q_norm(qkv[..., :nq]), blk.k_norm(qkv[..., nq:nq + nk]), qkv[..., nq + nk:]], dim=-1)
        q, k, v = split_heads(qkv, self.n_heads, self.n_kv, self.head_dim)
        if blk.q_norm is not None and not blk.qk_norm_whole:
            q, k = blk.q_norm(q), blk.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if self.r3:
            q, k = hadamard_transform(q), hadamard_transform(k)
        self._cache.write(i, k, v, pos)
        return q

    def _run(self, unit, x, i, what):
        y = unit(x)
        watch = self._mon_index.get(id(unit)) if self.monitor is not None else None
        if watch:
            y2 = y.reshape(-1, y.shape[-1])
            for mi, start, size in watch:
                self.monitor.observe(mi, y2[:, start:start + size])
        return y

    # ------------------------------------------------------------------ monitor

    def enable_monitor(self, hists: dict, layers: list[str], *, kl_threshold: float = 0.02,
                       skew_threshold: float = 3.0) -> FallbackMonitor:
        """Watch `layers` (member names) against calibration histograms `hists` (name -> (counts, (lo, hi)))."""
        batch = self._cache.batch if self._cache is not None else 1
        mon = FallbackMonitor(hists, layers, batch, self.device, kl_threshold=kl_threshold,
                              skew_threshold=skew_threshold)
        where: dict[str, tuple] = {}  # member name -> (unit, first output column, columns)
        for blk in self.blocks:  # not the experts: their rows are the tokens routed to them, not the step's
            for unit in blk.attn_units() + (blk.mlp.units() if isinstance(blk.mlp, Mlp) else []):
                start = 0
                for name, size in _unit_parts(unit):
                    where[name] = (unit, start, size)
                    start += size
        index: dict = {}
        for mi, name in enumerate(layers):
            if name not in where:
                raise UsageError(f"cannot monitor {name}: not a quantized linear of this model outside its experts")
            unit, start, size = where[name]
            index.setdefault(id(unit), []).append((mi, start, size))
        self.monitor, self.monitor_hists, self.monitor_layers = mon, hists, list(layers)
        self._mon_index = index
        self.drop_graphs()
        return mon

    def disable_monitor(self) -> None:
        self.monitor = None
        self._mon_index = {}
        self.drop_graphs()

    def drop_graphs(self) -> None:
        """Forget the captured decode graphs: the next decode step captures again. For whatever changes which
        launches a step makes once captured (the monitor, forced precision, ``kernels._common.CHAIN_PDL``)."""
        self._graphs.clear()

    _mon_index: dict = {}

    def _after_tokens(self, start: torch.Tensor | list[int], count: int, lens: list[int]) -> None:
        """Host bookkeeping after positions [start_b, start_b + count) of each sample ran: FP16-token
        counts, and the monitor's check of every 64-token window that just completed."""
        prec = self.precision
        starts = list(start)
        for b, s0 in enumerate(starts):
            n = max(0, min(count, lens[b] - s0))
            self.stats.tokens += n
            self.stats.fp16_tokens += prec.fp16_tokens(b, s0, n)
        mon = self.monitor
        if mon is None:
            return
        done, last_tok = [], {}
        for b, s0 in enumerate(starts):
            ends = [p for p in FallbackMonitor.window_ends(s0, count) if p < lens[b]]
            if ends:
                done.append(b)
                last_tok[b] = ends[-1]
        if done:
            self.stats.windows_checked += len(done)
            for b in mon.check(done, last_tok):
                prec.force_fp16(sample=b)

    # ------------------------------------------------------------------ prefill / decode

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], *, extra: int = 0, chunk: int | None = None,
                all_logits: bool = False):
        """Run the prompts (lists of token ids, any lengths) from position 0; returns the logits of
        each prompt's last token (B, V) (or of every token (B, S, V) when all_logits). extra: the
        decode positions to reserve. chunk: tokens per forward (64 when the monitor is on)."""
        B = len(prompts)
        lens = [len(p) for p in prompts]
        if min(lens) < 1:
            raise RequestError("every prompt needs at least one token")
        S = max(lens)
        self.ensure(B, S + extra)
        self.precision.reset_requests()
        if self.monitor is not None:
            self.monitor.reset_requests()
        ids = torch.zeros(B, S, dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, :len(p)] = torch.as_tensor(p, dtype=torch.long)
        ids = ids.to(self.device)
        lens_t = torch.tensor(lens, device=self.device)
        if chunk is None:
            chunk = TOKEN_GROUP if self.monitor is not None else S
        outs = []
        for c0 in range(0, S, chunk):
            c1 = min(S, c0 + chunk)
            pos = torch.arange(c0, c1, device=self.device).view(1, -1).expand(B, -1)
            valid = pos < lens_t.view(B, 1)
            if all_logits:
                outs.append(self._forward(ids[:, c0:c1], pos, decode=False, length=c1, valid=valid))
            else:
                lastc = (lens_t - 1 - c0).clamp(0, c1 - c0 - 1)
                outs.append((self._forward(ids[:, c0:c1], pos, decode=False, length=c1, valid=valid, last=lastc),
                             ((lens_t - 1 >= c0) & (lens_t - 1 < c1))))
            self._after_tokens([c0] * B, c1 - c0, lens)
        self._lens = lens
        if all_logits:
            return torch.cat(outs, dim=1)
        out = outs[0][0]
        for lg, here in outs[1:]:
            out = torch.where(here.view(B, 1), lg, out)
        return out

    def _decode_eager(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        with runtime_chain():  # a decode step's launches chain (kernels._common.chain_pdl), a prefill's do not
            return self._forward(tok.view(-1, 1), pos.view(-1, 1), decode=True,
                                 seq_lens=(pos + 1).to(torch.int32), last=torch.zeros_like(pos))

    @torch.no_grad()
    def decode_step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One token per sample: tok (B,) long at positions pos (B,) long -> logits (B, V)."""
        if not self.use_graphs:
            return self._decode_eager(tok, pos)
        key = (tok.shape[0], self.precision.signature(), self.monitor is not None)
        g = self._graphs.get(key)
        if g is None:
            g = self._graphs[key] = DecodeGraph(self, tok.shape[0])
        return g.run(tok, pos)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, eos_token_id: int | list[int] | None = None,
                 on_token: Callable[[int, int], None] | None = None, sync_every_step: bool = True) -> dict:
        """Generate up to max_new_tokens per prompt (batched, prompts of different lengths).

        Greedy when temperature == 0, else sampling with top-p, from a generator seeded with `seed`.
        on_token(sample, token_id) streams tokens as they are chosen. Returns {"tokens": per sample
        list of new token ids, "prefill_s", "decode_s", "decode_steps", "fallback": switches...}."""
        if max_new_tokens < 1:
            raise RequestError("--max-new-tokens must be at least 1")
        if temperature < 0 or not (0 < top_p <= 1):
            raise RequestError("temperature must be >= 0 and top-p in (0, 1]")
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        B = len(prompts)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        sync = self.device.type == "cuda"
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = self.prefill(prompts, extra=max_new_tokens)
        lens = list(self._lens)
        tok = sample_tokens(logits, temperature, top_p, gen)
        if sync:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        out: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        toks_dev = [tok]
        pos = torch.tensor(lens, device=self.device, dtype=torch.long)
        steps = 0
        for step in range(max_new_tokens):
            if sync_every_step or step == max_new_tokens - 1:
                host = tok.tolist()
                for b, t in enumerate(host):
                    if not done[b]:
                        out[b].append(t)
                        if on_token is not None:
                            on_token(b, t)
                        if t in eos:
                            done[b] = True
                if all(done):
                    break
            if step == max_new_tokens - 1:
                break
            logits = self.decode_step(tok, pos)
            steps += 1
            self._after_tokens([lens[b] + step for b in range(B)], 1, [10 ** 9] * B)
            pos = pos + 1
            tok = sample_tokens(logits, temperature, top_p, gen)
            if not sync_every_step:
                toks_dev.append(tok)
        if not sync_every_step:
            allt = torch.stack(toks_dev, dim=1).tolist()
            out = [row[:max_new_tokens] for row in allt]
        if sync:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        mon = self.monitor
        return {"tokens": out, "prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_steps": steps,
                "prompt_tokens": sum(lens),
                "fallback": [s.to_dict() for s in mon.switches] if mon is not None else [],
                "fp16_samples": self.precision.fp16_samples()}

    # ------------------------------------------------------------------ perplexity

    @torch.no_grad()
    def perplexity(self, windows: torch.Tensor, *, batch_size: int = 4, chunk: int | None = None,
                   on_batch: Callable[[int, int], None] | None = None):
        """exp(mean next-token NLL) of windows (n, seqlen), each window from position 0 (the same rule
        as `quantkit.eval.perplexity`). chunk: tokens per forward (64 with the monitor: it can switch
        a window to FP16 after any 64 tokens)."""
        from quantkit.eval.perplexity import Perplexity

        total, count = 0.0, 0
        n, L = windows.shape
        self.stats = StepStats()
        if self._cache is not None:
            self._cache.reset_counts()
        for b0 in range(0, n, batch_size):
            ids = windows[b0:b0 + batch_size]
            logits = self.prefill([row.tolist() for row in ids], chunk=chunk, all_logits=True)
            tgt = ids[:, 1:].to(self.device)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1),
                                   reduction="sum")
            total += float(loss.double())
            count += tgt.numel()
            if on_batch is not None:
                on_batch(min(b0 + batch_size, n), n)
        nll = total / count
        return Perplexity(ppl=math.exp(nll), nll=nll, tokens=count, windows=n)


def latent_cache_refusal(latent: bool, kv, act, sensitive: bool = False) -> str | None:
    """Why `latent_cache=True` cannot run, or None. latent: the model's attention is latent; kv / act: the
    checkpoint's KV-cache and activation quantization args; sensitive: kv_b keeps an FP16 copy."""
    if not latent:
        return "the latent cache is for multi-head latent attention (DeepSeek-V2/V3); leave latent_cache off"
    why = ("an INT8 KV cache (it quantizes K and V per head, which the latent cache never forms)" if kv is not None
           else "quantized activations (kv_b's input would be quantized per read, not per token)" if act is not None
           else "an FP16 copy of kv_b (its precision switches per token; the absorbed kv_b cannot)" if sensitive
           else None)
    return why and f"the latent cache runs weight-only checkpoints with a float KV cache, not {why}; " \
                   "leave latent_cache off (K and V cached per head)"


@torch.no_grad()
def _dense_linear(lin: nn.Module, name: str, device, dtype) -> nn.Linear:
    """A float nn.Linear that computes what `lin` (a weight-only QuantLinear or a linear) computes: its
    weight read back through it (the identity's image), so every packing reads back alike."""
    if isinstance(lin, QuantLinear) and (lin.act is not None or lin.pinned):
        raise UsageError(latent_cache_refusal(True, None, lin.act, lin.pinned) + f" ({name})")
    eye = torch.eye(lin.in_features, device=device, dtype=dtype)
    b = lin(torch.zeros_like(eye[:1]))  # the bias (zeros without one)
    out = nn.Linear(lin.in_features, lin.out_features, bias=False, device=device, dtype=dtype)
    out.weight.copy_((lin(eye) - b).t())
    if bool(b.any()):
        out.bias = nn.Parameter(b[0])
    return out.requires_grad_(False)


def _cos_sin(out) -> tuple[torch.Tensor, torch.Tensor]:
    """A rotary module's output as (cos, sin) (..., D) in transformers' cat(freqs, freqs) layout: as is, or
    from DeepSeek-V2's complex e^(i freqs) (..., D / 2)."""
    if isinstance(out, torch.Tensor) and out.is_complex():
        return torch.cat([out.real, out.real], dim=-1), torch.cat([out.imag, out.imag], dim=-1)
    return out


def _unit_parts(unit) -> list[tuple[str, int]]:
    """(member name, output columns) of a block unit, in output order (nothing for a float nn.Linear)."""
    if isinstance(unit, QuantLinear):
        return list(unit.parts)
    if isinstance(unit, _Unfused):
        out = []
        for m in unit.mods:
            out += _unit_parts(m) if isinstance(m, QuantLinear) else [("", m.out_features)]
        return out
    return [("", unit.out_features)]


def _softcapped_attention(q, k, v, mask, scale: float, cap: float) -> torch.Tensor:
    """Prefill attention with the scores soft-capped, tanh(s / cap) * cap, before the mask (Gemma 2; SDPA
    has no such step): q (B, Hq, S, D), k / v (B, Hkv, L, D), mask (B, 1, S, L) bool -> (B, Hq, S, D)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    s = (torch.tanh(s / cap) * cap).masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v.float()).to(q.dtype)


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """Next token per row of logits (B, V): argmax when temperature == 0, else top-p sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True)
        keep = (sp.cumsum(-1) - sp) < top_p  # the smallest prefix whose mass reaches top_p
        sp = torch.where(keep, sp, torch.zeros_like(sp))
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    return torch.multinomial(probs, 1, generator=gen).view(-1)


class DecodeGraph:
    """One decode step captured as a CUDA graph for a fixed batch and cache (static buffers in and out)."""

    def __init__(self, rt: RuntimeModel, batch: int):
        self.rt = rt
        dev = rt.device
        # warm-up and capture run real steps: at the cache's last position, which no request has reached
        # yet (a real step writes a position before any step reads it); their counters are restored
        self.tok = torch.zeros(batch, dtype=torch.long, device=dev)
        self.pos = torch.full((batch,), rt._cache.max_len - 1, dtype=torch.long, device=dev)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        saved = _snapshot(rt)
        with torch.cuda.stream(s):
            for _ in range(2):  # compile / allocate outside the capture
                rt._decode_eager(self.tok, self.pos)
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = rt._decode_eager(self.tok, self.pos)
        _restore(rt, saved)

    def run(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.tok.copy_(tok)
        self.pos.copy_(pos)
        self.graph.replay()
        return self.logits


def _snapshot(rt: RuntimeModel) -> list:
    """What warm-up / capture steps change besides the scratch position: cache and monitor counters."""
    c = rt._cache
    saved = [c.counts.clone()]
    if c.residual:
        saved += [c.r_next.clone(), c.r_idx[..., -1].clone()]
    if rt.monitor is not None:
        saved += [rt.monitor.counts.clone(), rt.monitor.moments.clone()]
    return saved


def _restore(rt: RuntimeModel, saved: list) -> None:
    c = rt._cache
    c.counts.copy_(saved.pop(0))
    if c.residual:
        c.r_next.copy_(saved.pop(0))
        c.r_idx[..., -1].copy_(saved.pop(0))
    if rt.monitor is not None:
        rt.monitor.counts.copy_(saved.pop(0))
        rt.monitor.moments.copy_(saved.pop(0))
