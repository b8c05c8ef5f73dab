"""Memory plan: parts computed from the config, fit/advice logic, `quantkit plan`, refusal before loading."""

import json
import os

import pytest
from typer.testing import CliRunner

from tiny_models import make_tiny_model
from quantkit.api import CalibConfig
from quantkit.cli.app import app
from quantkit.models.loading import ModelLoadError
from quantkit.plan import HOST_BASELINE_BYTES, MemoryPlanError, ModelShape, check_memory, estimate_memory, model_config
from quantkit.recipe import QuantArgs, Recipe, Scheme, Stage

runner = CliRunner()
CFG = dict(hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6,
           num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False)


def _recipe(method="rtn", g=32):
    return Recipe(Scheme(QuantArgs(bits=4, group_size=g, symmetric=True)), (Stage(method),))


def test_param_count_matches_transformers():
    for arch in ("llama", "qwen2", "qwen3"):
        model = make_tiny_model(arch)
        cfg = model.config.to_dict()
        n = sum(p.numel() for p in model.parameters())
        assert ModelShape.from_config(cfg).params() == n, arch


def test_parts_from_config_by_hand():
    calib = CalibConfig(samples=10, seqlen=64, batch_size=4)
    p = estimate_memory(CFG, _recipe(), calib, "cpu", dtype="float32", with_data=True, host_available=10**12)
    shape = ModelShape.from_config(CFG)
    assert p.host_parts["weights"] == shape.params() * 4
    lin = 3 * (96 * 96 + 2 * 32 * 96 + 96 * 96 + 3 * 96 * 160)  # q, k, v, o, gate/up/down per block; lm_head ignored
    groups = 3 * (96 * 3 + 2 * 32 * 3 + 96 * 3 + 2 * 160 * 3 + 96 * 5)  # (out * in / 32) scales
    assert p.host_parts["quantized tensors"] == lin + groups * 4
    act = 10 * 64 * 96 * 4 * 2
    rope = 10 * 64 * 16 * 2 * 4
    transient = 4 * 64 * (3 * 160 + 6 * 96) * 4
    ids = 10 * 64 * 8 * 2
    calib_part = act + rope + transient + ids
    export = p.host_parts.get("export", calib_part)
    assert max(calib_part, export) == p.host_peak - HOST_BASELINE_BYTES - p.host_parts["weights"] - (lin + groups * 4)
    assert p.fits and p.device_peak == 0


def test_hessian_methods_count_statistics():
    from quantkit.methods.base import Method, _REGISTRY

    class _H(Method):  # test-only, put in the registry for this test and removed after
        name = "_test_hessian"
        stats = frozenset({"hessian"})

    _REGISTRY["_test_hessian"] = _H
    try:
        calib = CalibConfig(samples=4, seqlen=32, batch_size=4)
        p = estimate_memory(CFG, _recipe("_test_hessian"), calib, "cuda", dtype="bfloat16",
                            host_available=10**12, device_available=10**12)
        ins = [96, 96, 96, 96, 96, 96, 160]
        assert p.device_parts["statistics"] == sum(i * i * 4 for i in ins) + 2 * 160 * 160 * 4
        assert p.device_parts["block inputs + outputs"] == 4 * 32 * 96 * 2 * 2
        assert p.device_peak == sum(p.device_parts.values())
    finally:
        del _REGISTRY["_test_hessian"]


def test_learned_rounding_counts_its_working_set():
    # RTN reads no data, but with learned rounding it runs every block on the calibration batches: the
    # activations count, and the float targets, 5 float32 per weight and one batch's saved forward
    calib = CalibConfig(samples=4, seqlen=32, batch_size=4)
    recipe = Recipe(Scheme(QuantArgs(bits=4, group_size=32)), (Stage("rtn", {"learned_rounding": True}),))
    p = estimate_memory(CFG, recipe, calib, "cuda", dtype="bfloat16", host_available=10**12, device_available=10**12)
    assert p.device_parts["block inputs + outputs"] == 4 * 32 * 96 * 2 * 2
    n = 96 * 96 + 2 * 32 * 96 + 96 * 96 + 3 * 96 * 160
    per_input = sum(i * 4 * 2 for i in (96, 96, 96, 96, 96, 96, 160))
    assert p.device_parts["statistics"] == per_input + 4 * 32 * 96 * 2 + n * 4 * 5 + 4 * 32 * (3 * 160 + 6 * 96) * 4
    assert estimate_memory(CFG, _recipe(), calib, "cuda", dtype="bfloat16", host_available=10**12,
                           device_available=10**12).device_parts["block inputs + outputs"] == 0


