"""Layer-by-layer calibration: one decoder block on the device at a time.

1. Catch what every block receives: each block's forward is swapped for a
   recorder that keeps its keyword arguments (masks, rotary embeddings: one
   forward of the embeddings, no block math) and block 0's hidden states.
2. For each block: move it to the device; run a capture pass with hooks that
   accumulate the statistics the methods asked for (and show each consumer the
   inputs and outputs of the linears it taps); let each method apply; run the
   block again so the next block sees the quantized outputs; move the block back.

When a method asks for the float model's inputs (`Method.needs_reference`: GPTQ's
asymmetric calibration), a second stream of activations goes along: each block, before
any method changes it, is also run on the float stream, so every block sees both what
the quantized model gives it and what the float model would have.

With no method applied, the final hidden states equal the full model's forward
(tested), so any difference after quantization is the methods' doing.

Consumers (`BlockConsumer`) look without changing anything: the sensitivity scan is
a run with one consumer and no method, so it gets streaming and activation offload
from the same loop the methods use.

Streamed (`stream`, quantkit.models.streaming.StreamedModel): the model is a meta
skeleton; the embeddings are read for step 1 only, each block is read from the
safetensors shards when its turn comes and dropped once done (a changed block once
the checkpointer has saved it), and the results stay on disk (the checkpointer's lazy
view), so host memory holds one block however deep the model is.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from quantkit.calib.activations import ActivationStore
from quantkit.calib.capture import capture_inputs
from quantkit.calib.resume import Checkpointer
from quantkit.methods.base import BlockContext, Method
from quantkit.models.adapter import ModelAdapter, stubbed_forwards
from quantkit.quant.core import QuantizedTensor

# on_block(index, total, block_name, phase) -> None; phase is a short label for progress.
ProgressFn = Callable[[int, int, str, str], None]
# tap(x, y) on each call of a linear: x its input (..., in_features), y its output (..., out_features),
# both on the device, as the block computes them; a tap must not change them.
LinearTap = Callable[[torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class BlockView:
    """What a consumer sees of the block being run: on the device, not yet changed by any method.

    linears: full name -> linear of the block's linears not ignored, in execution order."""

    index: int
    name: str  # e.g. model.layers.3
    block: nn.Module
    linears: dict[str, nn.Module]
    device: torch.device


class BlockConsumer(Protocol):
    """Looks at every block the pipeline computes, changing nothing.

    Per block: `begin(view)` with the block on the device returns the taps to put on some of
    view.linears; the block then runs on every calibration batch in order, each tap called
    once per call of its linear; `end(view)` follows, the block still on the device.
    `name` labels the run's progress (empty: a helper the label does not show)."""

    name: str

    def begin(self, view: BlockView) -> Mapping[str, LinearTap]: ...

    def end(self, view: BlockView) -> None: ...


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


_CACHE_KWARGS = ("past_key_values", "past_key_value", "cache")


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
        with stubbed_forwards((block, make_stub(i)) for i, block in enumerate(blocks)):
            base = model.get_submodule(adapter.spec.blocks.rsplit(".", 1)[0])  # e.g. model.model
            for ids in batches:
                base(input_ids=ids.to(device), use_cache=False)
    finally:
        for m, home in zip(pre, homes):
            m.to(home)
    return hidden0, kwargs_per_block


def _block_output(out: Any) -> torch.Tensor:
    # transformers 5 returns a tensor; older versions a tuple whose first item is it.
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def _tapped(linears: dict[str, nn.Module], taps: Sequence[Mapping[str, LinearTap]]) -> Iterator[None]:
    """Forward hooks that hand each named linear's (input, output) to its taps; always removed."""
    handles = []
    try:
        for tap in taps:
            for name, fn in tap.items():
                if name not in linears:
                    raise ValueError(f"a consumer tapped {name}, which is not one of the block's linears")

                def hook(_mod, args, output, _fn=fn):
                    _fn(args[0], output)  # returns None: the output is left alone

                handles.append(linears[name].register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


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
    consumers: Sequence[BlockConsumer] = (),
) -> PipelineResult:
    """Calibrate `model` block by block on `input_ids` (samples, seqlen) with `methods` in order.

    input_ids None = data-free: only methods that need no statistics (RTN) may
    run, and no block is ever executed. The model stays where it is (CPU); each
    block visits `device` in turn.
    Methods change the block's weights in place. Returns the quantized tensors,
    warnings and, if asked, the final (normed) hidden states per batch.
    consumers (BlockConsumer): look at each block's linears before any method changes
    the block; with no method they are the whole run (the sensitivity scan).
    checkpointer (quantkit.calib.resume.Checkpointer): blocks it already holds are
    restored from disk and only run forward (to rebuild the next block's inputs; consumers
    do not see them); every newly finished block is saved to it. None: nothing is saved.
    stream (quantkit.models.streaming.StreamedModel): `model` is its meta skeleton; blocks are
    read when reached and released when done; with methods it needs a checkpointer (a changed
    block is only kept on disk), and `results` is then its lazy view of the saved blocks.
    activations: where the hidden states between blocks wait ("device", "host" or "disk";
    quantkit.calib.activations): off the device, one batch at a time visits it.
    """
    device = torch.device(device)
    try:
        _check_request(methods, consumers, input_ids is None, return_hidden, checkpointer, stream)
        store = ActivationStore(activations, device, folder=checkpointer.path.parent if checkpointer else None)
        run = _Run(model, methods, consumers, device, ignore, store, checkpointer, stream)
        with store:
            run.catch_inputs(input_ids, batch_size)
            run.run_blocks(on_block)
            return run.finish(return_hidden)
    finally:
        if stream is not None:
            stream.close()


