"""Where the calibration activations between two blocks live: on the device, in (pinned) host
memory, or on disk.

128 windows x 2048 tokens of an 8B model are 2 GiB per block boundary in BF16 (more for wider
models), and the pipeline holds the inputs of the block it runs plus their outputs. When that
does not fit on the device, the batches wait in host memory (pinned, so each copy to the GPU is a
plain DMA) or in files, and one batch at a time visits the device. The values are moved, never
changed, so every placement gives the same bits (tested). The memory plan chooses the placement
(`quantkit.plan.activation_placement`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

PLACEMENTS = ("device", "host", "disk")


class ActivationStore:
    """put(tensor) -> handle, get(handle) -> the tensor on `device`; drop(handles) frees them.

    where: "device" (handles are the tensors themselves: no copies), "host" (CPU, pinned when the
    device is a GPU) or "disk" (one safetensors file per batch under `folder`, default a temp dir).
    Use as a context manager: the disk files are removed on exit."""

    def __init__(self, where: str, device: torch.device, folder: str | Path | None = None):
        if where not in PLACEMENTS:
            raise ValueError(f"activation placement {where!r} is not one of {', '.join(PLACEMENTS)}")
        self.where = where
        self.device = torch.device(device)
        self._folder = folder
        self._dir: Path | None = None
        self._n = 0

    def __enter__(self) -> "ActivationStore":
        if self.where == "disk":
            self._dir = Path(tempfile.mkdtemp(prefix=".quantkit-activations-", dir=self._folder))
        return self

    def __exit__(self, *exc) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def put(self, t: torch.Tensor):
        if self.where == "device":
            return t
        if self.where == "host":
            c = t.detach().to("cpu")
            return c.pin_memory() if self.device.type == "cuda" else c
        from safetensors.torch import save_file

        path = self._dir / f"{self._n:06d}.safetensors"
        self._n += 1
        save_file({"h": t.detach().to("cpu").contiguous()}, str(path))
        return path

    def get(self, handle) -> torch.Tensor:
        if self.where == "device":
            return handle
        if self.where == "host":
            return handle.to(self.device, non_blocking=True)
        from safetensors.torch import load_file

        return load_file(str(handle))["h"].to(self.device)

    def drop(self, handles) -> None:
        if self.where == "disk":
            for p in handles:
                Path(p).unlink(missing_ok=True)