def test_gptq_counts_the_worst_step_of_the_solve():
    # CFG: hidden 96, MLP 160, 6 heads of 16, 2 KV heads -> q/k/v stacked 160 x 96, o 96 x 96,
    # gate/up stacked 320 x 96, down 96 x 160. Worst step: factoring down's 160 x 160 Hessian
    # (3 float32 (I, I) + the stacked bf16 weights) or solving gate/up (2 (I, I) + 8 or 10 B/weight).
    calib = CalibConfig(samples=4, seqlen=32, batch_size=4)
    expect = {}
    for backend, per in (("auto", 8), ("torch", 10)):
        steps = [(96, 160 * 96), (96, 96 * 96), (96, 320 * 96), (160, 96 * 160)]
        expect[backend] = max(max(3 * i * i * 4 + 2 * n, 2 * i * i * 4 + per * n) for i, n in steps)
        recipe = Recipe(Scheme(QuantArgs(4, 32, True)), (Stage("gptq", {"backend": backend, "gptaq": 0}),))
        p = estimate_memory(CFG, recipe, calib, "cuda", dtype="bfloat16", host_available=10**12,
                            device_available=10**12)
        assert p.device_parts["statistics"] == expect[backend], backend
    assert expect["torch"] > expect["auto"]  # the torch loop keeps its integers as floats
    # gptaq (on by default at 4 bits): the float model's activations double the stream; a float block copy and
    # two (I, I) float32 more
    recipe = Recipe(Scheme(QuantArgs(4, 32, True)), (Stage("gptq"),))
    p = estimate_memory(CFG, recipe, calib, "cuda", dtype="bfloat16", host_available=10**12, device_available=10**12)
    block_params = 160 * 96 + 96 * 96 + 320 * 96 + 96 * 160 + 2 * 96  # the linears + two norms
    assert p.device_parts["block inputs + outputs"] == 4 * 32 * 96 * 2 * 2 * 2
    assert p.device_parts["statistics"] == expect["auto"] + block_params * 2 + 2 * 160 * 160 * 4


def test_does_not_fit_gives_advice_that_fits():
    calib = CalibConfig(samples=512, seqlen=512, batch_size=8)
    big = dict(CFG, hidden_size=1024, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=8)
    full = estimate_memory(big, _recipe(), calib, "cpu", dtype="float32", with_data=True, host_available=10**13)
    budget = full.host_peak - full.host_parts["calibration (activations, stats)"] // 2
    p = estimate_memory(big, _recipe(), calib, "cpu", dtype="float32", with_data=True, host_available=budget)
    assert not p.fits
    samples = int(p.advice[0].split()[1])
    assert p.advice[0].startswith("--samples") and 0 < samples < 512
    fixed = estimate_memory(big, _recipe(), CalibConfig(samples=samples, seqlen=512, batch_size=8), "cpu",
                            dtype="float32", with_data=True, host_available=budget)
    assert fixed.fits
    with pytest.raises(MemoryPlanError, match="does not fit; try --samples"):
        check_memory(p)


