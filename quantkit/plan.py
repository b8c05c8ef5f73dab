"""Memory plan: peak host and device memory of a run, from the model's config alone.

No weights are loaded. The estimate adds up what the pipeline keeps alive at
its worst moment (see `estimate_memory`); `quantkit plan` prints it and every
method run checks it before loading, so a run that cannot fit stops at once
with the flags that would make it fit.

Host peak = runtime baseline + the model's weights + quantized tensors
            + max(calibration working set when calibrating on the CPU,
                  export working set: one output shard of --shard-size + its packed tensors)
(streamed: no weights and no quantized tensors held; the phases are the embeddings, two blocks, the export)
The model's layout (its linears and their sizes, GPTQ's steps) comes from its adapter row.
Device peak (cuda) = max(catch phase: embeddings + block-0 inputs,
                         block phase: one block + inputs/outputs + kwargs + forward
                         transients + statistics,
                         SpinQuant rotation training: the whole model + rotated weights +
                         saved activations + logits, `rotation_training_bytes`)
On the CPU the rotation training's peak replaces the calibration/export working set when larger.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.errors import UsageError, short, short_repr
from quantkit.files import load_small_json
from quantkit.models.loading import ModelLoadError, config_json_problem

GiB = 1024**3
MiB = 1024**2
# RSS of python + torch + transformers + quantkit with a model class instantiated, before
# any weights: measured 239 MiB after the imports and 450-460 MiB once a Llama is built
# (torch 2.13 CPU, transformers 5.23; the modeling code and its kernels load then).
HOST_BASELINE_BYTES = 460 * MiB
# Host memory a process holds once it has used a CUDA GPU (driver context, cuBLAS/cuDNN, Triton's compiler
# and cache): an 8B-shaped GPTQ run on an H200 peaked 1.32 GiB above the plan's CPU-counted host parts in
# memory and 1.77 GiB above them streamed (BENCHMARKS.md, issue 21; the CPU box's streamed runs were 0.43 GiB
# above it, so the rest is the GPU's).
CUDA_HOST_BYTES = int(1.3 * GiB)
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
EXPORT_SHARD_BYTES = 2 * GiB  # the exporters' default max_shard_bytes (--shard-size 2)
# Saved activations of the rotation training, counted tensor by tensor, times this: the smaller temporaries
# alive at the peak (masks, scales, the loss' work). On the CPU the process' RSS also holds what the allocator
# keeps; there the whole training part is scaled by _TRAIN_HOST_SLACK. Measured (BENCHMARKS.md, issue 8):
# 8B on an H200, peak allocated 51.0 GiB (STE) and 91.0 GiB (scale estimator); default model on 2 CPU cores,
# RSS growth 2.6-7.0 GiB at 512-2048 tokens, which the counted tensors alone miss by 10-15%.
_TRAIN_ACT_SLACK = 1.1
_TRAIN_HOST_SLACK = 1.2
_HOST_WEIGHTS_ADVICE = ("the weights alone need {gib:.1f} GiB of host memory: use a machine with more RAM or disk "
                        "offload through accelerate (device_map with offload_folder; not wired into quantkit yet)")


class MemoryPlanError(UsageError):
    """The run will not fit in memory; the message gives the estimate and the flags that would fit."""


@dataclass(frozen=True)
class ModelShape:
    """The config fields the estimate needs (validated: positive, sensible ints), with one block's
    linears and their sizes as the model's adapter row lays them out (`ArchSpec.linear_shapes`)."""

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    dtype: str | None = None  # the weights' dtype on disk, when the config says
    qk_norm: bool = False  # per-head RMSNorms over q and k (the row says: Qwen3)
    # (relative name, out, in) of a block's linears: an MoE model's expert blocks (every expert), else every block
    linears: tuple[tuple[str, int, int], ...] = ()
    # an MoE model's blocks with a dense MLP: their linears, and how many (DeepSeek's first_k_dense_replace,
    # Qwen's mlp_only_layers); () / 0 for a dense model
    dense_linears: tuple[tuple[str, int, int], ...] = ()
    dense_blocks: int = 0
    blocks: str = "model.layers"  # where the decoder blocks live, and the LM head (module names)
    lm_head: str = "lm_head"
    steps: tuple[tuple[str, ...], ...] = ()  # GPTQ's true-sequential steps (linears sharing one input)
    rotated_twice: tuple[str, ...] = ()  # linears SpinQuant rotates on both sides (v, o, down)

    @classmethod
    def from_config(cls, cfg: dict[str, Any], where: str = "config.json") -> "ModelShape":
        """Validate a transformers config dict; ModelLoadError naming the field otherwise."""
        if not isinstance(cfg, dict):
            raise ModelLoadError(f"{where} is not a JSON object; pass a transformers model directory")
        vals = _config_sizes(cfg, where)
        spec = _spec_of(cfg)
        dt = cfg.get("dtype") or cfg.get("torch_dtype")
        return cls(**vals, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                   attention_bias=bool(cfg.get("attention_bias", spec.qkv_bias)),
                   dtype=dt if isinstance(dt, str) else None, qk_norm=spec.qk_norm, **_layout(spec, cfg, where))

    def block_linears(self, dense: bool = False) -> dict[str, tuple[int, int]]:
        """Relative name -> (out_features, in_features) of one block's linears (dense: of an MoE
        model's blocks with a dense MLP)."""
        return {n: (o, i) for n, o, i in (self.dense_linears if dense else self.linears)}

    def block_params(self, dense: bool = False) -> int:
        n = sum(o * i for o, i in self.block_linears(dense).values()) + 2 * self.hidden_size
        if self.attention_bias:
            n += (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim
        if self.qk_norm:
            n += 2 * self.head_dim
        return n

    def params(self) -> int:
        emb = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else emb
        dense = min(self.dense_blocks, self.num_hidden_layers) if self.dense_linears else 0
        return (emb + head + (self.num_hidden_layers - dense) * self.block_params() + dense * self.block_params(True)
                + self.hidden_size)


def _config_sizes(cfg: dict[str, Any], where: str) -> dict[str, int]:
    """The config's scalar sizes, each a sensible positive int (ModelLoadError naming the field)."""
    from quantkit.models.adapter import head_dim_of

    vals: dict[str, int] = {}
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size"):
        v = cfg.get(key)
        if v is None:
            raise ModelLoadError(f"{where} has no {key}; it is not a decoder-only transformers config")
        _check_size(v, key, where)
        vals[key] = v
    for key, default in (("num_key_value_heads", vals["num_attention_heads"]),
                         ("head_dim", head_dim_of({k: vals[k] for k in ("hidden_size", "num_attention_heads")}))):
        v = cfg.get(key)
        vals[key] = default if v is None else v
        _check_size(vals[key], key, where)
    if vals["num_attention_heads"] % vals["num_key_value_heads"]:
        raise ModelLoadError(
            f"{where} field num_key_value_heads={vals['num_key_value_heads']} does not divide "
            f"num_attention_heads={vals['num_attention_heads']} (each key/value head serves a whole group of "
            "query heads); fix config.json"
        )
    mp = cfg.get("max_position_embeddings")
    if mp is not None and (isinstance(mp, bool) or not isinstance(mp, int) or mp <= 0):
        raise ModelLoadError(f"{where} field max_position_embeddings={short_repr(mp, 40)} is not a sensible positive size")
    return vals


def _check_size(v: Any, key: str, where: str) -> None:
    from quantkit.models.adapter import SIZE_LIMIT

    if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v > SIZE_LIMIT:
        raise ModelLoadError(f"{where} field {key}={short_repr(v, 40)} is not a sensible positive size")


def _spec_of(cfg: dict[str, Any]):
    """The config's adapter row; the Llama row for a config that names no supported family (the plan
    still estimates it: the runs refuse an unsupported family themselves, before the plan)."""
    from quantkit.models.adapter import ARCH_SPECS, UnsupportedModelError, spec_for

    try:
        return spec_for(cfg.get("model_type"))
    except UnsupportedModelError:
        return ARCH_SPECS[0]


def _layout(spec, cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """ModelShape's fields that the adapter row lays out: the linears and their sizes, the blocks' and the
    LM head's names, GPTQ's steps, the linears a rotation touches on both sides."""
    moe = spec.experts is not None
    try:
        lin = spec.linear_shapes(cfg, only="moe" if moe else None)
        dense = spec.linear_shapes(cfg, only="dense") if moe else {}
        n_dense = spec.dense_block_count(cfg)
    except ValueError as e:  # a field that is not a size
        raise ModelLoadError(f"{where} {e}") from e
    rot = spec.rotation
    return dict(linears=tuple((n, o, i) for n, (o, i) in lin.items()),
                dense_linears=tuple((n, o, i) for n, (o, i) in dense.items()), dense_blocks=n_dense,
                blocks=spec.blocks, lm_head=spec.lm_head,
                steps=tuple(tuple(n.replace("*", "0") for n in step) for step in spec.sequential),
                rotated_twice=() if rot is None else (rot.value, rot.attn_out, rot.mlp_out))


@dataclass
class MemoryPlan:
    host_peak: int  # bytes
    device_peak: int  # bytes on the accelerator; 0 when calibrating on the CPU
    host_parts: dict[str, int] = field(default_factory=dict)
    device_parts: dict[str, int] = field(default_factory=dict)
    host_available: int | None = None
    device_available: int | None = None
    device: str = "cpu"
    fits: bool = True
    advice: list[str] = field(default_factory=list)
    streamed: bool = False  # blocks read one at a time from the safetensors files
    activations: str = "device"  # where calibration activations wait between blocks: device, host, disk

    def summary(self) -> str:
        """One line for the start of a run."""
        def gib(n):
            return f"{n / GiB:.2f} GiB"

        s = f"memory plan: host peak ~{gib(self.host_peak)}"
        if self.host_available is not None:
            s += f" of {gib(self.host_available)} available"
        if self.device != "cpu":
            s += f"; {self.device} peak ~{gib(self.device_peak)}"
            if self.device_available is not None:
                s += f" of {gib(self.device_available)} free"
        if self.streamed:
            s += "; streamed (blocks read from the shards one at a time)"
        if self.activations != "device":
            s += f"; activations on {'pinned host memory' if self.activations == 'host' else 'disk'}"
        return s + ("" if self.fits else " — does not fit")

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("device", "host_peak", "device_peak", "host_parts", "device_parts",
                                              "host_available", "device_available", "fits", "advice", "streamed",
                                              "activations")}


def _stat_kinds(recipe) -> frozenset[str]:
    from quantkit.methods.base import build_methods

    kinds: frozenset[str] = frozenset()
    for st, m in zip(recipe.stages, build_methods(recipe)):
        # Methods that capture their own statistics inside a block say so in `plan_stats`.
        kinds |= m.stats | getattr(m, "plan_stats", frozenset())
        if st.options.get("learned_rounding"):  # quant.rounding runs the block on calibration data
            kinds |= {"rounding"}
        if m.needs_reference:  # the float model's activations too (GPTQ's gptaq, resolved under the scheme)
            kinds |= {"reference"}
    return kinds


def _gptq_backend(recipe) -> str:
    for st in recipe.stages:
        if st.method == "gptq":
            return str(st.options.get("backend", "auto"))
    return "auto"


def _gptq_step_bytes(shape: ModelShape, torch_solve: bool) -> int:
    """Peak device bytes of one GPTQ step's Hessian and solve (quantkit.quant.gptq), the worst step.

    Per step with input width I and N = (stacked out) x I weights: while factoring, H plus
    two (I, I) float32 intermediates next to the stacked model-dtype copy of the weights
    (counted at 2 bytes); while solving, H and U plus the stacked copy (2 bytes), W in float32
    (4) and the integers (1: int8 from the Triton solve, 4: floats from the torch loop), and
    while W is built a permuted model-dtype copy (2 more)."""
    per_elem = 2 + 4 + (4 if torch_solve else 1)
    lin = {**(shape.block_linears(True) if shape.dense_blocks else {}), **shape.block_linears()}
    worst = 0
    for step in shape.steps:  # an expert's steps stand for every expert's (all alike)
        shapes = [lin[n] for n in step if n in lin]
        if not shapes:
            continue
        i = shapes[0][1]
        n = sum(o for o, _i in shapes) * i
        factor = 3 * i * i * 4 + 2 * n
        solve = 2 * i * i * 4 + max(per_elem * n, 8 * n)
        worst = max(worst, factor, solve)
    return worst


def _host_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _device_available(device: str) -> int | None:
    if not device.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


def rotation_training_bytes(shape: ModelShape, wb: int, *, seqlen: int, batch_size: int = 1,
                            quantize_weights: bool, act: bool, kv: bool, estimator: str = "ste",
                            objective: str = "ce") -> dict[str, int]:
    """What SpinQuant's rotation training keeps alive at its peak (the end of a forward), by part.

    The whole model sits where it trains (`_spin_train.train_rotations` moves it), beside:
    - rotated weights: every tensor R1/R2/R4 touch is recomputed each step (about the whole model
      again), plus one intermediate for the linears rotated twice (v_proj, o_proj, down_proj);
    - activations autograd saves, per token and layer (elements, in the model dtype): norms'
      inputs/outputs, one fake-quantized input copy per linear (each linear has its own hook),
      q/k/v and RoPE outputs, K/V fake-quant, attention output, gate/up/act/product, R4's output;
      the "scale" estimator also saves three float32 copies (x, the clamp's input, q) of every
      fake-quantized input;
    - logits (model dtype) + their float32 copy and log-softmax for the loss; objective "kl" adds
      the float model's logits (model dtype), their float32 log-softmax and its exp;
    - R1, R2 with their gradients and the Cayley step's temporaries (float32).
    Checked against measurements in BENCHMARKS.md (issue 8)."""
    h, i, L = shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers
    q, kvd = shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
    tokens = batch_size * seqlen
    lin = shape.block_linears()
    twice = sum(o * n for k, (o, n) in lin.items() if k in shape.rotated_twice)
    rotated = (shape.params() + L * twice) * wb
    quant_copies = sum(n for _o, n in lin.values()) if act else 0  # one per linear: its input
    norm = 2 * (h * wb + (2 if wb < 4 else 1) * h * 4)  # 2 RMSNorms: input, float32 x and x/rms
    attn = (q + 2 * kvd  # q/k/v outputs
            + 2 * (q + kvd)  # RoPE: rotate_half(q, k) and the rotated q, k
            + (2 * q if kvd < q else 0)  # repeat_kv: K, V expanded to every head (GQA)
            + q)  # attention output
    mlp = 4 * i + (i if act else 0)  # gate, up, act(gate), product; R4's output
    per_token = norm + wb * (attn + mlp + quant_copies + (4 * kvd if kv else 0))  # bytes
    acts = tokens * L * per_token
    if estimator == "scale" and (act or kv):  # x, the clamp's input and q, all float32
        acts += tokens * L * (quant_copies + (2 * kvd if kv else 0)) * 4 * 3
    acts = int(acts * _TRAIN_ACT_SLACK)
    logits = tokens * shape.vocab_size * (wb + 4 + 4 + (wb + 4 + 4 if objective == "kl" else 0))
    rot = (h * h + L * shape.head_dim**2) * 4 * 6
    parts = {"model weights": shape.params() * wb, "rotated weights": rotated, "saved activations": acts,
             "logits and loss": logits, "rotations and their steps": rot}
    if quantize_weights:  # one fake-quantized weight in float32 at a time (the largest)
        parts["weight fake-quant"] = max(o * n for o, n in lin.values()) * 4 * 3
    return parts


def _rotation_training(recipe):
    """(SpinQuant stage, its options) when the recipe learns rotations, else (None, None)."""
    from quantkit.methods.base import build_methods

    for m in build_methods(recipe):
        if m.name == "spinquant" and m.opts.rotation == "learned":
            return m, m.opts
    return None, None


@dataclass
class _Sizes:
    """The byte counts a run's phases are made of (see `estimate_memory`); 0 where a part is absent."""

    wb: int  # bytes per weight in the run's dtype
    weights: int  # the whole model
    results: int  # every block's quantized tensors, kept for export
    block_results: int  # one block's
    export: int  # the export's working set: one output shard (+ the packed tensors, or a linear's read-back)
    act: int  # calibration activations: every sample's block inputs + outputs
    one_batch: int  # one batch's inputs + outputs
    rope: int  # rotary cos/sin
    transient: int  # one batch's forward temporaries
    stats: int  # calibration statistics (Hessians, abs-means)
    block: int  # one block's weights
    calib_set: int  # the token ids
    emb: int  # the embeddings


def _quantized_bytes(shape: ModelShape, recipe, wb: int) -> tuple[int, int, int, int, int, int]:
    """(every block's quantized tensors, block 0's, the float weights they replace, their packed bytes, the
    largest linear's packed bytes, the largest tensor the export writes whole) for the recipe's quantized
    linears.

    Quantized tensors kept for export: q int8 (out, in) + float32 scales (+ int8 zeros)."""
    from quantkit.calib.pipeline import is_ignored
    from quantkit.quant.core import group_size_for

    args = recipe.scheme.weights
    h, L = shape.hidden_size, shape.num_hidden_layers
    results = block_results = quantized = packed = largest_packed = 0
    largest = shape.vocab_size * h * wb  # the embeddings
    lin = shape.block_linears()
    names = {f"{shape.blocks}.{b}.{n}": oi for b in range(L) for n, oi in lin.items()}
    if not shape.tie_word_embeddings:
        names[shape.lm_head] = (shape.vocab_size, h)
    for name, (o, i) in names.items():
        if is_ignored(name, recipe.ignore):
            continue
        groups = i // group_size_for(args, i) if i % group_size_for(args, i) == 0 else 1
        results += o * i + o * groups * (4 + (0 if args.symmetric else 1))
        if name.startswith(f"{shape.blocks}.0."):
            block_results += o * i + o * groups * (4 + (0 if args.symmetric else 1))
        quantized += o * i
        one = o * i * args.bits // 8 + o * groups * wb + (0 if args.symmetric else o * groups * args.bits // 8)
        packed += one
        largest_packed = max(largest_packed, one)
    return results, block_results, quantized, packed, largest_packed, max(largest, largest_packed)


def _sizes(shape: ModelShape, recipe, calib, *, wb: int, kinds: frozenset[str], data: bool, on_gpu: bool,
           stream: bool, shard_bytes: int) -> _Sizes:
    h = shape.hidden_size
    results, block_results, quantized, packed, largest_packed, largest = _quantized_bytes(shape, recipe, wb)
    weights = shape.params() * wb
    file_bytes = weights - quantized * wb + packed  # the checkpoint's tensors
    # The writer fills each shard up to shard_bytes (--shard-size); a larger tensor gets a shard of its own.
    shard = min(file_bytes, max(shard_bytes, largest))
    lin = shape.block_linears()
    if stream:  # one shard's tensors, read from disk as it is written, + one linear's read-back and check
        export = shard + max(o * i for o, i in lin.values()) * (1 + 4 + 4 + wb)
    else:  # save_file copies each tensor of a shard to bytes; the packed tensors are new too.
        export = shard + min(packed, max(shard_bytes, largest_packed))

    # Calibration working set (where the blocks run).
    tokens = calib.samples * calib.seqlen
    batch_tokens = min(calib.batch_size, calib.samples) * calib.seqlen
    stats = 0
    if "hessian" in kinds:
        ins = [i for _o, i in lin.values()]
        stats = sum(i * i * 4 for i in ins) + 2 * max(ins) ** 2 * 4  # all X^T X + one solve's copies
    elif "hessian_step" in kinds:
        # GPTQ: one shared X^T X per true-sequential step is alive, plus the solve's work.
        stats = _gptq_step_bytes(shape, torch_solve=not on_gpu or _gptq_backend(recipe) == "torch")
    elif kinds:
        stats = sum(i * 4 * 2 for _o, i in lin.values())
    if "rounding" in kinds and data:
        # learned rounding: the float block outputs (one per token), per weight 5 float32 (the float copy, V, its
        # gradient, the best V, the fake-quantized weight), one batch's forward kept for the backward pass
        stats += tokens * h * wb + sum(o * i for o, i in lin.values()) * 4 * 5 \
            + batch_tokens * (3 * shape.intermediate_size + 6 * h) * 4
    streams = 2 if "reference" in kinds else 1  # gptaq: the float model's activations beside the quantized ones
    if "reference" in kinds and data:
        # a float copy of the block, one (in, in) cross term and the asymmetric target's factor per step
        stats += shape.block_params() * wb + 2 * max(i for _o, i in lin.values()) ** 2 * 4
    return _Sizes(
        wb=wb, weights=weights, results=results, block_results=block_results, export=export,
        act=tokens * h * wb * 2 * streams if data else 0,
        one_batch=batch_tokens * h * wb * 2 * streams if data else 0,
        rope=tokens * shape.head_dim * 2 * wb if data else 0,  # cos/sin per batch, shared by blocks
        transient=batch_tokens * (3 * shape.intermediate_size + 6 * h) * wb if data else 0,
        stats=stats, block=shape.block_params() * wb,
        calib_set=tokens * 8 * 2 if data else 0,  # int64 token ids (+ the batches' copy)
        emb=shape.vocab_size * h * wb)


def _gpu_peaks(z: _Sizes, *, stream: bool, host_available: int | None, device_available: int | None):
    """(host parts, host peak, device parts, device peak, where the activations wait) of a GPU run."""
    held = {"weights": z.weights, "quantized tensors": z.results} if not stream else {}
    device_parts = {"block weights": z.block, "block inputs + outputs": z.act, "rotary kwargs": z.rope,
                    "forward transients": z.transient, "statistics": z.stats}
    catch = z.emb + z.act // 2 + z.rope
    host_fixed = HOST_BASELINE_BYTES + CUDA_HOST_BYTES + sum(held.values()) + z.calib_set
    # The phases of a streamed run on the host: catch (embeddings), one block calibrated and saved (with
    # its quantized tensors and their serialized copy for OUT.partial, instead of every block's) while the
    # next one is read ahead, export.
    phases = {"streamed: embeddings": z.emb,
              "streamed: two blocks (one read ahead) + results": 2 * z.block + 2 * z.block_results,
              "export": z.export} if stream else {"export": z.export}
    work_name = max(phases, key=phases.get)
    host_work = phases[work_name]
    placement = "device"
    if stream and device_available is not None and sum(device_parts.values()) > device_available \
            and z.act > z.one_batch:
        # Activations off the device: one batch at a time visits it; pinned host memory if it fits, else disk.
        device_parts["block inputs + outputs"] = z.one_batch
        catch = z.emb + z.one_batch + z.rope
        host_room = None if host_available is None else host_available - host_fixed - host_work
        placement = "host" if host_room is None or z.act <= host_room else "disk"
    host_parts = {"runtime": HOST_BASELINE_BYTES, "CUDA runtime": CUDA_HOST_BYTES, **held, work_name: host_work}
    if placement == "host":
        host_parts["calibration activations (pinned)"] = z.act
    return host_parts, sum(host_parts.values()) + z.calib_set, device_parts, max(catch, sum(device_parts.values())), \
        placement


def _cpu_peaks(z: _Sizes, *, stream: bool, host_available: int | None):
    """(host parts, host peak, where the activations wait) of a run calibrating on the CPU."""
    held = {"weights": z.weights, "quantized tensors": z.results} if not stream else {}
    fixed = HOST_BASELINE_BYTES + sum(held.values())

    def phases_with(a: int) -> dict[str, int]:  # a: the activations held in memory
        calib_work = a + z.rope + z.transient + z.stats + z.calib_set
        if not stream:
            return {"export": z.export, "calibration (activations, stats)": calib_work}
        return {"streamed: embeddings (catching block inputs)": z.emb + a // 2 + z.rope + z.calib_set,
                "streamed: two blocks (one read ahead) + results": 2 * z.block + 2 * z.block_results + calib_work,
                "export": z.export}

    placement = "device"
    phases = phases_with(z.act)
    if stream and host_available is not None and fixed + max(phases.values()) > host_available \
            and z.act > z.one_batch:
        placement = "disk"  # the activations wait in files; one batch at a time is in memory
        phases = phases_with(z.one_batch)
    worst = max(phases, key=phases.get)
    host_parts = {"runtime": HOST_BASELINE_BYTES, **held, worst: phases[worst]}
    return host_parts, sum(host_parts.values()), placement


def _add_rotation_training(plan: MemoryPlan, shape: ModelShape, recipe, z: _Sizes) -> dict[str, Any] | None:
    """SpinQuant's learned rotations train on the whole model before the layer-wise pipeline: their own
    peak, which replaces the plan's when larger. Returns the training's parts and options when it sets
    the peak that counts, else None."""
    spin, so = _rotation_training(recipe)
    if spin is None:
        return None
    train = rotation_training_bytes(  # on the untied model (SpinQuant gives the LM head its own weight)
        dataclasses.replace(shape, tie_word_embeddings=False), z.wb, seqlen=so["train_seqlen"],
        batch_size=so["batch_size"],
        quantize_weights=spin.train_quantized_weights(), act=recipe.scheme.input_activations is not None,
        kv=recipe.scheme.kv_cache is not None, estimator=so["estimator"], objective=so["objective"])
    total = sum(train.values())
    if plan.device.startswith("cuda"):
        if total <= plan.device_peak:
            return None
        plan.device_parts = {f"rotation training: {k}": v for k, v in train.items()}
        plan.device_peak = total
        return {"parts": train, "options": so}
    # host_parts["weights"] holds the (tied) weights already; the untied head is extra
    extra = int((total - z.weights) * _TRAIN_HOST_SLACK)
    work = [k for k in plan.host_parts if k.startswith(("calibration", "export"))]
    base = plan.host_peak - max(plan.host_parts[k] for k in work)
    if base + extra <= plan.host_peak:
        return None
    for k in work:
        del plan.host_parts[k]
    plan.host_parts["rotation training"] = extra
    plan.host_peak = sum(plan.host_parts.values())
    return {"parts": train, "options": so}


def estimate_memory(
    config: dict[str, Any] | ModelShape,
    recipe,
    calib,
    device: str = "cpu",
    *,
    dtype: str = "auto",
    with_data: bool | None = None,
    host_available: int | None = None,
    device_available: int | None = None,
    detect: bool = True,
    stream: bool = False,
    shard_bytes: int = EXPORT_SHARD_BYTES,
) -> MemoryPlan:
    """Estimate peak memory of quantizing a model of `config` with `recipe` (no weights loaded).

    config: a transformers config dict (or a ModelShape); recipe: quantkit.recipe.Recipe;
    calib: CalibConfig (samples, seqlen, batch_size); device: where blocks calibrate.
    with_data: whether blocks run forward on calibration data (default: the recipe's
    methods ask for statistics; RTN is data-free). host/device_available: bytes to
    compare with (default: detected when detect=True). Returns a MemoryPlan whose
    `advice` lists flags that would make a non-fitting run fit.
    stream: the run reads one block at a time from the safetensors files (--stream): the host
    holds one block, its results and the calibration set, not the model. The plan's
    `activations` says where the activations between blocks fit: "device", "host" (pinned;
    a GPU run whose device cannot hold them) or "disk"; only a streamed run moves them off the device.
    shard_bytes: the export's largest weights file (--shard-size): one shard is in memory while it is written.
    """
    shape = config if isinstance(config, ModelShape) else ModelShape.from_config(config)
    on_gpu = device.startswith("cuda")
    if dtype == "auto":
        dtype = "bfloat16" if on_gpu else "float32"
    kinds = _stat_kinds(recipe)
    data = bool(kinds) if with_data is None else with_data
    z = _sizes(shape, recipe, calib, wb=_DTYPE_BYTES[dtype], kinds=kinds, data=data, on_gpu=on_gpu, stream=stream,
               shard_bytes=shard_bytes)
    if detect:
        host_available = _host_available() if host_available is None else host_available
        device_available = _device_available(device) if device_available is None else device_available
    if on_gpu:
        host_parts, host_peak, device_parts, device_peak, placement = _gpu_peaks(
            z, stream=stream, host_available=host_available, device_available=device_available)
    else:
        (host_parts, host_peak, placement), device_parts, device_peak = \
            _cpu_peaks(z, stream=stream, host_available=host_available), {}, 0
    plan = MemoryPlan(host_peak, device_peak, host_parts, device_parts, host_available, device_available, device,
                      streamed=stream, activations=placement)
    training = _add_rotation_training(plan, shape, recipe, z)
    over_host = host_available is not None and plan.host_peak > host_available
    over_dev = on_gpu and device_available is not None and plan.device_peak > device_available
    plan.fits = not (over_host or over_dev)
    if plan.fits:
        return plan
    budget, peak = (device_available, plan.device_peak) if over_dev else (host_available, plan.host_peak)
    if training is not None:
        _training_advice(plan, training, z, budget=budget, peak=peak, over_host=over_host, over_dev=over_dev)
        return plan
    streamed = None
    if over_host and not stream:
        streamed = estimate_memory(shape, recipe, calib, device, dtype=dtype, with_data=with_data,
                                   host_available=host_available, device_available=device_available,
                                   detect=False, stream=True, shard_bytes=shard_bytes).host_peak
    _calibration_advice(plan, z, calib, data=data, budget=budget, peak=peak, over_host=over_host, over_dev=over_dev,
                        streamed_peak=streamed)
    return plan


def _training_advice(plan: MemoryPlan, training: dict[str, Any], z: _Sizes, *, budget: int, peak: int,
                     over_host: bool, over_dev: bool) -> None:
    """Flags that shrink the rotation training until it fits."""
    train, so = training["parts"], training["options"]
    on_gpu = plan.device.startswith("cuda")
    # what scales with the training length: saved activations and logits (x the CPU's slack there)
    grows = (train["saved activations"] + train["logits and loss"]) * (1 if on_gpu else _TRAIN_HOST_SLACK)
    # tokens per step (batch x length) that fit; fewer sequences first, so each keeps its context
    fit = int(so["batch_size"] * so["train_seqlen"] * (budget - (peak - grows)) / grows) if grows else 0
    batch = fit // so["train_seqlen"]
    if 1 <= batch < so["batch_size"]:
        plan.advice.append(f"--train-batch {batch} (rotation training activations scale with it)")
    elif 2 <= fit < so["train_seqlen"] * so["batch_size"]:
        plan.advice.append(("--train-batch 1 " if so["batch_size"] > 1 else "")
                           + f"--train-seqlen {fit} (rotation training activations scale with it)")
    if so["estimator"] == "scale":
        plan.advice.append("--estimator ste (no float32 copies of the fake-quantized activations)")
    if on_gpu and over_dev and not over_host:
        plan.advice.append("--device cpu (train and calibrate in host memory, much slower)")
    if over_host:
        plan.advice.append(_HOST_WEIGHTS_ADVICE.format(gib=z.weights / GiB))


def _calibration_advice(plan: MemoryPlan, z: _Sizes, calib, *, data: bool, budget: int, peak: int,
                        over_host: bool, over_dev: bool, streamed_peak: int | None) -> None:
    """Flags that shrink the calibration working set until it fits (fewer samples, shorter, smaller batches),
    then the modes that would fit (streamed_peak: the host peak of the same run streamed, when it is not)."""
    per_sample = (z.act + z.rope) / max(calib.samples, 1)
    fixed = peak - z.act - z.rope
    if data and per_sample and budget > fixed:
        n = int((budget - fixed) // per_sample)
        if 0 < n < calib.samples:
            plan.advice.append(f"--samples {n} (calibration activations scale with samples)")
            s = int(calib.seqlen * n / calib.samples)
            if s >= 2:
                plan.advice.append(f"--seqlen {s}")
    if data and calib.batch_size > 1:
        plan.advice.append("--batch-size 1 (smaller forward transients)")
    if streamed_peak is not None:
        plan.advice.append(f"--stream (blocks read from the shards one at a time: host peak ~{streamed_peak / GiB:.1f}"
                           " GiB)")
    if over_dev and not over_host:
        plan.advice.append("--device cpu (calibrate in host memory, slower)")


def plan_run(config: dict[str, Any] | ModelShape, recipe, calib, device: str = "cpu", *, dtype: str = "auto",
             stream: bool | None = None, can_stream: bool = True, **kw) -> MemoryPlan:
    """The plan of the run quantkit will make: streamed when asked (stream=True), in memory when
    asked (False); None (the default): in memory when that fits, else streamed when that fits and
    the run can stream (can_stream: no whole-model transform, a float safetensors or GGUF source,
    no --eval). kw: estimate_memory's (host_available, device_available, detect, with_data, shard_bytes)."""
    if stream:
        return estimate_memory(config, recipe, calib, device, dtype=dtype, stream=True, **kw)
    plan = estimate_memory(config, recipe, calib, device, dtype=dtype, **kw)
    if stream is None and not plan.fits and can_stream:
        if kw.get("detect", True):  # measure once: both plans compare against the same numbers
            kw = {**kw, "host_available": plan.host_available, "device_available": plan.device_available}
        streamed = estimate_memory(config, recipe, calib, device, dtype=dtype, stream=True, **kw)
        if streamed.fits:
            return streamed
    if not can_stream:
        plan.advice = [a for a in plan.advice if not a.startswith("--stream")]
    return plan


# ----------------------------------------------------------------------------- configs


def _gguf_metadata(path: Path) -> tuple[dict[str, Any], frozenset[str]]:
    """A GGUF file's metadata (key -> value; an array -> its length) and tensor names.

    gguf.GGUFReader memory-maps the file: the tensor data is never read, only the header's pages.
    It does build an object per element of every metadata array (the default model's 49k tokens and
    its merges: seconds), so one process reads a file once (keyed by its size and mtime)."""
    st = path.stat()
    return _gguf_metadata_of(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _gguf_metadata_of(path: str, _size: int, _mtime_ns: int) -> tuple[dict[str, Any], frozenset[str]]:
    from gguf import GGUFReader, GGUFValueType

    def value(field):  # from the parts every gguf release has (ReaderField.contents() is recent)
        kind = field.types[0] if field.types else None
        if kind == GGUFValueType.ARRAY:
            return len(field.data)
        if kind == GGUFValueType.STRING:
            return field.parts[-1].tobytes().decode("utf-8")
        return field.parts[-1][0].item()

    try:
        reader = GGUFReader(path)
        kv = {name: value(field) for name, field in reader.fields.items()}
        names = frozenset(t.name for t in reader.tensors)
    # what its parser raises on a damaged file: short reads (IndexError), bad enums and UTF-8 (ValueError),
    # duplicate keys (KeyError), absurd dimensions (OverflowError, MemoryError), the map (OSError)
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, MemoryError, OSError) as e:
        raise ModelLoadError(f"{path} is a damaged GGUF file ({short(str(e), 120)}); download it again") from e
    return kv, names  # plain Python values: the map closes with the reader


def _gguf_config(path: Path | str) -> dict[str, Any]:
    """A transformers-like config dict from a GGUF file's metadata (llama.cpp's key names)."""
    from quantkit.models.loading import gguf_file

    path = gguf_file(str(path))
    kv, names = _gguf_metadata(path)
    arch = kv.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelLoadError(f"{path} has no general.architecture; not a model GGUF")
    heads = kv.get(f"{arch}.attention.head_count")
    tokens = kv.get("tokenizer.ggml.tokens")
    cfg = {
        "model_type": arch,
        "hidden_size": kv.get(f"{arch}.embedding_length"),
        "num_hidden_layers": kv.get(f"{arch}.block_count"),
        "intermediate_size": kv.get(f"{arch}.feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv.get(f"{arch}.attention.head_count_kv", heads),
        "vocab_size": kv.get(f"{arch}.vocab_size", tokens if isinstance(tokens, int) else None),
        "tie_word_embeddings": "output.weight" not in names,
        "dtype": "float32",  # quantkit dequantizes GGUF weights to a float32 cache
    }
    ctx = kv.get(f"{arch}.context_length")
    if isinstance(ctx, int) and not isinstance(ctx, bool) and ctx > 0:
        cfg["max_position_embeddings"] = ctx
    kd = kv.get(f"{arch}.attention.key_length")
    if isinstance(kd, int):
        cfg["head_dim"] = kd
    return cfg


def model_config(model: str | None, *, check_transformers: bool = True) -> dict[str, Any]:
    """The config dict of a model source (None = embedded default) without loading weights.

    Dirs and quantkit checkpoints: config.json; .gguf: its metadata; hub ids: only
    config.json is fetched.
    """
    from quantkit.models.loading import default_model_path

    if model is None or model == "default":
        return _gguf_config(default_model_path())
    if model.endswith(".gguf"):
        return _gguf_config(model)
    if os.path.isdir(model):
        path = Path(model) / "config.json"
        problem = config_json_problem(Path(model))
        if problem:
            raise ModelLoadError(problem)
    elif os.path.exists(model) or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelLoadError(f"model path {short(model, 160)} does not exist or is not a directory / .gguf file")
    else:
        from quantkit.models import hub

        path = hub.file(model, "config.json")
    cfg = load_small_json(path, ModelLoadError, "fix or re-download it")
    wrapper = None
    if isinstance(cfg, dict) and isinstance(cfg.get("text_config"), dict):  # multimodal wrappers
        wrapper = cfg.get("model_type")
        cfg = {**cfg["text_config"], "tie_word_embeddings": cfg.get("tie_word_embeddings", False)}
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{path} is not a JSON object; fix or re-download it")
    ModelShape.from_config(cfg, where=str(path))  # refuse absurd fields here, before any loading
    if check_transformers:
        from quantkit.models.loading import check_config_dict

        check_config_dict(cfg, str(path))  # what transformers would refuse, said before loading
    if wrapper is not None:  # the class that loads is the wrapper's: the adapter check needs its type
        from quantkit.models.adapter import WRAPPER_KEY

        cfg[WRAPPER_KEY] = wrapper
    return cfg


def check_memory(plan: MemoryPlan) -> None:
    """Raise MemoryPlanError (one line: estimate + advice) when the plan does not fit."""
    if plan.fits:
        return
    fix = "; try " + ", ".join(plan.advice) if plan.advice else ""
    raise MemoryPlanError(f"{plan.summary()}{fix} (estimate from config; --skip-memory-check runs anyway)")
