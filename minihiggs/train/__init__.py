"""LoRA fine-tuning (what `train.py` / `torchrun train.py` runs).

`config` (TrainConfig: every flag), `state` (TrainState: the resumable bookkeeping), `step` (one optimizer step,
validation), `recipe` (setup + the loop), `checkpointing`, `data`, `distributed`, `schedule`, `signals`.
"""

from __future__ import annotations

from .config import TrainConfig, parse_train_args

__all__ = ["TrainConfig", "parse_train_args", "train"]


def train(cfg: TrainConfig, argv: list[str] | None = None) -> int:
    """Run one training job in this process (under torchrun: this rank). Returns the exit code (0 done or stopped
    by a signal with a checkpoint, 1 stopped by non-finite steps); raises a `UserError` for bad input."""
    import torch.distributed as dist

    from .distributed import cleanup, init_distributed
    from .recipe import LoRARecipe

    env = init_distributed()
    ok = False
    try:
        recipe = LoRARecipe(cfg, env, list(argv or []))
        recipe.setup()
        code = recipe.train()
        ok = True
        return code
    finally:
        # After an exception on one rank the others may be stuck in a collective: no barrier then.
        if ok:
            cleanup(env)
        elif env.initialized and dist.is_initialized():
            dist.destroy_process_group()
