"""The compressed-tensors `quantization_config` block of config.json: written from our
QuantArgs / Scheme, and read back into inspect's summary."""

from __future__ import annotations

from typing import Any

from quantkit.errors import short_repr
from quantkit.quant.core import QuantizedTensor
from quantkit.recipe import QuantArgs, Scheme

# The compressed-tensors release whose on-disk layout this writer was checked
# against (tests compare our packed bytes with its packer); stamped as "version".
CT_FORMAT_VERSION = "0.20.0"
# KV cache encodings a config can describe: our INT8 cache, or the FP8 per-tensor cache vLLM loads.
KV_FORMATS = ("int8", "fp8")


def check_kv_format(kv_format: str) -> None:
    if kv_format not in KV_FORMATS:
        raise ValueError(f"kv_format {short_repr(kv_format)} is not one of {', '.join(KV_FORMATS)}")


def ct_quant_args(args: QuantArgs) -> dict[str, Any]:
    """compressed-tensors QuantizationArgs (as a dict) for integer weights.

    Only keys every compressed-tensors release accepts (its QuantizationArgs
    forbids unknown keys), so older vLLM installs parse it too.
    """
    return {
        "num_bits": args.bits,
        "type": "int",
        "symmetric": args.symmetric,
        "group_size": args.group_size,
        "strategy": args.strategy,
        "dynamic": False,
    }


def ct_act_args(acts) -> dict[str, Any]:
    """compressed-tensors QuantizationArgs (dict) for input activations (`ActQuantArgs`)."""
    return {
        "num_bits": acts.bits,
        "type": "int",
        "symmetric": acts.symmetric,
        "group_size": None,
        "strategy": acts.strategy,
        "dynamic": acts.dynamic,
    }


def ct_kv_args(kv, kv_format: str = "int8") -> dict[str, Any]:
    """`kv_cache_scheme` for a `KVCacheArgs`: what the format defines (per-tensor static or per-token dynamic).

    compressed-tensors has no per-channel KV strategy: a static per-channel cache is
    described as per-tensor (its scale is the max of the channel scales); the
    per-channel scales travel in the KV side file. kv_format "fp8": an FP8 per-tensor
    static cache, the only KV cache vLLM loads.
    """
    check_kv_format(kv_format)
    if kv_format == "fp8":
        return {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "tensor", "dynamic": False}
    dynamic = kv.dynamic
    return {
        "num_bits": kv.bits,
        "type": "int",
        "symmetric": True,
        "group_size": None,
        "strategy": "token" if dynamic else "tensor",
        "dynamic": dynamic,
    }


def ct_format(scheme: Scheme) -> str:
    """The compressed-tensors format for a scheme's tensors on disk.

    Weight-only integer schemes (WnA16, 1..8 bits, including W8A16) are
    `pack-quantized`; a scheme that also quantizes input activations to int
    (W8A8) is stored unpacked as `int-quantized`.
    """
    acts = getattr(scheme, "input_activations", None)
    if acts is not None:
        return "int-quantized"
    return "pack-quantized"


def ct_scheme(scheme: Scheme, targets: list[str]) -> dict[str, Any]:
    """One compressed-tensors config group: {targets, weights, input_activations, output_activations, format}.

    `scheme.input_activations`: an `ActQuantArgs`, a ready dict, or None.
    """
    acts = getattr(scheme, "input_activations", None)
    if acts is not None and not isinstance(acts, dict):
        acts = ct_act_args(acts)
    return {
        "targets": list(targets),
        "weights": ct_quant_args(scheme.weights),
        "input_activations": acts,
        "output_activations": None,
        "format": ct_format(scheme),
    }


def module_groups(modules: dict[str, QuantizedTensor], input_activations=None) -> list[tuple[Scheme, list[str]]]:
    """One group per distinct QuantArgs, targets = the exact module names, largest group first.

    input_activations: the recipe's `ActQuantArgs` (W8A8), shared by every group, or None.
    """
    by_args: dict[QuantArgs, list[str]] = {}
    for name, qt in modules.items():
        by_args.setdefault(qt.args, []).append(name)
    ordered = sorted(by_args.items(), key=lambda kv: (-len(kv[1]), kv[0].bits, kv[0].group_size or 0))
    return [(Scheme(weights=a, input_activations=input_activations), sorted(names)) for a, names in ordered]


def build_quantization_config(
    groups: list[tuple[Scheme, list[str]]],
    ignore: list[str],
    kv_cache_scheme: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The `quantization_config` block of config.json.

    groups: (scheme, target module names or "re:" patterns), one per distinct
        scheme; written as group_0, group_1, ...
    ignore: names of linears left unquantized (vLLM needs every unquantized
        linear either here or unmatched by all targets).
    kv_cache_scheme: compressed-tensors QuantizationArgs dict for the KV cache, or None.
    """
    config_groups = {f"group_{i}": ct_scheme(s, t) for i, (s, t) in enumerate(groups)}
    formats = {g["format"] for g in config_groups.values()}
    fmt = formats.pop() if len(formats) == 1 else ("mixed-precision" if formats else "dense")
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": list(ignore),
        "kv_cache_scheme": kv_cache_scheme,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_FORMAT_VERSION,
    }


def describe_ct_config(qc: dict[str, Any]) -> tuple[str | None, list[dict[str, Any]], list[str]]:
    """(format, groups, ignore) of a compressed-tensors quantization_config, for inspect's summary.

    Each group: {name, format, weights, input_activations, n_targets, targets}; n_targets None
    means "every quantized linear" (a single group with the class target "Linear", as MoE exports write).
    """
    groups = []
    for gname, g in (qc.get("config_groups") or {}).items():
        targets = g.get("targets", []) if isinstance(g, dict) else list(g)
        groups.append(
            {
                "name": gname,
                "format": g.get("format") if isinstance(g, dict) else None,
                "weights": g.get("weights") if isinstance(g, dict) else None,
                "input_activations": g.get("input_activations") if isinstance(g, dict) else None,
                "n_targets": len(targets),
                "targets": targets,
            }
        )
    if len(groups) == 1 and groups[0]["targets"] == ["Linear"]:
        groups[0]["n_targets"] = None
    return qc.get("format", "dense" if not qc else None), groups, qc.get("ignore", [])

