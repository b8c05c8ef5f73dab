"""Ctrl-C at any instant: critical sections, a truthful message, and named phases for fault tests.

- `defer_interrupts()`: a SIGINT that arrives inside the block is held and raised as
  KeyboardInterrupt when the block ends, so a multi-step change on disk (moving the old
  checkpoint aside and renaming the new one in; removing `OUT.partial`) is never cut in half
  by Ctrl-C. SIGKILL cannot be held: what it can leave is repaired by the next run
  (`quantkit.export.atomic.recover_stale`).
- `Interrupted`: a KeyboardInterrupt that carries what is on disk now; the CLI prints it
  instead of a generic line.
- `reached(phase)`: a named point of a run. Fault tests set `QUANTKIT_SIGNAL_AT=PHASE[:SIG]`
  (SIG: INT, the default, KILL or TERM) and the process sends itself that signal the first time
  it reaches PHASE. Unset (always, outside tests) it does nothing. The phases, in run order:
  `loaded` (model loaded), `saved.N` (N blocks saved in OUT.partial), `calibrated`,
  `export.weights` (weights written to the temp dir), `export.manifest` (temp dir complete),
  `commit.aside` (an old OUT moved aside, the new one not yet renamed in), `commit.renamed`
  (new OUT in place, the old one not yet deleted), `exported`, `discard.renamed`
  (OUT.partial moved to its trash name, not yet deleted), `done`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

SIGNAL_ENV = "QUANTKIT_SIGNAL_AT"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with a one-line account of what is on disk (`message`)."""

    def __init__(self, message: str, *, committed: bool = False):
        super().__init__(message)
        self.message = message
        self.committed = committed  # a checkpoint was completed at --out before the interrupt


def reached(phase: str) -> None:
    """Fault-test hook: signal this process when QUANTKIT_SIGNAL_AT names `phase` (see the module doc)."""
    spec = os.environ.get(SIGNAL_ENV)
    if not spec:
        return
    want, _, sig = spec.partition(":")
    if want != phase:
        return
    signum = {"INT": signal.SIGINT, "KILL": signal.SIGKILL, "TERM": signal.SIGTERM}.get(sig.upper() or "INT")
    if signum is not None:
        os.kill(os.getpid(), signum)


@contextlib.contextmanager
def defer_interrupts() -> Iterator[None]:
    """Hold SIGINT while the block runs; raise it (KeyboardInterrupt) once the block is done.

    Outside the main thread (where signal handlers cannot be set) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    try:
        old = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if pending and callable(old):
        old(signal.SIGINT, None)  # the default handler raises KeyboardInterrupt
