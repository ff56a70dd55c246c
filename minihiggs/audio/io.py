"""Audio file reading, down-mixing and resampling, matching the reference front end.

The reference reads with librosa (soundfile underneath, float32), averages channels in float32 and resamples
with soxr at HQ quality followed by `fix_length` to ceil(n * target / orig) samples. We reproduce exactly
that with `soundfile` + `soxr`, without librosa.
"""

from __future__ import annotations

import math
import os

import numpy as np

from ..errors import AudioError


def _reason(e: Exception) -> str:
    """soundfile's reason without its "Error opening '<path>': " prefix (the callers' messages name the file)."""
    return getattr(e, "error_string", None) or f"{type(e).__name__}: {e}"


def read_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read any soundfile-supported file (WAV/FLAC/OGG/MP3 where libsndfile allows) as mono float32.
    A MemoryError passes through: a file too long for this machine is not a corrupt one."""
    import soundfile as sf

    path = os.fspath(path)
    if not os.path.exists(path):
        raise AudioError(f"{path}: audio file not found")
    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
    except MemoryError:
        raise
    except Exception as e:  # soundfile raises several types; callers need one with the path in it
        raise AudioError(f"{path}: cannot decode audio ({_reason(e)})") from e
    return to_mono(data.T), int(sr)


def audio_header(source, name: str | None = None) -> tuple[int, int]:
    """(frames, sample rate) from a file's header (a path, or a file object called `name` in messages), without
    decoding the audio: a length check before the decode keeps memory bounded whatever the file holds. Raises
    AudioError."""
    import soundfile as sf

    name = name or os.fspath(source)
    try:
        info = sf.info(source)
    except Exception as e:
        raise AudioError(f"{name}: cannot decode audio ({_reason(e)})") from None
    if info.samplerate <= 0 or info.frames < 0:
        raise AudioError(f"{name}: invalid header ({info.frames} frames at {info.samplerate} Hz)")
    return int(info.frames), int(info.samplerate)


def to_mono(wave: np.ndarray) -> np.ndarray:
    """[channels, n] or [n] -> [n] float32; channels averaged in float32 like librosa.to_mono."""
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim == 1:
        return wave
    if wave.ndim != 2:
        raise AudioError(f"expected [channels, samples] audio, got shape {wave.shape}")
    return np.mean(wave, axis=0, dtype=np.float32) if wave.shape[0] > 1 else wave[0]


def resample(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """soxr HQ resampling, then pad/trim to ceil(n * target / orig) samples (librosa.resample semantics)."""
    wave = np.asarray(wave, dtype=np.float32)
    if orig_sr == target_sr:
        return wave
    import soxr

    out = soxr.resample(wave, orig_sr, target_sr, quality="HQ")
    # librosa multiplies by the float ratio (not n*target/orig): 13671 @44.1k -> 7441, not 7440. Match it.
    n_out = int(math.ceil(wave.shape[-1] * (float(target_sr) / orig_sr)))
    if out.shape[-1] < n_out:
        out = np.pad(out, (0, n_out - out.shape[-1]))
    return np.ascontiguousarray(out[:n_out], dtype=np.float32)


def load_audio(path: str | os.PathLike, target_sr: int) -> np.ndarray:
    """Read, down-mix and resample to `target_sr`. Raises AudioError naming the file."""
    wave, sr = read_audio(path)
    if wave.size == 0:
        raise AudioError(f"{os.fspath(path)}: audio file is empty")
    return resample(wave, sr, target_sr)
