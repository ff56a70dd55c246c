"""DAC acoustic encoder and decoder (descript-audio-codec), as the Higgs tokenizer configures them.

Module and parameter names mirror the checkpoint (`encoder.block.N...`, `decoder_2.model.N...`) so the
loader maps keys one to one. Weight norm is folded into plain conv weights at load time (tokenizer.py):
the reference recomputes `g * v / ||v||` on every forward, which gives the same tensor each time.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def snake(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Snake activation x + sin(alpha x)^2 / (alpha + 1e-9), per channel (alpha is [1, C, 1]).

    Same float32 ops as the reference (sin, square as x*x, times the reciprocal, plus x) so results match
    bit for bit, but computed in place in one scratch buffer: at 24 kHz x 64 channels the activations are
    the bulk of the encoder's memory traffic.
    """
    if torch.is_grad_enabled() and (x.requires_grad or alpha.requires_grad):
        return x + (alpha + 1e-9).reciprocal() * torch.sin(alpha * x).pow(2)  # autograd needs the intermediates
    y = torch.mul(x, alpha).sin_()
    y.mul_(y)
    y.mul_((alpha + 1e-9).reciprocal())
    return y.add_(x)


class Snake1d(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.empty(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return snake(x, self.alpha)


class ResidualUnit(nn.Module):
    """x + conv1x1(snake(conv7_dilated(snake(x)))); 'same' padding, so no crop is needed."""

    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.block = nn.Sequential(
            Snake1d(dim),
            nn.Conv1d(dim, dim, kernel_size=7, dilation=dilation, padding=3 * dilation),
            Snake1d(dim),
            nn.Conv1d(dim, dim, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        # In place when allowed (same sum as x + y; saves a large allocation at 24 kHz).
        return y.add_(x) if not torch.is_grad_enabled() else x + y


def _residual_stack(dim: int) -> list[nn.Module]:
    return [ResidualUnit(dim, dilation=d) for d in (1, 3, 9)]


class EncoderBlock(nn.Module):
    """3 residual units at `dim // 2` channels, then a strided conv that doubles channels and divides time by
    `stride`."""

    def __init__(self, dim: int, stride: int):
        super().__init__()
        self.block = nn.Sequential(
            *_residual_stack(dim // 2),
            Snake1d(dim // 2),
            nn.Conv1d(dim // 2, dim, kernel_size=2 * stride, stride=stride, padding=math.ceil(stride / 2)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Encoder(nn.Module):
    """Waveform [B, 1, T] at 24 kHz -> latents [B, d_latent, frames] (one frame per prod(strides) samples)."""

    def __init__(self, d_model: int = 64, strides: tuple[int, ...] = (8, 5, 4, 2, 3), d_latent: int = 256):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv1d(1, d_model, kernel_size=7, padding=3)]
        for stride in strides:
            d_model *= 2
            layers.append(EncoderBlock(d_model, stride))
        layers += [Snake1d(d_model), nn.Conv1d(d_model, d_latent, kernel_size=3, padding=1)]
        self.block = nn.Sequential(*layers)
        self.strides = tuple(strides)

    def frames(self, n: int) -> int:
        """Output length for n input samples: conv arithmetic of each strided conv (k = 2s, p = ceil(s/2))."""
        for s in self.strides:
            n = (n + 2 * math.ceil(s / 2) - 2 * s) // s + 1
        return n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DecoderBlock(nn.Module):
    """Snake, transposed conv multiplying time by exactly `stride` (output_padding = stride % 2), 3 residual units."""

    def __init__(self, in_dim: int, out_dim: int, stride: int):
        super().__init__()
        self.block = nn.Sequential(
            Snake1d(in_dim),
            nn.ConvTranspose1d(
                in_dim, out_dim, kernel_size=2 * stride, stride=stride,
                padding=math.ceil(stride / 2), output_padding=stride % 2,
            ),
            *_residual_stack(out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Decoder(nn.Module):
    """Latents [B, input_channel, frames] -> waveform [B, 1, frames * prod(rates)]; no final tanh (the reference
    drops it)."""

    def __init__(self, input_channel: int = 256, channels: int = 1024, rates: tuple[int, ...] = (8, 5, 4, 2, 3)):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv1d(input_channel, channels, kernel_size=7, padding=3)]
        for i, stride in enumerate(rates):
            layers.append(DecoderBlock(channels // 2**i, channels // 2 ** (i + 1), stride))
        out_dim = channels // 2 ** len(rates)
        layers += [Snake1d(out_dim), nn.Conv1d(out_dim, 1, kernel_size=7, padding=3)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
