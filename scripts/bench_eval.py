"""Scoring cost: seconds of scorer time per second of scored audio (`make bench-eval`; a benchmark, not a test).

One JSON line per (scorer, shape): Whisper ASR (log-mel + encoder + greedy decoder, batched) and the WavLM
x-vector (one clip at a time), on random weights of the named shape. A random Whisper never says
<|endoftext|>, so the decoder is given the token budget of real speech (TOKENS_PER_SECOND of audio, ~150 words a
minute) instead of running to its limit.

    python scripts/bench_eval.py                                  # CPU: tiny and base shapes
    python scripts/bench_eval.py --shape large-v3 --device cuda   # the default ASR's shape on a GPU (bf16)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minihiggs.audio.mel import log_mel_batch  # noqa: E402
from minihiggs.eval.asr import Transcriber  # noqa: E402
from minihiggs.eval.speaker import SpeakerScorer  # noqa: E402
from minihiggs.eval.tiny import write_tiny_asr, write_tiny_speaker  # noqa: E402

TOKENS_PER_SECOND = 3.5
WHISPER = {
    "tiny": {},
    "base": dict(vocab_size=51866, d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048,
                 decoder_layers=6, decoder_attention_heads=8, decoder_ffn_dim=2048, max_target_positions=448),
    "large-v3": dict(vocab_size=51866, d_model=1280, encoder_layers=32, encoder_attention_heads=20,
                     encoder_ffn_dim=5120, decoder_layers=32, decoder_attention_heads=20, decoder_ffn_dim=5120,
                     max_target_positions=448),
}
WHISPER["large-v3-turbo"] = dict(WHISPER["large-v3"], decoder_layers=4)
SPEAKER = {  # wavlm-base-plus-sv's shape for every shape but tiny
    "tiny": {},
    "base-plus": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                      conv_dim=[512] * 7, num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16,
                      tdnn_dim=[512, 512, 512, 512, 1500], xvector_output_dim=512),
}


def clips(n: int, seconds: float) -> list[np.ndarray]:
    g = np.random.default_rng(0)
    return [(0.1 * g.standard_normal(int(16000 * seconds))).astype(np.float32) for _ in range(n)]


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench_asr(shape: str, device: str, dtype, n: int, seconds: float, tmp: Path) -> dict:
    asr = Transcriber(write_tiny_asr(tmp / f"asr-{shape}", **WHISPER[shape]), device=device, dtype=dtype,
                      max_new_tokens=max(1, round(TOKENS_PER_SECOND * seconds)))
    waves = clips(n, seconds)
    asr.decode_features(log_mel_batch(waves[:1])[0])  # warm-up
    sync(device)
    t0 = time.perf_counter()
    feats, _ = log_mel_batch(waves, device=device)
    out = asr.decode_features(feats)
    sync(device)
    dt = time.perf_counter() - t0
    assert all(len(t) == asr.max_new_tokens for t in out.tokens)
    return {"scorer": "whisper", "shape": shape, "device": device, "dtype": str(dtype).removeprefix("torch."),
            "clips": n, "clip_s": seconds, "tokens_per_clip": asr.max_new_tokens,
            "s_per_audio_s": round(dt / (n * seconds), 4)}


def bench_sv(shape: str, device: str, n: int, seconds: float, tmp: Path) -> dict:
    sv = SpeakerScorer(write_tiny_speaker(tmp / f"sv-{shape}", **SPEAKER[shape]), device=device)
    waves = clips(n, seconds)
    sv.embed(waves[0])
    sync(device)
    t0 = time.perf_counter()
    for w in waves:
        sv.embed(w)
    sync(device)
    dt = time.perf_counter() - t0
    return {"scorer": "wavlm-xvector", "shape": shape, "device": device, "clips": n, "clip_s": seconds,
            "s_per_audio_s": round(dt / (n * seconds), 4)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", action="append", help="whisper shapes (tiny, base, large-v3, large-v3-turbo)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5.0)
    a = ap.parse_args()
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    shapes = a.shape or ["tiny", "base"]
    with tempfile.TemporaryDirectory() as d:
        for shape in shapes:
            print(json.dumps(bench_asr(shape, a.device, dtype, a.clips, a.seconds, Path(d))), flush=True)
        for shape in ("tiny", "base-plus"):
            print(json.dumps(bench_sv(shape, a.device, a.clips, a.seconds, Path(d))), flush=True)


if __name__ == "__main__":
    main()
