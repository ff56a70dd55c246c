"""Signals that need no model: what catches "the fine-tuned voice is silent" and "it never stops".

* silence, from the waveform: 20 ms frames whose RMS is below `max(-60 dBFS, loudest frame - 40 dB)` are silent.
  `leading` / `trailing`: the silent stretch before the first / after the last voiced frame; `inner`: silent
  runs of at least 300 ms between them (shorter gaps are ordinary pauses and stop closures); each a fraction of
  the clip. A clip without a voiced frame is all leading silence (1.0).
* duration ratio: generated seconds over the ground truth's (None without one).
* stop reason: "eos" when the model ended the clip itself, "length" when the token limit cut it.
* repeated-frame ratio, from the codes [codebooks, frames]: the share of frames equal in every codebook to the
  frame before (a model stuck on one frame: digital silence, a held buzz).

`flags` turns them into named problems with the thresholds below; a correct clip raises none.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

FRAME_S = 0.02
FLOOR_DB = -60.0       # absolute: below this a frame is silent whatever the clip's level
RANGE_DB = 40.0        # relative: frames this far below the loudest one are silent
MIN_INNER_S = 0.3      # inner silent runs shorter than this are pauses, not counted

# flags(): a clip is flagged when ...
MAX_SILENCE = 0.8            # ... more than this share of it is silent (leading + inner + trailing)
MAX_EDGE_SILENCE = 0.4       # ... it starts or ends with more silence than this share
DURATION_RANGE = (0.5, 2.0)  # ... it is shorter/longer than these multiples of the ground truth
MAX_REPEATED = 0.5           # ... more than this share of its frames repeat the previous one


@dataclass
class Silence:
    leading: float
    trailing: float
    inner: float

    @property
    def total(self) -> float:
        return self.leading + self.trailing + self.inner


@dataclass
class Signals:
    seconds: float
    silence: Silence
    duration_ratio: float | None
    stop_reason: str | None
    repeated_frame_ratio: float | None

    def as_dict(self) -> dict:
        d = asdict(self)
        d["silence"]["total"] = self.silence.total
        return d


def frame_db(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """RMS level (dBFS) of consecutive 20 ms frames (a last partial frame counts as a frame)."""
    n = max(1, round(FRAME_S * sample_rate))
    w = np.asarray(wave, dtype=np.float64).reshape(-1)
    w = np.pad(w, (0, (-len(w)) % n)).reshape(-1, n)
    return 10 * np.log10(np.mean(w * w, axis=1) + 1e-20)


def silence_ratios(wave: np.ndarray, sample_rate: int) -> Silence:
    db = frame_db(wave, sample_rate)
    if len(db) == 0 or np.asarray(wave).size == 0:
        return Silence(1.0, 0.0, 0.0)
    voiced = db >= max(FLOOR_DB, float(db.max()) - RANGE_DB)
    idx = np.flatnonzero(voiced)
    if idx.size == 0:
        return Silence(1.0, 0.0, 0.0)
    first, last, n = int(idx[0]), int(idx[-1]), len(db)
    inner, run = 0, 0
    for v in voiced[first:last + 1]:
        if v:
            inner += run if run * FRAME_S >= MIN_INNER_S else 0
            run = 0
        else:
            run += 1
    return Silence(first / n, (n - 1 - last) / n, inner / n)


def repeated_frame_ratio(codes: torch.Tensor | np.ndarray) -> float:
    """Share of frames (after the first) equal in every codebook to the previous frame; 0 for < 2 frames."""
    c = torch.as_tensor(np.asarray(codes))
    if c.dim() != 2 or c.shape[1] < 2:
        return 0.0
    return float((c[:, 1:] == c[:, :-1]).all(0).float().mean())


STOP_REASONS = {"stop_token": "eos", "max_new_tokens": "length"}  # minihiggs.generate's names -> ours


def cheap_signals(wave, sample_rate: int, *, truth_seconds: float | None = None, stop_reason: str | None = None,
                  codes=None) -> Signals:
    seconds = np.asarray(wave).size / sample_rate
    ratio = seconds / truth_seconds if truth_seconds else None
    return Signals(seconds, silence_ratios(wave, sample_rate), ratio, STOP_REASONS.get(stop_reason, stop_reason),
                   None if codes is None else repeated_frame_ratio(codes))


def flags(s: Signals) -> list[str]:
    """The problems a clip shows: silent, leading_silence, trailing_silence, no_eos, too_short, too_long,
    repetitive."""
    out = []
    if s.silence.total > MAX_SILENCE:
        out.append("silent")
    else:
        if s.silence.leading > MAX_EDGE_SILENCE:
            out.append("leading_silence")
        if s.silence.trailing > MAX_EDGE_SILENCE:
            out.append("trailing_silence")
    if s.stop_reason == "length":
        out.append("no_eos")
    if s.duration_ratio is not None:
        if s.duration_ratio < DURATION_RANGE[0]:
            out.append("too_short")
        elif s.duration_ratio > DURATION_RANGE[1]:
            out.append("too_long")
    if s.repeated_frame_ratio is not None and s.repeated_frame_ratio > MAX_REPEATED:
        out.append("repetitive")
    return out
