"""Gradient-weighted (Fisher) output error: known answers on hand-made tensors, a tiny-model reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from tiny_models import make_tiny_model
from quantkit.quant.core import fake_quantize, fake_quantize_activations
from quantkit.recipe import PRESETS, QuantArgs, Scheme
from quantkit.sensitivity.fisher import fisher_scores, weighted_error
from quantkit.sensitivity.run import run_scan

W8A8 = PRESETS["W8A8"]
W4G32 = Scheme(QuantArgs(4, 32, True))


def test_weighted_error_known_answer():
    dy = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    g = torch.tensor([[3.0, 0.5], [7.0, 2.0]])
    assert weighted_error(dy, g) == pytest.approx(9.0 + 1.0 + 0.0 + 4.0)
    assert weighted_error(dy, torch.zeros_like(g)) == 0.0  # the loss does not care: no damage
    with pytest.raises(ValueError, match="shapes differ"):
        weighted_error(dy, g[:1])


def _ids(n, seq, seed):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def test_fisher_matches_autograd_reference_and_leaves_model():
    model = make_tiny_model("llama", seed=3)
    ids = _ids(2, 16, 5)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.2.mlp.down_proj"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    req = [p.requires_grad for p in model.parameters()]
    got = fisher_scores(model, ids, W8A8, names)
    rows = fisher_scores(model, ids, W8A8, names, per_window=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == req and all(p.grad is None for p in model.parameters())
    # reference: capture (x, y) of each window, take dloss/dy with autograd.grad, weight the output error
    ref = {n: 0.0 for n in names}
    per = {n: [] for n in names}
    for row in ids.split(1):
        seen = {}
        hooks = [model.get_submodule(n).register_forward_hook(
            lambda m, a, o, n=n: seen.__setitem__(n, (a[0].detach(), o))) for n in names]
        emb = model.get_input_embeddings()(row).detach().requires_grad_(True)
        loss = model(inputs_embeds=emb, labels=row).loss
        grads = torch.autograd.grad(loss, [seen[n][1] for n in names])
        for h in hooks:
            h.remove()
        for n, g in zip(names, grads):
            x = seen[n][0]
            lin = model.get_submodule(n)
            with torch.no_grad():
                dy = F.linear(fake_quantize_activations(x, W8A8.input_activations),
                              fake_quantize(lin.weight, W8A8.weights)) - F.linear(x, lin.weight)
            ref[n] += float((g.double() * dy.double()).square().sum())
            per[n].append(float((g.double() * dy.double()).square().sum()) / row.numel())
    for n in names:
        assert got[n] == pytest.approx(ref[n] / ids.numel(), rel=1e-4) and got[n] > 0
        assert rows[n].tolist() == pytest.approx(per[n], rel=1e-4, abs=0)  # each window's own value
        assert abs(per[n][0] - per[n][1]) > 1e-2 * per[n][0] > 0
    model.zero_grad(set_to_none=True)


def test_fisher_in_scan_and_json_ranks_w4_above_w8():
    model = make_tiny_model("llama", seed=3)
    ids = _ids(4, 16, 1)
    w4 = run_scan(model, ids, W4G32, batch_size=2, bins=16, fisher_windows=2)
    w8 = run_scan(model, ids, PRESETS["W8A16"], batch_size=2, bins=16, fisher_windows=2)
    assert all(math.isfinite(e.fisher) and e.fisher > 0 for e in w4.layers)
    assert sum(e.fisher for e in w4.layers) > 10 * sum(e.fisher for e in w8.layers)  # 4-bit error >> 8-bit
    off = run_scan(model, ids, W4G32, batch_size=2, bins=16)
    assert all(math.isnan(e.fisher) for e in off.layers) and off.calibration["fisher_windows"] == 0
