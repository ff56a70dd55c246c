"""Peak memory of `python -m minihiggs.ingest` on one long synthetic recording, without the ASR (--asr none:
segmentation, the audio checks, resampling and the writes). Prints one JSON line.

    .venv/bin/python scripts/bench_ingest.py --hours 2 --dir /tmp/bench_ingest

The recording (16 kHz mono 16-bit: speech-like bursts of 1-8 s between pauses of 0.3-1.5 s) is written block by
block, and the ingest runs in a child process so that its peak RSS (ru_maxrss of the children) is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

SR = 16000


def write_recording(path: Path, hours: float, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with sf.SoundFile(str(path), "w", SR, 1, subtype="PCM_16") as f:
        written = 0
        while written < hours * 3600 * SR:
            n = int(rng.uniform(1, 8) * SR)
            t = np.arange(n) / SR
            x = sum(np.sin(2 * np.pi * k * rng.uniform(110, 160) * t) / k for k in range(1, 6))
            x = 0.2 * x * (0.65 + 0.35 * np.sin(2 * np.pi * 4 * t)) + 0.01 * rng.standard_normal(n)
            gap = 1e-4 * rng.standard_normal(int(rng.uniform(0.3, 1.5) * SR))
            f.write(np.concatenate([x, gap]).astype(np.float32))
            written += n + len(gap)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hours", type=float, default=2.0)
    ap.add_argument("--dir", default="/tmp/bench_ingest")
    args = ap.parse_args()
    d = Path(args.dir)
    (d / "in" / "speaker").mkdir(parents=True, exist_ok=True)
    rec = d / "in" / "speaker" / "long.wav"
    if not rec.exists():
        write_recording(rec, args.hours)
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "minihiggs.ingest", "--input", str(d / "in"), "--out", str(d / "out"),
                    "--asr", "none", "--no_progress", "--overwrite"], check=True)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    lines = (d / "out" / "manifest.jsonl").read_text().count("\n")
    print(json.dumps({"bench": "ingest", "asr": "none", "hours": args.hours, "file_mb": rec.stat().st_size / 2**20,
                      "peak_rss_mb": round(peak_mb, 1), "seconds": round(time.time() - t0, 1), "segments": lines,
                      "decoded_whole_mb": round(args.hours * 3600 * SR * 4 / 2**20, 1)}))


if __name__ == "__main__":
    main()
