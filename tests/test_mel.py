"""Whisper log-mel parity with the golden features (README §5), chunking, and the exact compact storage."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from golden import MODEL_ROOT, WHISPER_ROOT, variants
from minihiggs.audio.io import resample
from minihiggs.audio.mel import (CHUNK_SAMPLES, N_FRAMES, chunk_waveform_16k, log_mel, log_mel_batch, mel_filter_bank,
                           pack_features, unpack_features, valid_frames, whisper_features)

TOL = 1e-4  # README §5


def golden_feature_files():
    return sorted(p for p in WHISPER_ROOT.rglob("*.safetensors") if p.name != "mel_filters.safetensors")


def golden_batches():
    out = []
    for v in variants(MODEL_ROOT):
        p = v / "batch.safetensors"
        if p.is_file():
            d = load_file(p)
            if "audio_feature_waveforms_16k" in d:
                out.append((v.name, d))
    return out


def test_golden_sets_present():
    assert golden_feature_files(), f"no golden log-mel files under {WHISPER_ROOT}"
    assert golden_batches(), f"no model variant under {MODEL_ROOT} with audio_feature_waveforms_16k"


def test_filterbank_matches_golden():
    files = sorted(WHISPER_ROOT.rglob("mel_filters.safetensors"))
    assert files
    for f in files:
        ref = load_file(f)["mel_filters"]
        ours = torch.from_numpy(mel_filter_bank(n_freqs=ref.shape[0], n_mels=ref.shape[1]))
        assert float((ours - ref).abs().max()) < 1e-12


@pytest.mark.parametrize("path", golden_feature_files(), ids=lambda p: p.stem)
def test_features_match_golden_files(path):
    d = load_file(path)
    ref = d["input_features"]
    mask = d["attention_mask"]
    # from the stored 16 kHz waveform (chunked exactly like the collator)
    feats, lens = whisper_features(d["wave_16k"].numpy())
    ours = torch.stack(feats)
    diff = float((ours - ref).abs().max())
    print(f"{path.stem}: max |diff| {diff:.3g}")
    assert ours.shape == ref.shape and diff <= TOL
    assert lens == [int(m) for m in mask.sum(-1)]
    # and from the original waveform through our resampler
    if "wave_in" in d:
        wave16 = resample(d["wave_in"].numpy(), int(d["sample_rate_in"]), 16000)
        feats2, _ = whisper_features(wave16)
        assert float((torch.stack(feats2) - ref).abs().max()) <= TOL


@pytest.mark.parametrize("name,batch", golden_batches(), ids=[n for n, _ in golden_batches()])
def test_features_match_golden_batches(name, batch):
    w = batch["audio_feature_waveforms_16k"]
    starts = batch["audio_feature_waveforms_16k_start"].tolist() + [w.numel()]
    chunks = [w[a:b] for a, b in zip(starts[:-1], starts[1:])]
    feats, mask = log_mel_batch(chunks)
    diff = float((feats - batch["audio_features"]).abs().max())
    print(f"{name}: max |diff| {diff:.3g}")
    assert diff <= TOL
    assert torch.equal(mask, batch["audio_feature_attention_mask"].to(torch.int32))


def _full_reference(x):
    """README §5 verbatim: pad to 480000 and transform everything."""
    b = torch.zeros(CHUNK_SAMPLES)
    b[:len(x)] = torch.as_tensor(x)
    s = torch.stft(b, 400, 160, window=torch.hann_window(400), center=True, pad_mode="reflect",
                   return_complex=True)[..., :-1].abs() ** 2
    mel = torch.from_numpy(mel_filter_bank()).float().T @ s
    ls = torch.clamp(mel, min=1e-10).log10()
    ls = torch.maximum(ls, ls.max() - 8.0)
    return (ls + 4.0) / 4.0


@pytest.mark.parametrize("n", [1, 159, 160, 161, 399, 400, 401, 16000, 479000, 479599, 479600, 479999, 480000])
def test_short_transform_equals_full_chunk_transform(n):
    x = (np.random.default_rng(n).standard_normal(n) * 0.1).astype(np.float32)
    ours, valid = log_mel(x)
    assert valid == valid_frames(n) == -(-n // 160)
    assert float((ours - _full_reference(x)).abs().max()) < 1e-5


def test_batch_equals_single():
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(n).astype(np.float32) for n in (100, 20000, 333333)]
    feats, mask = log_mel_batch(xs)
    for i, x in enumerate(xs):
        f, v = log_mel(x)
        assert float((feats[i] - f).abs().max()) < 1e-5 and int(mask[i].sum()) == v
    with pytest.raises(ValueError, match="chunk"):
        log_mel_batch([np.zeros(CHUNK_SAMPLES + 1, np.float32)])


def test_chunking():
    x = np.arange(2 * CHUNK_SAMPLES + 12345, dtype=np.float32)
    ch = chunk_waveform_16k(x)
    assert [len(c) for c in ch] == [CHUNK_SAMPLES, CHUNK_SAMPLES, 12345]
    assert np.array_equal(np.concatenate(ch), x)
    assert [len(c) for c in chunk_waveform_16k(x[:CHUNK_SAMPLES])] == [CHUNK_SAMPLES]
    assert [len(c) for c in chunk_waveform_16k(x[:CHUNK_SAMPLES + 1])] == [CHUNK_SAMPLES, 1]
    assert chunk_waveform_16k(np.zeros(0, np.float32)) == []
    feats, lens = whisper_features(np.sin(np.arange(65 * 16000) / 10).astype(np.float32))
    assert len(feats) == 3 and lens == [3000, 3000, 500]


def test_pack_unpack_is_exact():
    cases = [torch.stack(whisper_features(load_file(p)["wave_16k"].numpy())[0]) for p in golden_feature_files()]
    rng = np.random.default_rng(1)
    full, _ = log_mel(rng.standard_normal(CHUNK_SAMPLES).astype(np.float32))
    quiet, _ = log_mel(np.zeros(100, np.float32))
    for f in [c[0] for c in cases] + [full, quiet]:
        head, fill = pack_features(f)
        back = unpack_features(head, fill)
        assert back.shape == (128, N_FRAMES) and back.dtype == torch.float32
        assert torch.equal(back, f)
        assert head.shape[1] <= N_FRAMES
    assert pack_features(full)[0].shape[1] == N_FRAMES
    assert pack_features(quiet)[0].shape[1] == 0
    # a 1 s clip keeps ~1 s of columns
    short, _ = log_mel(np.sin(np.arange(16000) / 7).astype(np.float32))
    assert 100 <= pack_features(short)[0].shape[1] <= 104
