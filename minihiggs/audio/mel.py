"""Whisper log-mel features (128 bins), as the reference data collator computes them.

Per 30 s chunk of 16 kHz audio (transformers' WhisperFeatureExtractor, torch path, golden README §5):
zero-pad to 480000 samples; STFT (n_fft 400, hop 160, periodic Hann, center, reflect); drop the last frame;
power; slaney mel filterbank (0-8000 Hz, slaney norm; computed here in float64, used in float32);
log10(clamp(., 1e-10)); floor at (chunk max - 8); (x + 4) / 4. Attention mask: ceil(samples / 160) ones.

Clips longer than 30 s are split into consecutive 480000-sample chunks (`chunk_waveform_16k`), one feature
matrix each. `pack_features` / `unpack_features` store a [128, 3000] matrix compactly and exactly: the columns
up to the last one that differs from the constant fill of the padded tail, plus that fill value.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
N_MELS = 128
CHUNK_SECONDS = 30
CHUNK_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480000
N_FRAMES = CHUNK_SAMPLES // HOP  # 3000


def whisper_rows(valid_frames):
    """Sequence rows one chunk contributes to the model: the Whisper tower's stride-2 conv, then its average
    pool of 2, over the chunk's valid mel frames (25 rows per second). Works on ints and integer tensors."""
    conv = (valid_frames - 1) // 2 + 1
    return (conv - 2) // 2 + 1


def _hz_to_mel_slaney(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, math.log(6.4) / 27.0
    mel = f / f_sp
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-300) / min_log_hz) / logstep, mel)


