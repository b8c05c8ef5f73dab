"""Forward passes that start at a decoder block, for the selection's restore gains.

A restore gain puts one unit back in float, and every decoder block before the unit's block then computes
exactly what the all-quantized model computes. So instead of a whole forward per unit, `BlockPrefix` keeps
the all-quantized input of one block for every window and runs the model from there: the blocks before it
are stubbed (the last one hands over the kept hidden states), the rest, the final norm and the head run as
usual. Units are measured in model order, so the kept input only moves forward, one block's compute per
block. On the default model (30 blocks, a head the size of ~8 blocks) that is about 0.6 of a forward per unit.

Same batches, same kernels, same inputs to the first real block: the numbers are those of a whole forward.
`BlockPrefix.agrees` checks that once against the whole-forward NLL before it is trusted (an architecture
whose blocks talk other than through the hidden states would fail it, and the selection keeps whole forwards).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager

import torch
from torch import nn

from quantkit.eval.perplexity import batch_nll
from quantkit.models.adapter import ModelAdapter, UnsupportedModelError, stubbed_forwards


class _Stop(Exception):
    """Raised by the hook on the last block to run when only the hidden states are wanted."""


class BlockPrefix:
    """Per-window NLL of `model` on `windows`, with the blocks before a given one taken from kept outputs.

    The kept hidden states are those of the model as it is when they are computed (the caller keeps the
    blocks before any later start unchanged while it uses them): n x seqlen x hidden on the model's device.
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_size: int):
        self.model = model
        adapter = ModelAdapter.for_model(model)
        self.blocks = adapter.blocks()
        self._prefixes = [adapter.block_name(i) + "." for i in range(len(self.blocks))]
        self.windows = windows
        self.batch_size = batch_size
        self.at = 0  # the kept hidden states are the input of block `at` (nothing is kept at 0)
        self.hidden: list[torch.Tensor] = []  # per batch
        self.tuple_out = False  # blocks return (hidden, ...) (transformers 4) rather than the tensor
        self._batch = 0

    @classmethod
    def try_for(cls, model: nn.Module, windows: torch.Tensor, batch_size: int) -> "BlockPrefix | None":
        """One for `model`, or None when its blocks cannot be found (an architecture the adapter lacks)."""
        try:
            prefix = cls(model, windows, batch_size)
        except (UnsupportedModelError, AttributeError):  # blocks not found: whole forwards
            return None
        return prefix if len(prefix.blocks) > 1 else None

    def block_of(self, names: Iterable[str]) -> int:
        """The first block holding any of `names` (0 when none is inside a block: a whole forward)."""
        found = [i for n in names for i, p in enumerate(self._prefixes) if n.startswith(p)]
        return min(found, default=0)

    def agrees(self, whole: torch.Tensor, *, rtol: float = 1e-6) -> bool:
        """Whether starting at the middle block gives the per-window NLL `whole` (a whole forward of the model
        in its present state). The kept states are dropped afterwards (the next `nll` starts from block 0)."""
        try:
            got = self.nll(len(self.blocks) // 2)
        except Exception:  # noqa: BLE001 - blocks that do not pass hidden states along: whole forwards instead
            return False
        finally:
            self.at, self.hidden = 0, []
        return bool(torch.allclose(got, whole.to(got.dtype), rtol=rtol, atol=0.0))

    @torch.no_grad()
    def nll(self, start: int) -> torch.Tensor:
        """Summed next-token NLL per window, float64 (n,), with blocks before `start` not run."""
        self._advance(start)
        out = torch.empty(self.windows.shape[0], dtype=torch.float64)
        with self._stubbed(start):
            for b, (lo, ids) in enumerate(self._batches()):
                self._batch = b
                out[lo : lo + ids.shape[0]] = batch_nll(self.model, ids)
        return out

    def _batches(self) -> Iterator[tuple[int, torch.Tensor]]:
        dev = next(self.model.parameters()).device
        for lo in range(0, self.windows.shape[0], self.batch_size):  # the batches of window_nll
            yield lo, self.windows[lo : lo + self.batch_size].to(dev)

    def _advance(self, start: int) -> None:
        """Keep the input of block `start`: from the kept states (or the embeddings), run up to it and stop."""
        if start < self.at:
            self.at, self.hidden = 0, []
        if start == self.at:
            return
        kept: list[torch.Tensor] = []

        def stop(_mod, _args, out):
            self.tuple_out = isinstance(out, tuple)
            kept.append(out[0] if self.tuple_out else out)
            raise _Stop

        handle = self.blocks[start - 1].register_forward_hook(stop)
        try:
            with self._stubbed(self.at):
                for b, (_lo, ids) in enumerate(self._batches()):
                    self._batch = b
                    try:
                        self.model(input_ids=ids, use_cache=False)
                    except _Stop:
                        pass
        finally:
            handle.remove()
        if len(kept) != -(-self.windows.shape[0] // self.batch_size):
            raise RuntimeError(f"block {start - 1} ran {len(kept)} times for the batches of the windows")
        self.at, self.hidden = start, kept

    def _stubbed(self, start: int) -> AbstractContextManager[None]:
        """Blocks before `start` skip their math: they pass their input on, the last hands over the kept states."""

        def skip(hidden_states, *_args, **_kwargs):
            return (hidden_states,) if self.tuple_out else hidden_states

        def handover(hidden_states, *_args, **_kwargs):
            h = self.hidden[self._batch]
            return (h,) if self.tuple_out else h

        return stubbed_forwards((self.blocks[i], handover if i == start - 1 else skip) for i in range(start))
