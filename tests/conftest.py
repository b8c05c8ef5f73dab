"""Shared fixtures: tiny random models of each supported family, seeded."""

from __future__ import annotations

import os

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
