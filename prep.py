#!/usr/bin/env python
"""prep.py — tokenize a manifest once, offline, into memory-mapped shards (`minihiggs.data.shards` format).

    python prep.py --manifest data/train.jsonl --out data/prepared
    python prep.py --manifest LJSpeech-1.1/metadata.csv --out data/lj --voice_clone --workers 4
    python prep.py --manifest user/dataset --split train --text_column sentence --out data/hf

Manifests:
* ChatML `.jsonl` (one object per line) or `.json` (an array): `{"messages": [...], "speaker", "start_index",
  "misc", "id"}`; content is a string or a list of `{"type": "text", "text"}` / `{"type": "audio", "audio_url"}`
  items (also `raw_audio`, `offset`, `duration`, and `audio_codes`: a .npy of int codes [codebooks, frames],
  which avoids loading the codec). Relative paths resolve against the manifest's folder.
* A plain list `.csv` / `.tsv` / `.txt` / `.list`: `id|text`, `id|text|normalized`, `id|text|speaker`,
  `path|text` or `path|text|speaker` (rules: minihiggs/prep/plain_list.py), turned into the upstream TTS prompt
  (`--voice_clone`: paired with another utterance of the same speaker as the reference). A list that does not
  read one way only (a third column that may be a speaker or a transcript, more columns than its form, an
  unquoted comma in a comma-separated transcript) is refused, naming the line.
* Hugging Face datasets: a folder of `.parquet` files, one `.parquet` file or a Hub dataset id, with
  `--audio_column` / `--text_column` / `--speaker_column` / `--split` (rules: minihiggs/prep/table.py; needs
  pyarrow); a bad row is recorded with its parquet file and row instead of a line.

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

Bad input (a manifest that cannot be read, changed settings, nothing usable, --strict with skipped entries): one
`prep: error:` line, exit 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from minihiggs.cli import parse_flags, run  # noqa: E402
from minihiggs.prep import PrepConfig  # noqa: E402

PROG = "prep"


def parse_args(argv=None) -> PrepConfig:
    """The flags are PrepConfig's fields: their defaults and help are declared there."""
    return parse_flags(PrepConfig, argv, prog="prep.py", description=__doc__.split("\n\n")[0])


def main(argv=None) -> int:
    from minihiggs.prep import prepare

    def prep(args) -> None:
        prepare(parse_args(args))  # (its summary is printed as it goes; the exit code is run's rule)

    return run(PROG, prep, argv)


if __name__ == "__main__":
    sys.exit(main())
