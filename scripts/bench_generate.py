"""Generation throughput: audio frames per second and real-time factor of `minihiggs.generate.Engine`.

    python scripts/bench_generate.py              # `small` shape on CPU, batch 1 and 8 (`make bench-generate`)
    python scripts/bench_generate.py --shape 3b --device cuda --batch 1 8

Random weights with the chosen shape (no download), a 128-token TTS prompt per row, upstream's serve-engine
sampling (temperature 0.7, top-p 0.95, RAS 7/2), each row with its own seed. The stream-EOS logits are masked
so that every row decodes exactly --frames audio columns (random weights would otherwise end or wander into
text mode at random points; a step's cost does not depend on the weights). One JSON line per configuration:
frames/s summed over the batch, per row, x real time (frames/s / 25) and the real-time factor (wall / audio),
prefill and per-step times.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minihiggs import HiggsConfig  # noqa: E402
from minihiggs.constants import CODE_FRAMES_PER_SECOND  # noqa: E402
from minihiggs.generate import Engine, Request, SamplingConfig  # noqa: E402
from minihiggs.generate.prompt import Prompt  # noqa: E402
from minihiggs.model.higgs import HiggsAudioModel  # noqa: E402
from minihiggs.model.tiny import tiny_config  # noqa: E402

SHAPES = {
    "tiny": dict(hidden=64, layers=4, heads=4, kv_heads=2, intermediate=160, dual_layers=(0, 2)),
    "small": dict(hidden=512, layers=8, heads=8, kv_heads=2, intermediate=1408, dual_layers=tuple(range(8))),
    # The released 3B checkpoint (Llama-3.2-3B backbone, DualFFN in every layer).
    "3b": dict(hidden=3072, layers=28, heads=24, kv_heads=8, intermediate=8192, dual_layers=tuple(range(28))),
}


def build_model(shape: str, device: torch.device, dtype: torch.dtype) -> HiggsAudioModel:
    cfg = HiggsConfig.from_dict(tiny_config(**SHAPES[shape]))
    torch.manual_seed(0)
    with torch.device(device):
        model = HiggsAudioModel(cfg)
    model.reset_buffers()
    model = model.to(dtype).eval().requires_grad_(False)
    eos = torch.tensor([cfg.audio_stream_eos_id], device=device)  # (made here: no host copy inside a CUDA graph)
    head = model.audio_logits

    def no_eos(rows: torch.Tensor) -> torch.Tensor:  # every row decodes exactly --frames columns
        return head(rows).index_fill_(-1, eos, -float("inf"))

    model.audio_logits = no_eos
    return model


def tts_prompt_ids(n: int, g: torch.Generator) -> list[int]:
    head = [128000, 128006, 882, 128007, 271]
    tail = [128009, 128006, 78191, 128007, 271, 128013]
    return head + torch.randint(0, 128000, (n - len(head) - len(tail),), generator=g).tolist() + tail


def run(engine: Engine, batch: int, prompt: int, frames: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    reqs = [Request(Prompt(tts_prompt_ids(prompt, g)),
                    SamplingConfig(temperature=0.7, top_p=0.95, ras_win_len=7, ras_win_max_num_repeat=2, seed=seed + i),
                    max_new_tokens=frames + 1) for i in range(batch)]
    marks: list[float] = []
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)

    def on_step(active: int) -> None:
        marks.append(time.perf_counter())

    sync()
    t0 = time.perf_counter()
    gens = engine.generate(reqs, on_step=on_step)
    sync()
    t1 = time.perf_counter()
    cols = sum(a.shape[1] - 1 for gen in gens for a in gen.audio)  # generated columns (BOS column excluded)
    assert cols == batch * frames, (cols, batch, frames)
    decode = t1 - marks[0]
    fps = cols / decode
    return {"prefill_s": round(marks[0] - t0, 4), "decode_s": round(decode, 4),
            "ms_per_step": round(1000 * decode / frames, 3), "frames_per_s": round(fps, 1),
            "frames_per_s_per_row": round(fps / batch, 1), "x_realtime": round(fps / CODE_FRAMES_PER_SECOND, 2),
            "rtf": round(decode / (cols / batch / CODE_FRAMES_PER_SECOND), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens per row")
    ap.add_argument("--frames", type=int, default=200, help="audio columns decoded per row")
    ap.add_argument("--threads", type=int, nargs="+", default=sorted({1, min(2, os.cpu_count() or 1)}),
                    help="CPU thread counts to measure (on a shared machine 1 thread is often faster: busy cores make "
                         "the second thread's spin-waits expensive)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per configuration (the best is reported)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if dev.type == "cuda" else "fp32")]
    engine = Engine(build_model(args.shape, dev, dtype))
    for threads in args.threads if dev.type == "cpu" else [None]:
        if threads is not None:
            torch.set_num_threads(threads)
        for batch in args.batch:
            run(engine, batch, args.prompt, min(args.frames, 16), seed=1)  # warm-up (allocator, kernels, graphs)
            best = min((run(engine, batch, args.prompt, args.frames, seed=1) for _ in range(args.repeats)),
                       key=lambda r: r["decode_s"])
            print(json.dumps({"bench": "generate", "shape": args.shape, "device": str(dev), "dtype": str(dtype)[6:],
                              "threads": threads, "batch": batch, "prompt_tokens": args.prompt, "frames": args.frames,
                              "sampling": "T0.7 top_p0.95 RAS7/2", "load_avg_1m": round(os.getloadavg()[0], 2),
                              **best}), flush=True)


if __name__ == "__main__":
    main()
