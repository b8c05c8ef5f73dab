"""Mixed-precision export from sensitive_layers.json (round trip through transformers), and the CLI."""

import json
import warnings

import pytest
import torch

from tiny_models import make_tiny_model, run_cli, save_tiny_model_dir
from quantkit import api
from quantkit.export.compressed_tensors import SHADOW_FILE
from quantkit.export.summary import read_checkpoint_summary
from quantkit.export.manifest import verify_checkpoint
from quantkit.models.loading import LoadedModel
from quantkit.quant.core import quantize_weight
from quantkit.quant.pack import unpack_int32
from quantkit.recipe import PRESETS, QuantArgs, Recipe, Scheme, Stage
from quantkit.sensitivity.io import save_sensitive_layers
from quantkit.sensitivity.run import run_scan
from quantkit.sensitivity.scan import Thresholds

ARGS = QuantArgs(4, 32, True)
FLAG = ["model.layers.1.self_attn.k_proj", "model.layers.2.mlp.down_proj"]
FP16 = ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj",
        "model.layers.2.mlp.down_proj"]


def _sensitive_file(model, path, scheme):
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    rep = run_scan(model, ids, scheme, thresholds=Thresholds(None, None, None), batch_size=2, bins=16)
    for e in rep.layers:
        e.flag = "fp16" if e.name in FLAG else "int4"
    return save_sensitive_layers(rep, path)


