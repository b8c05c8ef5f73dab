"""Prefill / decode speed of the runtime next to its own BF16 path and transformers, in one process.

Every row runs the same seeded random prompts (batch x prompt_len tokens) and generates gen_len
tokens greedily without stopping at EOS, after a warm-up that compiles the kernels and captures the
decode graph. Reported per row: prefill tokens/s, decode tokens/s and ms per step, peak GPU memory
of the row, bytes of weights and KV cache the row keeps, and the share of tokens that ran FP16 rows
(the fallback rate).
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from quantkit.models.adapter import head_dim_of


@dataclass
class BenchRow:
    name: str
    batch: int
    prompt_len: int
    gen_len: int
    prefill_s: float
    decode_s: float
    decode_steps: int
    peak_gib: float | None
    weight_bytes: int | None
    kv_bytes: int | None
    fallback_rate: float | None = None
    switches: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def prefill_tok_s(self) -> float:
        return self.batch * self.prompt_len / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.batch * self.decode_steps / self.decode_s if self.decode_s else 0.0

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.decode_s / self.decode_steps if self.decode_steps else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(prefill_tok_s=self.prefill_tok_s, decode_tok_s=self.decode_tok_s, ms_per_step=self.ms_per_step)
        return d


def random_prompts(batch: int, prompt_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, prompt_len), generator=g).tolist()


def _peak_reset(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)


def _peak(dev) -> float | None:
    if dev.type != "cuda":
        return None
    torch.cuda.synchronize(dev)
    return torch.cuda.max_memory_allocated(dev) / 2**30


@torch.no_grad()
def bench_runtime(rt, name: str, *, batch: int, prompt_len: int, gen_len: int, seed: int = 0,
                  warmup_tokens: int = 4, prefill_reps: int = 3) -> BenchRow:
    """Time `rt.generate` on random prompts (the graph for this batch captured in the warm-up). The prefill time is
    the median of the generate's prefill and ``prefill_reps`` more prefills of the same prompts: one pass is a
    single sample (session 50: one 512-token batch-1 prefill read 46,000 to 68,000 tokens/s across runs)."""
    prompts = random_prompts(batch, prompt_len, rt.vocab, seed)
    rt.ensure(batch, prompt_len + gen_len)  # the cache the timed run uses, so warm-up captures for it
    rt.generate(prompts, max_new_tokens=min(warmup_tokens, gen_len), sync_every_step=False)
    _peak_reset(rt.device)
    rt.stats = type(rt.stats)()
    res = rt.generate(prompts, max_new_tokens=gen_len, sync_every_step=False)
    peak = _peak(rt.device)
    mon = rt.monitor
    fallback_rate = rt.stats.fallback_rate if mon else None
    prefill = [res["prefill_s"]] + [_seconds(rt.device, lambda: rt.prefill(prompts, extra=gen_len))
                                    for _ in range(prefill_reps)]
    return BenchRow(name, batch, prompt_len, gen_len, statistics.median(prefill), res["decode_s"],
                    res["decode_steps"], peak, rt.weight_bytes(), rt._cache.nbytes(), fallback_rate=fallback_rate,
                    switches=len(res["fallback"]) if mon else None,
                    extra={"device": str(rt.device), "prefill_s_runs": prefill})


def _seconds(dev, fn) -> float:
    """Wall seconds of ``fn()``, the GPU (where ``dev`` is one) synchronized before and after."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t0


@torch.no_grad()
def bench_transformers(model, name: str, *, batch: int, prompt_len: int, gen_len: int, seed: int = 0) -> BenchRow:
    """transformers' own `generate` (its default cache and attention, no compile), greedy, no EOS stop."""
    dev = next(model.parameters()).device
    ids = torch.tensor(random_prompts(batch, prompt_len, model.config.vocab_size, seed), device=dev)
    att = torch.ones_like(ids)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, use_cache=True)
    model.generate(ids, attention_mask=att, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
    t_pre = _seconds(dev, lambda: model.generate(ids, attention_mask=att, max_new_tokens=1, min_new_tokens=1, **kw))
    _peak_reset(dev)
    t_all = _seconds(dev, lambda: model.generate(ids, attention_mask=att, max_new_tokens=gen_len,
                                                 min_new_tokens=gen_len, **kw))
    peak = _peak(dev)
    kv = 2 * model.config.num_hidden_layers * batch * (prompt_len + gen_len) * \
        getattr(model.config, "num_key_value_heads", model.config.num_attention_heads) * \
        head_dim_of(model.config) * \
        next(model.parameters()).element_size()
    wb = sum(p.numel() * p.element_size() for p in model.parameters())
    return BenchRow(name, batch, prompt_len, gen_len, t_pre, max(t_all - t_pre, 1e-9), gen_len - 1, peak, wb, kv,
                    extra={"device": str(dev), "note": "KV bytes computed for its dynamic cache at full length"})


def free() -> None:
    """Return cached GPU memory between rows (callers drop their references first)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_copy_bandwidth(device, gib: float = 2.0) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written (the HBM ceiling)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return float("nan")
    n = int(gib * 2**30) // 2
    a = torch.empty(n, dtype=torch.float16, device=dev).normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    reps = 10
    for _ in range(reps):
        b.copy_(a)
    torch.cuda.synchronize(dev)
    dt = (time.perf_counter() - t0) / reps
    del a, b
    torch.cuda.empty_cache()
    return 2 * n * 2 / dt


def decode_bytes_per_token(rt, context: float) -> int:
    """Bytes one decode step of batch 1 must read: every linear's packed weight and scales (and FP16
    copies it runs), the lm_head, the norms, and the KV cache of `context` positions."""
    n = 0
    for u in {id(m): m for m in rt.linears.values()}.values():
        n += u.weight_bytes()
    head = rt.lm_head
    w = getattr(head, "weight", None)
    if w is not None:
        n += w.numel() * w.element_size()
    c = rt._cache
    per_pos = (c.k[0, 0, :, 0].numel() * c.k.element_size()) * 2 * c.n_layers
    if c.k_scale is not None and c.k_scale.dim() == 4:
        per_pos += 2 * c.n_layers * c.kv_heads * 4
    return int(n + context * per_pos)
