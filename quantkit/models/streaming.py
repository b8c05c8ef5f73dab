"""Stream a model's weights from its safetensors shards, one module at a time.

The model is a transformers skeleton on the meta device (no storage). The pipeline asks
for a module's tensors when it reaches the module (`load`) and gives them back when it
is done (`release`: the module returns to the meta device), so host memory holds one
decoder block, not the model. Tensors are read with plain reads at the offsets the
safetensors header gives, into memory of our own: a memory-mapped read (`safe_open`)
counts every page it touches in the process' resident set while the mapping lives
(measured: a 1-layer Llama-3-1B-shaped RTN run peaked at 1.47 GiB streamed through
safe_open vs 1.30 GiB in memory, the 0.5 GB embedding counted twice).

The values equal what `from_pretrained(..., dtype=D)` loads: the stored tensor cast to D
(tested byte for byte through the exported checkpoint).
"""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantkit.errors import UsageError, short

class StreamError(UsageError):
    """The model cannot be streamed from its files as asked; the message names the fix."""


class StreamSource:
    """Tensor name -> shard file of a model dir, read lazily in `dtype` (headers checked up front).

    path: a dir with *.safetensors (and, when sharded, model.safetensors.index.json).
    """

    def __init__(self, path: str | Path, dtype: torch.dtype):
        from quantkit.export.safetensors_header import SafetensorsHeaderError, read_safetensors_header

        self.path = Path(path)
        self.dtype = dtype
        self.file_of: dict[str, Path] = {}
        self.info: dict[str, dict[str, Any]] = {}
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise StreamError(f"{short(str(self.path), 160)} has no *.safetensors weights to stream")
        for f in files:
            try:
                header = read_safetensors_header(f)
            except SafetensorsHeaderError as e:
                raise StreamError(str(e)) from e
            for key, info in header.items():
                self.file_of[key] = f
                self.info[key] = info

    def nbytes(self, keys) -> int:
        """Bytes the tensors `keys` take in the run's dtype."""
        total = 0
        for k in keys:
            n = 1
            for d in self.info[k]["shape"]:
                n *= d
            total += n * self.dtype.itemsize
        return total

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors `keys` as fresh CPU tensors in the run's dtype."""
        missing = [k for k in keys if k not in self.file_of]
        if missing:
            raise StreamError(f"{short(str(self.path), 160)} has no tensor {short(missing[0], 80)}; the weights do not "
                              "match the model's config: re-download the model, or load it without --stream")
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.file_of[k], []).append(k)
        out: dict[str, torch.Tensor] = {}
        for f, ks in by_file.items():
            for k, t in read_tensors(f, {k: self.info[k] for k in ks}).items():
                out[k] = t.to(self.dtype) if t.is_floating_point() else t
        return out

    def tensor(self, key: str) -> torch.Tensor:
        return self.read([key])[key]


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
           "BOOL": torch.bool}


