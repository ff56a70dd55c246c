"""Windowed-sinc resampling, reproducing torchaudio.functional.resample (sinc_interp_hann) bit for bit.

The tokenizer feeds HuBERT with a 16 kHz copy of its 24 kHz input, made by torchaudio's polyphase sinc
resampler. HuBERT features (and thus codes) move with every ulp of that waveform, so this is the same
sequence of float32 tensor ops, not merely the same filter: the kernel is built in the waveform's dtype,
each reduced-ratio output phase is one row of a strided conv1d, and the output length is rounded the way
torchaudio rounds it (through a float32 tensor, see `resampled_length`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sinc_kernel(
    orig_freq: int,
    new_freq: int,
    lowpass_filter_width: int = 6,
    rolloff: float = 0.99,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, int]:
    """Hann-windowed sinc filter bank [new, 1, 2*width + orig] for the gcd-reduced ratio orig -> new.

    Returns the bank and `width`, the number of input samples of context on each side.
    """
    g = math.gcd(orig_freq, new_freq)
    orig, new = orig_freq // g, new_freq // g
    # Cut off below the lower Nyquist frequency so the downsampled signal does not alias.
    base_freq = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / base_freq)
    # Output phase j (j = 0..new-1) sits at input position j*orig/new; tap i at input offset i/orig.
    taps = torch.arange(-width, width + orig, dtype=dtype, device=device)[None, None] / orig
    t = torch.arange(0, -new, -1, dtype=dtype, device=device)[:, None, None] / new + taps
    t *= base_freq
    t = t.clamp_(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t *= math.pi
    scale = base_freq / orig
    kernel = torch.where(t == 0, torch.tensor(1.0).to(t), t.sin() / t)
    kernel *= window * scale
    return kernel, width


def resampled_length(n: int, orig_freq: int, new_freq: int) -> int:
    """ceil(n * new / orig), evaluated like torchaudio: on a float32 tensor.

    torchaudio computes `torch.ceil(torch.as_tensor(new * n / orig))`; as_tensor of a Python float is
    float32, which loses the fractional part once the value passes 2**22 (about 4 minutes at 16 kHz).
    Exact integer arithmetic would then keep one sample more than the reference and shift HuBERT's frames.
    """
    g = math.gcd(orig_freq, new_freq)
    orig, new = orig_freq // g, new_freq // g
    return int(torch.ceil(torch.as_tensor(new * n / orig, dtype=torch.float32)).item())


def resample(wave: torch.Tensor, orig_freq: int, new_freq: int) -> torch.Tensor:
    """Resample [..., n] from orig_freq to new_freq Hz (kernel built in the waveform's dtype, as torchaudio does)."""
    if orig_freq == new_freq:
        return wave
    if not wave.is_floating_point():
        raise TypeError(f"resample needs a floating-point waveform, got {wave.dtype}")
    g = math.gcd(orig_freq, new_freq)
    orig = orig_freq // g
    kernel, width = sinc_kernel(orig_freq, new_freq, dtype=wave.dtype, device=wave.device)
    shape = wave.shape
    flat = wave.reshape(-1, shape[-1])
    n = flat.shape[-1]
    # Zero context on both sides (plus one extra stride on the right) so every phase sees full support.
    padded = F.pad(flat, (width, width + orig))
    # One conv1d with stride `orig` evaluates all `new` phases; interleave them back into time order.
    out = F.conv1d(padded[:, None], kernel, stride=orig)
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)
    out = out[..., : resampled_length(n, orig_freq, new_freq)]
    return out.reshape(shape[:-1] + out.shape[-1:])
