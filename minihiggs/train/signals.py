"""Graceful stop on SIGTERM / SIGINT: finish the optimizer step, save a checkpoint, exit 0."""

from __future__ import annotations

import signal
import sys


class StopRequest:
    """SIGTERM / SIGINT set a flag the loop reads after each optimizer step; a second signal aborts."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signal is not None:
            self.restore()
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborting without a checkpoint")
        self.signal = signal.Signals(signum).name
        print(f"\n{self.signal} received: finishing this optimizer step, then saving a checkpoint", file=sys.stderr,
              flush=True)
