"""What vLLM refuses in a checkpoint that transformers would load: said as warnings at export time."""

from __future__ import annotations

from quantkit.models.adapter import VLLM_FUSED  # the fused groups are model knowledge: the adapter table's
from quantkit.recipe import QuantArgs


def vllm_fusion_warnings(modules: dict[str, QuantArgs], linears: list[str]) -> list[str]:
    """Warnings for layers vLLM fuses (q/k/v, gate/up) whose members differ in scheme.

    modules: quantized module name -> args; linears: all nn.Linear names.
    """
    out = []
    names = set(linears)
    for fused, parts in VLLM_FUSED.items():
        prefixes = {n.rsplit(".", 1)[0] for n in names if n.rsplit(".", 1)[-1] == parts[0]}
        for p in sorted(prefixes):
            members = [f"{p}.{s}" for s in parts if f"{p}.{s}" in names]
            kinds = {modules[m].describe() if m in modules else "unquantized" for m in members}
            if len(kinds) > 1:
                out.append(
                    f"{p}.{{{','.join(parts)}}} have different schemes ({', '.join(sorted(kinds))}); "
                    f"vLLM fuses them into {fused} and will refuse this checkpoint"
                )
    return out


def online_rotation_warnings(online: dict | None, *, in_config: bool) -> list[str]:
    """A checkpoint whose weights assume SpinQuant's run-time Hadamards (R3 on Q/K, R4 on down_proj inputs).

    in_config: R4 is written as compressed-tensors' transform_config (vLLM applies it; transformers'
    from_pretrained does not). Otherwise vLLM and plain transformers load it without them and compute a
    different model, with no error."""
    from quantkit.export.ct_transform import describable, rotation_names

    if not online:
        return []
    which = rotation_names(online)
    if in_config:
        return [f"the weights assume the online rotation {which}, written as quantization_config.transform_config: "
                "vLLM (with compressed-tensors transforms) and `quantkit eval` apply it; transformers' from_pretrained "
                "does not: after loading call compressed_tensors.transform.apply_transform_config(model, "
                "TransformConfig.model_validate(model.config.quantization_config.transform_config))"]
    if "r3" in online:
        why = "R3 (attention) has no transform vLLM applies"
    elif not describable(online):
        why = "this R4 is not block-diagonal Sylvester (`r4_block: auto` or a power of two makes it one)"
    else:
        why = "only the compressed-tensors format carries R4 for vLLM"
    return [f"the weights assume the online rotations {which} recorded in quantkit.json ({why}); `quantkit eval` "
            "and quantkit's runtime apply them, vLLM and plain transformers do not (they would load it and compute a "
            "different model): serve it with quantkit, or quantize with `--no-online` (a recipe: `online: false`) "
            "for a checkpoint vLLM runs"]
