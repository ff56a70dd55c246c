"""Core model pieces on small random checkpoints: config, collate, fused loss, accumulation, precision, compile."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from minihiggs import HiggsConfig, collate, load_model
from minihiggs.data.batch import delay_pattern
from minihiggs.config import ConfigError, rope_inv_freq
from minihiggs.model.loss import text_ce_sum
from minihiggs.model.tiny import tiny_config, write_tiny_checkpoint
from synth import AUDIO_OUT, synth_sample, synth_samples


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=1, hidden=32, heads=4, kv_heads=2,
                              intermediate=48, layers=4, dual_layers=(0, 2))
    return d


# ---- config ---------------------------------------------------------------------------------------------------

def test_llama3_rope_parameterisations_agree():
    def llama3(low: float, high: float, original: int) -> HiggsConfig:
        return HiggsConfig.from_dict(tiny_config(rope_scaling={
            "rope_type": "llama3", "factor": 32.0, "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": original}))

    a, b = llama3(1.0, 4.0, 8192), llama3(0.125, 0.5, 1024)
    fa, fb = rope_inv_freq(a.text), rope_inv_freq(b.text)
    torch.testing.assert_close(fa, fb, rtol=1e-6, atol=0)
    base = 1.0 / (500000.0 ** (torch.arange(0, a.text.head_dim, 2).float() / a.text.head_dim))
    assert fa[0] == base[0]  # the highest frequency is never rescaled
    assert torch.isclose(fa[-1], base[-1] / 32)  # the lowest is divided by `factor`


@pytest.mark.parametrize("field,value", [("audio_decoder_proj_num_layers", 1), ("use_rq_transformer", True),
                                         ("use_audio_out_self_attention", True), ("audio_adapter_type", "stack")])
def test_config_refuses_what_the_model_cannot_honour(field, value):
    raw = tiny_config()
    raw[field] = value
    with pytest.raises(ConfigError, match=field):
        HiggsConfig.from_dict(raw)


def test_special_token_ids_come_from_config():
    raw = tiny_config()
    raw["audio_out_token_idx"], raw["audio_in_token_idx"] = 128200, 128201
    cfg = HiggsConfig.from_dict(raw)
    g = torch.Generator().manual_seed(0)
    s = synth_sample(g)
    ids = s.input_ids.clone()
    s.input_ids = torch.where(ids == 128016, 128200, torch.where(ids == 128015, 128201, ids))
    b = collate([s], cfg)
    assert int(b.audio_out_mask.sum()) == s.audio_codes[1].shape[1] + 9
    assert int((b.input_ids == 128200).sum()) == int(b.audio_out_mask.sum())


# ---- collate ----------------------------------------------------------------------------------------------------

def test_delay_pattern_layout():
    codes = torch.arange(1, 7).view(3, 2)  # 3 codebooks, 2 frames
    out = delay_pattern(codes, bos=-1, eos=-2)
    assert out.tolist() == [[1, 2, -2, -2], [-1, 3, 4, -2], [-1, -1, 5, 6]]


def test_collate_segments_labels_and_shift():
    cfg = HiggsConfig.from_dict(tiny_config())
    g = torch.Generator().manual_seed(0)
    s = synth_sample(g, audio_in=3, audio_out=4, train_audio=True)
    b = collate([s], cfg)
    n_out = 4 + 2 + 7
    assert b.audio_out_codes.shape == (8, n_out) and b.audio_in_codes.shape == (8, 3 + 2 + 7)
    # labels [-100, codes, EOS] delayed: codebook 0 col 0 is -100, codes at 1..4, EOS at 5
    assert b.audio_out_labels[0, 0] == -100 and b.audio_out_labels[0, 5] == 1025
    assert torch.equal(b.audio_out_labels[0, 1:5], s.audio_codes[1][0])
    assert torch.equal(b.audio_out_labels[7, 8:12], s.audio_codes[1][7])
    # every codebook: n + 1 targets (codes + EOS), BOS never a target
    assert b.target_counts()[1].tolist() == [5] * 8
    # the <|AUDIO_OUT|> placeholder's text label is masked; the audio_eos after it is a text target
    assert not (b.labels == AUDIO_OUT).any()
    assert 128012 in b.text_loss_targets.tolist()
    # text targets are the labels one position to the right
    flat = b.labels.reshape(-1)
    assert torch.equal(flat[b.text_loss_pos + 1], b.text_loss_targets)


def test_untrained_audio_segment_has_no_audio_targets():
    cfg = HiggsConfig.from_dict(tiny_config())
    g = torch.Generator().manual_seed(0)
    s = synth_sample(g, train_audio=False, train_text_turn=True)
    b = collate([s], cfg)
    assert (b.audio_out_labels == -100).all() and b.audio_out_codes.shape[1] > 0
    assert b.target_counts()[1].sum() == 0 and b.target_counts()[0] > 0


def test_collate_rejects_misaligned_audio():
    cfg = HiggsConfig.from_dict(tiny_config())
    s = synth_sample(torch.Generator().manual_seed(0), sid="bad-7")
    s.audio_codes = s.audio_codes[:1]
    with pytest.raises(ValueError, match="bad-7.*placeholders"):
        collate([s], cfg)


# ---- fused loss -------------------------------------------------------------------------------------------------

def test_fused_text_ce_matches_full_logits():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1000, 16, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 1000, (37,), generator=g)
    s, n = text_ce_sum(h, w, y, chunk=8)
    s.backward(torch.tensor(0.7, dtype=torch.float64))
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(h @ w.t(), y, reduction="sum")
    (ref * 0.7).backward()
    assert n == 37
    torch.testing.assert_close(s.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, h.grad, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(gw, w.grad, rtol=1e-6, atol=1e-9)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_micro_batches_equal_one_union_batch(tiny):
    """k micro-batches normalised by global counts == one batch of their union (loss and every gradient)."""
    model = load_model(tiny).train()
    samples = synth_samples(6, seed=3)
    union = collate(samples, model.config)
    model.zero_grad()
    loss_union = model(union).normalized()
    loss_union.backward()
    ref = _grads(model)
    model.zero_grad()
    micro = [collate(samples[i:i + 2], model.config) for i in range(0, 6, 2)]
    text_n = sum(b.target_counts()[0] for b in micro)
    audio_n = sum(b.target_counts()[1] for b in micro)
    assert text_n == union.target_counts()[0] and torch.equal(audio_n, union.target_counts()[1])
    total = 0.0
    for b in micro:
        loss = model(b).normalized(text_n, audio_n)
        loss.backward()
        total += loss.item()
    assert abs(total - loss_union.item()) < 1e-5
    got = _grads(model)
    assert set(got) == set(ref) and len(ref) > 10
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-7, msg=n)


def test_no_target_batch_gives_zero_not_nan(tiny):
    model = load_model(tiny)
    s = synth_sample(torch.Generator().manual_seed(0), train_audio=False)
    b = collate([s], model.config)
    loss = model(b).normalized()
    assert torch.isfinite(loss) and loss.item() == 0.0


def test_bf16_loss_close_to_fp32(tiny):
    """bf16 weights and activations (norms, softmax and loss reductions in fp32): total within 2% of fp32."""
    samples = synth_samples(4, seed=5)
    m32 = load_model(tiny, dtype=torch.float32)
    m16 = load_model(tiny, dtype=torch.bfloat16)
    assert m16.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        r32 = m32(collate(samples, m32.config)).report()
        r16 = m16(collate(samples, m16.config)).report()
    for k in ("text_loss", "audio_loss", "total"):
        assert abs(r16[k] - r32[k]) / r32[k] < 0.02, (k, r16[k], r32[k])


def test_compiled_forward_matches_eager(tiny):
    model = load_model(tiny)
    batch = collate(synth_samples(3, seed=7), model.config)
    with torch.no_grad():
        eager = model.forward_hidden(batch).hidden
        compiled = torch.compile(model.forward_hidden)(batch).hidden
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_padding_does_not_change_real_positions(tiny):
    """Each sample's hidden states and loss terms are the same alone as right-padded in a batch with longer ones:
    padding changes no real position and is never a target."""
    model = load_model(tiny)
    samples = synth_samples(3, seed=11)
    with torch.no_grad():
        batch = collate(samples, model.config)
        out = model.forward_hidden(batch).hidden
        batched = model.loss_sums(out, batch)
        alone = []
        for i, s in enumerate(samples):
            b1 = collate([s], model.config)
            h1 = model.forward_hidden(b1).hidden
            n = int(b1.attention_mask[0].sum())
            assert int(batch.attention_mask[i].sum()) == n
            # same arithmetic on the same rows, other GEMM shapes: fp32 rounding of activations of magnitude ~1-4
            torch.testing.assert_close(out[i, :n], h1[0, :n], rtol=1e-4, atol=1e-5)
            alone.append(model.loss_sums(h1, b1))
    assert (batch.attention_mask.sum(1) < batch.input_ids.shape[1]).sum() >= 2  # padded rows exist
    total = alone[0] + alone[1] + alone[2]
    assert torch.equal(batched.text_count, total.text_count) and torch.equal(batched.audio_count, total.audio_count)
    # sums of a few dozen cross-entropies of ~7 (fp32): relative rounding
    torch.testing.assert_close(batched.text_sum, total.text_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched.audio_sum, total.audio_sum, rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_same_grads(tiny):
    model = load_model(tiny).train()
    batch = collate(synth_samples(3, seed=2), model.config)
    model(batch).normalized().backward()
    ref = _grads(model)
    model.zero_grad()
    model.activation_checkpointing = True
    model(batch).normalized().backward()
    got = _grads(model)
    assert set(got) == set(ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-8, msg=n)


# ---- private-API fast path -------------------------------------------------------------------------------------

def test_linear_takes_the_public_path_when_the_private_op_is_missing(monkeypatch):
    """model/linear.py's CPU GEMMs go through torch's private `torch.ops.mkldnn._linear_pointwise`. With it hidden
    (a torch build or version without it), every product takes F.linear / matmul and equals them bit for bit."""
    import types

    import minihiggs.model.linear as lin

    g = torch.Generator().manual_seed(0)
    x, w, gy = torch.randn(6, 24, generator=g), torch.randn(10, 24, generator=g), torch.randn(6, 10, generator=g)
    torch.ops.mkldnn  # noqa: B018 (the namespace is created on first access; monkeypatch replaces an existing one)
    monkeypatch.setattr(torch.ops, "mkldnn", types.SimpleNamespace())
    monkeypatch.setattr(lin, "_ONEDNN_OK", None)  # probe again, now without the op
    assert not lin.use_onednn(x, w)
    assert torch.equal(lin.matmul_nt(x, w), x @ w.t()) and torch.equal(lin.matmul_nn(gy, w), gy @ w)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    module = lin.Linear(24, 10, bias=False)
    module.weight = torch.nn.Parameter(w, requires_grad=False)
    out, ref = module(xa), F.linear(xb, w)
    out.backward(gy)
    ref.backward(gy)
    assert torch.equal(out, ref) and torch.equal(xa.grad, xb.grad)
