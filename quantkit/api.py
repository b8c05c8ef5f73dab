"""The public Python API: load, quantize, evaluate, export.

Everything here is silent; callers pass callbacks for progress. `quantkit.run` chains these
into one method run (checks, resume, export); the CLI in `quantkit.cli` is a thin layer over both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.errors import short_repr
from quantkit.calib.data import CalibrationSet, calibration_set, heldout_windows
from quantkit.export.formats import FORMAT_NAMES as EXPORT_FORMATS, export_format
from quantkit.models.loading import LoadedModel, load_model, resolve_device
from quantkit.quant.model import QuantizedModel
from quantkit.recipe import Recipe, RecipeError

__all__ = [
    "CalibConfig",
    "EvalConfig",
    "load",
    "quantize",
    "evaluate",
    "export",
    "check_recipe_fits",
    "check_arch",
    "check_export_format",
    "simulation",
    "scan",
    "EXPORT_FORMATS",
    "calibration_for",
    "eval_windows",
    "needs_calibration",
    "streams",
    "check_streams",
]


@dataclass(frozen=True)
class CalibConfig:
    data: str | None = None  # None = built-in corpus
    field: str = "text"
    samples: int = 64
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 8


@dataclass(frozen=True)
class EvalConfig:
    data: str | None = None  # None = held-out half of the built-in corpus
    field: str = "text"
    seqlen: int = 512
    windows: int | None = 40
    batch_size: int = 4


def load(model: str | None = None, *, dtype: str = "auto", device: str = "cpu", trust_remote_code: bool = False,
         stream: bool = False):
    """Load model + tokenizer (see `quantkit.models.loading.load_model`); stream: a meta skeleton whose
    blocks `quantize` reads from the safetensors files one at a time."""
    return load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code, stream=stream)


def quantizable_linears(model, recipe: Recipe) -> dict[str, Any]:
    """Full name -> nn.Linear of every linear the recipe will quantize."""
    from quantkit.calib.pipeline import linears_to_quantize

    return linears_to_quantize(model, recipe.ignore)


def check_arch(cfg: dict, recipe: Recipe | None = None) -> None:
    """Refuse, from the config dict alone (before any weight loads), a model family no adapter row
    covers, or a recipe stage the family cannot take (a rotation on a family without rotation roles)."""
    from quantkit.methods.base import get_method
    from quantkit.models.adapter import check_config_supported

    spec = check_config_supported(cfg)
    for st in recipe.stages if recipe is not None else ():
        method = get_method(st.method)
        if method.needs_rotation_roles and spec.rotation is None:
            raise RecipeError(
                f"{st.method} cannot rotate model type {short_repr(cfg.get('model_type'))}: {spec.no_rotation}; "
                "use awq, gptq or rtn for this model"
            )
        method.check_config(cfg, st.options)


def check_recipe_fits(model, recipe: Recipe, methods: list | None = None) -> list:
    """Refuse, before any work, settings that cannot apply to this model (group sizes, methods).

    Returns the recipe's methods: `methods` when given (built already), else built here (each
    method checks its own options)."""
    from quantkit.methods.base import build_methods
    from quantkit.quant.core import check_group_size

    methods = build_methods(recipe) if methods is None else methods
    layers = {k: v.in_features for k, v in quantizable_linears(model, recipe).items()}
    check_group_size(layers, recipe.scheme.weights)
    return methods


def needs_calibration(recipe: Recipe, methods: list | None = None) -> bool:
    """Whether running the recipe reads calibration text (a data-free RTN does not).
    methods: the recipe's methods when built already (else built here)."""
    from quantkit.methods.base import build_methods
    from quantkit.quant.static import needs_static_scales

    scheme = recipe.scheme
    methods = build_methods(recipe) if methods is None else methods
    return any(m.uses_data for m in methods) or needs_static_scales(scheme.input_activations, scheme.kv_cache)


def calibration_for(loaded: LoadedModel, recipe: Recipe, calib: CalibConfig = CalibConfig(), *,
                    methods: list | None = None) -> CalibrationSet | None:
    """The calibration set `quantize` would build (None when the recipe needs no data): build it
    early to refuse too little text before any other work."""
    if not needs_calibration(recipe, methods):
        return None
    return _calibration_set(loaded.tokenizer, calib)


def _calibration_set(tokenizer, calib: CalibConfig) -> CalibrationSet:
    return calibration_set(tokenizer, calib.data, samples=calib.samples, seqlen=calib.seqlen, seed=calib.seed,
                           field=calib.field)


