"""Lazy access to the tensors of a checkpoint dir, and the error for a damaged one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from quantkit.errors import UsageError
from quantkit.export.safetensors_header import read_safetensors_header


class CheckpointError(UsageError):
    """The checkpoint dir is damaged or not one of ours."""


class CheckpointTensors:
    """Lazy access to the tensors of a checkpoint dir's top-level *.safetensors files.

    Every header is validated first (a clear one-line error for a damaged file); tensors
    are read one at a time, so the runtime can repack and place each module before the
    next is read. ``keys()`` lists every tensor name."""

    def __init__(self, path: Path, files: list[Path] | None = None):
        self.path = Path(path)
        files = sorted(self.path.glob("*.safetensors")) if files is None else files
        if not files:
            raise CheckpointError(f"{self.path} has no .safetensors files")
        self._file_of: dict[str, Path] = {}
        for f in files:
            for key in read_safetensors_header(f):
                self._file_of[key] = f
        self._open: dict[Path, Any] = {}

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def get(self, key: str) -> torch.Tensor:
        """The tensor `key` (CPU); KeyError if no file holds it."""
        from safetensors import safe_open

        f = self._file_of[key]
        h = self._open.get(f)
        if h is None:
            try:
                h = self._open[f] = safe_open(str(f), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error type for bad files
                raise CheckpointError(f"{f.name} in {self.path} is not a valid safetensors file ({e})") from e
        try:
            return h.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{f.name} in {self.path}: tensor {key} cannot be read ({e})") from e
