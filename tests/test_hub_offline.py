"""A hub id or hf: dataset with no network: one line within seconds, honouring HF_HUB_OFFLINE.

The hub client alone retries a dead network for about half a minute, a line per retry. Tests
never reach the internet: "no network" is an endpoint on the loopback where nothing listens.
"""

import time

import pytest

import quantkit.api
from tiny_models import run_cli, save_tiny_model_dir


@pytest.fixture
def hub_env(monkeypatch):
    from huggingface_hub import constants

    def set_(offline: bool, endpoint: str = "http://127.0.0.1:9"):  # port 9 (discard): nothing listens
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(v, raising=False)
        monkeypatch.setattr(quantkit.api, "load", lambda *a, **k: pytest.fail("loaded"))
    return set_


def _line(code, text):
    lines = [l for l in text.strip().splitlines() if l.strip()]
    assert code == 2 and "Traceback" not in text and "Retry" not in text, text
    assert lines[-1].startswith("error: ")
    return lines[-1]


@pytest.mark.parametrize("cmd", [("rtn", "--out", "OUT"), ("plan",), ("scan", "--out", "OUT/s.json")])
def test_hub_id_offline(hub_env, tmp_path, cmd):
    hub_env(offline=True)
    t = time.perf_counter()
    code, text = run_cli(*[str(tmp_path / "o") if c == "OUT" else c.replace("OUT", str(tmp_path)) for c in cmd],
                         "--model", "nobody/no-such-model")
    line = _line(code, text)
    assert time.perf_counter() - t < 10
    assert "cannot fetch config.json of 'nobody/no-such-model' from the Hugging Face hub: HF_HUB_OFFLINE is set" in line
    assert "not in the local hub cache" in line


def test_hub_id_unreachable(hub_env, tmp_path):
    hub_env(offline=False)
    t = time.perf_counter()
    code, text = run_cli("rtn", "--model", "nobody/no-such-model", "--out", tmp_path / "o")
    line = _line(code, text)
    assert time.perf_counter() - t < 10  # one connection attempt, not ~30 s of retries
    assert "the hub at http://127.0.0.1:9 is unreachable (127.0.0.1:9: connection refused)" in line


def test_hf_dataset_unreachable_before_loading(hub_env, tmp_path, tiny_tokenizer):
    model = save_tiny_model_dir(tmp_path / "m", tiny_tokenizer)
    hub_env(offline=False)
    code, text = run_cli("awq", "--model", model, "--out", tmp_path / "o", "-g", "32", "--samples", "2",
                         "--seqlen", "32", "--calib", "hf:nobody/no-such-data")
    assert "cannot fetch dataset 'hf:nobody/no-such-data': the hub at http://127.0.0.1:9 is unreachable" \
        in _line(code, text)


def test_hub_loader_unreachable_uses_one_line(hub_env):
    """The library path (load_model with a hub id) says the same."""
    from quantkit.errors import UsageError
    from quantkit.models.loading import load_model

    hub_env(offline=False)
    with pytest.raises(UsageError, match="is unreachable .* not in the local hub cache"):
        load_model("nobody/no-such-model")
