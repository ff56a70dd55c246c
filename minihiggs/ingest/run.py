"""The ingest run: `ingest(IngestConfig(...))` turns a folder of recordings into cut WAVs and a ChatML manifest.

OUT/wavs/<recording path without extension>/<NNNN>.wav   the kept segments, 24 kHz mono 16-bit, loudness normalised
OUT/manifest.jsonl       one ChatML TTS sample per kept segment (prep.py reads it); `misc` traces it: source file,
                         start/end seconds, where the transcript came from, the ASR's avg_logprob/no_speech_prob
OUT/ingest_report.jsonl  what was not kept and why (kind: no_pause, too_short, clipped, near_silent, no_speech,
                         low_confidence, repetitive, no_transcript, too_long, unreadable)
OUT/parts/<recording>.json   a recording's lines and report rows: written when it is finished (the done-marker), so a
                         re-run skips it; the two files above are rebuilt from the parts in file order.

A recording with a sidecar transcript (`<name>.txt` or `<name>.lab` next to it) is one utterance already: it is
trimmed and normalised but not cut, and its transcript is kept (no ASR). Every other recording is cut at pauses
(`segment.py`) and transcribed. The speaker is `--speaker`, else the `--speaker_map` entry of the file or of a
folder above it, else the first folder under --input (the folder's own name for files directly in it).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..audio.io import resample, to_mono
from ..cli import flag
from ..constants import CODEC_SAMPLE_RATE
from ..errors import IngestError
from ..fsio import atomic_write_json, atomic_write_text
from ..prep.plain_list import AUDIO_EXTENSIONS
from ..text.chatml import DEFAULT_SCENE, tts_sample
from . import loudness, transcribe
from .segment import FRAME_SECONDS, Piece, SegmentRules, frame_levels, plan_segments, speech_runs

ASR_RATE = 16000
SIDECARS = (".txt", ".lab")


@dataclass
class IngestConfig:
    """The flags of `python -m minihiggs.ingest`."""

    input: str = flag(help="folder of recordings (searched recursively; any format soundfile reads)")
    out: str = flag(help="output folder: wavs/, manifest.jsonl, ingest_report.jsonl")
    speaker: str | None = flag(None, "one speaker name for every recording (default: the first folder under --input)")
    speaker_map: str | None = flag(None, "file of 'path|speaker' lines (or tab-separated): a recording or a folder "
                                         "under --input, and its speaker")
    language: str = flag("en", "language of the recordings, as Whisper names it (en, de, fi, ...)")
    asr: str = flag("openai/whisper-large-v3", "Whisper checkpoint dir or Hub id (128-mel: large-v3 / -turbo); "
                                               "'none' cuts only and leaves the transcripts empty: fill them in "
                                               "before prep (it skips empty ones)")
    device: str | None = flag(None, "ASR device (default: cuda when available, else cpu)")
    asr_batch: int = flag(8, "segments per ASR batch", type=int)
    min_seconds: float = flag(1.0, "shortest segment kept")
    max_seconds: float = flag(30.0, "longest segment kept (a longer stretch without a pause is reported, not cut)")
    min_pause: float = flag(0.3, "seconds of quiet that make a pause (a cut point)")
    margin: float = flag(0.2, "seconds of the pause kept before and after the speech of a segment")
    threshold_db: float = flag(35.0, "a frame is quiet this many dB below the recording's speech level (its 95th "
                                     "percentile 10 ms level)")
    hysteresis_db: float = flag(6.0, "speech starts only this many dB above the quiet threshold")
    target_db: float = flag(-20.0, "loudness target, dBFS RMS of a segment")
    peak_db: float = flag(-1.0, "the normalising gain never lifts a peak above this (dBFS)")
    silence_db: float = flag(-50.0, "segments quieter than this (dBFS RMS) are reported as near_silent")
    clip_fraction: float = flag(0.001, "segments with more than this share of full-scale samples are reported as "
                                       "clipped")
    no_speech_threshold: float = flag(0.6, "Whisper's no-speech filter (with --logprob_threshold)")
    logprob_threshold: float = flag(-1.0, "segments whose ASR avg log-probability is lower are reported")
    compression_ratio_threshold: float = flag(2.4, "transcripts more compressible than this are repetition loops")
    scene_prompt: str | None = flag(DEFAULT_SCENE, "scene description in the system prompt ('' for none)")
    overwrite: bool = flag(False, "delete the output of other settings in --out", action="store_true")
    progress: bool = flag(True, "no progress bar", option="--no_progress", action="store_false")

    def segment_rules(self) -> SegmentRules:
        return SegmentRules(self.min_seconds, self.max_seconds, self.min_pause, self.margin, self.threshold_db,
                            self.hysteresis_db)

    def loudness_rules(self) -> loudness.LoudnessRules:
        return loudness.LoudnessRules(self.target_db, self.peak_db, self.silence_db, self.clip_fraction)

    def asr_rules(self) -> transcribe.AsrRules:
        return transcribe.AsrRules(self.no_speech_threshold, self.logprob_threshold, self.compression_ratio_threshold)


@dataclass(frozen=True)
class Source:
    path: Path
    rel: str  # posix path under --input
    speaker: str
    sidecar: str | None  # its transcript, when a .txt / .lab is next to it


@dataclass
class Kept:
    """A segment that passed the audio checks, waiting for its transcript."""

    index: int
    piece: Piece
    wave: np.ndarray  # 24 kHz, normalised
    gain_db: float


# ------------------------------------------------------------------------------------------------ the inputs
def read_speaker_map(path: str) -> dict[str, str]:
    out = {}
    p = Path(path)
    if not p.is_file():
        raise IngestError(f"{p}: --speaker_map not found")
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        cols = [c.strip() for c in line.split("\t" if "\t" in line else "|")]
        if len(cols) != 2 or not all(cols):
            raise IngestError(f"{p}:{i}: expected 'path|speaker' (or path<TAB>speaker), got {line!r}")
        out[cols[0].strip("/")] = cols[1]
    return out


def speaker_of(rel: str, root: Path, cfg: IngestConfig, mapping: dict[str, str]) -> str:
    if cfg.speaker:
        return cfg.speaker
    parts = rel.split("/")
    for k in range(len(parts), 0, -1):  # the file itself, then the folders above it
        if "/".join(parts[:k]) in mapping:
            return mapping["/".join(parts[:k])]
    return parts[0] if len(parts) > 1 else root.resolve().name


def find_sources(cfg: IngestConfig) -> list[Source]:
    root = Path(cfg.input)
    if not root.is_dir():
        raise IngestError(f"{root}: --input is not a folder")
    mapping = read_speaker_map(cfg.speaker_map) if cfg.speaker_map else {}
    out = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.suffix.lower() not in AUDIO_EXTENSIONS:
            continue
        rel = p.relative_to(root).as_posix()
        side = next((p.with_suffix(s) for s in SIDECARS if p.with_suffix(s).is_file()), None)
        text = " ".join(side.read_text(encoding="utf-8").split()) if side else None
        out.append(Source(p, rel, speaker_of(rel, root, cfg, mapping), text))
    if not out:
        raise IngestError(f"{root}: no recordings ({', '.join(AUDIO_EXTENSIONS)}) in the folder")
    return out


def claim_out(cfg: IngestConfig) -> Path:
    """OUT/ingest_state.json records the settings; parts of other settings are refused (or deleted: --overwrite)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in asdict(cfg).items() if k not in ("overwrite", "progress", "device", "asr_batch")}
    state["input"] = str(Path(cfg.input).resolve())
    path = out / "ingest_state.json"
    if path.exists() and json.loads(path.read_text(encoding="utf-8")) != state:
        old = json.loads(path.read_text(encoding="utf-8"))
        if not cfg.overwrite:
            diff = sorted(k for k in set(old) | set(state) if old.get(k) != state.get(k))
            raise IngestError(f"{out} holds segments made with other settings ({', '.join(diff)} differ); use a new "
                              "--out, or --overwrite to delete them")
        for d in ("parts", "wavs"):
            shutil.rmtree(out / d, ignore_errors=True)
    atomic_write_json(path, state, indent=1)
    return out


