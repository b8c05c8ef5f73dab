"""Option values checked before any work: one line naming the option and the fix, exit 2.

Every command (and quantkit.run's checks before a method run) calls these on its numeric
options, dtypes and output paths before it loads a model (and, where a bound comes from the
model, after reading only its config). They never echo an unbounded user value
(`quantkit.errors.short`). Imports stay light: no torch.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from quantkit.errors import UsageError, short, short_repr
from quantkit.export.atomic import nearest_existing

FLOAT_DTYPES = ("auto", "float32", "float16", "bfloat16")


class OptionError(UsageError):
    """A command-line option has a value the command cannot use."""


def check_int(flag: str, value: int | None, *, min: int | None = None, max: int | None = None, note: str = "") -> None:
    """`flag` must be an integer in [min, max] (None = unbounded); `note` says what special values mean."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(f"{flag} {short(value, 40)} must be an integer")
    if (min is not None and value < min) or (max is not None and value > max):
        if min is not None and max is not None:
            want = f"between {min} and {max}"
        elif min is not None:
            want = f"at least {min}"
        else:
            want = f"at most {max}"
        raise OptionError(f"{flag} {value} must be {want}{note}")


def check_float(flag: str, value: float | None, *, min: float | None = None, max: float | None = None,
                min_open: bool = False, max_open: bool = False, note: str = "") -> None:
    """`flag` must be a finite number in the range ((min, max) open where asked)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise OptionError(f"{flag} {short(value, 40)} must be a finite number{note}")
    low_bad = min is not None and (value <= min if min_open else value < min)
    high_bad = max is not None and (value >= max if max_open else value > max)
    if low_bad or high_bad:
        lo = "" if min is None else (f"> {min:g}" if min_open else f">= {min:g}")
        hi = "" if max is None else (f"< {max:g}" if max_open else f"<= {max:g}")
        raise OptionError(f"{flag} {value:g} must be {' and '.join(x for x in (lo, hi) if x)}{note}")


def check_choice(flag: str, value: str, choices: Iterable[str]) -> None:
    """`flag` must be one of `choices`."""
    choices = tuple(choices)
    if value not in choices:
        raise OptionError(f"{flag} {short_repr(value)} is not one of {', '.join(choices)}")


def check_dtype(value: str) -> None:
    if value not in FLOAT_DTYPES:
        raise OptionError(
            f"--dtype {short(value, 40)!r} is not a float type quantkit computes in; use one of {', '.join(FLOAT_DTYPES)}"
        )


def check_device(value: str) -> None:
    """cpu, cuda, cuda:N or auto; a CUDA device must be visible (imports torch only for cuda)."""
    import re

    if not re.fullmatch(r"cpu|auto|cuda(:\d{1,3})?", value or ""):
        raise OptionError(f"--device {short(value, 40)!r} is not one of cpu, cuda, cuda:N, auto")
    if value.startswith("cuda"):
        from quantkit.models.loading import resolve_device

        resolve_device(value)


def max_positions(config: dict[str, Any] | None) -> int | None:
    """The longest sequence the model's config allows (max_position_embeddings), when it says."""
    v = (config or {}).get("max_position_embeddings")
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def check_seqlen(flag: str, value: int, config: dict[str, Any] | None = None) -> None:
    """At least 2 tokens (one prediction) and no more than the model's max_position_embeddings."""
    limit = max_positions(config)
    note = " (the model's max_position_embeddings)" if limit is not None else ""
    check_int(flag, value, min=2, max=limit, note=note)


def check_samples_batch(samples: int, batch_size: int, samples_flag: str = "--samples") -> None:
    check_int(samples_flag, samples, min=1)
    check_int("--batch-size", batch_size, min=1)


def check_windows(flag: str, value: int) -> None:
    check_int(flag, value, min=0, note=" (0 = every window of the text)")


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output_file(flag: str, path: Path | None, *, not_inside: Iterable[Path] = ()) -> None:
    """A file the command writes at the end: refuse now what would fail (or do harm) then.

    Not a directory, not inside a checkpoint dir being written (`not_inside`: its manifest
    lists every file in it), and its nearest existing parent is a writable directory.
    """
    if path is None:
        return
    try:
        _check_output_file(flag, path, not_inside)
    except OSError as e:  # a name too long, a loop of links...
        raise OptionError(f"{flag} {short(str(path), 160)} is not a usable path ({(e.strerror or str(e)).lower()})") from None


