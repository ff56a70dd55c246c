"""`output_dir/metrics.jsonl`: one JSON object per line for every logged value (rank 0 writes).

Records have `"split": "train"` (a --log_steps window: token-weighted losses over the window, lr, grad norm,
tokens/s), `"split": "val"` (a validation pass) or `"event"` (start, resume, checkpoint, nonfinite, early_stop,
interrupted, end). Every record carries `step` (optimizer steps done) and `time` (unix seconds).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

from ..fsio import atomic_write_text


def _clean(v: Any) -> Any:
    """JSON-safe: NaN/inf become strings (json.dumps would write invalid JSON `NaN`)."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


class JsonlSink:
    """Appends each record as one line; the always-on sink (plots, tests and resume read it back)."""

    name = "jsonl"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(_clean(record)) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (a resumed run redoes those steps; keep the file one consistent history)."""
        if not self.path.is_file():
            return
        kept = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def close(self) -> None:
        pass


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics.jsonl (a torn last line, e.g. after a crash, is ignored)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def series(records: Iterable[dict], split: str, key: str = "loss") -> tuple[list[int], list[float]]:
    """(steps, values) of one split, the last record winning when a step repeats."""
    by_step: dict[int, float] = {}
    for r in records:
        if r.get("split") == split and isinstance(r.get(key), (int, float)):
            by_step[int(r["step"])] = float(r[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]
