"""The metric-logger interface of the trainer: one `MetricLogger`, any number of sinks.

A record is a flat dict with `step` and either `split` ("train" / "val" values) or `event` (start, resume,
checkpoint, nonfinite, early_stop, interrupted, samples, end). The logger stamps `time` and hands it to every
sink; the JSONL sink (`metrics.jsonl`) is always on. Only rank 0 logs (`enabled=False` elsewhere).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Protocol

from .jsonl import JsonlSink


class Sink(Protocol):
    name: str

    def write(self, record: dict) -> None: ...

    def close(self) -> None: ...


class MetricLogger:
    def __init__(self, sinks: list[Sink], enabled: bool = True):
        self.sinks = list(sinks) if enabled else []
        self.enabled = enabled

    @property
    def jsonl(self) -> JsonlSink | None:
        return next((s for s in self.sinks if isinstance(s, JsonlSink)), None)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {**record, "time": round(time.time(), 3)}
        for s in self.sinks:
            s.write(record)

    def truncate_after(self, step: int) -> None:
        """A resumed run: forget the history after its checkpoint (the JSONL file; other sinks keep theirs)."""
        if self.jsonl is not None:
            self.jsonl.truncate_after(step)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def make_logger(output_dir: str | os.PathLike, enabled: bool = True) -> MetricLogger:
    """The trainer's logger: `output_dir/metrics.jsonl`."""
    return MetricLogger([JsonlSink(Path(output_dir) / "metrics.jsonl")], enabled=enabled)
