"""Resumable calibration: every finished block is saved under `OUT.partial/`.

Layout of the partial dir:

    state.json                 {"version", "fingerprint": {model, calibration, recipe},
                                "n_blocks", "blocks": [{"index", "file", "sha256"}, ...]}
    block_00012.safetensors    the block's parameters/buffers (relative names, "state/...")
                               and its quantized tensors ("result/<full name>/q|scale|zero")
    block_00012.json           QuantArgs of each result, warnings, the safetensors file's sha256

Each file is written to a temp name, fsync'ed and renamed, and state.json is
rewritten (same way) only after the block's files are in place, so a crash at
any instant leaves either the old or the new state, never a torn one. A block
is trusted on resume only if its file's sha256 matches state.json.

Disk: a quantized linear's weight is stored only when it does not equal
dequantize(q, scale, zero) in the model dtype (it always does for RTN/GPTQ);
restore recomputes it, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantkit.errors import OperationError, UsageError, short
from quantkit.files import read_small_text
from quantkit.quant.core import QuantizedTensor
from quantkit.recipe import QuantArgs

STATE_NAME = "state.json"
STATE_VERSION = 1
_PARTS = ("model", "calibration", "recipe")


class ResumeError(UsageError):
    """A partial run cannot be resumed as asked; the message names the part or file."""


def partial_dir_for(out: str | Path) -> Path:
    """`OUT.partial` beside the output dir."""
    out = Path(out).absolute()
    return out.with_name(out.name + ".partial")


def check_partial_dir(path: str | Path) -> None:
    """Refuse a `OUT.partial` that quantkit did not make: a run would write into it and delete it later.

    Ours: absent, an empty dir, or a dir with state.json. ResumeError otherwise.
    """
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_symlink() or not path.is_dir():
        raise ResumeError(f"{short(str(path), 160)} exists and is not a directory quantkit made for resumable progress; "
                          "move it away or choose another --out")
    if (path / STATE_NAME).is_file() or not any(path.iterdir()):
        return
    if all(_OWN_FILE.fullmatch(p.name) for p in path.iterdir()):  # a run killed before its first state.json
        return
    raise ResumeError(f"{short(str(path), 160)} exists but is not a quantkit partial run (no {STATE_NAME}); "
                      "move it away or choose another --out")


_OWN_FILE = re.compile(r"state\.json|block_\d{5}\.(safetensors|json)|\..*\.tmp-\d+")


def finished_blocks(path: str | Path) -> tuple[int, int] | None:
    """(finished, total) blocks a partial dir's state.json lists; None when there is none to read."""
    try:
        state = json.loads(read_small_text(Path(path) / STATE_NAME))
        return len(state["blocks"]), int(state["n_blocks"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None


def discard_partial(path: str | Path) -> None:
    """Remove a partial dir (its checkpoint is exported, or --overwrite starts over).

    The dir is first renamed to a hidden trash name in one step, so at any instant
    `OUT.partial` is either whole or gone (a kill during the deletion leaves only the
    trash dir, which the next run removes); Ctrl-C is held until the rename is done.
    Only files quantkit writes there are deleted; anything else stays in the trash dir's place.
    """
    import tempfile

    from quantkit.interrupts import defer_interrupts, reached

    path = Path(path).absolute()
    if not path.is_dir() or path.is_symlink():
        return
    trash = None
    try:
        with defer_interrupts():
            trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.trash-{os.getpid()}-", dir=path.parent))
            os.rename(path, trash / path.name)
            reached("discard.renamed")
    finally:  # a Ctrl-C held above is raised once the trash is gone too
        if trash is not None:
            _remove_own(trash)


def _remove_own(trash: Path) -> None:
    """Delete what quantkit wrote in a trash dir (trash/NAME.partial/...), then the dirs if empty."""
    for inner in list(trash.iterdir()):
        if inner.is_dir() and not inner.is_symlink():
            for f in inner.iterdir():
                if _OWN_FILE.fullmatch(f.name) and (f.is_file() or f.is_symlink()):
                    f.unlink(missing_ok=True)
            try:
                inner.rmdir()
            except OSError:  # files quantkit did not write: give the dir back its name, untouched
                dest = trash.parent / inner.name
                if not dest.exists():
                    os.rename(inner, dest)
                    continue
    try:
        trash.rmdir()
    except OSError:
        pass


def remove_stale_trash(out: str | Path) -> None:
    """Finish deleting `.OUT.partial.trash-PID-*` dirs of runs that were killed while removing them."""
    from quantkit.export.atomic import stale_siblings

    partial = partial_dir_for(out)
    for t in stale_siblings(partial, "trash"):
        _remove_own(t)


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json_sha(obj: Any) -> str:
    return _sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode())


def run_fingerprint(source: dict[str, Any], calib_ids: torch.Tensor | None, calib_settings: dict[str, Any],
                    recipe: dict[str, Any]) -> dict[str, str]:
    """{model, calibration, recipe}: one sha256 each, so a refusal can say which part changed.

    model: the source fingerprint and dtype (weights in another dtype give other blocks);
    calibration: the token ids themselves plus settings that change numerics (batch size, device);
    recipe: Recipe.to_dict().
    """
    model = _json_sha({"fingerprint": source.get("fingerprint"), "dtype": source.get("dtype")})
    h = hashlib.sha256()
    if calib_ids is not None:
        ids = calib_ids.to(torch.int64).contiguous().cpu()
        h.update(str(tuple(ids.shape)).encode())
        h.update(ids.numpy().tobytes())
    h.update(_json_sha(calib_settings).encode())
    return {"model": model, "calibration": h.hexdigest(), "recipe": _json_sha(recipe)}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write data to path via a temp file + fsync + rename (a crash leaves the old file or the new one)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Checkpointer:
    """Saves and restores finished blocks in a partial dir (see the module docstring).

    The pipeline calls `start_block()` once (how many leading blocks to restore),
    `restore_block(i, block)` for those, and `save_block(...)` after each new one.
    """

    def __init__(self, path: str | Path, fingerprint: dict[str, str], *, resume: bool, overwrite: bool = False):
        """Open (or create) the partial dir for a run with `fingerprint`.

        resume=False and a partial run already there: refused (ResumeError naming
        --resume or --overwrite) unless overwrite=True, which discards it.
        resume=True: the fingerprint must match part by part, else ResumeError
        naming what changed; with no partial dir the run starts from block 0.
        """
        self.path = Path(path)
        self.fingerprint = dict(fingerprint)
        self.blocks: list[dict[str, Any]] = []
        self._open: tuple[int | None, Any] = (None, None)  # (index, header) of the block file export reads now
        self._prefixes: dict[str, int] | None = None
        self._metas: list[dict[str, Any]] = []
        check_partial_dir(self.path)
        state = self._read_state()
        if state is not None:
            changed = [p for p in _PARTS if state["fingerprint"].get(p) != self.fingerprint.get(p)]
            done = len(state["blocks"])
            if not resume:
                if not overwrite:
                    if changed:
                        raise ResumeError(
                            f"{self.path} holds a partial run with a different {' and '.join(changed)}; "
                            "pass --overwrite to discard it, or use another --out"
                        )
                    raise ResumeError(
                        f"{self.path} holds {done}/{state['n_blocks']} finished blocks of this same run; "
                        "pass --resume to continue it, or --overwrite to start over"
                    )
                discard_partial(self.path)
                self.blocks = []
            elif changed:
                what = {"model": "model (weights or dtype)", "calibration": "calibration data (text, samples, "
                        "seqlen, seed or batch size)", "recipe": "recipe (scheme, stages, options or ignore list)"}
                raise ResumeError(
                    f"cannot resume from {self.path}: the {', '.join(what[p] for p in changed)} changed since it "
                    "was written; rerun with the original settings, or pass --overwrite without --resume to start over"
                )
            else:
                self.blocks = list(state["blocks"])
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            for stale in self.path.glob(".*.tmp-*"):  # a write that a crash interrupted
                stale.unlink()
        except OSError as e:
            raise OperationError(f"cannot create {self.path} for resumable progress: {e.strerror or e}") from e

    # ----------------------------------------------------------------- state file

    def _read_state(self) -> dict[str, Any] | None:
        f = self.path / STATE_NAME
        if not f.is_file():
            return None
        try:
            state = json.loads(read_small_text(f))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ResumeError(f"{f} is unreadable ({type(e).__name__}); delete {self.path} to start over") from e
        ok = (
            isinstance(state, dict)
            and isinstance(state.get("fingerprint"), dict)
            and isinstance(state.get("blocks"), list)
            and isinstance(state.get("n_blocks"), int)
            and all(
                isinstance(b, dict) and isinstance(b.get("file"), str) and isinstance(b.get("sha256"), str)
                and re.fullmatch(r"block_\d{5}\.safetensors", b["file"]) is not None  # no paths outside the dir
                for b in state["blocks"]
            )
        )
        if not ok or state.get("version") != STATE_VERSION:
            raise ResumeError(f"{f} is not a quantkit {STATE_VERSION} resume state; delete {self.path} to start over")
        if [b["index"] for b in state["blocks"]] != list(range(len(state["blocks"]))):
            raise ResumeError(f"{f} lists blocks out of order; delete {self.path} to start over")
        return state

    def _write_state(self, n_blocks: int) -> None:
        state = {"version": STATE_VERSION, "fingerprint": self.fingerprint, "n_blocks": n_blocks, "blocks": self.blocks}
        _atomic_write_bytes(self.path / STATE_NAME, (json.dumps(state, indent=1) + "\n").encode())
        _fsync_dir(self.path)

    # ----------------------------------------------------------------- pipeline hooks

    def start_block(self, n_blocks: int) -> int:
        """Number of leading blocks already finished (restore these, compute the rest)."""
        if self.blocks and len(self.blocks) > n_blocks:
            raise ResumeError(f"{self.path} has {len(self.blocks)} blocks but the model has {n_blocks}")
        return len(self.blocks)

    @torch.no_grad()
    def save_block(self, index: int, block: nn.Module, results: dict[str, QuantizedTensor], warnings: list[str],
                   n_blocks: int, prefix: str) -> None:
        """Persist block `index` (named `prefix`, e.g. model.layers.3) after it is final.

        block: its parameters and buffers as they are now (methods change norms too);
        results: full name -> QuantizedTensor; warnings: this block's warnings.
        """
        from safetensors.torch import save

        if index != len(self.blocks):
            raise RuntimeError(f"save_block({index}) out of order: {len(self.blocks)} blocks saved")
        tensors: dict[str, torch.Tensor] = {}
        recomputed: list[str] = []
        for key, t in block.state_dict().items():
            full = f"{prefix}.{key}"
            if key.endswith(".weight") and full[: -len(".weight")] in results:
                qt = results[full[: -len(".weight")]]
                if torch.equal(qt.to("cpu").dequantize(t.dtype), t.to("cpu")):
                    recomputed.append(key)  # restore rebuilds it exactly; saves a full copy of the weights
                    continue
            tensors[f"state/{key}"] = t.detach().to("cpu").contiguous()
        meta_results = {}
        for name, qt in results.items():
            tensors[f"result/{name}/q"] = qt.q.to("cpu").contiguous()
            tensors[f"result/{name}/scale"] = qt.scale.to("cpu").contiguous()
            if qt.zero is not None:
                tensors[f"result/{name}/zero"] = qt.zero.to("cpu").contiguous()
            meta_results[name] = qt.args.to_dict()
        data = save(tensors)
        fname = f"block_{index:05d}.safetensors"
        sha = _sha256_bytes(data)
        meta = {"index": index, "prefix": prefix, "results": meta_results, "recomputed": recomputed,
                "warnings": list(warnings), "sha256": sha}
        try:
            _atomic_write_bytes(self.path / fname, data)
            _atomic_write_bytes(self.path / f"block_{index:05d}.json", (json.dumps(meta, indent=1) + "\n").encode())
            self.blocks.append({"index": index, "file": fname, "sha256": sha})
            self._write_state(n_blocks)
        except OSError as e:
            raise OperationError(
                f"saving resumable progress to {self.path} failed: {(e.strerror or str(e)).lower()}; "
                "free space there (or choose another --out) and rerun with --resume"
            ) from e
        from quantkit.interrupts import reached

        reached(f"saved.{len(self.blocks)}")

    @torch.no_grad()
    def restore_block(self, index: int, block: nn.Module) -> tuple[dict[str, QuantizedTensor], list[str]]:
        """Load block `index` into `block` (in place, its dtype and device kept); returns (results, warnings).

        Refuses (ResumeError naming the file) a file whose sha256 differs from state.json.
        """
        entry = self.blocks[index]
        f = self.path / entry["file"]
        mf = f.with_suffix(".json")
        if not (f.is_file() and mf.is_file()):  # missing, or a pipe/device that must not be read
            raise ResumeError(f"{f.name} in {self.path} is missing or not a regular file; delete {self.path} to start over")
        try:
            data = f.read_bytes()
            meta = json.loads(read_small_text(mf))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ResumeError(f"{f.name if isinstance(e, OSError) else mf.name} in {self.path} is missing or "
                              f"unreadable; delete {self.path} to start over") from e
        if not isinstance(meta, dict) or _sha256_bytes(data) != entry["sha256"] or meta.get("sha256") != entry["sha256"]:
            raise ResumeError(f"{f.name} in {self.path} is corrupted (sha256 mismatch); delete {self.path} to start over")
        try:
            results, state, warnings = self._decode(data, meta, block)
        except ResumeError:
            raise
        except Exception as e:  # safetensors/KeyError/TypeError/shape errors: the file is not ours or not this model's
            raise ResumeError(f"{f.name} in {self.path} does not match this model's block {index} "
                              f"({type(e).__name__}); delete {self.path} to start over") from e
        block.load_state_dict(state, strict=True)
        return results, warnings

    @staticmethod
    def _decode(data: bytes, meta: dict[str, Any], block: nn.Module):
        from safetensors.torch import load

        tensors = load(data)
        results: dict[str, QuantizedTensor] = {}
        for name, args in meta["results"].items():
            results[name] = QuantizedTensor(
                tensors[f"result/{name}/q"], tensors[f"result/{name}/scale"], tensors.get(f"result/{name}/zero"),
                QuantArgs.from_dict(args),
            )
        current = block.state_dict()
        state = {k[len("state/"):]: v for k, v in tensors.items() if k.startswith("state/")}
        prefix = meta["prefix"]
        for key in meta["recomputed"]:
            state[key] = results[f"{prefix}.{key[: -len('.weight')]}"].dequantize(current[key].dtype)
        if set(state) != set(current):
            raise ValueError("parameter names differ")
        for k, v in state.items():
            if v.shape != current[k].shape:
                raise ValueError(f"{k} has shape {tuple(v.shape)}, the model {tuple(current[k].shape)}")
        return results, state, [str(w) for w in meta["warnings"]]


    # ----------------------------------------------------------------- streamed runs

    def lazy_results(self) -> "LazyResults":
        """Full name -> QuantizedTensor of every saved block, read from disk on access (a streamed run
        keeps nothing of its finished blocks in memory)."""
        return LazyResults(self)

    def _block_meta(self, index: int) -> dict[str, Any]:
        entry = self.blocks[index]
        mf = (self.path / entry["file"]).with_suffix(".json")
        try:
            return json.loads(read_small_text(mf))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ResumeError(f"{mf.name} in {self.path} is missing or unreadable; delete {self.path} to start "
                              "over") from e

    def _header(self, index: int) -> dict[str, Any]:
        """The header of block file `index` (one cached: export reads the blocks in order)."""
        from quantkit.export.safetensors_header import SafetensorsHeaderError, read_safetensors_header

        if self._open[0] != index:
            f = self.path / self.blocks[index]["file"]
            try:
                self._open = (index, read_safetensors_header(f))
            except SafetensorsHeaderError as e:
                raise ResumeError(f"{e}; delete {self.path} to start over") from e
        return self._open[1]

    def _read(self, index: int, keys: list[str]) -> dict[str, torch.Tensor]:
        from quantkit.models.streaming import read_tensors

        header = self._header(index)
        return read_tensors(self.path / self.blocks[index]["file"], {k: header[k] for k in keys})

    def saved_prefixes(self) -> dict[str, int]:
        """Block name (e.g. model.layers.3) -> index, of every saved block."""
        if self._prefixes is None or len(self._prefixes) != len(self.blocks):
            self._metas = [self._block_meta(i) for i in range(len(self.blocks))]
            self._prefixes = {m["prefix"]: i for i, m in enumerate(self._metas)}
        return self._prefixes

    def read_result(self, index: int, name: str) -> QuantizedTensor:
        self.saved_prefixes()
        keys = [f"result/{name}/{p}" for p in ("q", "scale", "zero")]
        got = self._read(index, [k for k in keys if k in self._header(index)])
        return QuantizedTensor(got[keys[0]], got[keys[1]], got.get(keys[2]),
                               QuantArgs.from_dict(self._metas[index]["results"][name]))

    def _locate(self, key: str) -> tuple[int, str] | None:
        """(saved block index, key relative to that block) of a full state-dict name, or None."""
        prefixes = self.saved_prefixes()
        prefix, rel = key, ""
        while prefix and prefix not in prefixes:
            prefix, _, last = prefix.rpartition(".")
            rel = f"{last}.{rel}" if rel else last
        return (prefixes[prefix], rel) if prefix else None

    def rebuilt_from_result(self, key: str) -> bool:
        """Whether weight `key` (full name) was left out of its saved block because it equals its quantized
        tensor's dequantization bit for bit (save_block checked that when the block was final)."""
        found = self._locate(key)
        return found is not None and found[1] in self._metas[found[0]]["recomputed"]

    def block_tensor(self, key: str, dtype: torch.dtype) -> torch.Tensor | None:
        """State-dict tensor `key` (full name) of a saved block as it was saved, or None when no saved
        block holds it. A quantized linear's weight that was not stored is rebuilt (bit for bit, in dtype)."""
        found = self._locate(key)
        if found is None:
            return None
        i, rel = found
        if f"state/{rel}" in self._header(i):
            return self._read(i, [f"state/{rel}"])[f"state/{rel}"]
        if rel in self._metas[i]["recomputed"]:
            return self.read_result(i, key[: -len(".weight")]).dequantize(dtype)
        return None


class LazyResults(Mapping):
    """Read-only mapping full name -> QuantizedTensor over a checkpointer's saved blocks; each access
    reads that tensor from its block file (nothing is cached), in block order."""

    def __init__(self, checkpointer: Checkpointer):
        self._ck = checkpointer
        checkpointer.saved_prefixes()
        self._where = {name: i for i, m in enumerate(checkpointer._metas) for name in m["results"]}

    def __getitem__(self, name: str) -> QuantizedTensor:
        return self._ck.read_result(self._where[name], name)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)
