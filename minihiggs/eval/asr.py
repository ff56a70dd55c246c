"""Whisper speech recognition in pure PyTorch: the stock encoder, the decoder with a KV cache, greedy decoding.

Weights are a Whisper Hub repo in transformers' `WhisperForConditionalGeneration` layout (what
`openai/whisper-large-v3` ships: `model.encoder.*`, `model.decoder.*`, `proj_out.weight` tied to the token
embedding), read from safetensors. The encoder is `minihiggs.model.whisper.WhisperEncoder` without the audio
tower's 2x pool (1500 rows per 30 s chunk). The decoder, per layer (pre-LN):

    x = x + out(self_attn(ln1(x)))            # causal, cached keys/values of every earlier token
    x = x + out(cross_attn(ln2(x), enc))      # keys/values of the encoder output, computed once per clip
    x = x + fc2(gelu(fc1(ln3(x))))
    logits = layer_norm(x) @ embed_tokens.weight.T

on token embeddings + a learned position table (`embed_positions`, max_target_positions rows).

Greedy decoding is what `WhisperForConditionalGeneration.generate(language=..., task="transcribe")` does without
timestamps: prompt <|startoftranscript|><|lang|><|transcribe|><|notimestamps|>, `suppress_tokens` of the repo's
generation_config.json set to -inf at every step, `begin_suppress_tokens` at the first one, argmax, stop at
<|endoftext|> or after `max_new_tokens`. Only 128-mel checkpoints (large-v3, large-v3-turbo) are accepted: the
log-mel front end (`minihiggs.audio.mel`) computes 128 bins.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..audio.mel import N_MELS, chunk_waveform_16k, log_mel_batch
from ..errors import CheckpointError, ConfigError
from ..hub import resolve_dir
from ..model.checkpoint import weight_files
from ..model.whisper import FP32LayerNorm, WhisperConfig, WhisperEncoder
from .whisper_text import TOKENIZER_FILES, load_whisper_tokenizer, prompt_ids, transcript

DEFAULT_ASR = "openai/whisper-large-v3"
HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                *TOKENIZER_FILES]


@dataclass
class DecoderConfig:
    vocab_size: int = 51866
    d_model: int = 1280
    decoder_layers: int = 32
    decoder_attention_heads: int = 20
    decoder_ffn_dim: int = 5120
    max_target_positions: int = 448

    @classmethod
    def from_dict(cls, d: dict) -> "DecoderConfig":
        kw = {}
        for name in cls.__dataclass_fields__:
            v = d.get(name, getattr(cls, name))
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"whisper config.{name}: expected an integer >= 1, got {v!r}")
            kw[name] = v
        if kw["d_model"] % kw["decoder_attention_heads"]:
            raise ConfigError(f"whisper config.d_model: {kw['d_model']} is not divisible by "
                              f"decoder_attention_heads={kw['decoder_attention_heads']}")
        if d.get("activation_function", "gelu") != "gelu":
            raise ConfigError(f"whisper config.activation_function: only 'gelu' is supported, "
                              f"got {d.get('activation_function')!r}")
        return cls(**kw)


@dataclass
class LayerCache:
    """Self-attention keys/values [B, H, max_len, hd] filled up to the current length; cross keys/values."""
    self_k: torch.Tensor
    self_v: torch.Tensor
    cross_k: torch.Tensor
    cross_v: torch.Tensor


class DecoderAttention(nn.Module):
    """q/v/out_proj with bias, k_proj without (as in the encoder)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(d, d, bias=True)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=True)
        self.out_proj = nn.Linear(d, d, bias=True)

    def split(self, y: torch.Tensor) -> torch.Tensor:  # [B, T, d] -> [B, H, T, hd]
        b, t, d = y.shape
        return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        o = F.scaled_dot_product_attention(self.split(self.q_proj(x)), k, v, attn_mask=mask)
        return self.out_proj(o.transpose(1, 2).reshape(x.shape))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        d, h = cfg.d_model, cfg.decoder_attention_heads
        self.self_attn = DecoderAttention(d, h)
        self.self_attn_layer_norm = FP32LayerNorm(d)
        self.encoder_attn = DecoderAttention(d, h)
        self.encoder_attn_layer_norm = FP32LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.decoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.decoder_ffn_dim, d)
        self.final_layer_norm = FP32LayerNorm(d)

    def forward(self, x: torch.Tensor, cache: LayerCache, start: int, mask: torch.Tensor | None) -> torch.Tensor:
        h = self.self_attn_layer_norm(x)
        end = start + x.shape[1]
        cache.self_k[:, :, start:end] = self.self_attn.split(self.self_attn.k_proj(h))
        cache.self_v[:, :, start:end] = self.self_attn.split(self.self_attn.v_proj(h))
        x = x + self.self_attn.attend(h, cache.self_k[:, :, :end], cache.self_v[:, :, :end], mask)
        x = x + self.encoder_attn.attend(self.encoder_attn_layer_norm(x), cache.cross_k, cache.cross_v, None)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class WhisperDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_positions = nn.Embedding(cfg.max_target_positions, cfg.d_model)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.layer_norm = FP32LayerNorm(cfg.d_model)

    def new_cache(self, encoded: torch.Tensor, max_len: int) -> list[LayerCache]:
        """Empty self-attention caches for `max_len` tokens and the cross keys/values of `encoded` [B, S, d]."""
        b, d = encoded.shape[0], self.config.d_model
        hd = d // self.config.decoder_attention_heads
        caches = []
        for layer in self.layers:
            ca = layer.encoder_attn
            empty = encoded.new_zeros(b, ca.heads, max_len, hd)
            caches.append(LayerCache(empty, empty.clone(), ca.split(ca.k_proj(encoded)), ca.split(ca.v_proj(encoded))))
        return caches

    def forward(self, tokens: torch.Tensor, caches: list[LayerCache], start: int) -> torch.Tensor:
        """Logits [B, T, vocab] of `tokens` [B, T] at positions start..start+T-1, appending to `caches`."""
        t = tokens.shape[1]
        if start + t > self.config.max_target_positions:
            raise ValueError(f"decoder positions {start}..{start + t - 1} exceed max_target_positions="
                             f"{self.config.max_target_positions}")
        x = self.embed_tokens(tokens) + self.embed_positions.weight[start:start + t]
        mask = None
        if t > 1:  # new token i sees every cached token and new tokens 0..i
            keys = torch.arange(start + t, device=tokens.device)
            mask = keys[None, :] <= (start + torch.arange(t, device=tokens.device))[:, None]
        for layer, cache in zip(self.layers, caches):
            x = layer(x, cache, start, mask)
        return self.layer_norm(x) @ self.embed_tokens.weight.T  # tied output projection


