"""Layer-by-layer calibration: one decoder block on the device at a time.

1. Catch what every block receives: each block's forward is swapped for a
   recorder that keeps its keyword arguments (masks, rotary embeddings: one
   forward of the embeddings, no block math) and block 0's hidden states.
2. For each block: move it to the device; run a capture pass with hooks that
   accumulate the statistics the methods asked for; let each method apply;
   run the block again so the next block sees the quantized outputs; move the
   block back.

With no method applied, the final hidden states equal the full model's forward
(tested), so any difference after quantization is the methods' doing.

Streamed (`stream`, quantkit.models.streaming.StreamedModel): the model is a meta
skeleton; the embeddings are read for step 1 only, each block is read from the
safetensors shards when its turn comes and dropped once the checkpointer has saved it,
and the results stay on disk (the checkpointer's lazy view), so host memory holds one
block however deep the model is.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantkit.calib.activations import ActivationStore
from quantkit.calib.capture import capture_inputs
from quantkit.calib.resume import Checkpointer
from quantkit.methods.base import BlockContext, Method
from quantkit.models.adapter import ModelAdapter
from quantkit.quant.core import QuantizedTensor

# on_block(index, total, block_name, phase) -> None; phase is a short label for progress.
ProgressFn = Callable[[int, int, str, str], None]


_CACHE_KWARGS = ("past_key_values", "past_key_value", "cache")


@dataclass
class _BlockInputs:
    """Everything a block is called with, per calibration batch."""

    hidden: list[torch.Tensor]  # one (batch, seq, hidden) tensor per batch
    kwargs: list[dict[str, Any]]  # one dict per batch, per block (masks can differ by layer type)


@dataclass
class PipelineResult:
    results: dict[str, QuantizedTensor] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    hidden: list[torch.Tensor] | None = None  # final normed hidden states, when asked for


def is_ignored(name: str, ignore: Sequence[str]) -> bool:
    """True when a module name matches the ignore list (exact names or `re:` patterns)."""
    for pat in ignore:
        if pat.startswith("re:"):
            if re.fullmatch(pat[3:], name) or re.search(pat[3:] + "$", name):
                return True
        elif name == pat or name.endswith("." + pat):
            return True
    return False


def linears_to_quantize(model: nn.Module, ignore: Sequence[str]) -> dict[str, nn.Linear]:
    """Full name -> linear of every decoder-block linear not matched by `ignore`, in execution order."""
    return {k: v for k, v in ModelAdapter.for_model(model).all_linears().items() if not is_ignored(k, ignore)}


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def _catch_block_inputs(
    model: nn.Module, adapter: ModelAdapter, batches: list[torch.Tensor], device: torch.device,
    put: Callable[[torch.Tensor], Any] = lambda t: t,
) -> tuple[list[Any], list[list[dict[str, Any]]]]:
    """Run the model with every block stubbed out; record block inputs.

    Returns block-0 hidden states per batch (each passed through `put`: where they are kept)
    and kwargs[block][batch].
    """
    blocks = adapter.blocks()
    n_blocks = len(blocks)
    kwargs_per_block: list[list[dict[str, Any]]] = [[] for _ in range(n_blocks)]
    hidden0: list[torch.Tensor] = []
    # Only the small pre-block modules go to the device; the stubs skip block math.
    pre = [adapter.embed(), adapter.rotary(), adapter.final_norm()]
    pre = [m for m in pre if m is not None]
    homes = [next(m.parameters(), torch.empty(0)).device for m in pre]
    originals = {}

    def make_stub(i: int):
        def stub(hidden_states, *args, **kwargs):
            if args:
                raise RuntimeError("decoder block called with positional extras; adapter needs updating")
            kwargs = dict(kwargs)
            kwargs["use_cache"] = False
            # The cache argument is `past_key_values` up to transformers 5.23, `cache` from 5.24:
            # clear whichever this version passes (setting the other one only earns a warning).
            for key in _CACHE_KWARGS:
                if key in kwargs:
                    kwargs[key] = None
            kwargs_per_block[i].append(kwargs)
            if i == 0:
                hidden0.append(put(hidden_states))
            return hidden_states

        return stub

    try:
        for m in pre:
            m.to(device)
        for i, block in enumerate(blocks):
            originals[i] = block.forward
            block.forward = make_stub(i)
        base = model.get_submodule(adapter.spec.blocks.rsplit(".", 1)[0])  # e.g. model.model
        for ids in batches:
            base(input_ids=ids.to(device), use_cache=False)
    finally:
        for i, block in enumerate(blocks):
            if i in originals:
                del block.forward  # drop the instance attribute; the class method shows again
        for m, home in zip(pre, homes):
            m.to(home)
    return hidden0, kwargs_per_block


def _block_output(out: Any) -> torch.Tensor:
    # transformers 5 returns a tensor; older versions a tuple whose first item is it.
    return out[0] if isinstance(out, tuple) else out


def _put_back(block: nn.Module, home: torch.device, stream, name: str) -> None:
    """A finished block goes back where it came from; a streamed one is dropped (it is saved)."""
    if stream is not None:
        stream.release(name)
    else:
        block.to(home)


@torch.no_grad()
def run_layerwise(
    model: nn.Module,
    input_ids: torch.Tensor | None,
    methods: Sequence[Method],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    ignore: Sequence[str] = (),
    on_block: ProgressFn | None = None,
    return_hidden: bool = False,
    checkpointer: Checkpointer | None = None,
    stream=None,
    activations: str = "device",
) -> PipelineResult:
    """Calibrate `model` block by block on `input_ids` (samples, seqlen) with `methods` in order.

    input_ids None = data-free: only methods that need no statistics (RTN) may
    run, and no block is ever executed. The model stays where it is (CPU); each
    block visits `device` in turn.
    Methods change the block's weights in place. Returns the quantized tensors,
    warnings and, if asked, the final (normed) hidden states per batch.
    checkpointer (quantkit.calib.resume.Checkpointer): blocks it already holds are
    restored from disk and only run forward (to rebuild the next block's inputs);
    every newly finished block is saved to it. None: nothing is saved.
    stream (quantkit.models.streaming.StreamedModel): `model` is its meta skeleton; blocks are
    read when reached and released when saved; needs a checkpointer, and `results` is then
    its lazy view of the saved blocks (nothing of them stays in memory).
    activations: where the hidden states between blocks wait ("device", "host" or "disk";
    quantkit.calib.activations): off the device, one batch at a time visits it.
    """
    device = torch.device(device)
    store = ActivationStore(activations, device, folder=checkpointer.path.parent if checkpointer else None)
    try:
        with store:
            return _run(model, input_ids, methods, device, batch_size, ignore, on_block, return_hidden, checkpointer,
                        stream, store)
    finally:
        if stream is not None:
            stream.close()


def _run(model, input_ids, methods, device, batch_size, ignore, on_block, return_hidden, checkpointer, stream,
         store: ActivationStore) -> PipelineResult:
    adapter = ModelAdapter.for_model(model)
    blocks = adapter.blocks()
    n = len(blocks)
    kinds = frozenset().union(*(m.stats for m in methods)) if methods else frozenset()
    data_free = input_ids is None
    if stream is not None and (checkpointer is None or return_hidden):
        raise ValueError("a streamed run saves every block to a checkpointer and returns no hidden states")
    if data_free:
        if any(m.uses_data for m in methods) or return_hidden:
            raise ValueError(f"methods {[m.name for m in methods]} need calibration data")
        hidden, kwargs_per_block = [], [[] for _ in range(n)]
    else:
        batches = list(input_ids.split(batch_size))
        pre = [adapter.spec.embed, adapter.spec.final_norm] if stream is not None else []
        for name in pre:
            stream.load(name)
        try:
            hidden, kwargs_per_block = _catch_block_inputs(model, adapter, batches, device, store.put)
        finally:
            for name in pre:
                stream.release(name)
    label = " + ".join(m.name for m in methods) or "pass"
    result = PipelineResult()
    start = checkpointer.start_block(n) if checkpointer is not None else 0

    for i, block in enumerate(blocks):
        name = adapter.block_name(i)
        if on_block is not None:
            on_block(i, n, name, "restored" if i < start else label)
        if stream is not None:
            stream.load(name)
            if i + 1 < n:  # the next block is read from disk while this one calibrates
                stream.prefetch(adapter.block_name(i + 1))
        home = next(block.parameters()).device
        if i < start:
            # Finished in an earlier run: load it, and rerun it only to rebuild the
            # next block's inputs (the same ops on the same data: identical bits on CPU).
            restored, warns = checkpointer.restore_block(i, block)
            if stream is None:
                result.results.update(restored)
            result.warnings.extend(warns)
        block.to(device)
        kwargs = [_to(kw, device) for kw in kwargs_per_block[i]]

        def forward(_block=block, _kwargs=kwargs) -> list[torch.Tensor]:
            return [_block_output(_block(store.get(h), **kw)) for h, kw in zip(hidden, _kwargs)]

        def propagate(_block=block, _kwargs=kwargs) -> list[Any]:
            # The next block's inputs, stored batch by batch as they are made.
            return [store.put(_block_output(_block(store.get(h), **kw))) for h, kw in zip(hidden, _kwargs)]

        if i < start:
            outputs = [] if data_free else propagate()
            store.drop(hidden)
            hidden = outputs
            _put_back(block, home, stream, name)
            del kwargs
            continue

        linears = {k: v for k, v in adapter.block_linears(i).items() if not is_ignored(k, ignore)}
        # The capture pass only runs when it has something to record, or when no method will
        # change the block (its outputs are then the next block's inputs). Methods that collect
        # their own statistics (GPTQ) ask for none: the block is run after they apply instead.
        with capture_inputs(linears, kinds) as stats:
            outputs = [] if data_free or (methods and not kinds) else (propagate() if not methods else forward())
        if methods:
            ctx = BlockContext(i, name, block, linears, stats, forward, device, spec=adapter.spec)
            for method in methods:
                method.apply_block(ctx)
            if stream is None:
                result.results.update(ctx.results)
            result.warnings.extend(ctx.warnings)
            if not data_free:
                outputs = propagate()  # propagate the quantized block's outputs
            if checkpointer is not None:
                checkpointer.save_block(i, block, ctx.results, ctx.warnings, n, name)
        store.drop(hidden)
        hidden = outputs
        _put_back(block, home, stream, name)
        del stats, kwargs

    if stream is not None:
        result.results = checkpointer.lazy_results()
    if return_hidden:
        norm = adapter.final_norm()
        home = next(norm.parameters()).device
        norm.to(device)
        result.hidden = [norm(store.get(h)) for h in hidden]
        norm.to(home)
    return result
