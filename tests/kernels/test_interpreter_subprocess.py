import os
import subprocess
import sys

import pytest
import torch

from quantkit.kernels._common import interpreter_usable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def test_interpreter_subprocess():
    """Runs this directory's CPU tests in a fresh interpreter when triton was imported too early."""
    if torch.cuda.is_available() or interpreter_usable():
        pytest.skip("the interpreter works in this process; the tests ran directly")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", HERE,
         "-k", "not interpreter_subprocess"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
