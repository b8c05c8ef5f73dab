"""DeepSeek-V2/V3 on the runtime (CPU, kernels' torch references): multi-head latent attention (q through
its low-rank pair or a plain q_proj, K/V rebuilt per head from the normed latent, RoPE on interleaved pairs
or on halves, YaRN's softmax scale) and the MoE (V3: sigmoid scores with the correction bias, group-limited
top-k, normalized, scaled; V2: softmax, greedy or group-limited, scaled) against transformers' forward on
the same dequantized checkpoint, in float32: prefill, padded batches, chunked prefill, token-by-token
decode, greedy generation, with K and V cached per head and with the latent cache (kv_b absorbed); the INT8
KV cache against the simulated dense model; and what is refused."""

from __future__ import annotations

import json

import pytest
import torch

from quantkit import api, runtime
from quantkit.models.checkpoint import load_quantkit_checkpoint
from quantkit.models.loading import LoadedModel
from quantkit.recipe import KVCacheArgs, QuantArgs, Recipe, Scheme, Stage
from quantkit.runtime.kvcache import LatentCache
from quantkit.runtime.model import MoE
from test_runtime import _reference_logits
from tiny_models import make_tiny_model

W4 = Scheme(QuantArgs(4, 32, False))
IDS = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(4))
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64, mscale=1.0,
            mscale_all_dim=0.5, beta_fast=32, beta_slow=1)  # mscale != mscale_all_dim: both scales != 1
VARIANTS = {
    "v3": ("deepseek_v3", {}),  # q_lora_rank set, interleaved RoPE, 2 expert groups (1 kept), scaling 2.5
    "v3-halves-yarn": ("deepseek_v3", dict(rope_interleave=False, rope_parameters=YARN, norm_topk_prob=False)),
    "v2": ("deepseek_v2", {}),  # V2-Lite's shape: plain q_proj, softmax greedy top-k
    "v2-grouped": ("deepseek_v2", dict(q_lora_rank=64, topk_method="group_limited_greedy", n_group=2, topk_group=1,
                                       routed_scaling_factor=1.5)),
}


