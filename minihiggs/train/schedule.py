"""Learning-rate schedules: linear warmup, then cosine (to 0), linear (to 0) or constant.

The schedule is a `LambdaLR` over a plain closure, so its state dict holds only the step counter and base LRs:
a resumed run continues the step count while the shape comes from the current command line (extending
`--max_steps` on resume stretches the remaining decay instead of silently keeping the old length).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

SCHEDULES = ("cosine", "linear", "constant")


def warmup_steps(warmup: float, total_steps: int) -> int:
    """`--warmup`: a value >= 1 is a number of optimizer steps, a value in [0, 1) a fraction of the total."""
    if warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {warmup}")
    if warmup >= 1:
        if warmup != int(warmup):
            raise ValueError(f"--warmup {warmup}: give whole steps (>= 1) or a fraction of the run (< 1)")
        return int(warmup)
    return int(round(warmup * total_steps))


def lr_factor(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """step -> multiplier of the base LR for the update made at optimizer step `step` (0-based)."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown LR schedule {kind!r} (choose from {', '.join(SCHEDULES)})")
    total = max(int(total), 1)
    warmup = min(max(int(warmup), 0), total)

    def factor(step: int) -> float:
        # (step + 1) / warmup: the first update already moves (HF's step / warmup makes update 0 a no-op).
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup: int,
                    total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(kind, warmup, total))


def load_scheduler_state(scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict, lr: float) -> None:
    """Resume `scheduler` (built from the current command line) at the saved step count.

    `LambdaLR.load_state_dict` alone would also bring back the old run's base LRs, and the optimizer's saved
    param groups hold the LR the *old* schedule picked for the next update: a resume with another `--lr`,
    `--max_steps` or `--lr_schedule` would silently keep the old LR (the base forever, the shape for one step).
    The step count comes from the checkpoint; the base LR and the shape from now. With unchanged settings the
    LRs are bitwise the ones the uninterrupted run uses (the same `base * factor(step)` expression).
    Call after the optimizer's state is loaded."""
    groups = scheduler.optimizer.param_groups
    base = [float(lr) for _ in groups]
    lrs = [b * fn(int(state["last_epoch"])) for b, fn in zip(base, scheduler.lr_lambdas)]
    # (the state dict's own keys: base_lrs, and _last_lr, what get_last_lr() reports)
    scheduler.load_state_dict({**state, "base_lrs": base, "_last_lr": lrs})
    for g, b, value in zip(groups, base, lrs):
        g["initial_lr"] = b
        g["lr"] = value
