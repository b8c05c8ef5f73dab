"""Resumable calibration: an interrupted run continued from OUT.partial gives the same bits as a clean one."""

import json

import pytest
import torch

from tiny_models import make_tiny_model
from quantkit.calib.pipeline import run_layerwise
from quantkit.calib.resume import STATE_NAME, Checkpointer, ResumeError, run_fingerprint
from quantkit.methods.base import BlockContext, Method
from quantkit.quant.core import quantize_weight
from quantkit.recipe import QuantArgs, Scheme

ARGS = QuantArgs(bits=4, group_size=32, symmetric=False)
FP = {"model": "m" * 64, "calibration": "c" * 64, "recipe": "r" * 64}


class _NormAndClip(Method):
    """Test-only (not registered): changes a norm and leaves one linear's weight off its
    quantized grid, so restore must bring back both a non-linear tensor and a stored weight."""

    def apply_block(self, ctx: BlockContext) -> None:
        ctx.block.input_layernorm.weight.mul_(1.25)
        for i, (name, lin) in enumerate(ctx.linears.items()):
            qt = quantize_weight(lin.weight.data, self.scheme.weights)
            if i != 2:  # v_proj keeps its float weight
                lin.weight.data.copy_(qt.dequantize(lin.weight.dtype))
            ctx.results[name] = qt
        ctx.warnings.append(f"{ctx.name}: test warning")


class _Stop(Exception):
    pass


def _ids(seed=0, n=6, seqlen=24):
    return torch.randint(0, 512, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _run(model, ids, ckpt=None, stop_at=None):
    def on_block(i, n, name, phase):
        if stop_at is not None and i == stop_at:
            raise _Stop

    return run_layerwise(model, ids, [_NormAndClip(Scheme(ARGS))], batch_size=4, return_hidden=True, on_block=on_block,
                         checkpointer=ckpt)


@pytest.mark.parametrize("stop_at", [1, 3])
def test_resume_is_bit_identical(tmp_path, stop_at):
    ids = _ids()
    clean = make_tiny_model("llama", seed=5, num_hidden_layers=4)
    ref = _run(clean, ids)

    crashed = make_tiny_model("llama", seed=5, num_hidden_layers=4)
    with pytest.raises(_Stop):
        _run(crashed, ids, Checkpointer(tmp_path / "p", FP, resume=False), stop_at=stop_at)
    state = json.loads((tmp_path / "p" / STATE_NAME).read_text())
    assert [b["index"] for b in state["blocks"]] == list(range(stop_at))

    fresh = make_tiny_model("llama", seed=5, num_hidden_layers=4)  # a new process: original weights
    phases = []
    res = run_layerwise(fresh, ids, [_NormAndClip(Scheme(ARGS))], batch_size=4, return_hidden=True,
                        checkpointer=Checkpointer(tmp_path / "p", FP, resume=True),
                        on_block=lambda i, n, name, ph: phases.append(ph))
    assert phases[:stop_at] == ["restored"] * stop_at and phases[stop_at] != "restored"
    for a, b in zip(res.hidden, ref.hidden):
        assert torch.equal(a, b)
    ref_sd, sd = clean.state_dict(), fresh.state_dict()
    assert all(torch.equal(ref_sd[k], sd[k]) for k in ref_sd)
    assert not torch.equal(sd["model.layers.0.input_layernorm.weight"],
                           make_tiny_model("llama", seed=5, num_hidden_layers=4).state_dict()[
                               "model.layers.0.input_layernorm.weight"])
    assert res.warnings == ref.warnings and len(res.warnings) == 4
    assert set(res.results) == set(ref.results)
    for k, qt in ref.results.items():
        got = res.results[k]
        assert torch.equal(got.q, qt.q) and torch.equal(got.scale, qt.scale) and torch.equal(got.zero, qt.zero)
        assert got.args == qt.args


def test_quantized_weights_are_not_stored_twice(tmp_path):
    model = make_tiny_model("llama", seed=5, num_hidden_layers=2)
    with pytest.raises(_Stop):
        _run(model, _ids(), Checkpointer(tmp_path / "p", FP, resume=False), stop_at=1)
    meta = json.loads((tmp_path / "p" / "block_00000.json").read_text())
    # six linears round to their quantized tensors; v_proj (kept float) must be stored
    assert sorted(meta["recomputed"]) == sorted(
        f"{m}.weight" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj",
                                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))


def test_fingerprint_parts_and_refusals(tmp_path):
    ids = _ids()
    src = {"fingerprint": "abc", "dtype": "float32"}
    base = run_fingerprint(src, ids, {"seed": 0}, {"stages": ["rtn"]})
    assert base == run_fingerprint(src, ids.clone(), {"seed": 0}, {"stages": ["rtn"]})
    ids2 = ids.clone()
    ids2[0, 0] += 1
    changed = {
        "model": run_fingerprint({**src, "fingerprint": "abd"}, ids, {"seed": 0}, {"stages": ["rtn"]}),
        "calibration": run_fingerprint(src, ids2, {"seed": 0}, {"stages": ["rtn"]}),
        "recipe": run_fingerprint(src, ids, {"seed": 0}, {"stages": ["gptq"]}),
    }
    model = make_tiny_model("llama", seed=5, num_hidden_layers=2)
    with pytest.raises(_Stop):
        _run(model, ids, Checkpointer(tmp_path / "p", base, resume=False), stop_at=1)
    for part, fp in changed.items():
        assert [p for p in base if base[p] != fp[p]] == [part]
        with pytest.raises(ResumeError, match=f"the {part}"):
            Checkpointer(tmp_path / "p", fp, resume=True)
    # without --resume: the same run gets the hint, a different one is refused too
    with pytest.raises(ResumeError, match="1/2 finished blocks of this same run; pass --resume"):
        Checkpointer(tmp_path / "p", base, resume=False)
    with pytest.raises(ResumeError, match="different recipe; pass --overwrite"):
        Checkpointer(tmp_path / "p", changed["recipe"], resume=False)
    # --overwrite without --resume discards it
    ck = Checkpointer(tmp_path / "p", changed["recipe"], resume=False, overwrite=True)
    assert ck.start_block(2) == 0 and not (tmp_path / "p" / STATE_NAME).exists()


