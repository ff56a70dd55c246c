"""A Weights & Biases sink: the scalars of every train/val record (`scalars`) logged at their step.

Uses the real `wandb` package (an optional extra: `pip install -r requirements-extras.txt`). The usual W&B
environment applies: `WANDB_PROJECT` (default "minihiggs"), `WANDB_ENTITY`, `WANDB_MODE=offline` (no account or
network; `wandb sync OUTPUT_DIR/wandb/offline-run-*` uploads later), `WANDB_API_KEY`. The run's files go to
`OUTPUT_DIR/wandb/`; its id is kept in `OUTPUT_DIR/wandb_run.json`, so a `--resume`d run continues the same W&B
run (W&B keeps the first values it saw for the steps a resume redoes).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from ..errors import TrainConfigError
from ..fsio import atomic_write_text
from .scalars import scalars

RUN_FILE = "wandb_run.json"


def require_wandb() -> None:
    """Fail at start-up (every rank, before any work) when `--report_to wandb` cannot be honoured."""
    if importlib.util.find_spec("wandb") is None:
        raise TrainConfigError("--report_to wandb needs the wandb package, which is not installed: "
                               "pip install wandb (or pip install -r requirements-extras.txt)")


class WandbSink:
    name = "wandb"

    def __init__(self, output_dir: str | os.PathLike, config: dict | None = None, resume: bool = False):
        require_wandb()
        import wandb

        out = Path(output_dir)
        run_file = out / RUN_FILE
        run_id = json.loads(run_file.read_text())["id"] if resume and run_file.is_file() else None
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "minihiggs"), name=out.resolve().name,
                              dir=str(out), id=run_id, resume="allow" if run_id else None, config=config or {})
        atomic_write_text(run_file, json.dumps({"id": self.run.id}) + "\n")

    def write(self, record: dict) -> None:
        values = scalars(record)
        if values:
            self.run.log(values, step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()
