"""`quantkit quantize --recipe`, `quantkit awq`, `quantkit gptq` and --format awq|gptq through the CLI."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tiny_models import run_cli, save_tiny_model_dir
from quantkit.cli.app import app
from quantkit.cli.quantize import one_stage_recipe
from quantkit.methods.base import available_methods
from quantkit.recipe import QuantArgs

runner = CliRunner()

RTN_G32 = "version: 1\nscheme:\n  weights: {bits: 4, group_size: 32, symmetric: false}\nignore: [lm_head]\nstages:\n  - method: rtn\n"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama-r"), tiny_tokenizer, seed=12)


_run = run_cli


def _error_line(out: str) -> str:
    lines = [l for l in out.strip().splitlines() if l.strip()]
    assert lines and lines[-1].startswith("error:") and "Traceback" not in out, out
    return lines[-1]


def _modules(out):
    return json.loads((out / "quantkit.json").read_text())["modules"]


def test_quantize_recipe_json_and_rerun_from_checkpoint(tiny_dir, tmp_path):
    rf = tmp_path / "r.yaml"
    rf.write_text(RTN_G32)
    out, j = tmp_path / "a", tmp_path / "a.json"
    code, text = _run("quantize", "--recipe", rf, "--model", tiny_dir, "--out", out, "--json", j)
    assert code == 0, text
    summary = json.loads(j.read_text())
    assert summary["recipe"]["stages"] == [{"method": "rtn"}] and summary["format"] == "compressed-tensors"
    assert summary["recipe"]["scheme"]["weights"]["group_size"] == 32
    manifest = json.loads((out / "quantkit.json").read_text())
    assert manifest["recipe"] == summary["recipe"]
    # re-run from the checkpoint dir: identical tensors
    out2 = tmp_path / "b"
    code, text = _run("quantize", "--recipe", out, "--model", tiny_dir, "--out", out2)
    assert code == 0, text
    a, b = load_file(str(out / "model.safetensors")), load_file(str(out2 / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_options_override_recipe_only_when_given(tiny_dir, tmp_path):
    rf = tmp_path / "r.yaml"
    rf.write_text(RTN_G32)
    code, text = _run("quantize", "-r", rf, "--model", tiny_dir, "--out", tmp_path / "o1", "--bits", 8, "--sym")
    assert code == 0, text
    args = set(map(json.dumps, _modules(tmp_path / "o1").values()))
    assert args == {json.dumps(QuantArgs(8, 32, True).to_dict())}
    code, text = _run("quantize", "-r", rf, "--model", tiny_dir, "--out", tmp_path / "o2", "--group-size", 0)
    assert code == 0, text
    assert {json.dumps(v) for v in _modules(tmp_path / "o2").values()} == {json.dumps(QuantArgs(4, None, False).to_dict())}
    manifest = json.loads((tmp_path / "o2" / "quantkit.json").read_text())
    assert manifest["recipe"]["scheme"]["weights"]["group_size"] is None  # the recipe actually run is stored


@pytest.mark.parametrize(
    "text,needle",
    [
        ("scheme: W4A16\nstages: [{method: gtpq}]\n", "stages[0].method 'gtpq' is unknown; available:"),
        ("scheme: {weights: {bits: four}}\nstages: [rtn]\n", "bits must be an integer, got 'four'"),
        ("scheme: W4A16\nstages: [rtn\n", "YAML syntax error at line 3"),
        ("scheme: W5A16\nstages: [rtn]\n", "is not a preset"),
    ],
)
def test_bad_recipe_is_one_line_exit_2_nothing_written(tiny_dir, tmp_path, text, needle):
    rf = tmp_path / "bad.yaml"
    rf.write_text(text)
    out = tmp_path / "out"
    code, text_out = _run("quantize", "--recipe", rf, "--model", tiny_dir, "--out", out)
    assert code == 2
    assert needle in _error_line(text_out)
    assert not out.exists()


def test_format_refused_before_loading(tmp_path):
    rf = tmp_path / "r.yaml"
    rf.write_text(RTN_G32)
    # --model points nowhere: the format check must fail first, with its own message
    code, text = _run("quantize", "-r", rf, "--model", tmp_path / "nomodel", "--out", tmp_path / "o", "--format", "awq", "--bits", 8)
    assert code == 2 and "4-bit" in _error_line(text)
    code, text = _run("quantize", "-r", rf, "--model", tmp_path / "nomodel", "--out", tmp_path / "o", "--format", "exl2")
    assert code == 2 and "exl2" in _error_line(text)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("fmt,label", [("awq", "awq · gemm"), ("gptq", "gptq · gptq v1")])
def test_export_formats_and_inspect(tiny_dir, tmp_path, fmt, label):
    rf = tmp_path / "r.yaml"
    rf.write_text(RTN_G32.replace("symmetric: false", "symmetric: true"))
    out = tmp_path / fmt
    code, text = _run("quantize", "-r", rf, "--model", tiny_dir, "--out", out, "--format", fmt)
    assert code == 0, text
    code, text = _run("inspect", out, "--verify")
    assert code == 0, text
    assert label in text and "21 linears" in text and "matches" in text
    # our reader loads it back: eval works on the dir
    code, text = _run("eval", "--model", out, "--seqlen", 32, "--windows", 2)
    assert code == 0, text


def test_shorthand_recipes():
    r = one_stage_recipe("gptq", {"damp": 0.05}, None, None, None)
    assert r.scheme.weights == QuantArgs(4, 64, False) and r.stages[0].method == "gptq"
    assert r.stages[0].options == {"damp": 0.05}
    r = one_stage_recipe("awq", {}, 3, 0, True)
    assert r.scheme.weights == QuantArgs(3, None, True)


def test_shorthand_help_lists_method_options():
    def _run(*args):  # wide terminal: rich would otherwise wrap option names
        res = runner.invoke(app, list(args), env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
        return res.exit_code, res.output

    code, text = _run("awq", "--help")
    assert code == 0
    for opt in ("--awq-grid", "--awq-duo", "--no-clip", "--clip-grid", "--max-shrink", "--search-samples", "group 64"):
        assert opt in text, opt
    code, text = _run("gptq", "--help")
    for opt in ("--damp", "--block-size", "--act-order", "--no-true-sequential", "--gptaq", "group 64"):
        assert opt in text, opt


@pytest.mark.parametrize(
    "cmd,extra",
    [
        ("awq", ["--awq-grid", 4, "--clip-grid", 4, "--no-clip"]),
        ("gptq", ["--damp", 0.05, "--block-size", 32, "--act-order"]),
        ("gptq", ["--gptaq", 0.5]),
    ],
)
def test_shorthand_end_to_end(tiny_dir, tmp_path, cmd, extra):
    if cmd not in available_methods():
        pytest.skip(f"method {cmd} not registered in this branch")
    out = tmp_path / cmd
    code, text = _run(cmd, "--model", tiny_dir, "--out", out, "--group-size", 32, "--samples", 4, "--seqlen", 32, *extra)
    assert code == 0, text
    manifest = json.loads((out / "quantkit.json").read_text())
    stage = manifest["recipe"]["stages"][0]
    assert stage["method"] == cmd and len(stage) > 1
    if "--gptaq" in extra:
        assert stage["gptaq"] == 0.5
    # what GPTQ's "auto" options became is recorded, in the manifest, the summary and inspect's view
    resolved = manifest.get("resolved_options")
    if cmd == "gptq":
        auto = {"mse": "Hessian-weighted range search, p 2, 50 shrinks down to 0.5"}
        if "--gptaq" not in extra:
            auto["gptaq"] = 0.25  # weight-only W4
        assert resolved == [{"stage": 1, "method": "gptq", **auto}]
        assert "auto: mse=Hessian-weighted" in text and ("gptaq=0.25" in text) == ("--gptaq" not in extra)
        code, shown = _run("inspect", out)
        assert code == 0 and "stage 1 auto" in shown and "Hessian-weighted" in shown, shown
    else:
        assert resolved is None  # AWQ has no "auto" option