@pytest.fixture(autouse=True)
def _torch_references(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _model(arch, **kw):
    """A tiny random DeepSeek model, norms and biases random, V3's router correction bias random too (it
    starts at zero, which would hide a router that ignores it)."""
    m = make_tiny_model(arch, seed=3, randomize=True, **kw)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for blk in m.model.layers:
            bias = getattr(blk.mlp, "gate", None) is not None and getattr(blk.mlp.gate, "e_score_correction_bias", None)
            if bias is not None and bias is not False:
                bias.copy_(torch.randn(bias.shape, generator=g) * 0.2)
    return m


def _checkpoint(tmp_path, tokenizer, model, scheme=W4, stages=(Stage("rtn"),), calib=None):
    qm = api.quantize(LoadedModel(model, tokenizer, {"kind": "test"}), Recipe(scheme, stages), calib_set=calib)
    return api.export(qm, tmp_path / "ckpt")


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("latent_cache", [False, True], ids=["per-head", "latent"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_latent_attention_matches_transformers(variant, latent_cache, tmp_path, tiny_tokenizer):
    arch, kw = VARIANTS[variant]
    out = _checkpoint(tmp_path, tiny_tokenizer, _model(arch, **kw))
    ref, _, _ = load_quantkit_checkpoint(out)
    rt = runtime.load(out, device="cpu", latent_cache=latent_cache)
    assert [isinstance(b.mlp, MoE) for b in rt.blocks] == [False, True, True]  # first_k_dense_replace = 1
    assert all(m.kind == "wna16" for m in rt.linears.values()) and not any(n.endswith(".gate") for n in rt.linears)
    assert rt.blocks[0].sm_scale == ref.model.layers[0].self_attn.scaling
    rt.ensure(2, 24)
    if latent_cache:  # one K head [latent 32 | k_pe 8] a token; kv_b is absorbed (a float linear, not run per token)
        assert isinstance(rt._cache, LatentCache) and rt._cache.x.shape == (3, 2, 1, 24, 40)
        quantized = json.loads((out / "quantkit.json").read_text())["modules"]
        assert set(rt.linears) == {n for n in quantized if not n.endswith("kv_b_proj")}
    else:  # K (16 + 8) and V (16) per head, zero-padded to 32
        assert (rt.head_dim, rt.v_dim, rt.n_kv) == (32, 16, 6) and rt._cache.k.shape == (3, 2, 6, 24, 32)
    with torch.no_grad():
        want = ref(input_ids=IDS).logits
    # prefill, one forward and in chunks of 7 (later chunks attend to the cache with a mask)
    assert _rel(rt.prefill([r.tolist() for r in IDS], all_logits=True), want) <= 1e-5
    assert _rel(rt.prefill([r.tolist() for r in IDS], all_logits=True, chunk=7), want) <= 1e-5
    # token by token: decode steps against the full forward's logits at each position
    p0 = 16
    rt.prefill([r[:p0].tolist() for r in IDS], extra=IDS.shape[1] - p0)
    for p in range(p0, IDS.shape[1]):
        assert _rel(rt.decode_step(IDS[:, p], torch.full((2,), p)), want[:, p]) <= 1e-5, p
    # the decode program a CUDA graph captures (all experts on every row, run eagerly here): same logits
    rt.prefill([r[:p0].tolist() for r in IDS], extra=1)
    rt.use_graphs = True
    static = rt._decode_eager(IDS[:, p0], torch.full((2,), p0))
    rt.use_graphs = False
    assert _rel(static, want[:, p0]) <= 1e-5
    # a padded batch: prompts of 5 and 24 tokens together give what each gives alone
    prompts = [IDS[0, :5].tolist(), IDS[1].tolist()]
    got = rt.prefill(prompts, all_logits=True)
    with torch.no_grad():
        alone = ref(input_ids=IDS[:1, :5]).logits[0]
    assert _rel(got[0, :5], alone) <= 1e-5 and _rel(got[1], want[1]) <= 1e-5
    # greedy generation of the padded batch against transformers' greedy continuation of each prompt
    g = rt.generate(prompts, max_new_tokens=4)
    for b, p in enumerate(prompts):
        seq = torch.tensor([p])
        with torch.no_grad():
            for _ in range(4):
                seq = torch.cat([seq, ref(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert g["tokens"][b] == seq[0, len(p):].tolist(), b


def test_what_the_comparison_would_catch(tmp_path, tiny_tokenizer):
    """The checks above can fail: RoPE on halves instead of pairs, or V3's router without its correction
    bias, moves the logits by far more than the 1e-5 the runtime is held to."""
    m = _model("deepseek_v3")
    rt = runtime.from_float(m, device="cpu", dtype=torch.float32)
    ref = _model("deepseek_v3")
    with torch.no_grad():
        want = ref(input_ids=IDS).logits
        assert _rel(rt.prefill([r.tolist() for r in IDS], all_logits=True), want) <= 1e-5
        for b in rt.blocks:
            b.latent.interleave = False
        assert _rel(rt.prefill([r.tolist() for r in IDS], all_logits=True), want) > 1e-3
        for b in rt.blocks:
            b.latent.interleave = True
            if isinstance(b.mlp, MoE):
                b.mlp.router.e_score_correction_bias.zero_()
        assert _rel(rt.prefill([r.tolist() for r in IDS], all_logits=True), want) > 1e-3


@pytest.mark.parametrize("kv", [KVCacheArgs(8, "token", dynamic=True),
                                KVCacheArgs(8, "channel", dynamic=False, residual_bits=4, residual_tau=1.5)],
                         ids=["token", "channel-residual"])
@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v2"])
def test_int8_kv_cache_matches_the_simulation(arch, kv, tmp_path, tiny_tokenizer):
    """W4A16 with an INT8 KV cache: the runtime quantizes each head's K (nope + rope) and V as the simulation
    (`quantkit eval`) does, the per-channel scales narrower than the padded cache head and K's rope channels
    in each model's order (V2 keeps rotated pairs in place, V3 writes them as halves)."""
    calib = type("C", (), {"input_ids": torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(0)),
                           "settings": {"source": "test"}})()
    out = _checkpoint(tmp_path, tiny_tokenizer, _model(arch), Scheme(QuantArgs(4, 32, False), kv_cache=kv),
                      calib=calib)
    rt = runtime.load(out, device="cpu", kv_residual_slots=24)
    want = _reference_logits(out, tiny_tokenizer, IDS)
    got = rt.prefill([r.tolist() for r in IDS], all_logits=True)
    assert rt._cache.k.dtype == torch.int8 and _rel(got, want) <= 1e-4
    if kv.residual_bits:
        assert rt._cache.stats()["kv_patched"] > 0
    ref, _, _ = load_quantkit_checkpoint(out)
    with torch.no_grad():
        assert _rel(ref(input_ids=IDS).logits, want) > 10 * _rel(got, want)  # the KV quantization mattered
    rt.prefill([r[:20].tolist() for r in IDS], extra=1)
    assert _rel(rt.decode_step(IDS[:, 20], torch.full((2,), 20)), want[:, 20]) <= 1e-4


def test_online_rotations_refused_before_any_weight(tmp_path, tiny_tokenizer):
    """A manifest with online rotations (SpinQuant refuses DeepSeek, so only a foreign one has them): one
    line, before a weight is read (the weights file here is not even safetensors)."""
    from quantkit.runtime.loader import RuntimeLoadError

    out = _checkpoint(tmp_path, tiny_tokenizer, _model("deepseek_v2"))
    man = json.loads((out / "quantkit.json").read_text())
    man["online_rotations"] = {"version": 1, "r4": {"kind": "hadamard", "size": 160}}
    (out / "quantkit.json").write_text(json.dumps(man))
    (out / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(RuntimeLoadError, match=r"online rotations \(R4\) with multi-head latent attention "
                                               r"\(model type deepseek_v2\); score this checkpoint"):
        runtime.load(out, device="cpu", verify=False)


def test_latent_cache_refusals(tmp_path, tiny_tokenizer):
    """The latent cache takes weight-only checkpoints with a float KV cache: quantized activations, an INT8
    KV cache and a model without latent attention are refused in one line before a weight is read; with it,
    kv_b (absorbed) is no layer whose precision can be forced."""
    from quantkit.errors import UsageError
    from quantkit.recipe import PRESETS
    from quantkit.runtime.loader import RuntimeLoadError
    from quantkit.runtime.precision import PrecisionError

    cases = [("deepseek_v2", PRESETS["W8A8"], "not quantized activations"),
             ("deepseek_v3", Scheme(QuantArgs(4, 32, False), kv_cache=KVCacheArgs(8, "token", dynamic=True)),
              "not an INT8 KV cache"),
             ("llama", W4, "the latent cache is for multi-head latent attention")]
    for arch, scheme, why in cases:
        out = _checkpoint(tmp_path / arch, tiny_tokenizer, make_tiny_model(arch, seed=3), scheme)
        (out / "model.safetensors").write_bytes(b"not safetensors")
        with pytest.raises(RuntimeLoadError, match=why):
            runtime.load(out, device="cpu", verify=False, latent_cache=True)
    with pytest.raises(UsageError, match="the latent cache is for multi-head latent attention"):
        runtime.from_float(make_tiny_model("llama"), device="cpu", latent_cache=True)
    rt = runtime.from_float(_model("deepseek_v2"), device="cpu", latent_cache=True)
    rt.ensure(1, 8)
    rt.precision.force_fp16(layer="model.layers.0.self_attn.q_proj")
    with pytest.raises(PrecisionError):
        rt.precision.force_fp16(layer="model.layers.0.self_attn.kv_b_proj")


def test_latent_cache_from_the_cli(tmp_path, tiny_tokenizer):
    """--latent-cache on generate, eval --runtime and bench: the same greedy tokens and perplexity as K/V per
    head; a setting of the runtime, so eval without --runtime and bench --shape refuse it in one line."""
    import json

    from tiny_models import run_cli

    out = _checkpoint(tmp_path, tiny_tokenizer, _model("deepseek_v3"))
    got = {}
    for flag in ("--no-latent-cache", "--latent-cache"):
        js = tmp_path / f"gen{flag}.json"
        code, text = run_cli("generate", out, "-p", "def f(x):", "--max-new-tokens", "6", "--no-fallback",
                             "--device", "cpu", "--json", js, flag)
        assert code == 0, text
        ev = tmp_path / f"eval{flag}.json"
        code, text = run_cli("eval", "-m", out, "--runtime", "--seqlen", "32", "--windows", "2", "--device", "cpu",
                             "--json", ev, flag)
        assert code == 0, text
        got[flag] = (json.loads(js.read_text())["tokens"], json.loads(ev.read_text())["rows"][0]["ppl"])
    assert got["--latent-cache"][0] == got["--no-latent-cache"][0]
    assert got["--latent-cache"][1] == pytest.approx(got["--no-latent-cache"][1], rel=1e-4)
    code, text = run_cli("eval", "-m", out, "--latent-cache", "--device", "cpu")
    assert code == 2 and "--latent-cache needs --runtime" in text, text
    code, text = run_cli("bench", "--shape", "tiny", "--latent-cache")
    assert code == 2 and "--latent-cache is for DeepSeek" in text, text
