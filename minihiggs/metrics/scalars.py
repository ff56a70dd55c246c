"""The named scalars of a metrics record, as the TensorBoard and Weights & Biases sinks show them.

A train/val record `{"split": "val", "step": 6, "loss": 1.2, "audio_loss_per_codebook": [..8..], ...}` becomes
`{"val/loss": 1.2, "val/audio_loss_cb0": ..., ..., "val/audio_loss_cb7": ...}`: every number of the record
(`loss`, `text_loss`, `audio_loss`, `lr`, `grad_norm`, `tokens_per_s`, `epoch`, and whatever a record gains
later, e.g. `audio_acc`), each `*_per_codebook` list as one scalar per codebook. Bookkeeping fields (step,
time, target counts, the running token count, flags) are not curves. Events (start, checkpoint, ...) have no
scalars.
"""

from __future__ import annotations

NOT_SCALARS = frozenset({"split", "step", "time", "best", "tokens", "text_targets", "audio_targets"})
PER_CODEBOOK = "_per_codebook"


def _number(v) -> float | None:
    """A float for an int/float (NaN and inf kept: they are worth seeing), None for anything else."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return None


def scalars(record: dict) -> dict[str, float]:
    split = record.get("split")
    if not split:
        return {}
    out: dict[str, float] = {}
    for key, v in record.items():
        if key in NOT_SCALARS:
            continue
        if isinstance(v, (list, tuple)):
            base = key[:-len(PER_CODEBOOK)] + "_cb" if key.endswith(PER_CODEBOOK) else key + "_"
            for i, x in enumerate(v):
                if (f := _number(x)) is not None:
                    out[f"{split}/{base}{i}"] = f
        elif (f := _number(v)) is not None:
            out[f"{split}/{key}"] = f
    return out
