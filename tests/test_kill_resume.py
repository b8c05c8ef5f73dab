"""Fault test: SIGKILL a real `quantkit` process at random blocks, resume, compare bytes with a clean run."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny_models import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
N_LAYERS = 8


@pytest.fixture(scope="module")
def tiny8_dir(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("tiny8")
    model = make_tiny_model("llama", seed=21, num_hidden_layers=N_LAYERS, hidden_size=128, intermediate_size=512,
                            num_attention_heads=4, num_key_value_heads=2)
    model.save_pretrained(d, safe_serialization=True)
    tiny_tokenizer.save_pretrained(d)
    return d


def _env():
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), SOURCE_DATE_EPOCH="1700000000", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("QUANTKIT_PROGRESS", None)
    return env


def _cmd(model_dir, out, *extra):
    return [sys.executable, "-m", "quantkit", "rtn", "--model", str(model_dir), "--out", str(out),
            "-g", "32", "--asym", *extra]


def _done_blocks(partial: Path) -> int:
    try:
        return len(json.loads((partial / "state.json").read_text())["blocks"])
    except (OSError, ValueError, KeyError):
        return 0


def _run_and_kill(cmd, partial: Path, kill_after: int, timeout=120) -> int:
    """Start cmd, SIGKILL it as soon as `kill_after` blocks are saved; returns the blocks saved then."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    t0 = time.monotonic()
    try:
        while _done_blocks(partial) < kill_after:
            if proc.poll() is not None:
                pytest.fail(f"quantkit exited ({proc.returncode}) before block {kill_after}: "
                            f"{proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() - t0 > timeout:
                pytest.fail("quantkit did not reach the kill point in time")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    return _done_blocks(partial)


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_sigkill_at_random_blocks_then_resume_is_byte_identical(tiny8_dir, tmp_path):
    clean = tmp_path / "clean"
    r = subprocess.run(_cmd(tiny8_dir, clean), env=_env(), capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "clean.partial").exists()  # removed after the export

    out, partial = tmp_path / "out", tmp_path / "out.partial"
    rng = random.Random(1234)
    done = 0
    kills = []
    for attempt in range(3):  # killed three times, each resume going further
        target = rng.randint(done + 1, N_LAYERS - 3 + attempt)
        extra = ("--resume",) if attempt else ()
        done = _run_and_kill(_cmd(tiny8_dir, out, *extra), partial, target)
        kills.append((target, done))
        assert done >= target
        assert not out.exists()  # nothing half-written at the output path
        assert not list(tmp_path.glob(".out.tmp-*"))
    # Without --resume the partial run is refused (exit 2, one line naming --resume), not silently redone.
    r = subprocess.run(_cmd(tiny8_dir, out), env=_env(), capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "pass --resume" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run(_cmd(tiny8_dir, out, "--resume"), env=_env(), capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("restored") == done, (kills, r.stderr)
    assert not partial.exists()

    got, want = _files(out), _files(clean)
    assert sorted(got) == sorted(want)
    differ = [k for k in want if got[k] != want[k]]
    assert not differ, f"files differ after kills {kills}: {differ}"


def test_resume_refuses_changed_recipe(tiny8_dir, tmp_path):
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    _run_and_kill(_cmd(tiny8_dir, out), partial, 1)
    cmd = [a if a != "32" else "64" for a in _cmd(tiny8_dir, out, "--resume")]  # another group size
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert "the recipe (scheme, stages, options or ignore list) changed" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() and partial.exists()
