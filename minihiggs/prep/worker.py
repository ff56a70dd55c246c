"""The prep worker: turns one shard's worth of manifest entries into a shard.

Per window of entries: parse and tokenize (ChatML rules), check and decode the audio (or load precomputed codes),
encode the new clips with the audio tokenizer in batches, compute Whisper features where the checkpoint needs
them, and write each usable sample to the shard. A sample with any problem is skipped whole and recorded with its
manifest line; it never shifts another sample's audio.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from ..audio import mel
from ..audio.io import audio_header, read_audio, resample, to_mono
from ..constants import CODE_FRAMES_PER_SECOND, CODEC_SAMPLE_RATE as CODEC_SR, IGNORE_INDEX
from ..data.shards import ShardWriter, estimated_length
from ..errors import AudioError, ManifestError, PrepError, UserError
from ..text.chatml import AudioItem, Encoded, encode_chatml, expand_audio_in, parse_chatml
from .manifest import BadEntry, ChatmlEntry, Entry, JsonlLine, TableRow
from .settings import WorkerSettings
from .table import TableReader

SILENCE_PEAK = 1e-4  # -80 dBFS: a clip whose peak stays below this is treated as silent
WINDOW = 32  # manifest entries processed together (codec batching, bounded memory)
FRAMES_PER_CHUNK = mel.CHUNK_SECONDS * CODE_FRAMES_PER_SECOND  # 750 code frames per 30 s Whisper chunk
# The merged-length limit without --max_tokens (about 160 s of audio in one sample). Memory of prep grows with
# the longest clip decoded and encoded (the codec holds ~3 KB per input sample: a 10-minute clip is ~17 GB), and
# every clip is checked against the limit from its file header before it is decoded, so some limit must hold.
DEFAULT_MAX_TOKENS = 4096


def token_limit(max_tokens: int | None) -> tuple[int, str]:
    """(the merged-length limit, how a message names it)."""
    if max_tokens:
        return int(max_tokens), f"--max_tokens {max_tokens}"
    return DEFAULT_MAX_TOKENS, (f"the default limit of {DEFAULT_MAX_TOKENS} merged tokens (set --max_tokens to change "
                                "it)")


def reference_usable(path: str, max_seconds: float) -> bool:
    """Whether the clip at `path` can serve as a voice-clone reference: it exists, its header is readable, it
    is at least one code frame and at most `max_seconds` long (checked before decoding), and it decodes to
    finite, non-silent audio: the checks `Worker.load_wave` makes on every clip."""
    try:
        if not os.path.exists(path):
            return False
        frames, sr = audio_header(path)
        if not 1.0 / CODE_FRAMES_PER_SECOND <= frames / sr <= max_seconds:
            return False
        wave, _ = read_audio(path)
    except (AudioError, MemoryError):
        return False
    return wave.size > 0 and bool(np.isfinite(wave).all()) and float(np.abs(wave).max()) >= SILENCE_PEAK


@dataclass
class ShardJob:
    """One shard to make: the manifest entries `first` to `last` (indices among all entries, end excluded)."""

    name: str
    first: int
    last: int
    entries: list[Entry]


@dataclass
class ShardResult:
    name: str
    samples: int
    errors: int
    seconds: float  # of audio in the shard's samples


@dataclass
class Parsed:
    """An entry tokenized by the ChatML rules, before its audio."""

    line: int
    sid: str
    enc: Encoded


@dataclass
class StagedClip:
    item: AudioItem
    key: tuple  # codes cache key: the precomputed codes file, or the audio source with offset/duration
    wave16: np.ndarray | None  # 16 kHz audio for the Whisper features (audio-in clips of a tower checkpoint)


@dataclass
class Staged:
    """A parsed entry whose clips are decoded (or their codes loaded), waiting for the codec's batch."""

    parsed: Parsed
    clips: list[StagedClip]


class ErrorLog:
    """The skipped entries of one shard, as prep_errors.jsonl rows; `where(line)` says where an entry is (its
    manifest and line, or its parquet file and row)."""

    def __init__(self, where):
        self.where = where
        self.rows: list[tuple[int, dict]] = []

    def add(self, line: int, kind: str, reason: str, sid: str | None = None) -> None:
        self.rows.append((int(line), {**self.where(line), "id": sid, "kind": kind, "reason": reason}))

    def in_order(self) -> list[dict]:
        return [r for _, r in sorted(self.rows, key=lambda x: x[0])]


