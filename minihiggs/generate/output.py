"""Generated codes -> files: a 24 kHz WAV (decoded with `minihiggs.codec`) and the codes beside it as `.npy`.

Both are written atomically (`minihiggs.fsio`). The WAV is 16-bit PCM, as upstream's examples write it with
soundfile (samples beyond +-1 are clipped); the `.npy` holds the served codes [8, frames] (int64), which
`prep.py` manifests accept as `"audio_codes"` and `--ref_codes` accepts as a voice reference.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from ..constants import CODE_FRAMES_PER_SECOND
from ..fsio import atomic_write_bytes
from .engine import Generation


def wav_bytes(wave: torch.Tensor | np.ndarray, sample_rate: int) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    data = np.clip(np.asarray(torch.as_tensor(wave).float().cpu(), dtype=np.float32), -1.0, 1.0)
    sf.write(buf, data, sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def write_generation(gen: Generation, codec, wav_path: str | Path) -> dict:
    """Decode `gen`'s codes and write `wav_path` + `wav_path.with_suffix('.npy')`. Returns a summary."""
    wav_path = Path(wav_path)
    wav_path.parent.mkdir(parents=True, exist_ok=True)
    codes = gen.codes()
    if codes.numel() == 0:
        codes = torch.zeros(codec.num_codebooks, 0, dtype=torch.long)
    wave = codec.decode(codes) if codes.shape[1] else torch.zeros(0)
    codes_path = wav_path.with_suffix(".npy")
    atomic_write_bytes(codes_path, npy_bytes(codes.cpu().numpy().astype(np.int64)))
    atomic_write_bytes(wav_path, wav_bytes(wave, codec.sample_rate))
    return {"name": gen.name, "wav": str(wav_path), "codes": str(codes_path), "frames": int(codes.shape[1]),
            "seconds": round(codes.shape[1] / CODE_FRAMES_PER_SECOND, 3), "stop": gen.stop_reason,
            "iterations": gen.iterations}