@pytest.mark.parametrize("bad, match", [
    ({"hidden_size": -4}, "hidden_size=-4"),
    ({"num_hidden_layers": 10**12}, "num_hidden_layers=1000000000000"),
    ({"vocab_size": "many"}, "vocab_size='many'"),
    ({"num_attention_heads": None}, "no num_attention_heads"),
    ({"num_key_value_heads": 0}, "num_key_value_heads=0"),
])
def test_absurd_config_fields(tmp_path, bad, match):
    cfg = {**CFG, **bad}
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=match):
        model_config(str(tmp_path))
    res = runner.invoke(app, ["plan", "--model", str(tmp_path)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.strip().splitlines()[-1].startswith("error:")


def test_plan_command_and_run_refusal_before_loading(tmp_path, monkeypatch, tiny_tokenizer):
    d = tmp_path / "m"
    make_tiny_model("llama", seed=1).save_pretrained(d, safe_serialization=True)
    tiny_tokenizer.save_pretrained(d)
    res = runner.invoke(app, ["plan", "--model", str(d), "-g", "32", "--json", str(tmp_path / "p.json")])
    assert res.exit_code == 0, res.output
    assert "host peak" in res.output and "yes" in res.output
    p = json.loads((tmp_path / "p.json").read_text())
    assert p["fits"] and p["host_peak"] > HOST_BASELINE_BYTES

    import quantkit.api
    import quantkit.plan

    monkeypatch.setattr(quantkit.plan, "_host_available", lambda: 64 * 2**20)

    def no_load(*a, **k):
        raise AssertionError("the model was loaded although the plan said it will not fit")

    monkeypatch.setattr(quantkit.api, "load", no_load)
    out = tmp_path / "out"
    res = runner.invoke(app, ["rtn", "--model", str(d), "--out", str(out), "-g", "32"])
    assert res.exit_code == 2, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("error: memory plan: host peak") and "does not fit" in last and "Traceback" not in res.output
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_default_model_config_from_gguf():
    cfg = model_config(None)
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]) == (576, 30, 1536)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]) == (9, 3, 49152)
    assert cfg["tie_word_embeddings"] is True


def _spin_recipe(rotation="learned", **opts):
    from quantkit.methods.spinquant_settings import build_recipe

    return build_recipe("W4A4KV4", rotation, "gptq", **opts)


def test_rotation_training_has_its_own_peak():
    """A learned SpinQuant stage adds the whole-model training phase: on the CPU it replaces the calibration
    working set when larger and grows with the training length; on a GPU it is the device peak (the whole
    model moves there); hadamard (no training) adds nothing."""
    from quantkit.plan import _TRAIN_HOST_SLACK, rotation_training_bytes

    calib = CalibConfig(samples=4, seqlen=32, batch_size=4)
    kw = dict(host_available=10**13, device_available=10**13)
    had = estimate_memory(CFG, _spin_recipe("hadamard"), calib, "cpu", dtype="float32", **kw)
    short = estimate_memory(CFG, _spin_recipe(train_seqlen=256), calib, "cpu", dtype="float32", **kw)
    long = estimate_memory(CFG, _spin_recipe(train_seqlen=1024), calib, "cpu", dtype="float32", **kw)
    assert not any(k.startswith("rotation") for k in had.host_parts)
    train = rotation_training_bytes(ModelShape.from_config(CFG), 4, seqlen=1024, batch_size=8, quantize_weights=False,
                                    act=True, kv=True, estimator="scale")  # the CLI's W4A4KV4 setting (TUNED)
    assert long.host_parts["rotation training"] == int((sum(train.values()) - long.host_parts["weights"]) * _TRAIN_HOST_SLACK)
    tied = estimate_memory({**CFG, "tie_word_embeddings": True}, _spin_recipe(train_seqlen=1024), calib, "cpu",
                           dtype="float32", **kw)  # untied for training: the head's weight and its rotated copy
    assert tied.host_parts["rotation training"] > long.host_parts["rotation training"]
    assert long.host_peak > short.host_peak > had.host_peak
    gpu = estimate_memory(CFG, _spin_recipe(train_seqlen=1024), calib, "cuda", dtype="bfloat16", **kw)
    assert gpu.device_peak == sum(gpu.device_parts.values())
    assert set(gpu.device_parts) >= {"rotation training: model weights", "rotation training: saved activations"}