def test_mixed_export_round_trip(tmp_path, tiny_tokenizer):
    pytest.importorskip("compressed_tensors")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = make_tiny_model("llama", seed=5)
    orig = {n: model.get_submodule(n).weight.detach().clone() for n in FP16}
    scheme = Scheme(ARGS)
    sl = _sensitive_file(model, tmp_path / "sensitive_layers.json", scheme)
    loaded = LoadedModel(model, tiny_tokenizer, {"kind": "test"})
    qm = api.quantize(loaded, Recipe(scheme, (Stage("rtn"),)), sensitive=sl)
    assert sorted(qm.shadow) == sorted(FP16) and not set(qm.modules) & set(FP16)
    assert len(qm.modules) == 21 - 4
    for n in FP16:  # kept float in the model
        assert torch.equal(model.get_submodule(n).weight, orig[n])
    assert any("vLLM fuses" in w for w in qm.warnings)
    out = api.export(qm, tmp_path / "ckpt")

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert sorted(qc["ignore"]) == sorted(["lm_head", *FP16])
    manifest = json.loads((out / "quantkit.json").read_text())
    assert manifest["sensitivity"]["fp16"] == FLAG and manifest["sensitivity"]["fp16_exported"] == FP16
    assert sorted(manifest["shadow"]["modules"]) == sorted(FP16)
    assert not any("will refuse" in w for w in manifest["warnings"])  # fused groups are consistent
    assert not list(out.glob("*shadow*.safetensors"))  # not at the top level, where vLLM globs
    shadow = load_file(str(out / SHADOW_FILE))
    for n in FP16:
        ref = quantize_weight(orig[n], ARGS)
        shape = tuple(shadow[f"{n}.weight_shape"].tolist())
        assert shape == tuple(orig[n].shape)
        assert torch.equal(unpack_int32(shadow[f"{n}.weight_packed"], 4, shape), ref.q)
        assert torch.equal(shadow[f"{n}.weight_scale"].float(), ref.scale)
    assert verify_checkpoint(out) == []

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model(ids).logits, back(ids).logits
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    assert torch.equal(back.get_submodule(FP16[0]).weight, orig[FP16[0]])  # loaded as a plain float linear

    s = read_checkpoint_summary(out)
    lb = s["linear_bytes"]
    fp_numel = sum(orig[n].numel() for n in FP16) + model.lm_head.weight.numel()
    assert lb["float"] == 4 * fp_numel  # fp32 tiny model
    all_numel = sum(m.weight.numel() for _, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    assert lb["all_fp16"] == 2 * all_numel
    assert lb["saving"] == pytest.approx(1 - (lb["quantized"] + lb["float"]) / lb["all_fp16"])


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_weight_only_layouts_record_the_scan_and_say_what_they_drop(fmt, tmp_path, tiny_tokenizer):
    """AutoAWQ / GPTQ exports of a --sensitive model: the manifest keeps the scan's record (it was written by the
    compressed-tensors writer only), the FP16 linears load as float, and the missing shadow copies are warned about."""
    from quantkit.cli.inspect import _rows
    from quantkit.models.checkpoint import load_quantkit_checkpoint

    model = make_tiny_model("llama", seed=5)
    orig = {n: model.get_submodule(n).weight.detach().clone() for n in FP16}
    sl = _sensitive_file(model, tmp_path / "sensitive_layers.json", Scheme(ARGS))
    qm = api.quantize(LoadedModel(model, tiny_tokenizer, {"kind": "test"}), Recipe(Scheme(ARGS), (Stage("rtn"),)),
                      sensitive=sl)
    out = api.export(qm, tmp_path / fmt, format=fmt)
    manifest = json.loads((out / "quantkit.json").read_text())
    assert manifest["sensitivity"]["fp16"] == FLAG and manifest["sensitivity"]["fp16_exported"] == FP16
    assert "shadow" not in manifest
    assert any(f"the {fmt} layout has no place for the quantized copies of the 4 linears" in w
               for w in manifest["warnings"])
    back, _, _ = load_quantkit_checkpoint(out)
    assert torch.equal(back.get_submodule(FP16[0]).weight, orig[FP16[0]])
    rows = dict(_rows(read_checkpoint_summary(out)))
    assert rows["kept FP16 by scan"].startswith("2 of ")


def test_sensitive_file_for_other_model_refused(tmp_path, tiny_tokenizer):
    big = make_tiny_model("llama", seed=5)
    sl = _sensitive_file(big, tmp_path / "s.json", Scheme(ARGS))
    small = make_tiny_model("llama", seed=5, num_hidden_layers=2)
    from quantkit.errors import UsageError

    with pytest.raises(UsageError, match="model.layers.2.self_attn.q_proj, which is not a linear layer"):
        api.quantize(LoadedModel(small, tiny_tokenizer, {}), Recipe(Scheme(ARGS), (Stage("rtn"),)), sensitive=sl)


# ------------------------------------------------------------------ CLI



@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama-scan"), tiny_tokenizer, seed=11)


_run = run_cli


def test_cli_scan_then_mixed_quantize_and_inspect(tiny_dir, tmp_path):
    sl = tmp_path / "sensitive_layers.json"
    code, text = _run("scan", "--model", tiny_dir, "--scheme", "W4A16", "--group-size", "32", "--samples", "4",
                      "--seqlen", "32", "--bins", "32", "--energy", "0.06", "--kl", "100", "--r", "1000", "--out", sl)
    assert code == 0, text
    d = json.loads(sl.read_text())
    assert d["scheme"]["weights"]["group_size"] == 32 and d["calibration"]["samples"] == 4
    flagged = [e["name"] for e in d["layers"] if e["flag"] == "fp16"]
    assert flagged == [e["name"] for e in d["layers"] if e["energy"] > 0.06] and 0 < len(flagged) < 21
    assert "fp16" in text and (tmp_path / "sensitive_layers.hist.safetensors").is_file()
    out = tmp_path / "ckpt"
    code, text = _run("rtn", "--model", tiny_dir, "--out", out, "--bits", "4", "--group-size", "32", "--sensitive", sl)
    assert code == 0, text
    manifest = json.loads((out / "quantkit.json").read_text())
    assert manifest["sensitivity"]["fp16"] == flagged
    code, text = _run("inspect", out, "--verify")
    assert code == 0, text
    assert "linear memory" in text and "saving" in text and "kept FP16 by scan" in text


def test_cli_scan_errors(tiny_dir, tmp_path):
    code, text = _run("scan", "--model", tiny_dir, "--scheme", "W5A5", "--out", tmp_path / "x.json")
    assert code == 2 and "unknown --scheme" in text and "Traceback" not in text
    for opt, fix in (("--stat-tokens", "0 = every calibration token"), ("--shortlist", "0 = no measured"),
                     ("--fisher-windows", "0 = no gradient-weighted")):
        code, text = _run("scan", "--model", tiny_dir, opt, "-1", "--out", tmp_path / "x.json")
        assert code == 2 and fix in text and "\n" not in text.strip() and "Traceback" not in text
    for args, fix in ((("--method", "awq"), "unknown --method 'awq'; use rtn or gptq"),
                      (("--damp", "0.1"), "--damp set GPTQ's options: add --method gptq"),
                      (("--no-act-order",), "--act-order/--no-act-order set GPTQ's options: add --method gptq"),
                      (("--method", "gptq", "--damp", "0"), "--damp"),
                      (("--cross-fit", "--target-fraction", "0.1"), "--cross-fit refits a calibrated method per fold"),
                      (("--cross-fit", "--method", "gptq"), "--cross-fit is for the --target-fraction selection"),
                      (("--cross-fit", "--method", "gptq", "--target-fraction", "0.1", "--greedy", "4"),
                       "--greedy cannot be combined with --cross-fit")):
        code, text = _run("scan", "--model", tiny_dir, *args, "--out", tmp_path / "x.json")
        assert code == 2 and fix in text and "\n" not in text.strip() and "Traceback" not in text, (args, text)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, text = _run("rtn", "--model", tiny_dir, "--out", tmp_path / "c", "--sensitive", bad)
    assert code == 2 and "not valid JSON" in text and "Traceback" not in text
    assert not (tmp_path / "c").exists()


def test_cli_scan_report_png(tiny_dir, tmp_path):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        code, text = _run("scan", "--model", tiny_dir, "--samples", "2", "--seqlen", "32", "--out",
                          tmp_path / "s.json", "--report", tmp_path / "rep")
        assert code == 2 and "pip install 'quantkit[report]'" in text
        return
    code, text = _run("scan", "--model", tiny_dir, "--samples", "2", "--seqlen", "32", "--bins", "16", "--out",
                      tmp_path / "s.json", "--report", tmp_path / "rep")
    assert code == 0, text
    png = tmp_path / "rep" / "sensitivity.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert (tmp_path / "rep" / "s.json").is_file()


def test_target_fraction_reads_calibration_text_only(tiny_tokenizer, monkeypatch):
    """The held-out half that `quantkit eval` scores is never even loaded, and every token window the scan
    (selection, cross-validation, fisher included) feeds the model is a run of the calibration half."""
    from quantkit.calib import data
    from quantkit.calib.data import load_text, tokenize

    parts = []
    real = data.load_text
    monkeypatch.setattr(data, "load_text", lambda spec, *, part, field="text": parts.append(part) or real(
        spec, part=part, field=field))
    model = make_tiny_model("llama", seed=5)
    seen = []
    h = model.model.embed_tokens.register_forward_pre_hook(lambda _m, a: seen.extend(a[0].reshape(-1, a[0].shape[-1])))
    try:
        rep = api.scan(LoadedModel(model, tiny_tokenizer, {"kind": "test"}), Scheme(ARGS),
                       api.CalibConfig(samples=2, seqlen=32, batch_size=2), target_fraction=0.25,
                       eval_cfg=api.EvalConfig(seqlen=128, windows=4), select_windows=6, folds=3, fisher_windows=1)
    finally:
        h.remove()
    monkeypatch.undo()
    assert parts and set(parts) == {"calib"}
    assert rep.ppl["expected"]["windows"] == 6 and rep.search and rep.flagged
    calib = tokenize(tiny_tokenizer, load_text(None, part="calib")).tolist()
    as_text = lambda ids: "," + ",".join(map(str, ids)) + ","  # noqa: E731 - token runs as comparable strings
    calib_s = as_text(calib)
    rows = {tuple(r.tolist()) for r in seen}
    assert len(rows) >= 2 + 6  # the scan's calibration samples and the selection windows
    assert {len(r) for r in rows} == {32, 128}
    for r in rows:
        assert as_text(r) in calib_s


def test_cli_scan_target_fraction_then_sensitive(tiny_dir, tmp_path):
    sl = tmp_path / "sl.json"
    code, text = _run("scan", "--model", tiny_dir, "--scheme", "W4A16", "--group-size", "32", "--asym", "--samples",
                      "2", "--seqlen", "32", "--bins", "16", "--target-fraction", "0.25", "--eval-seqlen", "32",
                      "--select-windows", "4", "--folds", "2", "--greedy", "2", "--out", sl)
    assert code == 0, text
    flat = " ".join(text.replace("│", " ").split())  # the summary table wraps its cells
    d = json.loads(sl.read_text())
    # a random tiny model's cross-validated recovery may fall outside 0-100%: then the row says there is none
    said = "recovers about" if 0 <= d["ppl"]["expected"]["recovered"] <= 1 else "no usable estimate"
    assert f"expected on unseen text {said}" in flat and "2-fold cross-validation over 4 calibration" in flat
    # with --target-fraction the gradient-weighted rule is on by default (the path the benchmark measures)
    assert [c["rule"] for c in d["search"]] == ["restore", "alone", "greedy", "fisher", "rel_err"]
    assert d["scheme"]["weights"]["symmetric"] is False and d["thresholds"]["mode"] == "target-fraction"
    flagged = [e["name"] for e in d["layers"] if e["flag"] == "fp16"]
    assert 0 < len(flagged) <= 5 and d["ppl"]["expected"]["recovered"] is not None
    out = tmp_path / "ckpt"
    code, text = _run("rtn", "--model", tiny_dir, "--out", out, "--bits", "4", "--group-size", "32", "--asym",
                      "--sensitive", sl)
    assert code == 0, text
    manifest = json.loads((out / "quantkit.json").read_text())
    assert manifest["sensitivity"]["fp16_exported"] == flagged  # nothing added by the fused-sibling rule
    code, text = _run("scan", "--model", tiny_dir, "--target-fraction", "0.25", "--select-windows", "3",
                      "--out", tmp_path / "x.json")
    assert code == 2 and "--select-windows 3 must be at least --folds 4" in text


def test_cli_scan_method_gptq_recorded_and_checked_against_the_recipe(tiny_dir, tmp_path):
    sl = tmp_path / "sl.json"
    code, text = _run("scan", "--model", tiny_dir, "--scheme", "W4A16", "--group-size", "32", "--asym", "--samples",
                      "2", "--seqlen", "32", "--bins", "16", "--target-fraction", "0.25", "--eval-seqlen", "32",
                      "--select-windows", "4", "--folds", "2", "--method", "gptq", "--no-act-order",
                      "--fisher-windows", "0", "--out", sl)
    assert code == 0, text
    flat = " ".join(text.replace("│", " ").split())
    assert "quantized with gptq (act_order False)" in flat and "quantized with gptq" in flat.split("expected")[-1]
    d = json.loads(sl.read_text())
    assert "fisher" not in [c["rule"] for c in d["search"]]  # --fisher-windows 0 turns it off
    assert d["method"]["name"] == "gptq" and d["method"]["options"]["act_order"] is False
    assert d["ppl"]["method"] == "gptq"
    # the file is for gptq: used with rtn, the run says the gains were measured on other weights
    code, text = _run("rtn", "--model", tiny_dir, "--out", tmp_path / "ckpt", "--bits", "4", "--group-size", "32",
                      "--asym", "--sensitive", sl)
    assert code == 0, text
    warned = json.loads((tmp_path / "ckpt" / "quantkit.json").read_text())["warnings"]
    assert any("measured on gptq weights but the recipe quantizes with rtn" in w for w in warned)
