"""Whisper audio tower (minihiggs.model.whisper) against every golden model variant that has one, plus unit properties.

Variants are discovered (`skip_audio_tower: false` in config.json); the golden set is known to contain at least one.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from golden import MODEL_ROOT, materialized, variants
from minihiggs.config import ConfigError, HiggsConfig
from minihiggs.model.whisper import (AudioEncoderProjector, WhisperConfig, WhisperEncoder, feature_lengths,
                               valid_rows)

ATOL, RTOL = 1e-5, 1e-4
TOWER_KEYS = ("audio_features_length", "audio_tower_last_hidden", "audio_features_embed")


def _config(v: Path) -> dict:
    return json.loads((v / "config.json").read_text())


TOWER_VARIANTS = [v for v in variants(MODEL_ROOT) if HiggsConfig.from_dict(_config(v)).has_audio_tower]


def test_golden_set_has_a_tower_variant():
    assert TOWER_VARIANTS, f"no golden variant with skip_audio_tower=false under {MODEL_ROOT}"


def _strip(weights: dict, prefix: str) -> dict:
    return {k[len(prefix):]: t for k, t in weights.items() if k.startswith(prefix)}


@functools.lru_cache(maxsize=None)
def _golden_weights(v: Path) -> dict:
    w = load_file(str(materialized(v)))
    return {k: t for k, t in w.items() if k.startswith(("audio_tower.", "audio_encoder_proj."))}


def _build(v: Path, tower_state: dict | None = None):
    w = _golden_weights(v)
    cfg = WhisperConfig.from_dict(_config(v)["audio_encoder_config"])
    enc = WhisperEncoder(cfg)
    proj = AudioEncoderProjector(cfg.d_model, w["audio_encoder_proj.linear.weight"].shape[0])
    enc.load_state_dict(tower_state if tower_state is not None else _strip(w, "audio_tower."), strict=True)
    proj.load_state_dict(_strip(w, "audio_encoder_proj."), strict=True)
    return enc.eval(), proj.eval()


def _run(enc, proj, batch: dict):
    with torch.no_grad():
        hidden, lengths = enc(batch["audio_features"], batch["audio_feature_attention_mask"])
        rows = valid_rows(hidden, lengths)
        return {"audio_features_length": lengths, "audio_tower_last_hidden": rows,
                "audio_features_embed": proj(rows)}


def _compare(got: dict, want: dict, what: str) -> dict:
    assert torch.equal(got["audio_features_length"], want["audio_features_length"].long()), what
    diffs = {}
    for k in TOWER_KEYS[1:]:
        assert got[k].shape == want[k].shape, (what, k, got[k].shape, want[k].shape)
        diffs[k] = (got[k] - want[k]).abs().max().item()
        torch.testing.assert_close(got[k], want[k], atol=ATOL, rtol=RTOL, msg=lambda m, k=k: f"{what} {k}: {m}")
    print(f"{what}: max|Δ| " + ", ".join(f"{k}={d:.2e}" for k, d in diffs.items()))
    return diffs


@pytest.mark.parametrize("prefix", ["", "b1_"], ids=["batch", "b1"])
@pytest.mark.parametrize("v", TOWER_VARIANTS, ids=lambda p: p.name)
def test_tower_matches_golden(v, prefix):
    enc, proj = _build(v)
    batch = load_file(str(v / f"{prefix}batch.safetensors"))
    want = load_file(str(v / f"{prefix}base_outputs.safetensors"))
    _compare(_run(enc, proj, batch), want, f"{v.name} {prefix}base")


def _tower_lora(v: Path):
    """{module path under audio_tower.: (A [r,in], B [out,r])} and the scale, from the golden PEFT adapter."""
    ad = v / "lora_adapter"
    acfg = json.loads((ad / "adapter_config.json").read_text())
    assert not acfg.get("use_rslora") and not acfg.get("rank_pattern") and not acfg.get("alpha_pattern")
    scale = acfg["lora_alpha"] / acfg["r"]
    sd = load_file(str(ad / "adapter_model.safetensors"))
    pat = re.compile(r"base_model\.model\.audio_tower\.(.+)\.lora_([AB])\.weight")
    pairs: dict = {}
    for k, t in sd.items():
        m = pat.fullmatch(k)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = t
    return {p: (ab["A"], ab["B"]) for p, ab in pairs.items()}, scale


@pytest.mark.parametrize("v", TOWER_VARIANTS, ids=lambda p: p.name)
def test_tower_lora_targets_and_outputs(v):
    pairs, scale = _tower_lora(v)
    n_layers = WhisperConfig.from_dict(_config(v)["audio_encoder_config"]).encoder_layers
    # PEFT suffix matching hits exactly the tower's self_attn q/k/v (quirk 14), never out_proj/fc1/fc2.
    assert set(pairs) == {f"layers.{i}.self_attn.{p}_proj" for i in range(n_layers) for p in "qkv"}

    batch = load_file(str(v / "batch.safetensors"))
    want = load_file(str(v / "lora_outputs.safetensors"))

    # 1) merged: W' = W + (alpha/r) B @ A
    state = _strip(_golden_weights(v), "audio_tower.")
    for path, (a, b) in pairs.items():
        state[f"{path}.weight"] = state[f"{path}.weight"] + scale * (b @ a)
    enc, proj = _build(v, state)
    _compare(_run(enc, proj, batch), want, f"{v.name} lora merged")

    # 2) unmerged, PEFT-style y = base(x) + scale * B(A(x)) on the plain nn.Linear modules found by path
    enc, proj = _build(v)
    mods = dict(enc.named_modules())
    handles = []
    for path, (a, b) in pairs.items():
        assert type(mods[path]) is torch.nn.Linear, path
        handles.append(mods[path].register_forward_hook(
            lambda _m, inp, out, a=a, b=b: out + scale * ((inp[0] @ a.T) @ b.T)))
    try:
        _compare(_run(enc, proj, batch), want, f"{v.name} lora unmerged")
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("v", TOWER_VARIANTS, ids=lambda p: p.name)
def test_chunks_are_independent(v):
    enc, _ = _build(v)
    b = load_file(str(v / "batch.safetensors"))
    # The golden chunks plus one random full chunk: at least two, whatever the set holds.
    g = torch.Generator().manual_seed(0)
    feats = torch.cat([b["audio_features"], torch.randn(b["audio_features"][:1].shape, generator=g)])
    mask = torch.cat([b["audio_feature_attention_mask"], torch.ones_like(b["audio_feature_attention_mask"][:1])])
    with torch.no_grad():
        full, lengths = enc(feats, mask)
        for i in range(feats.shape[0]):
            alone, li = enc(feats[i:i + 1], mask[i:i + 1])
            assert int(li) == int(lengths[i])
            torch.testing.assert_close(alone[0], full[i], atol=1e-6, rtol=1e-6)
        # other chunks' content and padding must not leak into chunk 0
        noisy = feats.clone()
        noisy[1:] = torch.randn_like(noisy[1:])
        mask2 = mask.clone()
        mask2[1:] = 1
        out2, _ = enc(noisy, mask2)
        torch.testing.assert_close(out2[0], full[0], atol=1e-6, rtol=1e-6)


def _tiny(seed=0, **over):
    cfg = WhisperConfig.from_dict({"num_mel_bins": 16, "d_model": 32, "encoder_layers": 2,
                                   "encoder_attention_heads": 4, "encoder_ffn_dim": 64,
                                   "max_source_positions": 64, **over})
    torch.manual_seed(seed)
    enc = WhisperEncoder(cfg).eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.05 * torch.randn_like(p))
    feats = torch.randn(3, cfg.num_mel_bins, cfg.n_frames)
    mask = (torch.arange(cfg.n_frames)[None, :] < torch.tensor([[128], [77], [9]])).int()
    return enc, feats, mask


def test_lengths_formula():
    m = torch.tensor([0, 1, 2, 3, 4, 5, 1000, 2999, 3000])
    mask = (torch.arange(3000)[None, :] < m[:, None]).int()
    conv, out = feature_lengths(mask)
    assert conv.tolist() == [(x - 1) // 2 + 1 for x in m.tolist()]
    assert out.tolist() == [(c - 2) // 2 + 1 for c in conv.tolist()]
    assert out.tolist()[0] == 0 and out.tolist()[-1] == 750


def test_valid_rows():
    h = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)
    assert valid_rows(h, torch.tensor([2, 3])).flatten().tolist() == [0, 1, 4, 5, 6]
    assert valid_rows(h[:0], torch.zeros(0, dtype=torch.long)).shape == (0, 1)


def test_zero_chunks_and_empty_chunk():
    enc, feats, mask = _tiny()
    enc.train()
    h, lengths = enc(feats[:0], mask[:0])
    assert h.shape == (0, enc.config.n_rows, enc.config.d_model) and lengths.shape == (0,)
    assert lengths.dtype == torch.long and valid_rows(h, lengths).shape == (0, enc.config.d_model)
    h.sum().backward()  # graph through zero-size tensors works
    # a chunk with no valid frame has no rows and must not poison anything with NaN (forward or backward)
    enc.zero_grad()
    mask = mask.clone()
    mask[1] = 0
    h, lengths = enc(feats, mask)
    assert lengths[1] == 0 and torch.isfinite(h).all()
    valid_rows(h, lengths).square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)


def test_compiled_matches_eager():
    enc, feats, mask = _tiny()
    with torch.no_grad():
        want_h, want_l = enc(feats, mask)
        got_h, got_l = torch.compile(enc, fullgraph=True, dynamic=False)(feats, mask)
    assert torch.equal(got_l, want_l)
    torch.testing.assert_close(got_h, want_h, atol=1e-5, rtol=1e-4)


def test_bf16_close_to_fp32():
    enc, feats, mask = _tiny()
    with torch.no_grad():
        want, _ = enc(feats, mask)
        got, _ = enc.to(torch.bfloat16)(feats, mask)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.05)


def test_config_validation():
    base = {"num_mel_bins": 16, "d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 4,
            "encoder_ffn_dim": 64}
    assert WhisperConfig.from_dict({**base, "scale_embedding": True, "model_type": "x"}).scale_embedding
    for field, value in [("activation_function", "relu"), ("encoder_layerdrop", 0.1),
                         ("encoder_attention_heads", 5), ("d_model", 0), ("dropout", 1.5),
                         ("scale_embedding", "yes")]:
        with pytest.raises(ConfigError, match=field if field != "encoder_attention_heads" else "d_model"):
            WhisperConfig.from_dict({**base, field: value})
    enc = WhisperEncoder(WhisperConfig.from_dict(base))
    with pytest.raises(ValueError, match="features"):
        enc(torch.zeros(1, 16, 100), torch.ones(1, 100))
