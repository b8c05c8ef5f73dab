"""Streaming (issue 21): blocks read from the safetensors shards one at a time give the same checkpoint,
byte for byte, as the in-memory path; sharded output is read back by every reader; resume works across
modes and shards; the plan picks the streamed run only when needed."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from quantkit import api
from quantkit.calib.resume import LazyResults
from quantkit.interrupts import SIGNAL_ENV
from quantkit.recipe import PRESETS, QuantArgs, Recipe, Scheme, Stage
from tiny_models import run_cli, save_tiny_model_dir

CALIB = api.CalibConfig(samples=4, seqlen=32, batch_size=2)
W4 = Scheme(QuantArgs(bits=4, group_size=32, symmetric=False))


pytestmark = pytest.mark.usefixtures("reproducible_manifest")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    return save_tiny_model_dir(tmp_path_factory.mktemp("m") / "model", tiny_tokenizer, seed=3)


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _run(model_dir, out: Path, recipe, *, stream: bool, **kw) -> Path:
    loaded = api.load(str(model_dir), stream=stream)
    qm = api.quantize(loaded, recipe, CALIB, partial_dir=out.with_name(out.name + ".partial"), **kw)
    return api.export(qm, out)


@pytest.mark.parametrize("method,scheme", [("rtn", W4), ("gptq", W4), ("awq", W4), ("smoothquant", PRESETS["W8A8C8"])])
def test_streamed_checkpoint_is_byte_identical(model_dir, tmp_path, method, scheme):
    recipe = Recipe(scheme, (Stage(method),))
    ref = _files(_run(model_dir, tmp_path / "mem", recipe, stream=False))
    got = _files(_run(model_dir, tmp_path / "str", recipe, stream=True))
    assert list(got) == list(ref)
    assert [k for k in ref if ref[k] != got[k]] == []


def test_dir_without_generation_config(model_dir, tmp_path):
    """The generation config comes from config.json then, as from_pretrained reads it."""
    src = tmp_path / "src"
    shutil.copytree(model_dir, src)
    (src / "generation_config.json").unlink()
    recipe = Recipe(W4, (Stage("rtn"),))
    assert _files(_run(src, tmp_path / "mem", recipe, stream=False)) == _files(_run(src, tmp_path / "str", recipe,
                                                                                     stream=True))


def test_gguf_streams_from_its_safetensors_cache(model_dir, tmp_path, monkeypatch):
    """A .gguf is read through its converted safetensors cache (keyed by the file's sha256); streamed
    from there, the checkpoint equals the in-memory one."""
    from quantkit.models import loading

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(64)))
    monkeypatch.setattr(loading, "_gguf_cache_root", lambda: tmp_path / "cache")
    cache = tmp_path / "cache" / loading.file_sha256(gguf)[:32]
    shutil.copytree(model_dir, cache)
    (cache / "COMPLETE").write_text("test\n")
    recipe = Recipe(W4, (Stage("rtn"),))
    loaded = api.load(str(gguf), stream=True)
    assert loaded.stream is not None and loaded.stream.source.path == cache
    assert _files(_run(gguf, tmp_path / "mem", recipe, stream=False)) == _files(_run(gguf, tmp_path / "str", recipe,
                                                                                      stream=True))


def test_streamed_run_holds_one_block(model_dir, tmp_path):
    """Before each block is read, every block (and the embeddings and head) is back on the meta device;
    the results stay on disk."""
    loaded = api.load(str(model_dir), stream=True)
    model = loaded.model
    seen = []

    def on_block(i, n, name, phase):
        live = [k for k, p in model.named_parameters() if p.device.type != "meta"]
        seen.append(live)

    qm = api.quantize(loaded, Recipe(W4, (Stage("gptq"),)), CALIB, partial_dir=tmp_path / "o.partial",
                      on_block=on_block)
    assert seen == [[], [], []]
    assert all(p.device.type == "meta" for p in model.parameters())
    assert isinstance(qm.modules, LazyResults) and len(qm.modules) == 21
    # a result read back from OUT.partial equals what the model would hold
    name = "model.layers.1.mlp.down_proj"
    w = qm.tensors(f"{name}.weight")
    assert torch.equal(w, qm.modules[name].dequantize(w.dtype))


def test_streamed_gptaq_is_byte_identical(model_dir, tmp_path):
    """GPTQ's asymmetric calibration runs each block on the float model's activations too: streamed (each block
    read from the shards when reached), the checkpoint is the in-memory run's."""
    recipe = Recipe(W4, (Stage("gptq", {"gptaq": 1.0}),))
    ref = _files(_run(model_dir, tmp_path / "mem", recipe, stream=False))
    assert _files(_run(model_dir, tmp_path / "str", recipe, stream=True)) == ref
    plain = _files(_run(model_dir, tmp_path / "plain", Recipe(W4, (Stage("gptq", {"gptaq": 0.0}),)), stream=False))
    assert plain["model.safetensors"] != ref["model.safetensors"]


@pytest.mark.parametrize("where", ["host", "disk"])
def test_activation_placement_gives_same_bits(model_dir, tmp_path, where):
    recipe = Recipe(W4, (Stage("gptq"),))
    ref = _files(_run(model_dir, tmp_path / "dev", recipe, stream=True))
    got = _files(_run(model_dir, tmp_path / where, recipe, stream=True, activations=where))
    assert got == ref
    assert not list(tmp_path.glob(".quantkit-activations-*"))  # the disk store cleans up


@pytest.mark.usefixtures("ctrl_c_raises")
def test_resume_across_modes_and_shards(model_dir, tmp_path, monkeypatch):
    """Ctrl-C after block 1 (streamed), resumed in memory; Ctrl-C once every shard is written,
    resumed streamed: both give the bytes of an uninterrupted sharded run."""
    args = ("gptq", "--model", model_dir, "-g", "32", "--samples", "4", "--seqlen", "32", "--shard-size", "0.0002")
    code, text = run_cli(*args, "--out", tmp_path / "clean", "--no-stream")
    assert code == 0, text
    clean = _files(tmp_path / "clean")
    assert "model-00003-of-00003.safetensors" in clean and "model.safetensors.index.json" in clean

    monkeypatch.setenv(SIGNAL_ENV, "saved.1")
    code, text = run_cli(*args, "--out", tmp_path / "a", "--stream")
    assert code == 130 and "keeps 1/3 finished blocks" in text, text
    monkeypatch.setenv(SIGNAL_ENV, "export.weights")
    code, text = run_cli(*args, "--out", tmp_path / "a", "--no-stream", "--resume")
    assert code == 130 and "keeps all 3 blocks" in text, text
    assert not (tmp_path / "a").exists()
    monkeypatch.delenv(SIGNAL_ENV)
    code, text = run_cli(*args, "--out", tmp_path / "a", "--stream", "--resume")
    assert code == 0, text
    assert _files(tmp_path / "a") == clean
    assert not (tmp_path / "a.partial").exists()


def test_sharded_checkpoint_is_read_and_verified(model_dir, tmp_path):
    """inspect --verify, the dense reader and the runtime read a sharded checkpoint as they read one file;
    a changed byte in any shard is named."""
    from quantkit import runtime
    from quantkit.models.checkpoint import load_quantkit_checkpoint

    base = ("rtn", "--model", model_dir, "-g", "32", "--stream")
    assert run_cli(*base, "--out", tmp_path / "one")[0] == 0
    code, text = run_cli(*base, "--out", tmp_path / "sh", "--shard-size", "0.0002")
    assert code == 0, text
    shards = sorted(p.name for p in (tmp_path / "sh").glob("model-*.safetensors"))
    index = json.loads((tmp_path / "sh" / "model.safetensors.index.json").read_text())
    assert len(shards) == 3 and sorted(set(index["weight_map"].values())) == shards
    manifest = json.loads((tmp_path / "sh" / "quantkit.json").read_text())
    assert {*shards, "model.safetensors.index.json"} <= set(manifest["files"])
    assert run_cli("inspect", tmp_path / "sh", "--verify")[0] == 0

    one, _, _ = load_quantkit_checkpoint(tmp_path / "one")
    sh, _, _ = load_quantkit_checkpoint(tmp_path / "sh")
    a, b = one.state_dict(), sh.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    ra, rb = runtime.load(tmp_path / "one", device="cpu"), runtime.load(tmp_path / "sh", device="cpu")
    assert ra.perplexity(ids).ppl == rb.perplexity(ids).ppl

    p = tmp_path / "sh" / shards[1]
    data = bytearray(p.read_bytes())
    data[-1] ^= 1
    p.write_bytes(bytes(data))
    code, text = run_cli("inspect", tmp_path / "sh", "--verify")
    assert code == 1 and f"{shards[1]}: sha256 mismatch" in text


def test_stream_refusals(model_dir, tmp_path):
    code, text = run_cli("rtn", "--model", model_dir, "--out", tmp_path / "o", "--stream", "--eval")
    assert code == 2 and "--eval scores the whole model in memory" in text
    code, text = run_cli("spinquant", "--model", model_dir, "--out", tmp_path / "o", "--stream")
    assert code == 2 and "spinquant transforms the whole model at once" in text
    assert run_cli("rtn", "--model", model_dir, "--out", tmp_path / "ck", "-g", "32")[0] == 0
    code, text = run_cli("rtn", "--model", tmp_path / "ck", "--out", tmp_path / "o", "--stream")
    assert code == 2 and "is a quantkit checkpoint" in text
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_run_streams_only_when_memory_requires(model_dir, tmp_path, monkeypatch):
    """Auto: in memory when that fits; streamed when only the streamed run fits (same bytes)."""
    from quantkit import plan as plan_mod
    from quantkit.plan import model_config, plan_run

    recipe = Recipe(W4, (Stage("rtn"),))
    cfg = model_config(str(model_dir))
    mem = plan_run(cfg, recipe, CALIB, stream=False, detect=False)
    streamed = plan_run(cfg, recipe, CALIB, stream=True, detect=False)
    assert streamed.host_peak < mem.host_peak
    code, text = run_cli("rtn", "--model", model_dir, "--out", tmp_path / "a", "-g", "32")
    assert code == 0 and "streamed" not in text.split("\n")[0], text
    monkeypatch.setattr(plan_mod, "_host_available", lambda: (streamed.host_peak + mem.host_peak) // 2)
    code, text = run_cli("rtn", "--model", model_dir, "--out", tmp_path / "b", "-g", "32")
    assert code == 0 and "streamed (blocks read from the shards one at a time)" in text, text
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    code, text = run_cli("rtn", "--model", model_dir, "--out", tmp_path / "c", "-g", "32", "--no-stream")
    assert code == 2 and "try --stream (blocks read from the shards one at a time" in text.replace("\n", " "), text


def test_plan_streamed_peak_is_independent_of_depth():
    from quantkit.models.random import SHAPES
    from quantkit.plan import plan_run

    recipe = Recipe(Scheme(QuantArgs(bits=4, group_size=128)), (Stage("gptq"),))
    calib = api.CalibConfig(samples=16, seqlen=512, batch_size=8)
    peaks = {}
    for layers in (2, 8, 32):
        cfg = {**SHAPES["llama3-8b"], "num_hidden_layers": layers}
        s = plan_run(cfg, recipe, calib, "cpu", dtype="bfloat16", stream=True, detect=False)
        m = plan_run(cfg, recipe, calib, "cpu", dtype="bfloat16", stream=False, detect=False)
        peaks[layers] = (s.host_peak, m.host_peak)
    assert peaks[2][0] == peaks[8][0] == peaks[32][0]
    assert peaks[2][1] < peaks[8][1] < peaks[32][1]


def test_plan_llama3_70b_fits_80gb_gpu_and_64gb_ram():
    code, text = run_cli("plan", "--shape", "llama3-70b", "--method", "gptq", "--group-size", "128", "--samples",
                         "128", "--seqlen", "2048", "--device", "cuda", "--device-memory", "80", "--host-memory", "64")
    assert code == 0 and "streamed: blocks read" in text and "│ fits" in text and "yes" in text.split("│ fits")[1][:40]
    code, text = run_cli("plan", "--shape", "llama3-70b", "--method", "gptq", "--device", "cuda",
                         "--device-memory", "80", "--host-memory", "64", "--no-stream")
    assert code == 0 and "no" in text.split("│ fits")[1][:40] and "--stream" in text
    code, text = run_cli("plan", "--shape", "huge")
    assert code == 2 and "unknown --shape 'huge'" in text


def test_plan_places_activations_where_they_fit():
    """Streamed 8B GPTQ at 128 x 2048 (4 GiB of activations per boundary pair): on the device when it has room,
    else pinned host memory, else disk; in memory (not streamed) they stay on the device."""
    from quantkit.models.random import SHAPES
    from quantkit.plan import GiB, plan_run

    recipe = Recipe(Scheme(QuantArgs(bits=4, group_size=128)), (Stage("gptq"),))
    calib = api.CalibConfig(samples=128, seqlen=2048, batch_size=8)
    cfg = SHAPES["llama3-8b"]

    def plan(dev, host, device="cuda", stream=True):
        return plan_run(cfg, recipe, calib, device, dtype="bfloat16", stream=stream, detect=False,
                        device_available=int(dev * GiB) if dev else None, host_available=int(host * GiB))

    roomy = plan(80, 64)
    assert roomy.activations == "device" and roomy.fits
    tight = plan(roomy.device_peak / GiB - 1, 64)
    assert tight.activations == "host" and tight.fits and tight.device_peak < roomy.device_peak - 3 * GiB
    assert tight.host_parts["calibration activations (pinned)"] == roomy.device_parts["block inputs + outputs"]
    disk = plan(roomy.device_peak / GiB - 1, tight.host_peak / GiB - 1)
    assert disk.activations == "disk" and disk.fits and disk.host_peak < tight.host_peak
    assert plan(roomy.device_peak / GiB - 1, 64, stream=False).activations == "device"
    cpu = plan(None, 64, device="cpu")
    cpu_tight = plan(None, cpu.host_peak / GiB - 1, device="cpu")
    assert cpu.activations == "device" and cpu_tight.activations == "disk" and cpu_tight.fits


@pytest.mark.parametrize("arch", ["mixtral", "gemma2"])
def test_streamed_families_are_byte_identical(tiny_tokenizer, tmp_path, arch):
    """Streaming builds the same per-expert skeleton (MoE) and the same non-persistent buffers (Gemma's
    embed_scale, rotary tables) as the in-memory load: GPTQ (which runs the model) writes the same bytes."""
    src = save_tiny_model_dir(tmp_path / "model", tiny_tokenizer, arch=arch, seed=3)
    recipe = Recipe(W4, (Stage("gptq"),))
    assert _files(_run(src, tmp_path / "mem", recipe, stream=False)) == _files(_run(src, tmp_path / "str", recipe,
                                                                                     stream=True))


def test_streamed_export_skips_weights_checked_when_saved(model_dir, tmp_path, caplog):
    """A streamed block's quantized weight that was saved as its quantized tensor (proved equal then) is not
    read back for export's rounding check; any other weight still is, and a mismatch is still reported."""
    recipe = Recipe(W4, (Stage("rtn"),))
    loaded = api.load(str(model_dir), stream=True)
    qm = api.quantize(loaded, recipe, CALIB, partial_dir=tmp_path / "out.partial")
    assert qm.modules and all(qm.weight_checked(f"{n}.weight") for n in qm.modules)
    assert not qm.weight_checked("model.embed_tokens.weight")
    read, fetch = [], qm.tensors
    qm.tensors = lambda k: (read.append(k), fetch(k))[1]
    api.export(qm, tmp_path / "out")
    assert read and not [k for k in read if k[: -len(".weight")] in qm.modules]
    # Without the proof, the weights are read back and checked, and a weight that does not round to its
    # quantized tensor is reported as before.
    name = next(iter(qm.modules))
    qm.weight_checked = None
    qm.tensors = lambda k: fetch(k) + 1.0 if k == f"{name}.weight" else fetch(k)
    with caplog.at_level("WARNING", logger="quantkit.export.common"):
        api.export(qm, tmp_path / "out2")
    assert f"(e.g. {name})" in caplog.text and "1 quantized linear(s)" in caplog.text
