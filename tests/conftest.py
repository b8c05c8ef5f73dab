"""Shared fixtures: tiny random models of each supported family, seeded."""

from __future__ import annotations

import os
import signal

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from tiny_models import make_tiny_model, make_tiny_tokenizer  # noqa: E402,F401


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(params=["llama", "qwen2", "qwen3", "mistral"])
def tiny_arch(request):
    return request.param


@pytest.fixture(scope="module")
def reproducible_manifest():
    """Pin the manifest's timestamp (SOURCE_DATE_EPOCH) so two runs that should write the same bytes can."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOURCE_DATE_EPOCH", "1700000000")
        yield


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt in this process, as in a terminal. A test run started in the
    background (`cmd &` in a script) inherits SIGINT ignored, and the Ctrl-C tests would then see no Ctrl-C."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)
