"""The Whisper tower inside the model: placement of its rows, batches without audio-in, bookkeeping errors."""

from __future__ import annotations

import pytest
import torch

from minihiggs import collate, load_model
from minihiggs.audio.mel import whisper_rows
from minihiggs.model.tiny import write_tiny_checkpoint
from helpers import TOWER
from synth import AUDIO, synth_sample



@pytest.fixture(scope="module")
def tower_model(tmp_path_factory):
    d = write_tiny_checkpoint(tmp_path_factory.mktemp("tower"), seed=2, hidden=32, heads=4, kv_heads=2,
                              intermediate=48, layers=2, dual_layers=(1,), audio_tower=TOWER)
    return load_model(d)


def _with_features(s, lengths, g):
    n = int((s.input_ids == AUDIO).sum())
    assert n == len(lengths)
    s.whisper_features = [torch.randn(128, 3000, generator=g) for _ in range(n)]
    s.whisper_lengths = list(lengths)
    return s


def test_whisper_rows_precede_code_columns(tower_model):
    g = torch.Generator().manual_seed(0)
    s = _with_features(synth_sample(g, audio_in=4), [1600], g)
    b = collate([s], tower_model.config)
    rows = whisper_rows(1600)
    assert rows == 400 and b.whisper_pos.numel() == rows  # 16 s of mel frames -> 25 rows per second
    # [whisper rows][4 + 9 code columns] contiguous at the placeholder
    assert int(b.whisper_pos[-1]) + 1 == int(b.audio_in_pos[0])
    assert b.audio_in_pos.numel() == 4 + 9
    assert (b.labels.reshape(-1)[b.whisper_pos] == -100).all()
    sums = tower_model(b)
    assert torch.isfinite(sums.normalized())


def test_two_chunks_two_placeholders(tower_model):
    """A clip split into two 30 s chunks is two placeholder triples, each with its own features and codes."""
    g = torch.Generator().manual_seed(1)
    s = synth_sample(g, audio_in=3)
    i = int((s.input_ids == AUDIO).nonzero()[0])
    triple = s.input_ids[i - 1:i + 2]
    s.input_ids = torch.cat([s.input_ids[:i + 2], triple, s.input_ids[i + 2:]])
    s.label_ids = torch.cat([s.label_ids[:i + 2], torch.full((3,), -100), s.label_ids[i + 2:]])
    s.audio_codes = [s.audio_codes[0], torch.randint(0, 1024, (8, 2), generator=g), s.audio_codes[1]]
    _with_features(s, [3000, 800], g)
    b = collate([s], tower_model.config)
    assert b.whisper_features.shape[0] == 2
    assert b.whisper_rows.tolist() == [750, 200]
    assert b.audio_in_pos.numel() == (3 + 9) + (2 + 9)
    assert torch.isfinite(tower_model(b).normalized())


def test_batch_without_audio_in_trains_without_tower(tower_model):
    """Quirk 18: no audio-in under grad works, and the tower receives no gradient."""
    model = tower_model.train()
    g = torch.Generator().manual_seed(2)
    s = synth_sample(g, audio_in=None)
    s.whisper_features, s.whisper_lengths = [], []
    b = collate([s], model.config)
    assert b.whisper_features.shape[0] == 0
    model.zero_grad()
    model(b).normalized().backward()
    assert all(p.grad is None for p in model.audio_tower.parameters())
    assert model.layers[0].self_attn.q_proj.weight.grad is not None
    model.eval()


def test_missing_features_for_a_tower_checkpoint_is_an_error(tower_model):
    g = torch.Generator().manual_seed(3)
    s = synth_sample(g, audio_in=4, sid="clip-9")
    with pytest.raises(ValueError, match="clip-9.*Whisper audio tower.*prep.py"):
        collate([s], tower_model.config)
    s = _with_features(s, [100], g)
    s.whisper_lengths = []
    with pytest.raises(ValueError, match="clip-9.*whisper feature chunks"):
        collate([s], tower_model.config)
