"""Training-step benchmark: real tokens/s, the forward/loss/backward/optimizer split, peak memory, MFU (CUDA).

    python scripts/bench_train.py --preset small              # one LoRA step shape, fp32 on CPU (`make bench`)
    python scripts/bench_train.py --preset small --varlen     # 1-30 s samples: padded vs bucketed vs packed rows
    python scripts/bench_train.py --preset 3b --varlen --compile   # the released shape, bf16 on CUDA

Random weights with the preset's shape (no download). Each run prints one JSON line.

Presets:
  tiny   the test-size model (hidden 64, 4 layers, two DualFFN + two fast-forward layers), LoRA r=16
  small  hidden 512, 8 layers, 8 heads / 2 kv heads (head_dim 64), intermediate 1408, every layer DualFFN,
         vocab 128256; 2 samples of 512 and 504 merged positions (~60% audio-out, 2 text targets each);
         LoRA r=4 alpha=8 on q,k,v,o,gate,up,down; fp32 on CPU
  3b     the released checkpoint's shape (Llama-3.2-3B backbone, DualFFN in every layer); one 4096-position
         sample, or with --varlen packed 4096-token rows; LoRA r=16 alpha=32; bf16 on CUDA

--varlen draws `--samples` TTS samples of 1-30 s of audio (log-uniform), 40% with a 3-10 s reference clip, and
runs them once as `padded` batches (random order, --batch samples padded to the longest: a plain loader),
`bucketed` batches (the trainer's length-bucketed sampler, --batch_size) and `packed` rows (the trainer's
--max_tokens_per_batch sampler, budget --max_tokens); tokens/s counts real (non-padding) tokens only.

Fields: tokens_per_s (real tokens / median step), step_s and split_s {forward, loss, backward, optimizer}
(medians; on CUDA each phase is synchronised, which costs a little), peak_rss_mib (CPU, whole process) or
peak_mem_gb (CUDA, max allocated), and on CUDA achieved_tflops / mfu. The FLOPs are those a LoRA step needs:
4 N per token for the frozen linears a token actually passes through (forward 2N + activation gradients 2N,
no base-weight gradients), 6 N per token for the LoRA matrices, 12 h d per attended (query, key) pair for
attention (forward 4, backward 8; pairs allowed by the mask only: causal, within a sample, audio keys removed
in fast-forward layers), and 4 H V per head row projected (text rows with a target, audio-out rows).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minihiggs import HiggsConfig, collate  # noqa: E402
from minihiggs.data.batch import Batch  # noqa: E402
from minihiggs.data.sample import Sample  # noqa: E402
from minihiggs.lora.apply import apply_lora  # noqa: E402
from minihiggs.model.higgs import HiggsAudioModel  # noqa: E402
from minihiggs.model.tiny import tiny_config  # noqa: E402

PRESETS = {
    "tiny": dict(model=dict(hidden=64, layers=4, heads=4, kv_heads=2, intermediate=160, dual_layers=(0, 2)),
                 lora=(16, 32.0), rows=(512, 504), max_tokens=2048, batch=8),
    "small": dict(model=dict(hidden=512, layers=8, heads=8, kv_heads=2, intermediate=1408,
                             dual_layers=tuple(range(8))),
                  lora=(4, 8.0), rows=(512, 504), max_tokens=2048, batch=8),
    # The released 3B checkpoint: Llama-3.2-3B backbone, DualFFN in every layer.
    "3b": dict(model=dict(hidden=3072, layers=28, heads=24, kv_heads=8, intermediate=8192,
                          dual_layers=tuple(range(28))),
               lora=(16, 32.0), rows=(4096,), max_tokens=4096, batch=16),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}  # dense bf16
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BOS, AUDIO_BOS, AUDIO_EOS, AUDIO_OUT_BOS, EOT = 128000, 128011, 128012, 128013, 128009
HEADER = [128006, 78191, 128007, 271]  # <|start_header_id|>assistant<|end_header_id|>\n\n


def tts_sample(cfg: HiggsConfig, g: torch.Generator, text: int, out_frames: int, ref_frames: int = 0,
               sid: str = "") -> Sample:
    """A TTS-shaped ChatML sample: `text` prompt tokens, an optional reference clip (audio-in), a trained audio-out
    clip; text targets: <|audio_out_bos|> and the <|audio_eos|> after the clip (labels at the same positions)."""
    ids = [BOS] + torch.randint(0, 128000, (text,), generator=g).tolist()
    codes = []
    if ref_frames:
        ids += [AUDIO_BOS, cfg.audio_in_token_id, AUDIO_EOS]
        codes.append(torch.randint(0, 1024, (8, ref_frames), generator=g))
    ids += HEADER
    labels = [-100] * len(ids)
    ids += [AUDIO_OUT_BOS, cfg.audio_out_token_id, AUDIO_EOS]
    labels += [AUDIO_OUT_BOS, -100, AUDIO_EOS]
    codes.append(torch.randint(0, 1024, (8, out_frames), generator=g))
    return Sample(torch.tensor(ids), torch.tensor(labels), codes, sample_id=sid)


def fixed_row(cfg: HiggsConfig, merged: int, g: torch.Generator) -> Sample:
    """Exactly `merged` positions after expansion: ~15% text, ~25% reference audio, ~60% trained audio-out."""
    extra = cfg.extra_audio_columns
    ref = merged // 4 - extra
    text = merged * 15 // 100
    # merged = 1 + text + (2 + ref + extra) + len(HEADER) + (2 + out + extra)
    out = merged - 1 - text - (2 + ref + extra) - len(HEADER) - 2 - extra
    s = tts_sample(cfg, g, text, out, ref)
    return s


def varlen_samples(cfg: HiggsConfig, n: int, seed: int) -> list[Sample]:
    """1-30 s of target audio (log-uniform: many short clips, some long), ~3 prompt tokens per second of speech
    plus a fixed instruction, 40% with a 3-10 s reference clip (voice cloning)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        u = torch.rand((), generator=g).item()
        sec = math.exp(math.log(1.0) + u * (math.log(30.0) - math.log(1.0)))
        ref = 0
        if torch.rand((), generator=g).item() < 0.4:
            ref = int(25 * (3 + 7 * torch.rand((), generator=g).item()))
        out.append(tts_sample(cfg, g, text=24 + int(3 * sec) + (int(ref / 25 * 3) if ref else 0),
                              out_frames=max(1, int(25 * sec)), ref_frames=ref, sid=f"v{i}"))
    return out


