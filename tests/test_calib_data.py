"""Calibration and held-out text: sources, determinism, clear errors."""

import json

import pytest
import torch

from quantkit.calib.data import CalibDataError, builtin_text, calibration_set, heldout_windows, load_text


def test_builtin_halves_split_the_reference_text():
    import pydoc_data.topics as topics

    a, b = builtin_text("calib"), builtin_text("eval")
    assert a + b == "\n\n".join(topics.topics.values())
    assert abs(len(a) - len(b)) <= 1


def test_calibration_is_deterministic_and_seeded(tiny_tokenizer):
    a = calibration_set(tiny_tokenizer, samples=6, seqlen=32, seed=1)
    b = calibration_set(tiny_tokenizer, samples=6, seqlen=32, seed=1)
    c = calibration_set(tiny_tokenizer, samples=6, seqlen=32, seed=2)
    assert a.input_ids.shape == (6, 32) and a.input_ids.dtype == torch.long
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)
    assert len({tuple(r.tolist()) for r in a.input_ids}) == 6  # distinct windows
    assert a.settings["samples"] == 6 and a.settings["seed"] == 1 and a.settings["source"] == "builtin"


def test_heldout_windows_are_the_first_consecutive_ones(tiny_tokenizer):
    w = heldout_windows(tiny_tokenizer, seqlen=16, n_windows=3)
    ids = tiny_tokenizer(builtin_text("eval"), add_special_tokens=False)["input_ids"]
    assert w.tolist() == [ids[0:16], ids[16:32], ids[32:48]]
    calib = calibration_set(tiny_tokenizer, samples=4, seqlen=16)
    held = {tuple(r) for r in heldout_windows(tiny_tokenizer, seqlen=16).tolist()}
    assert not any(tuple(r) in held for r in calib.input_ids.tolist())


def test_too_little_text_names_the_numbers(tmp_path, tiny_tokenizer):
    f = tmp_path / "short.txt"
    f.write_text("def f(x):\n    return x + 1\n" * 3)
    n_tokens = len(tiny_tokenizer(f.read_text(), add_special_tokens=False)["input_ids"])
    with pytest.raises(CalibDataError) as e:
        calibration_set(tiny_tokenizer, str(f), samples=8, seqlen=n_tokens)
    msg = str(e.value)
    assert f"{n_tokens} tokens" in msg and f"8 distinct windows of {n_tokens}" in msg and "--samples 1" in msg


def test_more_windows_than_the_text_holds_overlap_but_stay_distinct(tmp_path, tiny_tokenizer):
    f = tmp_path / "short.txt"
    f.write_text("def f(x):\n    return x + 1\n" * 20)
    n_tokens = len(tiny_tokenizer(f.read_text(), add_special_tokens=False)["input_ids"])
    seqlen = 16
    samples = n_tokens // seqlen + 5  # more than fit side by side
    cs = calibration_set(tiny_tokenizer, str(f), samples=samples, seqlen=seqlen, seed=3)
    assert cs.input_ids.shape == (samples, seqlen)
    assert cs.settings["overlapping_windows"] is True
    again = calibration_set(tiny_tokenizer, str(f), samples=samples, seqlen=seqlen, seed=3)
    assert torch.equal(cs.input_ids, again.input_ids)
    ids = tiny_tokenizer(f.read_text(), add_special_tokens=False)["input_ids"]
    text = " ".join(map(str, ids))
    for row in cs.input_ids.tolist():  # every window is a real slice of the text
        assert " ".join(map(str, row)) in text


def test_jsonl_and_field(tmp_path, tiny_tokenizer):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"body": f"line {i} " * 40}) for i in range(20)))
    assert load_text(str(f), part="calib", field="body").startswith("line 0")
    with pytest.raises(CalibDataError, match="no string field 'text'"):
        load_text(str(f), part="calib")
    s = calibration_set(tiny_tokenizer, str(f), samples=2, seqlen=16, field="body")
    assert s.input_ids.shape == (2, 16)


@pytest.mark.parametrize(
    "content, match",
    [(b"\x00\x01\x02binary", "binary"), (b"\xff\xfe\xfa not utf8", "UTF-8"), (b"   \n ", "no text")],
)
def test_bad_files(tmp_path, content, match):
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    with pytest.raises(CalibDataError, match=match):
        load_text(str(f), part="calib")


def test_missing_file_and_bad_hf_spec():
    with pytest.raises(CalibDataError, match="does not exist"):
        load_text("/nonexistent/file.txt", part="calib")
    with pytest.raises(CalibDataError, match="hf:NAME"):
        load_text("hf:", part="calib")


def test_text_overlap_is_the_share_of_window_text_found_in_the_samples():
    import torch

    from quantkit.calib.data import text_overlap

    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, 5000, (1, 4096), generator=g)
    windows = text[:, :2048].view(4, 512)
    assert text_overlap(windows, windows) == 1.0
    assert text_overlap(windows, torch.randint(0, 5000, (4, 512), generator=g)) == 0.0
    # samples = tokens 1024..3071 in rows of 512: the windows' 2nd half, minus the runs crossing a row edge
    share = text_overlap(windows, text[:, 1024:3072].view(4, 512))
    runs_per_window = 512 - 16 + 1
    assert share == (2 * runs_per_window) / (4 * runs_per_window)
    assert text_overlap(windows[:, :8], windows) == 0.0  # windows shorter than a run: nothing to compare
