"""Text sources -> token windows, deterministically.

A data spec is one of:
  None / "builtin"           the Python reference text in stdlib `pydoc_data.topics`
                              (first half for calibration, second half held out)
  path/to/file.txt           plain UTF-8 text
  path/to/file.jsonl         one JSON object per line, text under `field`
  hf:NAME[:CONFIG[:SPLIT]]   a `datasets` dataset (text under `field`)

Windows are consecutive, non-overlapping runs of `seqlen` tokens. Calibration
picks `samples` of them at random (seeded); evaluation takes the first N.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.errors import UsageError, short, short_repr

BUILTIN = "builtin"


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
    if spec is None or spec == BUILTIN:
        return builtin_text(part)
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
    tokens = tokenize(tokenizer, load_text(spec, part="calib", field=field))
    available = tokens.numel() // seqlen
    starts = tokens.numel() - seqlen + 1  # distinct window positions when windows may overlap
    if starts < samples:
        raise CalibDataError(
            f"calibration text has {tokens.numel()} tokens, too few for {samples} distinct windows of {seqlen}; "
            f"use --samples {max(starts, 1) if starts > 0 else 1} or a shorter --seqlen, or more text with --calib"
        )
    g = torch.Generator().manual_seed(seed)
    overlapping = available < samples
    if not overlapping:
        # Enough text: non-overlapping windows on a fixed grid, a seeded subset of them.
        picks = torch.randperm(available, generator=g)[:samples].sort().values
        windows = tokens[: available * seqlen].view(available, seqlen)[picks]
    else:
        # More windows than the text holds side by side: distinct random start offsets
        # (windows share some tokens; recorded in the settings).
        offsets = torch.randperm(starts, generator=g)[:samples].sort().values
        windows = torch.stack([tokens[o : o + seqlen] for o in offsets.tolist()])
    settings = {
        "source": spec or BUILTIN,
        "field": field,
        "samples": samples,
        "seqlen": seqlen,
        "seed": seed,
        "tokens_available": int(tokens.numel()),
        "overlapping_windows": overlapping,
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


def calibration_windows(tokenizer, seqlen: int, n_windows: int | None = None, spec: str | None = None, field="text"):
    """`n_windows` non-overlapping windows of the *calibration* text (None = all), spread evenly over it.

    For scoring choices made during calibration (the scan's `--target-fraction`) without
    reading the held-out text. LongTensor (n, seqlen), in text order.
    """
    import torch

    if seqlen <= 1:
        raise CalibDataError(f"--eval-seqlen ({seqlen}) must be >= 2")
    tokens = tokenize(tokenizer, load_text(spec, part="calib", field=field))
    available = tokens.numel() // seqlen
    n = available if n_windows is None else min(n_windows, available)
    if n < 1:
        raise CalibDataError(
            f"calibration text has {tokens.numel()} tokens, fewer than one window of {seqlen}; "
            "use a shorter --eval-seqlen or more text with --calib"
        )
    picks = torch.tensor([i * available // n for i in range(n)])
    return tokens[: available * seqlen].view(available, seqlen)[picks].contiguous()