def eval_windows(tokenizer, cfg: EvalConfig = EvalConfig()):
    """The held-out windows `evaluate` scores (LongTensor (n, seqlen))."""
    return heldout_windows(tokenizer, cfg.seqlen, cfg.windows, spec=cfg.data, field=cfg.field)


def quantize(
    loaded: LoadedModel,
    recipe: Recipe,
    calib: CalibConfig = CalibConfig(),
    *,
    device: str = "cpu",
    on_block: Callable[[int, int, str, str], None] | None = None,
    calib_set: CalibrationSet | None = None,
    partial_dir: str | Path | None = None,
    resume: bool = False,
    overwrite_partial: bool = False,
    sensitive: str | Path | None = None,
    activations: str = "device",
    methods: list | None = None,
) -> QuantizedModel:
    """Run the recipe's stages layer by layer over the calibration set; weights change in place.

    partial_dir: save every finished block there (see quantkit.calib.resume; the CLI
    uses `OUT.partial`); resume=True continues from the blocks it holds, after
    checking that model, calibration data and recipe are unchanged. Without resume an
    existing partial run is refused unless overwrite_partial=True. The caller removes
    it after a successful export (`quantkit.calib.resume.discard_partial`).
    sensitive: a sensitive_layers.json; its FP16-flagged linears (plus their
    vLLM-fused siblings) join the ignore list and stay float, and their RTN
    quantized versions are kept as `shadow` copies for the runtime.
    A streamed model (`load(..., stream=True)`) reads each block from its files when the pipeline
    reaches it and keeps the finished blocks only in partial_dir (required then), which export reads
    from; recipes with a whole-model transform (`streams(recipe)` is False) need the model in memory.
    activations: where calibration activations wait between blocks: "device", "host" (pinned) or
    "disk" (quantkit.calib.activations; the memory plan's `activations` says which fits).
    methods: the recipe's methods when the caller built them already (`quantkit.run` builds them once a run).
    """
    from quantkit.calib.pipeline import run_layerwise
    from quantkit.methods.base import resolved_options

    mixed = _sensitive_plan(loaded.model, recipe, sensitive) if sensitive is not None else None
    if mixed is not None:
        recipe = mixed["recipe"]
    methods = check_recipe_fits(loaded.model, recipe, methods)  # only the last stage quantizes; earlier ones transform
    stream = loaded.stream
    if stream is not None:
        check_streams(recipe)
        if partial_dir is None:
            raise ValueError("a streamed run saves its finished blocks to partial_dir; pass one")
    if calib_set is None and needs_calibration(recipe, methods):
        calib_set = _calibration_set(loaded.tokenizer, calib)
    ids = calib_set.input_ids if calib_set is not None else None
    calib_settings = calib_set.settings if calib_set is not None else {"source": "none (data-free methods)"}
    dev = resolve_device(device)
    checkpointer = None
    if partial_dir is not None:
        from quantkit.calib.resume import Checkpointer, run_fingerprint

        numerics = {**calib_settings, "batch_size": calib.batch_size, "device": str(dev)}
        fp = run_fingerprint(loaded.source, ids, numerics, recipe.to_dict())
        checkpointer = Checkpointer(partial_dir, fp, resume=resume, overwrite=overwrite_partial)
    # Whole-model transforms (SpinQuant rotations) first, so the layer-wise stages see the rotated weights.
    for m in methods:
        m.prepare_model(loaded.model, ids, dev, on_step=on_block)
    online = next((m.online_rotations for m in methods if m.online_rotations), None)
    collector = _static_scale_collector(recipe.scheme, online)
    result = run_layerwise(
        loaded.model, ids, methods + ([collector] if collector is not None else []), device=dev,
        batch_size=calib.batch_size, ignore=recipe.ignore, on_block=on_block, checkpointer=checkpointer,
        stream=stream, activations=activations,
    )
    tensors = _partial_tensors(loaded, checkpointer) if stream is not None else None
    qm = QuantizedModel(
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        recipe=recipe,
        modules=result.results,
        source=loaded.source,
        calibration=calib_settings,
        warnings=result.warnings,
        static_scales=collector.scales if collector is not None else None,
        online_rotations=online,
        training={m.name: m.artifacts["training"] for m in methods if "training" in getattr(m, "artifacts", {})},
        resolved_options=resolved_options(methods),
        tensors=tensors,
        weight_checked=checkpointer.rebuilt_from_result if stream is not None else None,
    )
    if mixed is not None:
        _add_shadows(qm, mixed, tensors)
    return qm


