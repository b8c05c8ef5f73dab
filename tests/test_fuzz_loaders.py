"""Property test: random bytes and random JSON fed to every loader either load or raise our UsageError.

Never another exception type (no KeyError, struct.error, MemoryError, ... leaking out as a traceback).
"""

import json
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantkit.errors import UsageError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20,
)
# JSON objects that look a little like ours, so the checks past "is it a dict" get exercised.
config_like = st.fixed_dictionaries(
    {},
    optional={k: json_values | st.integers(-5, 10**13) for k in (
        "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads",
        "vocab_size", "head_dim", "tie_word_embeddings", "model_type", "torch_dtype")},
)
manifest_like = st.fixed_dictionaries(
    {},
    optional={
        "format_version": st.integers(-2, 3) | json_values,
        "files": st.dictionaries(st.sampled_from(["model.safetensors", "config.json", "x"]),
                                 json_values | st.fixed_dictionaries({"sha256": st.text(max_size=8),
                                                                      "bytes": json_values}), max_size=3) | json_values,
        "manifest_hash": st.just("quantkit.json.sha256") | json_values,
        "format": st.just("compressed-tensors") | json_values,
        "modules": json_values,
    },
)


def _tmpfile(data: bytes, name: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix="qk-fuzz-"))
    p = d / name
    p.write_bytes(data)
    return p


def _ok_or_usage(fn, *args):
    try:
        fn(*args)
    except UsageError:
        pass


def _safetensors_like():
    # valid 8-byte length + random header bytes, or fully random bytes
    header = st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode()))
    framed = st.tuples(header, st.binary(max_size=64), st.integers(-3, 3)).map(
        lambda t: struct.pack("<Q", max(len(t[0]) + t[2], 0)) + t[0] + t[1])
    return st.one_of(st.binary(max_size=300), framed)


@SETTINGS
@given(data=_safetensors_like())
def test_safetensors_header_reader(data):
    from quantkit.export.compressed_tensors import read_safetensors_header

    _ok_or_usage(read_safetensors_header, _tmpfile(data, "model.safetensors"))


@SETTINGS
@given(data=st.one_of(st.binary(max_size=300), st.binary(max_size=300).map(lambda b: b"GGUF" + b)))
def test_gguf_config_reader(data):
    from quantkit.plan import model_config

    _ok_or_usage(model_config, str(_tmpfile(data, "m.gguf")))


@SETTINGS
@given(cfg=st.one_of(config_like, json_values))
def test_config_checks(cfg):
    from quantkit.plan import ModelShape, model_config

    _ok_or_usage(ModelShape.from_config, cfg)
    p = _tmpfile(json.dumps(cfg).encode(), "config.json")
    _ok_or_usage(model_config, str(p.parent))


@SETTINGS
@given(data=st.binary(max_size=300))
def test_config_random_bytes(data):
    from quantkit.plan import model_config

    _ok_or_usage(model_config, str(_tmpfile(data, "config.json").parent))


@SETTINGS
@given(data=st.binary(max_size=400), suffix=st.sampled_from([".txt", ".jsonl"]))
def test_text_loader(data, suffix):
    from quantkit.calib.data import load_text

    _ok_or_usage(lambda: load_text(str(_tmpfile(data, "t" + suffix)), part="calib"))


@SETTINGS
@given(m=st.one_of(manifest_like, json_values), raw=st.none() | st.binary(max_size=100))
def test_manifest_reader_and_verify(m, raw):
    from quantkit.export.manifest import read_manifest, verify_checkpoint

    p = _tmpfile(raw if raw is not None else json.dumps(m).encode(), "quantkit.json")
    (p.parent / "config.json").write_text("{}")
    _ok_or_usage(read_manifest, p.parent)
    _ok_or_usage(verify_checkpoint, p.parent)


@SETTINGS
@given(state=st.one_of(json_values, st.fixed_dictionaries({
    "version": st.just(1) | json_values, "fingerprint": json_values, "n_blocks": json_values,
    "blocks": st.lists(json_values | st.fixed_dictionaries({"index": json_values, "file": json_values,
                                                             "sha256": json_values}), max_size=3)})))
def test_resume_state_reader(state):
    from quantkit.calib.resume import Checkpointer

    p = _tmpfile(json.dumps(state).encode(), "state.json")
    fp = {"model": "a", "calibration": "b", "recipe": "c"}
    _ok_or_usage(lambda: Checkpointer(p.parent, fp, resume=True).start_block(4))


@SETTINGS
@given(data=_safetensors_like())
def test_resume_block_reader(data):
    """A damaged block file whose hash state.json vouches for (an attacker, not a flipped bit) still fails cleanly."""
    import hashlib

    from quantkit.calib.resume import Checkpointer

    d = _tmpfile(data, "block_00000.safetensors").parent
    sha = hashlib.sha256(data).hexdigest()
    (d / "block_00000.json").write_text(json.dumps({"prefix": "model.layers.0", "results": {}, "recomputed": [],
                                                    "warnings": [], "sha256": sha}))
    fp = {"model": "a", "calibration": "b", "recipe": "c"}
    (d / "state.json").write_text(json.dumps({"version": 1, "fingerprint": fp, "n_blocks": 1,
                                              "blocks": [{"index": 0, "file": "block_00000.safetensors",
                                                          "sha256": sha}]}))
    import torch

    block = torch.nn.Linear(4, 4)
    _ok_or_usage(lambda: Checkpointer(d, fp, resume=True).restore_block(0, block))