@pytest.mark.parametrize("estimator,rtn,measured_gib", [("ste", True, 51.0), ("scale", True, 91.0),
                                                        ("scale", False, 91.5), ("ste", False, 51.0)])
def test_rotation_training_estimate_covers_the_measured_8b_peak(estimator, rtn, measured_gib):
    """torch.cuda.max_memory_allocated of 8B-shaped training on an H200 (bf16, 2048 tokens, W4A4KV4,
    RTN or float weights in the loss; BENCHMARKS.md issue 8): the estimate is above it, by less than 30%."""
    from quantkit.models.random import shape_config
    from quantkit.plan import GiB, rotation_training_bytes

    shape = ModelShape.from_config(shape_config("llama3-8b").to_dict())
    est = sum(rotation_training_bytes(shape, 2, seqlen=2048, quantize_weights=rtn, act=True, kv=True,
                                      estimator=estimator).values()) / GiB
    assert measured_gib <= est <= 1.3 * measured_gib, est


def test_rotation_training_that_does_not_fit_gets_training_advice():
    """8B W4A4KV4 with the CLI's settings (batch 8) on an 80 GB card: refused, with flags that shrink the
    training enough to fit (fewer sequences a step, then shorter ones)."""
    from quantkit.models.random import shape_config
    from quantkit.plan import GiB

    cfg = shape_config("llama3-8b").to_dict()
    calib = CalibConfig(samples=128, seqlen=2048, batch_size=8)
    p = estimate_memory(cfg, _spin_recipe(train_seqlen=2048), calib, "cuda", dtype="bfloat16",
                        host_available=10**13, device_available=80 * GiB)
    assert not p.fits
    seq = next(a for a in p.advice if a.startswith("--train-"))
    assert "--estimator ste (no float32 copies of the fake-quantized activations)" in p.advice
    flags = seq.split(" (")[0].split()
    opts = {"train_batch": 8, "train_seqlen": 2048} | {k[2:].replace("-", "_"): int(v) for k, v in zip(flags[::2], flags[1::2])}
    assert opts != {"train_batch": 8, "train_seqlen": 2048} and 2 <= opts["train_seqlen"] <= 2048, seq
    shorter = estimate_memory(cfg, _spin_recipe(**opts), calib, "cuda", dtype="bfloat16",
                              host_available=10**13, device_available=80 * GiB)
    assert shorter.fits, shorter.device_peak / GiB