@dataclass
class DecodeRules:
    """What greedy decoding needs besides the weights (from config.json / generation_config.json)."""
    eos: int
    suppress: list[int] = field(default_factory=list)
    begin_suppress: list[int] = field(default_factory=list)


@dataclass
class Decoded:
    tokens: list[list[int]]  # generated ids per clip, the prompt and <|endoftext|> excluded
    hit_eos: list[bool]      # False: stopped by max_new_tokens


class WhisperAsr(nn.Module):
    """Encoder + decoder with the checkpoint's module names under `encoder.` / `decoder.`."""

    def __init__(self, enc_cfg: WhisperConfig, dec_cfg: DecoderConfig):
        super().__init__()
        self.encoder = WhisperEncoder(enc_cfg, pool=False)
        self.decoder = WhisperDecoder(dec_cfg)

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """[B, n_mels, 3000] log-mel -> [B, 1500, d] (every frame: Whisper attends to the padding too)."""
        return self.encoder(features)[0]

    @torch.no_grad()
    def greedy(self, features: torch.Tensor, prompt: list[int], rules: DecodeRules, max_new_tokens: int) -> Decoded:
        enc = self.encode(features)
        b = enc.shape[0]
        max_new = min(max_new_tokens, self.decoder.config.max_target_positions - len(prompt))
        caches = self.decoder.new_cache(enc, len(prompt) + max_new)
        tokens = torch.tensor([prompt] * b, device=enc.device)
        out = torch.zeros(b, 0, dtype=torch.long, device=enc.device)
        done = torch.zeros(b, dtype=torch.bool, device=enc.device)
        pos = 0
        for step in range(max_new):
            logits = self.decoder(tokens, caches, pos)[:, -1].float()
            pos += tokens.shape[1]
            if rules.suppress:
                logits[:, rules.suppress] = float("-inf")
            if step == 0 and rules.begin_suppress:
                logits[:, rules.begin_suppress] = float("-inf")
            nxt = logits.argmax(-1)  # rows already done keep decoding; their ids after <|endoftext|> are cut
            out = torch.cat([out, nxt[:, None]], 1)
            done |= nxt == rules.eos
            if bool(done.all()):
                break
            tokens = nxt[:, None]
        rows = out.tolist()
        toks = [r[:r.index(rules.eos)] if rules.eos in r else r for r in rows]
        return Decoded(toks, [rules.eos in r for r in rows])


