"""Every numeric option, dtype and output path of every command is checked before any work.

Each bad value: exit 2, one line `error: ...` naming the option, and the model is never loaded
(api.load fails the test if called). The tiny model's max_position_embeddings is 256.
"""

import os

import pytest

import quantkit.api
from quantkit import validate
from tiny_models import run_cli, save_tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    return save_tiny_model_dir(tmp_path_factory.mktemp("m") / "model", tiny_tokenizer, seed=2)


@pytest.fixture
def no_load(monkeypatch):
    monkeypatch.setattr(quantkit.api, "load", lambda *a, **k: pytest.fail("the model was loaded before the check"))


def _one_line(code, text, flag):
    lines = [l for l in text.strip().splitlines() if l.strip()]
    assert code == 2 and "Traceback" not in text, text
    assert lines[-1].startswith("error: ") and flag in lines[-1], text
    assert len(lines[-1]) < 400
    return lines[-1]


DATA = ("--samples", "2", "--seqlen", "32")  # what makes the method commands' shared options valid

CASES = [
    # shared options of every method command
    ("rtn", ("--samples", "0"), "--samples 0 must be at least 1"),
    ("rtn", ("--samples", "-5"), "--samples -5 must be at least 1"),
    ("rtn", ("--batch-size", "0"), "--batch-size 0 must be at least 1"),
    ("rtn", ("--seqlen", "1"), "--seqlen 1 must be at least 2"),
    ("awq", ("--seqlen", "4096"), "--seqlen 4096 must be between 2 and 256 (the model's max_position_embeddings)"),
    ("rtn", ("--windows", "-1"), "--windows -1 must be at least 0 (0 = every window of the text)"),
    ("rtn", ("--eval-seqlen", "1"), "--eval-seqlen 1 must be at least 2"),
    ("rtn", ("--eval", "--eval-seqlen", "100000"), "--eval-seqlen 100000 must be between 2 and 256"),
    ("rtn", ("--seed", "-1"), "--seed -1 must be between 0 and"),
    ("rtn", ("--dtype", "int8"), "--dtype 'int8' is not a float type quantkit computes in"),
    ("rtn", ("--dtype", "float64"), "--dtype 'float64' is not a float type"),
    ("rtn", ("--device", "tpu"), "--device 'tpu' is not one of cpu, cuda, cuda:N, auto"),
    ("rtn", ("-g", "0"), "group_size=0 must be a positive integer"),
    ("rtn", ("--bits", "5"), "bits=5 is not supported"),
    # per method
    ("awq", ("--awq-grid", "0"), "--awq-grid 0 must be between 1 and 1000"),
    ("awq", ("--clip-grid", "-1"), "--clip-grid -1 must be between 1 and 1000"),
    ("awq", ("--awq-grid", "1000000000"), "--awq-grid 1000000000 must be between 1 and 1000"),  # ran out of memory
    ("awq", ("--clip-grid", "1000000000"), "--clip-grid 1000000000 must be between 1 and 1000"),
    ("awq", ("--max-shrink", "1"), "--max-shrink 1 must be >= 0 and < 1"),
    ("awq", ("--max-shrink", "nan"), "--max-shrink nan must be a finite number"),
    ("awq", ("--search-samples", "-1"), "--search-samples -1 must be at least 0 (0 = every calibration window)"),
    ("awq", ("--group-size", "-1"), "--group-size -1 must be positive, or 0 for per-channel"),
    ("gptq", ("--damp", "0"), "--damp 0 must be > 0 and <= 1"),
    ("gptq", ("--damp", "inf"), "--damp inf must be a finite number"),
    ("gptq", ("--block-size", "0"), "--block-size 0 must be at least 1"),
    ("smoothquant", ("--alpha", "2"), "--alpha 2 must be >= 0 and <= 1 (or auto)"),
    ("smoothquant", ("--alpha", "x" * 5000), "--alpha 'xxxxxxxxxxxxxxxxxxx…"),
    ("smoothquant", ("--kv", "static", "--kv-tau", "inf"), "--kv-tau inf must be a finite number"),
    ("smoothquant", ("--kv", "static", "--kv-tau", "-1"), "--kv-tau -1 must be > 0"),
    ("spinquant", ("--iters", "0"), "--iters 0 must be at least 1"),
    ("spinquant", ("--train-batch", "0"), "--train-batch 0 must be at least 1"),
    ("spinquant", ("--lr", "inf"), "--lr inf must be a finite number"),
    ("spinquant", ("--lr", "-1"), "--lr -1 must be > 0"),
    ("spinquant", ("--train-samples", "0"), "--train-samples 0 must be at least 1"),
    ("spinquant", ("--train-seqlen", "1"), "--train-seqlen 1 must be at least 2"),
    ("spinquant", ("--train-seqlen", "100000", "--rotation", "learned"), "--train-seqlen 100000 must be between 2 and 256"),
    ("spinquant", ("--val-samples", "-1"), "--val-samples -1 must be at least 0"),
    ("spinquant", ("--val-every", "0"), "--val-every 0 must be at least 1"),
    ("spinquant", ("--group-size", "0"), "--group-size 0 must be at least 1"),
]


