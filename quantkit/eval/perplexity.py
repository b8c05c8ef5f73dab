"""Perplexity on token windows: exp(mean next-token NLL), every window scored the same way."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens: windows x (seqlen - 1)
    windows: int

    @classmethod
    def of(cls, window_nlls: torch.Tensor, seqlen: int) -> "Perplexity":
        """From the summed NLL of each window (n,) of `seqlen` tokens (`window_nll`)."""
        n = int(window_nlls.shape[0])
        count = n * (seqlen - 1)
        mean = float(window_nlls.sum()) / count
        return cls(ppl=math.exp(mean), nll=mean, tokens=count, windows=n)

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "nll": self.nll, "tokens": self.tokens, "windows": self.windows}


@torch.no_grad()
def window_nll(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 4,
    device: torch.device | str | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Summed next-token NLL of each window (n, seqlen): float64 (n,), position t predicts token t+1.

    The model is run where its parameters are (or moved to `device` if given).
    """
    if device is not None:
        model.to(device)
    dev = next(model.parameters()).device
    n = windows.shape[0]
    out = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, batch_size):
        ids = windows[start : start + batch_size].to(dev)
        out[start : start + ids.shape[0]] = batch_nll(model, ids)
        if on_batch is not None:
            on_batch(min(start + batch_size, n), n)
    return out


def batch_nll(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of each row of one batch of windows `ids` (b, seqlen, on the model's device):
    float64 (b,) on the CPU."""
    logits = model(input_ids=ids, use_cache=False).logits  # (b, seqlen, vocab)
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="none"
    )
    return loss.view(ids.shape[0], -1).double().sum(-1).cpu()


def perplexity(model: nn.Module, windows: torch.Tensor, **options) -> Perplexity:
    """Score windows (n, seqlen): exp of the mean next-token NLL over all of them.

    options: those of `window_nll` (batch_size, device, on_batch). Loss is accumulated in float64 so the
    sum over many tokens stays exact.
    """
    return Perplexity.of(window_nll(model, windows, **options), int(windows.shape[1]))
