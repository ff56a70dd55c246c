"""The forward + backward of one optimizer step's micro-batches (`forward_backward`; the update itself is the
recipe's), and validation.

Both are the only places the model is called during training, so the normalisation rule lives here once: every
loss is a sum divided by the step's (or the validation set's) *global* target counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..data.batch import Batch
from ..model.loss import LossSums
from ..wrappers import unwrap
from .distributed import all_reduce_sum, drop_globally_unused_grads, gradient_sync, is_fsdp


@dataclass
class StepResult:
    sums: LossSums  # this rank's loss sums and target counts over the step's micro-batches (detached)
    tokens: int  # this rank's non-padding positions


def forward_backward(model: torch.nn.Module, micro_batches: list[Batch], device: torch.device, world_size: int,
               num_codebooks: int) -> StepResult:
    """Forward + backward of one optimizer step's micro-batches (gradients accumulate in .grad).

    The denominators are the step's global target counts (known before any forward, summed over micro-batches
    and ranks), so sum_i normalized_i is exactly the mean loss of the union batch. DDP / FSDP2 *average*
    gradients over ranks, hence the `* world_size`.

    No host synchronisation: the counts come from the host-side batches, `tokens` from their spans, and nothing
    reads a device value (the trainer reads the step's loss and gradient norm once, after the step).
    """
    counts = torch.zeros(1 + num_codebooks, dtype=torch.long)
    for b in micro_batches:
        text, audio = b.target_counts()
        counts[0] += text
        counts[1:] += audio
    # Counted on the host from the collated batches; a pinned, asynchronous copy (a pageable one waits for the GPU).
    if device.type == "cuda":
        counts = counts.pin_memory()
    counts = all_reduce_sum(counts.to(device, non_blocking=True))
    text_denom, audio_denom = counts[0], counts[1:]
    total: LossSums | None = None
    tokens = 0
    for i, b in enumerate(micro_batches):
        with gradient_sync(model, enabled=i == len(micro_batches) - 1):
            sums = model(b.to(device, non_blocking=True))
            (sums.normalized(text_denom, audio_denom) * world_size).backward()
        total = sums.detach() if total is None else total + sums.detach()
        tokens += b.num_tokens
    drop_globally_unused_grads(model)  # (FSDP2: None, not zeros, for what no rank used, as one process has)
    assert total is not None
    return StepResult(total, tokens)


@torch.no_grad()
def evaluate(train_model: torch.nn.Module, batches: list[tuple[Batch, bool]], device: torch.device,
             should_stop: Callable[[], bool] | None = None) -> dict | None:
    """Validation over this rank's batches, sums all-reduced: {total, text_loss, audio_loss, per codebook, ...}.

    Under FSDP2 the forward is a collective, so every rank runs the same number of batches; `pad` batches only
    keep that count equal and are not counted. Otherwise the unwrapped model is used (no DDP hooks).
    `should_stop` is asked before every batch (on every rank: it may be a collective); when it says yes the pass
    is abandoned and None returned."""
    model = train_model if is_fsdp(train_model) else unwrap(train_model)
    was_training = model.training
    model.eval()
    total: torch.Tensor | None = None
    try:
        for batch, pad in batches:
            if should_stop is not None and should_stop():
                return None
            v = model(batch.to(device, non_blocking=True)).as_vector()
            v = torch.zeros_like(v) if pad else v  # (0 * NaN would still be NaN)
            total = v if total is None else total + v
    finally:
        model.train(was_training)
    assert total is not None
    return LossSums.from_vector(all_reduce_sum(total), unwrap(train_model).config.audio_num_codebooks).report()


def loss_fields(report: dict) -> dict:
    """The loss values of a `LossSums.report()` under the names metrics.jsonl uses."""
    out = {"loss": report["total"], "text_loss": report["text_loss"], "audio_loss": report["audio_loss"],
           "audio_loss_per_codebook": report["audio_loss_per_codebook"]}
    if "audio_acc" in report:  # teacher-forced top-1 accuracy per codebook (validation)
        out["audio_acc"] = report["audio_acc"]
        out["audio_acc_per_codebook"] = report["audio_acc_per_codebook"]
    return out
