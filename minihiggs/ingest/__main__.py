"""`python -m minihiggs.ingest`: a folder of recordings -> OUT/wavs/, OUT/manifest.jsonl (ChatML for prep.py) and
OUT/ingest_report.jsonl (what was not kept, and why).

    python -m minihiggs.ingest --input recordings/ --out ingested/ --language en
    python prep.py --manifest ingested/manifest.jsonl --out data/shards

The work is `minihiggs.ingest.run.ingest`; bad input ends in one `ingest: error: ...` line (exit 2).
"""

from __future__ import annotations

import sys

from ..cli import parse_flags, run


def command(argv: list[str] | None) -> None:
    from .run import IngestConfig, ingest

    cfg = parse_flags(IngestConfig, argv, prog="python -m minihiggs.ingest", description=__doc__)
    ingest(cfg)


def main(argv: list[str] | None = None) -> int:
    return run("ingest", command, argv)


if __name__ == "__main__":
    sys.exit(main())
