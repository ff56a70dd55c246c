"""Manifests read into entries, without touching audio: ChatML `.jsonl` / `.json`, and which reader a file takes.

An entry is one manifest sample on its way to a shard: a `JsonlLine` (a `.jsonl` line, read and parsed by the
worker that makes its shard, so prep never holds the whole file), a `ChatmlEntry` (a parsed ChatML object: a
`.json` array element or a plain-list line turned into the TTS prompt) or a `BadEntry` (already known to be
unusable, recorded in prep_errors.jsonl). `line` is the 1-based line of the manifest file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PLAIN_EXT = (".csv", ".tsv", ".txt", ".list")


@dataclass(frozen=True, slots=True)
class JsonlLine:
    line: int
    offset: int  # byte offset of the line in the file
    length: int  # bytes, with its newline


@dataclass(frozen=True, slots=True)
class TableRow:
    line: int  # 1-based over all selected rows: the entry's order
    file: int  # index among the selected parquet files
    group: int  # row group in that file
    index: int  # row within the row group
    row: int  # 0-based row of the file (what errors name)


@dataclass(frozen=True, slots=True)
class ChatmlEntry:
    line: int
    obj: object  # as decoded from JSON: parse_chatml checks it


@dataclass(frozen=True, slots=True)
class BadEntry:
    line: int
    kind: str  # the prep_errors.jsonl category
    reason: str


Entry = JsonlLine | TableRow | ChatmlEntry | BadEntry


def manifest_kind(path: Path) -> str:
    """"jsonl", "json" (a JSON array), "plain" (an LJSpeech-style list) or "table" (parquet: a folder of them or one
    file), from the file's extension."""
    suf = path.suffix.lower()
    if path.is_dir() or suf == ".parquet":
        return "table"
    if suf == ".json":
        return "json"
    if suf in PLAIN_EXT:
        return "plain"
    return "jsonl"


def scan_jsonl(path: Path) -> list[JsonlLine]:
    """The non-blank lines of a .jsonl file, located without holding the file."""
    out = []
    pos = 0
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            if raw.strip():
                out.append(JsonlLine(i, pos, len(raw)))
            pos += len(raw)
    return out


def read_json_array(path: Path) -> list[Entry]:
    """Entries of a JSON-array manifest: a ChatmlEntry per element, a BadEntry where it breaks."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        return [BadEntry(line, "bad_text_encoding", f"manifest is not valid UTF-8 ({e.reason}); "
                                                    "no entries could be read")]
    text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark (editors on Windows write one): not content
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
        return [BadEntry(line_of(i), "bad_json", "a .json manifest must be a JSON array of samples")]
    i = skip_ws(i + 1)
    out: list[Entry] = []
    if i < n and text[i] == "]":
        return out
    while True:
        start = i
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            out.append(BadEntry(line_of(e.pos), "bad_json",
                                f"broken JSON ({e.msg}); the rest of the array could not be read"))
            return out
        out.append(ChatmlEntry(line_of(start), obj))
        i = skip_ws(i)
        if i < n and text[i] == ",":
            i = skip_ws(i + 1)
            continue
        if i < n and text[i] == "]":
            return out
        out.append(BadEntry(line_of(i), "bad_json", "expected ',' or ']' in the JSON array; "
                                                    "the rest of the array could not be read"))
        return out
