"""The runtime on a real GPU (Triton kernels, CUDA graphs): formats against the simulated dense model,
graph replay against eager, bit-identical samples under a precision switch, the monitor in a graph."""

from __future__ import annotations

import pytest
import torch

from test_runtime import CALIB, IDS, _checkpoint, _reference_logits, _rel
from quantkit import runtime
from quantkit.kernels import attention as A
from quantkit.quant import kv as kvq

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _reference_logits_fp16_gpu(path, tokenizer, ids):
    from quantkit.models.checkpoint import load_quantkit_checkpoint
    from quantkit.models.loading import LoadedModel
    from quantkit.runtime.simulate import plan_simulation

    ref, _, _ = load_quantkit_checkpoint(path, dtype=torch.float16)
    ref = ref.cuda()
    plan = plan_simulation(LoadedModel(ref, tokenizer, {"kind": "quantkit-checkpoint", "path": str(path)}))
    with torch.no_grad(), plan.context(ref):
        return ref(input_ids=ids.cuda()).logits.float().cpu()


@pytest.mark.parametrize("key", ["w4-g32-asym", "w8-g32", "gptq-w4", "awq", "w3-g32-ref", "w8a8", "w8a8-static-act",
                                 "w8a8c8-token", "w8a8c8-channel-res", "w4a4kv4-spinquant",
                                 "w8a8-spinquant-r4"])
def test_formats_on_gpu(tmp_path, tiny_tokenizer, key):
    path = _checkpoint(tmp_path, tiny_tokenizer, key)
    rt = runtime.load(path, device="cuda", dtype=torch.float16, kv_residual_slots=64)
    ref = _reference_logits(path, tiny_tokenizer, IDS)
    y = rt.prefill([r.tolist() for r in IDS], all_logits=True)
    assert torch.isfinite(y).all()
    # fp16 activations flip some rounding decisions of the fp32 reference; with 4-bit activations one
    # flip moves a value by 1/7 of its row's max. The bar: 3e-2, or twice what the same simulation run
    # in fp16 on the GPU (no runtime involved) differs from the fp32 one, whichever is larger.
    noise = _rel(_reference_logits_fp16_gpu(path, tiny_tokenizer, IDS), ref)
    assert _rel(y.cpu(), ref) <= max(3e-2, 2 * noise), (key, noise)


def _graph_equals_eager(rt) -> list:
    """Greedy tokens of two prompts with eager decode steps and with CUDA-graph replay: equal; the prompts."""
    prompts = [IDS[0, :20].tolist(), IDS[1, :33].tolist()]
    rt.use_graphs = False
    eager = rt.generate(prompts, max_new_tokens=10)
    rt.use_graphs = True
    graph = rt.generate(prompts, max_new_tokens=10)
    assert eager["tokens"] == graph["tokens"]
    assert rt._graphs  # captured
    return prompts


def test_graph_replay_equals_eager_and_switch_keeps_other_samples(tmp_path, tiny_tokenizer):
    path = _checkpoint(tmp_path, tiny_tokenizer, "w8a8c8-token")
    rt = runtime.load(path, device="cuda", dtype=torch.float16)
    prompts = _graph_equals_eager(rt)
    # one step, plain graph vs the row-bits graph with sample 1 forced: sample 0 bit-identical
    logits = rt.prefill(prompts, extra=4)
    tok = logits.argmax(-1)
    pos = torch.tensor([20, 33], device="cuda")
    plain = rt.decode_step(tok, pos).clone()
    rt.prefill(prompts, extra=4)
    rt.precision.force_fp16(sample=1)
    forced = rt.decode_step(tok, pos).clone()
    assert torch.equal(forced[0], plain[0]) and not torch.equal(forced[1], plain[1])


