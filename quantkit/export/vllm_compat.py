"""What vLLM refuses in a checkpoint that transformers would load: said as warnings at export time."""

from __future__ import annotations

from quantkit.recipe import QuantArgs

# Linears that vLLM fuses into one layer; the members must share one scheme
# (and be all quantized or all ignored) or vLLM refuses the checkpoint.
VLLM_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


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
