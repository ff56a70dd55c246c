"""Higgs Audio v2's Whisper audio tower (`audio_tower.*`) and its projection (`audio_encoder_proj.*`), pure PyTorch.

Forward path (golden README §3.3), per chunk of `num_mel_bins` x 3000 log-mel frames (30 s):

    x = gelu(conv1(mel)); x = gelu(conv2(x))            # Conv1d k3 p1, then k3 s2 p1 -> 1500 frames
    x = x.T + embed_positions.weight                      # learned [max_source_positions, d] table, all rows
    for layer in layers:                                  # pre-LN Whisper encoder layer
        x = x + out_proj(attn(self_attn_layer_norm(x)))   # q/v/out_proj with bias, k_proj without
        x = x + fc2(gelu(fc1(final_layer_norm(x))))       # exact (erf) GELU
    x = layer_norm(avg_pool1d(x, 2, 2))                   # -> 750 rows of d

Attention is bidirectional with a key-padding mask: with `m = feature_mask.sum(-1)` valid mel frames,
`L1 = (m - 1)//2 + 1` conv frames are valid keys. Padded keys are excluded (SDPA boolean-mask semantics, quirk 16:
*not* the reference's eager `+1/+0` bug); padded query rows are still computed (they are discarded later). Only the
leading `(L1 - 2)//2 + 1` output rows of a chunk are meaningful (25 per second, 750 for a full chunk); `valid_rows`
selects them.

Config notes (`WhisperConfig.from_dict`, refused values raise `ConfigError` naming the field):
  * `activation_function` must be "gelu" (exact GELU is what the reference's Whisper layers use).
  * `scale_embedding` is accepted and, like the reference (and HF's WhisperEncoder), *not applied*: the reference
    computes `embed_scale` but never multiplies by it, so a checkpoint trained with it saw unscaled embeddings.
  * `encoder_layerdrop` must be 0 (random layer skipping is data-dependent control flow, and unused by Higgs).
  * `dropout`, `attention_dropout`, `activation_dropout` are applied in training mode, where the reference applies them
    (0 in every known checkpoint).

dtypes. All matmuls/convs run in the weights' dtype (inputs are cast to `conv1.weight.dtype`, as the reference
does). LayerNorms run in float32 and cast back when the activations are bf16/fp16 (a no-op in fp32; deliberate
divergence from a pure-bf16 reference, which is slightly less accurate). The reference's fp16 inf-clamp is not
replicated (data-dependent; irrelevant for fp32/bf16).

Compile. `WhisperEncoder.forward` has no data-dependent Python control flow (only shape checks), so it traces into a
single graph with `torch.compile`; `valid_rows` (data-dependent output shape) is meant to run outside compiled code.
`checkpoint_layers = True` recomputes each encoder layer in backward (torch.utils.checkpoint, non-reentrant).

Zero chunks (quirk 18): `forward` on `[0, mel, 3000]` returns `[0, 750, d]` / `[0]` (attached to the graph under
grad); whether to call the tower at all for a batch without audio-in is the caller's decision.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..audio.mel import whisper_rows
from ..errors import ConfigError


@dataclass
class WhisperConfig:
    num_mel_bins: int = 128
    d_model: int = 1280
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    max_source_positions: int = 1500
    activation_function: str = "gelu"
    scale_embedding: bool = False  # accepted, not applied (see module docstring)
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.0
    layer_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def n_frames(self) -> int:
        """Mel frames per chunk the tower accepts (conv2 has stride 2): 3000 for Whisper."""
        return 2 * self.max_source_positions

    @property
    def n_rows(self) -> int:
        """Output rows per chunk after the 2x average pool: 750 for Whisper."""
        return self.max_source_positions // 2

    @classmethod
    def from_dict(cls, d: dict) -> "WhisperConfig":
        """Parse config.json's `audio_encoder_config` (HF keys; unknown HF bookkeeping keys are ignored)."""
        if not isinstance(d, dict):
            raise ConfigError(f"audio_encoder_config: expected an object, got {type(d).__name__}")
        kw = {}
        for f in fields(cls):
            if f.name in d and d[f.name] is not None:
                kw[f.name] = d[f.name]

        def need_int(name, lo=1):
            v = kw.get(name, getattr(cls, name))
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"audio_encoder_config.{name}: expected an integer >= {lo}, got {v!r}")

        for name in ("num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim"):
            need_int(name)
        need_int("max_source_positions", lo=2)
        for name in ("dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop"):
            v = kw.get(name, 0.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise ConfigError(f"audio_encoder_config.{name}: expected a probability in [0, 1), got {v!r}")
            kw[name] = float(v)
        cfg = cls(**kw)
        if cfg.d_model % cfg.encoder_attention_heads:
            raise ConfigError(f"audio_encoder_config.d_model: {cfg.d_model} is not divisible by "
                              f"encoder_attention_heads={cfg.encoder_attention_heads}")
        if cfg.activation_function != "gelu":
            raise ConfigError(f"audio_encoder_config.activation_function: only 'gelu' (exact) is supported, "
                              f"got {cfg.activation_function!r}")
        if not isinstance(cfg.scale_embedding, bool):
            raise ConfigError(f"audio_encoder_config.scale_embedding: expected a boolean, got {cfg.scale_embedding!r}")
        if cfg.encoder_layerdrop != 0.0:
            raise ConfigError("audio_encoder_config.encoder_layerdrop: only 0 is supported, got "
                              f"{cfg.encoder_layerdrop}")
        return cfg


def feature_lengths(feature_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid conv frames L1, valid output rows) per chunk from a [n, frames] mel mask (any int/bool dtype)."""
    m = feature_mask.to(torch.long).sum(-1)
    return (m - 1) // 2 + 1, whisper_rows(m)  # floor division: m = 0 -> 0 conv frames


def valid_rows(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[Σ lengths, d]: the leading `lengths[i]` rows of every chunk `hidden[i]`, concatenated in chunk order."""
    keep = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths.to(hidden.device)[:, None]
    return hidden[keep]


class FP32LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters/keys) that normalises half-precision activations in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            w = None if self.weight is None else self.weight.float()
            b = None if self.bias is None else self.bias.float()
            return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)
        return super().forward(x)


