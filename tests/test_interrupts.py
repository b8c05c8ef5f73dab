"""Ctrl-C and SIGKILL at every phase of a method command: the message says what is on disk, and the
run is resumable or complete at every instant.

The phases are named points in the code (quantkit.interrupts.reached); QUANTKIT_SIGNAL_AT=PHASE[:SIG]
makes the process signal itself there. SIGINT runs in-process (fast); SIGKILL needs real processes.
After every interrupt: --out is absent, unchanged, or a complete checkpoint that verifies; nothing
is left beside it but OUT.partial (whole, or gone); and `--resume` finishes with the same bytes as
an uninterrupted run.
"""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from quantkit.export.manifest import verify_checkpoint
from quantkit.interrupts import SIGNAL_ENV
from tiny_models import rtn_checkpoint, run_cli, save_tiny_model_dir, sigint_default

ROOT = Path(__file__).resolve().parents[1]
ARGS = ("-g", "32")  # the recipe of every run here (tiny model: 3 blocks)


pytestmark = pytest.mark.usefixtures("reproducible_manifest", "ctrl_c_raises")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    return save_tiny_model_dir(tmp_path_factory.mktemp("m") / "model", tiny_tokenizer, seed=9)


@pytest.fixture(scope="module")
def clean(model_dir, tmp_path_factory):
    """An uninterrupted run's checkpoint (the bytes every resumed run must reproduce)."""
    return rtn_checkpoint(model_dir, tmp_path_factory.mktemp("clean") / "q", *ARGS)


@pytest.fixture(scope="module")
def other(model_dir, tmp_path_factory):
    """A checkpoint of another recipe, to be replaced with --overwrite."""
    return rtn_checkpoint(model_dir, tmp_path_factory.mktemp("other") / "q", "-g", "32", "--asym")


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _blocks(partial: Path) -> int:
    import json

    return len(json.loads((partial / "state.json").read_text())["blocks"])


# phase -> (what the interrupted run's line says, checkpoint complete at the interrupt?)
PHASES = {
    "loaded": ("no block was finished", False),
    "saved.1": ("keeps 1/3 finished blocks: rerun the same command with --resume to continue", False),
    "saved.3": ("keeps all 3 blocks: rerun with --resume to export them", False),
    "calibrated": ("keeps all 3 blocks: rerun with --resume to export them", False),
    "export.weights": ("keeps all 3 blocks: rerun with --resume to export them", False),
    "export.manifest": ("keeps all 3 blocks: rerun with --resume to export them", False),
    "commit.aside": ("is complete; out.partial is no longer needed: rerun with --resume to remove it", True),
    "commit.renamed": ("is complete; out.partial is no longer needed: rerun with --resume to remove it", True),
    "exported": ("is complete; out.partial is no longer needed: rerun with --resume to remove it", True),
    "discard.renamed": ("the checkpoint at", True),
    "done": ("the checkpoint at", True),
}


def _check_disk(tmp_path: Path, out: Path, *, complete: bool, before: dict | None):
    """The invariants that must hold at any instant after an interrupt."""
    partial = tmp_path / "out.partial"
    if complete:
        assert verify_checkpoint(out) == []
    elif before is None:
        assert not out.exists()
    else:
        assert _files(out) == before  # the previous checkpoint, untouched
    if partial.exists():
        assert 0 < _blocks(partial) <= 3
    # nothing else beside --out: no temp dir, no old copy, no half-deleted partial
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        n for n in ("out", "out.partial") if (tmp_path / n).exists())


