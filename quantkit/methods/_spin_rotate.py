"""SpinQuant's model transforms: fold norms, untie the LM head, rotate the weights by R1/R2/R4.

Pure functions of a model and its rotations (see quantkit.methods.spinquant for the method);
`rotated_tensors` is differentiable in the rotations, so the rotation training
(quantkit.methods._spin_train) calls it every step and `fold_rotations` once at the end.
"""

from __future__ import annotations

import torch
from torch import nn

from quantkit.errors import RecipeError, short_repr
from quantkit.models.adapter import ModelAdapter, head_dim_of
from quantkit.quant import rotation as rot


def _head_dims(config) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return heads, kv_heads, head_dim_of(config)


@torch.no_grad()
def untie_embeddings(model: nn.Module) -> bool:
    """Give the LM head its own weight when it shares the embeddings'; True if it did."""
    ad = ModelAdapter.for_model(model)
    head, emb = ad.lm_head(), ad.embed()
    cfgs = [model.config] + ([model.config.get_text_config()] if hasattr(model.config, "get_text_config") else [])
    tied = head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr()
    for c in cfgs:
        c.tie_word_embeddings = False
    if not tied:
        return False
    head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
    return True


@torch.no_grad()
def make_rotation_ready(model: nn.Module) -> None:
    """Fold every RMSNorm weight into its consumers (norm weight -> 1) and untie the LM head. Exact in float."""
    ad = ModelAdapter.for_model(model)
    roles = ad.spec.rotation
    if roles is None:
        why = f": {ad.spec.no_rotation}" if ad.spec.no_rotation else ""
        raise RecipeError(
            f"spinquant cannot rotate model type {short_repr(model.config.model_type)}{why}; "
            "use awq, gptq or rtn for this model"
        )
    untie_embeddings(model)
    off = ad.spec.norm_offset
    for blk in ad.blocks():
        for norm_rel, consumers in roles.norms:
            norm = blk.get_submodule(norm_rel)
            _fold_norm(norm, [blk.get_submodule(c) for c in consumers], off)
    _fold_norm(ad.final_norm(), [ad.lm_head()], off)


def _fold_norm(norm: nn.Module, linears: list[nn.Linear], offset: float = 0.0) -> None:
    """The norm's gain (offset + weight) moves into its consumers; the norm then scales by 1."""
    if getattr(norm, "bias", None) is not None:
        raise RecipeError("spinquant folds RMSNorm only; this model's norm has a bias (LayerNorm)")
    g = norm.weight.detach().float() + offset
    for lin, w in zip(linears, rot.fold_norm_into_linears(g, [lin.weight.detach().float() for lin in linears])):
        lin.weight.copy_(w.to(lin.weight.dtype))
    norm.weight.fill_(1.0 - offset)


def rotated_tensors(
    model: nn.Module,
    r1: torch.Tensor | None,
    r2: list[torch.Tensor] | None,
    r4: torch.Tensor | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Parameter name -> rotated tensor for every tensor R1/R2/R4 touch (the model is not changed).

    A pure function of the current weights and the rotations (differentiable in r1, r2):
    the learned training calls it every step, `fold_rotations` once. r1: (hidden, hidden);
    r2: one (head_dim, head_dim) per layer; r4: (intermediate, intermediate) folded into
    the mlp_out input (its online counterpart must then be attached). Math in `dtype`
    (default float32), results in each parameter's dtype.
    """
    ad = ModelAdapter.for_model(model)
    roles = ad.spec.rotation
    _, _, head_dim = _head_dims(model.config)
    cdt = dtype or torch.float32
    out: dict[str, torch.Tensor] = {}

    def w_of(mod):
        return mod.weight.to(cdt)

    def b_of(mod):
        return None if getattr(mod, "bias", None) is None else mod.bias.to(cdt)

    def put(prefix: str, mod: nn.Module, w: torch.Tensor, b: torch.Tensor | None) -> None:
        out[f"{prefix}.weight"] = w.to(mod.weight.dtype)
        if b is not None:
            out[f"{prefix}.bias"] = b.to(mod.bias.dtype)

    r1c = None if r1 is None else r1.to(cdt)
    if r1c is not None:
        emb = ad.embed()
        out[f"{ad.spec.embed}.weight"] = (w_of(emb) @ r1c).to(emb.weight.dtype)  # rows are residual vectors
        head = ad.lm_head()
        put(ad.spec.lm_head, head, rot.rotate_input(w_of(head), r1c), b_of(head))
    for i, blk in enumerate(ad.blocks()):
        prefix = ad.block_name(i)
        r2i = None if r2 is None else r2[i].to(cdt)
        for rel in dict.fromkeys(roles.reads_residual + roles.writes_residual):
            mod = blk.get_submodule(rel)
            w, b = w_of(mod), b_of(mod)
            changed = False
            if rel == roles.attn_out and r2i is not None:
                w, changed = rot.rotate_heads_input(w, r2i, head_dim), True
            if rel == roles.mlp_out and r4 is not None:
                w, changed = rot.rotate_input(w, r4.to(cdt)), True
            if r1c is not None and rel in roles.reads_residual:
                w, changed = rot.rotate_input(w, r1c), True
            if r1c is not None and rel in roles.writes_residual:
                (w, b), changed = rot.rotate_output(w, b, r1c), True
            if rel == roles.value and r2i is not None:
                if roles.value_part is None:
                    (w, b), changed = rot.rotate_heads_output(w, b, r2i, head_dim), True
                else:  # only the V rows of a fused linear (Phi-3's qkv_proj)
                    rows = ad.part_rows(rel, roles.value_part)
                    wv, bv = rot.rotate_heads_output(w[rows], None if b is None else b[rows], r2i, head_dim)
                    w = torch.cat([w[: rows.start], wv, w[rows.stop:]])
                    if b is not None:
                        b = torch.cat([b[: rows.start], bv, b[rows.stop:]])
                    changed = True
            if changed:
                put(f"{prefix}.{rel}", mod, w, b)
    return out


@torch.no_grad()
def fold_rotations(model: nn.Module, r1, r2, r4=None) -> None:
    """Write `rotated_tensors` into the model's parameters (offline folding: zero run-time cost)."""
    new = rotated_tensors(model, r1, r2, r4)
    params = dict(model.named_parameters())
    for name, t in new.items():
        params[name].copy_(t.to(params[name].device))


def initial_rotations(model: nn.Module, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """R1 (random Hadamard of the hidden size) and one random-Hadamard R2 per layer (head_dim), float32."""
    ad = ModelAdapter.for_model(model)
    _, _, head_dim = _head_dims(model.config)
    r1 = rot.random_hadamard(model.config.hidden_size, seed)
    r2 = [rot.random_hadamard(head_dim, seed + 1 + i) for i in range(len(ad.blocks()))]
    return r1, r2