def _static_scale_collector(scheme, online: dict | None):
    """The stage that calibrates static activation / KV scales in the same pass, on each block as quantized;
    None when the scheme has none. online: the model's online rotations (with R3 the cache stores K R3, so
    K's scales are measured on it)."""
    from quantkit.methods._static_scales import static_scale_collector
    from quantkit.models.hooks import k_rotation_of
    from quantkit.quant.static import needs_static_scales

    if not needs_static_scales(scheme.input_activations, scheme.kv_cache):
        return None
    return static_scale_collector(scheme.input_activations, scheme.kv_cache, k_rotation_of(online))


def _partial_tensors(loaded: LoadedModel, checkpointer) -> Callable[[str], Any]:
    """A streamed run's tensors: a finished block's from partial_dir, else the source's (head, norms)."""
    meta = loaded.model.state_dict()

    def tensors(key: str):
        t = checkpointer.block_tensor(key, meta[key].dtype)
        return loaded.stream.tensor(key) if t is None else t

    return tensors


def _add_shadows(qm: QuantizedModel, mixed: dict[str, Any], tensors) -> None:
    """The FP16-kept linears' RTN copies (the scheme's weight args: the runtime's switchable copy)."""
    from quantkit.quant.core import quantize_weight

    for name in mixed["fp16"]:
        w = qm.model.get_submodule(name).weight.data if tensors is None else tensors(f"{name}.weight")
        qm.shadow[name] = quantize_weight(w, qm.recipe.scheme.weights).to("cpu")
    qm.sensitivity = mixed["mask"]
    qm.warnings.extend(mixed["warnings"])


def whole_model_methods(recipe: Recipe) -> list[str]:
    """Stages with a whole-model transform before the layer-wise pipeline (SpinQuant's rotations)."""
    from quantkit.methods.base import Method, get_method

    return [s.method for s in recipe.stages if get_method(s.method).prepare_model is not Method.prepare_model]


def streams(recipe: Recipe) -> bool:
    """Whether the recipe can run streamed (block by block from the files): no whole-model transform."""
    return not whole_model_methods(recipe)


def check_streams(recipe: Recipe) -> None:
    """Refuse to stream a recipe with a whole-model transform (it runs with the model in memory)."""
    if not streams(recipe):
        raise RecipeError(f"{', '.join(whole_model_methods(recipe))} transforms the whole model at once, so it "
                          "runs with the model in memory: drop --stream")


def _sensitive_plan(model, recipe: Recipe, sensitive) -> dict[str, Any]:
    """Read sensitive_layers.json against `model`; the recipe with the FP16 layers ignored, and the mask."""
    import dataclasses

    from quantkit.sensitivity.io import expand_fused, load_sensitive_layers
    from quantkit.sensitivity.weights import SCAN_METHODS

    sl = load_sensitive_layers(sensitive, model)
    linears = list(quantizable_linears(model, recipe))
    flagged = [n for n in sl.flagged if n in set(linears)]
    fp16 = _with_whole_moe_layers(model, expand_fused(flagged, linears), linears)
    if len(fp16) == len(linears):
        raise RecipeError(
            f"{sl.path.name} keeps all {len(linears)} linears in FP16, so nothing would be quantized; "
            "re-run `quantkit scan` with higher thresholds or --target-fraction"
        )
    warnings = []
    if len(fp16) > len(flagged):
        warnings.append(
            f"{len(fp16) - len(flagged)} linear(s) kept in FP16 beside flagged ones because vLLM fuses q/k/v, "
            "gate/up and all the experts of an MoE block into one layer each that must share a precision"
        )
    if sl.scheme.weights != recipe.scheme.weights or sl.scheme.input_activations != recipe.scheme.input_activations:
        warnings.append(
            f"{sl.path.name} was scanned for {sl.scheme.describe()} but the recipe quantizes {recipe.scheme.describe()}; "
            "re-run `quantkit scan` with the recipe's scheme for a matching mask"
        )
    used = recipe.stages[-1].method if recipe.stages else None
    if used in SCAN_METHODS and used != sl.method:
        warnings.append(
            f"{sl.path.name} was measured on {sl.method} weights but the recipe quantizes with {used}; "
            f"`quantkit scan --method {used}` measures what keeping each layer in FP16 wins on {used}'s weights"
        )
    mask = {**sl.mask(), "fp16_exported": fp16}
    new = dataclasses.replace(recipe, ignore=tuple(recipe.ignore) + tuple(fp16))
    return {"recipe": new, "fp16": fp16, "mask": mask, "warnings": warnings}


