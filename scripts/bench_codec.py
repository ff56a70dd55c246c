"""Throughput of the audio tokenizer: seconds of audio encoded / decoded per wall-clock second.

Prints one JSON object per line: encode and decode at batch 1 and batched (equal-length clips, which
encode_batch / decode_batch run in one forward); every line carries the peak RSS so far (and the CUDA
peak when a GPU is used), so the batch-1 lines show the batch-1 footprint. Weights default to the golden
tokenizer (random weights with the real architecture, materialised on first use); `--model` takes a
local directory or a Hub repo id such as bosonai/higgs-audio-v2-tokenizer.

    python scripts/bench_codec.py [--model PATH_OR_REPO] [--seconds 10] [--batch 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from minihiggs.codec import AudioTokenizer  # noqa: E402


def synthetic_clip(seconds: float, sr: int, seed: int) -> np.ndarray:
    """Speech-like test signal: a vibrato harmonic source with a syllable-rate envelope plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 110 + 15 * seed + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voice = sum(np.sin(k * phase) / k for k in range(1, 12))
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3.1 * t + seed)
    return (0.2 * voice * env + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def load(model: str | None, device: str) -> AudioTokenizer:
    if model:
        return AudioTokenizer.from_pretrained(model, device=device)
    from golden import CODEC_ROOT, materialized, variants

    found = variants(CODEC_ROOT)
    if not found:
        raise SystemExit(f"no golden tokenizer under {CODEC_ROOT}; pass --model PATH_OR_REPO")
    return AudioTokenizer.from_files(found[0] / "config.json", materialized(found[0]), device=device)


def timed(fn, repeats: int) -> float:
    """Best wall time of `repeats` runs: the least disturbed by other load on the machine."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="tokenizer dir or Hub repo id (default: golden test weights)")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--default_malloc", action="store_true", help="CPU: keep glibc's default mmap behaviour")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cpu" and not args.default_malloc:
        from minihiggs.codec.malloc import keep_large_allocations_in_heap

        keep_large_allocations_in_heap()  # as prep.py does for a CPU codec

    t = time.perf_counter()
    tok = load(args.model, args.device)

    def emit(**kv) -> None:
        kv["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # so far
        kv["loadavg_1m"] = round(os.getloadavg()[0], 2)  # other load on the machine skews wall times
        if torch.cuda.is_available():
            kv["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        print(json.dumps(kv), flush=True)

    emit(event="load", seconds=round(time.perf_counter() - t, 2), device=args.device, threads=args.threads)

    clips = [synthetic_clip(args.seconds, tok.sample_rate, seed) for seed in range(args.batch)]
    tok.encode(clips[0][: tok.sample_rate])  # warm-up: first-call kernel setup is not throughput
    codes: list[torch.Tensor] = []

    def enc1() -> None:
        codes[:] = [tok.encode(clips[0])]

    def enc_b() -> None:
        codes[:] = tok.encode_batch(clips, max_batch=args.batch)

    for batch, fn in ((1, enc1), (args.batch, enc_b)):
        s = timed(fn, args.repeats)
        emit(event="encode", batch=batch, audio_seconds=args.seconds * batch, wall_seconds=round(s, 3),
             audio_seconds_per_second=round(args.seconds * batch / s, 3))
    tok.decode(codes[0][:, :25])
    runs = ((1, lambda: tok.decode(codes[0])), (args.batch, lambda: tok.decode_batch(codes, max_batch=args.batch)))
    for batch, fn in runs:
        s = timed(fn, args.repeats)
        emit(event="decode", batch=batch, audio_seconds=args.seconds * batch, wall_seconds=round(s, 3),
             audio_seconds_per_second=round(args.seconds * batch / s, 3))

    emit(event="done")


if __name__ == "__main__":
    main()