def _check_request(methods, consumers, data_free: bool, return_hidden: bool, checkpointer, stream) -> None:
    if stream is not None and ((methods and checkpointer is None) or return_hidden):
        raise ValueError("a streamed run saves every changed block to a checkpointer and returns no hidden states")
    if data_free and (any(m.uses_data for m in methods) or return_hidden or consumers):
        who = " + ".join([m.name for m in methods] + [c.name for c in consumers]) or "return_hidden"
        raise ValueError(f"{who} needs calibration data (input_ids)")


class _Run:
    """One layer-wise run: the current block's inputs (handles in the activation store) and the results."""

    def __init__(self, model, methods, consumers, device, ignore, store: ActivationStore, checkpointer, stream):
        self.model = model
        self.adapter = ModelAdapter.for_model(model)
        self.methods = list(methods)
        self.consumers = list(consumers)
        self.kinds = frozenset().union(*(m.stats for m in self.methods)) if self.methods else frozenset()
        self.device = device
        self.ignore = ignore
        self.store = store
        self.checkpointer = checkpointer
        self.stream = stream
        self.result = PipelineResult()
        self.hidden: list[Any] = []  # the current block's inputs, one handle per batch
        # the float model's inputs to the current block (handles), when a method needs them
        self.reference: list[Any] | None = [] if any(m.needs_reference for m in self.methods) else None
        self.kwargs_per_block: list[list[dict[str, Any]]] = []

    def catch_inputs(self, input_ids: torch.Tensor | None, batch_size: int) -> None:
        n = len(self.adapter.blocks())
        if input_ids is None:  # data-free: no batch, so no block is ever run
            self.kwargs_per_block = [[] for _ in range(n)]
            return
        batches = list(input_ids.split(batch_size))
        # streamed: only the parts that run before the blocks are read for the catch
        pre = [self.adapter.spec.embed, self.adapter.spec.final_norm] if self.stream is not None else []
        for name in pre:
            self.stream.load(name)
        try:
            self.hidden, self.kwargs_per_block = _catch_block_inputs(
                self.model, self.adapter, batches, self.device, self.store.put)
            if self.reference is not None:  # block 0's inputs are the same in both models: shared, not copied
                self.reference = list(self.hidden)
        finally:
            for name in pre:
                self.stream.release(name)

    def run_blocks(self, on_block: ProgressFn | None) -> None:
        blocks = self.adapter.blocks()
        n = len(blocks)
        label = " + ".join([m.name for m in self.methods] + [c.name for c in self.consumers if c.name]) or "pass"
        start = self.checkpointer.start_block(n) if self.checkpointer is not None else 0
        for i, block in enumerate(blocks):
            name = self.adapter.block_name(i)
            if on_block is not None:
                on_block(i, n, name, "restored" if i < start else label)
            if self.stream is not None:
                self.stream.load(name)
                if i + 1 < n:  # the next block is read from disk while this one calibrates
                    self.stream.prefetch(self.adapter.block_name(i + 1))
            home = next(block.parameters()).device
            try:
                if i < start:
                    self._replay(i, block)
                else:
                    self._calibrate(i, name, block, n)
            finally:  # also on error: the model is left where it was (a streamed block is dropped)
                if self.stream is not None:
                    self.stream.release(name)
                else:
                    block.to(home)

    def _replay(self, i: int, block: nn.Module) -> None:
        """A block finished in an earlier run: load it, and rerun it only to rebuild the next block's
        inputs (the same ops on the same data: identical bits on CPU)."""
        kwargs = self._kwargs(i)
        ref_out = self._reference_outputs(block, kwargs)  # first: the restore replaces the float weights
        restored, warns = self.checkpointer.restore_block(i, block)
        if self.stream is None:
            self.result.results.update(restored)
        self.result.warnings.extend(warns)
        block.to(self.device)
        self._advance(self._propagate(block, kwargs), ref_out)

    def _calibrate(self, i: int, name: str, block: nn.Module, n: int) -> None:
        block.to(self.device)
        kwargs = self._kwargs(i)
        linears = {k: v for k, v in self.adapter.block_linears(i).items() if not is_ignored(k, self.ignore)}
        view = BlockView(i, name, block, linears, self.device)
        taps = [c.begin(view) for c in self.consumers]
        # The first pass runs when it has something to record or show, or when no method will change
        # the block (its outputs are then the next block's inputs). Methods that collect their own
        # statistics (GPTQ) ask for none: the block is run after they apply instead.
        # (Data-free, there are no batches: every pass below runs nothing.)
        outputs: list[Any] = []
        with capture_inputs(linears, self.kinds) as stats, _tapped(linears, taps):
            if not self.methods:
                outputs = self._propagate(block, kwargs)
            elif self.kinds or any(taps):
                for _ in self._outputs(block, kwargs):
                    pass  # the hooks record; the next block's inputs come once the methods have applied
        for c in self.consumers:
            c.end(view)
        ref_out = self._reference_outputs(block, kwargs)  # before any method changes the block
        if self.methods:
            outputs = self._apply_methods(i, name, block, linears, stats, kwargs, n)
        self._advance(outputs, ref_out)

    def _apply_methods(self, i, name, block, linears, stats, kwargs, n) -> list[Any]:
        """Let each method change the block; returns the next block's inputs (the changed block's outputs)."""
        ref = self.reference
        ctx = BlockContext(i, name, block, linears, stats, lambda: list(self._outputs(block, kwargs)), self.device,
                           spec=self.adapter.spec, batch=lambda j: (self.store.get(self.hidden[j]), kwargs[j]),
                           n_batches=len(self.hidden),
                           reference=None if ref is None else (lambda j: (self.store.get(ref[j]), kwargs[j])))
        for method in self.methods:
            method.apply_block(ctx)
        if self.stream is None:
            self.result.results.update(ctx.results)
        self.result.warnings.extend(ctx.warnings)
        outputs = self._propagate(block, kwargs)
        if self.checkpointer is not None:
            self.checkpointer.save_block(i, block, ctx.results, ctx.warnings, n, name)
        return outputs

    def _kwargs(self, i: int) -> list[dict[str, Any]]:
        return [_to(kw, self.device) for kw in self.kwargs_per_block[i]]

    def _outputs(self, block: nn.Module, kwargs) -> Iterator[torch.Tensor]:
        """The block's outputs on the device, batch by batch."""
        for h, kw in zip(self.hidden, kwargs):
            yield _block_output(block(self.store.get(h), **kw))

    def _propagate(self, block: nn.Module, kwargs) -> list[Any]:
        # The next block's inputs, stored batch by batch as they are made.
        return [self.store.put(y) for y in self._outputs(block, kwargs)]

    def _reference_outputs(self, block: nn.Module, kwargs) -> list[Any] | None:
        """The float block's outputs on the float model's inputs (the next block's reference), or None when no
        method needs them. The block must still be the float one (transforms that keep its function are fine)."""
        if self.reference is None:
            return None
        block.to(self.device)
        return [self.store.put(_block_output(block(self.store.get(h), **kw))) for h, kw in zip(self.reference, kwargs)]

    def _advance(self, outputs: list[Any], reference: list[Any] | None = None) -> None:
        if self.reference is not None:
            shared = {id(h) for h in self.hidden}  # block 0's inputs serve both streams (dropped once)
            self.store.drop([r for r in self.reference if id(r) not in shared])
            self.reference = reference
        self.store.drop(self.hidden)
        self.hidden = outputs

    def finish(self, return_hidden: bool) -> PipelineResult:
        if self.stream is not None and self.checkpointer is not None:
            self.result.results = self.checkpointer.lazy_results()
        if return_hidden:
            norm = self.adapter.final_norm()
            home = next(norm.parameters()).device
            norm.to(self.device)
            self.result.hidden = [norm(self.store.get(h)) for h in self.hidden]
            norm.to(home)
        return self.result