@pytest.mark.parametrize("key", ["w4-g32-asym", "w8a8c8-token"])
def test_pdl_chain_changes_no_bit(tmp_path, tiny_tokenizer, key, monkeypatch):
    """The runtime's programmatic launch chain (``_common.CHAIN_PDL``, on by default on sm_90+: each fused launch
    lets the next start and waits for the one before) against plain launches: every decode step's logits equal
    bit for bit, eager and in CUDA graphs (a launch that read its input before its wait would differ)."""
    from quantkit.kernels import _common

    if not _common.pdl_supported(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs sm_90+")
    rt = runtime.load(_checkpoint(tmp_path, tiny_tokenizer, key), device="cuda", dtype=torch.float16)
    _assert_chain_changes_no_bit(rt, monkeypatch, key)


def _assert_chain_changes_no_bit(rt, monkeypatch, what, batch=2):
    """Six greedy decode steps' logits with the runtime's chain on equal them with it off, eager and in graphs."""
    from quantkit.kernels import _common

    prompts = [IDS[0, :20].tolist(), IDS[1, :33].tolist()][:batch]
    steps = {}
    for on in (True, False):
        monkeypatch.setattr(_common, "CHAIN_PDL", on)
        rt.drop_graphs()
        for graphs in (False, True):
            rt.use_graphs = graphs
            tok = rt.prefill(prompts, extra=8).argmax(-1)
            pos = torch.tensor([20, 33][:batch], device="cuda")
            out = []
            for i in range(6):
                out.append(rt.decode_step(tok, pos + i).float().clone())
                tok = out[-1].argmax(-1)
            steps[on, graphs] = torch.stack(out)
    assert rt._graphs and torch.isfinite(steps[False, False]).all()
    for graphs in (False, True):
        assert torch.equal(steps[True, graphs], steps[False, graphs]), (what, graphs)


def test_chained_configs_change_no_bit(monkeypatch):
    """W4A16 entries whose CHAINED config (the in-place half2 GEMV launched with PDL, PREFETCH and PDL_CHAIN) runs
    inside the runtime's chain, as the H100 file ships at 4096x4096 and 6144x4096: the decode steps' logits equal the
    chain-off run's (the plain entries) bit for bit, eager and in graphs, and the chained plans are what ran."""
    from quantkit import api
    from quantkit.kernels import _common, wna16
    from quantkit.recipe import PRESETS

    if not _common.pdl_supported(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs sm_90+")
    plain = dict(wna16._gemv_h2(32, 2, 1), SLICE_PRESCALE=True)
    entry = dict(plain, CHAINED=dict(plain, PDL=True, PREFETCH=2, PDL_CHAIN=True))
    tuned = wna16.CONFIGS.get
    monkeypatch.setattr(wna16.CONFIGS, "get", lambda M, N, K, gpu: dict(entry) if M == 1 else tuned(M, N, K, gpu))
    monkeypatch.setattr(wna16, "_PLANS", {})
    rt = api.runtime_for_shape("tiny", PRESETS["W4A16"], device="cuda")
    _assert_chain_changes_no_bit(rt, monkeypatch, "chained W4A16", batch=1)  # M = 1: the half2 GEMV's entries
    ran = {key[-1] for key, p in wna16._PLANS.items() if p[0] == "gemv_h2" and p[3]["CHAIN"]}
    assert ran == {True}  # the PDL_CHAIN launches: inside the chain only


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "gemma2"])
def test_moe_and_softcap_graph_replay_equals_eager(tmp_path, tiny_tokenizer, arch):
    """A mixture-of-experts model through the CUDA-graph decode (the static all-experts dispatch, no host
    sync inside the capture) gives the tokens of the eager grouped dispatch; Gemma 2's soft-capped decode
    kernel inside a graph too."""
    path = _checkpoint(tmp_path, tiny_tokenizer, "w4-g32-asym", arch=arch)
    _graph_equals_eager(runtime.load(path, device="cuda", dtype=torch.float16))


