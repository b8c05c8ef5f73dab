"""Text sources -> token windows, deterministically.

A data spec is one of:
  None / "builtin" / "builtin:pydoc"
                             the Python reference text in stdlib `pydoc_data.topics`
                              (first half for calibration, second half held out)
  "builtin:mix"              calibration only: a seeded mix of the pydoc first half,
                              Python source of stdlib modules and the READMEs of packages
                              quantkit installs, none of them in a held-out text (`MIX`)
  "builtin:code", "builtin:prose"
                             held out only (`HELDOUT`): stdlib source, and the READMEs of
                              quantkit's direct dependencies; never calibration text
  path/to/file.txt           plain UTF-8 text
  path/to/file.jsonl         one JSON object per line, text under `field`
  hf:NAME[:CONFIG[:SPLIT]]   a `datasets` dataset (text under `field`)

Windows are consecutive, non-overlapping runs of `seqlen` tokens. Calibration
picks `samples` of them at random (seeded); evaluation takes the first N.
"""

from __future__ import annotations

import re

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.errors import UsageError, short, short_repr

BUILTIN = "builtin"

# Held-out texts of other kinds than the calibration text, present wherever quantkit is installed.
# Calibration never reads them (`MIX_*` below are disjoint; tests check it).
CODE_MODULES = ("json.decoder", "json.encoder", "argparse", "textwrap", "email.utils", "http.client", "tarfile",
                "zipfile", "logging")
# READMEs (the long description in each dist's METADATA): markdown prose with some code, links and tables.
PROSE_PACKAGES = ("torch", "transformers", "accelerate", "datasets", "typer", "rich")

# builtin:mix: share of the calibration windows per kind, and where each kind's text comes from.
MIX_WEIGHTS = {"pydoc": 0.5, "code": 0.25, "prose": 0.25}
MIX_CODE_MODULES = ("collections", "functools", "dataclasses", "shutil", "configparser", "difflib", "fractions",
                    "statistics", "calendar", "ipaddress", "optparse", "pprint", "shlex", "smtplib", "gettext")
# Installed with quantkit through its requirements (transformers needs huggingface_hub, tqdm, numpy).
MIX_PROSE_PACKAGES = ("huggingface_hub", "tqdm", "numpy", "scipy", "safetensors", "gguf")


class CalibDataError(UsageError):
    """The text source can't give what was asked; the message says how to fix it."""


def builtin_text(part: str) -> str:
    """First ("calib") or second ("eval") half of the stdlib's Python reference text."""
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics.values())
    half = len(text) // 2
    if part == "calib":
        return text[:half]
    if part == "eval":
        return text[half:]
    raise ValueError(f"part must be 'calib' or 'eval', not {short_repr(part)}")


def code_text(modules: tuple[str, ...] = CODE_MODULES) -> str:
    """Python source of standard-library modules (one text, modules in the given order)."""
    import importlib
    import inspect

    return "\n\n".join(inspect.getsource(importlib.import_module(m)) for m in modules)


def readme_text(packages: tuple[str, ...] = PROSE_PACKAGES) -> str:
    """The README (long description in the installed METADATA) of each package, in the given order."""
    from importlib import metadata

    parts = []
    for name in packages:
        try:
            meta = metadata.metadata(name)
        except metadata.PackageNotFoundError as e:
            raise CalibDataError(f"package {name!r} is not installed, so its README can't be read; "
                                 f"pip install {name}") from e
        body = meta.get_payload() or meta.get("Description") or ""  # older metadata keeps it in a header
        body = "\n".join(ln for ln in body.splitlines() if not _MARKUP_ONLY.match(ln)).strip()
        if body:
            parts.append(body)
    return "\n\n".join(parts)


