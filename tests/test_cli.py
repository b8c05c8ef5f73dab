"""The `quantkit` CLI: success paths on a tiny model dir and every usage-error path."""

import json
import subprocess
import sys
import time

import pytest
import torch

from tiny_models import run_cli, save_tiny_model_dir



@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), tiny_tokenizer, seed=11)


_run = run_cli


def _one_line_error(out: str) -> str:
    lines = [l for l in out.strip().splitlines() if l.strip()]
    assert lines and lines[-1].startswith("error:"), out
    assert "Traceback" not in out
    return lines[-1]


def test_help_is_fast_and_lazy():
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "quantkit", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "rtn" in r.stdout and "eval" in r.stdout
    assert time.perf_counter() - t < 5  # generous for a loaded CI box; ~0.3 s here
    r = subprocess.run(
        [sys.executable, "-c", "import sys, quantkit.cli.app; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
    )
    assert r.stdout.strip() == "False"


def test_rtn_export_inspect_verify(tiny_dir, tmp_path):
    out = tmp_path / "ckpt"
    code, text = _run("rtn", "--model", tiny_dir, "--out", out, "--bits", "4", "--group-size", "32", "--asym")
    assert code == 0, text
    assert (out / "config.json").is_file() and (out / "quantkit.json").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    manifest = json.loads((out / "quantkit.json").read_text())
    assert len(manifest["modules"]) == 21
    assert manifest["recipe"]["stages"] == [{"method": "rtn"}]
    code, text = _run("inspect", out, "--verify")
    assert code == 0, text
    assert "matches" in text
    # tamper with one byte: verify must fail and name the file
    st = next(out.glob("*.safetensors"))
    data = bytearray(st.read_bytes())
    data[-1] ^= 0xFF
    st.write_bytes(bytes(data))
    code, text = _run("inspect", out, "--verify")
    assert code == 1 and st.name in text


def test_eval_scores_model_and_baseline(tiny_dir, tmp_path):
    j = tmp_path / "e.json"
    code, text = _run(
        "eval", "--model", tiny_dir, "--baseline", tiny_dir, "--seqlen", 32, "--windows", 3, "--json", j
    )
    assert code == 0, text
    res = json.loads(j.read_text())
    assert [r["role"] for r in res["rows"]] == ["baseline", "model"]
    assert res["rows"][0]["tokens"] == 3 * 31
    # same model, same windows: identical perplexity
    assert res["rows"][1]["ratio_to_baseline"] == pytest.approx(1.0, abs=1e-9)


def test_error_missing_model(tmp_path):
    code, text = _run("rtn", "--model", tmp_path / "nope", "--out", tmp_path / "o")
    assert code == 2
    assert "does not exist" in _one_line_error(text)
    assert not (tmp_path / "o").exists()


def test_error_pickle_only_dir(tmp_path, tiny_dir):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text((tiny_dir / "config.json").read_text())
    torch.save({"w": torch.zeros(1)}, d / "pytorch_model.bin")
    code, text = _run("rtn", "--model", d, "--out", tmp_path / "o")
    assert code == 2
    line = _one_line_error(text)
    assert "pickle" in line and "safetensors" in line


def test_error_bad_group_size(tiny_dir, tmp_path):
    code, text = _run("rtn", "--model", tiny_dir, "--out", tmp_path / "o", "--group-size", "64")
    assert code == 2
    line = _one_line_error(text)
    assert "does not divide" in line and "--group-size 32" in line
    assert not (tmp_path / "o").exists()


def test_error_output_exists(tiny_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, text = _run("rtn", "--model", tiny_dir, "--out", out)
    assert code == 2 and "--overwrite" in _one_line_error(text)
    assert (out / "keep.txt").read_text() == "precious"


def test_error_too_little_text(tiny_dir, tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("tiny text")
    code, text = _run("eval", "--model", tiny_dir, "--data", f, "--seqlen", 64)
    assert code == 2 and "fewer than one window" in _one_line_error(text)


def test_error_bad_bits_and_device(tiny_dir, tmp_path):
    code, text = _run("rtn", "--model", tiny_dir, "--out", tmp_path / "o", "--bits", "5")
    assert code == 2 and "bits=5" in _one_line_error(text)
    code, text = _run("rtn", "--model", tiny_dir, "--out", tmp_path / "o", "--device", "tpu")
    assert code == 2 and "--device" in _one_line_error(text)
