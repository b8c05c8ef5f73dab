"""Recipe files: parsing, validation errors (one RecipeError each), round trips, and
every shipped recipes/*.yaml run end to end on a tiny model."""

import json
from pathlib import Path

import pytest
import torch

from tiny_models import make_tiny_model
from quantkit import api
from quantkit.errors import UsageError
from quantkit.methods.base import available_methods, load_recipe
from quantkit.models.loading import LoadedModel
from quantkit.recipe import (
    PRESETS,
    ActQuantArgs,
    KVCacheArgs,
    QuantArgs,
    Recipe,
    RecipeError,
    Scheme,
    Stage,
    dump_recipe,
    recipe_from_dict,
)

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def _write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


GOOD = """\
version: 1
scheme:
  weights: {bits: 4, group_size: 64, symmetric: false}
  input_activations: {bits: 8, strategy: token, dynamic: true}
  kv_cache: {bits: 8, strategy: channel, dynamic: false, residual_bits: 4, residual_tau: 2.5}
ignore: [lm_head, "re:.*down_proj"]
stages:
  - method: rtn
"""


def test_load_full_recipe(tmp_path):
    r = load_recipe(_write(tmp_path, GOOD))
    assert r.scheme == Scheme(
        QuantArgs(4, 64, False), ActQuantArgs(8, "token", True), KVCacheArgs(8, "channel", False, True, 4, 2.5)
    )
    assert r.ignore == ("lm_head", "re:.*down_proj") and r.stages == (Stage("rtn"),) and r.version == 1


@pytest.mark.parametrize(
    "recipe",
    [
        Recipe(Scheme(QuantArgs(3, 64, False)), (Stage("awq", {"grid": 10, "clip": False}), Stage("gptq", {"damp": 0.1}))),
        Recipe(PRESETS["W8A8C8"], (Stage("rtn"),), ignore=()),
        Recipe(Scheme(QuantArgs(8, None, True), None, KVCacheArgs(4, "token", True, True, 8, 3.0)), (Stage("rtn"),)),
    ],
)
def test_dump_load_round_trip(tmp_path, recipe):
    text = dump_recipe(recipe)
    assert load_recipe(_write(tmp_path, text), check=False) == recipe
    # to_dict (what the manifest stores) reads back too, derived keys included
    assert recipe_from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_preset_scheme_and_stage_shorthand(tmp_path):
    r = load_recipe(_write(tmp_path, "scheme: W8A16\nstages: [rtn]\n"))
    assert r.scheme == PRESETS["W8A16"] and r.stages == (Stage("rtn"),) and r.ignore == ("lm_head",)


@pytest.mark.parametrize(
    "text,match",
    [
        ("version: 1\nscheme: W8A16\nstages: [rtn]\nstage: []\n", r"recipe has unknown key 'stage'; allowed: version, scheme, ignore, stages"),
        ("scheme: {weights: {bits: 4}, activations: {bits: 8}}\nstages: [rtn]\n", r"scheme has unknown key 'activations'; allowed: weights"),
        ("scheme: {weights: {bits: 4, groupsize: 64}}\nstages: [rtn]\n", r"scheme.weights has unknown key 'groupsize'; allowed: bits, group_size"),
        ("scheme: {weights: {bits: four}}\nstages: [rtn]\n", r"scheme.weights.bits must be an integer, got 'four'"),
        ("scheme: {weights: {bits: 4, symmetric: 'yes'}}\nstages: [rtn]\n", r"scheme.weights.symmetric must be true or false, got 'yes'"),
        ("scheme: {weights: {bits: 5}}\nstages: [rtn]\n", r"scheme.weights: bits=5 is not supported; use one of 2, 3, 4, 8"),
        ("scheme: {weights: {bits: 4}, kv_cache: {bits: 8, residual_tau: fast}}\nstages: [rtn]\n", r"scheme.kv_cache.residual_tau must be a number"),
        ("scheme: {weights: {bits: 8}, input_activations: {bits: 8, strategy: row}}\nstages: [rtn]\n", r"scheme.input_activations: activation strategy 'row'"),
        ("scheme: W5A16\nstages: [rtn]\n", r"scheme 'W5A16' is not a preset; presets: W8A16, W4A16, W8A8, W8A8C8, W4A4KV4"),
        ("scheme: W4A16\nstages: [rtn, {method: gtpq}]\n", r"stages\[1\].method 'gtpq' is unknown; available: .*rtn"),
        ("scheme: W4A16\nstages: [{method: rtn, damp: 0.1}]\n", r"stages\[0\] \(rtn\): method 'rtn' has no option\(s\) \['damp'\]"),
        ("scheme: W4A16\nstages: [{damp: 0.1}]\n", r"stages\[0\] has no 'method' key"),
        ("version: 2\nscheme: W4A16\nstages: [rtn]\n", r"recipe version 2 is not supported; this quantkit reads version 1 \(upgrade quantkit\)"),
        ("version: one\nscheme: W4A16\nstages: [rtn]\n", r"version must be an integer, got 'one'"),
        ("scheme: W4A16\nstages: []\n", r"stages is empty; add at least one stage"),
        ("scheme: W4A16\n", r"recipe has no 'stages'"),
        ("stages: [rtn]\n", r"recipe has no 'scheme'"),
        ("scheme: W4A16\nignore: lm_head\nstages: [rtn]\n", r"ignore must be a list"),
        ("scheme: W4A16\nstages: [rtn\n", r"YAML syntax error at line 3"),
        ("scheme: W4A16\n  bad: indent\nstages: [rtn]\n", r"YAML syntax error at line 2"),
        ("- just\n- a list\n", r"recipe must be a mapping"),
        ("", r"is empty"),
    ],
)
def test_invalid_recipes_name_key_and_fix(tmp_path, text, match):
    p = _write(tmp_path, text)
    with pytest.raises(RecipeError, match=match) as e:
        load_recipe(p)
    assert isinstance(e.value, UsageError)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(p))


