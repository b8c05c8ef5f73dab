"""Property tests: random bytes and random JSON fed to every loader, random recipes, random CLI option
values and random damage to a checkpoint dir either succeed or raise our UsageError (one line, exit 1/2).

Never another exception type (no KeyError, struct.error, MemoryError, ... leaking out as a traceback),
never a hang, never a file touched outside --out.
"""

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
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


_SCRATCH: list[Path] = []


@pytest.fixture(autouse=True, scope="module")
def _scratch_root(tmp_path_factory):
    """Hypothesis runs many examples per test, so tmp_path (one per test) can't hold them: each example gets
    its own folder under this module's pytest temp dir, which pytest prunes (the last 3 runs are kept)."""
    _SCRATCH.append(tmp_path_factory.mktemp("examples"))
    yield
    _SCRATCH.pop()


def _scratch(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir=_SCRATCH[-1]))


def _tmpfile(data: bytes, name: str) -> Path:
    d = _scratch("qk-fuzz-")
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
    from quantkit.export.safetensors_header import read_safetensors_header

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


# ----------------------------------------------------------------------------- random recipes

_recipe_values = st.one_of(
    st.sampled_from(["W4A16", "W8A8", "W8A16", "W4A4KV4", "rtn", "awq", "gptq", "lm_head", "re:.*", "auto"]),
    st.integers(-3, 300) | st.floats(allow_nan=True, allow_infinity=True) | st.booleans() | st.none(),
    st.text(max_size=20),
)
_weights = st.fixed_dictionaries({}, optional={
    "bits": st.sampled_from([2, 3, 4, 5, 8, -1]) | _recipe_values,
    "group_size": st.sampled_from([None, 0, 32, 64, -8]) | _recipe_values,
    "symmetric": st.booleans() | _recipe_values,
    "strategy": st.sampled_from(["group", "channel", "tensor"]) | _recipe_values,
})
_stage = st.one_of(
    st.sampled_from(["rtn", "awq", "gptq", "smoothquant", "spinquant", "nope"]),
    st.fixed_dictionaries({"method": st.sampled_from(["rtn", "awq", "gptq", "smoothquant", "spinquant"]) | _recipe_values},
                          optional={k: _recipe_values for k in ("grid", "damp", "block_size", "alpha", "rotation",
                                                                 "iters", "lr", "clip", "max_shrink")}),
    _recipe_values,
)
recipe_like = st.fixed_dictionaries({}, optional={
    "version": st.just(1) | _recipe_values,
    "scheme": st.sampled_from(["W4A16", "W8A8", "W4A4KV4"]) | st.fixed_dictionaries({}, optional={
        "weights": _weights | _recipe_values,
        "input_activations": st.fixed_dictionaries({}, optional={"bits": _recipe_values, "strategy": _recipe_values,
                                                                 "dynamic": _recipe_values}) | _recipe_values,
        "kv_cache": st.fixed_dictionaries({}, optional={"bits": _recipe_values, "residual_tau": _recipe_values})
        | _recipe_values}) | _recipe_values,
    "ignore": st.lists(_recipe_values, max_size=3) | _recipe_values,
    "stages": st.lists(_stage, max_size=3) | _recipe_values,
    "extra": _recipe_values,
})


def _alias_yaml(levels: int, fanout: int, where: str) -> str:
    lines = ["a0: &a0 [x, y]"] + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * fanout) + "]"
                                  for i in range(1, levels + 1)]
    use = {"ignore": f"ignore: *a{levels}", "stage": f"stages: [{{method: rtn, grid: *a{levels}}}]",
           "top": f"version: *a{levels}"}[where]
    return "\n".join(["scheme: W4A16", *lines, use, "stages: [rtn]" if where != "stage" else ""]) + "\n"


@SETTINGS
@given(d=recipe_like | json_values,
       text=st.none() | st.text(max_size=200) | st.builds(_alias_yaml, st.integers(1, 12), st.integers(1, 12),
                                                          st.sampled_from(["ignore", "stage", "top"])),
       suffix=st.sampled_from([".yaml", ".json"]))
