"""Stopping on SIGTERM / SIGINT: one rule from the start of setup to the end of the run.

The rule (also in the README, "Training"):

* The first SIGTERM or SIGINT is a stop request. In the loop, the current optimizer step (or validation)
  finishes, a checkpoint is written, the process exits 0; `--resume latest` continues exactly. Before the loop
  (setup: nothing trained, nothing to save) the run stops at once, also with exit 0.
* Repeats of it are the same request, never an abort: a job's signal usually arrives more than once. SLURM
  signals every process of the job step, torchrun forwards the signal it receives to every rank (so a rank gets
  the scheduler's copy *and* torchrun's, at any distance in time), and a terminal's Ctrl-C reaches the whole
  process group. So a repeated SIGTERM never aborts, nor does a SIGINT within `GRACE_S` seconds of the first
  signal.
* A SIGINT more than `GRACE_S` seconds after the first signal is a deliberate second Ctrl-C: the run aborts at
  once without a checkpoint (exit 130). Launchers and schedulers escalate with SIGKILL, which needs no rule.

`Interrupted` is raised from the handler for the two "at once" cases; it derives from KeyboardInterrupt, so no
`except Exception` on the way up swallows it, and `finally` blocks (DataLoader workers, process group) still run.

Work that only costs time and can be dropped (audio samples while training) runs inside `StopRequest.abandonable()`:
a stop request there ends that work at once, so the checkpoint that follows is not kept waiting past a scheduler's
grace period.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

GRACE_S = 3.0  # repeats within this many seconds of the first signal are copies of it (see the module doc)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    """A stop that cannot wait for the end of a step: before training (`abort` False: nothing to save) or a
    deliberate second Ctrl-C (`abort` True: the steps since the last checkpoint are lost)."""

    def __init__(self, signal_name: str, abort: bool):
        super().__init__(signal_name)
        self.signal_name, self.abort = signal_name, abort


class Abandoned(BaseException):
    """Raised inside an `abandonable()` section by a stop request; the section's with-statement ends quietly.
    (A BaseException: an `except Exception` inside the abandoned work must not swallow it.)"""


class StopRequest:
    """Installs the handler of both stop signals; `signal` holds the first one's name once one arrived.

    Until `defer()` is called (setup) a stop raises `Interrupted` at once; after it (the loop) the first signal
    only sets `signal`, which the loop reads at its safe points (every optimizer step, every validation batch)."""

    def __init__(self, grace_s: float = GRACE_S) -> None:
        self.grace_s = grace_s
        self.signal: str | None = None
        self.deferred = False
        self.settled = False  # the run is over (see `settle`)
        self._first_at = 0.0
        self._said_repeat = False
        self._abandon = False  # inside an `abandonable()` section
        self._previous: dict[int, object] = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # (signal.signal works only there)
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def defer(self) -> None:
        """From now on a stop request waits for the loop's next safe point (a checkpoint is written there)."""
        self.deferred = True

    @contextmanager
    def abandonable(self) -> Iterator[None]:
        """A stop request arriving while the body runs interrupts it (an `Abandoned` raised inside it, caught here).
        Callers skip the work when `signal` is already set, and read `signal` afterwards to know."""
        self._abandon = True
        try:
            yield
        except Abandoned:
            pass
        finally:
            self._abandon = False

    def settle(self) -> None:
        """The run is over (its checkpoint written): from now to the process exit a signal is noted and ignored.
        The handler stays installed: a late copy (torchrun forwards the scheduler's SIGTERM at any time) must not
        meet the default handler, which kills the process without a word."""
        self.deferred, self.settled = True, True

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.settled:
            _say(f"{name} received: the run is over, exiting")
            return
        if self.signal is None:
            self.signal, self._first_at = name, now
            if not self.deferred:
                raise Interrupted(name, abort=False)
            _say(f"\n{name} received: finishing this optimizer step, then saving a checkpoint (exit 0). A Ctrl-C "
                 f"more than {self.grace_s:g} s from now aborts without a checkpoint.")
            if self._abandon:
                self._abandon = False  # (raised once: never again outside the section)
                raise Abandoned(name)
            return
        if signum == signal.SIGINT and now - self._first_at > self.grace_s:
            raise Interrupted(name, abort=True)
        if not self._said_repeat:  # said once: a launcher may deliver many copies
            self._said_repeat = True
            _say(f"{name} received again: already stopping (a repeated SIGTERM, or a signal within "
                 f"{self.grace_s:g} s of the first, is the same request)")


def _say(msg: str) -> None:
    """Write from a signal handler: os.write, since the handler may run while the main thread is inside a
    buffered write to stderr (a print there would raise 'reentrant call')."""
    try:
        os.write(sys.stderr.fileno(), (msg + "\n").encode())
    except (OSError, ValueError, AttributeError):  # no real stderr (captured, closed)
        pass
