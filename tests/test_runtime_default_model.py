"""`quantkit eval --runtime` (the runtime's kernels: packed weights, INT8 KV cache) agrees with the simulated
`quantkit eval` on the embedded default model, for W4A16, W8A8 and W8A8C8 checkpoints (issue 17: within 0.3%; the
INT8 KV cache's within 0.6% on these 4 windows, see TOLERANCE)."""

import json

import pytest

from tiny_models import run_cli
from quantkit import api
from quantkit.api import CalibConfig
from quantkit.recipe import PRESETS, KVCacheArgs, QuantArgs, Recipe, Scheme, Stage

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _torch_references(monkeypatch):
    """The kernels' torch references on CPU (tests/kernels' conftest may have set TRITON_INTERPRET=1: the
    interpreter would run this model for hours)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")

SCHEMES = {
    "W4A16": Recipe(Scheme(QuantArgs(4, 64, False)), (Stage("rtn"),)),
    "W8A8": Recipe(PRESETS["W8A8"], (Stage("smoothquant", {"alpha": 0.5}),)),
    "W8A8C8": Recipe(Scheme(QuantArgs(8), PRESETS["W8A8"].input_activations,
                            KVCacheArgs(8, "channel", residual_bits=4, residual_tau=3.0)),
                     (Stage("smoothquant", {"alpha": 0.5}),)),
}


# |ppl runtime / ppl simulated - 1| on these 4 windows. W8A8C8: an A8 rounding that parts between the int8 GEMM and
# the simulation's float GEMM moves K/V, and with it which token vectors get a residual (the decision is a
# threshold), so the two part by more on few windows: measured on a 2-core AVX-512 CPU (2026-12-06), 4 windows,
# this checkpoint with calibration seeds 0-3: +0.47%, +0.20%, -0.01%, -0.17%; seed 0 on 16 windows +0.41%, and the
# 16 x 256 calibration BENCHMARKS.md measures (16 windows) +0.16% there, +0.05% on the earlier box.
TOLERANCE = {"W4A16": 0.003, "W8A8": 0.003, "W8A8C8": 0.006}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name, recipe in SCHEMES.items():
        loaded = api.load()  # a fresh float model each time: quantize changes it in place
        qm = api.quantize(loaded, recipe, CalibConfig(samples=8, seqlen=256))
        out[name] = api.export(qm, tmp_path_factory.mktemp("rt") / name)
    return out


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_eval_runtime_agrees_with_simulated_eval(checkpoints, scheme, tmp_path):
    path = checkpoints[scheme]
    rows = {}
    for mode, extra in (("sim", []), ("runtime", ["--runtime"])):
        code, out = run_cli("eval", "--model", path, "--windows", "4", "--json", tmp_path / f"{mode}.json", *extra)
        assert code == 0, out
        rows[mode] = json.loads((tmp_path / f"{mode}.json").read_text())["rows"][0]
    sim, rt = rows["sim"], rows["runtime"]
    assert sim["tokens"] == rt["tokens"] == 4 * 511
    assert abs(rt["ppl"] / sim["ppl"] - 1) <= TOLERANCE[scheme], (scheme, sim["ppl"], rt["ppl"])
    assert "runtime kernels" in rt["simulated"]
    if scheme == "W8A8C8":
        assert rt["kv_tokens"] == 2 * 4 * 3 * 512 * 30 and rt["kv_patched"] > 0  # the INT8 cache with residuals ran