def test_recipe_loader(d, text, suffix):
    """Random recipes (structured, random text, YAML alias chains): a Recipe or a RecipeError, fast, one line."""
    import time

    import yaml

    from quantkit.methods.base import load_recipe

    if text is None:
        raw = (json.dumps(d) if suffix == ".json" else yaml.safe_dump(d, allow_unicode=True)).encode()
    else:
        raw = text.encode()
    t = time.perf_counter()
    try:
        load_recipe(_tmpfile(raw, "r" + suffix))
    except UsageError as e:
        assert "\n" not in str(e) and len(str(e)) < 1000, str(e)
    assert time.perf_counter() - t < 5


# ----------------------------------------------------------------------------- random CLI option values

_ints = st.sampled_from([-(2**63), -1, 0, 1, 2, 3, 7, 16, 32, 33, 257, 10**9, 2**64])
_floats = st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1e-9", "0.01", "0.5", "1", "2", "1e308"])
_OPTIONS = {  # command -> option -> values (ints and floats as text, as a shell passes them)
    "rtn": {"--bits": _ints, "--group-size": _ints, "--samples": _ints, "--seqlen": _ints, "--batch-size": _ints,
            "--windows": _ints, "--eval-seqlen": _ints, "--seed": _ints, "--shard-size": _floats,
            "--dtype": st.sampled_from(["auto", "float32", "bfloat16", "int8", "float64", "x"]),
            "--device": st.sampled_from(["cpu", "auto", "cuda:0", "tpu", ""])},
    "awq": {"--awq-grid": _ints, "--clip-grid": _ints, "--max-shrink": _floats, "--search-samples": _ints,
            "--samples": _ints, "--seqlen": _ints},
    "gptq": {"--damp": _floats, "--block-size": _ints, "--samples": _ints, "--seqlen": _ints},
    "smoothquant": {"--alpha": _floats | st.just("auto"), "--kv-tau": _floats,
                    "--kv": st.sampled_from(["none", "static", "dynamic"]), "--samples": _ints, "--seqlen": _ints},
    "scan": {"--bins": _ints, "--stat-tokens": _ints, "--fisher-windows": _ints, "--shortlist": _ints,
             "--kl": _floats, "--energy": _floats, "--target-fraction": _floats, "--windows": _ints,
             "--select-windows": _ints, "--folds": _ints, "--samples": _ints, "--seqlen": _ints,
             "--eval-seqlen": _ints, "--damp": _floats, "--method": st.sampled_from(["rtn", "gptq", "awq", ""])},
    "plan": {"--samples": _ints, "--seqlen": _ints, "--batch-size": _ints, "--device-memory": _floats,
             "--host-memory": _floats,
             "--method": st.sampled_from(["rtn", "gptq", "awq"])},
}
# Baseline values that make a run small; the drawn options replace some of them.
_BASE = {"--samples": "2", "--seqlen": "16", "--group-size": "32", "--search-samples": "1", "--awq-grid": "2",
         "--clip-grid": "2", "--bins": "8", "--stat-tokens": "64", "--windows": "1", "--eval-seqlen": "16"}


@pytest.fixture(scope="module")
def fuzz_model(tmp_path_factory):
    from tiny_models import make_tiny_tokenizer, save_tiny_model_dir

    return save_tiny_model_dir(tmp_path_factory.mktemp("fuzz") / "model", make_tiny_tokenizer(), seed=4)


