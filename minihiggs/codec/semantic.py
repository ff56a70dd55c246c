"""Semantic branch: HuBERT-base teacher (transformers' HubertModel, eval mode) and the tokenizer's `encoder_semantic`.

Module and parameter names mirror the checkpoint (`semantic_model.*`, `encoder_semantic.*`). The tokenizer
uses the unweighted mean of all 13 HuBERT hidden states (the post-LN encoder input plus the 12 layer
outputs), so `Hubert.forward` returns that mean directly instead of materialising the stack.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# HuBERT-base conv feature extractor: (kernel, stride) per layer, 512 channels, no bias.
FEATURE_CONVS: tuple[tuple[int, int], ...] = ((10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2))


class ConvLayer(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, group_norm: bool):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride, bias=False)
        # Only layer 0 normalises: GroupNorm with one group per channel, i.e. per-channel statistics over
        # the whole clip. This is why a clip's features depend on its exact length (see encode_batch).
        self.layer_norm = nn.GroupNorm(c_out, c_out, affine=True) if group_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return F.gelu(x)


class FeatureExtractor(nn.Module):
    def __init__(self, channels: int = 512):
        super().__init__()
        self.conv_layers = nn.ModuleList(
            ConvLayer(1 if i == 0 else channels, channels, k, s, group_norm=(i == 0))
            for i, (k, s) in enumerate(FEATURE_CONVS)
        )

    @staticmethod
    def frames(n: int) -> int:
        for k, s in FEATURE_CONVS:
            n = (n - k) // s + 1
        return n

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        x = wave[:, None]
        for layer in self.conv_layers:
            x = layer(x)
        return x  # [B, 512, frames]


class FeatureProjection(nn.Module):
    def __init__(self, conv_dim: int = 512, hidden: int = 768):
        super().__init__()
        self.layer_norm = nn.LayerNorm(conv_dim, eps=1e-5)
        self.projection = nn.Linear(conv_dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.layer_norm(x))


class PositionalConv(nn.Module):
    """Grouped conv over time (k=128, 16 groups) as a relative position signal; even kernel -> drop last frame."""

    def __init__(self, hidden: int = 768, kernel: int = 128, groups: int = 16):
        super().__init__()
        self.conv = nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2, groups=groups)
        self.trim = 1 if kernel % 2 == 0 else 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.conv(h.transpose(1, 2))
        if self.trim:
            x = x[:, :, : -self.trim]
        return F.gelu(x).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, hidden: int = 768, heads: int = 12):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:  # [B, T, C] -> [B, heads, T, head_dim]
            return y.view(b, t, self.heads, c // self.heads).transpose(1, 2)  # SDPA takes the strided view as is

        # Bidirectional, no mask: the reference calls HuBERT without an attention mask (scale 1/sqrt(64)).
        y = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.out_proj(y.transpose(1, 2).reshape(b, t, c))


class FeedForward(nn.Module):
    def __init__(self, hidden: int = 768, inner: int = 3072):
        super().__init__()
        self.intermediate_dense = nn.Linear(hidden, inner)
        self.output_dense = nn.Linear(inner, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_dense(F.gelu(self.intermediate_dense(x)))


class EncoderLayer(nn.Module):
    """Post-LN transformer layer (HuBERT-base, do_stable_layer_norm=False)."""

    def __init__(self, hidden: int = 768, heads: int = 12, inner: int = 3072):
        super().__init__()
        self.attention = Attention(hidden, heads)
        self.layer_norm = nn.LayerNorm(hidden, eps=1e-5)
        self.feed_forward = FeedForward(hidden, inner)
        self.final_layer_norm = nn.LayerNorm(hidden, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm(x + self.attention(x))
        return self.final_layer_norm(x + self.feed_forward(x))


class TransformerEncoder(nn.Module):
    def __init__(self, hidden: int = 768, layers: int = 12, heads: int = 12, inner: int = 3072):
        super().__init__()
        self.pos_conv_embed = PositionalConv(hidden)
        self.layer_norm = nn.LayerNorm(hidden, eps=1e-5)
        self.layers = nn.ModuleList(EncoderLayer(hidden, heads, inner) for _ in range(layers))


class Hubert(nn.Module):
    """HuBERT-base on a raw 16 kHz waveform [B, n] (no normalisation, no mask) -> [B, frames, 768] layer-mean."""

    def __init__(self, hidden: int = 768, layers: int = 12):
        super().__init__()
        self.feature_extractor = FeatureExtractor()
        self.feature_projection = FeatureProjection(512, hidden)
        self.encoder = TransformerEncoder(hidden, layers)

    def forward(self, wave: torch.Tensor, step: int = 1, states: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Mean of the 13 hidden states, keeping every `step`-th frame (the tokenizer keeps frames 0, 2, 4, ...).

        The mean accumulates left to right and divides once at the end, the order in which
        `torch.stack(states, 1).mean(1)` reduces, so it matches the reference without holding 13 copies.
        If `states` is a list, every full hidden state is appended to it (for tests and inspection).
        """
        h = self.feature_projection(self.feature_extractor(wave).transpose(1, 2))
        enc = self.encoder
        h = enc.layer_norm(h + enc.pos_conv_embed(h))
        total = h[:, ::step].clone()
        if states is not None:
            states.append(h)
        for layer in enc.layers:
            h = layer(h)
            total += h[:, ::step]
            if states is not None:
                states.append(h)
        return total.div_(len(enc.layers) + 1)


class _Conv(nn.Module):
    """'Same'-padded conv held under `.conv`, matching the checkpoint's `<name>.conv.weight` nesting."""

    def __init__(self, c_in: int, c_out: int, kernel: int, bias: bool):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, padding=(kernel - 1) // 2, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class SemanticResidualUnit(nn.Module):
    """x + conv1x1(elu(conv3(elu(x)))), both convs without bias."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = _Conv(dim, dim, 3, bias=False)
        self.conv2 = nn.Conv1d(dim, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.elu(self.conv1(F.elu(x))))


class SemanticBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.res_units = nn.ModuleList(SemanticResidualUnit(dim) for _ in range(2))
        self.conv = _Conv(dim, dim, 3, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.res_units:
            x = unit(x)
        return self.conv(x)


class SemanticEncoder(nn.Module):
    """`encoder_semantic`: conv3 (no bias), then 2 blocks of [2 residual units, conv3 with bias]; 768 ch, stride 1."""

    def __init__(self, dim: int = 768, blocks: int = 2):
        super().__init__()
        self.conv = _Conv(dim, dim, 3, bias=False)
        self.conv_blocks = nn.ModuleList(SemanticBlock(dim) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        for block in self.conv_blocks:
            x = block(x)
        return x
