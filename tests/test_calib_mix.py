"""Built-in texts: builtin:pydoc is today's builtin bit for bit, builtin:mix is seeded and drawn from texts
that no held-out text (builtin:pydoc/code/prose) contains, and each text is refused in the wrong role."""

import pytest
import torch

from quantkit.calib import data as D
from quantkit.calib.data import CalibDataError, calibration_set, heldout_windows, load_text, mix_counts
from tiny_models import run_cli


def test_builtin_pydoc_is_builtin(tiny_tokenizer):
    a = calibration_set(tiny_tokenizer, None, samples=5, seqlen=32, seed=3)
    b = calibration_set(tiny_tokenizer, "builtin:pydoc", samples=5, seqlen=32, seed=3)
    assert torch.equal(a.input_ids, b.input_ids) and a.settings == b.settings
    assert torch.equal(heldout_windows(tiny_tokenizer, 32, 4), heldout_windows(tiny_tokenizer, 32, 4, spec="builtin:pydoc"))


def test_heldout_texts_are_other_kinds(tiny_tokenizer):
    code = load_text("builtin:code", part="eval")
    prose = load_text("builtin:prose", part="eval")
    assert "def " in code and "import " in code
    assert "pip install" in prose and "transformers" in prose.lower()
    w = heldout_windows(tiny_tokenizer, 32, 3, spec="builtin:code")
    ids = D.tokenize(tiny_tokenizer, code)
    assert torch.equal(w, ids[:96].view(3, 32))


@pytest.mark.parametrize("line,markup", [
    ("![PyTorch Logo](https://github.com/pytorch/pytorch/raw/main/logo.png)", True),
    ("[![PyPI](https://img.shields.io/pypi/v/rich)](https://pypi.org/project/rich/) [![b](x)](y)", True),
    ('<p align="center">', True), ("  <img src='a.png' width=60/>  ", True), ("----------", True),
    ("PyTorch is a Python package that provides ![an image](x) inline", False),
    ("- [Intel GPU Support](#intel-gpu-support)", False), ("---- a heading rule with words", False),
])
def test_prose_drops_lines_that_are_only_markup(line, markup):
    # Such a line opening a window broke the float model itself (no attention sink; see readme_text).
    assert bool(D._MARKUP_ONLY.match(line)) is markup


def test_prose_text_has_no_markup_only_line():
    prose = load_text("builtin:prose", part="eval")
    assert not any(D._MARKUP_ONLY.match(ln) for ln in prose.splitlines())
    assert prose.startswith("PyTorch is a Python package")  # torch's README, after its logo line and rule


def test_heldout_sets_are_the_builtin_texts(tiny_tokenizer):
    sets = D.heldout_sets(tiny_tokenizer, 16, 2)
    assert list(sets) == ["pydoc", "code", "prose"]
    for name, w in sets.items():
        assert torch.equal(w, heldout_windows(tiny_tokenizer, 16, 2, spec=f"builtin:{name}"))
    with pytest.raises(CalibDataError, match="choose from pydoc, code, prose"):
        D.heldout_sets(tiny_tokenizer, 16, 2, ["mix"])


def test_mix_is_seeded_and_every_window_is_from_its_kind(tiny_tokenizer):
    a = calibration_set(tiny_tokenizer, "builtin:mix", samples=10, seqlen=24, seed=1)
    b = calibration_set(tiny_tokenizer, "builtin:mix", samples=10, seqlen=24, seed=1)
    c = calibration_set(tiny_tokenizer, "builtin:mix", samples=10, seqlen=24, seed=2)
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)
    assert a.input_ids.shape == (10, 24) and a.settings["source"] == "builtin:mix"
    want = mix_counts(10)
    assert want == {"pydoc": 6, "code": 2, "prose": 2}  # floors of 5, 2.5, 2.5; the rest to pydoc
    assert {k: v["samples"] for k, v in a.settings["mix"].items()} == want
    streams = {k: " " + " ".join(map(str, D.tokenize(tiny_tokenizer, f()).tolist())) + " " for k, f in D.MIX.items()}
    found = {k: 0 for k in streams}
    for row in a.input_ids.tolist():
        s = " " + " ".join(map(str, row)) + " "
        kinds = [k for k, st in streams.items() if s in st]
        assert kinds, "a mix window is not a slice of any mix text"
        found[kinds[0]] += 1
    assert found == want
    # shuffled: the first windows (AWQ's search_samples) are not all pydoc
    first = [next(k for k, st in streams.items() if (" " + " ".join(map(str, r)) + " ") in st)
             for r in a.input_ids[:5].tolist()]
    assert set(first) != {"pydoc"}


