"""The eval outputs: per-utterance rows -> a summary per model, `utterances.jsonl`, `summary.json`, the table
(`summary.md`, also logged) and `eval.png` (bars per model; only with matplotlib, an optional extra).

Aggregates: WER and CER pool the edits over all utterances (sum of edits / sum of reference lengths), SIM and
the rest are means over the utterances that have them; `eos` is the share of clips the model ended itself,
`flagged` the share with any cheap-signal flag; `rtf` is total generation time over total generated audio.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..fsio import atomic_write_bytes

COLUMNS = [("wer", "WER %", 100), ("cer", "CER %", 100), ("sim", "SIM", 1), ("sim_truth", "SIM truth", 1),
           ("duration_ratio", "dur ratio", 1), ("silence", "silence %", 100), ("eos", "EOS %", 100),
           ("repeated", "repeat %", 100), ("flagged", "flagged %", 100), ("rtf", "RTF", 1)]


def _mean(values) -> float | None:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if v else None


def summarize(rows: list[dict], labels: list[str]) -> dict:
    out = {}
    for label in labels:
        r = [x for x in rows if x["model"] == label]
        ref_words, ref_chars = sum(x["ref_words"] for x in r), sum(x["ref_chars"] for x in r)
        audio = sum(x["seconds"] for x in r)
        out[label] = {
            "utterances": len(r),
            "wer": sum(x["word_edits"] for x in r) / ref_words if ref_words else None,
            "cer": sum(x["char_edits"] for x in r) / ref_chars if ref_chars else None,
            "sim": _mean(x["sim"] for x in r),
            "sim_truth": _mean(x["sim_truth"] for x in r),
            "duration_ratio": _mean(x["duration_ratio"] for x in r),
            "silence": _mean(x["silence"]["total"] for x in r),
            "eos": _mean(float(x["stop_reason"] == "eos") for x in r),
            "repeated": _mean(x["repeated_frame_ratio"] for x in r),
            "flagged": _mean(float(bool(x["flags"])) for x in r),
            # each clip's rtf is its batch's time / audio, so this is total time / total audio
            "rtf": sum(x["rtf"] * x["seconds"] for x in r if x["seconds"]) / audio if audio else None,
            "seconds": audio,
        }
    return out


def table(summary: dict) -> str:
    head = "| model | n | " + " | ".join(name for _, name, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for label, m in summary.items():
        cells = ["-" if m[k] is None else f"{m[k] * scale:.2f}" for k, _, scale in COLUMNS]
        lines.append(f"| {label} | {m['utterances']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = [c for c in COLUMNS if c[0] != "rtf"]
    fig = Figure(figsize=(3 * len(keys) / 2, 6))
    FigureCanvasAgg(fig)
    labels = list(summary)
    for i, (key, name, scale) in enumerate(keys):
        ax = fig.add_subplot(2, math.ceil(len(keys) / 2), i + 1)
        ax.bar(range(len(labels)), [(summary[m][key] or 0.0) * scale for m in labels], color="C0")
        ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
        ax.set_title(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_reports(out: Path, rows: list[dict], summary: dict, log) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "utterances.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                         for r in rows).encode())
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=1).encode())
    text = table(summary)
    atomic_write_bytes(out / "summary.md", (text + "\n").encode())
    log(text)
    try:
        plot(summary, out / "eval.png")
    except ImportError:
        log("no eval.png: matplotlib is not installed (pip install matplotlib)")
