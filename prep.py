#!/usr/bin/env python
"""prep.py — tokenize a manifest once, offline, into memory-mapped shards (`minihiggs.shards` format).

    python prep.py --manifest data/train.jsonl --out data/prepared
    python prep.py --manifest LJSpeech-1.1/metadata.csv --out data/lj --voice_clone --workers 4

Manifests:
* ChatML `.jsonl` (one object per line) or `.json` (an array): `{"messages": [...], "speaker", "start_index",
  "misc", "id"}`; content is a string or a list of `{"type": "text", "text"}` / `{"type": "audio", "audio_url"}`
  items (also `raw_audio`, `offset`, `duration`, and `audio_codes`: a .npy of int codes [codebooks, frames],
  which avoids loading the codec). Relative paths resolve against the manifest's folder.
* A plain list `.csv` / `.tsv` / `.txt`: `id|text` (LJSpeech, also `id|text|normalized_text`) or
  `path|text|speaker`, turned into the upstream TTS prompt (`--voice_clone`: paired with another utterance of
  the same speaker as the reference).

Every sample that cannot be used (missing / corrupt / empty / silent audio, broken JSON line, unknown fields,
non-UTF-8 text, no trainable target, over --max_tokens, bad precomputed codes) is skipped whole and recorded in
OUT/prep_errors.jsonl with the manifest path and line; the run fails only with --strict or when nothing usable
remains. Shards are fixed ranges of `--shard_size` manifest entries, so a re-run with the same settings skips
finished shards and redoes half-written ones.

Whisper features (128-bin log-mel per 30 s chunk) are stored only when the checkpoint's config needs them
(`encode_whisper_embed` and not `skip_audio_tower`), only for user/system (audio-in) items. A longer clip becomes
one `<|audio_bos|><|AUDIO|><|audio_eos|>` triple per 30 s chunk (as the reference collator does), each with its
own feature chunk and its own code segment: the codes are split at 750-frame (30 s) boundaries, each boundary
pulled back just enough that every segment keeps at least one frame.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import multiprocessing as mp
import os
import queue as queue_mod
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import wait as futures_wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from minihiggs.audio_io import AudioError, read_audio, resample, to_mono  # noqa: E402
from minihiggs.chatml import (DEFAULT_SCENE, ManifestError, encode_chatml, expand_audio_in,  # noqa: E402
                              parse_chatml, parse_plain_line, tts_sample, voice_clone_references)
from minihiggs import mel  # noqa: E402
from minihiggs.shards import (FORMAT, VERSION, ShardWriter, atomic_write_json, estimated_length,  # noqa: E402
                              read_shard_meta, shard_complete, shard_name, write_index)

DEFAULT_BASE = "bosonai/higgs-audio-v2-generation-3B-base"
DEFAULT_CODEC = "bosonai/higgs-audio-v2-tokenizer"
CODEC_SR = 24000
SILENCE_PEAK = 1e-4  # -80 dBFS: a clip whose peak stays below this is treated as silent
WINDOW = 32  # manifest entries processed together (codec batching, bounded memory)
FRAMES_PER_CHUNK = mel.CHUNK_SECONDS * 25  # 750 code frames per 30 s Whisper chunk
PLAIN_EXT = (".csv", ".tsv", ".txt", ".list")


class PrepError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------- configuration
def resolve_base(base: str) -> Path:
    """A local checkpoint dir, or a hub repo id (downloads only config.json and the tokenizer files)."""
    p = Path(base).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file() or not (p / "tokenizer.json").is_file():
            raise PrepError(f"{p}: --base_ckpt needs config.json and tokenizer.json")
        return p
    if p.exists() or base.count("/") != 1:
        raise PrepError(f"--base_ckpt {base!r}: not a directory or a hub repo id")
    from huggingface_hub import hf_hub_download

    paths = [hf_hub_download(base, f) for f in ("config.json", "tokenizer.json")]
    try:
        hf_hub_download(base, "tokenizer_config.json")
    except Exception:  # optional file
        pass
    return Path(paths[0]).parent


def model_settings(config: dict) -> dict:
    """The config fields prep needs, read by the same `HiggsConfig.from_dict` the trainer uses (so an absent
    field means the same thing on both sides: the model's defaults, e.g. no Whisper tower and 8 codebooks)."""
    from minihiggs.config import ConfigError, HiggsConfig

    try:
        cfg = HiggsConfig.from_dict(config)
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise PrepError(f"config.json of --base_ckpt: {e}") from None
    return {"num_codebooks": int(cfg.audio_num_codebooks),
            "codebook_size": int(cfg.audio_codebook_size),
            "audio_in_token_id": int(cfg.audio_in_token_id),
            "audio_out_token_id": int(cfg.audio_out_token_id),
            "whisper": bool(cfg.uses_whisper_features)}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 22), b""):
            h.update(b)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- manifest reading