def _read_config(root: Path, name: str, required: bool) -> dict:
    p = root / name
    if not p.is_file():
        if required:
            raise CheckpointError(f"{root}: no {name} (not a Whisper checkpoint directory?)")
        return {}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{p}: not valid JSON ({e})") from None


def load_state(model: WhisperAsr, root: Path) -> None:
    """Strictly load `model.encoder.*` / `model.decoder.*` (+ a tied `proj_out.weight`, checked then dropped)."""
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in weight_files(root):
        for k, v in load_file(str(f)).items():
            sd[k.removeprefix("model.")] = v
    proj = sd.pop("proj_out.weight", None)
    if proj is not None and not torch.equal(proj, sd.get("decoder.embed_tokens.weight", proj)):
        raise CheckpointError(f"{root}: proj_out.weight differs from the token embedding (untied head unsupported)")
    want = dict(model.state_dict())
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    bad = [k for k in set(want) & set(sd) if want[k].shape != sd[k].shape]
    if missing or unexpected or bad:
        raise CheckpointError(f"{root}: weights do not match the Whisper config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}, wrong shape {sorted(bad)[:5]}")
    model.load_state_dict(sd, strict=True)


class Transcriber:
    """Whisper ASR on 16 kHz waveforms: `transcribe(waves)` -> texts, batched over clips."""

    def __init__(self, path_or_repo: str | os.PathLike = DEFAULT_ASR, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, language: str = "en", max_new_tokens: int = 224):
        root = resolve_dir(path_or_repo, what="Whisper ASR model", allow_patterns=HUB_PATTERNS)
        cfg = _read_config(root, "config.json", required=True)
        gen = _read_config(root, "generation_config.json", required=False)
        enc_cfg, dec_cfg = WhisperConfig.from_dict(cfg), DecoderConfig.from_dict(cfg)
        if enc_cfg.num_mel_bins != N_MELS:
            raise ConfigError(f"{root}/config.json: num_mel_bins={enc_cfg.num_mel_bins}; only {N_MELS}-mel Whisper "
                              "checkpoints (large-v3, large-v3-turbo) are supported")
        self.tokenizer = load_whisper_tokenizer(root)
        self.prompt = prompt_ids(self.tokenizer, language)
        eos = int(gen.get("eos_token_id", cfg.get("eos_token_id", self.tokenizer.token_id("<|endoftext|>"))))
        self.rules = DecodeRules(eos, [int(i) for i in gen.get("suppress_tokens") or []],
                                 [int(i) for i in gen.get("begin_suppress_tokens") or []])
        self.max_new_tokens = max_new_tokens
        with torch.device("meta"):
            model = WhisperAsr(enc_cfg, dec_cfg)
        model = model.to_empty(device="cpu")
        load_state(model, root)
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device = torch.device(device)

    def decode_features(self, features: torch.Tensor) -> Decoded:
        feats = features.to(self.device, next(self.model.parameters()).dtype)
        return self.model.greedy(feats, self.prompt, self.rules, self.max_new_tokens)

    def transcribe(self, waves_16k, batch_size: int = 8) -> list[str]:
        """One text per waveform; a clip over 30 s is transcribed chunk by chunk and the texts joined."""
        chunks, owner = [], []
        for i, w in enumerate(waves_16k):
            parts = chunk_waveform_16k(np.asarray(w, dtype=np.float32)) or [np.zeros(0, np.float32)]
            chunks += parts
            owner += [i] * len(parts)
        texts: list[list[str]] = [[] for _ in waves_16k]
        for s in range(0, len(chunks), batch_size):
            feats, _ = log_mel_batch(chunks[s:s + batch_size])
            for j, ids in enumerate(self.decode_features(feats).tokens):
                texts[owner[s + j]].append(transcript(self.tokenizer, ids))
        return [" ".join(t for t in ts if t) for ts in texts]
