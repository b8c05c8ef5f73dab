"""Parts every checkpoint writer shares: which linears are quantized, the tensors to
write (planned lazily, one module at a time), sharded safetensors, config.json, and
the atomic write with the quantkit.json manifest last.

A format (compressed-tensors, awq, gptq; see `formats.py`) supplies only a `plan`: how one
quantized linear becomes tensors (`Layout`), its quantization_config, and any extra files;
`export_checkpoint` does the rest the same way for all of them.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantkit.export.atomic import ExportError, atomic_output_dir, check_output_dir, source_paths
from quantkit.export.manifest import build_manifest, write_manifest
from quantkit.export.vllm_compat import online_rotation_warnings
from quantkit.quant.core import QuantizedTensor
from quantkit.quant.model import QuantizedModel
from quantkit.quant.pack import PACK_BITS
from quantkit.recipe import QuantArgs, RecipeError

logger = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class Layout:
    """How one quantized linear is stored.

    pieces(qt): local tensor names written for the module (e.g. ["qweight", "qzeros", "scales"]);
    nbytes(qt, scale_dtype): their total size, without building them (for sharding);
    compress(qt, scale_dtype): local name -> tensor (CPU).
    """

    pieces: Callable[[QuantizedTensor], list[str]]
    nbytes: Callable[[QuantizedTensor, torch.dtype], int]
    compress: Callable[[QuantizedTensor, torch.dtype], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class ExportOptions:
    """Choices a format may use beyond the model (the weight-only formats use neither).

    kv_format: how a compressed-tensors config describes a KV cache ("int8" or "fp8");
    float_modules: modules kept in high precision that are not nn.Linear here but that serving
    engines build as linears (MoE routers).
    """

    kv_format: str = "int8"
    float_modules: tuple[str, ...] = ()


@dataclass
class WritePlan:
    """What a format writes for a model, beyond what every checkpoint has.

    layout: how each quantized linear is stored; quantization_config: config.json's block;
    warnings: logged, and recorded in the manifest;
    extra_json: more JSON files beside config.json (e.g. quantize_config.json);
    extra_tensors: written with the weights (e.g. static input / KV scales);
    side_files(tmp) -> manifest fields: writes format-specific extra files into the
    temporary dir and returns what the manifest should say about them;
    rotations_in_config: the config tells other engines the model's online rotations (see
    export_checkpoint: every format's manifest records them for quantkit, and warns when only it does).
    """

    layout: Layout
    quantization_config: dict[str, Any]
    warnings: list[str]
    extra_json: dict[str, dict[str, Any]] | None = None
    extra_tensors: dict[str, torch.Tensor] | None = None
    side_files: Callable[[Path], dict[str, Any]] | None = None
    rotations_in_config: bool = False


# (qmodel, quantized linears, ignored linear names, options) -> WritePlan
Planner = Callable[[QuantizedModel, dict[str, nn.Linear], list[str], ExportOptions], WritePlan]


@dataclass
class _Unit:
    """Tensors written together (one linear's pieces, or one plain tensor)."""

    nbytes: int
    keys: list[str]
    make: Callable[[], dict[str, torch.Tensor]]


def tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys that alias another parameter (e.g. lm_head.weight) when the config ties them."""
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if not getattr(text_cfg, "tie_word_embeddings", False):
        return set()
    mapping = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None)
    if isinstance(mapping, dict) and mapping:
        return set(mapping)
    return {"lm_head.weight"}

def validate_modules(qmodel: QuantizedModel) -> tuple[dict[str, nn.Linear], list[str]]:
    """Check every quantized module before anything is written; returns (quantized linears, ignored linears)."""
    linears = {n: m for n, m in qmodel.model.named_modules() if isinstance(m, nn.Linear)}
    if not qmodel.modules:
        raise ValueError("nothing to export: the QuantizedModel has no quantized modules")
    quantized: dict[str, nn.Linear] = {}
    for name, qt in qmodel.modules.items():
        mod = linears.get(name)
        if mod is None:
            raise ValueError(f"quantized module {name} is not an nn.Linear of the model; cannot export it")
        if qt.args.bits not in PACK_BITS:
            raise ValueError(f"{name}: {qt.args.bits}-bit weights cannot be stored as pack-quantized")
        if tuple(qt.q.shape) != tuple(mod.weight.shape):
            raise ValueError(f"{name}: quantized shape {tuple(qt.q.shape)} != weight shape {tuple(mod.weight.shape)}")
        in_f = qt.q.shape[1]
        n_groups = 1 if qt.args.group_size is None else in_f // qt.args.group_size
        if qt.args.group_size is not None and in_f % qt.args.group_size:
            raise ValueError(f"{name}: group size {qt.args.group_size} does not divide in_features {in_f}")
        if tuple(qt.scale.shape) != (qt.q.shape[0], n_groups):
            raise ValueError(f"{name}: scale shape {tuple(qt.scale.shape)} != expected {(qt.q.shape[0], n_groups)}")
        if not qt.args.symmetric and (qt.zero is None or tuple(qt.zero.shape) != tuple(qt.scale.shape)):
            raise ValueError(f"{name}: asymmetric quantization needs a zero point of shape {tuple(qt.scale.shape)}")
        if not mod.weight.dtype.is_floating_point:
            raise ValueError(f"{name}: weight dtype {mod.weight.dtype} is not a float dtype")
        quantized[name] = mod
    tied = tied_keys(qmodel.model)
    for name in quantized:
        if f"{name}.weight" in tied:
            raise ValueError(
                f"{name} shares its weight with the embeddings (tie_word_embeddings); leave it unquantized "
                "(add it to the ignore list)"
            )
    ignore = sorted(n for n in linears if n not in quantized)
    return quantized, ignore

def weight_matches(weight: torch.Tensor, qt: QuantizedTensor) -> bool:
    """Whether the model's weight (out, in) rounds to qt: within half a quantization step everywhere.

    The QuantizedModel contract says the linear holds qt's dequantized values; a
    method that updated one but not the other would export a checkpoint that
    differs from the model it evaluated.
    """
    deq = qt.dequantize(torch.float32)
    g = qt.q.shape[1] // qt.scale.shape[1]
    half_step = 0.5 * qt.scale.float().to(deq.device).repeat_interleave(g, dim=1)
    return bool(((weight.detach().float().to(deq.device) - deq).abs() <= half_step).all())

def plan_units(
    qmodel: QuantizedModel,
    quantized: dict[str, nn.Linear],
    layout: Layout,
    mismatched: list[str] | None = None,
    extra: dict[str, torch.Tensor] | None = None,
) -> list[_Unit]:
    """Every tensor to write, in state-dict order, grouped per module, without materializing packs.

    mismatched: when given, collects (while the units are made) the quantized
    linears whose model weight does not round to their quantized tensor.
    extra: more tensors to write (static input / KV scales), appended at the end.
    """
    model = qmodel.model
    sd = model.state_dict()
    skip = tied_keys(model) | {f"{n}.weight" for n in quantized}
    fetch = qmodel.tensors  # a streamed run: the model is a meta skeleton, its tensors are read from disk
    units: list[_Unit] = []
    for key, t in sd.items():
        if key in skip:
            mod_name = key[: -len(".weight")]
            if mod_name in quantized:
                qt = qmodel.modules[mod_name]
                dtype = quantized[mod_name].weight.dtype
                pieces, nbytes = layout.pieces(qt), layout.nbytes(qt, dtype)
                del qt  # looked up again when written: a streamed run holds one module at a time

                def make(n=mod_name, d=dtype, w=quantized[mod_name].weight) -> dict[str, torch.Tensor]:
                    q = qmodel.modules[n]
                    check = mismatched is not None
                    if fetch is not None and w.device.type == "meta":
                        # A streamed block's weight that was saved as its quantized tensor was checked then;
                        # reading it back would only dequantize the same tensor again.
                        check = check and not (qmodel.weight_checked and qmodel.weight_checked(f"{n}.weight"))
                        w = fetch(f"{n}.weight") if check else w
                    if check and not weight_matches(w, q):
                        mismatched.append(n)
                    return {f"{n}.{k}": v for k, v in layout.compress(q, d).items()}

                units.append(_Unit(nbytes, [f"{mod_name}.{p}" for p in pieces], make))
            continue
        if t.device.type == "meta" and fetch is None:
            raise ExportError(
                f"tensor {key} is on the meta device (offloaded without data); load the model without "
                "disk offload or onload it before export"
            )
        if t.device.type == "meta":
            make = lambda k=key: {k: fetch(k)}  # noqa: E731
        else:
            make = lambda k=key, v=t: {k: v.detach().to("cpu")}  # noqa: E731
        units.append(_Unit(t.numel() * t.element_size(), [key], make))
    for key, t in (extra or {}).items():
        units.append(_Unit(t.numel() * t.element_size(), [key], lambda k=key, v=t: {k: v}))
    return units

def _shard(units: list[_Unit], max_bytes: int) -> list[list[_Unit]]:
    """Greedy shards of at most max_bytes (a unit larger than that gets a shard of its own)."""
    shards: list[list[_Unit]] = [[]]
    size = 0
    for u in units:
        if shards[-1] and size + u.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(u)
        size += u.nbytes
    return shards


def _materialize(units: list[_Unit]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for u in units:
        for k, v in u.make().items():
            v = v.contiguous()
            # safetensors refuses tensors sharing storage; copy any alias left.
            ptr = v.untyped_storage().data_ptr()
            if ptr in seen and v.numel():
                v = v.clone()
            seen.add(v.untyped_storage().data_ptr())
            tensors[k] = v
    return tensors


def write_weights(units: list[_Unit], tmp: Path, max_shard_bytes: int) -> list[str]:
    """Write safetensors file(s) (+ index when sharded); returns file names."""
    from safetensors.torch import save_file

    shards = _shard(units, max_shard_bytes)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(_materialize(shards[0]), str(tmp / SAFE_WEIGHTS_NAME), metadata=meta)
        return [SAFE_WEIGHTS_NAME]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    for fname, shard in zip(names, shards):
        save_file(_materialize(shard), str(tmp / fname), metadata=meta)  # one shard in memory at a time
        for u in shard:
            weight_map.update({k: fname for k in u.keys})
    index = {"metadata": {"total_size": sum(u.nbytes for u in units)}, "weight_map": dict(sorted(weight_map.items()))}
    with open(tmp / SAFE_WEIGHTS_INDEX_NAME, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    return [*names, SAFE_WEIGHTS_INDEX_NAME]


def config_dict(model: nn.Module, quantization_config: dict[str, Any]) -> dict[str, Any]:
    """config.json content: the model config (on a copy) with our quantization_config."""
    cfg = copy.deepcopy(model.config)
    # A config loaded from .gguf (or a quantized hub model) carries a quantization
    # config that is not ours; drop it on the copy, never on the model.
    if "quantization_config" in cfg.__dict__:
        del cfg.__dict__["quantization_config"]
    cfg.architectures = cfg.architectures or [type(model).__name__]
    cfg.dtype = str(model.dtype).split(".")[1]
    d = json.loads(cfg.to_json_string(use_diff=True))
    d.pop("quantization_config", None)
    d["quantization_config"] = quantization_config
    return d


def single_args(qmodel: QuantizedModel, format_name: str) -> QuantArgs:
    """The one QuantArgs of every quantized linear, for layouts whose config holds a single scheme."""
    args_set = {qt.args for qt in qmodel.modules.values()}
    if len(args_set) > 1:
        raise RecipeError(f"--format {format_name} holds one scheme for every layer, this model mixes several; "
                          "use --format compressed-tensors")
    (args,) = args_set
    return args


def no_shadow_warnings(qmodel: QuantizedModel, fmt: str) -> list[str]:
    """For layouts without the shadow file: the FP16-kept linears' quantized copies are not written."""
    if not qmodel.shadow:
        return []
    return [f"the {fmt} layout has no place for the quantized copies of the {len(qmodel.shadow)} linears kept in "
            "FP16 (--sensitive): they run in FP16 everywhere; the runtime's per-request INT8/FP16 switching of them "
            "needs --format compressed-tensors"]


def fp16_scale_warnings(modules: dict[str, QuantizedTensor], fmt: str) -> list[str]:
    """The layout stores fp16 scales: refuse ones fp16 cannot hold, warn when rounding changes any."""
    changed = []
    for name, qt in modules.items():
        s = qt.scale.detach().float().cpu()
        h = s.to(torch.float16)
        if not torch.isfinite(h).all() or bool((h[s > 0] == 0).any()):
            raise RecipeError(f"{name}: a scale is outside the fp16 range the {fmt} layout stores; use --format compressed-tensors")
        if not torch.equal(h.float(), s):
            changed.append(name)
    if not changed:
        return []
    return [
        f"the {fmt} layout stores fp16 scales; rounding changed the scales of {len(changed)} linear(s) "
        f"(e.g. {changed[0]}), so the checkpoint differs slightly from the evaluated model "
        "(quantize in float16 to avoid this)"
    ]


def export_checkpoint(
    qmodel: QuantizedModel,
    out: Path,
    *,
    format_name: str,
    plan: Planner,
    options: ExportOptions = ExportOptions(),
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write qmodel as a checkpoint dir of `format_name` at `out`, the files laid out by `plan`.

    Every check runs before anything is written: the output dir, each quantized module, then
    the format's own (inside `plan`). Written atomically (see `write_checkpoint`).
    Raises OutputExistsError for a non-empty `out` without overwrite, ValueError / RecipeError
    for modules the format cannot hold, ExportError for I/O failures.
    """
    out = Path(out)
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    check_output_dir(out, overwrite, protect=source_paths(qmodel.source))
    quantized, ignore = validate_modules(qmodel)
    p = plan(qmodel, quantized, ignore, options)
    # The weights assume these run-time Hadamards in every format: the manifest always records them (quantkit's
    # loaders apply them), the warning says which other engines would compute another model
    p.warnings += online_rotation_warnings(qmodel.online_rotations, in_config=p.rotations_in_config)
    for w in p.warnings:
        logger.warning(w)
    return write_checkpoint(qmodel, out, overwrite=overwrite, format_name=format_name, quantized=quantized, plan=p,
                            max_shard_bytes=max_shard_bytes)


def _write_json_files(qmodel: QuantizedModel, tmp: Path, files: dict[str, dict[str, Any]]) -> None:
    """config.json and the plan's extra JSON files, generation_config.json, the tokenizer."""
    model = qmodel.model
    for fname, content in files.items():
        with open(tmp / fname, "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, sort_keys=True)
            f.write("\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.to_json_file(str(tmp / "generation_config.json"), use_diff=True)
    if qmodel.tokenizer is not None:
        qmodel.tokenizer.save_pretrained(str(tmp))


def write_checkpoint(
    qmodel: QuantizedModel,
    out: Path,
    *,
    overwrite: bool,
    format_name: str,
    quantized: dict[str, nn.Linear],
    plan: WritePlan,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write the checkpoint dir atomically: weights (+ plan.extra_tensors), the side files,
    config.json (+ plan.extra_json files), generation_config.json, tokenizer, then quantkit.json.

    A failure leaves nothing at `out` (an existing `out` untouched). The model is not modified.
    """
    mismatched: list[str] = []
    # refuses offloaded (meta) tensors before any write
    units = plan_units(qmodel, quantized, plan.layout, mismatched, plan.extra_tensors)
    export_warnings = list(plan.warnings)
    from quantkit.interrupts import reached

    with atomic_output_dir(out, overwrite, protect=source_paths(qmodel.source)) as tmp:
        with torch.no_grad():
            write_weights(units, tmp, max_shard_bytes)
            reached("export.weights")
            manifest_extra = plan.side_files(tmp) if plan.side_files is not None else {}
            if qmodel.online_rotations:  # SpinQuant's run-time Hadamards: the weights assume them
                manifest_extra["online_rotations"] = qmodel.online_rotations
            if qmodel.resolved_options:  # what the recipe's "auto" options became
                manifest_extra["resolved_options"] = qmodel.resolved_options
            if qmodel.sensitivity is not None:  # which linears the scan kept in FP16, and from which file
                manifest_extra["sensitivity"] = qmodel.sensitivity
        if mismatched:
            export_warnings.append(
                f"the model weights of {len(mismatched)} quantized linear(s) (e.g. {mismatched[0]}) do not round "
                "to their quantized tensors; the checkpoint holds the quantized tensors, so it differs from "
                "the in-memory model"
            )
            logger.warning(export_warnings[-1])
        _write_json_files(qmodel, tmp, {"config.json": config_dict(qmodel.model, plan.quantization_config),
                                        **(plan.extra_json or {})})
        manifest = build_manifest(
            tmp,
            format=format_name,
            recipe=qmodel.recipe.to_dict(),
            modules={n: qt.args.to_dict() for n, qt in qmodel.modules.items()},
            source=qmodel.source,
            calibration=qmodel.calibration,
            warnings=[*qmodel.warnings, *export_warnings],
            extra=manifest_extra,
        )
        write_manifest(tmp, manifest)
    return out
