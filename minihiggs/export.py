"""`python -m minihiggs.export`: merge a LoRA adapter into its base checkpoint and write a full checkpoint.

    python -m minihiggs.export --adapter runs/me/final --out runs/me/merged [--base_ckpt PATH_OR_REPO[@REV]]
        [--layout transformers|legacy] [--max_shard_size 5GB]

The output is in the base's layout unless --layout says otherwise: `transformers` loads with transformers'
`HiggsAudioV2ForConditionalGeneration.from_pretrained`, `legacy` with boson-ai's `HiggsAudioModel`; minihiggs
loads both. The merge itself is `minihiggs.lora.export.export_merged` (streamed, one tensor at a time).
"""

from __future__ import annotations

import argparse
import sys

from .constants import DEFAULT_CODEC_REPO
from .errors import UserError
from .layouts import LAYOUTS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minihiggs.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", required=True, help="adapter directory (adapter_config.json + "
                                                      "adapter_model.safetensors) or Hub repo id[@revision]")
    ap.add_argument("--out", required=True, help="output checkpoint directory")
    ap.add_argument("--base_ckpt", "--base", dest="base", default=None,
                    help="base checkpoint directory or Hub repo id[@revision] (default: the adapter's "
                         "base_model_name_or_path)")
    ap.add_argument("--layout", choices=LAYOUTS, default=None, help="layout of the output (default: the base's)")
    ap.add_argument("--codec", default=DEFAULT_CODEC_REPO, help="audio tokenizer a transformers-layout export of a "
                                                                 "legacy base names in processor_config.json")
    ap.add_argument("--max_shard_size", default="5GB", help="largest shard, e.g. 5GB, 500MB (default 5GB)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out directory")
    args = ap.parse_args(argv)
    from .lora.export import export_merged

    try:
        export_merged(args.adapter, args.out, base=args.base, max_shard_size=args.max_shard_size,
                      overwrite=args.overwrite, layout=args.layout, codec=args.codec)
    except (UserError, ValueError, KeyError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"export: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
