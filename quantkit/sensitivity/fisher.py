"""Gradient-weighted (Fisher) output error of each linear.

For linear l with float output y and quantized output yq = fq_a(x) fq_w(W)^T + b
(same input x), the loss changes to first order by g . (yq - y), g = dloss/dy of
the float model. The diagonal-Fisher estimate of the damage is

    fisher_l = sum over tokens and channels of (g * (yq - y))^2 / tokens

It weights the output error by how much the loss cares about each channel and
token, which rel_err (a plain relative error) cannot. It needs one forward and
one backward pass of the whole float model per calibration window (next-token
loss on the window itself); weights get no gradients (requires_grad is switched
off and restored), the gradient flows from the input embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.quant.core import fake_quantize_activations
from quantkit.recipe import Scheme
from quantkit.sensitivity.weights import RTN, ScanWeights


def weighted_error(dy: torch.Tensor, grad: torch.Tensor) -> float:
    """sum((grad * dy)^2) in float64; dy, grad: same shape (..., out_features)."""
    if dy.shape != grad.shape:
        raise ValueError(f"output error and gradient shapes differ: {tuple(dy.shape)} vs {tuple(grad.shape)}")
    return float((grad.double() * dy.double()).square().sum())


def fisher_scores(
    model: nn.Module,
    input_ids: torch.Tensor,
    scheme: Scheme,
    names: Sequence[str],
    *,
    device: torch.device | str = "cpu",
    per_window: bool = False,
    weights: ScanWeights = RTN,
) -> dict[str, float] | dict[str, torch.Tensor]:
    """fisher_l for each named linear over the windows `input_ids` (n, seqlen), one window per backward pass.

    per_window: instead, each window's own fisher_l, float64 (n,) per name (their mean is fisher_l when
    the windows have one length), so a cross-validated selection can sum them over its training windows.
    The model is moved to `device` for the passes and back afterwards; weights are unchanged.
    weights: the quantized weights fq_w(W) (quantkit.sensitivity.weights; default the scheme's RTN).
    """
    device = torch.device(device)
    home = next(model.parameters()).device
    linears = {n: model.get_submodule(n) for n in names}
    # fq_w(W) once per linear, float32 on the device (not per window)
    wq = {n: weights.quantized(n, lin.weight.data.float(), scheme.weights).to(device) for n, lin in linears.items()}
    acts = scheme.input_activations
    totals = {n: 0.0 for n in names}
    rows = {n: torch.zeros(input_ids.shape[0], dtype=torch.float64) for n in names}
    tokens = 0
    req = [p.requires_grad for p in model.parameters()]
    handles = []
    model.to(device)
    try:
        model.requires_grad_(False)

        def on_forward(name):
            lin = linears[name]

            def hook(_mod, args, output):
                if not output.requires_grad:
                    return
                x = args[0].detach()

                def on_grad(g):
                    with torch.no_grad():
                        xf = x.float()
                        xq = fake_quantize_activations(xf, acts) if acts is not None else xf
                        bias = None if lin.bias is None else lin.bias.float()
                        dy = F.linear(xq, wq[name], bias) - F.linear(xf, lin.weight.float(), bias)
                        totals[name] += weighted_error(dy, g.float())

                output.register_hook(on_grad)

            return hook

        for n, lin in linears.items():
            handles.append(lin.register_forward_hook(on_forward(n)))
        embed = model.get_input_embeddings()
        for w, ids in enumerate(input_ids.split(1)):
            ids = ids.to(device)
            before = dict(totals)
            with torch.no_grad():
                emb = embed(ids)
            emb = emb.detach().requires_grad_(True)
            with torch.enable_grad():
                loss = model(inputs_embeds=emb, labels=ids).loss
                loss.backward()
            tokens += ids.numel()
            for n in names:
                rows[n][w] = (totals[n] - before[n]) / ids.numel()
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
        model.to(home)
    if per_window:
        return rows
    return {n: v / max(tokens, 1) for n, v in totals.items()}
