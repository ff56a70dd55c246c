"""The on-disk shard format written by prep.py and read by `minihiggs.dataset.ShardDataset`.

A prepared directory holds:

* `index.json` — written last, when prep finished: `format` ("minihiggs-shards"), `version`, the model-side
  settings the shards were made for (`num_codebooks`, `codebook_size`, `audio_in_token_id`,
  `audio_out_token_id`, `whisper`, `mel_bins`, `tokenizer`), and `shards`: one entry per shard with `name`,
  `bytes`, `sha256` (of NAME.bin), `samples` and `meta_sha256` (of NAME.json: the per-sample offsets, lengths
  and frame counts that the reader trusts are covered too).
* per shard `NAME.bin` — flat little-endian arrays, one contiguous 8-byte-aligned region per sample:
  `input_ids` int32 [n], `label_ids` int32 [n], then every code segment as int16 [num_codebooks, frames]
  (row-major, in placeholder order), zero padding to 4 bytes, then every Whisper feature chunk as float32
  [mel_bins, L] (only the first L columns of the [mel_bins, 3000] matrix; the rest equal `fill` exactly).
* per shard `NAME.json` — `format`, `version`, `name`, `bytes`, `sha256` of NAME.bin, `entries` (the manifest
  entry range it covers) and `samples`: per sample `id`, `source`, `line`, `speaker`, `duration` (seconds of
  audio in its code segments), `length` (estimated merged length, for bucketing), `offset`, `nbytes`, `crc32`
  of its region, `n` (tokens), `frames` (per code segment) and `features` (per Whisper chunk: [L, fill,
  valid_frames]) or null; and `max_token_id`, the largest token or label id of the shard (so a reader can refuse
  shards a model cannot embed without reading them; absent in shards of older versions).
* per shard `NAME.errors.jsonl` — the manifest entries of that shard that were skipped.

A shard is complete when its `.json` exists (it is written atomically after the `.bin` is renamed into place).
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from ..audio.mel import N_FRAMES, pack_features, unpack_features, whisper_rows
from ..errors import ShardError
from ..fsio import atomic_write_json
from .sample import Sample

FORMAT = "minihiggs-shards"
VERSION = 1
ALIGN = 8


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def estimated_length(n_tokens: int, frames: list[int], whisper_valid: list[int] | None = None,
                     columns_per_segment: int = 9) -> int:
    """Length of the merged sequence the model sees: every placeholder becomes its code columns plus
    `columns_per_segment` more (BOS, EOS and the delay pattern's K-1 columns: `HiggsConfig.extra_audio_columns`),
    and every Whisper chunk adds its tower rows."""
    n = n_tokens - len(frames) + sum(f + columns_per_segment for f in frames)
    if whisper_valid:
        n += sum(whisper_rows(v) for v in whisper_valid)
    return int(n)


def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(bufsize)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def encode_sample(sample: Sample, num_codebooks: int) -> tuple[bytes, dict]:
    """Serialise one Sample to its byte region and the numeric part of its index record."""
    for t in (sample.input_ids, sample.label_ids):
        if t.numel() and (int(t.max()) > np.iinfo(np.int32).max or int(t.min()) < np.iinfo(np.int32).min):
            raise ValueError("token ids do not fit in int32")
    ids = np.asarray(sample.input_ids.cpu(), dtype="<i4")
    lab = np.asarray(sample.label_ids.cpu(), dtype="<i4")
    parts = [ids.tobytes(), lab.tobytes()]
    frames = []
    for c in sample.audio_codes:
        c = np.asarray(c.cpu() if hasattr(c, "cpu") else c)
        if c.ndim != 2 or c.shape[0] != num_codebooks:
            raise ValueError(f"code segment of shape {c.shape}, expected [{num_codebooks}, frames]")
        if c.size and (c.min() < 0 or c.max() > np.iinfo(np.int16).max):
            raise ValueError("audio codes out of int16 range")
        parts.append(np.ascontiguousarray(c, dtype="<i2").tobytes())
        frames.append(int(c.shape[1]))
    size = sum(len(p) for p in parts)
    if size % 4:
        parts.append(b"\0" * (4 - size % 4))
    feats = None
    if sample.whisper_features is not None:
        feats = []
        for f, valid in zip(sample.whisper_features, sample.whisper_lengths):
            head, fill = pack_features(f)
            parts.append(np.ascontiguousarray(head, dtype="<f4").tobytes())
            feats.append([int(head.shape[1]), fill, int(valid)])
    blob = b"".join(parts)
    rec = {"n": int(ids.shape[0]), "frames": frames, "features": feats, "nbytes": len(blob),
           "crc32": zlib.crc32(blob)}
    return blob, rec


def decode_sample(region, n_tokens: int, frames, features, num_codebooks: int, mel_bins: int,
                  sample_id: str = "") -> Sample:
    """The inverse of `encode_sample`: one sample's byte region (a memmap slice) back to a `Sample`.

    `frames` are the per-segment frame counts of its record; `features` its `[L, fill, valid]` triples (or None).
    The arrays are copied out of the region (int64 / float32 tensors), so the map can be closed afterwards."""
    pos = 0
    ids = np.frombuffer(region, dtype="<i4", count=n_tokens, offset=pos)
    pos += 4 * n_tokens
    lab = np.frombuffer(region, dtype="<i4", count=n_tokens, offset=pos)
    pos += 4 * n_tokens
    codes = []
    for f in frames:
        f = int(f)
        c = np.frombuffer(region, dtype="<i2", count=num_codebooks * f, offset=pos).reshape(num_codebooks, f)
        codes.append(torch.from_numpy(c.astype(np.int64)))
        pos += 2 * num_codebooks * f
    pos += (-pos) % 4
    feats = lens = None
    if features is not None:
        feats, lens = [], []
        for L, fill, valid in features:
            L = int(L)
            head = np.frombuffer(region, dtype="<f4", count=mel_bins * L, offset=pos).reshape(mel_bins, L)
            pos += 4 * mel_bins * L
            feats.append(unpack_features(head, float(fill), N_FRAMES))
            lens.append(int(valid))
    return Sample(input_ids=torch.from_numpy(ids.astype(np.int64)), label_ids=torch.from_numpy(lab.astype(np.int64)),
                  audio_codes=codes, whisper_features=feats, whisper_lengths=lens, sample_id=sample_id)


class ShardWriter:
    """Writes one shard: `add()` samples, then `close()` (or `abort()`). Writes go to NAME.bin.tmp first."""

    def __init__(self, out_dir: str | os.PathLike, name: str, num_codebooks: int, entries: tuple[int, int]):
        self.dir = Path(out_dir)
        self.name = name
        self.num_codebooks = num_codebooks
        self.entries = list(entries)
        self.tmp = self.dir / f"{name}.bin.tmp"
        self.f = open(self.tmp, "wb")
        self.h = hashlib.sha256()
        self.pos = 0
        self.samples: list[dict] = []
        self.max_token_id = -1

    def add(self, sample: Sample, *, source: str, line: int, speaker: str | None, duration: float,
            length: int) -> None:
        blob, rec = encode_sample(sample, self.num_codebooks)
        pad = (-len(blob)) % ALIGN
        rec = {"id": sample.sample_id, "source": source, "line": int(line), "speaker": speaker,
               "duration": round(float(duration), 4), "length": int(length), "offset": self.pos, **rec}
        self.f.write(blob)
        self.h.update(blob)
        if pad:
            self.f.write(b"\0" * pad)
            self.h.update(b"\0" * pad)
        self.pos += len(blob) + pad
        self.samples.append(rec)
        if rec["n"]:
            self.max_token_id = max(self.max_token_id, int(sample.input_ids.max()), int(sample.label_ids.max()))

    def close(self, errors: list[dict]) -> dict:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        err_path = self.dir / f"{self.name}.errors.jsonl"
        tmp = err_path.with_name(err_path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for e in errors:
                f.write(json.dumps(e, ensure_ascii=False) + "\n")
        os.replace(tmp, err_path)
        os.replace(self.tmp, self.dir / f"{self.name}.bin")
        meta = {"format": FORMAT, "version": VERSION, "name": self.name, "bytes": self.pos,
                "sha256": self.h.hexdigest(), "entries": self.entries, "errors": len(errors),
                "max_token_id": self.max_token_id, "samples": self.samples}
        atomic_write_json(self.dir / f"{self.name}.json", meta)
        return meta

    def abort(self) -> None:
        try:
            self.f.close()
        finally:
            if self.tmp.exists():
                self.tmp.unlink()


def read_shard_meta(out_dir: str | os.PathLike, name: str, with_digest: bool = False):
    """NAME.json as a dict; with `with_digest`, (dict, sha256 of the file's bytes)."""
    path = Path(out_dir) / f"{name}.json"
    try:
        raw = path.read_bytes()
        meta = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise ShardError(f"{path}: shard index missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: shard index is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        got = meta if isinstance(meta, dict) else {}
        raise ShardError(f"{path}: format {got.get('format')!r} version {got.get('version')!r}, "
                         f"this minihiggs reads {FORMAT!r} version {VERSION}")
    return (meta, hashlib.sha256(raw).hexdigest()) if with_digest else meta


def write_index(out_dir: str | os.PathLike, names: list[str], settings: dict) -> dict:
    """Write OUT/index.json over the finished shards `names` (in order). `settings` must hold num_codebooks,
    codebook_size, audio_in_token_id, audio_out_token_id and whisper; other keys are recorded as given."""
    out_dir = Path(out_dir)
    shards, n, seconds = [], 0, 0.0
    for name in names:
        meta, digest = read_shard_meta(out_dir, name, with_digest=True)
        shards.append({"name": name, "bytes": meta["bytes"], "sha256": meta["sha256"],
                       "samples": len(meta["samples"]), "meta_sha256": digest})
        n += len(meta["samples"])
        seconds += sum(r["duration"] for r in meta["samples"])
    index = {"format": FORMAT, "version": VERSION, "mel_bins": 128, **settings, "num_samples": n,
             "audio_hours": seconds / 3600, "shards": shards}
    for k in ("num_codebooks", "codebook_size", "audio_in_token_id", "audio_out_token_id", "whisper"):
        if k not in index:
            raise ValueError(f"write_index: settings lack {k!r}")
    atomic_write_json(out_dir / "index.json", index)
    return index


def shard_complete(out_dir: str | os.PathLike, name: str) -> bool:
    """True when NAME.json and NAME.errors.jsonl exist and NAME.bin has the recorded size."""
    d = Path(out_dir)
    try:
        meta = read_shard_meta(d, name)
    except ShardError:
        return False
    b = d / f"{name}.bin"
    return b.is_file() and b.stat().st_size == meta["bytes"] and (d / f"{name}.errors.jsonl").is_file()
