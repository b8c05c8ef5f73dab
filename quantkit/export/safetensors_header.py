"""The header of a .safetensors file, parsed and checked without reading tensor data.

Every reader of safetensors files in quantkit (the model loader, streaming, resume, the
checkpoint reader, `inspect`) checks a file here first, so a damaged file is one
SafetensorsHeaderError naming it, never a SafetensorError deep inside a loader.

File layout: 8 bytes little-endian header length n, n bytes of JSON
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}},
then the data section; offsets count from its start (byte 8 + n).
"""

from __future__ import annotations

import json
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.errors import short, short_repr
from quantkit.export.manifest import ManifestError


class SafetensorsHeaderError(ManifestError):
    """A .safetensors file's header is truncated or corrupted (a usage error: the file is bad)."""


_MAX_HEADER = 100 * 1024**2  # safetensors itself refuses headers above 100 MB
# Bits per element of every dtype safetensors 0.8 reads (its own list; sub-byte types pack).
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
    "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
# struct codes of the integer dtypes `SafetensorsFile.read_ints` decodes.
_INT_CODES = {"I8": "b", "U8": "B", "I16": "h", "U16": "H", "I32": "i", "U32": "I", "I64": "q", "U64": "Q"}


@dataclass(frozen=True)
class SafetensorsFile:
    """One checked header: tensors = name -> {dtype, shape, data_offsets}; data_start = 8 + header length."""

    path: Path
    tensors: dict[str, Any]
    data_start: int

    def read_ints(self, key: str) -> list[int]:
        """The values of a small integer tensor (e.g. a `weight_shape`), read straight from its byte range."""
        info = self.tensors[key]
        code = _INT_CODES.get(info["dtype"])
        if code is None:
            raise _bad(self.path, f"entry {short_repr(key)} is {short(info['dtype'], 20)}, expected an integer dtype")
        begin, end = info["data_offsets"]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            raw = f.read(end - begin)
        n = (end - begin) // struct.calcsize(code)
        if len(raw) != end - begin:
            raise _bad(self.path, f"entry {short_repr(key)} is cut short")
        return list(struct.unpack(f"<{n}{code}", raw))


def _bad(path: Path, why: str) -> SafetensorsHeaderError:
    return SafetensorsHeaderError(f"{path.name} in {path.parent} is not a valid safetensors file ({why}); "
                                  "re-export or re-download it")


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for k, v in pairs:
        if k in seen:
            raise _DuplicateKey(k)
        seen[k] = v
    return seen


def _read_json_header(path: Path) -> tuple[dict[str, Any], int, int]:
    """(the header object without __metadata__, its length n, the file size): the I/O and JSON half."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # a pipe would block the read forever
            raise _bad(path, "not a regular file")
        size = st.st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise _bad(path, "shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, _MAX_HEADER):
                raise _bad(path, f"header length {n} exceeds the file")
            text = f.read(n)
    except OSError as e:
        raise _bad(path, f"unreadable: {e.strerror or e}") from e
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise _bad(path, f"tensor name {short(str(e.args[0]), 60)!r} appears twice") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _bad(path, "header is not JSON") from e
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise _bad(path, "__metadata__ is not a map of strings")
    return header, n, size


def _entry_span(path: Path, key: str, info: Any, data_len: int) -> tuple[int, int, str]:
    """(begin, end, name) of one entry, after checking its fields and that its bytes fit its shape."""
    name = short(str(key), 60)
    ok = (
        isinstance(info, dict)
        and isinstance(info.get("dtype"), str)
        and isinstance(info.get("shape"), list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"])
        and isinstance(info.get("data_offsets"), list)
        and len(info["data_offsets"]) == 2
        and all(isinstance(d, int) and not isinstance(d, bool) for d in info["data_offsets"])
        and 0 <= info["data_offsets"][0] <= info["data_offsets"][1] <= data_len
    )
    if not ok:
        raise _bad(path, f"entry {short_repr(name)} is malformed or points outside the file")
    bits = SAFETENSORS_DTYPE_BITS.get(info["dtype"])
    if bits is None:
        raise _bad(path, f"entry {name!r} has unknown dtype {short(info['dtype'], 20)!r}")
    numel = 1
    for d in info["shape"]:
        numel *= d
    begin, end = info["data_offsets"]
    if numel * bits != (end - begin) * 8:
        raise _bad(path, f"entry {name!r}: {info['dtype']} of shape {short(info['shape'], 60)} needs "
                         f"{numel * bits / 8:g} bytes, its byte range holds {end - begin}")
    return begin, end, name


def open_safetensors(path: Path) -> SafetensorsFile:
    """The checked header of a .safetensors file (no tensor data read).

    Checks everything safetensors checks before it reads a byte of data: the 8-byte
    length, that the header fits in the file and is a JSON object without duplicate
    names, each entry {dtype: a known dtype, shape: [int >= 0], data_offsets: [begin,
    end]}, that each tensor's byte range is exactly its shape times its dtype's size,
    and that the ranges, sorted, tile the data section with no overlap, gap or trailing bytes.
    """
    path = Path(path)
    header, n, size = _read_json_header(path)
    data_len = size - 8 - n
    pos = 0
    for begin, end, name in sorted(_entry_span(path, k, v, data_len) for k, v in header.items()):
        if begin != pos:
            why = "overlaps the tensor before it" if begin < pos else f"leaves a gap of {begin - pos} bytes before it"
            raise _bad(path, f"entry {short_repr(name)} at bytes {begin}..{end} {why}")
        pos = end
    if pos != data_len:
        raise _bad(path, f"{data_len - pos} bytes after the last tensor are not covered by the header")
    return SafetensorsFile(path, header, 8 + n)


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The checked JSON header of a .safetensors file: tensor name -> {dtype, shape, data_offsets}
    (see open_safetensors for what is checked)."""
    return open_safetensors(path).tensors
