"""Streaming statistics of linear-layer inputs, collected by hooks that always come off.

Stats are accumulated batch by batch (never by storing activations):
  "abs_mean"  per input channel mean |x|          (AWQ)
  "abs_max"   per input channel max |x|           (SmoothQuant, scans)
  "hessian"   X^T X summed, float32, (in, in)     (GPTQ: H = 2 X^T X / n)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

STAT_KINDS = frozenset({"abs_mean", "abs_max", "hessian"})


class InputStats:
    """Running statistics of one linear's inputs. Everything float32, on the input's device."""

    def __init__(self, kinds: Iterable[str]):
        self.kinds = frozenset(kinds)
        unknown = self.kinds - STAT_KINDS
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)}; known: {sorted(STAT_KINDS)}")
        self.count = 0  # rows (tokens) seen
        self.abs_sum: torch.Tensor | None = None
        self.abs_max: torch.Tensor | None = None
        self.xtx: torch.Tensor | None = None

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        # x: (..., in_features)
        x = x.reshape(-1, x.shape[-1]).float()
        self.count += x.shape[0]
        if "abs_mean" in self.kinds:
            s = x.abs().sum(dim=0)
            self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        if "abs_max" in self.kinds:
            m = x.abs().amax(dim=0)
            self.abs_max = m if self.abs_max is None else torch.maximum(self.abs_max, m)
        if "hessian" in self.kinds:
            # one GEMM accumulating in place (no per-batch product tensor and add)
            self.xtx = x.T @ x if self.xtx is None else self.xtx.addmm_(x.T, x)

    @property
    def abs_mean(self) -> torch.Tensor:
        if self.abs_sum is None:
            raise RuntimeError("abs_mean was not collected")
        return self.abs_sum / max(self.count, 1)

    @property
    def hessian(self) -> torch.Tensor:
        """H = 2 X^T X / n (in, in), the GPTQ convention."""
        if self.xtx is None:
            raise RuntimeError("hessian was not collected")
        return self.xtx * (2.0 / max(self.count, 1))


@contextmanager
def capture_inputs(linears: dict[str, nn.Module], kinds: Iterable[str]) -> Iterator[dict[str, InputStats]]:
    """Collect `kinds` of statistics on the inputs of each named module while the block runs.

    Yields {name: InputStats}. Hooks are removed on exit, also on error. With no
    kinds asked for, no hook is added at all (the pass costs nothing extra).
    """
    kinds = frozenset(kinds)
    stats = {name: InputStats(kinds) for name in linears} if kinds else {}
    handles = []
    try:
        for name, module in linears.items():
            if not kinds:
                break

            def hook(_mod, args, _name=name):
                stats[_name].add(args[0])

            handles.append(module.register_forward_pre_hook(hook))
        yield stats
    finally:
        for h in handles:
            h.remove()
