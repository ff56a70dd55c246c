"""Tiny random scorer checkpoints (a Whisper ASR and a WavLM x-vector model) in the Hub layouts the scorers read,
for the demo and the tests: `python -m minihiggs.eval` runs end to end without downloading anything. Their WER and
SIM are meaningless numbers (random weights); the cheap signals are not.

Whisper: config.json / generation_config.json / model.safetensors with transformers' key names and a byte-only
tokenizer.json (the 256 byte tokens in GPT-2 order, no merges, then the special tokens).
WavLM: config.json / model.safetensors as `WavLMForXVector` saves them (the positional conv as weight norm g/v).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..model.whisper import WhisperConfig
from ..text.tokenizer import _byte_decoder
from .asr import DecoderConfig, WhisperAsr
from .speaker import SpeakerConfig, SpeakerEncoder

WHISPER_SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>",
                    "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]


def _randomize(module: torch.nn.Module, seed: int, std: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) * std if v.dim() > 1 else torch.randn(v.shape, generator=g) * 0.02
                + (1.0 if k.endswith("layer_norm.weight") else 0.0))
            for k, v in module.state_dict().items()}


def write_tiny_asr(out_dir: str | os.PathLike, seed: int = 0, **shape) -> Path:
    """`shape` overrides config fields (d_model, encoder_layers, ... e.g. a large-v3 shape for a benchmark; a
    vocab_size beyond the byte tokenizer's ids can be decoded to ids, not to text)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    byte_tokens = list(_byte_decoder())  # GPT-2 order: id i is the i-th printable stand-in
    specials = {s: 256 + i for i, s in enumerate(WHISPER_SPECIALS)}
    cfg = {"model_type": "whisper", "vocab_size": 256 + len(specials), "num_mel_bins": 128, "d_model": 32,
           "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_layers": 1,
           "decoder_attention_heads": 2, "decoder_ffn_dim": 64, "max_source_positions": 1500,
           "max_target_positions": 48, "activation_function": "gelu", "eos_token_id": specials["<|endoftext|>"],
           "decoder_start_token_id": specials["<|startoftranscript|>"], **shape}
    model = WhisperAsr(WhisperConfig.from_dict(cfg), DecoderConfig.from_dict(cfg))
    sd = {f"model.{k}": v for k, v in _randomize(model, seed, 0.3).items()}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": specials["<|endoftext|>"],
                                                            "suppress_tokens": [], "begin_suppress_tokens": []}))
    tok = {"model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(byte_tokens)}, "merges": []},
           "added_tokens": [{"id": i, "content": s, "special": True} for s, i in specials.items()]}
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    return out


TINY_SPEAKER = {"model_type": "wavlm", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                "intermediate_size": 64, "conv_dim": [32] * 7, "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
                "conv_stride": [5, 2, 2, 2, 2, 2, 2], "conv_bias": False, "feat_extract_norm": "group",
                "do_stable_layer_norm": False, "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 4,
                "num_buckets": 320, "max_bucket_distance": 800, "use_weighted_layer_sum": True,
                "tdnn_dim": [32, 32, 32, 32, 48], "tdnn_kernel": [5, 3, 3, 1, 1], "tdnn_dilation": [1, 2, 3, 1, 1],
                "xvector_output_dim": 16}


def write_tiny_speaker(out_dir: str | os.PathLike, seed: int = 0, **shape) -> Path:
    """`shape` overrides config fields (e.g. wavlm-base-plus-sv's for a benchmark)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {**TINY_SPEAKER, **shape}
    sd = _randomize(SpeakerEncoder(SpeakerConfig.from_dict(cfg)), seed, 0.2)
    w = sd.pop("wavlm.encoder.pos_conv_embed.conv.weight")
    pos = "wavlm.encoder.pos_conv_embed.conv.parametrizations.weight."
    sd[pos + "original0"] = w.norm(dim=(0, 1), keepdim=True)  # weight norm over every dim but 2, as HF stores it
    sd[pos + "original1"] = w
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out
