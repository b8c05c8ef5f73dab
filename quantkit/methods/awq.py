"""AWQ: activation-aware per-channel scales, then a clipping search, then RTN.

Per decoder block (Lin et al., "AWQ", 2023; schedule as in AutoAWQ):
1. One forward of the block records, for the first `search_samples` windows,
   the inputs and float outputs of each scored sub-block (attention, MLP) and a
   token subsample of every linear's input.
2. For every scale group of the adapter table (norm -> q/k/v, v -> o when the
   shapes allow, norm -> gate/up, up -> down; a fused producer's part, e.g. the
   v rows of Phi-3's qkv_proj) a grid over alpha: scales
   s = mean|x|^alpha (`quantkit.quant.awq.awq_scales`), consumers fake-quantized
   as Q(W diag(s)) diag(s)^-1, loss = MSE of the sub-block's output against the
   float one. All groups are searched on the original weights, then the best
   scales are folded (producer / s, consumer columns * s: no runtime cost).
3. Clipping: per (output channel, group) the max-shrink that minimises the
   linear's output error on its (now rescaled) input tokens; the adapter's
   `no_clip` linears (q/k: attention logits go through softmax, where clipping
   errors are amplified) are skipped.
Groups that cannot apply (v -> o under grouped-query attention, an ignored
consumer, OLMo 2's q/k/v with no norm in front) are skipped and each one is
recorded in the run's warnings, which the manifest (quantkit.json) keeps.
4. Final stage: RTN with the scheme's weight args, dequantized weights written
   back, `ctx.results` filled. Earlier stage (e.g. awq -> gptq): float weights are
   scaled and clipped only.

Search results are data: `self.artifacts[block name]` holds per group the best
alpha, the loss curve and the scales, and per linear the chosen clip shrinks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantkit.methods.base import BlockContext, Method, register_method
from quantkit.methods.options import Flag, Int, MethodOptions, Number, option
from quantkit.quant.awq import (
    apply_clip,
    awq_scales,
    clip_search,
    fold_scales,
    sanitize_channel_stat,
    scaled_fake_quant,
    weight_channel_mean,
)
from quantkit.quant.core import group_size_for, quantize_weight

# Input tokens per linear for the clipping search (a deterministic, evenly spaced subsample).
_CLIP_TOKENS = 512


@dataclass
class _Record:
    """What one sub-block saw during the recording forward, per batch."""

    calls: list[tuple[tuple, dict[str, Any], torch.Tensor]] = field(default_factory=list)  # (args, kwargs, float output)
    samples: int = 0


def _first(out: Any) -> torch.Tensor:
    # attention returns (output, weights); the MLP a tensor
    return out[0] if isinstance(out, tuple) else out


def _batch_of(args: tuple, kwargs: dict[str, Any]) -> int:
    x = args[0] if args else kwargs.get("hidden_states")
    return x.shape[0] if isinstance(x, torch.Tensor) and x.dim() == 3 else 1


def _even_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    # x: (n, in) -> at most k evenly spaced rows, first and last included
    if x.shape[0] <= k:
        return x
    idx = torch.linspace(0, x.shape[0] - 1, k, device=x.device).round().long()
    return x.index_select(0, idx)


@contextmanager
def _recording(
    block: nn.Module, submodules: list[str], linears: dict[str, nn.Linear], limit: int | None
) -> Iterator[tuple[dict[str, _Record], dict[str, list[torch.Tensor]]]]:
    """Hooks that record sub-block calls and linear input tokens for the first `limit` samples.

    Yields ({sub-block name: _Record}, {linear name: [tokens (k, in) per call]}).
    The hooks always come off, also on error.
    """
    records = {name: _Record() for name in submodules}
    tokens: dict[str, list[torch.Tensor]] = {name: [] for name in linears}
    seen = {name: 0 for name in linears}
    handles = []

    def sub_hook(_mod, args, kwargs, output, _name):
        rec = records[_name]
        if limit is not None and rec.samples >= limit:
            return
        rec.calls.append((args, dict(kwargs), _first(output).detach()))
        rec.samples += _batch_of(args, kwargs)

    def lin_hook(_mod, args, _name):
        x = args[0]
        if limit is not None and seen[_name] >= limit:
            return
        seen[_name] += x.shape[0] if x.dim() == 3 else 1
        tokens[_name].append(_even_rows(x.detach().reshape(-1, x.shape[-1]), _CLIP_TOKENS))

    try:
        for name in submodules:
            mod = block.get_submodule(name)
            handles.append(
                mod.register_forward_hook(lambda m, a, k, o, _n=name: sub_hook(m, a, k, o, _n), with_kwargs=True)
            )
        for name, lin in linears.items():
            handles.append(lin.register_forward_pre_hook(lambda m, a, _n=name: lin_hook(m, a, _n)))
        yield records, tokens
    finally:
        for h in handles:
            h.remove()


def _subblock_loss(module: nn.Module, record: _Record) -> float:
    """MSE of the sub-block's current output against the recorded float output."""
    err, n = 0.0, 0
    for args, kwargs, ref in record.calls:
        out = _first(module(*args, **kwargs))
        err += (out.float() - ref.float()).pow(2).sum().item()
        n += ref.numel()
    return err / max(n, 1)


