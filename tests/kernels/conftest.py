"""Kernel tests: CPU runs use Triton's interpreter (TRITON_INTERPRET=1), GPU runs compile.

Triton reads TRITON_INTERPRET when it is first imported (its standard library is decorated
then).  We set it here, before anything in this directory imports triton.  If another test
module imported triton first (e.g. `python -m pytest tests`), the in-process interpreter cannot
work: the CPU kernel tests are then skipped here and re-run, unchanged, in a fresh subprocess
by `test_interpreter_subprocess.py`.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from quantkit.kernels._common import interpreter_usable  # noqa: E402

INTERP_OK = HAS_CUDA or interpreter_usable()
HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    if INTERP_OK:
        return
    skip = pytest.mark.skip(reason="triton imported before TRITON_INTERPRET=1: re-run in a subprocess "
                                   "by test_interpreter_subprocess.py")
    for it in items:
        path = str(getattr(it, "path", it.fspath))
        if path.startswith(HERE) and "interpreter_subprocess" not in it.name and "gpu" not in it.keywords:
            it.add_marker(skip)


@pytest.fixture
def dev():
    return torch.device("cuda" if HAS_CUDA else "cpu")
