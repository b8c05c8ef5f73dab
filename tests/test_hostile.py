"""Hostile inputs: damaged checkpoints and model files, absurd configs, bad calibration text.

Each one must give a one-line error, exit code 2 (1 for an integrity failure of a
checkpoint), no traceback, and leave nothing at the output path.
"""

import json
import re
import shutil
import struct

import pytest
import torch

from tiny_models import make_tiny_model, rtn_checkpoint, run_cli
from quantkit.errors import UsageError
from quantkit.export.safetensors_header import SafetensorsHeaderError, read_safetensors_header
from quantkit.export.manifest import ManifestError, verify_checkpoint
from quantkit.models.checkpoint import load_quantkit_checkpoint



_run = run_cli


def _last_line(out: str) -> str:
    lines = [l for l in out.strip().splitlines() if l.strip()]
    assert lines and "Traceback" not in out, out
    return lines[-1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("tiny")
    make_tiny_model("llama", seed=3).save_pretrained(d, safe_serialization=True)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def ckpt(model_dir, tmp_path_factory):
    return rtn_checkpoint(model_dir, tmp_path_factory.mktemp("ck") / "q", "-g", "32")


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x20
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- integrity


def _cases(ckpt):
    names = sorted(p.name for p in ckpt.iterdir())
    assert {"model.safetensors", "config.json", "quantkit.json", "quantkit.json.sha256", "tokenizer.json"} <= set(names)
    cases = [(n, len((ckpt / n).read_bytes()) // 2) for n in names]
    cases.append(("model.safetensors", 20))  # inside the safetensors JSON header
    cases.append(("model.safetensors", -3))  # last byte of tensor data
    return cases


def test_flipped_byte_in_every_file_is_refused(ckpt, tmp_path):
    for name, offset in _cases(ckpt):
        d = tmp_path / f"{name}-{offset}"
        shutil.copytree(ckpt, d)
        _flip(d / name, offset)
        problems = verify_checkpoint(d)
        assert problems and name in problems[0], (name, offset, problems)
        with pytest.raises(UsageError, match=name.replace(".", r"\.")):
            load_quantkit_checkpoint(d)
        code, out = _run("inspect", d, "--verify")
        assert code == 1, (name, out)
        assert name in _last_line(out) and "do not serve" in _last_line(out)


def test_truncated_files_are_refused(ckpt, tmp_path):
    for name in ("model.safetensors", "config.json", "quantkit.json"):
        d = tmp_path / name
        shutil.copytree(ckpt, d)
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: len(data) // 3])
        code, out = _run("inspect", d, "--verify")
        assert code in (1, 2) and name in _last_line(out), (name, out)


def test_intact_checkpoint_verifies(ckpt):
    assert verify_checkpoint(ckpt) == []
    code, out = _run("inspect", ckpt, "--verify")
    assert code == 0 and "every file matches" in out


# ----------------------------------------------------------------------------- model sources


def _expect_refusal(tmp_path, model, match):
    out = tmp_path / "out"
    code, text = _run("rtn", "--model", model, "--out", out, "-g", "32")
    line = _last_line(text)
    assert code == 2 and line.startswith("error:") and match in line, text
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    assert not list(tmp_path.glob(".out.*"))
    return line


def _copy_model(model_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    return d


def _rewrite_header(data: bytes, edit) -> bytes:
    """The file with its JSON header changed by edit(header) (a dict, or raw bytes to use as they are)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(bytes(data[8 : 8 + n]))
    new = edit(header)
    raw = new if isinstance(new, bytes) else json.dumps(new if new is not None else header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(data[8 + n :])


def _two_tensors(header):
    """The names of the first two tensors, by data offset."""
    keys = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return keys[0], keys[1]


def _overlap(h):
    a, b = _two_tensors(h)
    h[b]["data_offsets"] = [x - 4 for x in h[b]["data_offsets"]]  # starts inside a


def _reversed(h):
    a, _ = _two_tensors(h)
    h[a]["data_offsets"] = h[a]["data_offsets"][::-1]


def _dtype_size(h):
    a, _ = _two_tensors(h)
    h[a]["dtype"] = "F64" if h[a]["dtype"] != "F64" else "F32"  # same bytes, another element size


def _unknown_dtype(h):
    a, _ = _two_tensors(h)
    h[a]["dtype"] = "Q9"


def _duplicate(h):
    a, b = _two_tensors(h)
    body = ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in h.items())
    return ("{" + body + f", {json.dumps(a)}: {json.dumps(h[a])}" + "}").encode()


# damage -> (how, the reason the line gives)
_DAMAGE = {
    "truncated": (None, "exceeds the file"),
    "header_length": (None, "exceeds the file"),
    "header_json": (None, "header is not JSON"),
    "offsets": (None, "points outside the file"),
    "overlap": (_overlap, "overlaps the tensor before it"),
    "out_of_order": (_reversed, "is malformed"),
    "dtype_size": (_dtype_size, "its byte range holds"),
    "unknown_dtype": (_unknown_dtype, "unknown dtype 'Q9'"),
    "duplicate": (_duplicate, "appears twice"),
    "trailing": (None, "bytes after the last tensor are not covered"),
}


@pytest.mark.parametrize("damage", list(_DAMAGE))
def test_damaged_model_safetensors(model_dir, tmp_path, damage):
    d = _copy_model(model_dir, tmp_path)
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    how, why = _DAMAGE[damage]
    if damage == "truncated":
        data = data[: n // 2]
    elif damage == "header_length":
        data[:8] = struct.pack("<Q", 2**62)
    elif damage == "header_json":
        data[8] = ord("]")
    elif damage == "offsets":  # a tensor's offsets run past the end of the file
        def past(h):
            key = next(k for k in h if k != "__metadata__")
            h[key]["data_offsets"][1] += 10**9
        data = _rewrite_header(data, past)
    elif damage == "trailing":
        data += b"\0" * 16
    else:
        data = _rewrite_header(data, how)
    f.write_bytes(bytes(data))
    with pytest.raises(SafetensorsHeaderError, match=re.escape(why)):
        read_safetensors_header(f)
    line = _expect_refusal(tmp_path, d, "model.safetensors in ")
    assert "is not a valid safetensors file" in line and why in line and "re-export or re-download it" in line


def test_gguf_with_wrong_magic(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUX" + bytes(range(256)) * 4)
    _expect_refusal(tmp_path, f, "wrong magic")


def test_gguf_with_right_magic_and_garbage(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + struct.pack("<I", 3) + bytes(range(7, 250)) * 3)
    _expect_refusal(tmp_path, f, "GGUF")


@pytest.mark.parametrize("edit, match", [
    ({"hidden_size": -96}, "hidden_size=-96"),
    ({"num_hidden_layers": 10**12}, "num_hidden_layers=1000000000000"),
    ({"intermediate_size": 0}, "intermediate_size=0"),
    ({"vocab_size": 1.5}, "vocab_size=1.5"),
    ({"hidden_size": None}, "no hidden_size"),
])
def test_absurd_config(model_dir, tmp_path, edit, match):
    d = _copy_model(model_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    for k, v in edit.items():
        if v is None:
            del cfg[k]
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))
    _expect_refusal(tmp_path, d, match)


def test_config_not_json(model_dir, tmp_path):
    d = _copy_model(model_dir, tmp_path)
    (d / "config.json").write_bytes(b"\x89PNG\r\n\x1a\n")
    _expect_refusal(tmp_path, d, "config.json")


# ----------------------------------------------------------------------------- calibration / eval text


@pytest.mark.parametrize("content, match", [
    (b"", "holds no text"),
    (b"   \n\n  ", "holds no text"),
    (b"\x00\x01\x02binary\xff" * 50, "looks binary"),
    (b"caf\xe9 au lait " * 20, "not valid UTF-8"),
    (b"too short", "fewer than one window"),
])
def test_bad_eval_text(model_dir, tmp_path, content, match):
    f = tmp_path / "text.txt"
    f.write_bytes(content)
    code, text = _run("eval", "--model", model_dir, "--data", f, "--seqlen", "64", "--windows", "1")
    line = _last_line(text)
    assert code == 2 and match in line, text


def test_bad_calibration_text(tmp_path, tiny_tokenizer):
    from quantkit.calib.data import CalibDataError, calibration_set

    for content, match in [(b"", "holds no text"), (b"\x00" * 10, "looks binary"), (b"short text", "too few")]:
        f = tmp_path / "c.txt"
        f.write_bytes(content)
        with pytest.raises(CalibDataError, match=match):
            calibration_set(tiny_tokenizer, str(f), samples=4, seqlen=64)


def test_read_safetensors_header_accepts_real_files(ckpt):
    from safetensors import safe_open

    header = read_safetensors_header(ckpt / "model.safetensors")
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(header)
        k = sorted(header)[0]
        assert list(f.get_tensor(k).shape) == header[k]["shape"]
    with pytest.raises(SafetensorsHeaderError):
        read_safetensors_header(ckpt / "config.json")
    with pytest.raises(ManifestError):  # SafetensorsHeaderError is a ManifestError is a UsageError
        read_safetensors_header(ckpt / "tokenizer.json")


# ----------------------------------------------------------------------------- disk full / permissions


def test_disk_full_during_export_keeps_blocks_for_resume(model_dir, tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    real = safetensors.torch.save_file

    def full(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "out"
    code, text = _run("rtn", "--model", model_dir, "--out", out, "-g", "32")
    line = _last_line(text)
    assert code == 1 and "no space left on device" in line and "--resume" in line, text
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))  # no half-written output dir
    assert (tmp_path / "out.partial" / "state.json").is_file()

    monkeypatch.setattr(safetensors.torch, "save_file", real)  # space freed
    code, text = _run("rtn", "--model", model_dir, "--out", out, "-g", "32", "--resume")
    assert code == 0, text
    assert text.count("restored") == 3 and verify_checkpoint(out) == []
    assert not (tmp_path / "out.partial").exists()


def test_read_only_parent_is_refused_before_work(model_dir, tmp_path, monkeypatch):
    import os

    import quantkit.export.atomic as atomic

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):  # root ignores mode bits: make the check see what a user would
            real = os.access
            monkeypatch.setattr(atomic.os, "access", lambda p, m: False if str(p) == str(ro) else real(p, m))
        code, text = _run("rtn", "--model", model_dir, "--out", ro / "out", "-g", "32")
        line = _last_line(text)
        assert code == 1 and "permission denied" in line, text
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("edit, match", [
    ({"num_attention_heads": 10},
     "config.json is refused by transformers: The hidden size (96) is not a multiple of the number of attention "
     "heads (10); fix that field"),
    ({"num_key_value_heads": 4}, "field num_key_value_heads=4 does not divide num_attention_heads=6"),
    ({"hidden_act": "nope"}, "field hidden_act='nope' is not an activation transformers knows"),
    ({"max_position_embeddings": "long"}, "field max_position_embeddings='long' is not a sensible positive size"),
])
def test_config_values_transformers_rejects(model_dir, tmp_path, monkeypatch, edit, match):
    """Said with the field and the reason, before the model loads (not a validator's class name)."""
    import quantkit.api

    d = _copy_model(model_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(edit)
    (d / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(quantkit.api, "load", lambda *a, **k: pytest.fail("loaded before the config was checked"))
    line = _expect_refusal(tmp_path, d, match)
    assert "Error" not in line  # no exception class names
    code, text = _run("plan", "--model", d)  # the memory plan reads the same config
    assert code == 2 and match in _last_line(text)


def test_weights_that_contradict_the_config(model_dir, tmp_path):
    d = _copy_model(model_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 128  # the weights were saved with 160
    (d / "config.json").write_text(json.dumps(cfg))
    _expect_refusal(tmp_path, d, "do not match its config.json: model.layers.0.mlp.gate_proj.weight has shape "
                                 "[160, 96], the config implies [128, 96]")


# ----------------------------------------------------------------------------- a checkpoint without quantkit.json


def test_checkpoint_without_manifest_is_named_not_misread(ckpt, tmp_path, monkeypatch):
    """Not loaded through transformers as if it were float, nor failing deep inside it: one line saying
    what it is and how quantkit reads what it reads."""
    import quantkit.api

    d = tmp_path / "noman"
    shutil.copytree(ckpt, d)
    (d / "quantkit.json").unlink()
    said = (f"{d} is not a quantkit checkpoint (no quantkit.json), and its config.json says it is already "
            "quantized (compressed-tensors); quantkit reads float models and its own checkpoints")
    monkeypatch.setattr(quantkit.api, "load", lambda *a, **k: pytest.fail("loaded"))
    for args in (("rtn", "--model", d, "--out", tmp_path / "o", "-g", "32"), ("plan", "--model", d),
                 ("scan", "--model", d, "--out", tmp_path / "s.json", "--samples", "2", "--seqlen", "32")):
        code, text = _run(*args)
        assert code == 2 and said in _last_line(text), text
        assert "loading" not in text  # refused before the "loading ..." line, not after it
    monkeypatch.undo()
    code, text = _run("eval", "--model", d, "--seqlen", "32", "--windows", "1")  # through load_model
    assert code == 2 and said in _last_line(text), text
    code, text = _run("inspect", d, "--verify")
    assert code == 2 and "is not a quantkit checkpoint (no quantkit.json), so its files cannot be verified" \
        in _last_line(text)
    code, text = _run("inspect", d)  # the summary still reads, and says what it is not
    assert code == 0 and "not a quantkit checkpoint (no quantkit.json)" in text


def test_float_model_dir_says_how_it_is_read(model_dir, tmp_path):
    code, text = _run("rtn", "--model", model_dir, "--out", tmp_path / "o", "-g", "32")
    assert code == 0 and "(no quantkit.json: read as a float transformers model)" in text, text