@pytest.mark.parametrize("cmd, args, said", CASES, ids=[f"{c}{' '.join(a)[:30]}" for c, a, _ in CASES])
def test_method_command_options(model_dir, tmp_path, no_load, cmd, args, said):
    shared = () if any(a in ("--samples", "--seqlen") for a in args) else DATA
    code, text = run_cli(cmd, "--model", model_dir, "--out", tmp_path / "o", *shared, *args)
    _one_line(code, text, said)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


SCAN_CASES = [
    (("--bins", "1"), "--bins 1 must be between 2 and 65536"),
    (("--bins", "100000000"), "--bins 100000000 must be between 2 and 65536"),
    (("--stat-tokens", "-1"), "--stat-tokens -1 must be at least 0"),
    (("--fisher-windows", "9"), "--fisher-windows 9 must be between 0 and 2"),
    (("--fisher-windows", "-1", "--target-fraction", "0.1"), "--fisher-windows -1 must be between 0 and 2"),
    (("--shortlist", "-1"), "--shortlist -1 must be at least 0"),
    (("--greedy", "0", "--target-fraction", "0.1"), "--greedy 0 must be at least 1"),
    (("--greedy", "4"), "--greedy chooses for --target-fraction; pass --target-fraction 0.10"),
    (("--kl", "nan"), "--kl nan must be a finite number"),
    (("--energy", "2"), "--energy 2 must be >= 0 and <= 1"),
    (("--target-fraction", "0"), "--target-fraction 0 must be > 0 and <= 1"),
    (("--windows", "-3"), "--windows -3 must be at least 0"),
    (("--seqlen", "4096"), "--seqlen 4096 must be between 2 and 256"),
    (("--target-fraction", "0.1", "--eval-seqlen", "4096"), "--eval-seqlen 4096 must be between 2 and 256"),
    (("--batch-size", "0"), "--batch-size 0 must be at least 1"),
    (("--group-size", "0"), "--group-size 0 must be at least 1"),
    (("--dtype", "int4"), "--dtype 'int4' is not a float type"),
]


@pytest.mark.parametrize("args, said", SCAN_CASES, ids=[" ".join(a)[:30] for a, _ in SCAN_CASES])
def test_scan_options(model_dir, tmp_path, no_load, args, said):
    shared = ("--samples", "2") + (() if "--seqlen" in args else ("--seqlen", "32"))
    code, text = run_cli("scan", "--model", model_dir, "--out", tmp_path / "s.json", *shared, *args)
    _one_line(code, text, said)
    assert list(tmp_path.iterdir()) == []


PLAN_CASES = [
    (("--samples", "0"), "--samples 0 must be at least 1"),
    (("--seqlen", "1"), "--seqlen 1 must be at least 2"),
    (("--method", "gptq", "--seqlen", "4096"), "--seqlen 4096 must be between 2 and 256"),
    (("--batch-size", "-1"), "--batch-size -1 must be at least 1"),
    (("--device-memory", "-2"), "--device-memory -2 must be > 0"),
    (("--device-memory", "nan"), "--device-memory nan must be a finite number"),
    (("--dtype", "int8"), "--dtype 'int8' is not a float type"),
]


@pytest.mark.parametrize("args, said", PLAN_CASES, ids=[" ".join(a)[:30] for a, _ in PLAN_CASES])
def test_plan_options(model_dir, args, said):
    code, text = run_cli("plan", "--model", model_dir, *args)
    _one_line(code, text, said)


# ----------------------------------------------------------------------------- output paths, before the run


def test_json_path_checked_before_the_run(model_dir, tmp_path, no_load):
    (tmp_path / "adir").mkdir()
    cases = [
        (tmp_path / "adir", "--json"),  # a directory
        (tmp_path / "o" / "summary.json", "is inside"),  # inside the checkpoint being written
        (tmp_path / "o.partial" / "summary.json", "is inside"),
    ]
    for path, said in cases:
        code, text = run_cli("rtn", "--model", model_dir, "--out", tmp_path / "o", "-g", "32", "--json", path)
        _one_line(code, text, said)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir"]


def test_unwritable_output_paths_are_refused_before_work(model_dir, tmp_path, monkeypatch, no_load):
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(validate.os, "access", lambda p, m: False if str(p).startswith(str(ro)) else real(p, m))
    for cmd, args, said in [
        ("rtn", ("--out", tmp_path / "o", "-g", "32", "--json", ro / "s.json"), "--json: cannot write to"),
        ("scan", ("--out", ro / "s.json", "--samples", "2", "--seqlen", "32"), "--out: cannot write to"),
        ("scan", ("--out", tmp_path / "s.json", "--report", ro / "rep", "--samples", "2", "--seqlen", "32"),
         "--report: cannot write to"),
        ("plan", ("--json", ro / "p.json"), "--json: cannot write to"),
    ]:
        code, text = run_cli(cmd, "--model", model_dir, *args)
        assert "permission denied" in _one_line(code, text, said)
    assert list(ro.iterdir()) == [] and not (tmp_path / "o").exists()