def manifest_kind(path: Path) -> str:
    suf = path.suffix.lower()
    if suf == ".json":
        return "json"
    if suf in PLAIN_EXT:
        return "plain"
    return "jsonl"


def scan_jsonl(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(line numbers, byte offsets, byte lengths) of the non-blank lines, without holding the file."""
    lines, offs, lens = [], [], []
    pos = 0
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            if raw.strip():
                lines.append(i)
                offs.append(pos)
                lens.append(len(raw))
            pos += len(raw)
    return np.asarray(lines, np.int64), np.asarray(offs, np.int64), np.asarray(lens, np.int64)


def read_json_array(path: Path) -> list[tuple]:
    """Entries of a JSON-array manifest: ("obj", line, obj) per element, ("err", ...) where it breaks."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        return [("err", line, "bad_text_encoding", f"manifest is not valid UTF-8 ({e.reason}); "
                 "no entries could be read")]
    dec = json.JSONDecoder()
    n = len(text)

    def skip_ws(i):
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    def line_of(i):
        return text.count("\n", 0, i) + 1

    i = skip_ws(0)
    if i >= n or text[i] != "[":
        return [("err", line_of(i), "bad_json", "a .json manifest must be a JSON array of samples")]
    i = skip_ws(i + 1)
    out: list[tuple] = []
    if i < n and text[i] == "]":
        return out
    while True:
        start = i
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            out.append(("err", line_of(e.pos), "bad_json",
                        f"broken JSON ({e.msg}); the rest of the array could not be read"))
            return out
        out.append(("obj", line_of(start), obj))
        i = skip_ws(i)
        if i < n and text[i] == ",":
            i = skip_ws(i + 1)
            continue
        if i < n and text[i] == "]":
            return out
        out.append(("err", line_of(i), "bad_json", "expected ',' or ']' in the JSON array; "
                    "the rest of the array could not be read"))
        return out


