"""No command destroys the user's files: --out and --overwrite never touch what quantkit did not write.

Every refusal is one line, exit 2, before the model loads (api.load is made to fail the test),
and every file that was there before is still there, byte for byte.
"""

import hashlib
import os
import stat

import pytest

import quantkit.api
from tiny_models import rtn_checkpoint, run_cli, save_tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    return save_tiny_model_dir(tmp_path_factory.mktemp("m") / "model", tiny_tokenizer, seed=5)


@pytest.fixture(scope="module")
def ckpt(model_dir, tmp_path_factory):
    return rtn_checkpoint(model_dir, tmp_path_factory.mktemp("ck") / "q", "-g", "32")


def _tree(root):
    """{relative path: sha256} of every file under root (what must survive a refusal)."""
    return {
        os.path.relpath(os.path.join(d, n), root): hashlib.sha256(open(os.path.join(d, n), "rb").read()).hexdigest()
        for d, _, names in os.walk(root) for n in names
    }


def _refused(args, match, monkeypatch):
    monkeypatch.setattr(quantkit.api, "load", lambda *a, **k: pytest.fail("the model was loaded before the refusal"))
    code, text = run_cli(*args)
    lines = [l for l in text.strip().splitlines() if l.strip()]
    assert code == 2 and "Traceback" not in text, text
    assert lines[-1].startswith("error:") and match in lines[-1], text
    return lines[-1]


@pytest.mark.parametrize("out", [".", ""])
def test_current_directory_is_never_the_output(model_dir, tmp_path, monkeypatch, out):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("precious")
    (work / "sub").mkdir()
    (work / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = _tree(work)
    monkeypatch.chdir(work)
    for extra in ((), ("--overwrite",), ("--overwrite", "--resume")):
        _refused(("rtn", "--model", model_dir, "--out", out, "-g", "32", *extra), "is the current directory",
                 monkeypatch)
    assert _tree(work) == before and sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_parent_of_current_directory_is_refused(model_dir, tmp_path, monkeypatch):
    (tmp_path / "keep.txt").write_text("x")
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    before = _tree(tmp_path)
    _refused(("rtn", "--model", model_dir, "--out", "../..", "--overwrite", "-g", "32"),
             "is a parent of the current directory", monkeypatch)
    assert _tree(tmp_path) == before


def test_model_source_and_its_parents_are_refused(model_dir, tmp_path, monkeypatch, tiny_tokenizer):
    model = save_tiny_model_dir(tmp_path / "src" / "model", tiny_tokenizer, seed=5)
    before = _tree(tmp_path)
    for out, match in ((model, "is the model source"), (model.parent, "a parent of the model source")):
        for extra in ((), ("--overwrite",)):
            _refused(("rtn", "--model", model, "--out", out, "-g", "32", *extra), match, monkeypatch)
    assert _tree(tmp_path) == before


def test_quantkit_checkpoint_as_model_is_not_its_own_output(ckpt, tmp_path, monkeypatch):
    before = _tree(ckpt)
    _refused(("rtn", "--model", ckpt, "--out", ckpt, "--overwrite", "-g", "32"), "is the model source", monkeypatch)
    assert _tree(ckpt) == before


def test_overwrite_refuses_a_directory_of_other_files(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    before = _tree(tmp_path)
    line = _refused(("rtn", "--model", model_dir, "--out", out, "--overwrite", "-g", "32"),
                    "replaces only a checkpoint quantkit wrote", monkeypatch)
    assert "no quantkit.json" in line
    assert _tree(tmp_path) == before


def test_overwrite_refuses_a_checkpoint_holding_other_files(ckpt, model_dir, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(ckpt, out)
    (out / "README.md").write_text("my notes on this checkpoint")
    before = _tree(tmp_path)
    line = _refused(("rtn", "--model", model_dir, "--out", out, "--overwrite", "-g", "32"),
                    "README.md, which quantkit did not write", monkeypatch)
    assert "move its files away" in line
    assert _tree(tmp_path) == before


def test_overwrite_replaces_a_quantkit_checkpoint(ckpt, model_dir, tmp_path):
    import shutil

    from quantkit.export.manifest import verify_checkpoint

    out = tmp_path / "out"
    shutil.copytree(ckpt, out)
    code, text = run_cli("rtn", "--model", model_dir, "--out", out, "--overwrite", "-g", "32", "--asym")
    assert code == 0, text
    assert verify_checkpoint(out) == [] and '"symmetric": false' in (out / "quantkit.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left beside it


def test_symlinked_output_and_file_output_are_refused(model_dir, tmp_path, monkeypatch):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    (tmp_path / "file").write_text("x")
    before = _tree(tmp_path)
    _refused(("rtn", "--model", model_dir, "--out", tmp_path / "link", "--overwrite", "-g", "32"),
             "is a symbolic link", monkeypatch)
    _refused(("rtn", "--model", model_dir, "--out", tmp_path / "file", "--overwrite", "-g", "32"),
             "exists and is not a directory", monkeypatch)
    assert _tree(tmp_path) == before


def test_foreign_partial_dir_is_refused(model_dir, tmp_path, monkeypatch):
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out.partial" / "mine.txt").write_text("not quantkit's")
    before = _tree(tmp_path)
    for extra in ((), ("--overwrite",), ("--resume",)):
        _refused(("rtn", "--model", model_dir, "--out", tmp_path / "out", "-g", "32", *extra),
                 "is not a quantkit partial run", monkeypatch)
    assert _tree(tmp_path) == before


def test_api_export_refuses_the_model_source(tmp_path, tiny_tokenizer):
    """The library path has the same rules: export never writes over the source model dir."""
    from quantkit import api
    from quantkit.export.atomic import OutputExistsError
    from quantkit.recipe import QuantArgs, Recipe, Scheme, Stage

    model = save_tiny_model_dir(tmp_path / "model", tiny_tokenizer, seed=5)
    before = _tree(model)
    loaded = api.load(str(model))
    qm = api.quantize(loaded, Recipe(Scheme(QuantArgs(4, 32)), (Stage("rtn"),)))
    with pytest.raises(OutputExistsError, match="is the model source"):
        api.export(qm, model, overwrite=True)
    assert _tree(model) == before


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoint_files_follow_the_umask(model_dir, tmp_path, umask):
    old = os.umask(umask)
    try:
        out = tmp_path / "out"
        code, text = run_cli("rtn", "--model", model_dir, "--out", out, "-g", "32")
        assert code == 0, text
    finally:
        os.umask(old)
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")}
    assert modes["model.safetensors"] == 0o666 & ~umask, modes  # safetensors itself writes 0600
    assert set(modes.values()) == {0o666 & ~umask}, modes
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
