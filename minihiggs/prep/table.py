"""Hugging Face datasets as prep input: parquet tables (a folder of them, one file, or a Hub dataset repo) read
row group by row group with pyarrow (the optional extra `parquet`).

A row is one TTS sample: `--text_column` (the transcript), `--audio_column` (what `datasets` writes for an Audio
feature: a struct {"bytes", "path"}, the bytes used when present; or plain bytes; or a path, relative to the
parquet file's folder), and `--speaker_column` if given. Each row becomes the same upstream TTS prompt as a plain
list's line. `--split` keeps the files of one split: a path component named so (`train/...`) or a file name that
starts with it (`train-00000-of-00002.parquet`, as the Hub's dataset repos and `datasets` name them).

Rows are located when the table is scanned (file, row group, row: a `TableRow`), and read by the worker that makes
their shard, one row group at a time, so prep never holds more than a row group of audio. Errors name the parquet
file and the row's 0-based index in it, as `datasets` counts rows.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import ManifestError, PrepError
from ..text.chatml import resolve_path, tts_sample
from .manifest import TableRow

DATASET_PATTERNS = ["*.parquet"]


@dataclass(frozen=True)
class TableSpec:
    """The selected parquet files and how their rows read (pickled into each worker)."""

    files: tuple[Path, ...]
    audio_column: str
    text_column: str
    speaker_column: str | None
    scene: str | None

    def place(self, row: TableRow) -> dict:
        """Where a row is, for prep_errors.jsonl and the shard records."""
        return {"manifest": str(self.files[row.file]), "row": row.row}

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for f in self.files:
            st = f.stat()
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()


def parquet_import():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PrepError("reading parquet tables needs pyarrow: pip install 'minihiggs[parquet]' "
                        "(or pip install pyarrow)") from None
    return pq


def select_files(root: Path, split: str | None) -> tuple[Path, ...]:
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*.parquet") if p.is_file())
    if split:
        def in_split(p: Path) -> bool:
            rel = p.relative_to(root).parts if p != root else (p.name,)
            return split in rel[:-1] or rel[-1].startswith((f"{split}-", f"{split}."))
        files = [p for p in files if in_split(p)]
    if not files:
        raise PrepError(f"{root}: no parquet files" + (f" of split {split!r}" if split else ""))
    return tuple(files)


def scan_table(spec: TableSpec) -> list[TableRow]:
    """Every row of the selected files, located (from the footers: no data is read); the columns checked."""
    pq = parquet_import()
    rows: list[TableRow] = []
    line = 0
    for k, path in enumerate(spec.files):
        try:
            pf = pq.ParquetFile(str(path))
        except Exception as e:
            raise PrepError(f"{path}: cannot read the parquet file ({type(e).__name__}: {e})") from None
        names = pf.schema_arrow.names
        for flag, col in (("--audio_column", spec.audio_column), ("--text_column", spec.text_column),
                          ("--speaker_column", spec.speaker_column)):
            if col is not None and col not in names:
                raise PrepError(f"{path}: {flag} {col!r} is not a column of the table (columns: {', '.join(names)})")
        row = 0
        for g in range(pf.metadata.num_row_groups):
            for j in range(pf.metadata.row_group(g).num_rows):
                line += 1
                rows.append(TableRow(line, k, g, j, row))
                row += 1
    return rows


class TableReader:
    """A worker's view of the tables: `sample(row)` -> the row's ChatML object, one row group held at a time."""

    def __init__(self, spec: TableSpec):
        self.spec = spec
        self.pq = parquet_import()
        self.key: tuple[int, int] | None = None
        self.group: dict[str, list] = {}

    def columns(self) -> list[str]:
        s = self.spec
        return [c for c in (s.audio_column, s.text_column, s.speaker_column) if c is not None]

    def load(self, row: TableRow) -> None:
        if self.key != (row.file, row.group):
            pf = self.pq.ParquetFile(str(self.spec.files[row.file]))
            self.group = pf.read_row_group(row.group, columns=self.columns()).to_pydict()
            self.key = (row.file, row.group)

    def sample(self, row: TableRow) -> dict:
        """Raises ManifestError for a row that cannot be a sample."""
        self.load(row)
        s = self.spec
        text = self.group[s.text_column][row.index]
        if not isinstance(text, str):
            raise ManifestError(f"{s.text_column!r} is {type(text).__name__}, expected a string", "no_target")
        if not text.strip():
            raise ManifestError(f"empty transcript in {s.text_column!r}", "no_target")
        speaker = self.group[s.speaker_column][row.index] if s.speaker_column else None
        obj = tts_sample(text.strip(), "", scene=s.scene, speaker=None if speaker is None else str(speaker),
                         sample_id=f"{self.spec.files[row.file].name}:{row.row}")
        obj["messages"][-1]["content"] = [self.audio_item(self.group[s.audio_column][row.index], row)]
        return obj

    def audio_item(self, value, row: TableRow) -> dict:
        """{"bytes", "path"} struct, bytes, or a path -> a ChatML audio item (raw_audio or audio_url)."""
        col = self.spec.audio_column
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray)) and value:
            return {"type": "audio", "raw_audio": base64.b64encode(bytes(value)).decode("ascii")}
        if isinstance(value, str) and value:
            return {"type": "audio", "audio_url": resolve_path(value, str(self.spec.files[row.file].parent))}
        raise ManifestError(f"{col!r} holds no audio (neither bytes nor a path)", "missing_audio")
