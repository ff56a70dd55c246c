"""The Higgs Audio v2 audio tokenizer: 24 kHz waveform <-> 8 x 25 Hz codes.

Encode: a DAC conv encoder (acoustic, 256 ch) and HuBERT-base + a conv stack (semantic, 768 ch) run on
the same clip; their frames are concatenated, projected by `fc_prior` and quantized by an 8-layer
residual VQ. Decode: sum of the 8 layers' codewords -> `fc_post2` -> DAC decoder.

Every step reproduces boson_multimodal's `HiggsAudioTokenizer` (see tests/test_codec.py for the parity
checks against its golden outputs), including two quirks that change codes:
  * the semantic branch sees a torchaudio-style sinc 24k -> 16k resample, padded by 160 samples per side;
  * when the acoustic and semantic frame counts differ, the acoustic encoder input is padded by
    160 * downsample samples per side (the reference notices after a first encoder run and runs it
    again; we predict it from the lengths and run the encoder once).
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..audio.io import load_audio, resample as resample_soxr, to_mono
from .acoustic import Decoder, Encoder
from .loading import DEFAULT_REPO, CodecConfig, convert_checkpoint, read_checkpoint, resolve
from .quantizer import Quantizer
from .resample import resample as resample_sinc, resampled_length
from .semantic import FeatureExtractor, Hubert, SemanticEncoder

Wave = np.ndarray | torch.Tensor

# Zeros added on each side of the 16 kHz waveform before HuBERT (half a hop), as the reference does.
HUBERT_PAD = 160


class AudioTokenizer(nn.Module):
    """Load with `from_pretrained`; `encode`/`encode_batch`/`encode_file` give LongTensor codes [8, frames]
    at 25 Hz, `decode`/`decode_batch` turn codes back into 24 kHz float32 waveforms (960 samples per frame)."""

    def __init__(self, cfg: CodecConfig | None = None, decode_only: bool = False):
        super().__init__()
        self.cfg = cfg = cfg if cfg is not None else CodecConfig()  # (a fresh default per instance, not shared)
        # decode_only: no acoustic encoder and no HuBERT semantic branch (~100M of the ~200M parameters); enough
        # to turn generated codes into audio. `encode*` then raise.
        self.decode_only = decode_only
        # Attribute names are the checkpoint's top-level prefixes.
        if not decode_only:
            self.encoder = Encoder(cfg.acoustic_channels, cfg.ratios, cfg.D)
        self.decoder_2 = Decoder(cfg.D, cfg.decoder_channels, cfg.ratios)
        if not decode_only:
            self.semantic_model = Hubert(cfg.semantic_dim)
            self.encoder_semantic = SemanticEncoder(cfg.semantic_dim)
        self.quantizer = Quantizer(cfg.n_q, cfg.quantizer_dim, cfg.codebook_dim, cfg.bins)
        if not decode_only:
            self.fc_prior = nn.Linear(cfg.quantizer_dim, cfg.quantizer_dim)
        self.fc_post2 = nn.Linear(cfg.quantizer_dim, cfg.D)

    # --- properties --------------------------------------------------------------------------------------

    @property
    def sample_rate(self) -> int:
        return self.cfg.sample_rate

    @property
    def frame_rate(self) -> int:
        return self.cfg.frame_rate

    @property
    def hop_length(self) -> int:
        return self.cfg.hop_length

    @property
    def num_codebooks(self) -> int:
        return self.cfg.n_q

    @property
    def codebook_size(self) -> int:
        return self.cfg.bins

    @property
    def device(self) -> torch.device:
        return self.fc_post2.weight.device

    # --- loading -----------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike = DEFAULT_REPO, device: str | torch.device = "cpu",
                        decode_only: bool = False) -> "AudioTokenizer":
        """Load from a directory (config.json + model.safetensors or model.pth), a weights file, or a Hub repo id.
        decode_only: load only what `decode` needs (the checkpoint may then lack the encoder-side tensors)."""
        config, weights = resolve(path_or_repo_id)
        return cls.from_files(config, weights, device, decode_only)

    @classmethod
    def from_files(cls, config: str | os.PathLike, weights: str | os.PathLike, device: str | torch.device = "cpu",
                   decode_only: bool = False) -> "AudioTokenizer":
        cfg = CodecConfig.from_file(config)
        # Build on the meta device: random init of 200M parameters would cost seconds, and every one is overwritten.
        with torch.device("meta"):
            model = cls(cfg, decode_only=decode_only)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        state = convert_checkpoint(read_checkpoint(weights), shapes, cfg, decode_only=decode_only)
        model.load_state_dict(state, strict=True, assign=True)
        return model.to(device).eval().requires_grad_(False)

    # --- encode ------------------------------------------------------------------------------------------

    def frames(self, n: int) -> int:
        """Number of code frames `encode` returns for n samples at 24 kHz; 0 when it refuses the clip as too short
        (callers' pre-checks and the encoder must agree: a 10 ms clip is empty, not corrupt)."""
        if self.encoder.frames(n) < 1:  # the reference's first, unpadded acoustic pass yields nothing: refused
            return 0
        sem = self._semantic_frames(n)
        ac = self.encoder.frames(n)
        if ac != sem:
            ac = self.encoder.frames(n + 2 * self._acoustic_repad)
        return min(ac, sem)

    @property
    def _acoustic_repad(self) -> int:
        return HUBERT_PAD * self.cfg.semantic_downsample

    def _semantic_frames(self, n: int) -> int:
        p = resampled_length(n, self.cfg.sample_rate, self.cfg.semantic_sample_rate) + 2 * HUBERT_PAD
        h = FeatureExtractor.frames(p)
        return -(-h // self.cfg.semantic_downsample)

    def _as_wave(self, wave: Wave, sample_rate: int | None = None) -> torch.Tensor:
        if self.decode_only:
            raise RuntimeError("this audio tokenizer was loaded with decode_only=True and cannot encode")
        if isinstance(wave, torch.Tensor):
            wave = wave.detach().to("cpu", torch.float32).numpy()
        wave = np.asarray(wave, dtype=np.float32)
        if wave.ndim not in (1, 2) or (wave.ndim == 2 and wave.shape[0] > wave.shape[1]):
            raise ValueError(f"encode expects a waveform [samples] or [channels, samples], got shape {wave.shape}"
                             + (" (a [samples, channels] array? transpose it)" if wave.ndim == 2 else ""))
        # Channels are averaged in float32 before resampling, as the reference reads files (librosa mono=True):
        # an array and the file it came from give the same codes, whichever of encode/encode_batch/encode_file.
        wave = to_mono(wave)
        if sample_rate is not None and sample_rate != self.sample_rate:
            wave = resample_soxr(wave, sample_rate, self.sample_rate)
        if not np.isfinite(wave).all():
            raise ValueError("waveform contains NaN or infinite samples")
        # The reference runs the acoustic encoder on the unpadded clip first and fails if that yields no frame.
        if self.frames(wave.shape[0]) < 1:
            raise ValueError(f"clip too short: {wave.shape[0]} samples at {self.sample_rate} Hz give no code frame")
        return torch.from_numpy(np.ascontiguousarray(wave))

    @torch.inference_mode()
    def encode(self, wave: Wave, sample_rate: int | None = None) -> torch.Tensor:
        """Waveform [n] or [channels, n] (down-mixed; 24 kHz unless `sample_rate` says otherwise, then
        soxr-resampled) -> codes [8, frames] int64 on CPU."""
        return self._encode_equal_length(self._as_wave(wave, sample_rate)[None])[0].cpu()

    # Encode activations take roughly 1.5-3.5 KB per input sample (64 channels at 24 kHz, a few live copies), so a
    # batched forward holds at most this many samples (80 s of audio, ~3 GB) unless a single clip is longer.
    ENCODE_BATCH_SAMPLES = 80 * 24000

    @torch.inference_mode()
    def encode_batch(self, waves: Sequence[Wave], sample_rate: int | None = None,
                     max_batch: int = 8) -> list[torch.Tensor]:
        """Encode several clips; codes are identical to encoding each alone.

        Only clips of exactly equal length share a forward pass. Padding shorter clips would change their
        codes: the convs see the padding near the clip's end, HuBERT attends to it (the reference uses no
        attention mask), and HuBERT's first GroupNorm takes statistics over the whole padded length.
        """
        xs = [self._as_wave(w, sample_rate) for w in waves]
        by_len: dict[int, list[int]] = defaultdict(list)
        for i, x in enumerate(xs):
            by_len[x.shape[0]].append(i)
        out: list[torch.Tensor | None] = [None] * len(xs)
        for n, idx in by_len.items():
            size = max(1, min(max_batch, self.ENCODE_BATCH_SAMPLES // n))
            for s in range(0, len(idx), size):
                group = idx[s : s + size]
                codes = self._encode_equal_length(torch.stack([xs[i] for i in group])).cpu()
                for i, c in zip(group, codes):
                    out[i] = c
        return out  # type: ignore[return-value]

    def encode_file(self, path: str | os.PathLike) -> torch.Tensor:
        """Read (mono mixdown), soxr-resample to 24 kHz and encode, as the reference does with librosa."""
        return self.encode(load_audio(path, self.sample_rate))

    def _encode_equal_length(self, x: torch.Tensor, trace: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """x [B, n] float32 (equal-length clips) -> codes [B, 8, frames]. `trace` collects intermediates for tests."""
        cfg = self.cfg
        x = x.to(self.device)
        # Semantic branch: 16 kHz copy, zero padded, HuBERT layer-mean at 25 Hz, conv stack.
        wave16 = F.pad(resample_sinc(x, cfg.sample_rate, cfg.semantic_sample_rate), (HUBERT_PAD, HUBERT_PAD))
        states: list[torch.Tensor] | None = [] if trace is not None else None
        feats = self.semantic_model(wave16, step=cfg.semantic_downsample, states=states).transpose(1, 2)
        sem = self.encoder_semantic(feats)
        # Acoustic branch, padded up front when the reference's first pass would disagree with the semantic frame count.
        repad = self.encoder.frames(x.shape[-1]) != sem.shape[-1]
        xa = F.pad(x, (self._acoustic_repad, self._acoustic_repad)) if repad else x
        if xa.device.type == "cpu" and xa.shape[0] > 1:
            # Clip by clip on CPU: the conv stack is memory-bound there and a batched forward is slower per clip
            # (4 x 10 s: 4.2 s batched vs 3.3 s looped); each clip's result is the same bits either way.
            ac = torch.cat([self.encoder(xa[i : i + 1, None]) for i in range(xa.shape[0])])
        else:
            ac = self.encoder(xa[:, None])
        n = min(ac.shape[-1], sem.shape[-1])
        ac, sem = ac[..., :n], sem[..., :n]
        # Acoustic channels first, as in the reference's cat; fc_prior sees the transposed (non-contiguous) view.
        e = self.fc_prior(torch.cat([ac, sem], dim=1).transpose(1, 2))
        codes = self.quantizer.encode(e)
        if trace is not None:
            trace.update(
                semantic_wave_16k_padded=wave16, hubert_hidden_states=torch.stack(states, 1), semantic_features=feats,
                semantic_encoded=sem, acoustic_input=xa, acoustic_encoded=ac, pre_quantizer_embedding=e,
                acoustic_repadded=torch.tensor(int(repad), dtype=torch.uint8), codes=codes,
            )
        return codes

    # --- decode ------------------------------------------------------------------------------------------

    # An output frame of the DAC decoder depends on latent frames within about +-11 of it (receptive field,
    # checked in tests), so 16 frames of context on each side make chunked decoding agree with one pass.
    DECODE_CHUNK = 375  # frames per clip and forward (15 s of audio: a few hundred MB of activations per clip)
    DECODE_CONTEXT = 16

    @torch.inference_mode()
    def latents(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, 8, T] -> DAC decoder input [B, 256, T]."""
        return self.fc_post2(self.quantizer.decode(codes)).transpose(1, 2)

    def _check_codes(self, codes: torch.Tensor | np.ndarray) -> torch.Tensor:
        codes = torch.as_tensor(codes)
        if codes.dim() == 3 and codes.shape[0] == 1:
            codes = codes[0]
        if codes.dim() != 2 or codes.shape[0] != self.num_codebooks:
            raise ValueError(f"decode expects codes [{self.num_codebooks}, frames], got {tuple(codes.shape)}")
        if codes.is_floating_point() or codes.is_complex():
            raise ValueError(f"codes must be integers, got {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}); got range [{int(codes.min())}, "
                             f"{int(codes.max())}]")
        return codes.to(self.device, torch.long)

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor | np.ndarray, chunk: int | None = None) -> torch.Tensor:
        """codes [8, T] (or [1, 8, T]) -> float32 waveform [960 * T] at 24 kHz on CPU; not trimmed, not clipped.

        Long inputs are decoded `chunk` frames at a time with DECODE_CONTEXT frames of overlap on each side,
        so memory stays bounded; the result matches a single pass up to float rounding (~1e-6).
        """
        return self._decode(self._check_codes(codes)[None], chunk)[0]

    @torch.inference_mode()
    def decode_batch(self, codes: Sequence[torch.Tensor | np.ndarray], chunk: int | None = None,
                     max_batch: int = 8) -> list[torch.Tensor]:
        """Decode several code sequences. Equal-length ones share a forward pass: the decoder has no
        normalisation or attention, so batching changes nothing but float rounding."""
        cs = [self._check_codes(c) for c in codes]
        by_len: dict[int, list[int]] = defaultdict(list)
        for i, c in enumerate(cs):
            by_len[c.shape[1]].append(i)
        out: list[torch.Tensor | None] = [None] * len(cs)
        for idx in by_len.values():
            for s in range(0, len(idx), max_batch):
                group = idx[s : s + max_batch]
                for i, w in zip(group, self._decode(torch.stack([cs[i] for i in group]), chunk)):
                    out[i] = w
        return out  # type: ignore[return-value]

    def _decode(self, codes: torch.Tensor, chunk: int | None) -> torch.Tensor:
        """codes [B, 8, T] -> waveforms [B, 960 * T] (CPU, float32)."""
        if codes.device.type == "cpu" and codes.shape[0] > 1:
            # As in encode: clip by clip is faster on CPU (memory-bound convs), and the same bits.
            return torch.cat([self._decode(codes[i : i + 1], chunk) for i in range(codes.shape[0])])
        z = self.latents(codes)
        b, t, hop = z.shape[0], z.shape[-1], self.hop_length
        chunk = chunk or self.DECODE_CHUNK
        if t == 0:
            return torch.zeros(b, 0)
        if t <= chunk:
            return self.decoder_2(z)[:, 0].float().cpu()
        out = torch.empty(b, t * hop, dtype=torch.float32)
        ctx = self.DECODE_CONTEXT
        for s in range(0, t, chunk):
            e = min(t, s + chunk)
            lo, hi = max(0, s - ctx), min(t, e + ctx)
            y = self.decoder_2(z[..., lo:hi])[:, 0]
            out[:, s * hop : e * hop] = y[:, (s - lo) * hop : (e - lo) * hop].float().cpu()
        return out
