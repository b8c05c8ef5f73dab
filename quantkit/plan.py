"""Memory plan: peak host and device memory of a run, from the model's config alone.

No weights are loaded. The estimate adds up what the pipeline keeps alive at
its worst moment (see `estimate_memory`); `quantkit plan` prints it and every
method run checks it before loading, so a run that cannot fit stops at once
with the flags that would make it fit.

Host peak = runtime baseline + the model's weights + quantized tensors
            + max(calibration working set when calibrating on the CPU, export working set)
Device peak (cuda) = max(catch phase: embeddings + block-0 inputs,
                         block phase: one block + inputs/outputs + kwargs + forward
                         transients + statistics,
                         SpinQuant rotation training: the whole model + rotated weights +
                         saved activations + logits, `rotation_training_bytes`)
On the CPU the rotation training's peak replaces the calibration/export working set when larger.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.errors import UsageError, short, short_repr
from quantkit.models.loading import ModelLoadError

GiB = 1024**3
MiB = 1024**2
# RSS of python + torch + transformers + quantkit with a model class instantiated, before
# any weights: measured 239 MiB after the imports and 450-460 MiB once a Llama is built
# (torch 2.13 CPU, transformers 5.23; the modeling code and its kernels load then).
HOST_BASELINE_BYTES = 460 * MiB
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_EXPORT_SHARD_BYTES = 2 * GiB  # export_compressed_tensors' default max_shard_bytes
_LIMIT = 10_000_000  # no real model has a dimension or layer count near this
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
    """The config fields the estimate needs (validated: positive, sensible ints)."""

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
    qk_norm: bool = False  # Qwen3: RMSNorm over q and k heads
    # Mixture of experts (from the adapter row's ExpertsSpec): experts per block, one expert's and the
    # shared expert's intermediate sizes; 0 = a dense MLP.
    experts: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0
    dense_blocks: int = 0  # blocks of an MoE model with a dense MLP (DeepSeek's first_k_dense_replace, Qwen's mlp_only_layers)

    @classmethod
    def from_config(cls, cfg: dict[str, Any], where: str = "config.json") -> "ModelShape":
        """Validate a transformers config dict; ModelLoadError naming the field otherwise."""
        if not isinstance(cfg, dict):
            raise ModelLoadError(f"{where} is not a JSON object; pass a transformers model directory")
        vals: dict[str, int] = {}
        for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size"):
            v = cfg.get(key)
            if v is None:
                raise ModelLoadError(f"{where} has no {key}; it is not a decoder-only transformers config")
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v > _LIMIT:
                raise ModelLoadError(f"{where} field {key}={short_repr(v, 40)} is not a sensible positive size")
            vals[key] = v
        for key, default in (("num_key_value_heads", vals["num_attention_heads"]),
                             ("head_dim", vals["hidden_size"] // vals["num_attention_heads"])):
            v = cfg.get(key)
            v = default if v is None else v
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v > _LIMIT:
                raise ModelLoadError(f"{where} field {key}={short_repr(v, 40)} is not a sensible positive size")
            vals[key] = v
        if vals["num_attention_heads"] % vals["num_key_value_heads"]:
            raise ModelLoadError(
                f"{where} field num_key_value_heads={vals['num_key_value_heads']} does not divide "
                f"num_attention_heads={vals['num_attention_heads']} (each key/value head serves a whole group of "
                "query heads); fix config.json"
            )
        mp = cfg.get("max_position_embeddings")
        if mp is not None and (isinstance(mp, bool) or not isinstance(mp, int) or mp <= 0):
            raise ModelLoadError(f"{where} field max_position_embeddings={short_repr(mp, 40)} is not a sensible positive size")
        dt = cfg.get("dtype") or cfg.get("torch_dtype")
        return cls(**vals, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                   attention_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
                   dtype=dt if isinstance(dt, str) else None, qk_norm=cfg.get("model_type") == "qwen3",
                   **_moe_sizes(cfg, where))

    def block_linears(self) -> dict[str, tuple[int, int]]:
        """Relative name -> (out_features, in_features) of one block's linears (an MoE block: every
        expert's, named as quantkit's Qwen-MoE layout; sizes are what the plan needs)."""
        h, q, kv = self.hidden_size, self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        i = self.intermediate_size
        attn = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                "self_attn.o_proj": (h, q)}
        if not self.experts:
            return {**attn, "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
        out = dict(attn)
        ei, si = self.expert_intermediate, self.shared_intermediate
        for e in range(self.experts):
            out.update({f"mlp.experts.{e}.gate_proj": (ei, h), f"mlp.experts.{e}.up_proj": (ei, h),
                        f"mlp.experts.{e}.down_proj": (h, ei)})
        if si:
            out.update({"mlp.shared_expert.gate_proj": (si, h), "mlp.shared_expert.up_proj": (si, h),
                        "mlp.shared_expert.down_proj": (h, si)})
        return out

    def block_params(self, dense: bool = False) -> int:
        lin = dataclasses.replace(self, experts=0).block_linears() if dense else self.block_linears()
        n = sum(o * i for o, i in lin.values()) + 2 * self.hidden_size
        if self.attention_bias:
            n += (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim
        if self.qk_norm:
            n += 2 * self.head_dim
        return n

    def params(self) -> int:
        emb = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else emb
        dense = min(self.dense_blocks, self.num_hidden_layers) if self.experts else 0
        return (emb + head + (self.num_hidden_layers - dense) * self.block_params() + dense * self.block_params(True)
                + self.hidden_size)


def _moe_sizes(cfg: dict[str, Any], where: str) -> dict[str, int]:
    """ModelShape's MoE fields from the config, where the adapter table says the family keeps them."""
    from quantkit.models.adapter import ARCH_SPECS, expert_count

    spec = next((s for s in ARCH_SPECS if cfg.get("model_type") in s.model_types), None)
    if spec is None or spec.experts is None:
        return {}
    ex = spec.experts
    out = {}
    dense = cfg.get(ex.dense_blocks) if ex.dense_blocks else None
    out["dense_blocks"] = len(dense) if isinstance(dense, list) else dense if isinstance(dense, int) and dense > 0 else 0
    shared = ex.shared_intermediate
    keys = [("experts", ex.count[0]), ("expert_intermediate", ex.intermediate)] + \
        [("shared_intermediate", k) for k in ((shared,) if isinstance(shared, str) else shared or ())]
    for field_name, key in keys:
        v = expert_count(ex, cfg) if field_name == "experts" else cfg.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v > _LIMIT:
            raise ModelLoadError(f"{where} field {key}={short_repr(v, 40)} is not a sensible size")
        out[field_name] = out.get(field_name, 1) * v if field_name == "shared_intermediate" else v
    return out


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
    from quantkit.methods.base import get_method

    kinds: frozenset[str] = frozenset()
    for st in recipe.stages:
        cls = get_method(st.method)
        # Methods that capture their own statistics inside a block say so in `plan_stats`.
        kinds |= cls.stats | getattr(cls, "plan_stats", frozenset())
    return kinds


