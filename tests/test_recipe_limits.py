"""Hostile recipe files: refused quickly, with bounded memory, and never echoed whole.

A YAML alias "billion laughs" used to be expanded by the error message that echoed it
(more than 6 GB in 75 s); now the loaded document is measured before anything else.
"""

import time
import tracemalloc

import pytest

from quantkit.methods.base import load_recipe
from quantkit.recipe import RecipeError
from tiny_models import run_cli


def _laughs(where: str, levels: int = 9) -> str:
    """A recipe whose anchors l0..l9 expand to 9^10 strings, used `where`."""
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]")
    use = {"ignore": "ignore: *l9\nstages: [rtn]",  # refused as a list of non-strings, echoing it
           "option": "stages: [{method: awq, grid: *l9}]",  # an option value of the wrong type
           "unknown_key": "stages: [rtn]"}[where]  # unknown keys l0..l9
    return "\n".join(["version: 1", "scheme: W4A16", *lines, use]) + "\n"


@pytest.mark.parametrize("where", ["ignore", "option", "unknown_key"])
def test_alias_bomb_is_refused_fast_with_bounded_memory(tmp_path, where):
    p = tmp_path / "r.yaml"
    p.write_text(_laughs(where))
    tracemalloc.start()
    t = time.perf_counter()
    with pytest.raises(RecipeError) as ei:
        load_recipe(p)
    elapsed = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert "expands to more than" in str(ei.value)
    assert elapsed < 5 and peak < 64 * 2**20, (elapsed, peak)
    assert len(str(ei.value)) < 400


def test_self_referencing_and_deep_documents(tmp_path):
    for name, text, said in [
        ("self.yaml", "&a [*a]\n", "nests deeper than"),
        ("deep.yaml", "[" * 5000 + "]" * 5000, "nests deeper than"),
        ("deep.json", "[" * 200000 + "]" * 200000, "nests deeper than"),
    ]:
        p = tmp_path / name
        p.write_text(text)
        with pytest.raises(RecipeError, match=said):
            load_recipe(p)


def test_oversized_and_special_files(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("version: 1\n# " + "x" * (2 << 20) + "\n")
    with pytest.raises(RecipeError, match="more than any recipe"):
        load_recipe(big)
    with pytest.raises(RecipeError, match="is not a regular file"):
        load_recipe("/dev/zero")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"version: 1\nscheme: caf\xe9\n")
    with pytest.raises(RecipeError, match="is not UTF-8 text"):
        load_recipe(latin)


@pytest.mark.parametrize("text", [
    "version: 1\nscheme: W4A16\nstages: [rtn]\nignore: '{x}'\n",  # a huge value where a list belongs
    "version: 1\nscheme: '{x}'\nstages: [rtn]\n",  # a huge preset name
    "version: 1\nscheme: W4A16\nstages: [{{method: '{x}'}}]\n",  # a huge method name
    "version: 1\nscheme: W4A16\nstages: [{{method: awq, grid: '{x}'}}]\n",  # a huge option value
    "version: 1\nscheme: W4A16\nstages: [rtn]\n? '{x}'\n: 1\n",  # a huge unknown key
])
def test_errors_never_echo_an_unbounded_value(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text.format(x="A" * 200_000))
    with pytest.raises(RecipeError) as ei:
        load_recipe(p)
    assert len(str(ei.value)) < 400 and "…" in str(ei.value)
    code, out = run_cli("plan", "--recipe", p)  # the CLI line too
    assert code == 2 and len(out.strip().splitlines()[-1]) < 400 and "Traceback" not in out