# ------------------------------------------------------------------------------------------------ one recording
def part_path(out: Path, src: Source) -> Path:
    return out / "parts" / f"{src.rel}.json"


def whole_piece(levels, rules: SegmentRules) -> Piece:
    """A recording with a sidecar transcript: one segment, its leading/trailing silence trimmed to the margin."""
    runs = speech_runs(levels, rules)
    if not runs:
        return Piece(0.0, levels.seconds, "near_silent", "no speech found in the recording")
    a, b = levels.time(runs[0][0]), levels.time(runs[-1][1])
    piece = Piece(max(0.0, a - rules.margin), min(levels.seconds, b + rules.margin))
    if piece.seconds > rules.max_seconds:
        return Piece(piece.start, piece.end, "too_long", f"{piece.seconds:.1f} s with a sidecar transcript, over "
                                                         f"--max_seconds {rules.max_seconds} (a transcript cannot be "
                                                         "split)")
    if piece.seconds < rules.min_seconds:
        return Piece(piece.start, piece.end, "too_short", f"{piece.seconds:.2f} s, under --min_seconds "
                                                          f"{rules.min_seconds}")
    return piece


def read_piece(f, piece: Piece) -> np.ndarray:
    """The piece's samples of an open SoundFile, mono float32 (at most --max_seconds: bounded)."""
    sr = f.samplerate
    a, b = round(piece.start * sr), round(piece.end * sr)
    f.seek(a)
    return to_mono(f.read(b - a, dtype="float32", always_2d=True).T)


