"""LJSpeech-style plain lists (`metadata.csv`, `.tsv`, `.txt`, `.list`) read into ChatML TTS samples.

Forms, one per file: `id|text`, `id|text|normalized`, `id|text|speaker`, `path|text`, `path|text|speaker` (and
`path|text|normalized`). A first column with an audio extension or a path separator names the clip; otherwise it
is an id whose clip is `wavs/<id>.wav` (or .flac, or next to the list). Columns are separated by tabs in a
`.tsv`, else by `|` when any line has one, else by commas, read as CSV: a transcript with a comma is quoted.

A file is read one way or refused whole, with one line naming file:line and showing the line: guessing would
train on a speaker name as the transcript (or half a sentence), silently, for every sample of the file.
* A header line (`id|text|speaker`, `path,text`, ...) names the columns; without one, what a third column holds
  is decided from all lines together: a one-token third column next to sentences is a speaker id, a sentence (or
  the same words as the text) is normalized text. A file that shows both, or neither, is refused.
* A line with more columns than the form has (the header's count; else 3, or 2 for a comma-separated list,
  where a third column could as well be the rest of a transcript after an unquoted comma) is refused.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ManifestError, PrepError
from ..text.chatml import resolve_path, tts_sample
from .manifest import BadEntry, ChatmlEntry, Entry

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".aiff", ".aif", ".au", ".m4a")
HEADER_FIRST = ("id", "path", "audio", "file", "wav")
HEADER_TEXT = ("text", "transcript")
THIRD_COLUMN_NAMES = {"speaker": "speaker", "speaker_id": "speaker", "spk": "speaker",
                      "normalized": "normalized", "normalized_text": "normalized", "normalised": "normalized",
                      "normalised_text": "normalized"}
SPEAKER, NORMALIZED = "speaker", "normalized"


@dataclass(frozen=True)
class PlainRow:
    line: int
    sample_id: str
    audio: str
    text: str
    speaker: str | None


@dataclass(frozen=True)
class ListLayout:
    """How every line of one file reads (decided once per file)."""

    path: Path
    delimiter: str
    third: str | None  # SPEAKER, NORMALIZED, or None where no line has a third column
    max_columns: int

    def form(self) -> str:
        d = self.delimiter
        return f"id{d}text" + (f"{d}{self.third}" if self.third else "")


def read_plain_list(path: Path, voice_clone: bool, scene: str | None,
                    usable: Callable[[str], bool] | None = None) -> tuple[list[Entry], list[str]]:
    """Entries of a plain list, as ChatML TTS prompts, and notes for the log. With `voice_clone`, each utterance is
    paired with another *usable* utterance of its speaker (`usable(audio_path)`, e.g. the file decodes and is not
    silent), so that a bad file never takes a good utterance down with it. Raises PrepError for a file that does
    not read one way only."""
    bad, lines = decoded_lines(path)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ("|" if any("|" in ln for _, ln in lines) else ",")
    split = []
    for i, line in lines:
        try:
            split.append((i, split_columns(line, delimiter)))
        except csv.Error as e:
            bad.append(BadEntry(i, "invalid", f"cannot parse line ({e})"))
    header = header_columns(path, split[0], delimiter) if split else None
    if header is not None:
        split = split[1:]
    layout = ListLayout(path, delimiter, header[2] if header and len(header) == 3 else None,
                        len(header) if header else (2 if delimiter == "," else 3))
    refuse_extra_columns(layout, split, header)
    if header is None:
        layout = ListLayout(path, delimiter, infer_third_column(path, split, delimiter), layout.max_columns)
    rows = []
    for i, cols in split:
        try:
            rows.append(parse_plain_line(cols, i, layout))
        except ManifestError as e:
            bad.append(BadEntry(i, e.kind, str(e)))
    refs, notes = pair_references(rows, usable) if voice_clone else ({}, [])
    entries: list[Entry] = bad
    for r in rows:
        ref = refs.get(r.line)
        entries.append(ChatmlEntry(r.line, tts_sample(r.text, r.audio, scene=scene, speaker=r.speaker,
                                                      sample_id=r.sample_id,
                                                      reference=(ref.text, ref.audio) if ref else None)))
    entries.sort(key=lambda e: e.line)
    return entries, notes


def decoded_lines(path: Path) -> tuple[list[BadEntry], list[tuple[int, str]]]:
    """(the lines that are not UTF-8, as BadEntry; the other non-blank lines with their numbers)."""
    bad, lines = [], []
    for i, raw in enumerate(path.read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.append(BadEntry(i, "bad_text_encoding", f"line is not valid UTF-8 ({e.reason} at byte {e.start})"))
            continue
        lines.append((i, line.removeprefix("\ufeff")))
    return bad, lines


def split_columns(line: str, delimiter: str) -> list[str]:
    """The stripped columns of a line; a comma-separated line is CSV (double quotes protect commas)."""
    if delimiter == ",":
        cols = next(csv.reader(io.StringIO(line), skipinitialspace=True, strict=True))
    else:
        cols = line.split(delimiter)
    return [c.strip() for c in cols]


def shown(cols: list[str]) -> str:
    return " | ".join(repr(c) for c in cols)


def header_columns(path: Path, first: tuple[int, list[str]], delimiter: str) -> list[str] | None:
    """The first line's column meanings (["id", "text"] or ["id", "text", SPEAKER / NORMALIZED]) if it is a header,
    None if it is a line of data."""
    i, cols = first
    names = [c.lower() for c in cols]
    if len(names) < 2 or names[0] not in HEADER_FIRST or names[1] not in HEADER_TEXT:
        return None
    if len(names) > 3 or (len(names) == 3 and names[2] not in THIRD_COLUMN_NAMES):
        raise PrepError(f"{path}:{i}: header {shown(cols)}: a third column must be named 'speaker' or "
                        f"'normalized', and there is no fourth")
    return ["id", "text"] + [THIRD_COLUMN_NAMES[n] for n in names[2:]]


def refuse_extra_columns(layout: ListLayout, lines: list[tuple[int, list[str]]], header: list[str] | None) -> None:
    """A line with more columns than the form: which column is which cannot be known."""
    for i, cols in lines:
        if len(cols) <= layout.max_columns:
            continue
        d = layout.delimiter
        if header is not None:
            why = f"the header names {len(header)} ({d.join(header)})"
        elif d == ",":
            why = ("a comma-separated list without a header has 2 (id,text): is the rest a third column or the rest "
                   "of a transcript with an unquoted comma?")
        else:
            why = f"the forms have at most 3 (id{d}text{d}speaker, id{d}text{d}normalized)"
        fix = ('quote a transcript that contains a comma ("..."), or separate the columns with \'|\'; '
               'a header line names the columns (id,text or id,text,speaker)') if d == "," else \
            f"remove the extra {d!r} or name the columns in a header line"
        raise PrepError(f"{layout.path}:{i}: {len(cols)} columns ({shown(cols)}) where {why}; {fix}")


def _same_words(a: str, b: str) -> bool:
    norm = lambda t: re.sub(r"\W+", "", t).casefold()  # noqa: E731
    return norm(a) == norm(b)


def infer_third_column(path: Path, lines: list[tuple[int, list[str]]], delimiter: str) -> str | None:
    """What the third column holds in a file without a header, decided from all its lines (path-first or id-first
    alike): LJSpeech's normalized transcript (a sentence, or the same words as the text) or a speaker id (one token
    next to a sentence). None if no line has a third column. Lines that say both, or a file where no line tells,
    are refused: guessing wrong would train on "p225" as the transcript."""
    speaker_like, text_like, third_lines = [], [], []
    for i, cols in lines:
        if len(cols) != 3 or not cols[2]:
            continue
        third_lines.append((i, cols))
        text, third = cols[1], cols[2]
        if re.search(r"\s", third) or _same_words(text, third):
            text_like.append((i, third))
        elif re.search(r"\s", text):
            speaker_like.append((i, third))
    d = delimiter
    ask = f"add a header line 'id{d}text{d}speaker' or 'id{d}text{d}normalized' to say which"
    if speaker_like and text_like:
        (a, va), (b, vb) = speaker_like[0], text_like[0]
        raise PrepError(f"{path}:{a}: the third column reads as a speaker id here ({va!r}) and as normalized text on "
                        f"line {b} ({vb!r}); {ask}")
    if speaker_like:
        return SPEAKER
    if text_like:
        return NORMALIZED
    if third_lines:
        i, cols = third_lines[0]
        raise PrepError(f"{path}:{i}: cannot tell whether the third column is a speaker id or normalized text "
                        f"({d.join(cols)!r}: every transcript with a third column is one word); {ask}")
    return None


def is_audio_path(first: str) -> bool:
    return first.lower().endswith(AUDIO_EXTENSIONS) or "/" in first or os.sep in first


def find_audio(base_dir: str, key: str) -> str:
    """An id's clip: wavs/<id>.wav or .flac, else <id>.wav or .flac next to the list (the first that exists; if
    none does, where it is expected, for the missing-audio error)."""
    cands = [os.path.join(base_dir, "wavs", key + ext) for ext in (".wav", ".flac")]
    cands += [os.path.join(base_dir, key + ext) for ext in (".wav", ".flac")]
    for c in cands:
        if os.path.exists(c):
            return os.path.normpath(c)
    wavs = os.path.join(base_dir, "wavs")
    return os.path.normpath(cands[0] if os.path.isdir(wavs) else cands[2])


def parse_plain_line(cols: list[str], line_no: int, layout: ListLayout) -> PlainRow:
    """One line of data, its columns read as the file's layout says. Raises ManifestError."""
    d = layout.delimiter
    if len(cols) < 2:
        raise ManifestError(f"expected at least 2 {d!r}-separated columns ({layout.form()}), got {len(cols)}")
    first = cols[0]
    if not first:
        raise ManifestError("empty id/path column")
    extra = cols[2] if len(cols) == 3 and cols[2] else None
    text = extra if layout.third == NORMALIZED and extra else cols[1]
    speaker = extra if layout.third == SPEAKER else None
    if not text:
        raise ManifestError("empty transcript", "no_target")
    base = str(layout.path.parent)
    audio = resolve_path(first, base) if is_audio_path(first) else find_audio(base, first)
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


def pair_references(rows: list[PlainRow], usable: Callable[[str], bool] | None
                    ) -> tuple[dict[int, PlainRow | None], list[str]]:
    """`voice_clone_references` over the clips `usable` accepts (each clip checked once: a clip may be listed
    twice), and log notes naming the speakers left without a reference."""
    ok: dict[str, bool] = {}

    def row_usable(r: PlainRow) -> bool:
        if r.audio not in ok:
            ok[r.audio] = usable(r.audio)
        return ok[r.audio]

    refs = voice_clone_references(rows, row_usable if usable else None)
    lonely: dict[str | None, int] = {}
    for r in rows:
        if refs.get(r.line) is None and ok.get(r.audio, True):
            lonely[r.speaker] = lonely.get(r.speaker, 0) + 1
    notes = [f"--voice_clone: speaker {spk!r} has no other usable utterance: {n} utterance(s) prepared without a "
             f"reference" for spk, n in list(lonely.items())[:5]]
    if len(lonely) > 5:
        notes.append(f"--voice_clone: ... and {len(lonely) - 5} more speakers without a usable reference")
    return refs, notes
