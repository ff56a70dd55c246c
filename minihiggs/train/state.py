"""`TrainState`: the loop's bookkeeping, saved into every checkpoint and restored from it by the same code.

The data position is here (`epoch`, `batches_in_epoch`) and nowhere else: the resumed sampler is positioned from
it. What is *not* here is saved next to it by `checkpointing.save_checkpoint`: the optimizer, the LR scheduler's
step count and every rank's RNG streams.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (skipped non-finite updates included)
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` this rank has consumed
    tokens: int = 0  # non-padding positions seen, all ranks
    best_val: float = math.inf
    best_step: int | None = None
    bad_evals: int = 0  # validations since the last new best (early stopping)
    # the run's settings when saved: batch_size and seed must match on resume, grad_accum and total_steps may
    # change (see `checkpointing.check_resume_compatible`)
    batch_size: int = 0
    grad_accum: int = 0
    seed: int = 0
    total_steps: int = 0

    # Names as stored in trainer_state.pt / trainer_state.json ("tokens" etc. are the historical keys).
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["best_val"] = None if math.isinf(self.best_val) else self.best_val
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if kw.get("best_val") is None:
            kw["best_val"] = math.inf
        return cls(**kw)
