"""Loss curves from metrics.jsonl to a PNG, drawn with matplotlib (an optional extra).

Four panels: the total loss (train line, validation line with dots), its text / audio parts, the validation audio
loss per codebook, and the validation teacher-forced top-1 audio accuracy per codebook (with its mean). The trainer
redraws `loss.png` at every validation, so a running job can be looked at; without matplotlib there is no PNG
(`MATPLOTLIB_NOTE` says how to get one). Only matplotlib's object API is used (a `Figure` with the Agg canvas, no
pyplot): no global backend switch, no GUI.
"""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

from ..fsio import atomic_write_bytes
from .jsonl import read_metrics, series

MATPLOTLIB_NOTE = ("no loss.png: matplotlib is not installed (pip install matplotlib, or pip install -r "
                   "requirements-extras.txt; then `make plot OUT=<output_dir>` draws it from metrics.jsonl)")


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def render_metrics_png(metrics_path: str | Path, out_path: str | Path) -> Path:
    """Render the train/val curves of a metrics.jsonl into a PNG (written atomically); returns its path.
    Raises ImportError without matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    recs = read_metrics(metrics_path)
    fig = Figure(figsize=(20, 4.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    total, parts, per_cb, acc = fig.subplots(1, 4)

    def draw(ax, split: str, key: str, label: str, **kw) -> None:
        steps, values = series(recs, split, key)
        if steps:
            ax.plot(steps, values, label=label, marker="o" if split == "val" else None, markersize=3, **kw)

    draw(total, "train", "loss", "train")
    draw(total, "val", "loss", "val")
    total.set_title("total loss")
    draw(parts, "train", "text_loss", "train text", color="C0")
    draw(parts, "train", "audio_loss", "train audio", color="C2")
    draw(parts, "val", "text_loss", "val text", color="C4", linestyle="--")
    draw(parts, "val", "audio_loss", "val audio", color="C3", linestyle="--")
    parts.set_title("text / audio loss")
    def draw_per_codebook(ax, key: str) -> None:
        val = [r for r in recs if r.get("split") == "val" and isinstance(r.get(key), list)]
        by_step = {int(r["step"]): r[key] for r in val}  # the last record of a step wins
        steps = sorted(by_step)
        for k in range(len(by_step[steps[-1]]) if steps else 0):
            ax.plot(steps, [by_step[s][k] if k < len(by_step[s]) else float("nan") for s in steps],
                    marker="o", markersize=3, label=f"codebook {k}", linewidth=1)

    draw_per_codebook(per_cb, "audio_loss_per_codebook")
    per_cb.set_title("val audio loss per codebook")
    draw_per_codebook(acc, "audio_acc_per_codebook")
    draw(acc, "val", "audio_acc", "mean", color="black", linewidth=2.5)
    acc.set_title("val audio top-1 accuracy (teacher-forced)")
    for ax in (total, parts, per_cb, acc):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    out_path = Path(out_path)
    atomic_write_bytes(out_path, buf.getvalue())  # a viewer polling the file never sees half a PNG
    return out_path
