#!/usr/bin/env python
"""prep.py — tokenize a manifest once, offline, into memory-mapped shards (`minihiggs.data.shards` format).

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
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from minihiggs.constants import DEFAULT_BASE_REPO as DEFAULT_BASE, DEFAULT_CODEC_REPO as DEFAULT_CODEC  # noqa: E402
from minihiggs.errors import UserError  # noqa: E402
from minihiggs.text.chatml import DEFAULT_SCENE  # noqa: E402


def parse_args(argv=None):
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
    from minihiggs.prep import PrepConfig, prepare

    cfg = PrepConfig(manifest=args.manifest, out=args.out, base_ckpt=args.base_ckpt, codec=args.codec,
                     workers=args.workers, shard_size=args.shard_size, max_tokens=args.max_tokens,
                     strict=args.strict, voice_clone=args.voice_clone, device=args.device,
                     scene_prompt=args.scene_prompt or None, overwrite=args.overwrite, progress=not args.no_progress)
    try:
        prepare(cfg)
    except UserError as e:
        print(f"prep: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
