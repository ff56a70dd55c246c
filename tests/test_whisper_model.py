"""The Whisper tower inside the model: placement of its rows, batches without audio-in, bookkeeping errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import TOWER
from minihiggs import Sample, collate, load_model
from minihiggs.audio.mel import whisper_rows
from minihiggs.data.batch import segment_columns
from minihiggs.model.tiny import write_tiny_checkpoint
from synth import AUDIO, AUDIO_BOS, AUDIO_EOS, AUDIO_OUT, AUDIO_OUT_BOS, BOS, EH, EOT, NL, SH, synth_sample


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


def test_upstream_layout_long_clip_expands_per_chunk(tower_model):
    """The reference's raw layout (golden README quirk 17): ONE <|AUDIO|> per clip, one code segment and one
    Whisper chunk per 30 s chunk, the chunk counts in `audio_in_chunks`. collate repeats the clip's triple per
    chunk (labels too): the batch equals that of the one-triple-per-chunk sample prep writes."""
    g = torch.Generator().manual_seed(5)
    text = lambda n: torch.randint(0, 128000, (n,), generator=g).tolist()  # noqa: E731
    triple = [AUDIO_BOS, AUDIO, AUDIO_EOS]
    head, mid = [BOS, SH, 882, EH, NL] + text(3), text(2)
    tail = [EOT, SH, 78191, EH, NL]
    out = [AUDIO_OUT_BOS, AUDIO_OUT, AUDIO_EOS, EOT]

    def sample(clip_a_triples: int, **kw) -> Sample:
        ids = head + triple * clip_a_triples + mid + triple + tail + out
        labels = [-100] * (len(ids) - len(out)) + out
        return Sample(torch.tensor(ids), torch.tensor(labels), codes, whisper_features=feats,
                      whisper_lengths=lengths, sample_id="long", **kw)

    codes = [torch.randint(0, 1024, (8, n), generator=g) for n in (5, 5, 2, 3, 4)]  # clip A: 3 chunks, B: 1, out
    lengths = [3000, 3000, 400, 1200]  # 30 s, 30 s, 4 s; 12 s
    feats = [torch.randn(128, 3000, generator=g) for _ in lengths]
    upstream = sample(1, audio_in_chunks=[3, 1])
    canonical = sample(3)
    before = upstream.input_ids.clone()
    a, b = collate([upstream], tower_model.config), collate([canonical], tower_model.config)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, f.name
    assert torch.equal(upstream.input_ids, before) and upstream.audio_in_chunks == [3, 1]  # not mutated
    # the expanded layout itself: 4 triples, each [bos, its Whisper rows, its code columns, eos] in chunk order
    assert a.whisper_rows.tolist() == [750, 750, 100, 300]
    assert int((a.input_ids == AUDIO_BOS).sum()) == 4
    assert a.audio_in_codes.shape[1] == sum(n + 9 for n in (5, 5, 2, 3))
    first = segment_columns(codes[0], tower_model.config, trained=False)[0]
    assert torch.equal(a.audio_in_codes[:, :first.shape[1]], first)
    assert int(a.whisper_pos[749]) + 1 == int(a.audio_in_pos[0])
    assert int(a.audio_in_pos[first.shape[1] - 1]) + 3 == int(a.whisper_pos[750])  # eos, bos, then chunk 2
    assert torch.equal(a.audio_out_codes, segment_columns(codes[4], tower_model.config, trained=True)[0])
    assert a.text_loss_targets.tolist() == b.text_loss_targets.tolist() and a.audio_loss_rows.numel() > 0
    # without (or with wrong) chunk counts the placeholders and segments cannot be matched: an error, never a shift
    with pytest.raises(ValueError, match="long.*5 audio code segments.*audio_in_chunks"):
        collate([sample(1)], tower_model.config)
    for bad in ([2, 1], [3], [3, 0]):
        with pytest.raises(ValueError, match="long"):
            collate([sample(1, audio_in_chunks=bad)], tower_model.config)


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