def _rss_file() -> int:
    """Bytes of file-backed pages mapped into this process (memory-mapped files that were read)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc/self/status (Linux)")
def test_gguf_config_reads_the_metadata_not_the_tensors(tmp_path):
    """A GGUF's config comes from its metadata through gguf.GGUFReader: the 32 MiB tensor is never paged in
    (reading it does page it in: the measure can see it), the file is unmapped afterwards, and the fields map
    as llama.cpp names them (an output.weight: untied; key_length: head_dim; the tokens array: the vocab)."""
    import gguf
    import numpy as np

    from quantkit.plan import _gguf_config

    p = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    for k, v in (("embedding_length", 64), ("block_count", 2), ("feed_forward_length", 128), ("context_length", 256),
                 ("attention.head_count", 4), ("attention.head_count_kv", 2), ("attention.key_length", 32)):
        w.add_uint32(f"llama.{k}", v)
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(300)])
    w.add_tensor("token_embd.weight", np.zeros((300, 64), np.float32))
    w.add_tensor("output.weight", np.ones(8 * 2**20, np.float32))  # 32 MiB
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    before = _rss_file()
    cfg = _gguf_config(p)
    assert _rss_file() - before < 4 * 2**20
    assert not any(str(p) in line for line in open("/proc/self/maps"))
    assert cfg == {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "tie_word_embeddings": False,
                   "dtype": "float32", "max_position_embeddings": 256, "head_dim": 32}
    reader = gguf.GGUFReader(p)  # the control: touching the tensor maps its pages
    before = _rss_file()
    assert float(np.asarray(reader.tensors[-1].data).sum()) == 8 * 2**20
    assert _rss_file() - before > 24 * 2**20
    del reader


def test_export_shard_follows_the_shard_size(tmp_path, monkeypatch, tiny_tokenizer):
    """The export keeps one output shard in memory while writing it: --shard-size bounds it, except that a
    tensor larger than a shard gets a shard of its own (the 8B embeddings, 0.98 GiB in bf16). Streamed RTN of
    the 8B shape: the export part is that shard + one linear's read-back (int8 q, two float32 copies, bf16);
    `quantkit plan --shard-size` and the method commands plan with the size the run will write."""
    from quantkit.models.random import SHAPES
    from quantkit.plan import GiB

    cfg = dict(SHAPES["llama3-8b"])
    rec = Recipe(Scheme(QuantArgs(bits=4, group_size=128, symmetric=True)), (Stage("rtn"),))
    calib = CalibConfig(samples=16, seqlen=512, batch_size=8)
    read_back = 14336 * 4096 * (1 + 4 + 4 + 2)  # gate/up/down: the largest linear
    embed = 128256 * 4096 * 2
    for shard, expect in ((2 * GiB, 2 * GiB), (GiB, GiB), (GiB // 4, embed)):
        p = estimate_memory(cfg, rec, calib, "cpu", dtype="bfloat16", host_available=10**13, stream=True,
                            shard_bytes=shard)
        assert p.host_parts["export"] == expect + read_back, shard
    assert estimate_memory(cfg, rec, calib, "cpu", dtype="bfloat16", host_available=10**13,
                           stream=True).host_parts["export"] == 2 * GiB + read_back  # the exporters' default

    def export_gib(*args):
        res = runner.invoke(app, ["plan", "--shape", "llama3-8b", "--stream", "--dtype", "bfloat16", "-g", "128",
                                  "--host-memory", "1000", "--json", str(tmp_path / "p.json"), *args])
        assert res.exit_code == 0, res.output
        return json.loads((tmp_path / "p.json").read_text())["host_parts"]["export"]

    assert export_gib() == 2 * GiB + read_back
    assert export_gib("--shard-size", "1") == GiB + read_back
    res = runner.invoke(app, ["plan", "--shape", "tiny", "--shard-size", "0"])
    assert res.exit_code == 2 and "--shard-size" in res.output.strip().splitlines()[-1]

    import quantkit.plan

    seen = []
    real = quantkit.plan.plan_run
    monkeypatch.setattr(quantkit.plan, "plan_run", lambda *a, **k: seen.append(k.get("shard_bytes")) or real(*a, **k))
    d = tmp_path / "m"
    make_tiny_model("llama", seed=1).save_pretrained(d, safe_serialization=True)
    tiny_tokenizer.save_pretrained(d)
    res = runner.invoke(app, ["rtn", "--model", str(d), "--out", str(tmp_path / "o"), "-g", "32", "--shard-size", "0.5"])
    assert res.exit_code == 0, res.output
    assert seen == [GiB // 2]


@pytest.mark.parametrize("bad, match", [
    ({"num_experts": "many"}, "field num_experts='many' is not a sensible size"),
    ({"moe_intermediate_size": -64}, "field moe_intermediate_size=-64 is not a sensible size"),
    ({"head_dim": 2.5}, "field head_dim=2.5 is not a sensible positive size"),
])
def test_absurd_layout_fields_named(bad, match):
    """The sizes the adapter row reads (an MoE's expert count and widths, head_dim) are checked like the
    others: one ModelLoadError naming the field, never a TypeError from deep inside the estimate."""
    cfg = {**CFG, "model_type": "qwen3_moe", "num_experts": 4, "moe_intermediate_size": 64, **bad}
    with pytest.raises(ModelLoadError, match=match):
        ModelShape.from_config(cfg)
    assert ModelShape.from_config({**CFG, "model_type": "qwen3_moe", "num_experts": 4,
                                   "moe_intermediate_size": 64}).block_linears()["mlp.experts.3.down_proj"] == (96, 64)
