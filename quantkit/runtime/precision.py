"""The runtime's precision bitmask: which rows of each linear run FP16 instead of their quantized path.

Three levels (../shared/ARCHITECTURE.md, "The runtime's precision control"):

* layer bits: a host flag on each `QuantLinear` (`force_fp16`). Sensitive linears of a mixed
  checkpoint start pinned to FP16 (their FP16 weight); `release(layer=...)` runs their quantized
  shadow instead. Forcing any other layer runs it with FP16 activations (W8A16 on its integers).
  Linears the runtime fused (q/k/v, gate/up) switch together: the fused unit is what runs.
* sample bits: (batch,) uint8 on the device, bit 0 = the whole request runs FP16.
* token-group bits: (batch, max_len // 64) uint8, bit 0 = that 64-token group of that request
  runs FP16 (a token range is widened to the 64-token groups it touches).

Per forward the model turns sample and group bits into per-row bits (`row_bits`, one launch of
`kernels.mixed.row_precision_bits` over static buffers, so CUDA graphs capture it) and hands them
to every QuantLinear through `StepControl`. A change takes effect at the next forward and rebuilds
nothing; rows whose bits did not change get bit-identical outputs (the W8A8 kernels keep INT8 rows
exact in mixed mode). While no sample or group bit is set the model passes no row bits at all, so
the quantized kernels run their plain fast path.
"""

from __future__ import annotations

import torch

from quantkit.errors import UsageError
from quantkit.kernels.mixed import TOKEN_GROUP, row_precision_bits


class PrecisionError(UsageError):
    """A precision switch names a layer, sample or token range the model does not have."""


class PrecisionState:
    def __init__(self, linears: dict[str, object], batch: int, max_len: int, device):
        """linears: member name -> the QuantLinear that runs it (a fused unit serves several names)."""
        self.linears = linears
        self.batch, self.max_len = batch, max_len
        self.groups = max(1, -(-max_len // TOKEN_GROUP))
        self.sample_bits = torch.zeros(batch, dtype=torch.uint8, device=device)
        self.group_bits = torch.zeros(batch, self.groups, dtype=torch.uint8, device=device)
        # host mirrors: whether any sample / group bit is set (no device sync to decide the fast path)
        self._samples: set[int] = set()
        self._groups: set[tuple[int, int]] = set()
        self.version = 0

    # ------------------------------------------------------------------ queries

    @property
    def any_rows(self) -> bool:
        """Some sample or token group runs FP16 (the model then passes row bits)."""
        return bool(self._samples or self._groups)

    def signature(self) -> tuple:
        """What a captured decode graph depends on: the layer flags and whether row bits are in use."""
        return (tuple(sorted({id(m) for m in self.linears.values() if m.force_fp16})), self.any_rows)

    def fp16_samples(self) -> list[int]:
        return sorted(self._samples)

    def fp16_tokens(self, sample: int, start: int, count: int) -> int:
        """How many of sample's positions [start, start + count) run FP16 rows (host bookkeeping)."""
        if sample in self._samples:
            return count
        if not self._groups:
            return 0
        return sum(1 for p in range(start, start + count) if (sample, p // TOKEN_GROUP) in self._groups)

    def row_bits(self, positions: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(B * S,) uint8 row bits for tokens at positions (B, S) (row b * S + s is sample b's token s)."""
        B, S = positions.shape
        sid = torch.arange(B, device=positions.device).view(B, 1).expand(B, S).reshape(-1)
        rb = row_precision_bits(sid, positions.reshape(-1), self.sample_bits[:B], self.group_bits[:B])
        return rb if out is None else out.copy_(rb)

    # ------------------------------------------------------------------ switches

    def _layer(self, name: str):
        m = self.linears.get(name)
        if m is None:
            raise PrecisionError(f"{name} is not a quantized linear of this model; "
                                 f"e.g. {next(iter(self.linears), 'none')}")
        return m

    def _sample(self, sample: int) -> int:
        if not isinstance(sample, int) or not 0 <= sample < self.batch:
            raise PrecisionError(f"sample {sample!r} is outside the batch (0..{self.batch - 1})")
        return sample

    def _group_range(self, tokens: tuple[int, int]) -> range:
        a, b = tokens
        if not (0 <= a < b <= self.max_len):
            raise PrecisionError(f"token range {tokens} is outside 0..{self.max_len}")
        return range(a // TOKEN_GROUP, (b - 1) // TOKEN_GROUP + 1)

    def _set(self, on: bool, layer, sample, tokens) -> None:
        if layer is None and sample is None and tokens is None:
            raise PrecisionError("name a layer, a sample or a token range")
        if layer is not None:
            self._layer(layer).force_fp16 = on
        if tokens is not None:
            samples = range(self.batch) if sample is None else [self._sample(sample)]
            for g in self._group_range(tokens):
                for s in samples:
                    self.group_bits[s, g] = int(on)
                    (self._groups.add if on else self._groups.discard)((s, g))
        elif sample is not None:
            s = self._sample(sample)
            self.sample_bits[s] = int(on)
            (self._samples.add if on else self._samples.discard)(s)
        self.version += 1

    def force_fp16(self, *, layer: str | None = None, sample: int | None = None,
                   tokens: tuple[int, int] | None = None) -> None:
        """Run FP16 from the next forward on: a layer (all its rows), a sample (all its tokens), or a
        token range [start, end) of one sample (or of every sample when `sample` is None)."""
        self._set(True, layer, sample, tokens)

    def release(self, *, layer: str | None = None, sample: int | None = None,
                tokens: tuple[int, int] | None = None) -> None:
        """Undo `force_fp16` (a pinned sensitive layer then runs its quantized shadow)."""
        self._set(False, layer, sample, tokens)

    def reset_requests(self) -> None:
        """Clear every sample and token-group bit (a new batch of requests); layer flags stay."""
        self.sample_bits.zero_()
        self.group_bits.zero_()
        self._samples.clear()
        self._groups.clear()
        self.version += 1