# GPTQ's true-sequential steps of a Llama-style block: linears of one step share their input
# and are solved stacked (quantkit.methods.gptq).
_GPTQ_STEPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
               ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",),
               # MoE (ModelShape.block_linears): every expert has the same steps; the shared expert's too
               ("mlp.experts.0.gate_proj", "mlp.experts.0.up_proj"), ("mlp.experts.0.down_proj",),
               ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"), ("mlp.shared_expert.down_proj",))


def _gptq_backend(recipe) -> str:
    for st in recipe.stages:
        if st.method == "gptq":
            return str(st.options.get("backend", "auto"))
    return "auto"


def _gptq_step_bytes(lin: dict[str, tuple[int, int]], torch_solve: bool) -> int:
    """Peak device bytes of one GPTQ step's Hessian and solve (quantkit.quant.gptq), the worst step.

    Per step with input width I and N = (stacked out) x I weights: while factoring, H plus
    two (I, I) float32 intermediates next to the stacked model-dtype copy of the weights
    (counted at 2 bytes); while solving, H and U plus the stacked copy (2 bytes), W in float32
    (4) and the integers (1: int8 from the Triton solve, 4: floats from the torch loop), and
    while W is built a permuted model-dtype copy (2 more)."""
    per_elem = 2 + 4 + (4 if torch_solve else 1)
    worst = 0
    for step in _GPTQ_STEPS:
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
    twice = sum(o * n for k, (o, n) in lin.items() if k.split(".")[-1] in ("v_proj", "o_proj", "down_proj"))
    rotated = (shape.params() + L * twice) * wb
    quant_copies = (3 + 2) * h + q + i if act else 0  # one per linear: q/k/v, o, gate/up, down inputs
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
        if m.name == "spinquant" and m.o["rotation"] == "learned":
            return m, m.o
    return None, None


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
    """
    from quantkit.calib.pipeline import is_ignored
    from quantkit.quant.core import group_size_for

    shape = config if isinstance(config, ModelShape) else ModelShape.from_config(config)
    on_gpu = device.startswith("cuda")
    if dtype == "auto":
        dtype = "bfloat16" if on_gpu else "float32"
    wb = _DTYPE_BYTES[dtype]
    kinds = _stat_kinds(recipe)
    data = bool(kinds) if with_data is None else with_data
    args = recipe.scheme.weights
    h, L = shape.hidden_size, shape.num_hidden_layers

    # Quantized tensors kept for export: q int8 (out, in) + float32 scales (+ int8 zeros).
    results = block_results = 0  # all blocks' quantized tensors, one block's
    quantized_params = 0
    packed = 0
    lin = dict(shape.block_linears())
    names = {f"model.layers.{b}.{n}": oi for b in range(L) for n, oi in lin.items()}
    if not shape.tie_word_embeddings:
        names["lm_head"] = (shape.vocab_size, h)
    for name, (o, i) in names.items():
        if is_ignored(name, recipe.ignore):
            continue
        groups = i // group_size_for(args, i) if i % group_size_for(args, i) == 0 else 1
        results += o * i + o * groups * (4 + (0 if args.symmetric else 1))
        if name.startswith("model.layers.0."):
            block_results += o * i + o * groups * (4 + (0 if args.symmetric else 1))
        quantized_params += o * i
        packed += o * i * args.bits // 8 + o * groups * wb + (0 if args.symmetric else o * groups * args.bits // 8)
    weights = shape.params() * wb
    file_bytes = weights - quantized_params * wb + packed  # the checkpoint's tensors
    # save_file copies each tensor of a shard to bytes; the packed tensors are new too.
    export = min(file_bytes, _EXPORT_SHARD_BYTES) + min(packed, _EXPORT_SHARD_BYTES)
    if stream:  # one shard's tensors, read from disk as it is written, + one linear's read-back and check
        export = min(file_bytes, _EXPORT_SHARD_BYTES) + max(o * i for o, i in lin.values()) * (1 + 4 + 4 + wb)

    # Calibration working set (where the blocks run).
    tokens = calib.samples * calib.seqlen
    batch_tokens = min(calib.batch_size, calib.samples) * calib.seqlen
    act = tokens * h * wb * 2 if data else 0  # block inputs + outputs, all samples
    rope = tokens * shape.head_dim * 2 * wb if data else 0  # cos/sin per batch, shared by blocks
    transient = batch_tokens * (3 * shape.intermediate_size + 6 * h) * wb if data else 0  # one batch's forward
    stats = 0
    if "hessian" in kinds:
        ins = [i for _o, i in lin.values()]
        stats = sum(i * i * 4 for i in ins) + 2 * max(ins) ** 2 * 4  # all X^T X + one solve's copies
    elif "hessian_step" in kinds:
        # GPTQ: one shared X^T X per true-sequential step is alive, plus the solve's work.
        stats = _gptq_step_bytes(lin, torch_solve=not on_gpu or _gptq_backend(recipe) == "torch")
    elif kinds:
        stats = sum(i * 4 * 2 for _o, i in lin.values())
    block = shape.block_params() * wb
    calib_set = tokens * 8 * 2 if data else 0  # int64 token ids (+ the batches' copy)

    if detect:
        host_available = _host_available() if host_available is None else host_available
        device_available = _device_available(device) if device_available is None else device_available
    emb = shape.vocab_size * h * wb
    one_batch = batch_tokens * h * wb * 2 if data else 0  # a batch's inputs + outputs on the device
    host_parts: dict[str, int] = {"runtime": HOST_BASELINE_BYTES}
    held = {"weights": weights, "quantized tensors": results} if not stream else {}
    device_parts: dict[str, int] = {}
    placement = "device"
    if on_gpu:
        device_parts = {"block weights": block, "block inputs + outputs": act, "rotary kwargs": rope,
                        "forward transients": transient, "statistics": stats}
        catch = emb + act // 2 + rope
        host_fixed = HOST_BASELINE_BYTES + sum(held.values()) + calib_set
        # The phases of a streamed run on the host: catch (embeddings), one block calibrated and saved (with
        # its quantized tensors and their serialized copy for OUT.partial, instead of every block's) while the
        # next one is read ahead, export.
        phases = {"streamed: embeddings": emb, "streamed: two blocks (one read ahead) + results": 2 * block + 2 * block_results,
                  "export": export} if stream else {"export": export}
        work_name = max(phases, key=phases.get)
        host_work = phases[work_name]
        if stream and device_available is not None and sum(device_parts.values()) > device_available \
                and act > one_batch:
            # Activations off the device: one batch at a time visits it; pinned host memory if it fits, else disk.
            device_parts["block inputs + outputs"] = one_batch
            catch = emb + one_batch + rope
            host_room = None if host_available is None else host_available - host_fixed - host_work
            placement = "host" if host_room is None or act <= host_room else "disk"
        host_parts.update(held)
        host_parts[work_name] = host_work
        if placement == "host":
            host_parts["calibration activations (pinned)"] = act
        host_peak = sum(host_parts.values()) + calib_set
        device_peak = max(catch, sum(device_parts.values()))
    else:
        fixed = HOST_BASELINE_BYTES + sum(held.values())

        def cpu_phases(a: int) -> dict[str, int]:  # a: the activations held in memory
            calib_work = a + rope + transient + stats + calib_set
            if not stream:
                return {"export": export, "calibration (activations, stats)": calib_work}
            return {"streamed: embeddings (catching block inputs)": emb + a // 2 + rope + calib_set,
                    "streamed: two blocks (one read ahead) + results": 2 * block + 2 * block_results + calib_work,
                    "export": export}

        phases = cpu_phases(act)
        if stream and host_available is not None and fixed + max(phases.values()) > host_available \
                and act > one_batch:
            placement = "disk"  # the activations wait in files; one batch at a time is in memory
            phases = cpu_phases(one_batch)
        host_parts.update(held)
        worst = max(phases, key=phases.get)
        host_parts[worst] = phases[worst]
        host_peak = sum(host_parts.values())
        device_peak = 0

    spin, so = _rotation_training(recipe)
    training_peak = False  # whether the rotation training sets the peak that counts
    if spin is not None:  # a whole-model phase before the layer-wise pipeline: its own peak
        train = rotation_training_bytes(  # on the untied model (SpinQuant gives the LM head its own weight)
            dataclasses.replace(shape, tie_word_embeddings=False), wb, seqlen=so["train_seqlen"],
            batch_size=so["batch_size"],
            quantize_weights=spin.train_quantized_weights(), act=recipe.scheme.input_activations is not None,
            kv=recipe.scheme.kv_cache is not None, estimator=so["estimator"], objective=so["objective"])
        total = sum(train.values())
        if on_gpu:
            if total > device_peak:
                device_parts = {f"rotation training: {k}": v for k, v in train.items()}
                device_peak, training_peak = total, True
        else:  # host_parts["weights"] holds the (tied) weights already; the untied head is extra
            extra = int((total - weights) * _TRAIN_HOST_SLACK)
            base = host_peak - max(v for k, v in host_parts.items() if k.startswith(("calibration", "export")))
            if base + extra > host_peak:
                for k in [k for k in host_parts if k.startswith(("calibration", "export"))]:
                    del host_parts[k]
                host_parts["rotation training"] = extra
                host_peak, training_peak = sum(host_parts.values()), True

    plan = MemoryPlan(host_peak, device_peak, host_parts, device_parts, host_available, device_available, device,
                      streamed=stream, activations=placement)
    over_host = host_available is not None and host_peak > host_available
    over_dev = on_gpu and device_available is not None and device_peak > device_available
    plan.fits = not (over_host or over_dev)
    if not plan.fits and training_peak:
        # what scales with the training length: saved activations and logits (x the CPU's slack there)
        budget, peak = (device_available, device_peak) if over_dev else (host_available, host_peak)
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
            plan.advice.append(_HOST_WEIGHTS_ADVICE.format(gib=weights / GiB))
    elif not plan.fits:
        budget, peak = (device_available, device_peak) if over_dev else (host_available, host_peak)
        per_sample = (act + rope) / max(calib.samples, 1)
        fixed = peak - act - rope
        if data and per_sample and budget > fixed:
            n = int((budget - fixed) // per_sample)
            if 0 < n < calib.samples:
                plan.advice.append(f"--samples {n} (calibration activations scale with samples)")
                s = int(calib.seqlen * n / calib.samples)
                if s >= 2:
                    plan.advice.append(f"--seqlen {s}")
        if data and calib.batch_size > 1:
            plan.advice.append("--batch-size 1 (smaller forward transients)")
        if over_host and not stream:
            streamed = estimate_memory(shape, recipe, calib, device, dtype=dtype, with_data=with_data,
                                       host_available=host_available, device_available=device_available,
                                       detect=False, stream=True)
            plan.advice.append(f"--stream (blocks read from the shards one at a time: host peak ~{streamed.host_peak / GiB:.1f}"
                                  " GiB)")
        if over_dev and not over_host:
            plan.advice.append("--device cpu (calibrate in host memory, slower)")
    return plan


def plan_run(config: dict[str, Any] | ModelShape, recipe, calib, device: str = "cpu", *, dtype: str = "auto",
             stream: bool | None = None, can_stream: bool = True, **kw) -> MemoryPlan:
    """The plan of the run quantkit will make: streamed when asked (stream=True), in memory when
    asked (False); None (the default): in memory when that fits, else streamed when that fits and
    the run can stream (can_stream: no whole-model transform, a float safetensors or GGUF source,
    no --eval). kw: estimate_memory's (host_available, device_available, detect, with_data)."""
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