def test_corrupted_block_is_refused(tmp_path):
    model = make_tiny_model("llama", seed=5, num_hidden_layers=3)
    with pytest.raises(_Stop):
        _run(model, _ids(), Checkpointer(tmp_path / "p", FP, resume=False), stop_at=2)
    f = tmp_path / "p" / "block_00001.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(ResumeError, match="block_00001.safetensors .*corrupted"):
        _run(make_tiny_model("llama", seed=5, num_hidden_layers=3), _ids(),
             Checkpointer(tmp_path / "p", FP, resume=True))
    (tmp_path / "p" / STATE_NAME).write_text("{not json")
    with pytest.raises(ResumeError, match="state.json is unreadable"):
        Checkpointer(tmp_path / "p", FP, resume=True)


def test_interrupted_write_leaves_old_state(tmp_path, monkeypatch):
    """A crash while a block file is being written: state.json still lists only finished blocks."""
    import quantkit.calib.resume as resume_mod

    model = make_tiny_model("llama", seed=5, num_hidden_layers=3)
    real = resume_mod._atomic_write_bytes
    calls = []

    def flaky(path, data):
        calls.append(path.name)
        if path.name == "block_00001.safetensors":
            tmp = path.with_name(f".{path.name}.tmp-1")
            tmp.write_bytes(data[: len(data) // 2])  # the torn temp file a kill leaves
            raise _Stop
        real(path, data)

    monkeypatch.setattr(resume_mod, "_atomic_write_bytes", flaky)
    with pytest.raises(_Stop):
        _run(model, _ids(), Checkpointer(tmp_path / "p", FP, resume=False))
    monkeypatch.setattr(resume_mod, "_atomic_write_bytes", real)
    ck = Checkpointer(tmp_path / "p", FP, resume=True)
    assert ck.start_block(3) == 1
    assert not list((tmp_path / "p").glob(".*.tmp-*"))  # cleaned up on open


def test_save_failure_is_an_operation_error(tmp_path, monkeypatch):
    import errno

    import quantkit.calib.resume as resume_mod
    from quantkit.errors import OperationError

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(resume_mod, "_atomic_write_bytes", full)
    with pytest.raises(OperationError, match="no space left on device; free space"):
        _run(make_tiny_model("llama", seed=5, num_hidden_layers=2), _ids(),
             Checkpointer(tmp_path / "p", FP, resume=False))


def test_float_stream_survives_resume_and_placements(tmp_path):
    """GPTQ's asymmetric calibration (gptaq) carries the float model's activations beside the quantized ones: a
    run stopped after block 1 and resumed (restored blocks rebuild both streams), and runs keeping the
    activations on the host or on disk, give the clean run's bits."""
    from quantkit.methods.base import get_method

    ids = _ids(seed=3)

    def run(model, **kw):
        return run_layerwise(model, ids, [get_method("gptq")(Scheme(ARGS), gptaq=1.0)], batch_size=4, **kw)

    ref = run(make_tiny_model("llama", seed=6, num_hidden_layers=3))
    results = {}
    for where in ("host", "disk"):
        results[where] = run(make_tiny_model("llama", seed=6, num_hidden_layers=3), activations=where).results

    def stop(i, n, name, phase):
        if i == 2 and phase != "restored":
            raise _Stop

    with pytest.raises(_Stop):
        run(make_tiny_model("llama", seed=6, num_hidden_layers=3), checkpointer=Checkpointer(tmp_path / "p", FP,
                                                                                            resume=False), on_block=stop)
    results["resumed"] = run(make_tiny_model("llama", seed=6, num_hidden_layers=3),
                             checkpointer=Checkpointer(tmp_path / "p", FP, resume=True)).results
    plain = run_layerwise(make_tiny_model("llama", seed=6, num_hidden_layers=3), ids,
                          [get_method("gptq")(Scheme(ARGS), gptaq=0.0)], batch_size=4).results
    last = "model.layers.2.mlp.down_proj"
    assert not torch.equal(plain[last].q, ref.results[last].q)  # the float stream changed the solve

    # the float stream costs one stored output per block and batch; block 0's inputs serve both streams (not copied)
    from quantkit.calib import activations

    puts = []
    real_put = activations.ActivationStore.put

    def counting_put(self, t):
        puts.append(1)
        return real_put(self, t)

    counts = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(activations.ActivationStore, "put", counting_put)
        for alpha in (0.0, 1.0):
            puts.clear()
            run_layerwise(make_tiny_model("llama", seed=6, num_hidden_layers=3), ids,
                          [get_method("gptq")(Scheme(ARGS), gptaq=alpha)], batch_size=4, activations="disk")
            counts[alpha] = len(puts)
    batches = -(-ids.shape[0] // 4)
    assert counts[1.0] - counts[0.0] == 3 * batches, counts
    for how, res in results.items():
        assert set(res) == set(ref.results), how
        for k, qt in ref.results.items():
            assert torch.equal(res[k].q, qt.q) and torch.equal(res[k].scale, qt.scale), (how, k)
