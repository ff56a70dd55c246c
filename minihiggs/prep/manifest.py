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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ManifestError, PrepError
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
    if text.startswith("\ufeff"):  # a UTF-8 byte-order mark (editors on Windows write one): not content
        text = text[1:]
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


def read_plain_list(path: Path, voice_clone: bool, scene: str | None,
                    usable: Callable[[str], bool] | None = None) -> tuple[list[tuple], list[str]]:
    """Entries of an LJSpeech-style list, as ChatML objects, and notes for the log. With `voice_clone`, each
    utterance is paired with another *usable* utterance of its speaker (`usable(audio_path)`, e.g. the file
    decodes and is not silent), so that a bad file never takes a good utterance down with it."""
    suffix = path.suffix.lower()
    base = str(path.parent)
    entries: list[tuple] = []
    lines: list[tuple[int, str]] = []
    for i, raw in enumerate(path.read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            entries.append(("err", i, "bad_text_encoding", f"line is not valid UTF-8 ({e.reason} at byte {e.start})"))
            continue
        lines.append((i, line.removeprefix("\ufeff")))
    # One delimiter for the whole file: a line without it is then reported as having one column of the file's kind.
    delim = "\t" if suffix == ".tsv" else ("|" if any("|" in ln for _, ln in lines) else ",")
    third = None
    if lines:
        header = _header(lines[0][1], delim)
        if header is not None:
            third = header
            lines = lines[1:]
    if third is None:
        third = infer_third_column(path, [(i, split_columns(ln, delim)) for i, ln in lines])
    rows = []
    for i, line in lines:
        try:
            row = parse_plain_line(line, i, base, delim, third)
        except ManifestError as e:
            entries.append(("err", i, e.kind, str(e)))
            continue
        except Exception as e:  # csv quoting errors
            entries.append(("err", i, "invalid", f"cannot parse line ({e})"))
            continue
        if row is not None:
            rows.append(row)
            entries.append(("row", i, row))
    entries.sort(key=lambda e: e[1])
    notes: list[str] = []
    refs: dict[int, PlainRow | None] = {}
    if voice_clone:
        ok: dict[str, bool] = {}  # one check per file (a clip may be listed twice)

        def row_usable(r: PlainRow) -> bool:
            if r.audio not in ok:
                ok[r.audio] = usable(r.audio)
            return ok[r.audio]

        refs = voice_clone_references(rows, row_usable if usable else None)
        lonely: dict[str | None, int] = {}
        for r in rows:
            if refs.get(r.line) is None and (usable is None or ok.get(r.audio, True)):
                lonely[r.speaker] = lonely.get(r.speaker, 0) + 1
        for spk, n in list(lonely.items())[:5]:
            notes.append(f"--voice_clone: speaker {spk!r} has no other usable utterance: {n} utterance(s) "
                         f"prepared without a reference")
        if len(lonely) > 5:
            notes.append(f"--voice_clone: ... and {len(lonely) - 5} more speakers without a usable reference")
    out = []
    for e in entries:
        if e[0] != "row":
            out.append(e)
            continue
        r = e[2]
        ref = refs.get(r.line)
        obj = tts_sample(r.text, r.audio, scene=scene, speaker=r.speaker, sample_id=r.sample_id,
                         reference=(ref.text, ref.audio) if ref is not None else None)
        out.append(("obj", r.line, obj))
    return out, notes


HEADER_FIRST = ("id", "path", "audio", "file", "wav")
HEADER_TEXT = ("text", "transcript")
THIRD_COLUMN_NAMES = {"speaker": "speaker", "speaker_id": "speaker", "spk": "speaker",
                      "normalized": "normalized", "normalized_text": "normalized", "normalised": "normalized",
                      "normalised_text": "normalized"}


def split_columns(line: str, delimiter: str) -> list[str]:
    cols = next(csv.reader(io.StringIO(line))) if delimiter == "," else line.split(delimiter)
    return [c.strip() for c in cols]


def _header(line: str, delimiter: str) -> str | None:
    """The meaning of the third column if `line` is a header (`id|text|speaker`, `path|text|normalized`, ...):
    "speaker", "normalized", or "" for a two-column header; None if it is not a header."""
    try:
        cols = [c.lower() for c in split_columns(line, delimiter)]
    except Exception:
        return None
    if len(cols) < 2 or cols[0] not in HEADER_FIRST or cols[1] not in HEADER_TEXT:
        return None
    if len(cols) == 2:
        return ""
    if cols[2] not in THIRD_COLUMN_NAMES:
        raise PrepError(f"header line {line!r}: unknown third column {cols[2]!r} (name it 'speaker' or "
                        f"'normalized')")
    return THIRD_COLUMN_NAMES[cols[2]]


def _same_words(a: str, b: str) -> bool:
    norm = lambda t: re.sub(r"\W+", "", t).casefold()  # noqa: E731
    return norm(a) == norm(b)


def infer_third_column(path: Path, lines: list[tuple[int, list[str]]]) -> str:
    """What the third column of `id|text|X` lines holds, decided once for the file (a header says it outright):
    LJSpeech's normalized transcript (a sentence, or the same words as the text) or a VCTK-style speaker id (one
    token next to a sentence). Lines that say both, or a file where no line tells, are refused: guessing wrong
    would train on "p225" as the transcript."""
    speaker_like, text_like = [], []
    for i, cols in lines:
        if len(cols) != 3 or not cols[2] or _is_audio_path(cols[0]):
            continue
        text, third = cols[1], cols[2]
        if re.search(r"\s", third) or _same_words(text, third):
            text_like.append((i, third))
        elif re.search(r"\s", text):
            speaker_like.append((i, third))
        else:  # one word each, and different: either reading fits
            continue
    if speaker_like and text_like:
        (a, va), (b, vb) = speaker_like[0], text_like[0]
        raise PrepError(f"{path}: the third column reads as a speaker id on some lines (line {a}: {va!r}) and as "
                        f"normalized text on others (line {b}: {vb!r}); add a header line 'id|text|speaker' or "
                        f"'id|text|normalized' to say which")
    if speaker_like:
        return "speaker"
    if text_like or not any(len(c) == 3 and c[2] and not _is_audio_path(c[0]) for _, c in lines):
        return "normalized"
    raise PrepError(f"{path}: cannot tell whether the third column is a speaker id or normalized text (every "
                    f"line has a one-word transcript); add a header line 'id|text|speaker' or 'id|text|normalized'")


def _is_audio_path(first: str) -> bool:
    return first.lower().endswith(AUDIO_EXTENSIONS) or "/" in first or os.sep in first


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


def parse_plain_line(line: str, line_no: int, base_dir: str, delimiter: str,
                     third: str | None = None) -> PlainRow | None:
    """One line of an LJSpeech-style list. Forms:
    * `id|text` or LJSpeech's `id|text|normalized_text` (the first column has no audio extension and no path
      separator): audio is `wavs/<id>.wav` (or .flac, or next to the list); the normalized text is used when
      present; no speaker (one speaker per list). With `third="speaker"` (a header, or `infer_third_column`
      on a VCTK-style list): `id|text|speaker`.
    * `path|text` or `path|text|speaker` (the first column names an audio file).
    Returns None for a header line. Raises ManifestError."""
    cols = split_columns(line, delimiter)
    if len(cols) < 2:
        raise ManifestError(f"expected at least 2 {delimiter!r}-separated columns (id{delimiter}text or "
                            f"path{delimiter}text{delimiter}speaker), got {len(cols)}")
    first = cols[0]
    if first.lower() in HEADER_FIRST and cols[1].lower() in HEADER_TEXT:
        return None
    if not first:
        raise ManifestError("empty id/path column")
    is_path = _is_audio_path(first)
    third = third or ("speaker" if is_path else "normalized")
    if len(cols) > 3:
        form = "path|text|speaker" if is_path else f"id|text[|{third}]"
        raise ManifestError(f"expected {form}, got {len(cols)} columns", "unknown_field")
    extra = cols[2] if len(cols) == 3 and cols[2] else None
    text = extra if third == "normalized" and extra else cols[1]
    speaker = extra if third == "speaker" else None
    audio = resolve_path(first, base_dir) if is_path else _find_audio(base_dir, first)
    if not text:
        raise ManifestError("empty transcript", "no_target")
    return PlainRow(line_no, first, audio, text, speaker)


def voice_clone_references(rows: list[PlainRow], usable: Callable[[PlainRow], bool] | None = None
                           ) -> dict[int, PlainRow | None]:
    """Pair each row with a different row of the same speaker (deterministic: the next utterance of that
    speaker in list order, cyclically), among the `usable` rows only: an unusable row is never a reference and
    gets none (it is skipped anyway). Rows of a speaker with one usable utterance map to None."""
    by_spk: dict[str | None, list[PlainRow]] = {}
    ref: dict[int, PlainRow | None] = {}
    for r in rows:
        if usable is None or usable(r):
            by_spk.setdefault(r.speaker, []).append(r)
        else:
            ref[r.line] = None
    for group in by_spk.values():
        for i, r in enumerate(group):
            ref[r.line] = group[(i + 1) % len(group)] if len(group) > 1 else None
    return ref
