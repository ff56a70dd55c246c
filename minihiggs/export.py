"""`python -m minihiggs.export`: merge a LoRA adapter into its base checkpoint and write a full checkpoint.

    python -m minihiggs.export --adapter runs/me/final --out runs/me/merged [--base_ckpt PATH_OR_REPO[@REV]]
        [--layout transformers|legacy] [--max_shard_size 5GB]

The output is in the base's layout unless --layout says otherwise: `transformers` loads with transformers'
`HiggsAudioV2ForConditionalGeneration.from_pretrained`, `legacy` with boson-ai's `HiggsAudioModel`; minihiggs
loads both. The merge itself is `minihiggs.lora.export.export_merged` (streamed, one tensor at a time).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from .cli import flag, parse_flags, run
from .constants import DEFAULT_CODEC_REPO
from .errors import OutputError, UserError
from .layouts import LAYOUTS

PROG = "export"


@dataclass
class ExportArgs:
    adapter: str = flag(help="adapter directory (adapter_config.json + adapter_model.safetensors) or Hub repo "
                             "id[@revision]")
    out: str = flag(help="output checkpoint directory")
    base_ckpt: str | None = flag(None, "base checkpoint directory or Hub repo id[@revision] (default: the "
                                       "adapter's base_model_name_or_path)", aliases=("--base",))
    layout: str | None = flag(None, "layout of the output (default: the base's)", choices=LAYOUTS)
    codec: str = flag(DEFAULT_CODEC_REPO, "audio tokenizer a transformers-layout export of a legacy base names "
                                          "in processor_config.json")
    max_shard_size: str = flag("5GB", "largest shard, e.g. 5GB, 500MB")
    overwrite: bool = flag(False, "replace an existing non-empty --out directory")
    quantize: str | None = flag(None, "the adapter was trained with --quantize nf4|int8: merge into the weights as "
                                      "that run saw them (dequantized)", choices=["nf4", "int8"])


def export(argv: list[str] | None) -> None:
    args = parse_flags(ExportArgs, argv, prog="python -m minihiggs.export", description=__doc__.split("\n\n")[0])
    from .lora.export import export_merged

    try:
        export_merged(args.adapter, args.out, base=args.base_ckpt, max_shard_size=args.max_shard_size,
                      overwrite=args.overwrite, layout=args.layout, codec=args.codec,
                      quantize=args.quantize)
    except UserError:
        raise  # (some are OSErrors too, e.g. a missing directory: their message is already right)
    except OSError as e:  # a full disk or an unwritable --out: the file and the reason, not a traceback
        raise OutputError(f"{e.filename or args.out}: {e.strerror or e}") from e


def main(argv: list[str] | None = None) -> int:
    return run(PROG, export, argv)


if __name__ == "__main__":
    sys.exit(main())
