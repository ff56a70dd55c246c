"""Render a training run's loss curves: `python scripts/plot_metrics.py RUN_DIR [--out PNG]` (`make plot OUT=RUN_DIR`).

Reads RUN_DIR/metrics.jsonl (written by train.py) and writes RUN_DIR/loss.png: total train/validation loss, the
text and audio parts, the validation loss per codebook (minihiggs/metrics/plot.py). Needs matplotlib (an optional
extra; `make plot` installs it into the venv).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minihiggs.metrics.jsonl import read_metrics, series  # noqa: E402
from minihiggs.metrics.plot import MATPLOTLIB_NOTE, have_matplotlib, render_metrics_png  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="train.py --output_dir (or a metrics.jsonl file)")
    ap.add_argument("--out", default=None, help="PNG path (default RUN_DIR/loss.png)")
    args = ap.parse_args(argv)
    src = Path(args.run_dir)
    metrics = src if src.is_file() else src / "metrics.jsonl"
    if not metrics.is_file():
        print(f"plot_metrics.py: error: {metrics} not found (make plot OUT=<train.py --output_dir>)", file=sys.stderr)
        return 2
    if not have_matplotlib():
        print(f"plot_metrics.py: error: {MATPLOTLIB_NOTE}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else metrics.parent / "loss.png"
    render_metrics_png(metrics, out)
    recs = read_metrics(metrics)
    for split in ("train", "val"):
        steps, vals = series(recs, split)
        if steps:
            print(f"{split}: {len(steps)} points, loss {vals[0]:.4f} (step {steps[0]}) -> {vals[-1]:.4f} "
                  f"(step {steps[-1]}), min {min(vals):.4f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
