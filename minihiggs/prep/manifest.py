"""Reading manifests into entries, without touching audio: ChatML `.jsonl` / `.json` and plain lists.

An entry is a tuple: `("raw", line, bytes)` (a `.jsonl` line, parsed by the worker), `("obj", line, dict)` (a
parsed ChatML object) or `("err", line, kind, reason)` (something that is already known to be unusable).
Line numbers are 1-based lines of the manifest file, for prep_errors.jsonl.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ManifestError
from ..text.chatml import resolve_path, tts_sample

PLAIN_EXT = (".csv", ".tsv", ".txt", ".list")
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".aiff", ".aif", ".au", ".m4a")


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


@dataclass
class PlainRow:
    line: int
    sample_id: str
    audio: str
    text: str
    speaker: str | None


def _find_audio(base_dir: str, key: str) -> str:
    cands = [os.path.join(base_dir, "wavs", key + ext) for ext in (".wav", ".flac")]
    cands += [os.path.join(base_dir, key + ext) for ext in (".wav", ".flac")]
    for c in cands:
        if os.path.exists(c):
            return os.path.normpath(c)
    wavs = os.path.join(base_dir, "wavs")
    return os.path.normpath(cands[0] if os.path.isdir(wavs) else cands[2])


def parse_plain_line(line: str, line_no: int, base_dir: str, delimiter: str) -> PlainRow | None:
    """One line of an LJSpeech-style list. Forms:
    * `id|text` or LJSpeech's `id|text|normalized_text` (the first column has no audio extension and no path
      separator): audio is `wavs/<id>.wav` (or .flac, or next to the list); the normalized text is used when
      present; no speaker (one speaker per list).
    * `path|text` or `path|text|speaker` (the first column names an audio file).
    Returns None for a header line. Raises ManifestError."""
    if delimiter == ",":
        cols = next(csv.reader(io.StringIO(line)))
    else:
        cols = line.split(delimiter)
    cols = [c.strip() for c in cols]
    if len(cols) < 2:
        raise ManifestError(f"expected at least 2 '{delimiter}'-separated columns (id|text or path|text|speaker), "
                            f"got {len(cols)}")
    first = cols[0]
    if first.lower() in ("id", "path", "audio", "file", "wav") and cols[1].lower() in ("text", "transcript"):
        return None
    if not first:
        raise ManifestError("empty id/path column")
    is_path = first.lower().endswith(AUDIO_EXTENSIONS) or "/" in first or os.sep in first
    if is_path:
        if len(cols) > 3:
            raise ManifestError(f"expected path|text|speaker, got {len(cols)} columns", "unknown_field")
        text = cols[1]
        speaker = cols[2] if len(cols) == 3 and cols[2] else None
        audio = resolve_path(first, base_dir)
        sid = first
    else:
        if len(cols) > 3:
            raise ManifestError(f"expected id|text[|normalized_text], got {len(cols)} columns", "unknown_field")
        text = cols[2] if len(cols) == 3 and cols[2] else cols[1]
        speaker = None
        audio = _find_audio(base_dir, first)
        sid = first
    if not text:
        raise ManifestError("empty transcript", "no_target")
    return PlainRow(line_no, sid, audio, text, speaker)


def voice_clone_references(rows: list[PlainRow]) -> dict[int, PlainRow | None]:
    """Pair each row with a different row of the same speaker (deterministic: the next utterance of that
    speaker in list order, cyclically). Rows of a speaker with one utterance map to None."""
    by_spk: dict[str | None, list[PlainRow]] = {}
    for r in rows:
        by_spk.setdefault(r.speaker, []).append(r)
    ref: dict[int, PlainRow | None] = {}
    for group in by_spk.values():
        for i, r in enumerate(group):
            ref[r.line] = group[(i + 1) % len(group)] if len(group) > 1 else None
    return ref