def _snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for d, dirs, names in os.walk(root):
        for n in names + dirs:
            p = Path(d, n)
            s = p.lstat()
            out[p.relative_to(root).as_posix()] = (s.st_mode, s.st_size, s.st_mtime_ns)
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_cli_random_option_values(fuzz_model, data):
    """Random values for every numeric option: success or one `error:` line (exit 1/2), never a traceback,
    and nothing written outside --out (its OUT.partial) and --json."""
    from tiny_models import run_cli

    cmd = data.draw(st.sampled_from(sorted(_OPTIONS)))
    chosen = data.draw(st.dictionaries(st.sampled_from(sorted(_OPTIONS[cmd])), st.just(None), max_size=4))
    opts = {k: v for k, v in _BASE.items() if k in _OPTIONS[cmd] or k in ("--samples", "--seqlen") and cmd != "rtn"}
    if cmd in ("rtn", "awq", "gptq"):
        opts.setdefault("--group-size", "32")
    for k in chosen:
        opts[k] = str(data.draw(_OPTIONS[cmd][k]))
    work = _scratch("qk-cli-")
    (work / "keep.txt").write_text("the user's")
    before = _snapshot(work)
    args = [cmd, "--model", str(fuzz_model)]
    if cmd == "scan":
        args += ["--out", str(work / "s.json")]
    elif cmd != "plan":
        args += ["--out", str(work / "out"), "--json", str(work / "run.json")]
    for k, v in opts.items():
        args += [k, v]
    code, text = run_cli(*args)
    event(f"{cmd} exit {code}")
    assert "Traceback" not in text, text
    if code:
        lines = [l for l in text.strip().splitlines() if l.strip()]
        assert code in (1, 2) and lines[-1].startswith("error: "), (args, text)
        assert not (work / "out").exists() and not (work / "run.json").exists()
    after = _snapshot(work)
    touched = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    allowed = ("out", "out.partial", "run.json", "s.json", "s.hist.safetensors")
    assert all(k.split("/")[0] in allowed for k in touched), (args, sorted(touched))
    shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------- random checkpoint-dir damage


@pytest.fixture(scope="module")
def fuzz_ckpt(fuzz_model, tmp_path_factory):
    from tiny_models import rtn_checkpoint

    return rtn_checkpoint(fuzz_model, tmp_path_factory.mktemp("fuzzck") / "q", "-g", "32", "--asym")


_MUTATIONS = ("delete", "truncate", "flip", "append", "empty", "random_json", "extra_file", "rename", "to_dir",
              "to_fifo", "to_devzero", "to_dangling")


def _mutate(d: Path, files: list[str], data) -> str:
    kind = data.draw(st.sampled_from(_MUTATIONS))
    name = data.draw(st.sampled_from(files))
    p = d / name
    if not p.is_file() or p.is_symlink():
        return f"{kind} skipped"
    if kind == "delete":
        p.unlink()
    elif kind == "truncate":
        raw = p.read_bytes()
        p.write_bytes(raw[: data.draw(st.integers(0, max(len(raw) - 1, 0)))])
    elif kind == "flip":
        raw = bytearray(p.read_bytes())
        if raw:
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
        p.write_bytes(bytes(raw))
    elif kind == "append":
        p.write_bytes(p.read_bytes() + data.draw(st.binary(min_size=1, max_size=64)))
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "random_json":
        p.write_text(json.dumps(data.draw(json_values | manifest_like | config_like)))
    elif kind == "extra_file":
        (d / data.draw(st.sampled_from(["x.safetensors", "notes.txt", "shadow/y.bin"]))).parent.mkdir(exist_ok=True)
        (d / "notes.txt").write_text("extra")
    elif kind == "rename":
        p.rename(d / (name + ".bak"))
    elif kind == "to_dir":
        p.unlink()
        p.mkdir()
    elif kind == "to_fifo":
        p.unlink()
        os.mkfifo(p)  # reading it would block forever
    elif kind == "to_devzero":
        p.unlink()
        p.symlink_to("/dev/zero")  # endless
    else:
        p.unlink()
        p.symlink_to(d / "no-such-file")
    return f"{kind} {name}"


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_checkpoint_dir_mutations(fuzz_ckpt, data):
    """1-3 random mutations of a real checkpoint dir, then verify, load and the CLI: a result or one line
    (UsageError / exit 1-2), never a traceback or a hang (an alarm fails the test after 60 s)."""
    import signal

    from quantkit.export.manifest import verify_checkpoint
    from quantkit.models.loading import load_model
    from tiny_models import run_cli

    d = _scratch("qk-ck-") / "q"
    shutil.copytree(fuzz_ckpt, d)
    files = sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())
    done = [_mutate(d, files, data) for _ in range(data.draw(st.integers(1, 3)))]

    def hang(signum, frame):
        raise TimeoutError(f"hung after {done}")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(60)
    try:
        _ok_or_usage(verify_checkpoint, d)
        _ok_or_usage(lambda: load_model(str(d)))
        for args in (("inspect", d, "--verify"), ("inspect", d)):
            code, text = run_cli(*args)
            assert "Traceback" not in text, (done, text)
            if code:
                assert code in (1, 2) and text.strip().splitlines()[-1].startswith("error: "), (done, text)
        out = d.parent / "out"
        code, text = run_cli("rtn", "--model", d, "--out", out, "-g", "32")
        event(f"rtn on the damaged dir: exit {code}")
        assert "Traceback" not in text and (code == 0 or code in (1, 2) and "error: " in text), (done, text)
        if code:
            assert not out.exists()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        shutil.rmtree(d.parent, ignore_errors=True)


