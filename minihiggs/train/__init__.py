"""LoRA fine-tuning (what `train.py` / `torchrun train.py` runs).

`config` (TrainConfig: every flag), `state` (TrainState: the resumable bookkeeping), `step` (forward + backward
of a step, validation), `recipe` (setup + the loop), `checkpointing`, `data`, `distributed`, `schedule`, `signals`
(the stop rule), `guard` (the accepted-update check), `preflight` (up-front checks of the output dir and the config).
"""

from __future__ import annotations

from .config import TrainConfig, parse_train_args

__all__ = ["TrainConfig", "parse_train_args", "train"]


def train(cfg: TrainConfig, argv: list[str] | None = None, stop=None) -> int:
    """Run one training job in this process (under torchrun: this rank). Returns the exit code (0 done or stopped
    by a signal with a checkpoint, 1 stopped by non-finite steps); raises a `UserError` for bad input, and
    `signals.Interrupted` for a stop during setup (nothing to save) or a deliberate second Ctrl-C (abort).

    The stop-signal handler covers the whole run, from before the process group is created to the last file
    written (the rule is in signals.py). Pass an installed `signals.StopRequest` as `stop` to keep it beyond the
    run (train.py keeps it until the process exits); without one, the handler is installed here and removed at
    the end."""
    import errno

    import torch.distributed as dist

    from ..errors import OutputError
    from .distributed import cleanup, init_distributed
    from .recipe import LoRARecipe
    from .signals import StopRequest

    own_handler = stop is None
    stop = StopRequest().install() if own_handler else stop
    env = None
    ok = False
    try:
        env = init_distributed()
        recipe = LoRARecipe(cfg, env, list(argv or []), stop=stop)
        recipe.setup()
        code = recipe.train()
        ok = True
        return code
    except OSError as e:
        # A write that failed where no code named the file (e.g. a metrics line on a full disk): still the
        # user's to fix, and every write being atomic, what was saved before is intact.
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) and not isinstance(e, OutputError):
            raise OutputError(f"{e.filename or cfg.output_dir}: cannot write ({e.strerror}) (free disk space or "
                              f"fix the directory, then continue with --resume latest)") from e
        raise
    finally:
        # After an exception on one rank the others may be stuck in a collective: no barrier then.
        try:
            if env is not None and ok:
                cleanup(env)
            elif env is not None and env.initialized and dist.is_initialized():
                dist.destroy_process_group()
        finally:
            if own_handler:
                stop.restore()
            else:
                stop.settle()