def test_json_is_written_whole_and_parents_made(model_dir, tmp_path):
    import json

    j = tmp_path / "reports" / "run.json"
    code, text = run_cli("rtn", "--model", model_dir, "--out", tmp_path / "o", "-g", "32", "--json", j)
    assert code == 0, text
    assert json.loads(j.read_text())["out"] == str(tmp_path / "o")
    assert [p.name for p in j.parent.iterdir()] == ["run.json"]  # no temp file left


# ----------------------------------------------------------------------------- --calib / --data paths


def test_calib_path_kinds(model_dir, tmp_path, no_load):
    (tmp_path / "texts").mkdir()
    for path, said in [
        (tmp_path / "texts", "is a directory; pass a .txt or .jsonl file inside it"),
        ("/dev/null", "is not a regular file (a device, pipe or socket)"),
        (tmp_path / "nope.txt", "does not exist"),
    ]:
        code, text = run_cli("awq", "--model", model_dir, "--out", tmp_path / "o", *DATA, "--calib", path)
        assert f"--calib {path}" in _one_line(code, text, said)


def test_calib_fifo_is_refused_without_blocking(model_dir, tmp_path, no_load):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)  # reading it would wait forever for a writer
    code, text = run_cli("gptq", "--model", model_dir, "--out", tmp_path / "o", *DATA, "--calib", fifo)
    _one_line(code, text, "is not a regular file")


def test_data_loader_names_directories_and_devices(tmp_path, tiny_tokenizer):
    """The library path (api.calibration_set / eval's --data) says the same, not 'does not exist'."""
    from quantkit.calib.data import CalibDataError, load_text

    with pytest.raises(CalibDataError, match="is a directory"):
        load_text(str(tmp_path), part="calib")
    with pytest.raises(CalibDataError, match="is not a regular file"):
        load_text("/dev/zero", part="eval")


# ----------------------------------------------------------------------------- quantkit eval's checks


@pytest.mark.parametrize("kw, said", [
    (dict(seqlen=1), "--seqlen 1 must be at least 2"),
    (dict(seqlen=100000), "--seqlen 100000 must be between 2 and 256"),
    (dict(windows=-1), "--windows -1 must be at least 0"),
    (dict(batch_size=0), "--batch-size 0 must be at least 1"),
    (dict(kv_tau=float("nan")), "--kv-tau nan must be a finite number"),
    (dict(calib_samples=0), "--calib-samples 0 must be at least 1"),
    (dict(dtype="int8"), "--dtype 'int8' is not a float type"),
    (dict(device="gpu"), "--device 'gpu' is not one of"),
    (dict(data="/dev/null"), "--data /dev/null is not a regular file"),
])
def test_eval_option_checks(model_dir, tmp_path, kw, said):
    """validate.check_eval_options: what `quantkit eval` calls before loading (see cli/evaluate.py)."""
    args = dict(seqlen=32, windows=4, batch_size=2, json_out=tmp_path / "e.json", models=[str(model_dir)])
    good = dict(args)
    validate.check_eval_options(**good)  # the same call with every value sensible passes
    args.update(kw)
    with pytest.raises(validate.OptionError) as ei:
        validate.check_eval_options(**args)
    assert said in str(ei.value)


@pytest.mark.parametrize("args", [
    ("plan", "--method", "{x}"), ("rtn", "--model", "{m}", "--out", "{o}", "--format", "{x}"),
    ("rtn", "--model", "{m}", "--out", "{o}", "--device", "{x}"), ("rtn", "--model", "{x}", "--out", "{o}"),
    ("spinquant", "--model", "{m}", "--out", "{o}", "--scheme", "{x}"), ("rtn", "--model", "{m}", "--out", "{x}"),
    ("rtn", "--model", "{m}", "--out", "{o}", "--json", "{x}"), ("quantize", "--recipe", "{x}", "--out", "{o}"),
    ("rtn", "--model", "{m}", "--out", "{o}", "--sensitive", "{x}"), ("scan", "--model", "{m}", "--out", "{x}"),
    ("awq", "--model", "{m}", "--out", "{o}", "-g", "32", "--calib", "{x}"),
], ids=lambda a: " ".join(a[:1] + a[-2:-1]))
def test_huge_values_are_never_echoed_whole(model_dir, tmp_path, no_load, args):
    x = "z" * 100_000  # also far past the longest file name: the path checks must not trip on it
    code, text = run_cli(*[a.format(x=x, m=model_dir, o=tmp_path / "o") for a in args])
    line = _one_line(code, text, "error: ")
    assert "…" in line and "Error:" not in line