def build_model(preset: dict, dev: torch.device, dtype: torch.dtype, ckpt: str | None = None
                ) -> tuple[HiggsAudioModel, int]:
    """Random weights straight in their dtype on the device (as `load_model` materialises a checkpoint: one copy):
    N(0, 0.02), norm weights 1; or `ckpt` loaded with `load_model`."""
    if ckpt:
        from minihiggs import load_model

        model = load_model(ckpt, dtype=dtype, device=dev)
    else:
        cfg = HiggsConfig.from_dict(tiny_config(**preset["model"]))
        with torch.device("meta"):
            model = HiggsAudioModel(cfg)
        model = model.to(dtype).to_empty(device=dev)
        g = torch.Generator(device=dev).manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02, generator=g)
        model.reset_buffers()
    r, alpha = preset["lora"]
    report = apply_lora(model, r=r, alpha=alpha, dropout=0.0, targets=LORA_TARGETS, seed=0)
    model.train()
    return model, report.trainable_params


def attended_pairs(model: HiggsAudioModel, batch: Batch) -> tuple[int, int]:
    """(query, key) pairs the mask allows, summed over rows: (normal layers, fast-forward layers)."""
    valid = batch.attention_mask
    seg = getattr(batch, "segment_ids", None)
    total = ff = 0
    for b in range(valid.shape[0]):
        ids = seg[b][valid[b]] if seg is not None else torch.zeros(int(valid[b].sum()), dtype=torch.long)
        text = (~batch.discrete_mask[b][valid[b]]).long()
        for s in ids.unique().tolist():
            sel = ids == s
            n = int(sel.sum())
            total += n * (n + 1) // 2
            # fast-forward layers: only non-audio queries matter (audio rows pass through) and only text keys
            t = text[sel]
            c = t.cumsum(0)
            ff += int((c * t).sum())
    return total, ff