_GGUF_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class _GGUFHeader:
    """A bounds-checked reader of a GGUF file's metadata and tensor names (no tensor data read).

    Written here rather than using gguf.GGUFReader, which also decodes every
    metadata array (49k tokenizer strings: seconds) and fails with assorted
    exception types on damaged files.
    """

    def __init__(self, path: Path):
        import struct

        self._struct = struct
        self.path = path
        self.data = path.read_bytes() if path.stat().st_size < 64 * MiB else None
        self._f = None if self.data is not None else open(path, "rb")
        self.size = path.stat().st_size
        self.pos = 0

    def close(self) -> None:
        if self._f is not None:
            self._f.close()

    def _read(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise ValueError("runs past the end of the file")
        if self.data is not None:
            b = self.data[self.pos : self.pos + n]
        else:
            self._f.seek(self.pos)
            b = self._f.read(n)
        self.pos += n
        return b

    def _unpack(self, fmt: str):
        return self._struct.unpack(fmt, self._read(self._struct.calcsize(fmt)))[0]

    def _string(self) -> str:
        return self._read(self._unpack("<Q")).decode("utf-8", errors="replace")

    def _value(self, vtype: int, depth: int = 0):
        if vtype in _GGUF_SCALAR:
            return self._unpack(_GGUF_SCALAR[vtype])
        if vtype == 8:
            return self._string()
        if vtype == 9 and depth == 0:
            etype, count = self._unpack("<I"), self._unpack("<Q")
            if etype in _GGUF_SCALAR:  # skip numeric arrays without decoding them
                self._read(count * self._struct.calcsize(_GGUF_SCALAR[etype]))
                return _ArrayLen(count)
            if count > self.size:
                raise ValueError("array longer than the file")
            for _ in range(count):
                self._value(etype, depth + 1)
            return _ArrayLen(count)
        raise ValueError(f"unknown value type {vtype}")

    def parse(self) -> tuple[dict[str, Any], list[str]]:
        if self._read(4) != b"GGUF":
            raise ModelLoadError(f"{self.path} is not a GGUF file (wrong magic bytes)")
        version = self._unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = self._unpack("<Q"), self._unpack("<Q")
        if n_tensors > self.size or n_kv > self.size:
            raise ValueError("counts larger than the file")
        kv: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            kv[key] = self._value(self._unpack("<I"))
        names = []
        for _ in range(n_tensors):
            names.append(self._string())
            n_dims = self._unpack("<I")
            if n_dims > 8:
                raise ValueError("a tensor with more than 8 dimensions")
            self._read(8 * n_dims + 4 + 8)  # dims, type, offset
        return kv, names


class _ArrayLen(int):
    """An array's length, standing in for its (undecoded) contents."""


def _gguf_config(path: Path) -> dict[str, Any]:
    import struct

    reader = _GGUFHeader(path)
    try:
        kv, names = reader.parse()
    except ModelLoadError:
        raise
    except (ValueError, struct.error, OSError) as e:
        raise ModelLoadError(f"{path} is a damaged GGUF file ({e}); download it again") from e
    finally:
        reader.close()

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
        "vocab_size": kv.get(f"{arch}.vocab_size", int(tokens) if isinstance(tokens, int) else None),
        "tie_word_embeddings": "output.weight" not in names,
        "dtype": "float32",  # quantkit dequantizes GGUF weights to a float32 cache
    }
    ctx = kv.get(f"{arch}.context_length")
    if isinstance(ctx, int) and not isinstance(ctx, bool) and ctx > 0:
        cfg["max_position_embeddings"] = ctx
    kd = kv.get(f"{arch}.attention.key_length")
    if isinstance(kd, int):
        cfg["head_dim"] = kd
    cfg = {k: (int(v) if isinstance(v, _ArrayLen) else v) for k, v in cfg.items()}
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
        p = Path(model).expanduser()
        if not p.is_file():
            raise ModelLoadError(f"GGUF file {p} does not exist")
        return _gguf_config(p)
    if os.path.isdir(model):
        path = Path(model) / "config.json"
        if not path.is_file():
            raise ModelLoadError(
                f"{short(model, 160)} has no config.json; pass a transformers model directory, a .gguf or a hub id"
            )
    elif os.path.exists(model) or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelLoadError(f"model path {short(model, 160)} does not exist or is not a directory / .gguf file")
    else:
        from quantkit.models import hub

        path = hub.file(model, "config.json")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ModelLoadError(f"{path} is not valid JSON ({type(e).__name__}); fix or re-download it") from e
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
