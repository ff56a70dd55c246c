"""Where a long recording is cut: at pauses found from the frame energy, never inside speech.

1. `frame_levels` streams the file in blocks (never decoded whole) and keeps one number per 10 ms frame: its RMS
   level in dBFS (channels averaged first). A 2-hour file is 720k floats.
2. `speech_runs`: the file's speech level is the 95th percentile of its frame levels. A run of speech starts at a
   frame louder than `speech level - threshold_db + hysteresis_db` and goes on while frames stay above
   `speech level - threshold_db` (hysteresis: the quiet between syllables does not end it); it ends at a pause:
   `min_pause` seconds of frames below that. Frames under FLOOR_DB never count as speech, whatever the level.
3. `plan_segments` groups runs into segments: a segment closes at the first pause once it holds `min_seconds`,
   so every cut lies in a pause. A phrase shorter than that takes the next one in, across a pause of at most
   MERGE_PAUSE seconds, as long as the whole stays within `max_seconds`. Each segment keeps `margin` seconds of
   the pause on both sides (at most half of the pause, and less where the margins would pass `max_seconds`).
   A run of speech longer than `max_seconds` (no pause to cut at) is reported as `no_pause` and skipped, and a
   segment that stays under `min_seconds` as `too_short`: a cut inside a word would teach the model half words.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..audio.io import to_mono

FRAME_SECONDS = 0.01
SPEECH_PERCENTILE = 95  # the file's speech level: loud enough to ignore pauses, robust to a few peaks
FLOOR_DB = -70.0  # quieter than this is never speech (digital silence, hum of a quiet room)
MERGE_PAUSE = 1.0  # seconds: a short phrase joins its neighbour only across a pause this short
BLOCK_FRAMES = 4096  # frames per block read from the file (~41 s): memory of the scan


@dataclass(frozen=True)
class SegmentRules:
    """The segmentation settings (the ingest flags of the same names)."""

    min_seconds: float = 1.0
    max_seconds: float = 30.0
    min_pause: float = 0.3
    margin: float = 0.2
    threshold_db: float = 35.0
    hysteresis_db: float = 6.0


@dataclass(frozen=True)
class Levels:
    """Frame levels of one file: `db[k]` is the RMS level of samples [k * hop, (k + 1) * hop)."""

    db: np.ndarray
    sample_rate: int
    hop: int
    frames: int  # samples of the file

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate

    def time(self, k: int) -> float:
        return min(k * self.hop, self.frames) / self.sample_rate


@dataclass(frozen=True)
class Piece:
    """A planned segment: [start, end) in seconds of the source; `problem` is None for one to keep, else the report
    kind (`no_pause`, `too_short`) with `reason`."""

    start: float
    end: float
    problem: str | None = None
    reason: str = ""

    @property
    def seconds(self) -> float:
        return self.end - self.start


def frame_levels(sound_file) -> Levels:
    """The dBFS level of every 10 ms frame of an open `soundfile.SoundFile`, read block by block."""
    sr = int(sound_file.samplerate)
    hop = max(1, round(sr * FRAME_SECONDS))
    parts = []
    sound_file.seek(0)
    for block in sound_file.blocks(blocksize=hop * BLOCK_FRAMES, dtype="float32", always_2d=True):
        x = to_mono(block.T).astype(np.float64)
        n = len(x) // hop
        power = list(np.mean(x[:n * hop].reshape(n, hop) ** 2, axis=1)) if n else []
        if len(x) > n * hop:  # the file's last, partial frame (blocks are whole frames until then)
            power.append(np.mean(x[n * hop:] ** 2))
        parts.append(np.asarray(power, dtype=np.float64))
    power = np.concatenate(parts) if parts else np.zeros(0)
    db = (10 * np.log10(power + 1e-12)).astype(np.float32)
    return Levels(db, sr, hop, int(sound_file.frames))


def speech_runs(levels: Levels, rules: SegmentRules) -> list[tuple[int, int]]:
    """[first frame, end frame) of each stretch of speech, separated by pauses of at least `min_pause`."""
    db = levels.db
    if db.size == 0:
        return []
    quiet = max(float(np.percentile(db, SPEECH_PERCENTILE)) - rules.threshold_db, FLOOR_DB)
    loud = quiet + rules.hysteresis_db
    pause_frames = max(1, round(rules.min_pause / FRAME_SECONDS))
    runs, start, end = [], None, 0
    for k, level in enumerate(db.tolist()):
        if start is None:
            if level >= loud:
                start, end = k, k + 1
        elif level >= quiet:
            end = k + 1
        elif k + 1 - end >= pause_frames:
            runs.append((start, end))
            start = None
    if start is not None:
        runs.append((start, end))
    return runs


def plan_segments(levels: Levels, rules: SegmentRules) -> list[Piece]:
    """The file's segments, in order, each cut in a pause (the rules in the module docstring)."""
    runs = speech_runs(levels, rules)
    t = levels.time
    groups: list[list[tuple[int, int]]] = []
    for run in runs:
        cur = groups[-1] if groups else None
        if cur is not None and t(cur[-1][1]) - t(cur[0][0]) < rules.min_seconds \
                and t(run[0]) - t(cur[-1][1]) <= MERGE_PAUSE and t(run[1]) - t(cur[0][0]) <= rules.max_seconds:
            cur.append(run)
        else:
            groups.append([run])
    pieces = []
    for i, g in enumerate(groups):
        a, b = t(g[0][0]), t(g[-1][1])
        if b - a > rules.max_seconds:
            pieces.append(Piece(a, b, "no_pause", f"{b - a:.1f} s of speech without a pause of {rules.min_pause} s "
                                                  f"(over --max_seconds {rules.max_seconds}): not cut inside speech"))
            continue
        before = (a - t(groups[i - 1][-1][1])) / 2 if i else a
        after = (t(groups[i + 1][0][0]) - b) / 2 if i + 1 < len(groups) else levels.seconds - b
        m = min(rules.margin, (rules.max_seconds - (b - a)) / 2)
        start, end = a - min(m, before), b + min(m, after)
        if end - start < rules.min_seconds:
            pieces.append(Piece(start, end, "too_short", f"{end - start:.2f} s, under --min_seconds "
                                                         f"{rules.min_seconds}"))
        else:
            pieces.append(Piece(start, end))
    return pieces
