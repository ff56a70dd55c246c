"""Packing: several samples in one row give each sample exactly the losses, outputs and LoRA gradients it has alone,
with every attention backend; the token-budget sampler; the trainer with --max_tokens_per_batch (bitwise resume,
the same validation numbers as without packing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import train
from helpers import TINY, adapter, max_diff, train_args
from minihiggs import HiggsConfig, collate
from minihiggs.data.batch import collate_rows
from minihiggs.data.dataset import TokenBatchSampler, pack_first_fit
from minihiggs.lora.apply import apply_lora
from minihiggs.metrics.jsonl import read_metrics
from minihiggs.model.higgs import HiggsAudioModel
from minihiggs.model.loss import LossSums, audio_ce_sums, text_ce_sum
from minihiggs.model.tiny import tiny_config
from minihiggs.train import checkpointing as ckpt_io
from synth import synth_samples

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")]


@pytest.fixture(scope="module")
def lora_model():
    """The training tests' tiny shape (DualFFN layers 0, 2; fast-forward 1, 3) with a non-zero LoRA B."""
    cfg = HiggsConfig.from_dict(tiny_config(**TINY))
    torch.manual_seed(0)
    model = HiggsAudioModel(cfg)
    model.reset_buffers()
    apply_lora(model, r=4, alpha=8, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B.weight"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.train()


def packable_samples() -> list:
    samples = synth_samples(6, seed=5)
    # A label on a sample's first token: alone it is never a target (nothing precedes it); packed after another
    # sample it must not become one either.
    s = samples[4]  # second in its packed row below
    s.label_ids = s.label_ids.clone()
    s.label_ids[0] = s.input_ids[0]
    return samples


def per_sample_sums(model, batch, hidden) -> list[LossSums]:
    """Each sample's loss sums out of one (packed) forward, by the positions of its span."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    width = batch.input_ids.shape[1]
    out = []
    k = model.config.audio_num_codebooks
    for row, s, e in batch.spans:
        lo, hi = row * width + s, row * width + e
        t = (batch.text_loss_pos >= lo) & (batch.text_loss_pos < hi)
        text_sum, text_n = text_ce_sum(flat[batch.text_loss_pos[t]], model.audio_decoder_proj.text_lm_head.weight,
                                       batch.text_loss_targets[t])
        pos = batch.audio_out_pos[batch.audio_loss_rows]
        a = (pos >= lo) & (pos < hi)
        audio_sum, audio_n = audio_ce_sums(model.audio_logits(flat[pos[a]]), batch.audio_loss_targets[a], k)
        out.append(LossSums(text_sum, text_n, audio_sum, audio_n))
    return out


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("backend", ["dense", "docs", "flex"])
def test_packed_rows_equal_samples_alone(lora_model, backend):
    model, samples = lora_model, packable_samples()
    model.attention_backend = backend
    cfg = model.config
    grad = backend != "flex"  # torch 2.13 has no flex_attention backward on CPU
    try:
        packed = collate_rows([samples[:3], samples[3:5], samples[5:]], cfg)
        assert packed.packed and packed.spans[3] == (1, 0, packed.spans[3][2])
        for row, s, e in packed.spans:  # positions restart at every sample
            assert torch.equal(packed.position_ids[row, s:e], torch.arange(e - s))
        with torch.set_grad_enabled(grad):
            model.zero_grad(set_to_none=True)
            out = model.forward_hidden(packed).hidden
            parts = per_sample_sums(model, packed, out)
            total = model.loss_sums(out, packed)
            if grad:
                total.normalized().backward()
                g_packed = lora_grads(model)
            total = total.detach()
        # Alone: each sample its own batch; summed with the union's global counts = the packed batch's gradients.
        text_n, audio_n = packed.target_counts()
        model.zero_grad(set_to_none=True)
        for j, (s, part) in enumerate(zip(samples, parts)):
            alone = collate([s], cfg)
            with torch.set_grad_enabled(grad):
                h = model.forward_hidden(alone).hidden
                sums = model.loss_sums(h, alone)
                if grad:
                    sums.normalized(text_n, audio_n).backward()
            (row, a, b), n = packed.spans[j], alone.spans[0][2]
            torch.testing.assert_close(out[row, a:b].detach(), h[0, :n].detach(), rtol=1e-4, atol=1e-5)
            got, ref = part.detach().report(), sums.detach().report()
            assert got["text_targets"] == ref["text_targets"] and got["audio_targets"] == ref["audio_targets"]
            for key in ("text_loss", "audio_loss"):
                assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), (s.sample_id, key)
        assert total.report()["text_targets"] == sum(collate([s], cfg).target_counts()[0] for s in samples)
        if grad:
            g_alone = lora_grads(model)
            assert len(g_packed) > 20
            for n in g_packed:
                scale = float(g_alone[n].abs().max())
                assert scale > 0 and float((g_packed[n] - g_alone[n]).abs().max()) <= 1e-4 * scale, n
    finally:
        model.attention_backend = "auto"
        model.zero_grad(set_to_none=True)


def test_fixed_length_and_layout():
    cfg = HiggsConfig.from_dict(tiny_config(**TINY))
    samples = synth_samples(3, seed=2)
    b = collate_rows([samples], cfg, length=512)
    n = sum(len(collate([s], cfg).input_ids[0]) for s in samples)  # each alone rounds to 8: an upper bound
    assert b.input_ids.shape == (1, 512) and b.num_tokens == int(b.attention_mask.sum()) <= n
    assert b.segment_ids[0, :b.num_tokens].unique().tolist() == [0, 1, 2]
    assert (b.segment_ids[0, b.num_tokens:] == -1).all()
    longer = collate_rows([samples], cfg, length=16)  # a fixed length never cuts a row
    assert longer.input_ids.shape[1] >= b.num_tokens and longer.num_tokens == b.num_tokens
    with pytest.raises(ValueError, match="at least one sample"):
        collate_rows([samples, []], cfg)


# ---- the token-budget sampler -------------------------------------------------------------------------------

def test_token_sampler_packs_every_sample_once_within_budget_and_resumes():
    lengths = np.random.default_rng(0).integers(40, 900, 300)
    idx = [i for i in range(300) if i % 7]  # a train split
    s = TokenBatchSampler(lengths, idx, max_tokens=2048, seed=3, epoch=1, pool_size=64)
    rows = s.all_batches()
    assert sorted(i for r in rows for i in r) == idx
    assert max(int(lengths[r].sum()) for r in rows) <= 2048
    fill = lengths[idx].sum() / (len(rows) * 2048)
    assert fill > 0.9, fill  # first-fit decreasing leaves little padding
    assert rows == TokenBatchSampler(lengths, idx, max_tokens=2048, seed=3, epoch=1, pool_size=64).all_batches()
    assert rows != TokenBatchSampler(lengths, idx, max_tokens=2048, seed=3, epoch=2, pool_size=64).all_batches()
    # resume after 5 rows: the rest of the epoch, exactly
    r = TokenBatchSampler(lengths, idx, max_tokens=2048, seed=3, epoch=1, pool_size=64)
    r.load_state_dict(s.state_dict(batches_done=5))
    assert list(r) == rows[5:]
    with pytest.raises(ValueError, match="max_tokens"):
        r.load_state_dict({**s.state_dict(), "max_tokens": 4096})
    # ranks: disjoint, equal counts
    parts = [TokenBatchSampler(lengths, idx, 2048, seed=3, rank=k, world_size=3).batches() for k in range(3)]
    assert len({len(p) for p in parts}) == 1
    flat = [i for p in parts for r in p for i in r]
    assert len(flat) == len(set(flat))
    with pytest.raises(ValueError, match="longer than max_tokens"):
        TokenBatchSampler(lengths, idx, max_tokens=100)


def test_pack_first_fit_is_tight():
    rows = pack_first_fit([0, 1, 2, 3, 4], np.array([5, 5, 4, 3, 3]), 10)
    assert rows == [[0, 1], [2, 3, 4]]


# ---- the trainer ------------------------------------------------------------------------------------------------

def packed_args(shards, ckpt, out, **over):
    opts = dict(max_tokens_per_batch=256, batch_size=None, max_steps=8, save_steps=4, val_steps=4, lora_dropout=0.2)
    opts.update(over)
    return train_args(shards, ckpt, out, **opts)


def test_train_with_packing_resumes_bitwise(shards, tiny_ckpt, tmp_path):
    straight = tmp_path / "straight"
    assert train.main(packed_args(shards, tiny_ckpt, straight)) == 0
    mid = straight / "checkpoints" / "step-00000004"
    state = ckpt_io.load_trainer_state(mid)
    assert state["batches_in_epoch"] > 0  # the data position (the resumed sampler is positioned from it)
    assert ckpt_io.read_args_record(mid)["args"]["max_tokens_per_batch"] == 256
    resumed = tmp_path / "resumed"
    assert train.main(packed_args(shards, tiny_ckpt, resumed) + ["--resume", str(mid)]) == 0
    a, b = adapter(straight / "final"), adapter(resumed / "final")
    assert all(torch.equal(a[k], b[k]) for k in a), f"max diff {max_diff(a, b)}"
    recs = read_metrics(straight / "metrics.jsonl")
    start = next(r for r in recs if r.get("event") == "start")
    train_recs = [r for r in recs if r.get("split") == "train"]
    assert start["train_samples"] > 20 and train_recs and all(r["tokens"] > 0 for r in train_recs)
    assert train_recs[-1]["epoch"] > 1.0  # 8 steps of 2 packed rows cross an epoch boundary


def test_resume_with_another_budget_is_refused(shards, tiny_ckpt, tmp_path, capsys):
    first = tmp_path / "first"
    assert train.main(packed_args(shards, tiny_ckpt, first, max_steps=2, save_steps=2, val_steps=0)) == 0
    mid = first / "checkpoints" / "step-00000002"
    assert train.main(packed_args(shards, tiny_ckpt, tmp_path / "b", max_tokens_per_batch=512, val_steps=0)
                      + ["--resume", str(mid)]) == 2
    assert "--max_tokens_per_batch: checkpoint 256, now 512" in capsys.readouterr().err


def test_packed_validation_equals_unpacked(shards, tiny_ckpt, tmp_path):
    """Step 0 validation (the base model): the same stable val split and the same losses, packed or not."""
    runs = {}
    for name, over in {"packed": {}, "padded": {"max_tokens_per_batch": None, "batch_size": 3}}.items():
        out = tmp_path / name
        assert train.main(packed_args(shards, tiny_ckpt, out, max_steps=1, save_steps=0, val_steps=1, **over)) == 0
        runs[name] = [r for r in read_metrics(out / "metrics.jsonl") if r.get("split") == "val"][0]
    p, u = runs["packed"], runs["padded"]
    assert p["text_targets"] == u["text_targets"] and p["audio_targets"] == u["audio_targets"]
    assert p["loss"] == pytest.approx(u["loss"], rel=1e-5)
    assert p["audio_loss_per_codebook"] == pytest.approx(u["audio_loss_per_codebook"], rel=1e-5)


def test_sample_over_the_budget_is_a_clear_error(shards, tiny_ckpt, tmp_path, capsys):
    assert train.main(packed_args(shards, tiny_ckpt, tmp_path / "run", max_tokens_per_batch=64)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max_tokens_per_batch 64" in err[0] and "line" in err[0]


def test_lora_step_with_an_unused_dualffn_branch(lora_model):
    """A text-only batch: the audio FFN's LoRA sees zero rows (forward and backward must still work on every path)."""
    from synth import synth_sample

    model = lora_model
    text_only = synth_sample(torch.Generator().manual_seed(3), audio_in=None, audio_out=None, train_text_turn=True)
    b = collate([text_only], model.config)
    assert b.discrete_idx.numel() == 0 and b.target_counts()[0] > 0
    model.zero_grad(set_to_none=True)
    model(b).normalized().backward()
    used = [n for n, p in model.named_parameters() if p.grad is not None and float(p.grad.abs().sum()) > 0]
    assert used and not any("audio_mlp" in n for n in used)
    model.zero_grad(set_to_none=True)