class WhisperAttention(nn.Module):
    def __init__(self, cfg: WhisperConfig):
        super().__init__()
        d = cfg.d_model
        self.num_heads = cfg.encoder_attention_heads
        self.head_dim = cfg.head_dim
        self.dropout = cfg.attention_dropout
        self.q_proj = nn.Linear(d, d, bias=True)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=True)
        self.out_proj = nn.Linear(d, d, bias=True)

    def forward(self, x: torch.Tensor, key_ok: torch.Tensor) -> torch.Tensor:
        """x [n, T, d]; key_ok [n, 1, 1, T] bool (True = attend)."""
        n, t, d = x.shape

        def heads(y):
            return y.view(n, t, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_ok,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(o.transpose(1, 2).reshape(n, t, d))


class WhisperEncoderLayer(nn.Module):
    def __init__(self, cfg: WhisperConfig):
        super().__init__()
        self.cfg = cfg
        self.self_attn = WhisperAttention(cfg)
        self.self_attn_layer_norm = FP32LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.d_model, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, cfg.d_model)
        self.final_layer_norm = FP32LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, key_ok: torch.Tensor) -> torch.Tensor:
        p, pa = self.cfg.dropout, self.cfg.activation_dropout
        h = self.self_attn(self.self_attn_layer_norm(x), key_ok)
        x = x + F.dropout(h, p, self.training)
        h = F.dropout(F.gelu(self.fc1(self.final_layer_norm(x))), pa, self.training)
        return x + F.dropout(self.fc2(h), p, self.training)


class WhisperEncoder(nn.Module):
    """`audio_tower.*` of a Higgs Audio v2 checkpoint: `load_state_dict` takes the keys with that prefix stripped.

    `pool=False` gives the stock Whisper encoder (no 2x average pool before the final layer_norm: 1500 rows per
    chunk), which the ASR scorer (`minihiggs.eval.asr`) feeds to its decoder; lengths are then valid conv frames.
    """

    def __init__(self, config: WhisperConfig, pool: bool = True):
        super().__init__()
        self.pool = pool
        self.config = cfg = config
        d = cfg.d_model
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(cfg.max_source_positions, d)
        self.embed_positions.requires_grad_(False)  # frozen in the reference too
        self.layers = nn.ModuleList([WhisperEncoderLayer(cfg) for _ in range(cfg.encoder_layers)])
        self.layer_norm = FP32LayerNorm(d, eps=cfg.layer_norm_eps)
        self.checkpoint_layers = False

    def forward(self, features: torch.Tensor, feature_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """features [n, num_mel_bins, 3000], feature_mask [n, 3000] (1 = real frame; None = all real).

        Returns (hidden [n, 750, d] after the final layer_norm, in the weights' dtype; lengths [n] int64 = valid
        leading rows per chunk).
        """
        cfg = self.config
        if features.dim() != 3 or features.shape[1] != cfg.num_mel_bins or features.shape[2] != cfg.n_frames:
            raise ValueError(f"WhisperEncoder expects features [n, {cfg.num_mel_bins}, {cfg.n_frames}], "
                             f"got {list(features.shape)}")
        n = features.shape[0]
        if feature_mask is None:
            feature_mask = torch.ones(n, cfg.n_frames, dtype=torch.long, device=features.device)
        if tuple(feature_mask.shape) != (n, cfg.n_frames):
            raise ValueError(f"feature_mask must be [{n}, {cfg.n_frames}], got {list(feature_mask.shape)}")
        conv_len, lengths = feature_lengths(feature_mask.to(features.device))

        x = features.to(dtype=self.conv1.weight.dtype)
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))  # [n, d, T]
        x = x.transpose(1, 2) + self.embed_positions.weight  # [n, T, d], T = max_source_positions
        x = F.dropout(x, cfg.dropout, self.training)

        t = x.shape[1]
        key_ok = torch.arange(t, device=x.device)[None, :] < conv_len[:, None]
        # A chunk without any valid frame would give an all-masked softmax (NaN, also in backward); let it attend
        # everywhere instead. Its rows are never used (lengths == 0).
        key_ok = (key_ok | (conv_len <= 0)[:, None]).view(n, 1, 1, t)

        for layer in self.layers:
            if self.checkpoint_layers and torch.is_grad_enabled():
                x = checkpoint(layer, x, key_ok, use_reentrant=False)
            else:
                x = layer(x, key_ok)

        if not self.pool:
            return self.layer_norm(x), conv_len
        x = F.avg_pool1d(x.transpose(1, 2), kernel_size=2, stride=2).transpose(1, 2)  # [n, T//2, d]
        return self.layer_norm(x), lengths


class AudioEncoderProjector(nn.Module):
    """`audio_encoder_proj.*`: Linear(d_model -> text hidden size, bias)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)