def read_tensors(path: Path, entries: dict[str, dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file read with plain reads (no memory map), as stored.

    entries: name -> its header entry (dtype, shape, data_offsets; quantkit.export.safetensors_header.
    read_safetensors_header checked them)."""
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        for k, info in entries.items():
            dtype = _DTYPES.get(info["dtype"])
            if dtype is None:
                raise StreamError(f"{short(k, 80)} in {path.name} is {info['dtype']}, which quantkit does not stream")
            begin, end = info["data_offsets"]
            buf = torch.empty(end - begin, dtype=torch.uint8)
            f.seek(8 + n + begin)
            if f.readinto(memoryview(buf.numpy())) != end - begin:
                raise StreamError(f"{path.name} in {path.parent} ends early; re-download the model")
            out[k] = buf.view(dtype).reshape(info["shape"])
    return out


def _tensor_names(module: nn.Module) -> list[str]:
    """Local names of a module's parameters and persistent buffers (what a checkpoint holds)."""
    return list(module.state_dict(keep_vars=True).keys())


def _module_keys(module: nn.Module, prefix: str) -> list[str]:
    pre = f"{prefix}." if prefix else ""
    return [pre + n for n in _tensor_names(module)]


def load_module(module: nn.Module, prefix: str, source: StreamSource,
                got: dict[str, torch.Tensor] | None = None) -> None:
    """Give a meta-device `module` (full name `prefix`) its tensors from `source` (or `got`, read
    ahead), in place."""
    keys = _module_keys(module, prefix)
    got = source.read(keys) if got is None else got
    n = len(prefix) + 1 if prefix else 0
    module.load_state_dict({k[n:]: got[k] for k in keys}, strict=True, assign=True)


def release_module(module: nn.Module) -> None:
    """Drop a module's tensors (back to the meta device); a streamed module is read again when needed."""
    module.to("meta")


def skeleton(path: Path, dtype: torch.dtype, trust_remote_code: bool = False):
    """The transformers model of the dir `path` on the meta device (no weights), in eval mode,
    with its generation config as `from_pretrained` would read it."""
    from transformers import AutoConfig, GenerationConfig

    from quantkit.models.checkpoint import empty_model, rebuild_buffers

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = empty_model(config, dtype, "meta")
    rebuild_buffers(model, torch.device("cpu"))
    if model.can_generate():  # as from_pretrained reads it: the file, else config.json's generation fields
        with contextlib.suppress(OSError, ValueError):
            if (path / "generation_config.json").is_file():
                model.generation_config = GenerationConfig.from_pretrained(path)
            else:
                model.generation_config = GenerationConfig.from_pretrained(path, config_file_name="config.json",
                                                                           _from_model_config=True)
    model.eval()
    return model


def check_streamable(model: nn.Module, source: StreamSource) -> None:
    """Every tensor the skeleton holds is in the files (tied heads aside), else one line naming it."""
    from quantkit.export.common import tied_keys

    tied = tied_keys(model)
    for key in model.state_dict().keys():
        if key not in source.file_of and key not in tied:
            raise StreamError(
                f"{short(str(source.path), 160)} has no tensor {short(key, 80)} that the model's config implies "
                "(its files name tensors differently); load it without --stream"
            )


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def fix_malloc_threshold(nbytes: int = 1 << 20) -> bool:
    """Have glibc give allocations of `nbytes` and more their own mapping, returned to the system when freed.

    glibc raises its mmap threshold to the size of each mapped block it frees (up to 32 MiB), so a run
    that reads and drops a block's tensors again and again serves them from the heap, which only grows:
    measured on a 12-layer Llama-3-1B-shaped streamed RTN run, the resident set crept from 0.71 to
    0.96 GiB over the blocks and peaked at 2.40 GiB in the export; with a fixed 1 MiB threshold it
    stayed at 0.63 GiB and peaked at 1.61 GiB. Setting the threshold turns that adjustment off. A no-op
    (False) without glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, nbytes))
    except (OSError, AttributeError):
        return False


class StreamedModel:
    """A meta skeleton plus the files its weights stream from; the pipeline loads and releases
    modules by full name (`load("model.layers.3")`, `release(...)`)."""

    def __init__(self, model: nn.Module, source: StreamSource):
        check_streamable(model, source)
        fix_malloc_threshold()
        self.model = model
        self.source = source
        self._ahead: tuple[str, Any] | None = None  # (name, future) of the module being read ahead
        self._pool = None

    def prefetch(self, name: str) -> None:
        """Start reading module `name` in a background thread (file reads and dtype casts release the
        GIL), so the next `load(name)` finds it read while the current block calibrates."""
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantkit-stream")
        keys = _module_keys(self.model.get_submodule(name), name)
        self._ahead = (name, self._pool.submit(self.source.read, keys))

    def load(self, name: str) -> nn.Module:
        mod = self.model.get_submodule(name)
        got = None
        if self._ahead is not None and self._ahead[0] == name:
            got = self._ahead[1].result()  # re-raises a read error here, in the pipeline's thread
        self._ahead = None
        load_module(mod, name, self.source, got)
        return mod

    def close(self) -> None:
        """Stop reading ahead (a pending read is waited for, its tensors dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._ahead = None

    def release(self, name: str) -> None:
        release_module(self.model.get_submodule(name))

    def tensor(self, key: str) -> torch.Tensor:
        """One state-dict tensor as stored, in the run's dtype (export reads the head and embeddings so)."""
        return self.source.tensor(key)
