"""`quantkit.json`: what made a checkpoint and a sha256 of every file in it.

Written last into a checkpoint dir (so it covers every other file), read by
`quantkit inspect`, checked by `quantkit inspect --verify`.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from quantkit.errors import UsageError
from quantkit.files import load_small_json, read_small_text

MANIFEST_NAME = "quantkit.json"
# sha256 of quantkit.json itself, written beside it: a changed byte anywhere in the
# manifest (not only in the files it lists) fails verification.
MANIFEST_HASH_NAME = "quantkit.json.sha256"
# Bump when a reader of the previous version would misread the new content.
MANIFEST_FORMAT_VERSION = 1
_CHUNK = 1 << 20  # hash in 1 MiB reads: constant memory on multi-GB shards


class ManifestError(UsageError):
    """quantkit.json is missing, unreadable, or from a newer quantkit."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _list_files(ckpt_dir: Path) -> list[str]:
    """Relative POSIX paths of all files under ckpt_dir except the manifest, sorted."""
    files = []
    for root, _dirs, names in os.walk(ckpt_dir):
        for n in names:
            rel = (Path(root) / n).relative_to(ckpt_dir).as_posix()
            if rel not in (MANIFEST_NAME, MANIFEST_HASH_NAME):
                files.append(rel)
    return sorted(files)


def hash_files(ckpt_dir: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {"sha256", "bytes"}} for every file in ckpt_dir except quantkit.json."""
    ckpt_dir = Path(ckpt_dir)
    return {
        rel: {"sha256": sha256_file(ckpt_dir / rel), "bytes": (ckpt_dir / rel).stat().st_size}
        for rel in _list_files(ckpt_dir)
    }


def _created() -> str:
    """UTC time of writing; SOURCE_DATE_EPOCH (the reproducible-builds convention) pins it,
    so two runs with the same inputs write byte-identical checkpoints."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    when = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch.isdigit() else datetime.now(timezone.utc)
    return when.isoformat(timespec="seconds")


def build_manifest(
    ckpt_dir: Path,
    *,
    format: str,
    recipe: dict[str, Any],
    modules: dict[str, dict[str, Any]],
    source: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
    warnings: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest dict for the files now in ckpt_dir (hashes them).

    recipe: Recipe.to_dict(); modules: {module name: QuantArgs.to_dict()};
    extra: more top-level keys a format adds (e.g. a sensitivity mask).
    """
    from quantkit import __version__

    m: dict[str, Any] = {
        "format_version": MANIFEST_FORMAT_VERSION,
        "quantkit_version": __version__,
        "created": _created(),
        "format": format,
        "recipe": recipe,
        "modules": dict(sorted(modules.items())),
        "source": source or {},
        "calibration": calibration or {},
        "warnings": list(warnings or []),
    }
    m.update(extra or {})
    m["manifest_hash"] = MANIFEST_HASH_NAME
    m["files"] = hash_files(ckpt_dir)
    return m


def write_manifest(ckpt_dir: Path, manifest: dict[str, Any]) -> Path:
    """Write quantkit.json (and quantkit.json.sha256 beside it) into ckpt_dir; returns its path."""
    path = Path(ckpt_dir) / MANIFEST_NAME
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
        f.write("\n")
    (Path(ckpt_dir) / MANIFEST_HASH_NAME).write_text(f"{sha256_file(path)}  {MANIFEST_NAME}\n", encoding="utf-8")
    return path


def read_manifest(ckpt_dir: Path) -> dict[str, Any]:
    """Load quantkit.json from ckpt_dir.

    Raises ManifestError when it is missing, not JSON, lacks format_version, or was
    written by a newer quantkit (format_version > MANIFEST_FORMAT_VERSION).
    """
    path = Path(ckpt_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path} not found; {ckpt_dir} was not written by quantkit (or the manifest was removed)")
    m = load_small_json(path, ManifestError, "do not use this checkpoint (or re-export it)")
    v = m.get("format_version") if isinstance(m, dict) else None
    if not isinstance(v, int):
        raise ManifestError(f"{path} has no integer format_version; it is not a quantkit manifest")
    if v > MANIFEST_FORMAT_VERSION:
        raise ManifestError(
            f"{path} has format_version {v}, written by a newer quantkit "
            f"({m.get('quantkit_version', '?')}); this quantkit reads up to version "
            f"{MANIFEST_FORMAT_VERSION}: upgrade quantkit"
        )
    return m


def verify_checkpoint(ckpt_dir: Path) -> list[str]:
    """Problems found comparing ckpt_dir with its manifest; [] when it verifies.

    Each problem names the file: missing, not in the manifest, size mismatch,
    sha256 mismatch. A missing/unreadable manifest raises ManifestError.
    """
    ckpt_dir = Path(ckpt_dir)
    side = ckpt_dir / MANIFEST_HASH_NAME
    for name in (MANIFEST_NAME, MANIFEST_HASH_NAME):
        p = ckpt_dir / name
        if (p.exists() or p.is_symlink()) and not p.is_file():
            return [f"{name}: not a regular file"]
    if side.is_file() and (ckpt_dir / MANIFEST_NAME).is_file():
        try:
            want = read_small_text(side, limit=4096).split()[0]
        except (OSError, UnicodeDecodeError, IndexError):
            want = ""
        if want != sha256_file(ckpt_dir / MANIFEST_NAME):
            return [f"{MANIFEST_NAME}: sha256 mismatch with {MANIFEST_HASH_NAME} (manifest changed since export)"]
    manifest = read_manifest(ckpt_dir)
    expected = manifest.get("files", {})
    if not isinstance(expected, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in expected.values()
    ):
        raise ManifestError(f"{ckpt_dir / MANIFEST_NAME} has a malformed files table; do not use this checkpoint")
    present = set(_list_files(ckpt_dir))
    problems = []
    if manifest.get("manifest_hash") == MANIFEST_HASH_NAME and not side.is_file():
        problems.append(f"{MANIFEST_HASH_NAME}: missing")
    for rel, meta in sorted(expected.items()):
        if rel not in present:
            problems.append(f"{rel}: missing")
            continue
        if not (ckpt_dir / rel).is_file():  # a device, pipe or dangling link: reading it could block forever
            problems.append(f"{rel}: not a regular file")
            continue
        size = (ckpt_dir / rel).stat().st_size
        if size != meta.get("bytes"):
            problems.append(f"{rel}: size {size} bytes, manifest says {meta.get('bytes')}")
        elif sha256_file(ckpt_dir / rel) != meta.get("sha256"):
            problems.append(f"{rel}: sha256 mismatch (file changed since export)")
    for rel in sorted(present - set(expected)):
        problems.append(f"{rel}: not listed in {MANIFEST_NAME} (extra file)")
    return problems