def test_missing_file_and_dir_without_manifest(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="without quantkit.json"):
        load_recipe(tmp_path)


def _tiny_loaded(tokenizer, seed=5, layers=2):
    # hidden 128 / intermediate 256: group 64 (the shipped recipes) divides every in_features;
    # few layers keep the AWQ grid searches of the shipped recipes quick.
    model = make_tiny_model(
        "llama", seed=seed, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_hidden_layers=layers
    )
    return LoadedModel(model, tokenizer, {"kind": "test"})


def test_recipe_from_checkpoint_dir_reruns_identically(tmp_path, tiny_tokenizer):
    r = load_recipe(_write(tmp_path, "scheme:\n  weights: {bits: 4, group_size: 32, symmetric: false}\nignore: [lm_head, re:.*\\.0\\.mlp\\.down_proj]\nstages: [rtn]\n"))
    qm = api.quantize(_tiny_loaded(tiny_tokenizer), r)
    out = api.export(qm, tmp_path / "ckpt")
    for src in (out, out / "quantkit.json"):
        again = load_recipe(src)
        assert again == r
    qm2 = api.quantize(_tiny_loaded(tiny_tokenizer), load_recipe(out))
    assert qm2.modules.keys() == qm.modules.keys() and "model.layers.0.mlp.down_proj" not in qm.modules
    for k in qm.modules:
        assert torch.equal(qm.modules[k].q, qm2.modules[k].q) and torch.equal(qm.modules[k].scale, qm2.modules[k].scale)


def test_shipped_recipes_exist():
    names = {p.name for p in RECIPES}
    for n in ("w4a16-awq.yaml", "w4a16-gptq.yaml", "w4a16-awq-gptq.yaml", "w3a16-awq-gptq.yaml", "w3a16-gptq.yaml",
              "w8a16-gptq.yaml"):
        assert n in names


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_end_to_end(path, tmp_path, tiny_tokenizer):
    recipe = load_recipe(path, check=False)
    missing = sorted({s.method for s in recipe.stages} - set(available_methods()))
    if missing:
        pytest.skip(f"method(s) {', '.join(missing)} not registered in this branch")
    load_recipe(path)  # options validated by the methods themselves
    loaded = _tiny_loaded(tiny_tokenizer, layers=1)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    qm = api.quantize(loaded, recipe, api.CalibConfig(samples=2, seqlen=32, batch_size=2))
    assert len(qm.modules) == 7  # every linear but lm_head
    changed = [k for k in qm.modules if not torch.equal(loaded.model.get_submodule(k).weight, before[f"{k}.weight"])]
    assert len(changed) == 7
    out = api.export(qm, tmp_path / "ckpt")
    manifest = json.loads((out / "quantkit.json").read_text())
    assert load_recipe(out) == recipe and manifest["recipe"] == recipe.to_dict()
    from quantkit.models.checkpoint import load_quantkit_checkpoint

    model, _, _ = load_quantkit_checkpoint(out)
    for k, v in qm.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