def _with_whole_moe_layers(model, fp16: list[str], linears: list[str]) -> list[str]:
    """fp16 plus every expert linear of each MoE block one of whose experts is in it: vLLM runs a
    block's experts as one fused layer, which needs one scheme for all of them."""
    from quantkit.models.adapter import ModelAdapter

    ad = ModelAdapter.for_model(model)
    if ad.spec.experts is None:
        return fp16
    sep = f".{ad.spec.experts.path}."
    blocks = {n.split(sep)[0] for n in fp16 if ad.is_expert(n)}
    keep = set(fp16) | {n for n in linears if ad.is_expert(n) and n.split(sep)[0] in blocks}
    return [n for n in linears if n in keep]


def check_export_format(recipe: Recipe, format: str, model=None) -> None:
    """Refuse, before any work, a recipe the checkpoint layout cannot hold.

    Without `model` only the scheme is checked (bits, groups, activation/KV
    quantization); with it, also the shapes of the linears the recipe quantizes.
    """
    shapes = None
    if model is not None:
        shapes = lambda: {k: (v.out_features, v.in_features) for k, v in quantizable_linears(model, recipe).items()}  # noqa: E731
    export_format(format).check_scheme(recipe.scheme, shapes)


def export(
    qmodel: QuantizedModel,
    out: str | Path,
    *,
    format: str = "compressed-tensors",
    overwrite: bool = False,
    kv_format: str = "int8",
    max_shard_bytes: int = 2 * 1024**3,
):
    """Write a checkpoint dir atomically in `format` (one of EXPORT_FORMATS). Returns its path.

    Weights above max_shard_bytes are split into model-0000k-of-0000n.safetensors shards plus
    model.safetensors.index.json (as transformers and vLLM read them); the manifest hashes each.

    kv_format: "int8" (our runtime's cache) or "fp8" (an FP8 kv_cache_scheme for vLLM;
    the INT8 per-channel scales are kept beside it), for schemes with a KV cache.
    """
    from quantkit.export.ct_config import KV_FORMATS
    from quantkit.models.adapter import ModelAdapter, UnsupportedModelError

    fmt = export_format(format)
    if kv_format not in KV_FORMATS:
        raise RecipeError(f"--kv-format {short_repr(kv_format)} is not supported; use {' or '.join(KV_FORMATS)}")
    try:
        routers = ModelAdapter.for_model(qmodel.model).routers()
    except UnsupportedModelError:
        routers = []
    return fmt.write(qmodel, Path(out), overwrite=overwrite, kv_format=kv_format, float_modules=routers,
                     max_shard_bytes=max_shard_bytes)


def simulation(qmodel: QuantizedModel, *, kv_residual: bool | None = None):
    """Context manager: while inside, `qmodel.model` also fake-quantizes what its scheme quantizes
    at run time (input activations of the quantized linears, the KV cache), so `evaluate`
    measures W8A8 / W8A8C8 in plain torch. Yields SimStats (KV tokens patched)."""
    from quantkit.models.hooks import k_rotation_of
    from quantkit.runtime.simulate import simulate

    scheme = qmodel.recipe.scheme
    linears = {n: qmodel.model.get_submodule(n) for n in qmodel.modules}
    return simulate(
        qmodel.model,
        act=scheme.input_activations,
        kv=scheme.kv_cache,
        static=qmodel.static_scales,
        linears=linears,
        kv_residual=kv_residual,
        k_rotation=k_rotation_of(qmodel.online_rotations),
    )


def evaluate(
    model,
    tokenizer,
    cfg: EvalConfig = EvalConfig(),
    *,
    device: str = "cpu",
    windows=None,
    on_batch: Callable[[int, int], None] | None = None,
):
    """Perplexity of a loaded model on held-out windows. Returns (Perplexity, windows)."""
    from quantkit.eval.perplexity import perplexity

    if windows is None:
        windows = eval_windows(tokenizer, cfg)
    home = next(model.parameters()).device
    dev = resolve_device(device)
    try:
        res = perplexity(model, windows, batch_size=cfg.batch_size, device=dev, on_batch=on_batch)
    finally:
        model.to(home)
    return res, windows


