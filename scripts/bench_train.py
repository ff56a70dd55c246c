"""Training-step throughput benchmark: tokens/s, peak memory and (on CUDA) model FLOPs utilisation.

    python scripts/bench_train.py                       # tiny model on CPU (what `make bench` runs)
    python scripts/bench_train.py --preset 3b --device cuda --seq 2048 --batch 4 --compile

Random weights with the chosen shape (no download); LoRA r=16 on the default targets; a synthetic batch of
TTS-shaped rows (a short text prompt, a reference clip as audio-in codes, an audio-out target). Prints one
JSON line. MFU counts the matmul FLOPs actually needed by a LoRA step: forward 2·N per token and backward 2·N
per token (activation gradients only: the base weights are frozen), plus attention, over N base parameters
of the decoder layers and the rows that reach each head.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minihiggs import HiggsConfig, collate  # noqa: E402
from minihiggs.lora.apply import apply_lora  # noqa: E402
from minihiggs.model.higgs import HiggsAudioModel  # noqa: E402
from minihiggs.data.sample import Sample  # noqa: E402
from minihiggs.model.tiny import tiny_config  # noqa: E402

PRESETS = {
    "tiny": dict(hidden=64, layers=4, heads=4, kv_heads=2, intermediate=160, dual_layers=(0, 2)),
    # The shape of the released 3B checkpoint (Llama-3.2-3B backbone, DualFFN in every layer).
    "3b": dict(hidden=3072, layers=28, heads=24, kv_heads=8, intermediate=8192, dual_layers=tuple(range(28))),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16


def synthetic_row(cfg: HiggsConfig, seq: int, g: torch.Generator) -> Sample:
    """~10% text, ~30% reference audio, the rest trained audio-out, totalling `seq` merged positions."""
    text = max(8, seq // 10)
    ref = max(2, seq * 3 // 10 - 9)
    out = max(2, seq - text - 6 - ref - 9 - 9)
    ids = [128000] + torch.randint(0, 128000, (text,), generator=g).tolist() + [128011, cfg.audio_in_token_id, 128012,
                                                                                 128013, cfg.audio_out_token_id, 128012]
    labels = [-100] * (len(ids) - 3) + [128013, -100, 128012]
    codes = [torch.randint(0, 1024, (8, ref), generator=g), torch.randint(0, 1024, (8, out), generator=g)]
    return Sample(torch.tensor(ids), torch.tensor(labels), codes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing per layer")
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if dev.type == "cuda" else "fp32")]
    torch.set_num_threads(min(2, os.cpu_count() or 1)) if dev.type == "cpu" else None

    cfg = HiggsConfig.from_dict(tiny_config(**PRESETS[args.preset]))
    torch.manual_seed(0)
    with torch.device(dev):
        model = HiggsAudioModel(cfg).to(dtype)
    model.reset_buffers()
    report = apply_lora(model, r=16, alpha=32)
    model.train()
    model.activation_checkpointing = args.checkpointing
    fwd = torch.compile(model) if args.compile else model
    g = torch.Generator().manual_seed(0)
    batch = collate([synthetic_row(cfg, args.seq, g) for _ in range(args.batch)], cfg).to(dev)
    tokens = batch.num_tokens
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        loss = fwd(batch).normalized()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(args.warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps

    t = cfg.text
    layer_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("layers.") and "lora_" not in n)
    # dual layers hold two FFNs but every position uses one of them
    ffn = 3 * t.hidden_size * t.intermediate_size
    active = layer_params - ffn * len(cfg.audio_dual_ffn_layers)
    attn = 4 * t.num_hidden_layers * args.seq * t.num_attention_heads * t.head_dim  # QK^T and PV, per token, fwd
    flops_tok = 4 * active + 2 * attn
    head = 4 * t.hidden_size * (t.vocab_size * batch.text_loss_pos.numel()
                                + cfg.audio_num_codebooks * cfg.codebook_stride * batch.audio_loss_rows.numel())
    flops = flops_tok * tokens + head
    out = {"preset": args.preset, "device": str(dev), "dtype": str(dtype).replace("torch.", ""), "seq": args.seq,
           "batch": args.batch, "tokens_per_step": tokens, "step_s": round(dt, 4),
           "tokens_per_s": round(tokens / dt, 1), "lora_params": report.trainable_params,
           "compile": args.compile, "checkpointing": args.checkpointing,
           "achieved_tflops": round(flops / dt / 1e12, 3)}
    if dev.type == "cuda":
        out["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        out["gpu"] = name
        if peak:
            out["mfu"] = round(flops / dt / 1e12 / peak, 4)
    else:
        out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
