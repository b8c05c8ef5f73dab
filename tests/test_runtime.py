"""The runtime on CPU (kernels' torch references): every exported format against the dense model with
its run-time quantization simulated, decode vs prefill, generation, the precision bitmask, the
fallback monitor, and the loader's refusals."""

from __future__ import annotations

import json

import pytest
import torch

from tiny_models import make_tiny_model, run_cli
from quantkit import api, runtime
from quantkit.models.checkpoint import load_quantkit_checkpoint
from quantkit.models.loading import LoadedModel
from quantkit.recipe import PRESETS, ActQuantArgs, KVCacheArgs, QuantArgs, Recipe, Scheme, Stage
from quantkit.runtime.simulate import plan_simulation


@pytest.fixture(autouse=True)
def _torch_references(monkeypatch):
    """CPU runs use the kernels' torch references (the kernels themselves are tested in tests/kernels,
    whose conftest may have set TRITON_INTERPRET=1 for the whole session)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


class _Calib:
    def __init__(self, ids):
        self.input_ids = ids
        self.settings = {"source": "test"}


CALIB = _Calib(torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(0)))
IDS = torch.randint(3, 512, (2, 48), generator=torch.Generator().manual_seed(1))
SQ = (Stage("smoothquant", {"alpha": 0.5}),)
RTN = (Stage("rtn"),)

FORMATS = {
    "w4-g32-asym": (Scheme(QuantArgs(4, 32, False)), RTN, "compressed-tensors", "wna16"),
    "w4-channel-sym": (Scheme(QuantArgs(4, None, True)), RTN, "compressed-tensors", "wna16"),
    "w8-g32": (Scheme(QuantArgs(8, 32, True)), RTN, "compressed-tensors", "wna16"),
    "w3-g32-ref": (Scheme(QuantArgs(3, 32, False)), RTN, "compressed-tensors", "ref"),
    "awq": (Scheme(QuantArgs(4, 32, False)), RTN, "awq", "wna16"),
    "gptq-w4": (Scheme(QuantArgs(4, 32, True)), RTN, "gptq", "wna16"),
    "w8a8": (PRESETS["W8A8"], SQ, "compressed-tensors", "w8a8"),
    "w8a8-static-act": (Scheme(QuantArgs(8), ActQuantArgs(8, "tensor", dynamic=False)), SQ, "compressed-tensors", "w8a8"),
    "w8a8c8-token": (Scheme(QuantArgs(8), ActQuantArgs(8), KVCacheArgs(8, "token", dynamic=True)), SQ,
                     "compressed-tensors", "w8a8"),
    "w8a8c8-channel-res": (Scheme(QuantArgs(8), ActQuantArgs(8), KVCacheArgs(8, "channel", residual_bits=4,
                                                                                residual_tau=1.5)),
                           SQ, "compressed-tensors", "w8a8"),
    "w4a4kv4-spinquant": (PRESETS["W4A4KV4"], (Stage("spinquant", {"rotation": "hadamard"}),), "compressed-tensors",
                          "w8a8"),
    # R4 alone, in Sylvester blocks (r4_block auto: 32 of 160), the vLLM-servable form
    "w8a8-spinquant-r4": (PRESETS["W8A8"], (Stage("spinquant", {"rotation": "hadamard"}),), "compressed-tensors",
                          "w8a8"),
}


def _checkpoint(tmp_path, tokenizer, key, arch="llama", sensitive=None):
    scheme, stages, fmt, _ = FORMATS[key]
    qm = api.quantize(LoadedModel(make_tiny_model(arch), tokenizer, {"kind": "test"}), Recipe(scheme, stages),
                      calib_set=CALIB, sensitive=sensitive)
    return api.export(qm, tmp_path / f"{key}-{arch}", format=fmt)


def _reference_logits(path, tokenizer, ids):
    """The dense model of the checkpoint with its run-time quantization simulated (what eval scores)."""
    ref, _, _ = load_quantkit_checkpoint(path)
    plan = plan_simulation(LoadedModel(ref, tokenizer, {"kind": "quantkit-checkpoint", "path": str(path)}))
    with torch.no_grad(), plan.context(ref):
        return ref(input_ids=ids).logits


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("key", list(FORMATS))
def test_every_format_matches_the_simulated_dense_model(tmp_path, tiny_tokenizer, key):
    path = _checkpoint(tmp_path, tiny_tokenizer, key)
    rt = runtime.load(path, device="cpu", kv_residual_slots=64)
    assert {m.kind for m in rt.linears.values()} == {FORMATS[key][3]}
    for m in rt.linears.values():  # packed, no dense copy of a quantized weight
        assert m.w_fp16 is None and not m.pinned
    ref = _reference_logits(path, tiny_tokenizer, IDS)
    y = rt.prefill([r.tolist() for r in IDS], all_logits=True)
    assert _rel(y, ref) <= 1e-3, key
    if FORMATS[key][0].kv_cache is not None:
        assert rt.kv_args is not None and rt._cache.k.dtype == torch.int8
    if key == "w8a8c8-channel-res":
        st = rt._cache.stats()
        assert st["kv_patched"] > 0 and st["kv_overflow"] == 0
        # with residuals off the answer moves: the residuals are what made it match
        rt2 = runtime.load(path, device="cpu", kv_residual=False)
        assert _rel(rt2.prefill([r.tolist() for r in IDS], all_logits=True), ref) > 3 * _rel(y, ref) + 1e-5


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral"])
def test_other_families(tmp_path, tiny_tokenizer, arch):
    path = _checkpoint(tmp_path, tiny_tokenizer, "w8a8c8-token", arch=arch)
    rt = runtime.load(path, device="cpu")
    ref = _reference_logits(path, tiny_tokenizer, IDS)
    assert _rel(rt.prefill([r.tolist() for r in IDS], all_logits=True), ref) <= 1e-3


def test_sliding_window_model_matches_transformers(tiny_tokenizer):
    model = make_tiny_model("mistral", sliding_window=8)
    ids = IDS[:, :30]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    rt = runtime.from_float(model, device="cpu", dtype=torch.float32, tokenizer=tiny_tokenizer)
    y = rt.prefill([r.tolist() for r in ids], all_logits=True)
    assert _rel(y, ref) <= 1e-5
    # decode steps with the window: position 29 from the cache must equal the prefill's last logits
    rt.prefill([r[:29].tolist() for r in ids], extra=1)
    d = rt.decode_step(ids[:, 29], torch.full((2,), 29))
    assert _rel(d, ref[:, 29]) <= 1e-5
    full = make_tiny_model("mistral", sliding_window=None)
    with torch.no_grad():
        assert _rel(full(input_ids=ids).logits, ref) > 1e-3  # the window mattered


def test_decode_matches_prefill_and_generation_is_deterministic(tmp_path, tiny_tokenizer):
    path = _checkpoint(tmp_path, tiny_tokenizer, "w8a8c8-token")
    rt = runtime.load(path, device="cpu")
    full = rt.prefill([r.tolist() for r in IDS], all_logits=True)
    rt.prefill([r[:40].tolist() for r in IDS], extra=8)
    for p in range(40, 48):
        d = rt.decode_step(IDS[:, p], torch.full((2,), p))
        assert _rel(d, full[:, p]) <= 1e-4, p
    prompts = [IDS[0, :7].tolist(), IDS[1, :30].tolist()]
    a = rt.generate(prompts, max_new_tokens=12, temperature=0.9, top_p=0.8, seed=5)
    b = rt.generate(prompts, max_new_tokens=12, temperature=0.9, top_p=0.8, seed=5)
    c = rt.generate(prompts, max_new_tokens=12, temperature=0.9, top_p=0.8, seed=6)
    assert a["tokens"] == b["tokens"] and a["tokens"] != c["tokens"]
    assert all(len(t) == 12 for t in a["tokens"])
    # batched prompts of different lengths give what each prompt gives alone (greedy)
    g = rt.generate(prompts, max_new_tokens=6)
    for i, p in enumerate(prompts):
        assert rt.generate([p], max_new_tokens=6)["tokens"][0] == g["tokens"][i]


def test_mixed_checkpoint_pins_fp16_and_releases_to_shadow(tmp_path, tiny_tokenizer):
    from test_sensitivity_export import FP16, _sensitive_file

    model = make_tiny_model("llama", seed=5)
    sl = _sensitive_file(model, tmp_path / "sensitive_layers.json", PRESETS["W8A8"])
    qm = api.quantize(LoadedModel(model, tiny_tokenizer, {"kind": "test"}), Recipe(PRESETS["W8A8"], SQ),
                      calib_set=CALIB, sensitive=sl)
    path = api.export(qm, tmp_path / "mixed")
    rt = runtime.load(path, device="cpu")
    pinned = {n for n, m in rt.linears.items() if m.pinned}
    assert pinned == set(FP16)
    ref = _reference_logits(path, tiny_tokenizer, IDS)  # FP16 layers dense, the rest W8A8
    assert _rel(rt.prefill([r.tolist() for r in IDS], all_logits=True), ref) <= 1e-3
    # released: the sensitive layers run their quantized shadows (W8A8), as a checkpoint without --sensitive would
    for n in FP16:
        rt.precision.release(layer=n)
    shadow_model, _, _ = load_quantkit_checkpoint(path)
    for n in FP16:
        unit = rt.linears[n]
        start = sum(s for p, s in unit.parts[: [p for p, _ in unit.parts].index(n)])
        w = unit.packed.w[start:start + shadow_model.get_submodule(n).out_features].float() * \
            unit.packed.scale[start:start + shadow_model.get_submodule(n).out_features, None]
        shadow_model.get_submodule(n).weight.data.copy_(w)
    plan = plan_simulation(LoadedModel(shadow_model, tiny_tokenizer, {"kind": "quantkit-checkpoint", "path": str(path)}))
    plan.linears = sorted(set(plan.linears) | set(FP16))
    with torch.no_grad(), plan.context(shadow_model):
        ref_rel = shadow_model(input_ids=IDS).logits
    y = rt.prefill([r.tolist() for r in IDS], all_logits=True)
    assert _rel(y, ref_rel) <= 1e-3 and _rel(y, ref) > 1e-3


def test_precision_switch_changes_one_sample_and_leaves_others_bit_identical(tmp_path, tiny_tokenizer):
    path = _checkpoint(tmp_path, tiny_tokenizer, "w8a8")
    rt = runtime.load(path, device="cpu")
    prompts = [IDS[0, :20].tolist(), IDS[1, :20].tolist()]
    base = rt.prefill(prompts, extra=4)
    tok = base.argmax(-1)
    pos = torch.full((2,), 20)
    plain = rt.decode_step(tok, pos)
    rt.prefill(prompts, extra=4)
    rt.precision.force_fp16(sample=1)
    forced = rt.decode_step(tok, pos)
    assert torch.equal(forced[0], plain[0])  # the other sample: bit-identical
    assert not torch.equal(forced[1], plain[1])  # the forced sample switched on its next token
    rt.precision.release(sample=1)
    # a token range widened to 64-token groups; a layer; bad names are refused
    rt.precision.force_fp16(tokens=(0, 10), sample=0)
    assert rt.precision.group_bits[0, 0] == 1 and rt.precision.any_rows
    rt.precision.release(tokens=(0, 10), sample=0)
    assert not rt.precision.any_rows
    name = "model.layers.0.mlp.down_proj"
    rt.precision.force_fp16(layer=name)
    assert rt.linears[name].force_fp16
    rt.prefill(prompts, extra=4)
    y = rt.decode_step(tok, pos)
    assert not torch.equal(y, plain)
    from quantkit.runtime.precision import PrecisionError

    with pytest.raises(PrecisionError):
        rt.precision.force_fp16(layer="model.layers.9.mlp.down_proj")
    with pytest.raises(PrecisionError):
        rt.precision.force_fp16(sample=7)
    with pytest.raises(PrecisionError):
        rt.precision.force_fp16(tokens=(5, 3))


def test_fallback_monitor_fires_on_planted_drift_only(tmp_path, tiny_tokenizer):
    from quantkit.runtime.calibrate import default_monitor_layers, monitor_histograms

    path = _checkpoint(tmp_path, tiny_tokenizer, "w8a8")
    rt = runtime.load(path, device="cpu")
    layers = default_monitor_layers(rt, 2)
    g = torch.Generator().manual_seed(0)
    hists = monitor_histograms(rt, torch.randint(3, 512, (8, 128), generator=g), layers, bins=64)
    mon = rt.enable_monitor(hists, layers)
    text = torch.randint(3, 512, (3, 200), generator=torch.Generator().manual_seed(9))
    clean = rt.perplexity(text, batch_size=3, chunk=64)
    assert mon.switches == [] and rt.stats.fallback_rate == 0.0 and rt.stats.windows_checked == 9

    def plant(_m, args):  # sample 1's activations drift (x8) at the first monitored linear
        return (args[0] * torch.tensor([1.0, 8.0, 1.0]).view(3, 1, 1),)

    h = rt.linears[layers[0]].register_forward_pre_hook(plant)
    try:
        rt.perplexity(text, batch_size=3, chunk=64)
    finally:
        h.remove()
    assert [(s.request, s.token, s.layer, s.statistic) for s in mon.switches] == [(1, 63, layers[0], "kl")]
    assert rt.precision.fp16_samples() == [1]
    assert rt.stats.fp16_tokens == 200 - 64  # the rest of the request
    assert clean.ppl > 0


def test_loader_refuses_what_it_cannot_run(tmp_path, tiny_tokenizer):
    from quantkit.errors import UsageError

    model_dir = tmp_path / "plain"
    make_tiny_model("llama").save_pretrained(model_dir)
    with pytest.raises(UsageError, match="not a quantkit checkpoint"):
        runtime.load(model_dir, device="cpu")
    with pytest.raises(UsageError, match="not a directory"):
        runtime.load(tmp_path / "nope", device="cpu")
    path = _checkpoint(tmp_path, tiny_tokenizer, "w4-g32-asym")
    blob = path / "model.safetensors"
    data = bytearray(blob.read_bytes())
    data[-3] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(UsageError, match="failed verification"):
        runtime.load(path, device="cpu")


def test_cli_generate_eval_runtime_and_bench(tmp_path, tiny_tokenizer):
    path = _checkpoint(tmp_path, tiny_tokenizer, "w8a8c8-token")
    code, out = run_cli("generate", path, "--prompt", "def f(x):", "--max-new-tokens", "5", "--device", "cpu",
                        "--no-fallback", "--json", tmp_path / "g.json")
    assert code == 0, out
    res = json.loads((tmp_path / "g.json").read_text())
    assert len(res["tokens"][0]) == 5
    code, out = run_cli("generate", path, "--prompt", "a", "--max-new-tokens", "0", "--device", "cpu")
    assert code == 2 and "--max-new-tokens must be at least 1" in out
    code, out = run_cli("generate", path, "--prompt", "a", "--top-p", "1.5", "--device", "cpu")
    assert code == 2 and "--top-p" in out
    code, out = run_cli("eval", "--model", path, "--runtime", "--windows", "2", "--seqlen", "64", "--json",
                        tmp_path / "e.json")
    assert code == 0, out
    row = json.loads((tmp_path / "e.json").read_text())["rows"][0]
    code, out = run_cli("eval", "--model", path, "--windows", "2", "--seqlen", "64", "--json", tmp_path / "s.json")
    sim = json.loads((tmp_path / "s.json").read_text())["rows"][0]
    assert abs(row["ppl"] / sim["ppl"] - 1) < 1e-3 and "runtime kernels" in row["simulated"]
    code, out = run_cli("eval", "--model", path, "--fallback", "--windows", "2")
    assert code == 2 and "--fallback needs --runtime" in out
    code, out = run_cli("bench", "--shape", "tiny", "--scheme", "W8A8C8", "--layers", "2", "--batch", "1,2",
                        "--prompt-len", "16", "--gen-len", "4", "--device", "cpu", "--fallback", "--json",
                        tmp_path / "b.json")
    assert code == 0, out
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert {r["role"] for r in rows} == {"quantized", "monitor", "runtime-float", "transformers"}
    assert all(r["decode_tok_s"] > 0 and r["decode_steps"] == 3 for r in rows if r["role"] != "transformers")
    code, out = run_cli("bench", "--shape", "tiny", "--batch", "0", "--device", "cpu")
    assert code == 2 and "--batch" in out
    code, out = run_cli("bench", "--device", "cpu")
    assert code == 2 and "--shape" in out


def test_generation_past_max_positions_is_refused(tmp_path, tiny_tokenizer):
    from quantkit.errors import UsageError

    path = _checkpoint(tmp_path, tiny_tokenizer, "w4-g32-asym")
    rt = runtime.load(path, device="cpu")
    with pytest.raises(UsageError, match="exceed the model's max_position_embeddings 256"):
        rt.generate([IDS[0, :40].tolist()], max_new_tokens=300)


def test_monitor_statistics_and_skew_rule():
    """KL and skewness of a window against the calibration histogram; the skew drift rule applies only
    to linears whose calibration skewness is moderate."""
    from quantkit.runtime.monitor import FallbackMonitor, histogram_skewness

    bins, lo, hi = 64, -4.0, 4.0
    g = torch.Generator().manual_seed(0)
    calib = torch.randn(200000, generator=g)
    counts = torch.histc(calib, bins, lo, hi)
    hists = {"a": (counts, (lo, hi), 0.0), "b": (counts, (lo, hi), 40.0), "c": (counts, (lo, hi))}
    assert abs(histogram_skewness(counts, lo, hi)) < 0.05
    mon = FallbackMonitor(hists, ["b", "a", "c"], 2, "cpu", bins=bins, kl_threshold=1e9)  # skew alone decides
    assert mon.skew_active == [False, True, True]
    mon.row_sample = torch.tensor([0, 0, 1, 1])
    mon.row_weight = torch.ones(4)
    same = torch.randn(4, 5000, generator=g)
    skewed = torch.where(torch.rand(4, 5000, generator=g) < 0.97, torch.randn(4, 5000, generator=g) * 0.3,
                         torch.rand(4, 5000, generator=g) * 4)  # a heavy right tail: skew well above 3
    for i, y in enumerate((skewed, skewed, same)):
        y = y.clone()
        y[:2] = same[:2]  # sample 0 looks like calibration everywhere
        mon.observe(i, y)
    kl, skew = mon.statistics()
    assert (kl[:, 0] < 0.02).all() and abs(skew[1, 0]) < 0.2
    assert skew[0, 1] > 3 and skew[1, 1] > 3 and kl[1, 1] > 0.02
    fired = mon.check([0, 1], {0: 63, 1: 63})
    assert fired == [1]
    assert [(s.layer, s.statistic) for s in mon.switches] == [("a", "skew")]  # "b" (heavy-tailed calibration) ignored


def test_decode_steps_run_inside_the_runtimes_chain(tmp_path, tiny_tokenizer, monkeypatch):
    """Every quantized linear of a decode step runs inside ``kernels._common.runtime_chain()`` (its launches chain,
    a config's CHAINED entry applies), none of a prefill's, and nothing after the step."""
    from quantkit.kernels import _common
    from quantkit.runtime.linear import QuantLinear

    rt = runtime.load(_checkpoint(tmp_path, tiny_tokenizer, "w4-g32-asym"), device="cpu")
    seen = []
    plain = QuantLinear._quantized

    def spy(self, x):
        seen.append(_common._in_runtime_chain)
        return plain(self, x)

    monkeypatch.setattr(QuantLinear, "_quantized", spy)
    tok = rt.prefill([IDS[0, :9].tolist()], extra=2).argmax(-1)
    n_prefill = len(seen)
    rt.decode_step(tok, torch.tensor([9]))
    assert n_prefill >= 4 and len(seen) == 2 * n_prefill  # a tiny block has at least four quantized linears
    assert not any(seen[:n_prefill]) and all(seen[n_prefill:])
    assert _common._in_runtime_chain is False


def test_bench_runtime_prefill_is_the_median_of_several():
    """``bench_runtime``'s prefill time: the median of the generate's prefill and ``prefill_reps`` more prefills of
    the same prompts (one pass is a single, noisy sample), each kept in the row."""
    import statistics

    from quantkit.runtime import bench as rb

    rt = api.runtime_for_shape("tiny", PRESETS["W4A16"], device="cpu", layers=1)
    row = rb.bench_runtime(rt, "tiny", batch=2, prompt_len=8, gen_len=3, prefill_reps=2)
    runs = row.extra["prefill_s_runs"]
    assert len(runs) == 3 and all(t > 0 for t in runs)
    assert row.prefill_s == statistics.median(runs) and row.decode_steps == 2
