"""The scan's full results on tiny models, pinned: every metric of every linear, the histograms, the
selection and the whole sensitive_layers.json, against values measured with the scan as it stood before
it became a consumer of the calibration pipeline (tests/data/scan_pinned.json).

The other scan tests check each metric against a reference; this one holds the whole output still
while the code around it moves. Several batches (the histogram range fixed by the first, later values
clipped; R's and the token subsample's random draws spread over batches), a MoE model (experts no token
reached are left out), and a run_scan with the target-fraction selection, the gradient-weighted metric
and --measure-ppl written to sensitive_layers.json.

Re-measure (only when a change is MEANT to move the results, and say so in the commit):
    QUANTKIT_REPIN=1 python -m pytest tests/test_scan_pinned.py
"""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from tiny_models import make_tiny_model
from quantkit.recipe import PRESETS, QuantArgs, Scheme
from quantkit.sensitivity.io import report_to_dict, save_sensitive_layers
from quantkit.sensitivity.run import run_scan
from quantkit.sensitivity.scan import scan_layers

PINNED = Path(__file__).parent / "data" / "scan_pinned.json"
REL = 1e-5  # float32 work in a different order may move the last digits, not more
ABS = 1e-9  # for values that are (near) zero
# Skewness is a third central moment over a cube of the scale: a near-zero skew (1e-3) is the difference of
# large float32 sums, and a thread count that splits those sums differently moves it by ~2e-8 (seen in CI:
# 2 threads against the 1 it was pinned with), so its error is bounded in absolute terms.
ABS_BY_FIELD = {"skew": 1e-6}
# what the scan wrote but does not measure: the clock and the package version
_UNPINNED = ("seconds", "quantkit_version")


def _pinned_part(d: dict) -> dict:
    """`d` without the _UNPINNED keys, at any depth (the selection has its own clock in ppl.seconds)."""
    return {k: _pinned_part(v) if isinstance(v, dict) else v for k, v in d.items() if k not in _UNPINNED}


def _ids(n, seq, seed):
    return torch.randint(0, 512, (n, seq), generator=torch.Generator().manual_seed(seed))


def _layer_rows(layers):
    return [{"name": e.name, "layer": e.layer, "op": e.op, "kl": e.kl, "R": e.R, "energy": e.energy, "skew": e.skew,
             "lo": e.lo, "hi": e.hi, "clipped": e.clipped, "rel_err": e.rel_err, "hist": e.hist.tolist()}
            for e in layers]


def _dense():
    model = make_tiny_model("llama", seed=3, randomize=True)
    # six batches of two: the range comes from the first, the subsample (stat_tokens) spans them all
    return _layer_rows(scan_layers(model, _ids(12, 32, 9), PRESETS["W8A8"], batch_size=2, bins=24,
                                   stat_tokens=96, r_sample=500, seed=5))


def _moe():
    model = make_tiny_model("mixtral", seed=3, randomize=True)
    return _layer_rows(scan_layers(model, _ids(2, 16, 4), Scheme(QuantArgs(4, 32, True)), batch_size=1, bins=16,
                                   stat_tokens=None))


def _file(tmp_path):
    model = make_tiny_model("llama", seed=7, randomize=True)
    rep = run_scan(model, _ids(6, 32, 0), Scheme(QuantArgs(4, 32, True)), batch_size=3, bins=16,
                   target_fraction=0.25, select_windows=_ids(6, 32, 7), folds=3, fisher_windows=2,
                   measure_ppl=True, eval_windows=_ids(2, 32, 8), stat_tokens=64,
                   source={"kind": "test"}, calibration={"samples": 6, "seqlen": 32})
    path = save_sensitive_layers(rep, tmp_path / "sensitive_layers.json")
    got = json.loads(path.read_text())
    assert got == json.loads(json.dumps(report_to_dict(rep, got["histograms"]["file"])))
    return _pinned_part(got)


CASES = {"dense": _dense, "moe": _moe, "file": _file}


def _close(got, want, where="") -> None:
    """Equal structure; floats within REL (NaN where NaN), everything else exactly."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), where
        for k in want:
            _close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _close(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(got, bool) and isinstance(got, (int, float)):
        if math.isnan(want):
            assert math.isnan(got), where
        else:
            field = where.rsplit(".", 1)[-1]
            assert got == pytest.approx(want, rel=REL, abs=ABS_BY_FIELD.get(field, ABS)), where
    else:
        assert got == want, where


def _json_safe(obj):
    """NaN/inf as strings: the pinned file stays plain JSON."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return repr(obj)
    return obj


def _dump(obj, depth: int = 0) -> str:
    """JSON with one line per case key and per layer (a diff then names the layer that moved)."""
    pad = " " * (depth + 1)
    if depth < 2 and isinstance(obj, dict):
        return "{\n" + ",\n".join(f"{pad}{json.dumps(k)}: {_dump(obj[k], depth + 1)}" for k in sorted(obj)) + "}"
    if depth < 3 and isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj):
        return "[\n" + ",\n".join(pad + _dump(v, 3) for v in obj) + "]"
    return json.dumps(obj, sort_keys=True)


def _from_json(obj):
    if isinstance(obj, dict):
        return {k: _from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_json(v) for v in obj]
    if obj in ("nan", "inf", "-inf"):
        return float(obj)
    return obj


@pytest.mark.parametrize("case", list(CASES))
def test_scan_results_are_pinned(case, tmp_path):
    got = CASES[case](tmp_path) if case == "file" else CASES[case]()
    if os.environ.get("QUANTKIT_REPIN"):
        pinned = json.loads(PINNED.read_text()) if PINNED.is_file() else {}
        pinned[case] = _json_safe(got)
        PINNED.parent.mkdir(exist_ok=True)
        PINNED.write_text(_dump(pinned) + "\n")
        pytest.skip("re-measured")
    _close(got, _from_json(json.loads(PINNED.read_text())[case]), case)
