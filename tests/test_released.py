"""The released checkpoints' layout, from their published small files under $MINIHIGGS_REAL (default
../shared/real: config.json, model.safetensors.index.json, the tokenizer files, the audio tokenizer's config.json;
no weights). Every released model and codec found there is checked, whatever its directory is called. Expected
values come from those files, from the independently gathered key maps and shapes under $MINIHIGGS_REAL_HF
(default ../shared/real-hf), or from another part of minihiggs (collate), never from the code under test."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from golden import REAL_HF_ROOT, REAL_ROOT, released_codecs, released_models
from helpers import LLAMA_DIR
from minihiggs import collate, load_model
from minihiggs.codec import AudioTokenizer, CodecConfig
from minihiggs.codec.loading import expected_tensors
from minihiggs.config import HiggsConfig
from minihiggs.model.higgs import HiggsAudioModel
from minihiggs.model.tiny import random_state_dict, save_sharded
from minihiggs.prep.pipeline import model_settings
from minihiggs.text.tokenizer import HIGGS_SPECIAL_TOKENS, TextTokenizer, write_higgs_tokenizer
from synth import synth_sample

MODELS = [pytest.param(d, id=d.name) for d in released_models()]
CODECS = [pytest.param(d, id=d.name) for d in released_codecs()]


def test_released_files_present():
    assert MODELS, f"no released model (config.json + model.safetensors.index.json) under {REAL_ROOT} ($MINIHIGGS_REAL)"
    assert CODECS, f"no released audio tokenizer config under {REAL_ROOT} ($MINIHIGGS_REAL)"


def published(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())


def hf_facts(name: str) -> dict:
    return json.loads((REAL_HF_ROOT / name).read_text())


def index_keys(ckpt: Path) -> set[str]:
    return set(json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"])


@pytest.mark.parametrize("ckpt", MODELS)
def test_model_from_the_published_config_has_the_index_layout(ckpt):
    """Built on the meta device: exactly the index's keys (397 for the 3B base) and its bf16 byte count
    (11,542,566,912)."""
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    cfg = HiggsConfig.from_file(ckpt / "config.json")
    with torch.device("meta"):
        model = HiggsAudioModel(cfg).to(torch.bfloat16)
    sd = model.state_dict()
    assert sorted(sd) == sorted(index["weight_map"])
    assert sum(v.numel() * v.element_size() for v in sd.values()) == index["metadata"]["total_size"]


@pytest.mark.parametrize("ckpt", [m for m in MODELS if index_keys(m.values[0]) == set(hf_facts("old_to_new.json"))])
def test_model_shapes_are_the_released_ones(ckpt):
    """Every tensor's shape as the release has it (real-hf/keys_3b_new.json, through the legacy -> new key map):
    the index holds names and a byte total only. Selected by property: the releases whose keys that map covers."""
    old_to_new, shapes = hf_facts("old_to_new.json"), hf_facts("keys_3b_new.json")
    with torch.device("meta"):
        model = HiggsAudioModel(HiggsConfig.from_file(ckpt / "config.json"))
    wrong = {k: (tuple(v.shape), shapes[old_to_new[k]]) for k, v in model.state_dict().items()
             if list(v.shape) != shapes[old_to_new[k]]}
    assert not wrong


@pytest.mark.parametrize("ckpt", MODELS)
def test_prep_reads_the_published_config(ckpt):
    raw = published(ckpt)
    ms = model_settings(raw)
    assert {k: v for k, v in ms.record().items() if k not in ("whisper", "columns_per_segment")} == {
        "num_codebooks": raw["audio_num_codebooks"], "codebook_size": raw["audio_codebook_size"],
        "audio_in_token_id": raw["audio_in_token_idx"], "audio_out_token_id": raw["audio_out_token_idx"],
        "vocab_size": raw["text_config"]["vocab_size"]}
    # Whisper features are prepared only for a checkpoint that ships the tower's weights (the published form: a
    # tower config beside skip_audio_tower=true, and no audio_tower.* tensor in the index).
    ships_tower = any(k.startswith("audio_tower.") for k in index_keys(ckpt))
    assert ms.whisper == (ships_tower and bool(raw.get("encode_whisper_embed")))
    # The columns prep budgets per audio segment are the ones collate builds from this config.
    cfg = HiggsConfig.from_dict(raw)
    sample = synth_sample(torch.Generator().manual_seed(0), audio_in=None, audio_out=5)
    frames = sum(c.shape[1] for c in sample.audio_codes)
    assert collate([sample], cfg).audio_out_codes.shape[1] == frames + ms.columns_per_segment


def shrunk(raw: dict, hidden: int = 32, layers: int = 2) -> dict:
    """The published config with the sizes of a tiny model and every other field as published."""
    d = copy.deepcopy(raw)
    text = d["text_config"]
    heads, kv = 4, 2
    text.update(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads)
    d["audio_dual_ffn_layers"] = [i for i in d.get("audio_dual_ffn_layers") or [] if i < layers]
    for key, value in (("hidden_size", hidden), ("audio_ffn_hidden_size", hidden),
                       ("audio_ffn_intermediate_size", 2 * hidden)):
        if key in d:
            d[key] = value
    return d


@pytest.mark.parametrize("ckpt", MODELS)
def test_load_model_accepts_the_published_config(ckpt, tmp_path):
    """load_model on a directory whose config.json is the published one (sizes shrunk) and whose weights follow
    the published index's names, sharded like the release."""
    raw = shrunk(published(ckpt))
    (tmp_path / "config.json").write_text(json.dumps(raw, indent=2))
    cfg = HiggsConfig.from_dict(raw)
    sd = {k: v.to(torch.bfloat16) for k, v in random_state_dict(cfg, seed=0).items()}
    assert len(save_sharded(sd, tmp_path, max_shard_bytes=sum(v.numel() * 2 for v in sd.values()) // 3)) > 1
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    layer_free = {k for k in index["weight_map"] if not k.startswith("layers.")}
    assert layer_free <= set(sd)  # the same non-layer tensors as the release
    model = load_model(tmp_path, dtype=torch.bfloat16)
    assert model.config.audio_dual_ffn_layers == raw["audio_dual_ffn_layers"]
    assert model.config.skip_audio_tower == raw["skip_audio_tower"]
    assert all(torch.equal(p, sd[k]) for k, p in model.state_dict().items())


@pytest.mark.parametrize("ckpt", MODELS)
def test_text_tokenizer_resolves_every_added_token(ckpt, tmp_path):
    """The published tokenizer_config.json with the Llama-3 tokenizer.json: every added token (256 for the 3B
    base) resolves to its id, as a special token and inside text."""
    shutil.copy(LLAMA_DIR / "tokenizer.json", tmp_path / "tokenizer.json")
    shutil.copy(ckpt / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    tok = TextTokenizer.from_dir(tmp_path)
    added = {int(i): t["content"] for i, t in
             json.loads((ckpt / "tokenizer_config.json").read_text())["added_tokens_decoder"].items()}
    assert added
    for i, content in added.items():
        assert tok.token_id(content) == i, content
        assert tok.encode(f"a{content}b") == tok.encode("a") + [i] + tok.encode("b")
    special_map = json.loads((ckpt / "special_tokens_map.json").read_text())
    for name in ("bos_token", "eos_token"):
        entry = special_map[name]
        assert tok.token_id(entry["content"] if isinstance(entry, dict) else entry) in added
    generation = json.loads((ckpt / "generation_config.json").read_text())
    assert {generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]} <= set(added)
    # The Higgs renames that write_higgs_tokenizer applies to a stock Llama-3 tokenizer (tests, the demo) are the
    # published ones. (Its other reserved names stay the stock file's: Llama-3.2 numbers them differently.)
    ours = TextTokenizer.from_dir(write_higgs_tokenizer(LLAMA_DIR, tmp_path / "ours"))
    assert {i: added[i] for i in HIGGS_SPECIAL_TOKENS} == HIGGS_SPECIAL_TOKENS
    assert all(ours.token_id(c) == i for i, c in HIGGS_SPECIAL_TOKENS.items())


@pytest.mark.parametrize("codec", CODECS)
def test_codec_config_parses(codec):
    cfg = CodecConfig.from_file(codec / "config.json")
    raw = json.loads((codec / "config.json").read_text())
    assert (cfg.n_q, cfg.bins, cfg.sample_rate, tuple(cfg.ratios)) == (raw["n_q"], raw["bins"], raw["sample_rate"],
                                                                       tuple(raw["ratios"]))
    assert cfg.frame_rate == 25
    with torch.device("meta"):
        tok = AudioTokenizer(cfg)
    shapes = {k: tuple(v.shape) for k, v in tok.state_dict().items()}
    expected = expected_tensors(shapes, cfg)
    old_to_new, new_shapes = hf_facts("tokenizer_old_to_new.json"), hf_facts("keys_tokenizer_new.json")
    assert set(expected) == set(old_to_new)  # the published model.pth's 602 keys
    # the new layout folds weight_g into weight_v's shape and drops masked_spec_embed: compare the rest
    wrong = {k: (v, new_shapes[old_to_new[k]]) for k, v in expected.items()
             if not k.endswith("weight_g") and old_to_new[k] in new_shapes and list(v) != new_shapes[old_to_new[k]]}
    assert not wrong and sum(old_to_new[k] in new_shapes for k in expected) == 601