# A README line that is only images, badges, HTML tags or a horizontal rule: URL soup, not prose. Dropped
# because such a line opening the text broke the float model itself: SmolLM2 starting a window at torch's
# logo line `![PyTorch Logo](https://...)` forms no attention sink and scores NLL 5.5 over the window
# (1.9 from one token later), so every quantized row's prose gap swung by +-8% on that one window.
_MARKUP_ONLY = re.compile(r"^\s*(?:(?:\[?!\[[^\]]*\]\([^)]*\)(?:\]\([^)]*\))?|</?[a-zA-Z][^>]*>)\s*)+$|^\s*[-=*_]{3,}\s*$")


# builtin:NAME -> (what it is, the text). Evaluation only; `builtin:pydoc` is the pydoc half.
HELDOUT = {
    "pydoc": ("Python reference text (stdlib pydoc_data.topics), second half", lambda: builtin_text("eval")),
    "code": (f"Python source of the stdlib modules {', '.join(CODE_MODULES)}", code_text),
    "prose": (f"READMEs (package METADATA) of {', '.join(PROSE_PACKAGES)}", readme_text),
}
# builtin:NAME for calibration. `builtin:mix` is drawn per kind by `MIX_WEIGHTS` from these texts.
MIX = {
    "pydoc": lambda: builtin_text("calib"),
    "code": lambda: code_text(MIX_CODE_MODULES),
    "prose": lambda: readme_text(MIX_PROSE_PACKAGES),
}
CALIB_SOURCES = ("pydoc", "mix")


def builtin_name(spec: str | None) -> str | None:
    """"pydoc" for None / "builtin", NAME for "builtin:NAME", None for any other spec (a file, hf:)."""
    if spec is None or spec == BUILTIN:
        return "pydoc"
    if spec.startswith(BUILTIN + ":"):
        return spec[len(BUILTIN) + 1:]
    return None


