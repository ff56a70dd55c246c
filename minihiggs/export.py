"""`python -m minihiggs.export`: merge a LoRA adapter into its base checkpoint and write a full checkpoint.

    python -m minihiggs.export --adapter runs/me/final --out runs/me/merged [--base PATH_OR_REPO] [--max_shard_size 5GB]

The merge itself is `minihiggs.lora.export.export_merged` (streamed, one tensor at a time).
"""

from __future__ import annotations

import argparse
import sys

from .errors import UserError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minihiggs.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", required=True, help="adapter directory (adapter_config.json + "
                                                      "adapter_model.safetensors) or Hub repo id")
    ap.add_argument("--out", required=True, help="output checkpoint directory")
    ap.add_argument("--base", default=None, help="base checkpoint directory or Hub repo id (default: the "
                                                 "adapter's base_model_name_or_path)")
    ap.add_argument("--max_shard_size", default="5GB", help="largest shard, e.g. 5GB, 500MB (default 5GB)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out directory")
    args = ap.parse_args(argv)
    from .lora.export import export_merged

    try:
        export_merged(args.adapter, args.out, base=args.base, max_shard_size=args.max_shard_size,
                      overwrite=args.overwrite)
    except (UserError, ValueError, KeyError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"export: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
