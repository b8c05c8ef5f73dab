"""SpinQuant's online R4 as compressed-tensors' `transform_config`, so vLLM applies it when it loads the checkpoint.

compressed-tensors describes an online rotation as a transform scheme: type "hadamard" is the deterministic
Sylvester matrix (natural order, +-1 entries, divided by sqrt(size) when applied), `head_dim` makes it
block-diagonal, location "input" multiplies a linear's input by it before the (quantized) linear. vLLM reads the
block and runs it with its Hadacore kernel; the scheme also owns a `<linear>.<scheme>_input.weight` tensor (the
+-1 matrix, one copy shared by every target, as compressed-tensors saves tied transform weights).

So quantkit's R4 is describable when it is block-diagonal Sylvester (`online_rotations.r4.block` a power of two;
the default for W8A8, see quantkit.methods.spinquant) and it is the only online rotation: vLLM has no transform
for attention (R3), and a config that described R4 but not R3 would be served as another model without error.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # inspect imports this module: no torch at CLI start-up
    import torch

R4_SCHEME = "R4"
TRANSFORM_WEIGHT_SUFFIX = f".{R4_SCHEME}_input.weight"  # the key compressed-tensors / vLLM give the scheme's matrix
MAX_BLOCK = 1 << 15  # Hadacore's largest power of two


def r4_block(online: dict[str, Any]) -> int:
    """R4's block in a manifest's online_rotations that has R4 (version 1 has none: the whole width)."""
    return int(online["r4"].get("block", online["r4"]["size"]))


def rotation_names(online: dict[str, Any] | None) -> str:
    """"R3/R4", "R4", ...: the online rotations a manifest's entry records ("" for none)."""
    return "/".join(k.upper() for k in ("r3", "r4") if k in (online or {}))


def describable(online: dict[str, Any] | None) -> bool:
    """Whether `online` (a manifest's online_rotations) can be written as a transform_config that vLLM applies."""
    if not online or set(online) & {"r3"} or "r4" not in online:
        return False
    block = r4_block(online)
    return 2 <= block <= MAX_BLOCK and block & (block - 1) == 0


def _targets(modules: list[str], linears: list[str]) -> list[str]:
    """One "re:" pattern matching exactly R4's modules among the model's linears (the names vLLM matches
    per layer), else the module names themselves."""
    first = modules[0].split(".")
    idx = next((i for i, p in enumerate(first) if p.isdigit()), None)
    if idx is not None:
        pattern = r".*\." + r"\.".join(map(re.escape, first[idx + 1:])) + "$"
        rx = re.compile(pattern)
        if {n for n in linears if rx.fullmatch(n)} == set(modules):
            return [f"re:{pattern}"]
    return list(modules)


def transform_config(online: dict[str, Any], linears: list[str]) -> dict[str, Any]:
    """config.json's quantization_config.transform_config for a describable R4 (see `describable`).

    linears: every nn.Linear name of the model (to check that the target pattern hits R4's modules only)."""
    if not describable(online):
        raise ValueError("only a block-diagonal Sylvester R4 without R3 has a compressed-tensors transform")
    args = {"targets": _targets(online["r4"]["modules"], linears), "location": "input", "inverse": False,
            "ignore": []}
    scheme = {"type": "hadamard", "apply": [args], "randomize": False, "requires_grad": False,
              "head_dim": r4_block(online), "precision": "torch.float32"}
    return {"config_groups": {R4_SCHEME: scheme}}


def transform_tensors(online: dict[str, Any], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The scheme's matrix (unnormalized Sylvester, +-1, exact in any float dtype), stored once on R4's first
    module: the other modules share it."""
    from quantkit.quant.rotation import hadamard_matrix

    block = r4_block(online)
    return {online["r4"]["modules"][0] + TRANSFORM_WEIGHT_SUFFIX: hadamard_matrix(block, dtype).contiguous()}


def describe_online(online: dict[str, Any]) -> str:
    """One line for `quantkit inspect`: which online rotations a manifest records and where they run."""
    parts = []
    if "r4" in online:
        r4, block = online["r4"], r4_block(online)
        shape = f"a {r4['size']}-wide Hadamard" if block == r4["size"] else f"Sylvester blocks of {block}"
        parts.append(f"R4 on {len(r4.get('modules', []))} linear inputs, {shape}")
    if "r3" in online:
        parts.append(f"R3 on Q/K per head ({online['r3']['size']})")
    where = ("in transform_config: vLLM applies it" if describable(online)
             else "quantkit eval / runtime only")
    return "; ".join(parts) + f" ({where})"


def describe_transform_config(tc: dict[str, Any]) -> list[str]:
    """One line per transform scheme of a config's transform_config (any writer's), for `quantkit inspect`."""
    out = []
    for name, scheme in (tc.get("config_groups") or {}).items():
        if not isinstance(scheme, dict):
            continue
        where = ", ".join(f"{a.get('location')} of {', '.join(map(str, a.get('targets', [])))}"
                          + (" (inverse)" if a.get("inverse") else "")
                          for a in scheme.get("apply", []) if isinstance(a, dict))
        block = f", blocks of {scheme['head_dim']}" if scheme.get("head_dim") else ""
        out.append(f"{name}: {scheme.get('type')}{block} on {where or 'nothing'}")
    return out


def is_transform_tensor(key: str) -> bool:
    """A checkpoint tensor that belongs to a transform scheme (not to the model's own modules)."""
    return key.endswith(TRANSFORM_WEIGHT_SUFFIX)