def _mel_to_hz_slaney(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, math.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filter_bank(n_freqs: int = N_FFT // 2 + 1, n_mels: int = N_MELS, sample_rate: int = SAMPLE_RATE,
                    fmin: float = 0.0, fmax: float = SAMPLE_RATE / 2) -> np.ndarray:
    """Slaney-scale, slaney-normalised triangular filters, [n_freqs, n_mels] float64."""
    fft_freqs = np.linspace(0.0, sample_rate // 2, n_freqs)
    mel_pts = np.linspace(_hz_to_mel_slaney(fmin), _hz_to_mel_slaney(fmax), n_mels + 2)
    hz_pts = _mel_to_hz_slaney(mel_pts)
    fdiff = np.diff(hz_pts)  # [n_mels + 1]
    slopes = hz_pts[None, :] - fft_freqs[:, None]  # [n_freqs, n_mels + 2]
    down = -slopes[:, :-2] / fdiff[:-1]
    up = slopes[:, 2:] / fdiff[1:]
    fb = np.maximum(0.0, np.minimum(down, up))
    fb *= (2.0 / (hz_pts[2:n_mels + 2] - hz_pts[:n_mels]))[None, :]
    return fb


@functools.lru_cache(maxsize=4)
def _filters_f32(device: str) -> torch.Tensor:
    return torch.from_numpy(mel_filter_bank()).to(torch.float32).T.contiguous().to(device)  # [128, 201]


@functools.lru_cache(maxsize=4)
def _window(device: str) -> torch.Tensor:
    return torch.hann_window(N_FFT, periodic=True, dtype=torch.float32, device=device)


def chunk_waveform_16k(wave) -> list[np.ndarray]:
    """Split a 16 kHz mono waveform into consecutive chunks of at most 30 s (480000 samples), as the collator
    does (ceil(n / 480000) chunks; the last one holds the remainder). An empty waveform gives []."""
    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    return [wave[i:i + CHUNK_SAMPLES] for i in range(0, wave.shape[0], CHUNK_SAMPLES)]


def valid_frames(num_samples: int) -> int:
    """Number of attended mel frames of a chunk: ceil(samples / 160)."""
    return min(N_FRAMES, -(-int(num_samples) // HOP))


def log_mel_batch(chunks, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel features of up to-30 s 16 kHz chunks.

    chunks: list of 1-D float arrays/tensors (each <= 480000 samples), or a [B, n] tensor.
    Returns (features [B, 128, 3000] float32 on CPU, attention_mask [B, 3000] int32).
    """
    if isinstance(chunks, torch.Tensor) and chunks.ndim == 2:
        chunks = list(chunks)
    if len(chunks) == 0:
        return torch.zeros(0, N_MELS, N_FRAMES), torch.zeros(0, N_FRAMES, dtype=torch.int32)
    device = str(torch.device(device))
    threads = torch.get_num_threads()
    if device == "cpu" and threads > 1:
        # These ops are small: one thread is faster, and on a busy machine intra-op threads can stall ~100x.
        torch.set_num_threads(1)
    try:
        return _log_mel_batch(chunks, device)
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _log_mel_batch(chunks, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = []
    for i, c in enumerate(chunks):
        n = int(np.asarray(c).size) if not isinstance(c, torch.Tensor) else int(c.numel())
        if n > CHUNK_SAMPLES:
            raise ValueError(f"chunk {i} has {n} samples; chunk longer audio with chunk_waveform_16k")
        lengths.append(n)
    # Frames that only see the zero padding have power 0 exactly, so only the first `m` samples are
    # transformed (m >= longest + 401: the right reflect padding then mirrors zeros) and the rest is filled.
    m = min(CHUNK_SAMPLES, -(-(max(lengths) + 401) // HOP) * HOP)
    batch = torch.zeros(len(chunks), m, dtype=torch.float32)
    mask = torch.zeros(len(chunks), N_FRAMES, dtype=torch.int32)
    for i, c in enumerate(chunks):
        c = torch.as_tensor(np.asarray(c, dtype=np.float32)).reshape(-1)
        batch[i, :c.numel()] = c
        mask[i, :valid_frames(c.numel())] = 1
    batch = batch.to(device)
    stft = torch.stft(batch, N_FFT, HOP, window=_window(device), center=True, pad_mode="reflect",
                      return_complex=True)
    power = stft[..., :m // HOP].abs() ** 2  # [B, 201, m / 160]
    mel = _filters_f32(device) @ power  # [B, 128, m / 160]
    log_spec = torch.clamp(mel, min=1e-10).log10()
    if log_spec.shape[-1] < N_FRAMES:  # all-zero frames: log10(1e-10) = -10
        pad = torch.full((len(chunks), N_MELS, N_FRAMES - log_spec.shape[-1]), -10.0, device=device)
        log_spec = torch.cat([log_spec, pad], dim=-1)
    peak = log_spec.amax(dim=(1, 2), keepdim=True)
    log_spec = torch.maximum(log_spec, peak - 8.0)
    return ((log_spec + 4.0) / 4.0).cpu(), mask


def log_mel(chunk, device: str | torch.device = "cpu") -> tuple[torch.Tensor, int]:
    """One chunk (<= 30 s, 16 kHz) -> (features [128, 3000] float32, valid frame count)."""
    feats, mask = log_mel_batch([chunk], device)
    return feats[0], int(mask[0].sum())


def whisper_features(wave_16k, device: str | torch.device = "cpu") -> tuple[list[torch.Tensor], list[int]]:
    """A whole 16 kHz clip -> one [128, 3000] feature matrix and one valid length per 30 s chunk."""
    chunks = chunk_waveform_16k(wave_16k)
    feats, mask = log_mel_batch(chunks, device)
    return list(feats), [int(m) for m in mask.sum(-1)]


def pack_features(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, float]:
    """[128, 3000] -> (head [128, L] float32, fill): every column from L on equals `fill` exactly."""
    f = np.ascontiguousarray(np.asarray(features, dtype=np.float32))
    fill = np.float32(f[0, -1])
    differs = np.flatnonzero((f != fill).any(axis=0))
    length = int(differs[-1]) + 1 if differs.size else 0
    return np.ascontiguousarray(f[:, :length]), float(fill)


def unpack_features(head: np.ndarray, fill: float, n_frames: int = N_FRAMES) -> torch.Tensor:
    """Inverse of pack_features: [128, L] + fill -> [128, n_frames] float32."""
    out = torch.full((head.shape[0], n_frames), float(np.float32(fill)), dtype=torch.float32)
    if head.shape[1]:
        out[:, :head.shape[1]] = torch.from_numpy(np.array(head, dtype=np.float32))
    return out