def step_flops(model: HiggsAudioModel, batch: Batch) -> float:
    cfg, t = model.config, model.config.text
    h, inter = t.hidden_size, t.intermediate_size
    attn_params = h * (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim + t.num_attention_heads * \
        t.head_dim * h
    mlp_params = 3 * h * inter
    tokens = int(batch.attention_mask.sum())
    text_rows = tokens - int(batch.discrete_mask.sum())
    pairs, ff_pairs = attended_pairs(model, batch)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops = 6.0 * lora * tokens
    hd = t.num_attention_heads * t.head_dim
    for i in range(t.num_hidden_layers):
        if cfg.layer_kind(i) == "fast_forward":  # audio rows pass through unchanged
            flops += 4.0 * (attn_params + mlp_params) * text_rows + 12.0 * hd * ff_pairs
        else:
            flops += 4.0 * (attn_params + mlp_params) * tokens + 12.0 * hd * pairs
    k_c = cfg.audio_num_codebooks * cfg.codebook_stride
    flops += 4.0 * h * (t.vocab_size * batch.text_loss_pos.numel() + k_c * batch.audio_loss_rows.numel())
    return flops


class Timer:
    def __init__(self, dev: torch.device):
        self.dev = dev
        self.t = time.perf_counter()

    def lap(self) -> float:
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt


def run_step(model: HiggsAudioModel, opt: torch.optim.Optimizer, batch: Batch, dev: torch.device) -> dict:
    tm = Timer(dev)
    out = model.forward_hidden(batch)
    f = tm.lap()
    loss = model.loss_sums(out.hidden, batch).normalized()
    l_ = tm.lap()
    loss.backward()
    b = tm.lap()
    opt.step()
    opt.zero_grad(set_to_none=True)
    o = tm.lap()
    return {"forward": f, "loss": l_, "backward": b, "optimizer": o}


def median_split(splits: list[dict]) -> dict:
    return {k: round(statistics.median(s[k] for s in splits), 4) for k in splits[0]}


def peak_fields(dev: torch.device, since_reset: bool = False) -> dict:
    """Peak memory: CUDA max allocated; CPU the process's peak RSS (since `reset_peak` when asked: VmHWM)."""
    if dev.type == "cuda":
        return {"peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2)}
    if since_reset:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return {"peak_rss_mib": round(int(line.split()[1]) / 1024)}
    return {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # Linux: "5" resets the peak resident set size (VmHWM) to the current one
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def mfu_fields(dev: torch.device, flops: float, seconds: float) -> dict:
    if dev.type != "cuda":
        return {}
    name = torch.cuda.get_device_name()
    out = {"gpu": name, "achieved_tflops": round(flops / seconds / 1e12, 1)}
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    if peak:
        out["mfu"] = round(flops / seconds / 1e12 / peak, 4)
    return out


def bench_fixed(args, model, opt, dev) -> dict:
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    rows = tuple(args.rows) if args.rows else PRESETS[args.preset]["rows"]
    batch = collate([fixed_row(cfg, n, g) for n in rows], cfg).to(dev)
    for _ in range(args.warmup):
        run_step(model, opt, batch, dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    splits = [run_step(model, opt, batch, dev) for _ in range(args.steps)]
    step_s = statistics.median(sum(s.values()) for s in splits)
    tokens = batch.num_tokens
    return {"rows": list(rows), "tokens_per_step": tokens, "step_s": round(step_s, 4),
            "tokens_per_s": round(tokens / step_s, 1), "split_s": median_split(splits), **peak_fields(dev),
            **mfu_fields(dev, step_flops(model, batch), step_s)}


def varlen_batches(mode: str, samples: list[Sample], cfg: HiggsConfig, args) -> list[Batch]:
    import numpy as np

    from minihiggs.data.dataset import BucketBatchSampler

    n = len(samples)
    if mode == "padded":
        order = np.random.default_rng(args.seed).permutation(n).tolist()
        groups = [order[i:i + args.batch] for i in range(0, n, args.batch)]
        return [collate([samples[i] for i in grp], cfg) for grp in groups]
    lengths = [len(collate([s], cfg).input_ids[0]) for s in samples]  # merged lengths (rounded to 8)
    if mode == "bucketed":
        sampler = BucketBatchSampler(lengths, range(n), batch_size=args.batch, seed=args.seed)
        return [collate([samples[i] for i in grp], cfg) for grp in sampler]
    from minihiggs.data.batch import collate_rows
    from minihiggs.data.dataset import TokenBatchSampler

    sampler = TokenBatchSampler(lengths, range(n), max_tokens=args.max_tokens, seed=args.seed)
    length = args.max_tokens if args.compile else None  # as train.py: one shape for compiled layers
    return [collate_rows([[samples[i] for i in grp]], cfg, length=length) for grp in sampler]


def bench_varlen(args, model, opt, dev) -> dict:
    cfg = model.config
    samples = varlen_samples(cfg, args.samples, args.seed)
    out = {"samples": len(samples), "max_tokens": args.max_tokens, "batch": args.batch, "modes": {}}
    for mode in args.modes:
        try:
            batches = varlen_batches(mode, samples, cfg, args)
        except ImportError as e:  # an older tree without packing
            out["modes"][mode] = {"error": str(e)}
            continue
        batches = [b.to(dev) for b in batches]
        # warm-up: first-touch allocations; compiled layers see every shape of the pass once
        for b in batches if args.compile else batches[:1]:
            run_step(model, opt, b, dev)
        reset_peak(dev)  # each mode's own peak (the process keeps the earlier modes' heap)
        t0 = time.perf_counter()
        splits = [run_step(model, opt, b, dev) for b in batches]
        dt = time.perf_counter() - t0
        real = sum(b.num_tokens for b in batches)
        padded = sum(b.input_ids.numel() for b in batches)
        flops = sum(step_flops(model, b) for b in batches)
        out["modes"][mode] = {"steps": len(batches), "tokens": real, "padding_frac": round(1 - real / padded, 3),
                              "tokens_per_s": round(real / dt, 1), "step_s": round(dt / len(batches), 4),
                              "split_s": {k: round(sum(s[k] for s in splits) / len(splits), 4) for k in splits[0]},
                              **peak_fields(dev, since_reset=True), **mfu_fields(dev, flops, dt)}
    m = out["modes"]
    if "tokens_per_s" in m.get("packed", {}) and "tokens_per_s" in m.get("padded", {}):
        out["packed_vs_padded"] = round(m["packed"]["tokens_per_s"] / m["padded"]["tokens_per_s"], 2)
    if "tokens_per_s" in m.get("packed", {}) and "tokens_per_s" in m.get("bucketed", {}):
        out["packed_vs_bucketed"] = round(m["packed"]["tokens_per_s"] / m["bucketed"]["tokens_per_s"], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (the CI machine has 2 cores)")
    ap.add_argument("--rows", type=int, nargs="+", help="merged lengths of the fixed batch (default: the preset's)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (as train.py does)")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing per layer")
    ap.add_argument("--varlen", action="store_true", help="1-30 s samples: padded vs bucketed vs packed batches")
    ap.add_argument("--samples", type=int, default=48, help="--varlen: samples per mode")
    ap.add_argument("--max_tokens", type=int, default=None, help="--varlen: packed row budget (default: preset's)")
    ap.add_argument("--batch", type=int, default=None, help="--varlen: samples per padded batch (default: preset's)")
    ap.add_argument("--modes", nargs="+", default=["padded", "bucketed", "packed"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt", default=None, help="load this checkpoint (load_model) instead of random weights")
    args = ap.parse_args()
    preset = PRESETS[args.preset]
    args.max_tokens = args.max_tokens or preset["max_tokens"]
    args.batch = args.batch or preset["batch"]
    dev = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if dev.type == "cuda" else "fp32")]
    if dev.type == "cpu":
        torch.set_num_threads(min(args.threads, os.cpu_count() or 1))

    model, lora_params = build_model(preset, dev, dtype, args.ckpt)
    model.set_activation_checkpointing(args.checkpointing)
    if args.compile:
        model.compile_layers()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    head = {"preset": args.preset, "device": str(dev), "dtype": str(dtype).replace("torch.", ""),
            "threads": torch.get_num_threads() if dev.type == "cpu" else None, "lora_params": lora_params,
            "compile": args.compile, "checkpointing": args.checkpointing, **({"ckpt": args.ckpt} if args.ckpt else {})}
    body = bench_varlen(args, model, opt, dev) if args.varlen else bench_fixed(args, model, opt, dev)
    print(json.dumps({**head, **({"varlen": True} if args.varlen else {}), **body}))


if __name__ == "__main__":
    main()
