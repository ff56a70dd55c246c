"""A segment's loudness checked and normalised.

Target: `target_db` dBFS RMS over the segment (default -20 dBFS, about the level of read speech in LibriTTS and
LJSpeech), with the gain lowered where it would push a peak above `peak_db` (default -1 dBFS): normalising never
clips. Checked on the segment as recorded, before the gain:
* clipped: more than `clip_fraction` (default 0.1%) of its samples at full scale (|x| >= CLIP_LEVEL): the
  distortion is in the recording and would be learnt;
* near-silent: its RMS is below `silence_db` (default -50 dBFS): a gain of 30 dB or more would mostly raise noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLIP_LEVEL = 0.999  # full scale, within the rounding of 16-bit PCM


@dataclass(frozen=True)
class LoudnessRules:
    target_db: float = -20.0
    peak_db: float = -1.0
    silence_db: float = -50.0
    clip_fraction: float = 0.001


def db(x: float) -> float:
    return 20 * float(np.log10(max(x, 1e-10)))


def rms_db(wave: np.ndarray) -> float:
    return db(float(np.sqrt(np.mean(np.square(wave, dtype=np.float64))))) if wave.size else db(0.0)


def problem(wave: np.ndarray, rules: LoudnessRules) -> tuple[str, str] | None:
    """(report kind, reason) when the segment is not worth keeping, else None."""
    clipped = float(np.mean(np.abs(wave) >= CLIP_LEVEL)) if wave.size else 0.0
    if clipped > rules.clip_fraction:
        return "clipped", f"{100 * clipped:.2f}% of the samples at full scale (over {100 * rules.clip_fraction:g}%)"
    level = rms_db(wave)
    if level < rules.silence_db:
        return "near_silent", f"RMS {level:.1f} dBFS, under {rules.silence_db:g} dBFS"
    return None


def normalise(wave: np.ndarray, rules: LoudnessRules) -> tuple[np.ndarray, float]:
    """(the wave at `target_db` RMS, peaks held at `peak_db`; the gain applied in dB)."""
    gain = rules.target_db - rms_db(wave)
    peak = float(np.max(np.abs(wave))) if wave.size else 0.0
    gain = min(gain, rules.peak_db - db(peak))
    return (wave * np.float32(10 ** (gain / 20))).astype(np.float32), gain