def _check_output_file(flag: str, path: Path, not_inside: Iterable[Path]) -> None:
    p = Path(path)
    if str(path) in ("", "."):
        raise OptionError(f"{flag} needs a file name, got {short(str(path), 40)!r}")
    if p.is_dir():
        raise OptionError(f"{flag} {short(str(p), 160)} is a directory; pass a file path such as {flag} run.json")
    if p.exists() and not p.is_file():
        raise OptionError(f"{flag} {short(str(p), 160)} is not a regular file (a device or pipe); pass a file path")
    target = p.absolute()
    for d in not_inside:
        if _is_within(target, Path(d).absolute()):
            raise OptionError(
                f"{flag} {short(str(p), 160)} is inside {short(str(d), 160)}, which quantkit writes as a whole "
                "(its manifest lists every file): write it elsewhere"
            )
    _check_writable(flag, target, file=True)


def check_output_tree(flag: str, path: Path | None) -> None:
    """A directory the command creates or adds files to (e.g. scan --report)."""
    if path is None:
        return
    try:
        _check_output_tree(flag, path)
    except OSError as e:
        raise OptionError(f"{flag} {short(str(path), 160)} is not a usable path ({(e.strerror or str(e)).lower()})") from None


def _check_output_tree(flag: str, path: Path) -> None:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OptionError(f"{flag} {short(str(p), 160)} exists and is not a directory; pass a directory path")
    _check_writable(flag, p.absolute(), file=False)


def _check_writable(flag: str, target: Path, *, file: bool) -> None:
    if file and target.exists():
        if not os.access(target, os.W_OK):
            raise OptionError(f"{flag} {short(str(target), 160)} is not writable (permission denied); choose another path")
        return
    probe = target if not file and target.is_dir() else nearest_existing(target.parent)
    if not probe.is_dir():
        raise OptionError(f"{flag}: {short(str(probe), 160)} is not a directory; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OptionError(f"{flag}: cannot write to {short(str(probe), 160)} (permission denied); choose another path")


def check_text_source(flag: str, spec: str | None) -> None:
    """A --calib / --data value that names a local file must be a readable regular file.

    builtin and hf: sources are checked where they are read. A directory, a device or a pipe
    is named as such (not "does not exist"); content (binary, UTF-8, empty) is checked on read.
    """
    if spec is None or spec == "builtin" or spec.startswith("builtin:"):
        from quantkit.calib.data import check_builtin

        check_builtin(spec, "calib" if flag == "--calib" else "eval")  # an unknown name, or a text in the wrong role
        return
    if spec.startswith("hf:"):
        from quantkit.models.hub import check_dataset_reachable

        check_dataset_reachable(spec)  # a dead network is one line now, not after loading the model
        return
    p = Path(spec).expanduser()
    try:
        st = p.stat()
    except FileNotFoundError:
        raise OptionError(f"{flag} {short(spec, 160)} does not exist; pass a .txt/.jsonl file, hf:NAME or builtin") from None
    except OSError as e:
        raise OptionError(f"{flag} {short(spec, 160)} cannot be read ({(e.strerror or str(e)).lower()})") from None
    if stat.S_ISDIR(st.st_mode):
        raise OptionError(f"{flag} {short(spec, 160)} is a directory; pass a .txt or .jsonl file inside it")
    if not stat.S_ISREG(st.st_mode):
        raise OptionError(
            f"{flag} {short(spec, 160)} is not a regular file (a device, pipe or socket); pass a .txt or .jsonl file"
        )
    if not os.access(p, os.R_OK):
        raise OptionError(f"{flag} {short(spec, 160)} is not readable (permission denied)")


def check_eval_options(*, seqlen: int, windows: int, batch_size: int, json_out: Path | None = None,
                       data: str | None = None, dtype: str = "auto", device: str = "cpu",
                       kv_tau: float | None = None, calib_samples: int | None = None,
                       models: Iterable[str | None] = ()) -> None:
    """Everything `quantkit eval` can check before loading a model.

    models: the model sources to be scored; --seqlen is checked against each one's
    max_position_embeddings (their configs only are read).
    """
    check_dtype(dtype)
    check_device(device)
    check_int("--windows", windows, min=0, note=" (0 = every window of the text)")
    check_int("--batch-size", batch_size, min=1)
    check_int("--calib-samples", calib_samples, min=1)
    check_float("--kv-tau", kv_tau, min=0, min_open=True)
    check_output_file("--json", json_out)
    check_text_source("--data", data)
    check_seqlen("--seqlen", seqlen)
    from quantkit.models.loading import check_source

    for m in models:
        check_source(m)  # a quantized dir without quantkit.json is named before any load
        check_seqlen("--seqlen", seqlen, model_config_of(m))


def model_config_of(model: str | None) -> dict[str, Any] | None:
    """The model's config dict (validated, no weights read); None for a source without one we can read cheaply."""
    from quantkit.plan import model_config

    return model_config(model)