@pytest.mark.parametrize("latent_cache", [False, True], ids=["per-head", "latent"])
@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v2"])
def test_latent_attention_on_gpu(tmp_path, tiny_tokenizer, arch, latent_cache):
    """DeepSeek's multi-head latent attention in fp16: prefill against the fp32 simulated dense model (the bar
    of test_formats_on_gpu), decode steps (the Triton decode kernel on K/V per head zero-padded to 32, or the
    latent cache's masked full-length attention) against the prefill's logits, and CUDA-graph replay (the
    routers and the static MoE dispatch inside the graph) giving the eager tokens."""
    path = _checkpoint(tmp_path, tiny_tokenizer, "w4-g32-asym", arch=arch)
    rt = runtime.load(path, device="cuda", dtype=torch.float16, latent_cache=latent_cache)
    ref = _reference_logits(path, tiny_tokenizer, IDS)
    full = rt.prefill([r.tolist() for r in IDS], all_logits=True).float().cpu()
    noise = _rel(_reference_logits_fp16_gpu(path, tiny_tokenizer, IDS), ref)
    assert _rel(full, ref) <= max(3e-2, 2 * noise), noise
    rt.use_graphs = False
    rt.prefill([r[:40].tolist() for r in IDS], extra=8)
    for p in range(40, 48):
        d = rt.decode_step(IDS[:, p].cuda(), torch.full((2,), p, device="cuda"))
        assert _rel(d.float().cpu(), full[:, p]) <= 1e-2, p
    _graph_equals_eager(rt)


def test_monitor_inside_graphs(tmp_path, tiny_tokenizer):
    from quantkit.runtime.calibrate import default_monitor_layers, monitor_histograms

    path = _checkpoint(tmp_path, tiny_tokenizer, "w8a8")
    rt = runtime.load(path, device="cuda", dtype=torch.float16)
    layers = default_monitor_layers(rt, 2)
    hists = monitor_histograms(rt, CALIB.input_ids.repeat(2, 4), layers, bins=64)
    mon = rt.enable_monitor(hists, layers, kl_threshold=1e-9)  # fires at the first completed window
    res = rt.generate([IDS[0, :10].tolist(), IDS[1, :40].tolist()], max_new_tokens=40)
    # sample 1 completes its window at position 63 during decode (sample 0 has not: 10 + 39 < 64)
    assert [(s.request, s.token) for s in mon.switches] == [(1, 63)]
    assert res["fp16_samples"] == [1]


@pytest.mark.parametrize("strategy", ["float", "token", "channel", "channel-res"])
def test_decode_attention_llama8b_heads(strategy):
    B, Hq, Hkv, T, D = 4, 32, 8, 3000, 128
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, Hq, D, generator=g).bfloat16().cuda()
    k = torch.randn(B, Hkv, T, D, generator=g).cuda()
    v = torch.randn(B, Hkv, T, D, generator=g).cuda()
    lens = torch.tensor([3000, 1, 777, 2048], dtype=torch.int32, device="cuda")
    kw = {}
    if strategy == "float":
        kc, vc = k.bfloat16(), v.bfloat16()
    elif strategy == "token":
        ks, vs = kvq.kv_scale(k, "token"), kvq.kv_scale(v, "token")
        kc, vc = kvq.quantize_kv(k, ks), kvq.quantize_kv(v, vs)
        kw.update(k_scale=ks[..., 0].contiguous(), v_scale=vs[..., 0].contiguous())
    else:
        ks = kvq.static_scale(kvq.channel_amax(k)).view(1, Hkv, 1, D)
        vs = kvq.static_scale(kvq.channel_amax(v)).view(1, Hkv, 1, D)
        kc, vc = kvq.quantize_kv(k, ks), kvq.quantize_kv(v, vs)
        kw.update(k_scale=ks.reshape(Hkv, D).contiguous(), v_scale=vs.reshape(Hkv, D).contiguous())
        if strategy.endswith("res"):
            for which in ("k_res", "v_res"):
                C = 200
                pick = torch.rand(B, Hkv, T, generator=g) < 0.05
                slot = pick.to(torch.int32).cumsum(-1) - 1
                idx = torch.where(pick & (slot < C), slot, -1).to(torch.int16)
                rq = torch.randint(-7, 8, (B, Hkv, C + 1, D), generator=g, dtype=torch.int8)
                kw[which] = A.Residuals(idx.cuda(), A.pack_nibbles(rq).cuda(),
                                        (torch.rand(B, Hkv, C + 1, generator=g) * 0.05).cuda(), 4)
    y = A.decode_attention(q, kc, vc, lens, **kw)
    ref = A.decode_attention_ref(q, kc, vc, lens, **kw)
    err = float((y.float() - ref.float()).norm() / ref.float().norm())
    assert torch.isfinite(y).all() and err <= 1e-2, err