@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
@pytest.mark.parametrize("phase", list(PHASES))
def test_ctrl_c_at_every_phase(model_dir, clean, other, tmp_path, monkeypatch, phase, overwrite):
    out = tmp_path / "out"
    extra = ("--overwrite",) if overwrite else ()
    before = None
    if overwrite:
        shutil.copytree(other, out)
        before = _files(out)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(SIGNAL_ENV, phase)
    code, text = run_cli("rtn", "--model", model_dir, "--out", "out", *ARGS, *extra)
    monkeypatch.delenv(SIGNAL_ENV)
    said, complete = PHASES[phase]
    if phase == "commit.aside" and not overwrite:  # no old checkpoint to move aside: the phase never comes
        assert code == 0, text
    else:
        last = text.strip().splitlines()[-1]
        assert code == 130 and last.startswith("interrupted; ") and said in last, text
        assert "Traceback" not in text
        if complete:
            assert "the checkpoint at out is complete" in last
        else:
            assert ("out is unchanged" if overwrite else "nothing was written at out") in last
    _check_disk(tmp_path, out, complete=complete or code == 0, before=before)

    code, text = run_cli("rtn", "--model", model_dir, "--out", "out", *ARGS, "--resume", *extra)
    assert code == 0, text
    assert _files(out) == _files(clean)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _run(cmd, env_extra, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **env_extra)
    env.pop("QUANTKIT_PROGRESS", None)
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300,
                          preexec_fn=sigint_default)


@pytest.mark.parametrize("phase", ["commit.aside", "commit.renamed", "discard.renamed"])
def test_sigkill_at_export_phases_then_resume(model_dir, clean, other, tmp_path, monkeypatch, phase):
    """SIGKILL cannot be held: what it leaves (temp dir, old copy, trash) is repaired by the next run."""
    out = tmp_path / "out"
    shutil.copytree(other, out)  # --overwrite over an older checkpoint: the hardest case
    cmd = [sys.executable, "-m", "quantkit", "rtn", "--model", str(model_dir), "--out", "out", *ARGS, "--overwrite"]
    r = _run(cmd, {SIGNAL_ENV: f"{phase}:KILL"}, tmp_path)
    assert r.returncode == -signal.SIGKILL, r.stderr
    # at every instant: out is the old checkpoint, the new one, or (between the renames) its old copy is
    # beside it; the calibrated blocks are whole in out.partial until the new checkpoint is in place
    if phase == "commit.aside":  # killed between the renames: the old checkpoint sits beside out
        assert not out.exists() and len(list(tmp_path.glob(".out.old-*"))) == 1
        assert _blocks(tmp_path / "out.partial") == 3
    monkeypatch.chdir(tmp_path)
    code, text = run_cli("rtn", "--model", model_dir, "--out", "out", *ARGS, "--resume", "--overwrite")
    assert code == 0, text
    assert _files(out) == _files(clean)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_real_ctrl_c_during_export_tells_the_truth(model_dir, clean, tmp_path, monkeypatch):
    """The reported case, in a real process: Ctrl-C right after the checkpoint is renamed in."""
    cmd = [sys.executable, "-m", "quantkit", "rtn", "--model", str(model_dir), "--out", "out", *ARGS]
    r = _run(cmd, {SIGNAL_ENV: "commit.renamed"}, tmp_path)
    assert r.returncode == 130, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last == "interrupted; the checkpoint at out is complete; out.partial is no longer needed: " \
                   "rerun with --resume to remove it", r.stderr
    assert verify_checkpoint(tmp_path / "out") == []
    monkeypatch.chdir(tmp_path)
    code, text = run_cli("rtn", "--model", model_dir, "--out", "out", *ARGS, "--resume")
    assert code == 0 and "already complete" in text, text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert _files(tmp_path / "out") == _files(clean)


def test_scan_interrupt_says_which_files_it_wrote(model_dir, tmp_path, monkeypatch):
    import quantkit.api
    import quantkit.sensitivity.report as report

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    out = tmp_path / "s.json"
    args = ("scan", "--model", model_dir, "--out", out, "--samples", "2", "--seqlen", "32", "--bins", "8")
    with monkeypatch.context() as mp:
        mp.setattr(quantkit.api, "scan", ctrl_c)  # during the scan: nothing on disk yet
        code, text = run_cli(*args)
    assert code == 130 and text.strip().splitlines()[-1] == "interrupted; nothing was written", text
    with monkeypatch.context() as mp:
        mp.setattr(report, "scan_table", ctrl_c)  # right after the two files were saved
        code, text = run_cli(*args)
    assert code == 130 and text.strip().splitlines()[-1] == (
        f"interrupted; wrote {out}, {tmp_path / 's.hist.safetensors'}; the rest was not written"), text