def scan(
    loaded: LoadedModel,
    scheme,
    calib: CalibConfig = CalibConfig(),
    *,
    device: str = "cpu",
    thresholds=None,
    target_fraction: float | None = None,
    measure_ppl: bool = False,
    eval_cfg: EvalConfig = EvalConfig(windows=8),
    ignore=("lm_head",),
    bins: int = 512,
    stat_tokens: int | None = 16384,
    shortlist: int | None = None,
    greedy: int | None = None,
    fisher_windows: int | None = None,
    select_windows: int | None = 64,
    folds: int = 4,
    method: str = "rtn",
    method_options: dict[str, Any] | None = None,
    cross_fit: bool | None = None,
    on_block: Callable[[int, int, str, str], None] | None = None,
    on_step: Callable[[str], None] | None = None,
):
    """Sensitivity scan of every linear for `scheme` (model unchanged). Returns a ScanReport;
    save it with `quantkit.sensitivity.io.save_sensitive_layers`.

    target_fraction chooses from `select_windows` windows (None = all) of eval_cfg.seqlen tokens of the
    calibration text, with `folds`-fold cross-validation (greedy: also the re-measuring "greedy" rule,
    quantkit.sensitivity.select); eval_cfg's held-out text serves --measure-ppl only. fisher_windows: the
    gradient-weighted error (0 = off; None = on with target_fraction, where it is measured on every selection
    window and gives the "fisher" rule, off otherwise).
    method ("rtn" or "gptq", with its recipe-stage options): the weights every measurement quantizes to
    (quantkit.sensitivity.weights); GPTQ runs on the scan's calibration set (cross_fit: also once per selection
    fold, without the samples that share text with its windows; None = on where that applies;
    quantkit.sensitivity.run.run_scan)."""
    from quantkit.quant.core import check_group_size
    from quantkit.sensitivity.run import run_scan
    from quantkit.sensitivity.scan import Thresholds

    layers = {k: v.in_features for k, v in quantizable_linears(loaded.model, Recipe(scheme, (), tuple(ignore))).items()}
    check_group_size(layers, scheme.weights)
    cs = _calibration_set(loaded.tokenizer, calib)
    windows = sel = None
    if measure_ppl:
        windows = eval_windows(loaded.tokenizer, eval_cfg)
    if target_fraction is not None:
        from quantkit.calib.data import calibration_windows

        sel = calibration_windows(loaded.tokenizer, eval_cfg.seqlen, select_windows, spec=calib.data, field=calib.field)
    return run_scan(
        loaded.model,
        cs.input_ids,
        scheme,
        thresholds=thresholds or Thresholds(),
        target_fraction=target_fraction,
        measure_ppl=measure_ppl,
        eval_windows=windows,
        select_windows=sel,
        folds=folds,
        device=resolve_device(device),
        batch_size=calib.batch_size,
        eval_batch_size=eval_cfg.batch_size,
        ignore=ignore,
        bins=bins,
        stat_tokens=stat_tokens,
        shortlist=shortlist,
        greedy=greedy,
        fisher_windows=(1 if target_fraction is not None else 0) if fisher_windows is None else fisher_windows,
        seed=calib.seed,
        source=loaded.source,
        calibration=cs.settings,
        on_block=on_block,
        on_step=on_step,
        stream=loaded.stream,
        method=method,
        method_options=method_options,
        cross_fit=cross_fit,
    )


