#!/usr/bin/env python
"""train.py — LoRA fine-tuning of Higgs Audio v2 on shards made by prep.py: one device, DDP or FSDP2.

    python train.py --shards data/prepared --output_dir runs/me --base_ckpt DIR_OR_HUB_ID
    torchrun --nproc_per_node=8 train.py --shards ... --output_dir ... [--fsdp]
    python train.py ... --resume latest          # continue exactly where the newest checkpoint left off

One optimizer step = `--grad_accum` micro-batches of `--batch_size` samples on every rank. The loss of the step
is normalised by the step's *global* target counts (all micro-batches, all ranks), so the update equals the one
of a single batch holding all of them, whatever the split across micro-batches and devices.

Output (`--output_dir`): metrics.jsonl (every logged value), loss.png (with matplotlib), tensorboard/ or wandb/
(`--report_to`), checkpoints/step-N (resumable, PEFT adapter inside; the newest --keep_checkpoints kept), best/
(lowest validation loss), final/ (end of training).
See minihiggs/train/checkpointing.py for the exact layout; the loop is minihiggs/train/recipe.py.

SIGTERM / SIGINT finish the current optimizer step, save a checkpoint and exit 0; repeats are the same request
(a scheduler's and torchrun's copies), only a Ctrl-C more than 3 s after the first signal aborts (exit 130; the
rule is in minihiggs/train/signals.py). An update with a non-finite loss, gradient or resulting weight is undone;
MAX_NONFINITE_IN_A_ROW in a row stop the run (exit 1) with the last good checkpoint untouched. Bad input (shards,
checkpoint, config.json, settings, --resume target, an unwritable --output_dir): one `train.py: error:` line,
exit 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from minihiggs.cli import run  # noqa: E402
from minihiggs.train import parse_train_args, train  # noqa: E402
from minihiggs.train.signals import Interrupted, StopRequest  # noqa: E402


def main(argv: list[str] | None = None, stop: StopRequest | None = None) -> int:
    """`stop`: an installed stop handler that outlives the run (see `minihiggs.train.train`). A user error (bad
    shards, checkpoint, config, settings or --resume target) ends as cli.run's one line and exit 2."""
    def command(args: list[str]) -> int:
        try:
            return train(parse_train_args(args, description=__doc__.split("\n\n")[0]), args, stop=stop)
        except Interrupted as e:
            if e.abort:
                print(f"train.py: aborted by a second {e.signal_name}: no checkpoint written for the steps since "
                      f"the last one (continue from it with --resume latest)", file=sys.stderr)
                return 130
            print(f"train.py: stopped by {e.signal_name} during setup: nothing trained, nothing to save",
                  file=sys.stderr)
            return 0

    return run("train.py", command, sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    # The stop handler stays installed until the process exits: a copy of the signal that arrives after the
    # checkpoint (torchrun forwards the scheduler's SIGTERM late) must meet it, not the default handler.
    code = main(stop=StopRequest().install())
    if os.environ.get("WORLD_SIZE", "1") != "1":
        # Everything is saved and the process group is destroyed. Skip interpreter teardown: with FSDP2 on gloo
        # it aborts now and then ("terminate called without an active exception", torch 2.13), which would
        # turn a finished run into a failed exit code under torchrun.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
    sys.exit(code)