def _mean_abs(ctx: BlockContext, names: list[str]) -> torch.Tensor:
    """Mean |x| per input channel over every token any of the consumers saw. Consumers of one input
    see the same tokens (the plain mean); MoE experts see their routed tokens, which together are
    every token, each k times: the pooled mean is the mean over all tokens."""
    if ctx.spec is None or ctx.spec.experts is None:
        return ctx.stats[names[0]].abs_mean  # one shared input
    stats = [ctx.stats[n] for n in names if ctx.stats[n].count]
    return sum(st.abs_sum for st in stats) / sum(st.count for st in stats)


# Grid sizes beyond this only repeat finer steps of the same search, and the grids are materialized
# (a billion-point grid ran the machine out of memory): refused like any other bad value.
MAX_GRID = 1000


@dataclass
class AWQOptions(MethodOptions):
    """See `AWQ`."""

    grid: int = option(20, Int(1, MAX_GRID))
    duo: bool = option(False, Flag())
    clip: bool = option(True, Flag())
    clip_grid: int = option(20, Int(1, MAX_GRID))
    max_shrink: float = option(0.5, Number(0, 1, high_open=True))
    search_samples: int | None = option(8, Int(1), optional=True)


@register_method("awq")
class AWQ(Method):
    """Activation-aware weight quantization (see the module docstring).

    Options (recipe stage keys):
      grid (int in 1..MAX_GRID, default 20): alpha grid size, alpha in {0, 1/grid, ..., (grid-1)/grid}.
      duo (bool, default false): s = x^alpha / w^(1-alpha) with w the per-input-channel
          mean |w| of the consumers, each weight group normalised by its max |w|
          (`weight_channel_mean`); favours channels whose weights sit low in their range.
      clip (bool, default true): run the clipping search.
      clip_grid (int in 1..MAX_GRID, default 20): number of shrink factors, evenly spaced from
          1.0 (no clipping) down to 1 - max_shrink.
      max_shrink (float in [0, 1), default 0.5): the largest range reduction tried.
      search_samples (int >= 1 or null, default 8): calibration windows the alpha and
          clipping searches score; whole batches are taken from the start of the
          calibration set until at least this many windows are in (deterministic).
          Null = all. The grid costs about grid x (number of groups) sub-block
          forwards over these windows per block, so 8 windows (4k tokens at seqlen
          512) keep a CPU run of a 135M model in minutes, while still ranking alpha
          on thousands of tokens. The mean |x| statistics always use every window.
    """

    stats = frozenset({"abs_mean"})
    Options = AWQOptions

    def __init__(self, scheme, **options: Any):
        super().__init__(scheme, **options)
        # block name -> {"groups": [...], "clip": {linear: {...}}, "skipped": [...]}
        self.artifacts: dict[str, dict[str, Any]] = {}

    @property
    def alphas(self) -> list[float]:
        return [i / self.opts.grid for i in range(self.opts.grid)]

    @property
    def shrinks(self) -> list[float]:
        if self.opts.clip_grid == 1:
            return [1.0]
        return [1.0 - self.opts.max_shrink * i / (self.opts.clip_grid - 1) for i in range(self.opts.clip_grid)]

    def _skip(self, ctx: BlockContext, art: dict[str, Any], prod_name: str, names: list[str], why: str) -> None:
        """A scale group that cannot be applied: recorded in the artifacts and the run's warnings (manifest)."""
        art["skipped"].append(f"{prod_name or '(none)'}: {why}")
        ctx.warnings.append(f"awq: scale group {prod_name or '(none)'} -> {', '.join(names)} skipped: {why}")

    def _groups(self, ctx: BlockContext, art: dict[str, Any]):
        """(producer name, producer, consumer names, consumers, output module, producer rows) for groups
        that apply; every other group is recorded as skipped, with the reason."""
        if ctx.spec is None:
            return
        for grp in ctx.groups_here():
            prod_name = ctx.full_name(grp.producer) if grp.producer else ""
            names = [ctx.full_name(c) for c in grp.consumers]
            if grp.unfoldable:
                self._skip(ctx, art, prod_name, names, grp.unfoldable + "; these linears get the clipping search only")
                continue
            if not all(n in ctx.linears for n in names):
                self._skip(ctx, art, prod_name, names, "a consumer is not quantized (ignored)")
                continue
            if sum(ctx.stats[n].count for n in names) == 0:  # an expert the router sent no calibration token to
                self._skip(ctx, art, prod_name, names, "no calibration token reached it (an expert no token was "
                           "routed to); its consumers are quantized without scales")
                continue
            producer = ctx.block.get_submodule(grp.producer)
            # the router reads the same input: its columns take the scales too (routing unchanged, kept float)
            consumers = [ctx.linears[n] for n in names] + [ctx.block.get_submodule(r) for r in grp.also_scales
                                                           if ctx.has(r)]
            rows = None
            if grp.producer_part is not None:
                rows = ctx.spec.part_rows(grp.producer, grp.producer_part, ctx.block_config)
                width = rows.stop - rows.start
            else:
                width = producer.out_features if isinstance(producer, nn.Linear) else producer.weight.numel()
            if any(c.in_features != width for c in consumers[: len(names)]):
                why = (f"the producer has {width} outputs, the consumers {consumers[0].in_features} inputs"
                       + (" (grouped-query attention: V heads are shared by several query heads)"
                          if grp.requires_equal_shapes else ""))
                self._skip(ctx, art, prod_name, names, why)
                continue
            yield prod_name, producer, names, consumers, grp.output_module, rows

    @torch.no_grad()
    def _search(self, ctx, prod_name, names, consumers, module, record) -> dict[str, Any]:
        x_mean = _mean_abs(ctx, names)
        consumers = consumers[: len(names)]  # the quantized ones (a router only takes the folded scales)
        _, n_bad, n_zero = sanitize_channel_stat(x_mean)
        if n_bad or n_zero:
            ctx.warnings.append(
                f"awq: {prod_name} -> {names[0]}: {n_bad + n_zero} input channel(s) with "
                f"{n_bad} non-finite and {n_zero} zero mean |x|; their scales were clamped"
            )
        args = self.scheme.weights
        w_mean = weight_channel_mean([c.weight for c in consumers], args.group_size) if self.opts.duo else None
        originals = [c.weight.data.clone() for c in consumers]
        losses: list[float] = []
        try:
            for alpha in self.alphas:
                s = awq_scales(x_mean, alpha, w_mean).to(ctx.device)
                for c, w0 in zip(consumers, originals):
                    c.weight.data.copy_(scaled_fake_quant(w0, s, args, scale_dtype=w0.dtype).to(w0.dtype))
                losses.append(_subblock_loss(module, record))
        finally:
            for c, w0 in zip(consumers, originals):
                c.weight.data.copy_(w0)
        finite = [i for i, v in enumerate(losses) if math.isfinite(v)]
        if not finite:
            ctx.warnings.append(f"awq: {prod_name}: every alpha gave a non-finite loss; scales left at 1")
            best = None
            s = torch.ones(consumers[0].in_features)
        else:
            best = min(finite, key=lambda i: losses[i])
            s = awq_scales(x_mean, self.alphas[best], w_mean)
        return {
            "producer": prod_name,
            "consumers": names,
            "alpha": None if best is None else self.alphas[best],
            "losses": losses,
            "scales": s.float().cpu(),
        }

    @torch.no_grad()
    def apply_block(self, ctx: BlockContext) -> None:
        art: dict[str, Any] = {"groups": [], "clip": {}, "skipped": []}
        self.artifacts[ctx.name] = art
        groups = list(self._groups(ctx, art))
        no_clip = {ctx.full_name(r) for r in (ctx.spec.no_clip if ctx.spec is not None else ())}
        clip_names = [n for n in ctx.linears if self.opts.clip and n not in no_clip]
        submodules = sorted({g[4] for g in groups})
        with _recording(ctx.block, submodules, {n: ctx.linears[n] for n in clip_names}, self.opts.search_samples) as (
            records,
            tokens,
        ):
            ctx.forward()

        # Search every group on the original weights, then fold all (AutoAWQ's order).
        for prod_name, producer, names, consumers, out_mod, _rows in groups:
            res = self._search(ctx, prod_name, names, consumers, ctx.block.get_submodule(out_mod), records[out_mod])
            art["groups"].append(res)
        del records
        by_name = {g[0]: g for g in groups}
        for res in art["groups"]:
            _, producer, names, consumers, _, rows = by_name[res["producer"]]
            s = res["scales"].to(ctx.device)
            fold_scales(producer, consumers, s, rows=rows, norm_offset=ctx.spec.norm_offset)
            for n in names:  # the consumers now see x / s
                if n in tokens:
                    tokens[n] = [t / s.to(t.dtype) for t in tokens[n]]

        args = self.scheme.weights
        for name in clip_names:
            if not tokens[name]:
                continue
            lin = ctx.linears[name]
            x = _even_rows(torch.cat(tokens.pop(name)), _CLIP_TOKENS)
            shrink, _, _ = clip_search(lin.weight.data, x, args, self.shrinks, scale_dtype=lin.weight.dtype)
            g = group_size_for(args, lin.in_features)
            wmax = lin.weight.float().reshape(lin.out_features, -1, g).abs().amax(dim=-1)
            lin.weight.data.copy_(apply_clip(lin.weight.data, shrink, args))
            # shrink per (row, group); max = the clip threshold on |w| (AutoAWQ's max_val)
            art["clip"][name] = {"shrink": shrink.cpu(), "max": (wmax * shrink).cpu()}

        if self.final:
            for name, lin in ctx.linears.items():
                qt = quantize_weight(lin.weight.data, args)
                lin.weight.data.copy_(qt.dequantize(lin.weight.dtype))
                ctx.results[name] = qt.to("cpu")