def test_mix_counts_sum_and_weights():
    for n in (1, 2, 3, 7, 64, 128, 129):
        c = mix_counts(n)
        assert sum(c.values()) == n and all(v >= 0 for v in c.values())
        for k, w in D.MIX_WEIGHTS.items():
            assert abs(c[k] - n * w) < len(D.MIX_WEIGHTS)


def test_calibration_and_heldout_never_share_text():
    assert not set(D.MIX_CODE_MODULES) & set(D.CODE_MODULES)
    assert not set(D.MIX_PROSE_PACKAGES) & set(D.PROSE_PACKAGES)

    def lines(t):  # long lines only: short ones ("    return x") repeat in any code
        return {ln.strip() for ln in t.splitlines() if len(ln.strip()) >= 80}

    held = set().union(*(lines(f()) for _, f in D.HELDOUT.values()))
    for kind in ("code", "prose"):
        assert not lines(D.MIX[kind]()) & held, kind
    # pydoc: the two halves of one text (as before); the halves themselves do not overlap
    assert D.builtin_text("calib") + D.builtin_text("eval") == D.builtin_text("calib") + D.HELDOUT["pydoc"][1]()


@pytest.mark.parametrize("spec, part, match", [
    ("builtin:code", "calib", "held-out text, never calibration"),
    ("builtin:prose", "calib", "held-out text, never calibration"),
    ("builtin:mix", "eval", "calibration text only"),
    ("builtin:nope", "calib", "builtin:pydoc, builtin:mix"),
    ("builtin:", "eval", "builtin:pydoc, builtin:code, builtin:prose"),
])
def test_wrong_role_or_unknown_builtin_is_refused(tiny_tokenizer, spec, part, match):
    with pytest.raises(CalibDataError, match=match):
        load_text(spec, part=part)
    if part == "calib":
        with pytest.raises(CalibDataError, match=match):
            calibration_set(tiny_tokenizer, spec, samples=2, seqlen=16)


def test_cli_refuses_heldout_text_for_calibration(tmp_path):
    code, out = run_cli("gptq", "--out", tmp_path / "o", "--calib", "builtin:code")
    assert code == 2 and "held-out text, never calibration" in out and "Traceback" not in out
    code, out = run_cli("eval", "--data", "builtin:mix")
    assert code == 2 and "calibration text only" in out and "Traceback" not in out


def test_scan_selection_windows_of_the_mix_keep_its_weights(tiny_tokenizer):
    """`scan --calib builtin:mix` chooses on windows in the mix's proportions (not in proportion to each text's
    length, where stdlib code would dominate), each kind's spread evenly over its own text, kinds in order."""
    seqlen = 24
    w = D.calibration_windows(tiny_tokenizer, seqlen, 8, spec="builtin:mix")
    assert w.shape == (8, seqlen)
    counts = mix_counts(8)
    assert counts == {"pydoc": 4, "code": 2, "prose": 2}
    start = 0
    for kind, c in counts.items():
        ids = D.tokenize(tiny_tokenizer, D.MIX[kind]())
        avail = ids.numel() // seqlen
        expect = ids[: avail * seqlen].view(avail, seqlen)[[i * avail // c for i in range(c)]]
        assert torch.equal(w[start : start + c], expect), kind
        start += c
    # all: as many as the scarcest kind's share allows, the same weights
    every = D.calibration_windows(tiny_tokenizer, seqlen, None, spec="builtin:mix")
    n = every.shape[0]
    avail = {k: D.tokenize(tiny_tokenizer, f()).numel() // seqlen for k, f in D.MIX.items()}
    assert all(c <= avail[k] for k, c in mix_counts(n).items())
    assert any(c > avail[k] for k, c in mix_counts(n + 1).items())  # one more would overdraw a kind
    with pytest.raises(CalibDataError, match="fewer than one window"):
        D.calibration_windows(tiny_tokenizer, 10**7, 4, spec="builtin:mix")
