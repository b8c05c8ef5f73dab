"""The layer-by-layer pipeline: equivalence with the full forward, hooks, statistics, RTN."""

import pytest
import torch

from tiny_models import make_tiny_model
from quantkit.calib.capture import InputStats, capture_inputs
from quantkit.calib.pipeline import BlockView, is_ignored, run_layerwise
from quantkit.methods.base import BlockContext, Method, get_method
from quantkit.models.adapter import ModelAdapter, UnsupportedModelError
from quantkit.quant.core import quantize_weight
from quantkit.recipe import QuantArgs, RecipeError, Scheme


def test_adapter_finds_parts(tiny_arch):
    model = make_tiny_model(tiny_arch)
    ad = ModelAdapter.for_model(model)
    assert len(ad.blocks()) == 3
    lin = ad.block_linears(1)
    assert list(lin) == [
        f"model.layers.1.{n}"
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    ]
    assert all(isinstance(m, torch.nn.Linear) for m in lin.values())
    assert lin["model.layers.1.self_attn.k_proj"].out_features == 2 * (96 // 6) or tiny_arch == "qwen3"
    assert len(ad.all_linears()) == 21
    assert ad.final_norm() is model.model.norm and ad.embed() is model.model.embed_tokens
    for g in ad.spec.scale_groups:
        ad.blocks()[0].get_submodule(g.producer)
        for c in g.consumers:
            ad.blocks()[0].get_submodule(c)


def test_adapter_refuses_unknown_family():
    class Fake(torch.nn.Module):
        class config:
            model_type = "gpt_neox"

    with pytest.raises(UnsupportedModelError, match="gpt_neox.*llama"):
        ModelAdapter.for_model(Fake())


def test_pipeline_equals_full_forward(tiny_arch):
    model = make_tiny_model(tiny_arch, seed=3)
    ids = torch.randint(0, 512, (5, 40), generator=torch.Generator().manual_seed(0))
    ref = model.model(input_ids=ids).last_hidden_state
    res = run_layerwise(model, ids, [], batch_size=2, return_hidden=True)
    out = torch.cat(res.hidden)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # The stubs are gone: the model still runs normally afterwards.
    torch.testing.assert_close(model.model(input_ids=ids).last_hidden_state, ref)


def test_rtn_through_pipeline_equals_direct_quantization():
    model = make_tiny_model("llama", seed=4)
    args = QuantArgs(bits=4, group_size=32, symmetric=False)
    originals = {k: v.weight.detach().clone() for k, v in ModelAdapter.for_model(model).all_linears().items()}
    rtn = get_method("rtn")(Scheme(args))
    ids = torch.randint(0, 512, (2, 16))
    res = run_layerwise(model, ids, [rtn], ignore=("re:.*down_proj",))
    assert len(res.results) == 18 and not any("down_proj" in k for k in res.results)
    linears = ModelAdapter.for_model(model).all_linears()
    for name, w0 in originals.items():
        if "down_proj" in name:
            assert torch.equal(linears[name].weight, w0)
            continue
        ref = quantize_weight(w0, args)
        assert torch.equal(res.results[name].q, ref.q)
        torch.testing.assert_close(linears[name].weight.detach(), ref.dequantize())


def test_data_free_run_matches_data_run():
    a, b = make_tiny_model("qwen2", seed=5), make_tiny_model("qwen2", seed=5)
    rtn = get_method("rtn")(Scheme(QuantArgs(bits=8)))
    r1 = run_layerwise(a, None, [rtn])
    r2 = run_layerwise(b, torch.randint(0, 512, (2, 8)), [rtn])
    assert r1.results.keys() == r2.results.keys()
    assert all(torch.equal(r1.results[k].q, r2.results[k].q) for k in r1.results)


def test_quantized_outputs_propagate():
    """Block i+1 must see block i's quantized outputs: the capture pass sees changed inputs."""
    seen = {}

    class Spy(Method):
        stats = frozenset({"abs_mean"})

        def apply_block(self, ctx: BlockContext) -> None:
            seen[ctx.index] = ctx.stats[f"model.layers.{ctx.index}.self_attn.q_proj"].abs_mean.clone()

    model = make_tiny_model("llama", seed=6)
    ids = torch.randint(0, 512, (3, 24))
    run_layerwise(model, ids, [Spy(Scheme())])
    clean = dict(seen)
    seen.clear()
    model2 = make_tiny_model("llama", seed=6)
    run_layerwise(model2, ids, [get_method("rtn")(Scheme(QuantArgs(bits=2))), Spy(Scheme())])
    assert torch.allclose(seen[0], clean[0])  # block 0 input is the embedding either way
    assert not torch.allclose(seen[1], clean[1], atol=1e-4)  # block 1 sees quantized block 0


class _Recorder:
    """A consumer that keeps every (input, output) of the linears it taps, and when it was called."""

    name = "record"

    def __init__(self, only=None):
        self.only = only
        self.seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.calls: list[tuple[str, int]] = []
        self.weights: dict[str, torch.Tensor] = {}

    def begin(self, view: BlockView):
        self.calls.append(("begin", view.index))
        names = [k for k in view.linears if self.only is None or k.endswith(self.only)]
        self.weights.update({k: view.linears[k].weight.detach().clone() for k in names})
        return {k: (lambda x, y, _k=k: self.seen.setdefault(_k, []).append((x.clone(), y.clone()))) for k in names}

    def end(self, view: BlockView):
        self.calls.append(("end", view.index))


def _plain_io(model, ids, names):
    """(input, output) of each named linear in a plain full-model forward."""
    seen, handles = {}, []
    for n in names:
        handles.append(model.get_submodule(n).register_forward_hook(
            lambda _m, a, o, _n=n: seen.__setitem__(_n, (a[0], o))))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_consumer_sees_each_linear_as_the_full_model_computes_it():
    model = make_tiny_model("llama", seed=3, randomize=True)
    ids = torch.randint(0, 512, (5, 24), generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rec = _Recorder()
    phases = []
    res = run_layerwise(model, ids, [], consumers=[rec], batch_size=2, ignore=("re:.*down_proj",),
                        on_block=lambda i, n, name, phase: phases.append(phase))
    assert phases == ["record"] * 3 and res.results == {} and res.warnings == []
    assert rec.calls == [(p, i) for i in range(3) for p in ("begin", "end")]
    names = list(ModelAdapter.for_model(model).all_linears())
    assert sorted(rec.seen) == sorted(n for n in names if not n.endswith("down_proj"))
    ref = _plain_io(model, ids, rec.seen)
    for n, calls in rec.seen.items():
        assert len(calls) == 3  # once per batch (2 + 2 + 1 samples)
        torch.testing.assert_close(torch.cat([x for x, _ in calls]), ref[n][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.cat([y for _, y in calls]), ref[n][1], rtol=1e-5, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())  # the taps are gone


def test_consumer_beside_a_method_sees_the_block_before_it_changes():
    """With RTN, a consumer sees each block's float weights on the inputs the quantized earlier blocks
    give it; the method's results are those of a run without the consumer."""
    ids = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(2))
    rtn = get_method("rtn")(Scheme(QuantArgs(bits=3, group_size=32)))
    plain = make_tiny_model("llama", seed=5)
    want = run_layerwise(plain, ids, [rtn], batch_size=2, return_hidden=True)
    model = make_tiny_model("llama", seed=5)
    floats = {k: v.weight.detach().clone() for k, v in ModelAdapter.for_model(model).all_linears().items()}
    rec = _Recorder(only="o_proj")
    got = run_layerwise(model, ids, [rtn], consumers=[rec], batch_size=2, return_hidden=True)
    assert sorted(got.results) == sorted(want.results)
    assert all(torch.equal(got.results[k].q, want.results[k].q) for k in want.results)
    assert all(torch.equal(a, b) for a, b in zip(got.hidden, want.hidden))
    for n, calls in rec.seen.items():
        assert torch.equal(rec.weights[n], floats[n]) and len(calls) == 2
        for x, y in calls:
            torch.testing.assert_close(y, torch.nn.functional.linear(x, floats[n]))
    # block 1's o_proj inputs come from the quantized block 0: not what the float model gives it
    ref = _plain_io(make_tiny_model("llama", seed=5), ids, ["model.layers.1.self_attn.o_proj"])
    seen1 = torch.cat([x for x, _ in rec.seen["model.layers.1.self_attn.o_proj"]])
    assert not torch.allclose(seen1, ref["model.layers.1.self_attn.o_proj"][0], atol=1e-4)
    with pytest.raises(ValueError, match="record needs calibration data"):
        run_layerwise(model, None, [], consumers=[_Recorder()])


def test_capture_stats_and_hook_removal():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 4)
    xs = [torch.randn(3, 5, 8) for _ in range(3)]
    with capture_inputs({"l": lin}, {"abs_mean", "abs_max", "hessian"}) as stats:
        for x in xs:
            lin(x)
    assert not lin._forward_pre_hooks
    X = torch.cat([x.reshape(-1, 8) for x in xs])
    s = stats["l"]
    assert s.count == 45
    torch.testing.assert_close(s.abs_mean, X.abs().mean(0))
    torch.testing.assert_close(s.abs_max, X.abs().amax(0))
    torch.testing.assert_close(s.hessian, 2 * X.T @ X / 45)
    # hooks come off on error too
    with pytest.raises(RuntimeError):
        with capture_inputs({"l": lin}, {"abs_max"}):
            raise RuntimeError("boom")
    assert not lin._forward_pre_hooks
    with pytest.raises(ValueError, match="unknown statistics"):
        InputStats({"nope"})


def test_ignore_patterns():
    assert is_ignored("lm_head", ["lm_head"])
    assert is_ignored("model.layers.3.mlp.down_proj", ["re:.*down_proj"])
    assert not is_ignored("model.layers.3.mlp.up_proj", ["re:.*down_proj"])
    assert is_ignored("model.layers.3.mlp.down_proj", ["model.layers.3.mlp.down_proj"])


def test_unknown_method_and_option():
    with pytest.raises(RecipeError, match="unknown method 'nope'.*rtn"):
        get_method("nope")
    with pytest.raises(RecipeError, match="no option"):
        get_method("rtn")(Scheme(), alpha=0.5)