def check_builtin(spec: str | None, part: str) -> str | None:
    """The builtin name of spec, refused when it is unknown or not for `part` ("calib" or "eval"):
    held-out texts never calibrate, and the mix is never scored."""
    name = builtin_name(spec)
    if name is None:
        return None
    names = CALIB_SOURCES if part == "calib" else tuple(HELDOUT)
    if name not in names:
        role = "calibration" if part == "calib" else "held-out"
        other = (f"; {short_repr(spec)} is held-out text, never calibration text" if part == "calib" and name in HELDOUT
                 else f"; {short_repr(spec)} is calibration text only" if name in CALIB_SOURCES else "")
        raise CalibDataError(f"unknown {role} text {short_repr(spec)}{other}; "
                             f"choose one of {', '.join(f'builtin:{n}' for n in names)}")
    return name


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data[:65536]:
        raise CalibDataError(f"{path} looks binary (NUL bytes); pass a UTF-8 .txt or .jsonl file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CalibDataError(f"{path} is not valid UTF-8 (byte {e.start}); pass a UTF-8 .txt or .jsonl file") from e


def _jsonl_texts(path: Path, field: str) -> list[str]:
    texts = []
    for lineno, line in enumerate(_read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibDataError(f"{path}:{lineno} is not valid JSON ({e.msg})") from e
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise CalibDataError(f"{path}:{lineno} has no string field {short_repr(field)}; choose the field with --calib-field")
        texts.append(row[field])
    return texts


def _hf_texts(spec: str, field: str, default_split: str) -> list[str]:
    parts = spec[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise CalibDataError(f"{short_repr(spec)} is not of the form hf:NAME[:CONFIG[:SPLIT]]")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else default_split
    try:
        import datasets
    except ImportError as e:
        raise CalibDataError("hf: data needs the `datasets` package: pip install datasets") from e
    from quantkit.models.hub import check_dataset_reachable

    check_dataset_reachable(spec)  # seconds, not half a minute of retries
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # datasets raises many types for "not found / offline"
        from quantkit.models.hub import offline

        if offline():
            raise CalibDataError(
                f"dataset {short_repr(spec, 120)} is not in the datasets cache and HF_HUB_OFFLINE is set; unset it "
                "to download, or pass a .txt/.jsonl file or builtin"
            ) from e
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CalibDataError(f"could not load dataset {short_repr(spec, 120)}: {short(first, 200)}") from e
    if field not in ds.column_names:
        raise CalibDataError(f"dataset {short_repr(spec)} has no column {short_repr(field)} (has {', '.join(ds.column_names)})")
    return [t for t in ds[field] if isinstance(t, str) and t.strip()]


def load_text(spec: str | None, *, part: str, field: str = "text") -> str:
    """The raw text for a data spec; `part` picks the builtin half ("calib" or "eval")."""
    name = check_builtin(spec, part)
    if name == "mix":
        return "\n\n".join(MIX[k]() for k in MIX_WEIGHTS)
    if name is not None:
        return builtin_text(part) if name == "pydoc" else HELDOUT[name][1]()
    if spec.startswith("hf:"):
        texts = _hf_texts(spec, field, default_split="train" if part == "calib" else "test")
    else:
        path = Path(spec).expanduser()
        shown = short(spec, 160)
        if path.is_dir():
            raise CalibDataError(f"data file {shown} is a directory; pass a .txt or .jsonl file inside it")
        if path.exists() and not path.is_file():
            raise CalibDataError(
                f"data file {shown} is not a regular file (a device, pipe or socket); pass a .txt or .jsonl file"
            )
        if not path.is_file():
            raise CalibDataError(f"data file {shown} does not exist; pass a .txt/.jsonl file, hf:NAME or builtin")
        if path.suffix == ".jsonl":
            texts = _jsonl_texts(path, field)
        else:
            texts = [_read_utf8(path)]
    text = "\n\n".join(texts)
    if not text.strip():
        raise CalibDataError(f"data source {spec} holds no text")
    return text


def tokenize(tokenizer, text: str):
    """All tokens of text as a 1-D LongTensor, without special tokens."""
    import torch

    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class CalibrationSet:
    input_ids: Any  # LongTensor (samples, seqlen)
    settings: dict[str, Any]  # JSON-ready: source, samples, seqlen, seed, tokens available


def calibration_set(
    tokenizer, spec: str | None = None, *, samples: int = 64, seqlen: int = 512, seed: int = 0, field: str = "text"
) -> CalibrationSet:
    """`samples` distinct windows of `seqlen` tokens, chosen at random with `seed`.

    Non-overlapping when the text holds that many windows; otherwise distinct,
    overlapping start offsets (the built-in calibration half holds ~110 windows of
    512 tokens, and the common 128 x 512 setting must still work).
    """
    import torch

    if samples <= 0 or seqlen <= 1:
        raise CalibDataError(f"--samples ({samples}) must be >= 1 and --seqlen ({seqlen}) >= 2")
    g = torch.Generator().manual_seed(seed)
    if check_builtin(spec, "calib") == "mix":
        return _mix_set(tokenizer, samples, seqlen, seed, g)
    tokens = tokenize(tokenizer, load_text(spec, part="calib", field=field))
    windows, overlapping = _pick_windows(tokens, samples, seqlen, g, "calibration text")
    settings = {
        "source": BUILTIN if builtin_name(spec) == "pydoc" else spec,  # builtin:pydoc is builtin, bit for bit
        "field": field,
        "samples": samples,
        "seqlen": seqlen,
        "seed": seed,
        "tokens_available": int(tokens.numel()),
        "overlapping_windows": overlapping,
    }
    return CalibrationSet(windows.contiguous(), settings)


def _pick_windows(tokens, samples: int, seqlen: int, g, what: str):
    """`samples` distinct windows of `seqlen` from tokens (1-D), seeded by generator g: (windows, overlapping)."""
    import torch

    available = tokens.numel() // seqlen
    starts = tokens.numel() - seqlen + 1  # distinct window positions when windows may overlap
    if starts < samples:
        raise CalibDataError(
            f"{what} has {tokens.numel()} tokens, too few for {samples} distinct windows of {seqlen}; "
            f"use --samples {max(starts, 1) if starts > 0 else 1} or a shorter --seqlen, or more text with --calib"
        )
    overlapping = available < samples
    if not overlapping:
        # Enough text: non-overlapping windows on a fixed grid, a seeded subset of them.
        picks = torch.randperm(available, generator=g)[:samples].sort().values
        return tokens[: available * seqlen].view(available, seqlen)[picks], False
    # More windows than the text holds side by side: distinct random start offsets
    # (windows share some tokens; recorded in the settings).
    offsets = torch.randperm(starts, generator=g)[:samples].sort().values
    return torch.stack([tokens[o : o + seqlen] for o in offsets.tolist()]), True


def mix_counts(samples: int) -> dict[str, int]:
    """Windows per kind of builtin:mix: floor(samples x weight), the rest to pydoc (the first kind)."""
    counts = {k: int(samples * w) for k, w in MIX_WEIGHTS.items()}
    first = next(iter(MIX_WEIGHTS))
    counts[first] += samples - sum(counts.values())
    return counts


def _mix_tokens(tokenizer) -> dict[str, Any]:
    """builtin:mix's texts, tokenized, per kind in `MIX_WEIGHTS` order."""
    return {k: tokenize(tokenizer, MIX[k]()) for k in MIX_WEIGHTS}


def _mix_set(tokenizer, samples: int, seqlen: int, seed: int, g) -> CalibrationSet:
    """builtin:mix: each kind's share of windows drawn from its own text, then shuffled (seeded), so the
    first windows (AWQ's search_samples) hold every kind too."""
    import torch

    parts, per_kind = [], {}
    texts = _mix_tokens(tokenizer)
    for kind, n in mix_counts(samples).items():
        tokens = texts[kind]
        if n:
            w, overlapping = _pick_windows(tokens, n, seqlen, g, f"builtin:mix's {kind} text")
            parts.append(w)
        per_kind[kind] = {"samples": n, "tokens_available": int(tokens.numel()), "overlapping_windows": n > 0 and overlapping}
    windows = torch.cat(parts)[torch.randperm(samples, generator=g)]
    settings = {
        "source": f"{BUILTIN}:mix",
        "field": "text",
        "samples": samples,
        "seqlen": seqlen,
        "seed": seed,
        "tokens_available": sum(v["tokens_available"] for v in per_kind.values()),
        "overlapping_windows": any(v["overlapping_windows"] for v in per_kind.values()),
        "mix": per_kind,
    }
    return CalibrationSet(windows.contiguous(), settings)


def heldout_windows(tokenizer, seqlen: int = 512, n_windows: int | None = None, spec: str | None = None, field="text"):
    """The first `n_windows` consecutive windows of held-out text (None = all). LongTensor (n, seqlen)."""
    if seqlen <= 1:
        raise CalibDataError(f"--seqlen ({seqlen}) must be >= 2")
    tokens = tokenize(tokenizer, load_text(spec, part="eval", field=field))
    available = tokens.numel() // seqlen
    if available == 0:
        raise CalibDataError(f"evaluation text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    n = available if n_windows is None else n_windows
    if n > available:
        raise CalibDataError(
            f"evaluation text has {available} windows of {seqlen} tokens, {n} asked for; use --windows {available}"
        )
    return tokens[: n * seqlen].view(n, seqlen).contiguous()


def heldout_sets(tokenizer, seqlen: int = 512, n_windows: int | None = None, names=tuple(HELDOUT)):
    """{name: heldout_windows of builtin:NAME} for the held-out texts `names` (default: all of HELDOUT);
    the benchmarks score every row on each of them."""
    unknown = [n for n in names if n not in HELDOUT]
    if unknown:
        raise CalibDataError(f"unknown held-out texts {unknown}; choose from {', '.join(HELDOUT)}")
    return {n: heldout_windows(tokenizer, seqlen, n_windows, spec=f"{BUILTIN}:{n}") for n in names}


def _runs(t, ngram: int) -> list[list[tuple[int, ...]]]:
    """Every `ngram`-token run of each row of t (n, seqlen), per row."""
    t = t.long()
    if t.shape[1] < ngram:
        return [[] for _ in range(t.shape[0])]
    return [[tuple(r) for r in row] for row in t.unfold(1, ngram, 1).tolist()]


def text_overlap(windows, samples, ngram: int = 16) -> float:
    """The share of `windows`' text that also appears in `samples` (both (n, seqlen) token ids): the fraction
    of the windows' `ngram`-token runs found anywhere in the samples. 1.0: every window is text the samples
    cover (a method calibrated on `samples` was fit to it); near 0: unseen text."""
    w = [r for row in _runs(windows, ngram) for r in row]
    if not w:
        return 0.0
    seen = {r for row in _runs(samples, ngram) for r in row}
    return sum(r in seen for r in w) / len(w)


def samples_apart(samples, windows, ngram: int = 16):
    """Bool mask (n_samples,): the samples that share no `ngram`-token run with any of `windows` (text a method
    calibrated on them was not fit to)."""
    import torch

    seen = {r for row in _runs(windows, ngram) for r in row}
    return torch.tensor([not any(r in seen for r in row) for row in _runs(samples, ngram)], dtype=torch.bool)


def calibration_windows(tokenizer, seqlen: int, n_windows: int | None = None, spec: str | None = None, field="text"):
    """`n_windows` non-overlapping windows of the *calibration* text (None = all), spread evenly over it.

    For scoring choices made during calibration (the scan's `--target-fraction`) without
    reading the held-out text. LongTensor (n, seqlen), in text order. builtin:mix: each kind's
    share (`mix_counts`) spread over its own text, the kinds in `MIX_WEIGHTS` order (so contiguous
    cross-validation folds score one kind by a choice made mostly on the others).
    """
    if seqlen <= 1:
        raise CalibDataError(f"--eval-seqlen ({seqlen}) must be >= 2")
    if check_builtin(spec, "calib") == "mix":
        return _mix_windows(tokenizer, seqlen, n_windows)
    tokens = tokenize(tokenizer, load_text(spec, part="calib", field=field))
    available = tokens.numel() // seqlen
    n = available if n_windows is None else min(n_windows, available)
    if n < 1:
        raise CalibDataError(
            f"calibration text has {tokens.numel()} tokens, fewer than one window of {seqlen}; "
            "use a shorter --eval-seqlen or more text with --calib"
        )
    return _spread(tokens, seqlen, n)


def _spread(tokens, seqlen: int, n: int):
    """n of the non-overlapping windows of tokens (1-D), evenly spaced, in text order."""
    import torch

    available = tokens.numel() // seqlen
    picks = torch.tensor([i * available // n for i in range(n)])
    return tokens[: available * seqlen].view(available, seqlen)[picks].contiguous()


def _mix_windows(tokenizer, seqlen: int, n_windows: int | None):
    """calibration_windows of builtin:mix: the most windows (or n_windows) whose per-kind counts each text holds."""
    import torch

    texts = _mix_tokens(tokenizer)
    available = {k: t.numel() // seqlen for k, t in texts.items()}
    n = sum(available.values()) if n_windows is None else min(n_windows, sum(available.values()))
    while n > 0 and any(c > available[k] for k, c in mix_counts(n).items()):
        n -= 1
    if n < 1:
        raise CalibDataError(f"builtin:mix's texts hold fewer than one window of {seqlen} tokens each "
                             f"({', '.join(f'{k} {v}' for k, v in available.items())}); use a shorter --eval-seqlen")
    return torch.cat([_spread(texts[k], seqlen, c) for k, c in mix_counts(n).items() if c]).contiguous()
