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


def test_activation_checkpointing_reaches_the_tower(tmp_path):
    """--activation_checkpointing (model.set_activation_checkpointing) recomputes the decoder layers *and* the
    tower's layers in backward, with the same gradients (LoRA on the tower too)."""
    from minihiggs.lora.apply import DEFAULT_TARGETS, apply_lora, lora_parameters

    d = write_tiny_checkpoint(tmp_path / "c", seed=2, hidden=32, heads=4, kv_heads=2, intermediate=48, layers=2,
                              dual_layers=(1,), audio_tower=TOWER)
    g = torch.Generator().manual_seed(4)
    batch = collate([_with_features(synth_sample(g, audio_in=4), [1600], g)], load_model(d).config)

    def grads(checkpointing: bool):
        model = load_model(d)
        apply_lora(model, r=2, alpha=4, targets=[*DEFAULT_TARGETS, "audio_tower.*"], seed=0)
        for p in lora_parameters(model):
            p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
        model.train().set_activation_checkpointing(checkpointing)
        calls = []
        model.audio_tower.layers[0].register_forward_pre_hook(lambda *a: calls.append("tower"))
        model.layers[0].register_forward_pre_hook(lambda *a: calls.append("layer"))  # (pre: recompute stops early)
        model(batch).normalized().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, calls

    plain, plain_calls = grads(False)
    ckpt, ckpt_calls = grads(True)
    assert plain_calls == ["tower", "layer"]
    assert sorted(ckpt_calls) == ["layer", "layer", "tower", "tower"]  # both recomputed in backward
    assert any("audio_tower" in n for n in plain)
    for n in plain:
        assert torch.allclose(plain[n], ckpt[n], atol=1e-7, rtol=1e-5), n
