"""Mixture-of-experts blocks with one `nn.Linear` per expert projection.

transformers 5 stores a sparse MoE block's experts as two 3-D parameters
(`gate_up_proj` (E, 2I, H), `down_proj` (E, H, I)); checkpoints on disk and vLLM
name them per expert (`experts.N.gate_proj` / Mixtral's `experts.N.w1`). Every
method in quantkit works on `nn.Linear`, so the adapter swaps the fused module for
`UnfusedExperts` (same forward, same numbers): each expert's linears are then
ordinary modules whose hooks see exactly the tokens the router sent to that expert,
which is what per-expert calibration statistics need, and whose state-dict names are
the checkpoint's. The router is not a linear here (transformers' TopKRouter), so no
method touches it: it stays in high precision.
"""

from __future__ import annotations

import torch
from torch import nn


class ExpertMLP(nn.Module):
    """One expert: act(gate(x)) * up(x) -> down, with the checkpoint's names for the three linears."""

    def __init__(self, names: tuple[str, str, str], gate: nn.Linear, up: nn.Linear, down: nn.Linear, act_fn):
        super().__init__()
        self.names = names
        for n, lin in zip(names, (gate, up, down)):
            self.add_module(n, lin)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u, d = (getattr(self, n) for n in self.names)
        return d(self.act_fn(g(x)) * u(x))


class UnfusedExperts(nn.ModuleList):
    """A ModuleList of ExpertMLP with transformers' Experts forward (hidden, top_k_index, top_k_weights)."""

    @torch.no_grad()
    def __init__(self, fused: nn.Module, names: tuple[str, str, str]):
        gu, dn = fused.gate_up_proj, fused.down_proj  # (E, 2I, H), (E, H, I)
        n_exp, two_i, hidden = gu.shape
        inter = two_i // 2
        experts = []
        for e in range(n_exp):
            lins = []
            for w in (gu[e, :inter], gu[e, inter:], dn[e]):
                lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
                lin.weight = nn.Parameter(w.clone(), requires_grad=False)  # own storage: saved and quantized alone
                lins.append(lin)
            experts.append(ExpertMLP(names, *lins, fused.act_fn))
        super().__init__(experts)
        self.num_experts = n_exp

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        # hidden_states: (tokens, hidden); top_k_index / top_k_weights: (tokens, k)
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token_idx, slot = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue  # never called: its linears' hooks see no token
            y = expert(hidden_states[token_idx]) * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def unfuse_experts(model: nn.Module, blocks: str, path: str, names: tuple[str, str, str],
                   moe_module: tuple[str, str] | None = None) -> None:
    """Swap every block's fused experts (at `path`, relative to a block, as checkpoints name it) for
    UnfusedExperts; idempotent.

    moe_module (attribute, checkpoint name): the MoE block is registered under the checkpoint's name
    (Mixtral: transformers calls it `mlp`, checkpoints and vLLM `block_sparse_moe`) while the decoder
    layer's forward still finds it as `self.<attribute>`.
    """
    for blk in model.get_submodule(blocks):
        if moe_module is not None and moe_module[0] in blk._modules:
            attr, saved_as = moe_module
            mod = blk._modules.pop(attr)
            blk._modules[saved_as] = mod
            object.__setattr__(blk, attr, mod)  # forward's self.mlp; state dict and named_modules use saved_as
        parent_name, _, leaf = path.rpartition(".")
        try:
            parent = blk.get_submodule(parent_name) if parent_name else blk
        except AttributeError:
            continue  # a dense block of an MoE model (Qwen2-MoE's mlp_only_layers)
        fused = parent._modules.get(leaf)
        if fused is None or isinstance(fused, UnfusedExperts):
            continue
        parent._modules[leaf] = UnfusedExperts(fused, names)
