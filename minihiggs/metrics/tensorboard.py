"""A TensorBoard sink: the scalars of every train/val record (`scalars`) through `torch.utils.tensorboard`'s
`SummaryWriter`, which needs the `tensorboard` package (an optional extra, see requirements-extras.txt).

A resumed run writes a SessionLog START at the first re-done step, so TensorBoard drops the points an earlier run
logged after the checkpoint (its `purge_orphaned_data`).
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

from ..errors import TrainConfigError
from .scalars import scalars

EVENT_FILE_GLOB = "events.out.tfevents.*"


def require_tensorboard() -> None:
    """Fail at start-up (every rank, before any work) when `--report_to tensorboard` cannot be honoured."""
    if importlib.util.find_spec("tensorboard") is None:
        raise TrainConfigError("--report_to tensorboard needs the tensorboard package, which is not installed: "
                               "pip install tensorboard (or pip install -r requirements-extras.txt)")


class TensorBoardSink:
    """One event file per run (resumes too) under `log_dir`, flushed per record so that a running job can be
    watched with `tensorboard --logdir OUTPUT_DIR/tensorboard`."""

    name = "tensorboard"

    def __init__(self, log_dir: str | os.PathLike):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        before = set(self.log_dir.glob(EVENT_FILE_GLOB))
        self._writer = SummaryWriter(str(self.log_dir))
        # The writer names its file itself (time, host, pid, counter); it is created with the writer.
        (self.path,) = set(self.log_dir.glob(EVENT_FILE_GLOB)) - before

    def write(self, record: dict) -> None:
        values = scalars(record)
        if not values:
            return
        step, wall_time = int(record["step"]), record.get("time", time.time())
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, step, walltime=wall_time)
        self._writer.flush()

    def truncate_after(self, step: int) -> None:
        """A resumed run redoes the steps after `step`: TensorBoard discards what an earlier run logged there."""
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        self._writer.file_writer.add_event(Event(step=step + 1, wall_time=time.time(),
                                                 session_log=SessionLog(status=SessionLog.START)))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
