"""The metric-logger interface of the trainer: one `MetricLogger`, any number of sinks.

A record is a flat dict with `step` and either `split` ("train" / "val" values) or `event` (start, resume,
checkpoint, nonfinite, early_stop, interrupted, samples, end). The logger stamps `time` and hands it to every
sink; the JSONL sink (`metrics.jsonl`) is always on, TensorBoard and Weights & Biases are chosen with
`--report_to` (`REPORT_TO`). Only rank 0 logs (`enabled=False` elsewhere: no sink is even built there).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterable, Protocol

from ..errors import TrainConfigError
from .jsonl import JsonlSink
from .tensorboard import EVENT_FILE_GLOB

REPORT_TO = ("jsonl", "tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"


class Sink(Protocol):
    name: str

    def write(self, record: dict) -> None: ...

    def close(self) -> None: ...


class MetricLogger:
    def __init__(self, sinks: list[Sink], enabled: bool = True):
        self.sinks = list(sinks) if enabled else []
        self.enabled = enabled

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {**record, "time": round(time.time(), 3)}
        for s in self.sinks:
            s.write(record)

    def truncate_after(self, step: int) -> None:
        """A resumed run: forget the history after its checkpoint, in every sink that can (JSONL, TensorBoard)."""
        for s in self.sinks:
            if hasattr(s, "truncate_after"):
                s.truncate_after(step)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def parse_report_to(spec: str | Iterable[str]) -> list[str]:
    """`"jsonl,tensorboard"` (or a list of such items) -> the sink names, JSONL first and always included."""
    items = [spec] if isinstance(spec, str) else list(spec)
    names = [n.strip().lower() for item in items for n in item.split(",") if n.strip()]
    unknown = sorted(set(names) - set(REPORT_TO))
    if unknown:
        raise TrainConfigError(f"--report_to: unknown {', '.join(map(repr, unknown))}; choose from "
                               f"{','.join(REPORT_TO)} (comma-separated)")
    return [n for n in REPORT_TO if n == "jsonl" or n in names]


def check_report_to(spec: str | Iterable[str]) -> list[str]:
    """The sink names, after checking that their packages are installed (call on every rank before any work)."""
    names = parse_report_to(spec)
    if "tensorboard" in names:
        from .tensorboard import require_tensorboard

        require_tensorboard()
    if "wandb" in names:
        from .wandb_sink import require_wandb

        require_wandb()
    return names


def make_logger(output_dir: str | os.PathLike, enabled: bool = True, report_to: str | Iterable[str] = "jsonl",
                config: dict | None = None, resume: bool = False) -> MetricLogger:
    """The trainer's logger: `output_dir/metrics.jsonl`, plus `output_dir/tensorboard/` event files and a W&B
    run when `report_to` names them. `config`: the run's settings (shown by W&B). `resume`: the run continues
    from a checkpoint (histories are kept and truncated by `truncate_after`; otherwise they start afresh)."""
    names = check_report_to(report_to)
    if not enabled:
        return MetricLogger([], enabled=False)
    out = Path(output_dir)
    if not resume:  # a run that never checkpointed leaves a history behind: start afresh
        (out / "metrics.jsonl").unlink(missing_ok=True)
        for old in (out / TENSORBOARD_DIR).glob(EVENT_FILE_GLOB):
            old.unlink()
    sinks: list[Sink] = [JsonlSink(out / "metrics.jsonl")]
    if "tensorboard" in names:
        from .tensorboard import TensorBoardSink

        sinks.append(TensorBoardSink(out / TENSORBOARD_DIR))
    if "wandb" in names:
        from .wandb_sink import WandbSink

        sinks.append(WandbSink(out, config=config, resume=resume))
    return MetricLogger(sinks)
