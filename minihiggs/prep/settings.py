"""The settings of a prep run: the user's (`PrepConfig`, prep.py's flags, each default declared here once), the
checkpoint's (`ModelSettings`, read from its config.json) and what a worker process gets (`WorkerSettings`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..cli import flag as _flag
from ..constants import DEFAULT_BASE_REPO, DEFAULT_CODEC_REPO
from ..errors import PrepError
from ..text.chatml import DEFAULT_SCENE
from .table import TableSpec


@dataclass
class PrepConfig:
    """Everything a prep run depends on (the command-line flags of prep.py)."""

    manifest: str = _flag(help=".jsonl / .json ChatML, .csv / .tsv / .txt / .list plain list, or parquet tables "
                               "(a folder, a .parquet file or a Hub dataset id)")
    out: str = _flag(help="output directory of shards")
    base_ckpt: str = _flag(DEFAULT_BASE_REPO, "checkpoint dir or hub repo id (config.json + tokenizer files)")
    codec: str = _flag(DEFAULT_CODEC_REPO, "audio tokenizer dir or repo id")
    workers: int = _flag(1, "worker processes (each takes whole shards)", type=int)
    shard_size: int = _flag(1000, "manifest entries per shard", type=int)
    max_tokens: int | None = _flag(None, "skip samples whose merged length exceeds this (default: 4096, checked "
                                         "from the file headers before decoding)", type=int)
    strict: bool = _flag(False, "fail (no index.json) if any entry is skipped", action="store_true")
    voice_clone: bool = _flag(False, "plain lists only: pair each utterance with another utterance of the same "
                                     "speaker as the voice reference", action="store_true")
    scene_prompt: str | None = _flag(DEFAULT_SCENE, "plain lists: scene description in the system prompt ('' for "
                                                    "none)")
    audio_column: str = _flag("audio", "tables: the audio column (datasets' {bytes, path} struct, bytes or a path)")
    text_column: str = _flag("text", "tables: the transcript column")
    speaker_column: str | None = _flag(None, "tables: the speaker column (default: none)")
    split: str | None = _flag(None, "tables: only the files of this split (a folder or file name prefix: train, "
                                    "validation, ...; default: every parquet file)")
    device: str | None = _flag(None, "codec device (default: cuda when available, else cpu)")
    overwrite: bool = _flag(False, "delete shards made with other settings in --out", action="store_true")
    progress: bool = _flag(True, "no progress bar", option="--no_progress", action="store_false")


@dataclass(frozen=True)
class ModelSettings:
    """The checkpoint config fields prep needs; recorded as they are in prep_state.json and index.json."""

    num_codebooks: int
    vocab_size: int
    codebook_size: int
    audio_in_token_id: int
    audio_out_token_id: int
    whisper: bool  # store Whisper log-mel features for audio-in clips
    columns_per_segment: int  # merged-length columns a code segment adds besides its frames

    def record(self) -> dict:
        return dataclasses.asdict(self)


def model_settings(config: dict) -> ModelSettings:
    """Read by the same `HiggsConfig.from_dict` the trainer uses (so an absent field means the same thing on both
    sides: the model's defaults, e.g. no Whisper tower and 8 codebooks)."""
    from ..config import HiggsConfig
    from ..errors import ConfigError

    try:
        cfg = HiggsConfig.from_dict(config)
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise PrepError(f"config.json of --base_ckpt: {e}") from None
    return ModelSettings(num_codebooks=int(cfg.audio_num_codebooks), vocab_size=int(cfg.text.vocab_size),
                         codebook_size=int(cfg.audio_codebook_size), audio_in_token_id=int(cfg.audio_in_token_id),
                         audio_out_token_id=int(cfg.audio_out_token_id), whisper=bool(cfg.uses_whisper_features),
                         columns_per_segment=int(cfg.extra_audio_columns))


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker needs to turn a shard's entries into a shard (pickled once into each worker process)."""

    out: Path
    manifest: Path
    tokenizer_dir: Path
    codec: str
    device: str
    max_tokens: int | None
    model: ModelSettings
    codec_batch_clips: int  # clips per codec call
    threads: int  # torch threads of a worker process
    parent_pid: int | None = None  # the prep process, which a pool worker must not outlive
    table: TableSpec | None = None  # parquet input: the files and columns (then `manifest` is their folder)

    @property
    def base_dir(self) -> str:
        """The folder that relative paths in the manifest resolve against."""
        return str(self.manifest.parent)

    def place(self, entry) -> dict:
        """Where an entry is, for prep_errors.jsonl and the shard records: the manifest and line, or for a table
        row its parquet file and row."""
        if self.table is not None:
            return self.table.place(entry)
        return {"manifest": str(self.manifest), "line": int(entry.line)}
