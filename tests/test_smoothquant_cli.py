"""`quantkit smoothquant` and `quantkit eval --simulate-*` on a tiny model dir; the recipe files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantkit.recipe import PRESETS, Recipe
from tiny_models import run_cli, save_tiny_model_dir

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-sq"), tiny_tokenizer, seed=12)


_run = run_cli


def test_smoothquant_w8a8c8_static_residual_then_eval(tiny_dir, tmp_path):
    out, j = tmp_path / "ckpt", tmp_path / "run.json"
    code, text = _run(
        "smoothquant", "--model", tiny_dir, "--out", out, "--samples", 4, "--seqlen", 32, "--batch-size", 2,
        "--act", "static", "--kv", "static", "--kv-residual", "--kv-format", "fp8",
        "--eval", "--windows", 2, "--eval-seqlen", 32, "--json", j,
    )
    assert code == 0, text
    s = json.loads(j.read_text())
    assert s["quantized_linears"] == 21 and "A8 per-tensor static" in s["scheme"]
    assert 0 <= s["kv_cache"]["patched_fraction"] < 0.5
    manifest = json.loads((out / "quantkit.json").read_text())
    assert manifest["kv_format"] == "fp8" and manifest["kv_scales_file"]
    # eval reads the checkpoint's scheme and static scales and simulates them
    j2 = tmp_path / "eval.json"
    code, text = _run("eval", "--model", out, "--baseline", tiny_dir, "--seqlen", 32, "--windows", 2, "--json", j2)
    assert code == 0, text
    rows = json.loads(j2.read_text())["rows"]
    assert rows[0]["simulated"] == "none"
    assert "A8 per-tensor static" in rows[1]["simulated"] and "KV8 per-channel static +r4" in rows[1]["simulated"]
    assert rows[1]["kv_tokens"] > 0
    # the same windows scored in the run and in eval give the same perplexity (same simulation)
    assert rows[1]["ppl"] == pytest.approx(s["quantized"]["ppl"], rel=1e-4)
    # turning the simulation off changes the score
    j3 = tmp_path / "eval3.json"
    code, _ = _run("eval", "--model", out, "--seqlen", 32, "--windows", 2, "--simulate-act", "none",
                   "--simulate-kv", "none", "--json", j3)
    assert code == 0
    assert json.loads(j3.read_text())["rows"][0]["ppl"] != pytest.approx(rows[1]["ppl"], rel=1e-6)


def test_eval_simulates_a_plain_model_on_request(tiny_dir, tmp_path):
    j = tmp_path / "e.json"
    code, text = _run("eval", "--model", tiny_dir, "--seqlen", 32, "--windows", 2, "--simulate-act", "token",
                      "--simulate-kv", "int8-static-residual", "--calib-samples", 4, "--json", j)
    assert code == 0, text
    row = json.loads(j.read_text())["rows"][0]
    assert row["simulated"].startswith("A8 per-token dynamic, KV8 per-channel static +r4")


@pytest.mark.parametrize(
    "args,msg",
    [
        (("--kv-residual",), "--kv static"),
        (("--alpha", "much"), "--alpha"),
        (("--act", "weird"), "--act"),
        (("--kv", "static", "--kv-format", "fp4"), "--kv-format"),
    ],
)
def test_usage_errors(tiny_dir, tmp_path, args, msg):
    code, text = _run("smoothquant", "--model", tiny_dir, "--out", tmp_path / "x", *args)
    assert code == 2, text
    assert msg in text.strip().splitlines()[-1] and "Traceback" not in text


def test_eval_bad_simulate_mode(tiny_dir):
    code, text = _run("eval", "--model", tiny_dir, "--seqlen", 32, "--simulate-kv", "int4")
    assert code == 2 and "--simulate-kv" in text


def test_recipe_files_parse():
    yaml = pytest.importorskip("yaml")
    from quantkit.methods.base import get_method

    recs = {}
    for name in ("w8a8-smoothquant", "w8a8-smoothquant-gptq", "w8a8c8"):
        d = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
        if isinstance(d["scheme"], str):  # a preset name: the recipes loader resolves it
            d = {**d, "scheme": PRESETS[d["scheme"]].to_dict()}
        recs[name] = Recipe.from_dict(d)
    assert recs["w8a8-smoothquant"].scheme == PRESETS["W8A8"]
    assert recs["w8a8-smoothquant-gptq"].scheme == PRESETS["W8A8"]
    assert [s.method for s in recs["w8a8-smoothquant-gptq"].stages] == ["smoothquant", "gptq"]
    kv = recs["w8a8c8"].scheme.kv_cache
    assert kv.strategy == "channel" and kv.residual_bits == 4 and kv.residual_tau == 3.0
    for r in recs.values():
        get_method("smoothquant")(r.scheme, **r.stages[0].options)  # options are valid
