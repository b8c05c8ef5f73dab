"""Shared fixtures: tiny random models of each supported family, seeded."""

from __future__ import annotations

import os
import signal

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# every cached kernel launch re-checks what an ordinary launch would bind (quantkit.kernels._common.CHECK_LAUNCH)
os.environ.setdefault("QUANTKIT_CHECK_LAUNCH", "1")

from tiny_models import make_tiny_model, make_tiny_tokenizer  # noqa: E402,F401

# ----------------------------------------------------------------------------- memory watchdog
# Two clean-checkout CI runs were killed by the kernel's OOM killer (pytest at 24 GB) right after
# test_fuzz_loaders, with no trace of which test allocated; it never happened again under a monitor. If the
# suite's RSS passes QK_TEST_RSS_LIMIT_GB (default 16), the watchdog names the running test, dumps every
# thread's stack and ends the run (exit 70) before the OOM killer ends it silently.
_RUNNING = {"test": "(collection)"}


def pytest_runtest_logstart(nodeid, location):
    _RUNNING["test"] = nodeid


def pytest_configure(config):
    _RUNNING["capture"] = config.pluginmanager.getplugin("capturemanager")


def _start_rss_watchdog() -> None:
    import faulthandler
    import sys
    import threading
    import time

    if not os.path.exists("/proc/self/status"):
        return
    limit = float(os.environ.get("QK_TEST_RSS_LIMIT_GB", "16")) * 2**30

    def rss() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def watch() -> None:
        while True:
            now = rss()
            if now > limit:
                capture = _RUNNING.get("capture")
                if capture is not None:  # the report must reach the real stderr, not the test's capture file
                    capture.suspend_global_capture(in_=False)
                sys.stderr.write(f"\ntest watchdog: RSS {now / 2**30:.1f} GiB > {limit / 2**30:.0f} GiB while running "
                                 f"{_RUNNING['test']}; every thread's stack follows\n")
                sys.stderr.flush()
                faulthandler.dump_traceback(all_threads=True)
                os._exit(70)
            time.sleep(0.1)

    threading.Thread(target=watch, name="rss-watchdog", daemon=True).start()


_start_rss_watchdog()


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