class Recording:
    """One recording through segmentation, the audio checks, the ASR and the writes; `rows` are its results."""

    def __init__(self, src: Source, cfg: IngestConfig, out: Path, asr, progress):
        self.src, self.cfg, self.out, self.asr, self.progress = src, cfg, out, asr, progress
        self.lines: list[dict] = []
        self.report: list[dict] = []

    def skip(self, piece: Piece | None, kind: str, reason: str) -> None:
        row = {"source": self.src.rel, "start": None, "end": None, "kind": kind, "reason": reason}
        if piece is not None:
            row.update(start=round(piece.start, 3), end=round(piece.end, 3))
        self.report.append(row)

    def run(self) -> dict:
        import soundfile as sf

        try:
            f = sf.SoundFile(str(self.src.path))
        except Exception as e:  # soundfile raises several types
            self.skip(None, "unreadable", f"cannot decode audio ({type(e).__name__}: {e})")
            return self.part(0.0)
        with f:
            try:
                levels = frame_levels(f)
            except RuntimeError as e:  # libsndfile's error on data it cannot decode, part way into the file
                self.skip(None, "unreadable", f"cannot decode audio ({type(e).__name__}: {e})")
                return self.part(0.0)
            rules = self.cfg.segment_rules()
            pieces = [whole_piece(levels, rules)] if self.src.sidecar is not None else plan_segments(levels, rules)
            pending: list[Kept] = []
            for i, piece in enumerate(pieces):
                kept = self.check(f, i, piece)
                if kept is not None:
                    pending.append(kept)
                if len(pending) >= self.cfg.asr_batch or i + 1 == len(pieces):
                    self.transcribe_and_write(pending)
                    self.progress.advance(piece.end, sum(k.piece.seconds for k in pending))
                    pending = []
        return self.part(levels.seconds)

    def check(self, f, index: int, piece: Piece) -> Kept | None:
        if piece.problem:
            self.skip(piece, piece.problem, piece.reason)
            return None
        wave = read_piece(f, piece)
        bad = loudness.problem(wave, self.cfg.loudness_rules())
        if bad:
            self.skip(piece, *bad)
            return None
        w24, gain = loudness.normalise(resample(wave, f.samplerate, CODEC_SAMPLE_RATE), self.cfg.loudness_rules())
        return Kept(index, piece, w24, gain)

    def transcribe_and_write(self, pending: list[Kept]) -> None:
        if not pending:
            return
        heard: list[transcribe.Heard | None] = [None] * len(pending)
        if self.src.sidecar is None and self.asr is not None:
            heard = self.asr([resample(k.wave, CODEC_SAMPLE_RATE, ASR_RATE) for k in pending])
        for k, h in zip(pending, heard):
            bad = transcribe.problem(h, self.cfg.asr_rules()) if h is not None else None
            if bad:
                self.skip(k.piece, *bad)
                continue
            self.write(k, h)

    def write(self, k: Kept, h) -> None:
        import soundfile as sf

        stem = self.src.rel.rsplit(".", 1)[0]
        rel_wav = f"wavs/{stem}/{k.index:04d}.wav"
        (self.out / rel_wav).parent.mkdir(parents=True, exist_ok=True)
        sf.write(self.out / rel_wav, k.wave, CODEC_SAMPLE_RATE, subtype="PCM_16")
        text = self.src.sidecar if self.src.sidecar is not None else (h.text if h is not None else "")
        misc = {"source": self.src.rel, "start": round(k.piece.start, 3), "end": round(k.piece.end, 3),
                "transcript": "sidecar" if self.src.sidecar is not None else ("asr" if h is not None else "none"),
                "gain_db": round(k.gain_db, 2)}
        if h is not None:
            misc.update(avg_logprob=round(h.avg_logprob, 4), no_speech_prob=None if h.no_speech_prob is None
                        else round(h.no_speech_prob, 4))
        line = tts_sample(text, rel_wav, scene=self.cfg.scene_prompt or None, speaker=self.src.speaker,
                          sample_id=f"{stem}/{k.index:04d}")
        self.lines.append({**line, "misc": misc})

    def part(self, seconds: float) -> dict:
        part = {"source": self.src.rel, "seconds": seconds, "lines": self.lines, "report": self.report,
                "kept_seconds": sum(m["misc"]["end"] - m["misc"]["start"] for m in self.lines)}
        path = part_path(self.out, self.src)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, part)
        return part


