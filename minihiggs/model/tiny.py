"""Small random Higgs-shaped checkpoints written to disk as real `config.json` + `*.safetensors`.

Used by the tests and `make demo`: the code paths are the real ones (config parsing, sharded loading, the
strict key check), only the sizes are small. Vocabulary and special-token ids are the real Llama-3/Higgs ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..config import HiggsConfig
from .higgs import HiggsAudioModel


def tiny_config(hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2, intermediate: int = 160,
                dual_layers: tuple[int, ...] = (0, 2), adapter: str = "dual_ffn_fast_forward",
                vocab: int = 128256, rope_scaling: dict | None = None, audio_tower: dict | None = None) -> dict:
    """A config.json dict in the upstream layout (top level + `text_config`)."""
    text = {
        "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
        "max_position_embeddings": 131072, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 128000, "eos_token_id": 128009, "pad_token_id": 128001, "tie_word_embeddings": False,
        "rope_scaling": rope_scaling or {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    }
    cfg = {
        "model_type": "higgs_audio", "text_config": text, "audio_adapter_type": adapter,
        "audio_dual_ffn_layers": list(dual_layers), "audio_num_codebooks": 8, "audio_codebook_size": 1024,
        "audio_stream_bos_id": 1024, "audio_stream_eos_id": 1025, "use_delay_pattern": True,
        "encode_audio_in_tokens": True, "audio_embed_avg": False, "use_audio_out_embed_projector": False,
        "use_audio_out_self_attention": False, "use_rq_transformer": False, "audio_decoder_proj_num_layers": 0,
        "skip_audio_tower": audio_tower is None, "encode_whisper_embed": audio_tower is not None,
        "audio_encoder_config": audio_tower, "pad_token_id": 128001,
        "audio_in_token_idx": 128015, "audio_out_token_idx": 128016, "audio_out_bos_token_id": 128013,
        "audio_eos_token_id": 128012, "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
        "audio_in_token": "<|AUDIO|>", "audio_out_token": "<|AUDIO_OUT|>", "audio_out_bos_token": "<|audio_out_bos|>",
    }
    return cfg


def random_state_dict(cfg: HiggsConfig, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """N(0, std) for projections/embeddings, N(1, 0.1) for norm weights (the golden sets' rule)."""
    with torch.device("meta"):
        model = HiggsAudioModel(cfg)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("norm.weight") or k.endswith("layernorm.weight"):
            sd[k] = 1.0 + 0.1 * torch.randn(v.shape, generator=g)
        else:
            sd[k] = std * torch.randn(v.shape, generator=g)
    return sd


def save_sharded(sd: dict[str, torch.Tensor], out_dir: str | os.PathLike,
                 max_shard_bytes: int | None = None) -> list[str]:
    """Write safetensors shards (+ index when more than one), the upstream layout. Returns the file names."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return names


def write_tiny_checkpoint(out_dir: str | os.PathLike, seed: int = 0, max_shard_bytes: int | None = None,
                          **config_overrides) -> Path:
    """Write config.json + random weights for a small model; returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = tiny_config(**config_overrides)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    save_sharded(random_state_dict(HiggsConfig.from_dict(raw), seed), out, max_shard_bytes)
    return out