class Worker:
    """Makes shards: one per `run(job)`, in the prep process or in a pool process (`pool.py`)."""

    def __init__(self, settings: WorkerSettings, q=None, tok=None):
        from ..text.tokenizer import TextTokenizer

        self.s = settings
        self.q = q  # progress: (entries done, seconds of audio written) per window
        self.tok = tok if tok is not None else TextTokenizer.from_dir(settings.tokenizer_dir)
        self.codec = None
        self.C = settings.model.num_codebooks
        self.table = None  # TableReader, made on the first table row

    # -------------------------------------------------------------- helpers
    def get_codec(self):
        if self.codec is None:
            from ..codec import AudioTokenizer

            if not self.s.device.startswith("cuda"):
                from ..codec.malloc import keep_large_allocations_in_heap

                keep_large_allocations_in_heap()
            try:
                self.codec = AudioTokenizer.from_pretrained(self.s.codec, device=self.s.device)
            except Exception as e:
                why = e if isinstance(e, UserError) else f"{type(e).__name__}: {e}"  # no internal class names
                raise PrepError(f"cannot load the audio tokenizer {self.s.codec!r} ({why})") from e
            if getattr(self.codec, "sample_rate", CODEC_SR) != CODEC_SR:
                raise PrepError(f"codec sample rate {self.codec.sample_rate}, expected {CODEC_SR}")
        return self.codec

    def report(self, clips: int, seconds: float) -> None:
        if self.q is not None:
            self.q.put((clips, seconds))

    def load_codes(self, path: str) -> np.ndarray:
        try:
            a = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise ManifestError(f"{path}: audio_codes file not found", "missing_audio") from None
        except Exception as e:
            raise ManifestError(f"{path}: cannot read audio_codes ({type(e).__name__}: {e})", "bad_codes") from None
        if a.ndim != 2 or a.shape[0] != self.C or a.shape[1] == 0:
            raise ManifestError(f"{path}: audio_codes shape {a.shape}, expected [{self.C}, frames>0]", "bad_codes")
        if not np.issubdtype(a.dtype, np.integer):
            raise ManifestError(f"{path}: audio_codes dtype {a.dtype}, expected integers", "bad_codes")
        if a.min() < 0 or a.max() >= self.s.model.codebook_size:
            raise ManifestError(f"{path}: audio_codes outside [0, {self.s.model.codebook_size})", "bad_codes")
        return a.astype(np.int64)

    def header_seconds(self, item) -> float:
        """Seconds of audio the item will decode to (offset/duration applied), from the file header alone."""
        if item.raw_audio is not None:
            try:
                src = io.BytesIO(base64.b64decode(item.raw_audio, validate=True))
            except Exception as e:
                raise ManifestError(f"raw_audio: cannot decode ({type(e).__name__}: {e})", "corrupt_audio") from None
        else:
            src = item.audio_url
            if not os.path.exists(src):
                raise ManifestError(f"{src}: audio file not found", "missing_audio")
        try:
            frames, sr = audio_header(src, "raw_audio" if item.raw_audio is not None else None)
        except AudioError as e:
            raise ManifestError(str(e), "corrupt_audio") from None
        seconds = frames / sr - (item.offset or 0.0)
        if item.duration is not None:
            seconds = min(seconds, item.duration)
        return max(0.0, seconds)

    def load_wave(self, item) -> tuple[np.ndarray, int]:
        """Decoded mono float32 (offset/duration applied) and its rate; raises ManifestError with the kind."""
        name = "raw_audio" if item.raw_audio is not None else item.audio_url
        try:
            if item.raw_audio is not None:
                import soundfile as sf

                try:
                    data, sr = sf.read(io.BytesIO(base64.b64decode(item.raw_audio, validate=True)), dtype="float32",
                                       always_2d=True)
                except MemoryError:
                    raise
                except Exception as e:
                    raise ManifestError(f"raw_audio: cannot decode ({type(e).__name__}: {e})",
                                        "corrupt_audio") from None
                wave, sr = to_mono(data.T), int(sr)
            else:
                if not os.path.exists(name):
                    raise ManifestError(f"{name}: audio file not found", "missing_audio")
                try:
                    wave, sr = read_audio(name)
                except AudioError as e:
                    raise ManifestError(str(e), "corrupt_audio") from None
        except MemoryError:
            raise ManifestError(f"{name}: not enough memory to decode it (lower --max_tokens, or --workers)",
                                "out_of_memory") from None
        if item.offset or item.duration is not None:
            a = int(round((item.offset or 0.0) * sr))
            b = len(wave) if item.duration is None else a + int(round(item.duration * sr))
            wave = wave[a:b]
        if wave.size == 0:
            raise ManifestError(f"{name}: audio is empty", "empty_audio")
        if not np.isfinite(wave).all():
            raise ManifestError(f"{name}: audio contains NaN or infinite samples", "corrupt_audio")
        if float(np.abs(wave).max()) < SILENCE_PEAK:
            raise ManifestError(f"{name}: audio is silent (peak below {SILENCE_PEAK:g})", "silent_audio")
        return wave, sr

    def encode_waves(self, waves: dict) -> dict:
        """{key: wave24} -> {key: codes or the Exception the codec raised}."""
        out: dict = {}
        if not waves:
            return out
        codec = self.get_codec()
        keys = sorted(waves, key=lambda k: len(waves[k]))  # the codec batches clips of equal length

        def run(group):
            try:
                for k, c in zip(group, codec.encode_batch([waves[k] for k in group])):
                    out[k] = c
            except Exception as e:  # retry one by one so one bad clip does not sink the others
                if len(group) == 1:
                    out[group[0]] = e
                else:
                    for k in group:
                        run([k])

        step = self.s.codec_batch_clips
        for i in range(0, len(keys), step):
            run(keys[i:i + step])
        return out

    def check_vocab(self, ids: list[int]) -> None:
        """Every id must be one the model can embed: text may contain a special token of the tokenizer that lies
        beyond the checkpoint's vocabulary (e.g. Llama-3's <|image|> = 128256), which would crash training."""
        vocab = self.s.model.vocab_size
        if not ids or max(ids) < vocab:
            return
        bad = min(i for i in ids if i >= vocab)
        raise ManifestError(f"text contains token {self.tok.decode([bad])!r} (id {bad}), outside the model's "
                            f"vocabulary (vocab_size {vocab}): remove it from the text", "bad_token")

    def check_length_before_decoding(self, enc) -> None:
        """Refuse a sample over the token limit from its files' headers, before any audio is decoded (a lower
        bound: precomputed codes and Whisper rows are counted after). Keeps memory bounded by the limit."""
        frames, longest = [], (0.0, "")
        for it in enc.audio:
            if it.audio_codes:
                continue
            seconds = self.header_seconds(it)
            frames.append(int(seconds * CODE_FRAMES_PER_SECOND))
            longest = max(longest, (seconds, it.audio_url or "raw_audio"))
        if not frames:
            return
        limit, limit_name = token_limit(self.s.max_tokens)
        n = estimated_length(len(enc.input_ids), frames, None, self.s.model.columns_per_segment)
        if n > limit:
            raise ManifestError(f"{longest[1]}: {longest[0]:.1f} s of audio (file header) make at least {n} merged "
                                f"tokens, over {limit_name}; not decoded", "too_long")

    def split_codes(self, codes: np.ndarray, n_chunks: int) -> list[np.ndarray]:
        T = codes.shape[1]
        if n_chunks == 1:
            return [codes]
        if T < n_chunks:
            raise ManifestError(f"{T} code frames cannot cover {n_chunks} Whisper chunks", "bad_codes")
        bounds = [0] + [min(FRAMES_PER_CHUNK * i, T - (n_chunks - i)) for i in range(1, n_chunks)] + [T]
        return [codes[:, a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    # -------------------------------------------------------------- one shard
    def run(self, job: ShardJob) -> ShardResult:
        writer = ShardWriter(self.s.out, job.name, self.C, (job.first, job.last))
        by_line = {e.line: e for e in job.entries}
        errors = ErrorLog(lambda line: self.s.place(by_line[line]))
        codes_cache: dict = {}  # key -> codes (or the codec's exception), shared by the shard's windows
        try:
            with open(self.s.manifest, "rb") if self.s.table is None else contextlib.nullcontext() as manifest:
                for w0 in range(0, len(job.entries), WINDOW):
                    window = job.entries[w0:w0 + WINDOW]
                    parsed = self.parse_window(window, manifest, errors)
                    staged = self.stage_window(parsed, codes_cache, errors)
                    seconds = self.write_window(staged, codes_cache, writer, errors)
                    self.report(len(window), seconds)
            meta = writer.close(errors.in_order())
        except BaseException:
            writer.abort()
            raise
        return ShardResult(job.name, len(meta["samples"]), len(errors.rows),
                           sum(r["duration"] for r in meta["samples"]))

    def parse_window(self, window: list[Entry], manifest: BinaryIO, errors: ErrorLog) -> list[Parsed]:
        """Each entry through the ChatML rules and the tokenizer; the unusable ones into `errors`."""
        parsed = []
        for e in window:
            if isinstance(e, BadEntry):
                errors.add(e.line, e.kind, e.reason)
                continue
            sid = None
            try:
                cm = parse_chatml(self.entry_object(e, manifest), self.s.base_dir)
                sid = cm.id or f"{self.s.manifest.name}:{e.line}"
                enc = encode_chatml(cm, self.tok)
                self.check_vocab(enc.input_ids)
                if all(x == IGNORE_INDEX for x in enc.label_ids):
                    raise ManifestError("no trainable target (no assistant turn at or after start_index)", "no_target")
                parsed.append(Parsed(e.line, sid, enc))
            except ManifestError as me:
                errors.add(e.line, me.kind, str(me), sid)
        return parsed

    def entry_object(self, e: JsonlLine | TableRow | ChatmlEntry, manifest: BinaryIO | None) -> object:
        """The entry's JSON value; a .jsonl line is read from the manifest here, a table row from its row group."""
        if isinstance(e, ChatmlEntry):
            return e.obj
        if isinstance(e, TableRow):
            if self.table is None:
                self.table = TableReader(self.s.table)
            return self.table.sample(e)
        manifest.seek(e.offset)
        try:
            txt = manifest.read(e.length).decode("utf-8")
        except UnicodeDecodeError as ue:
            raise ManifestError(f"line is not valid UTF-8 ({ue.reason} at byte {ue.start})",
                                "bad_text_encoding") from None
        txt = txt.removeprefix("\ufeff")  # a UTF-8 byte-order mark on the first line
        txt = txt.rstrip("\r\n")  # (an error at the end of the line: its column, not "line 2")
        try:
            return json.loads(txt)
        except json.JSONDecodeError as je:
            raise ManifestError(f"broken JSON ({je.msg} at column {je.colno})", "bad_json") from None

    def stage_window(self, parsed: list[Parsed], codes_cache: dict, errors: ErrorLog) -> list[Staged]:
        """Check each sample's length from the file headers, decode its audio, load precomputed codes, then encode
        the window's new clips in codec batches (into `codes_cache`)."""
        pending: dict = {}  # key -> 24 kHz wave to encode
        staged = []
        for p in parsed:
            try:
                self.check_length_before_decoding(p.enc)
                staged.append(Staged(p, [self.stage_clip(it, codes_cache, pending) for it in p.enc.audio]))
            except ManifestError as me:
                errors.add(p.line, me.kind, str(me), p.sid)
        for k, c in self.encode_waves(pending).items():
            if not isinstance(c, Exception):
                c = np.asarray(c.cpu() if hasattr(c, "cpu") else c, dtype=np.int64)[:self.C]
            codes_cache[k] = c
        return staged

    def stage_clip(self, it: AudioItem, codes_cache: dict, pending: dict) -> StagedClip:
        need_feats = self.s.model.whisper and it.is_input
        key = ("codes", it.audio_codes) if it.audio_codes else ("wave",) + it.cache_key()
        if it.audio_codes and key not in codes_cache:
            codes_cache[key] = self.load_codes(it.audio_codes)
        need_codes = key not in codes_cache and key not in pending
        wave16 = None
        if need_feats or need_codes:
            if it.audio_url is None and it.raw_audio is None:
                raise ManifestError("Whisper features need the audio itself, but the item only has audio_codes",
                                    "missing_audio")
            wave, sr = self.load_wave(it)
            if need_feats:
                wave16 = resample(wave, sr, mel.SAMPLE_RATE)
            if need_codes:
                w24 = resample(wave, sr, CODEC_SR)
                codec = self.get_codec()
                if hasattr(codec, "frames") and codec.frames(len(w24)) < 1:
                    raise ManifestError(f"{it.audio_url or 'raw_audio'}: audio too short for one code frame",
                                        "empty_audio")
                pending[key] = w24
        return StagedClip(it, key, wave16)

    def write_window(self, staged: list[Staged], codes_cache: dict, writer: ShardWriter, errors: ErrorLog) -> float:
        """Assemble and write each staged sample; returns the seconds of audio written."""
        seconds = 0.0
        for st in staged:
            try:
                sample, frames, lens = self.assemble(st, codes_cache)
                length = estimated_length(len(sample.input_ids), frames, lens, self.s.model.columns_per_segment)
                limit, limit_name = token_limit(self.s.max_tokens)
                if length > limit:
                    raise ManifestError(f"{length} merged tokens exceed {limit_name}", "too_long")
                duration = sum(frames) / CODE_FRAMES_PER_SECOND
                place = errors.where(st.parsed.line)
                writer.add(sample, source=place["manifest"], line=place.get("line", place.get("row")),
                           speaker=st.parsed.enc.speaker, duration=duration, length=length)
                seconds += duration
            except ManifestError as me:
                errors.add(st.parsed.line, me.kind, str(me), st.parsed.sid)
            except ValueError as ve:  # Sample.validate
                errors.add(st.parsed.line, "invalid", str(ve), st.parsed.sid)
        return seconds

    def assemble(self, st: Staged, codes_cache: dict):
        """(the Sample, the frames of each code segment, the Whisper feature lengths or None)."""
        import torch

        from ..data.sample import Sample

        segs, chunks, feats, lens = [], [], [], []
        for clip in st.clips:
            codes = self.staged_codes(clip, codes_cache)
            if clip.wave16 is not None:
                f, v = mel.whisper_features(clip.wave16)
                chunks.append(len(f))
                feats += f
                lens += v
                segs += self.split_codes(codes, len(f))
            else:
                segs.append(codes)
        whisper = self.s.model.whisper
        ids, labels = st.parsed.enc.input_ids, st.parsed.enc.label_ids
        if whisper:
            ids, labels = expand_audio_in(ids, labels, self.s.model.audio_in_token_id, chunks)
        sample = Sample(input_ids=torch.tensor(ids, dtype=torch.long), label_ids=torch.tensor(labels, dtype=torch.long),
                        audio_codes=[torch.from_numpy(np.ascontiguousarray(c)) for c in segs],
                        whisper_features=feats if whisper else None, whisper_lengths=lens if whisper else None,
                        sample_id=st.parsed.sid)
        sample.validate(self.s.model.audio_in_token_id, self.s.model.audio_out_token_id, self.C)
        return sample, [int(c.shape[1]) for c in segs], lens if whisper else None

    @staticmethod
    def staged_codes(clip: StagedClip, codes_cache: dict) -> np.ndarray:
        """The clip's codes, or the ManifestError that the codec's failure on it means."""
        codes = codes_cache.get(clip.key)
        name = clip.item.audio_url or "raw_audio"
        if isinstance(codes, MemoryError):
            raise ManifestError(f"{name}: not enough memory to encode it (lower --max_tokens, or --workers)",
                                "out_of_memory")
        if isinstance(codes, Exception):
            raise ManifestError(f"codec failed on {name} ({type(codes).__name__}: {codes})", "corrupt_audio")
        if codes.shape[1] == 0:
            raise ManifestError(f"{name}: too short for one code frame", "empty_audio")
        return codes