def read_plain_list(path: Path, voice_clone: bool, scene: str | None) -> tuple[list[tuple], int]:
    """Entries of an LJSpeech-style list, as ChatML objects. Returns (entries, rows without a reference)."""
    delim = "\t" if path.suffix.lower() == ".tsv" else None
    rows, entries = [], []
    base = str(path.parent)
    raw_lines = path.read_bytes().splitlines()
    for i, raw in enumerate(raw_lines, 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            entries.append(("err", i, "bad_text_encoding", f"line is not valid UTF-8 ({e.reason} at byte {e.start})"))
            continue
        if line.startswith("\ufeff"):
            line = line[1:]
        d = delim or ("|" if "|" in line else ",")
        try:
            row = parse_plain_line(line, i, base, d)
        except ManifestError as e:
            entries.append(("err", i, e.kind, str(e)))
            continue
        except Exception as e:  # csv quoting errors
            entries.append(("err", i, "invalid", f"cannot parse line ({e})"))
            continue
        if row is not None:
            rows.append(row)
            entries.append(("row", i, row))
    refs = voice_clone_references(rows) if voice_clone else {}
    lonely = 0
    out = []
    for e in entries:
        if e[0] != "row":
            out.append(e)
            continue
        r = e[2]
        ref = refs.get(r.line) if voice_clone else None
        if voice_clone and ref is None:
            lonely += 1
        obj = tts_sample(r.text, r.audio, scene=scene, speaker=r.speaker, sample_id=r.sample_id,
                         reference=(ref.text, ref.audio) if ref is not None else None)
        out.append(("obj", r.line, obj))
    return out, lonely


# ------------------------------------------------------------------------------------------- worker
_W = None


def _init_worker(settings: dict, q) -> None:
    global _W
    import torch

    torch.set_num_threads(max(1, int(settings.get("threads", 1))))
    _W = Worker(settings, q)


def _run_job(job: dict) -> dict:
    # Exceptions travel back as text: a class defined in a spawned __mp_main__ may not unpickle in the parent.
    try:
        return _W.run(job)
    except Exception as e:
        import traceback

        return {"name": job["name"], "failed": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()}


class Worker:
    def __init__(self, settings: dict, q=None, tok=None):
        from minihiggs.text_tokenizer import TextTokenizer

        self.s = settings
        self.q = q
        self.tok = tok if tok is not None else TextTokenizer.from_dir(settings["tokenizer_dir"])
        self.codec = None
        self.C = settings["num_codebooks"]
        self.audio_in_id = settings["audio_in_token_id"]

    # -------------------------------------------------------------- helpers
    def get_codec(self):
        if self.codec is None:
            from minihiggs.codec import AudioTokenizer

            if not str(self.s["device"]).startswith("cuda"):
                from minihiggs.malloc import keep_large_allocations_in_heap

                keep_large_allocations_in_heap()
            try:
                self.codec = AudioTokenizer.from_pretrained(self.s["codec"], device=self.s["device"])
            except Exception as e:
                raise PrepError(f"cannot load the audio tokenizer {self.s['codec']!r} "
                                f"({type(e).__name__}: {e})") from e
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
        if a.min() < 0 or a.max() >= self.s["codebook_size"]:
            raise ManifestError(f"{path}: audio_codes outside [0, {self.s['codebook_size']})", "bad_codes")
        return a.astype(np.int64)

    def load_wave(self, item) -> tuple[np.ndarray, int]:
        """Decoded mono float32 (offset/duration applied) and its rate; raises ManifestError with the kind."""
        if item.raw_audio is not None:
            import soundfile as sf

            try:
                data, sr = sf.read(io.BytesIO(base64.b64decode(item.raw_audio, validate=True)), dtype="float32",
                                   always_2d=True)
            except Exception as e:
                raise ManifestError(f"raw_audio: cannot decode ({type(e).__name__}: {e})", "corrupt_audio") from None
            wave, sr, name = to_mono(data.T), int(sr), "raw_audio"
        else:
            name = item.audio_url
            if not os.path.exists(name):
                raise ManifestError(f"{name}: audio file not found", "missing_audio")
            try:
                wave, sr = read_audio(name)
            except AudioError as e:
                raise ManifestError(str(e), "corrupt_audio") from None
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

        step = self.s["codec_batch_clips"]
        for i in range(0, len(keys), step):
            run(keys[i:i + step])
        return out

    def split_codes(self, codes: np.ndarray, n_chunks: int) -> list[np.ndarray]:
        T = codes.shape[1]
        if n_chunks == 1:
            return [codes]
        if T < n_chunks:
            raise ManifestError(f"{T} code frames cannot cover {n_chunks} Whisper chunks", "bad_codes")
        bounds = [0] + [min(FRAMES_PER_CHUNK * i, T - (n_chunks - i)) for i in range(1, n_chunks)] + [T]
        return [codes[:, a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    # -------------------------------------------------------------- one shard
    def run(self, job: dict) -> dict:
        import torch

        from minihiggs.sample import Sample

        s = self.s
        out = Path(s["out"])
        name = job["name"]
        writer = ShardWriter(out, name, self.C, (job["first"], job["last"]))
        errors: list[dict] = []
        manifest = s["manifest"]
        codes_cache: dict = {}

        def err(line, kind, reason, sid=None):
            errors.append({"manifest": manifest, "line": int(line), "id": sid, "kind": kind, "reason": reason})

        try:
            entries = self._entries(job)
            for w0 in range(0, len(entries), WINDOW):
                window = entries[w0:w0 + WINDOW]
                parsed = []
                for e in window:
                    line = e[1]
                    if e[0] == "err":
                        err(line, e[2], e[3])
                        continue
                    sid = None
                    try:
                        obj = e[2]
                        if e[0] == "raw":
                            try:
                                txt = obj.decode("utf-8")
                            except UnicodeDecodeError as ue:
                                raise ManifestError(f"line is not valid UTF-8 ({ue.reason} at byte {ue.start})",
                                                    "bad_text_encoding") from None
                            if txt.startswith("\ufeff"):  # a UTF-8 byte-order mark on the first line
                                txt = txt[1:]
                            try:
                                obj = json.loads(txt)
                            except json.JSONDecodeError as je:
                                raise ManifestError(f"broken JSON ({je.msg} at column {je.colno})",
                                                    "bad_json") from None
                        cm = parse_chatml(obj, s["base_dir"])
                        sid = cm.id or f"{s['manifest_name']}:{line}"
                        enc = encode_chatml(cm, self.tok)
                        if all(x == -100 for x in enc.label_ids):
                            raise ManifestError("no trainable target (no assistant turn at or after start_index)",
                                                "no_target")
                        parsed.append((line, sid, enc))
                    except ManifestError as me:
                        err(line, me.kind, str(me), sid)

                # audio: decode what needs decoding; precomputed codes are loaded directly
                pending: dict = {}
                staged = []
                for line, sid, enc in parsed:
                    try:
                        items = []
                        for it in enc.audio:
                            need_feats = s["whisper"] and it.is_input
                            codes = wave16 = None
                            key = ("codes", it.audio_codes) if it.audio_codes else ("wave",) + it.cache_key()
                            if it.audio_codes:
                                codes = codes_cache.get(key)
                                if codes is None:
                                    codes = codes_cache[key] = self.load_codes(it.audio_codes)
                            if need_feats or (codes is None and key not in codes_cache and key not in pending):
                                if it.audio_url is None and it.raw_audio is None:
                                    raise ManifestError("Whisper features need the audio itself, but the item "
                                                        "only has audio_codes", "missing_audio")
                                wave, sr = self.load_wave(it)
                                if need_feats:
                                    wave16 = resample(wave, sr, mel.SAMPLE_RATE)
                                if codes is None and key not in codes_cache and key not in pending:
                                    w24 = resample(wave, sr, CODEC_SR)
                                    codec = self.get_codec()
                                    if hasattr(codec, "frames") and codec.frames(len(w24)) < 1:
                                        raise ManifestError(f"{it.audio_url or 'raw_audio'}: audio too short for "
                                                            "one code frame", "empty_audio")
                                    pending[key] = w24
                            items.append((it, key, wave16))
                        staged.append((line, sid, enc, items))
                    except ManifestError as me:
                        err(line, me.kind, str(me), sid)
                for k, c in self.encode_waves(pending).items():
                    if isinstance(c, Exception):
                        codes_cache[k] = c
                    else:
                        c = np.asarray(c.cpu() if hasattr(c, "cpu") else c, dtype=np.int64)
                        codes_cache[k] = c[:self.C]

                seconds = 0.0
                for line, sid, enc, items in staged:
                    try:
                        segs, chunks, feats, lens = [], [], [], []
                        for it, key, wave16 in items:
                            codes = codes_cache.get(key)
                            if isinstance(codes, Exception):
                                raise ManifestError(f"codec failed on {it.audio_url or 'raw_audio'} "
                                                    f"({type(codes).__name__}: {codes})", "corrupt_audio")
                            if codes.shape[1] == 0:
                                raise ManifestError(f"{it.audio_url or 'raw_audio'}: too short for one code frame",
                                                    "empty_audio")
                            if wave16 is not None:
                                f, v = mel.whisper_features(wave16)
                                parts = self.split_codes(codes, len(f))
                                chunks.append(len(f))
                                feats += f
                                lens += v
                                segs += parts
                            else:
                                segs.append(codes)
                        ids, labels = enc.input_ids, enc.label_ids
                        if s["whisper"]:
                            ids, labels = expand_audio_in(ids, labels, self.audio_in_id, chunks)
                        sample = Sample(input_ids=torch.tensor(ids, dtype=torch.long),
                                        label_ids=torch.tensor(labels, dtype=torch.long),
                                        audio_codes=[torch.from_numpy(np.ascontiguousarray(c)) for c in segs],
                                        whisper_features=feats if s["whisper"] else None,
                                        whisper_lengths=lens if s["whisper"] else None, sample_id=sid)
                        sample.validate(self.audio_in_id, s["audio_out_token_id"], self.C)
                        frames = [int(c.shape[1]) for c in segs]
                        length = estimated_length(len(ids), frames, lens if s["whisper"] else None)
                        if s["max_tokens"] and length > s["max_tokens"]:
                            raise ManifestError(f"{length} merged tokens exceed --max_tokens {s['max_tokens']}",
                                                "too_long")
                        duration = sum(frames) / 25.0
                        writer.add(sample, source=manifest, line=line, speaker=enc.speaker, duration=duration,
                                   length=length)
                        seconds += duration
                    except ManifestError as me:
                        err(line, me.kind, str(me), sid)
                    except ValueError as ve:
                        err(line, "invalid", str(ve), sid)
                self.report(len(window), seconds)
            errors.sort(key=lambda x: x["line"])
            meta = writer.close(errors)
        except BaseException:
            writer.abort()
            raise
        return {"name": name, "samples": len(meta["samples"]), "errors": len(errors),
                "seconds": sum(r["duration"] for r in meta["samples"])}

    def _entries(self, job: dict) -> list[tuple]:
        if job["kind"] == "jsonl":
            out = []
            with open(self.s["manifest"], "rb") as f:
                for line, off, ln in zip(job["lines"], job["offsets"], job["lengths"]):
                    f.seek(off)
                    out.append(("raw", line, f.read(ln)))
            return out
        return job["entries"]


# ------------------------------------------------------------------------------------------- driver
def build_jobs(manifest: Path, kind: str, shard_size: int, voice_clone: bool, scene: str | None):
    """Split the manifest into fixed shards of `shard_size` entries. Returns (jobs, n_entries, notes)."""
    notes = []
    jobs = []
    if kind == "jsonl":
        lines, offs, lens = scan_jsonl(manifest)
        n = len(lines)
        for k, a in enumerate(range(0, n, shard_size)):
            b = min(n, a + shard_size)
            jobs.append({"k": k, "name": shard_name(k), "kind": "jsonl", "first": a, "last": b,
                         "lines": lines[a:b].tolist(), "offsets": offs[a:b].tolist(),
                         "lengths": lens[a:b].tolist()})
        return jobs, n, notes
    if kind == "json":
        entries = read_json_array(manifest)
    else:
        entries, lonely = read_plain_list(manifest, voice_clone, scene)
        if lonely:
            notes.append(f"--voice_clone: {lonely} utterance(s) have no other utterance of their speaker; "
                         "prepared without a reference")
    n = len(entries)
    for k, a in enumerate(range(0, n, shard_size)):
        b = min(n, a + shard_size)
        jobs.append({"k": k, "name": shard_name(k), "kind": "objs", "first": a, "last": b,
                     "entries": entries[a:b]})
    return jobs, n, notes


def _clear_shard(out: Path, name: str) -> None:
    for suffix in (".bin", ".bin.tmp", ".json", ".json.tmp", ".errors.jsonl", ".errors.jsonl.tmp"):
        p = out / f"{name}{suffix}"
        if p.exists():
            p.unlink()


def run_prep(manifest, out, base_ckpt: str = DEFAULT_BASE, codec: str = DEFAULT_CODEC, workers: int = 1,
             shard_size: int = 1000, max_tokens: int | None = None, strict: bool = False,
             voice_clone: bool = False, device: str | None = None, scene_prompt: str | None = DEFAULT_SCENE,
             overwrite: bool = False, progress: bool = True,
             log=print) -> dict:
    """Run prep; returns a summary dict. Raises PrepError on a fatal problem (nothing usable, --strict, ...)."""
    import torch

    t0 = time.time()
    manifest = Path(manifest).resolve()
    out = Path(out).resolve()
    if not manifest.is_file():
        raise PrepError(f"{manifest}: manifest not found")
    if shard_size < 1:
        raise PrepError("--shard_size must be >= 1")
    base_dir = resolve_base(base_ckpt)
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    ms = model_settings(config)
    from minihiggs.text_tokenizer import TextTokenizer

    tok = TextTokenizer.from_dir(base_dir)
    for name, want in (("<|AUDIO|>", ms["audio_in_token_id"]), ("<|AUDIO_OUT|>", ms["audio_out_token_id"])):
        try:
            got = tok.token_id(name)
        except KeyError:
            raise PrepError(f"{base_dir}: the tokenizer does not define {name} (not a Higgs Audio tokenizer?)") from None
        if got != want:
            raise PrepError(f"{base_dir}: tokenizer maps {name} to {got} but config.json says {want}")
    for name in ("<|audio_bos|>", "<|audio_eos|>", "<|audio_out_bos|>", "<|begin_of_text|>", "<|eot_id|>"):
        try:
            tok.token_id(name)
        except KeyError:
            raise PrepError(f"{base_dir}: the tokenizer does not define {name}") from None
    if not ms["whisper"]:
        log("prep: this checkpoint does not use Whisper features (encode_whisper_embed false or "
            "skip_audio_tower true): none are stored")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    workers = max(1, int(workers))
    kind = manifest_kind(manifest)
    fingerprint = {"format": FORMAT, "version": VERSION, "manifest": str(manifest),
                   "manifest_sha256": file_sha256(manifest), "shard_size": shard_size,
                   "voice_clone": bool(voice_clone) if kind == "plain" else False,
                   "scene_prompt": scene_prompt if kind == "plain" else None, "max_tokens": max_tokens,
                   "tokenizer": tok.fingerprint, "codec": str(codec), **ms}
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "prep_state.json"
    if state_path.exists():
        old = json.loads(state_path.read_text(encoding="utf-8"))
        if old != fingerprint:
            if not overwrite:
                diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
                raise PrepError(f"{out} holds shards prepared with other settings ({', '.join(diff)} differ); "
                                "use a new --out, or --overwrite to delete them")
            for p in out.glob("shard-*"):
                p.unlink()
    atomic_write_json(state_path, fingerprint)
    for p in (out / "index.json", out / "prep_errors.jsonl"):
        if p.exists():
            p.unlink()

    jobs, n_entries, notes = build_jobs(manifest, kind, shard_size, voice_clone, scene_prompt)
    for note in notes:
        log(f"prep: {note}")
    todo, done = [], []
    for j in jobs:
        if shard_complete(out, j["name"]):
            done.append(j)
        else:
            _clear_shard(out, j["name"])
            todo.append(j)
    if done:
        log(f"prep: resuming: {len(done)} of {len(jobs)} shard(s) already finished")
    settings = {"out": str(out), "manifest": str(manifest), "manifest_name": manifest.name,
                "base_dir": str(manifest.parent), "tokenizer_dir": str(base_dir), "codec": codec,
                "device": device, "max_tokens": max_tokens, **ms,
                "codec_batch_clips": 32 if device.startswith("cuda") else 8,
                "threads": max(1, (os.cpu_count() or 1) // workers)}

    from tqdm import tqdm

    done_entries = sum(j["last"] - j["first"] for j in done)
    bar = tqdm(total=n_entries, initial=done_entries, unit="clip", disable=not progress, dynamic_ncols=True,
               desc="prep")
    stats = {"clips": 0, "seconds": 0.0}
    t_run = time.time()

    def on_progress(clips, seconds):
        stats["clips"] += clips
        stats["seconds"] += seconds
        el = max(time.time() - t_run, 1e-6)
        bar.update(clips)
        bar.set_postfix_str(f"{stats['clips'] / el:.1f} clips/s, {stats['seconds'] / 3600 / el:.5f} audio-h/s",
                            refresh=False)

    results = []
    try:
        if workers == 1 or len(todo) <= 1:
            class _Q:
                def put(self, item):
                    on_progress(*item)

            w = Worker(settings, _Q(), tok)
            for j in todo:
                results.append(w.run(j))
        else:
            # ProcessPoolExecutor, not multiprocessing.Pool: a worker that dies (killed for memory, a crash in
            # native code, a failing initializer) breaks the executor and every pending future raises, where
            # Pool silently replaces the worker and waits forever for the lost shard.
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            ex = ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx, initializer=_init_worker,
                                     initargs=(settings, q))
            ok = False
            try:
                pending = {ex.submit(_run_job, j) for j in todo}
                while pending:
                    try:
                        while True:
                            on_progress(*q.get(timeout=0.2))
                    except queue_mod.Empty:
                        pass
                    finished, pending = futures_wait(pending, timeout=0)
                    for f in finished:
                        try:
                            res = f.result()
                        except BrokenProcessPool:
                            raise PrepError("a worker process died (killed for memory, or crashed); finished "
                                            "shards are kept: re-run the same command to resume") from None
                        if "failed" in res:
                            raise PrepError(f"worker failed on {res['name']}: {res['failed']}\n"
                                            f"{res['traceback']}")
                        results.append(res)
                try:
                    while True:
                        on_progress(*q.get(timeout=0.05))
                except queue_mod.Empty:
                    pass
                ok = True
            finally:
                if ok:
                    ex.shutdown(wait=True)
                else:  # stop the other workers now (their half-written shards are redone on resume)
                    procs = list((getattr(ex, "_processes", None) or {}).values())
                    ex.shutdown(wait=False, cancel_futures=True)
                    for p in procs:
                        p.terminate()
                    for p in procs:
                        p.join()
    finally:
        bar.close()
    elapsed = time.time() - t_run

    # ---- index, errors, summary
    errors_out, kinds = [], {}
    total_samples, total_seconds = 0, 0.0
    ids_seen: dict[str, int] = {}
    dup = 0
    with open(out / "prep_errors.jsonl.tmp", "w", encoding="utf-8") as ef:
        for j in jobs:
            meta = read_shard_meta(out, j["name"])
            total_samples += len(meta["samples"])
            total_seconds += sum(r["duration"] for r in meta["samples"])
            for r in meta["samples"]:
                if r["id"] in ids_seen:
                    dup += 1
                ids_seen[r["id"]] = 1
            with open(out / f"{j['name']}.errors.jsonl", encoding="utf-8") as f:
                for row in f:
                    ef.write(row)
                    e = json.loads(row)
                    kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
                    errors_out.append(e)
    os.replace(out / "prep_errors.jsonl.tmp", out / "prep_errors.jsonl")
    n_err = len(errors_out)
    summary = {"samples": total_samples, "skipped": n_err, "skipped_by_kind": kinds, "shards": len(jobs),
               "audio_hours": total_seconds / 3600, "seconds": time.time() - t0, "run_seconds": elapsed,
               "clips_processed": stats["clips"], "audio_seconds_processed": stats["seconds"],
               "out": str(out), "errors_file": str(out / "prep_errors.jsonl")}
    rate = stats["clips"] / elapsed if elapsed > 0 else 0.0
    log(f"prep: {total_samples} sample(s) in {len(jobs)} shard(s), {total_seconds / 3600:.3f} h of audio; "
        f"{n_err} skipped" + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(kinds.items()))})" if kinds else "")
        + f"; this run {stats['clips']} entries in {elapsed:.1f} s ({rate:.1f} clips/s, "
        f"{stats['seconds'] / 3600 / max(elapsed, 1e-9) * 3600:.1f} audio-hours/hour)")
    if n_err:
        log(f"prep: skipped entries are listed in {out / 'prep_errors.jsonl'}")
        for e in errors_out[:10]:
            log(f"  {Path(e['manifest']).name}:{e['line']}: {e['reason']}")
        if n_err > 10:
            log(f"  ... and {n_err - 10} more")
    if dup:
        log(f"prep: warning: {dup} duplicate sample id(s); the train/val split hashes ids")
    if total_samples == 0:
        raise PrepError("nothing usable: every manifest entry was skipped (see prep_errors.jsonl)")
    if strict and n_err:
        raise PrepError(f"--strict: {n_err} entr{'y was' if n_err == 1 else 'ies were'} skipped "
                        f"(see {out / 'prep_errors.jsonl'}); no index.json written")
    write_index(out, [j["name"] for j in jobs],
                {**ms, "mel_bins": mel.N_MELS, "tokenizer": tok.fingerprint, "base_ckpt": str(base_ckpt),
                 "codec": str(codec), "manifest": str(manifest)})
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--manifest", required=True, help=".jsonl / .json ChatML, or .csv / .tsv / .txt plain list")
    ap.add_argument("--out", required=True, help="output directory of shards")
    ap.add_argument("--base_ckpt", default=DEFAULT_BASE, help="checkpoint dir or hub repo id (config.json + "
                    f"tokenizer files); default {DEFAULT_BASE}")
    ap.add_argument("--codec", default=DEFAULT_CODEC, help=f"audio tokenizer dir or repo id; default {DEFAULT_CODEC}")
    ap.add_argument("--workers", type=int, default=1, help="worker processes (each takes whole shards)")
    ap.add_argument("--shard_size", type=int, default=1000, help="manifest entries per shard (default 1000)")
    ap.add_argument("--max_tokens", type=int, default=None, help="skip samples whose merged length exceeds this")
    ap.add_argument("--strict", action="store_true", help="fail (no index.json) if any entry is skipped")
    ap.add_argument("--voice_clone", action="store_true", help="plain lists: pair each utterance with another "
                    "utterance of the same speaker as the voice reference")
    ap.add_argument("--scene_prompt", default=DEFAULT_SCENE, help="plain lists: scene description in the "
                    "system prompt ('' for none)")
    ap.add_argument("--device", default=None, help="codec device (default cuda when available, else cpu)")
    ap.add_argument("--overwrite", action="store_true", help="delete shards made with other settings in --out")
    ap.add_argument("--no_progress", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run_prep(args.manifest, args.out, base_ckpt=args.base_ckpt, codec=args.codec, workers=args.workers,
                 shard_size=args.shard_size, max_tokens=args.max_tokens, strict=args.strict,
                 voice_clone=args.voice_clone, device=args.device, scene_prompt=args.scene_prompt or None,
                 overwrite=args.overwrite, progress=not args.no_progress)
    except PrepError as e:
        print(f"prep: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