def runtime_for_shape(shape: str, scheme, *, device: str = "auto", seed: int = 0, layers: int | None = None,
                      mixed_fraction: float = 0.0, calib_samples: int = 8, calib_seqlen: int = 128):
    """A runtime model of a named random-weight shape (`quantkit.models.random.SHAPES`), RTN-quantized
    to `scheme` in memory (static scales, when the scheme has them, calibrated on random tokens).

    mixed_fraction: that share of the linears (whole blocks, spread over the depth) kept FP16 with
    quantized shadows, as a `--sensitive` checkpoint keeps them. layers: override num_hidden_layers."""
    import torch

    from quantkit import runtime
    from quantkit.models.random import random_model
    from quantkit.quant.static import needs_static_scales
    from quantkit.recipe import Stage

    dev = resolve_device(device)
    model = random_model(shape, device=dev, seed=seed, **({"num_hidden_layers": layers} if layers else {}))
    calib = None
    if needs_static_scales(scheme.input_activations, scheme.kv_cache):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, model.config.vocab_size, (calib_samples, calib_seqlen), generator=g)
        calib = CalibrationSet(ids, {"source": "random tokens", "samples": calib_samples, "seqlen": calib_seqlen})
    loaded = LoadedModel(model, None, {"kind": "random", "shape": shape, "seed": seed})
    qm = quantize(loaded, Recipe(scheme, (Stage("rtn"),)), calib_set=calib, device=dev)
    if mixed_fraction > 0:
        from quantkit.models.adapter import ModelAdapter

        ad = ModelAdapter.for_model(model)
        n = len(ad.blocks())
        k = max(1, round(mixed_fraction * n))
        for i in sorted({round(j * (n - 1) / max(1, k - 1)) for j in range(k)} if k > 1 else {n // 2}):
            for name in ad.block_linears(i):
                qm.shadow[name] = qm.modules.pop(name)
    return runtime.from_quantized(qm, device=dev)


def bench(*, checkpoint=None, shape: str | None = None, scheme=None, layers: int | None = None,
          batches: list[int] = (1,), prompt_len: int = 512, gen_len: int = 256, baselines: bool = True,
          fallback: bool = False, mixed_fraction: float = 0.0, seed: int = 0, device: str = "auto",
          latent_cache: bool = False, on_status: Callable[[str], None] | None = None) -> list[dict]:
    """Rows of `quantkit bench` (see quantkit.runtime.bench): the checkpoint (or the random `shape` in
    `scheme`), optionally with the fallback monitor and as a mixed model, then the runtime's BF16 path
    and transformers BF16 on the same weights (the checkpoint's dequantized ones, or the shape's)."""
    from quantkit import runtime
    from quantkit.runtime import bench as rb
    from quantkit.runtime.calibrate import attach_fallback, default_monitor_layers, monitor_histograms

    say = on_status or (lambda _m: None)
    dev = resolve_device(device)
    rows: list[dict] = []

    def run_rows(rt, name: str, role: str, monitor: bool = False):
        for b in batches:
            say(f"timing {name} at batch {b} ...")
            if monitor:
                rt.disable_monitor()
                layers_ = default_monitor_layers(rt)
                if rt.tokenizer is not None:
                    attach_fallback(rt, layers=layers_)
                else:  # a random model: calibrate on random tokens, as its prompts are
                    import torch

                    g = torch.Generator().manual_seed(seed + 1)
                    ids = torch.randint(0, rt.vocab, (8, 256), generator=g)
                    rt.enable_monitor(monitor_histograms(rt, ids, layers_), layers_)
            row = rb.bench_runtime(rt, name, batch=b, prompt_len=prompt_len, gen_len=gen_len, seed=seed).to_dict()
            rows.append({**row, "role": role})
        if monitor:
            rt.disable_monitor()

    def dense_model():
        if checkpoint is not None:
            from quantkit.models.checkpoint import load_quantkit_checkpoint

            import torch

            model, _, _ = load_quantkit_checkpoint(checkpoint, dtype=torch.bfloat16 if dev.startswith("cuda") else None)
            return model.to(dev)
        from quantkit.models.random import random_model

        return random_model(shape, device=dev, seed=seed, **({"num_hidden_layers": layers} if layers else {}))

    label = str(checkpoint) if checkpoint is not None else f"{shape} {scheme.name}"
    say(f"building {label} on the runtime ...")
    rt = runtime.load(checkpoint, device=device, latent_cache=latent_cache) if checkpoint is not None else \
        runtime_for_shape(shape, scheme, device=device, seed=seed, layers=layers)
    qname = "checkpoint" if checkpoint is not None else scheme.name
    run_rows(rt, qname, "quantized")
    if fallback:
        run_rows(rt, f"{qname} + monitor", "monitor", monitor=True)
    del rt
    rb.free()
    if mixed_fraction > 0 and shape is not None:
        say(f"building the mixed model ({mixed_fraction:.0%} of linears FP16) ...")
        rt = runtime_for_shape(shape, scheme, device=device, seed=seed, layers=layers, mixed_fraction=mixed_fraction)
        run_rows(rt, f"{qname} {mixed_fraction:.0%} FP16", "mixed")
        del rt
        rb.free()
    if baselines:
        say("building the runtime's BF16 path ...")
        rt = runtime.from_float(dense_model(), device=device, latent_cache=latent_cache)
        run_rows(rt, f"{str(rt.dtype).replace('torch.', '')} runtime", "runtime-float")
        del rt
        rb.free()
        model = dense_model()
        for b in batches:
            say(f"timing transformers at batch {b} ...")
            row = rb.bench_transformers(model, "transformers", batch=b, prompt_len=prompt_len, gen_len=gen_len,
                                        seed=seed).to_dict()
            rows.append({**row, "role": "transformers"})
        del model
        rb.free()
    return rows