# ------------------------------------------------------------------------------------------------ the run
BAR = "{l_bar}{bar}| {n:.2f}/{total:.2f} h [{elapsed}<{remaining}{postfix}]"


class Progress:
    """A bar over the hours of all recordings, with the hours kept."""

    def __init__(self, total_seconds: float, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=round(total_seconds / 3600, 4), unit="h", disable=not enabled, dynamic_ncols=True,
                        desc="ingest", bar_format=BAR)
        self.kept = 0.0
        self.at = 0.0  # seconds into the current one

    def advance(self, seconds_into: float, kept_seconds: float) -> None:
        self.kept += kept_seconds
        step = max(0.0, seconds_into - self.at)
        self.at += step
        self.bar.update(step / 3600)
        self.bar.set_postfix_str(f"kept {self.kept / 3600:.2f} h", refresh=False)

    def finish(self, seconds: float, kept_seconds: float = 0.0) -> None:
        """A recording done (or skipped as finished): the bar goes to its end."""
        self.advance(seconds, kept_seconds)
        self.at = 0.0

    def close(self) -> None:
        self.bar.close()


def header_seconds(path: Path) -> float:
    import soundfile as sf

    try:
        info = sf.info(str(path))
        return info.frames / info.samplerate
    except Exception:  # an unreadable file is reported when its turn comes
        return 0.0


def load_asr(cfg: IngestConfig):
    if cfg.asr.lower() == "none":
        return None
    import torch

    from ..eval.asr import Transcriber

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    return transcribe.ScoredAsr(Transcriber(cfg.asr, device=device, dtype=dtype, language=cfg.language))


def ingest(cfg: IngestConfig, asr=None, log=print) -> dict:
    """Run ingest as `cfg` says (`asr`: a ScoredAsr-like callable, loaded from --asr when None and needed)."""
    if not 0 < cfg.min_seconds <= cfg.max_seconds:
        raise IngestError(f"--min_seconds {cfg.min_seconds} and --max_seconds {cfg.max_seconds}: need "
                          "0 < min <= max")
    if cfg.min_pause < FRAME_SECONDS or cfg.margin < 0:
        raise IngestError(f"--min_pause must be at least {FRAME_SECONDS} s and --margin >= 0")
    sources = find_sources(cfg)
    out = claim_out(cfg)
    todo = [s for s in sources if not part_path(out, s).is_file()]
    if len(todo) < len(sources):
        log(f"ingest: resuming: {len(sources) - len(todo)} of {len(sources)} recording(s) already done")
    if asr is None and any(s.sidecar is None for s in todo):
        asr = load_asr(cfg)
    progress = Progress(sum(header_seconds(s.path) for s in todo), cfg.progress)
    try:
        for s in todo:
            part = Recording(s, cfg, out, asr, progress).run()
            progress.finish(part["seconds"])
    finally:
        progress.close()
    return assemble(out, sources, log)


def assemble(out: Path, sources: list[Source], log) -> dict:
    """manifest.jsonl and ingest_report.jsonl from the recordings' parts, in file order; the summary."""
    lines, report, seconds, kept = [], [], 0.0, 0.0
    for s in sources:
        part = json.loads(part_path(out, s).read_text(encoding="utf-8"))
        lines += part["lines"]
        report += part["report"]
        seconds += part["seconds"]
        kept += part["kept_seconds"]
    dump = lambda rows: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)  # noqa: E731
    atomic_write_text(out / "manifest.jsonl", dump(lines))
    atomic_write_text(out / "ingest_report.jsonl", dump(report))
    kinds: dict[str, int] = {}
    for r in report:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    log(f"ingest: {len(sources)} recording(s), {seconds / 3600:.2f} h; kept {len(lines)} segment(s), "
        f"{kept / 3600:.2f} h, in {out / 'manifest.jsonl'}; not kept: {len(report)}"
        + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(kinds.items()))}, see {out / 'ingest_report.jsonl'})"
           if report else ""))
    return {"recordings": len(sources), "hours": seconds / 3600, "segments": len(lines), "kept_hours": kept / 3600,
            "not_kept": kinds, "manifest": str(out / "manifest.jsonl"), "report": str(out / "ingest_report.jsonl")}