@pytest.mark.parametrize("what", ["devzero", "fifo", "huge"])
def test_foreign_dir_check_reads_no_endless_config(fuzz_ckpt, tmp_path, monkeypatch, what):
    """Found by the test RSS watchdog (a mutation draw of the test above): a checkpoint dir without quantkit.json
    whose config.json links to /dev/zero made `quantkit rtn --model DIR` read until memory ran out (a FIFO would
    block forever). Every small-file read of a dir quantkit is handed now refuses a device, a pipe or a file over
    its limit first: one error line, no hang, no memory growth."""
    import quantkit.files as files
    from tiny_models import run_cli

    d = tmp_path / "q"
    shutil.copytree(fuzz_ckpt, d)
    (d / "quantkit.json").unlink()
    cfg = d / "config.json"
    cfg.unlink()
    if what == "devzero":
        cfg.symlink_to("/dev/zero")
    elif what == "fifo":
        os.mkfifo(cfg)
    else:
        cfg.write_text(" " * 4096 + "{}")
        monkeypatch.setattr(files, "MAX_SMALL_FILE", 1024)
        monkeypatch.setattr(files.read_small_text, "__defaults__", (1024, "utf-8"))
    out = tmp_path / "out"
    import signal

    def hang(signum, frame):
        raise TimeoutError("rtn blocked on config.json")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(60)
    try:
        code, text = run_cli("rtn", "--model", d, "--out", out, "-g", "32")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert code in (1, 2) and "Traceback" not in text and "blocked" not in text, text
    last = text.strip().splitlines()[-1]
    assert last.startswith("error: ") and "config.json" in last, text
    assert "not a regular file" in last or "larger than" in last, text
    assert not out.exists()
    with pytest.raises(OSError, match="not a regular file|larger than"):
        files.read_small_text(cfg)


@pytest.mark.parametrize("name", ["/dev/zero", "../../etc/passwd", "kv_link", 7])
def test_kv_side_file_named_by_the_manifest_stays_inside_and_small(fuzz_ckpt, tmp_path, name):
    """quantkit.json's kv_scales_file is read by name: an absolute path, a path out of the dir, a link to a
    device, or a non-string is one CheckpointError line, never a read of /dev/zero or of a file elsewhere."""
    from quantkit.export.checkpoint_tensors import CheckpointError
    from quantkit.export.manifest import read_manifest
    from quantkit.export.reader import read_static_scales

    d = tmp_path / "q"
    shutil.copytree(fuzz_ckpt, d)
    (d / "kv_link").symlink_to("/dev/zero")
    manifest = dict(read_manifest(d), kv_scales_file=name)
    with pytest.raises(CheckpointError, match="kv_scales_file|not a regular file"):
        read_static_scales(d, manifest)
