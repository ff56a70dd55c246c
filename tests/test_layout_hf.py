"""The transformers-native layout (`higgs_audio_v2`, the Hub's main since 2026-04) next to the legacy one.

The key maps are checked against ../shared/real-hf (read off transformers' own conversion scripts: an independent
source); models and codecs written in both layouts as real files must give bitwise-identical outputs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import REPO
from safetensors.torch import load_file, save_file
from synth import synth_samples

from minihiggs import HiggsConfig, collate, load_model
from minihiggs.codec import AudioTokenizer
from minihiggs.codec.tiny import write_random_decoder
from minihiggs.config import rope_inv_freq
from minihiggs.errors import CheckpointError, ConfigError
from minihiggs.layouts import codec_key_to_transformers, model_key_to_legacy, model_key_to_transformers
from minihiggs.model.higgs import HiggsAudioModel
from minihiggs.model.tiny import tiny_config, write_tiny_checkpoint

FACTS = REPO.parent / "shared" / "real-hf"
SMALL = dict(hidden=32, heads=4, kv_heads=2, intermediate=48, layers=2, dual_layers=(0, 1))


def _facts(name: str) -> dict:
    return json.loads((FACTS / name).read_text())


def transformers_config(hidden=3072, inter=8192, layers=28, heads=24, kv=8, head_dim=128) -> dict:
    """A `higgs_audio_v2` config.json as transformers 5.x writes it (fields from real-hf/README.md)."""
    return {"architectures": ["HiggsAudioV2ForConditionalGeneration"], "model_type": "higgs_audio_v2",
            "vocab_size": 128256, "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim, "rms_norm_eps": 1e-5,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "max_position_embeddings": 2048,
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 128009, "pad_token_id": 128001,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                "low_freq_factor": 0.125, "high_freq_factor": 0.5,
                                "original_max_position_embeddings": 1024},
            "num_codebooks": 8, "codebook_size": 1026, "audio_token_id": 128016, "audio_bos_token_id": 128013,
            "audio_delay_token_id": 128014, "audio_stream_bos_id": 1024, "audio_stream_eos_id": 1025}


def to_transformers_dir(legacy_dir: Path, out: Path) -> Path:
    """Rewrite a tiny all-DualFFN legacy checkpoint as transformers saves it. The renames are written out here from
    the conversion script's rules (not taken from minihiggs.layouts)."""
    rules = [("audio_codebook_embeddings.", "model.embed_audio_tokens.embed_audio_tokens."),
             ("embed_tokens.", "model.embed_tokens."), ("layers.", "model.layers."), ("norm.", "model.norm."),
             ("audio_decoder_proj.", "")]
    sd = load_file(str(legacy_dir / "model.safetensors"))
    renamed = {}
    for k, v in sd.items():
        old, new = next((o, n) for o, n in rules if k.startswith(o))
        renamed[new + k[len(old):]] = v
    out.mkdir()
    save_file(renamed, str(out / "model.safetensors"), metadata={"format": "pt"})
    raw = json.loads((legacy_dir / "config.json").read_text())["text_config"]
    cfg = transformers_config(raw["hidden_size"], raw["intermediate_size"], raw["num_hidden_layers"],
                              raw["num_attention_heads"], raw["num_key_value_heads"], raw["head_dim"])
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_model_key_map_is_transformers_conversion():
    pairs = _facts("old_to_new.json")
    assert len(pairs) == 397
    assert {k: model_key_to_transformers(k) for k in pairs} == pairs
    assert {v: model_key_to_legacy(v) for v in pairs.values()} == {v: k for k, v in pairs.items()}


def test_codec_key_map_is_transformers_conversion():
    pairs = _facts("tokenizer_old_to_new.json")
    new_keys = set(_facts("keys_tokenizer_new.json"))
    mapped = {k: codec_key_to_transformers(k, n_blocks=5) for k in pairs}
    dropped = sorted(k for k, v in mapped.items() if v is None)
    assert dropped == ["semantic_model.masked_spec_embed"]  # the only tensor transformers does not keep
    assert {k: v for k, v in mapped.items() if v is not None} == {k: v for k, v in pairs.items() if k not in dropped}
    assert set(mapped.values()) - {None} == new_keys  # 602 legacy keys onto exactly the 527 new ones


def test_3b_transformers_config_builds_the_397_keys_and_bytes():
    cfg = HiggsConfig.from_dict(transformers_config())
    assert cfg.layout == "transformers" and cfg.audio_codebook_size == 1024 and cfg.codebook_stride == 1026
    with torch.device("meta"):
        model = HiggsAudioModel(cfg)
    shapes = {model_key_to_transformers(k): list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == _facts("keys_3b_new.json")
    assert sum(math.prod(s) for s in shapes.values()) * 2 == 11_542_566_912  # bf16 bytes of the legacy index
    assert {layer.kind for layer in model.layers} == {"dual"}
    # llama3 rope as {0.125, 0.5, 1024} (transformers) and as {1, 4, 8192} (legacy): the same frequencies at 128
    legacy = HiggsConfig.from_dict(tiny_config(hidden=3072, heads=24, kv_heads=8, layers=1, dual_layers=(0,)))
    assert torch.equal(rope_inv_freq(cfg.text), rope_inv_freq(legacy.text))


def test_tiny_model_in_both_layouts_gives_identical_outputs(tmp_path):
    legacy = write_tiny_checkpoint(tmp_path / "legacy", seed=5, **SMALL)
    new = to_transformers_dir(legacy, tmp_path / "new")
    a, b = load_model(legacy), load_model(new)
    assert b.config.layout == "transformers" and a.config.layout == "legacy"
    batch = collate(synth_samples(2, seed=1), a.config)
    with torch.no_grad():
        ha, hb = a.forward_hidden(batch).hidden, b.forward_hidden(batch).hidden
        la, lb = a(batch), b(batch)
    assert torch.equal(ha, hb)
    assert torch.equal(la.audio_sum, lb.audio_sum) and torch.equal(la.text_sum, lb.text_sum)
    assert a.config.audio_in_token_id == b.config.audio_in_token_id == 128015


def test_transformers_checkpoint_missing_key_is_named_in_its_own_layout(tmp_path):
    new = to_transformers_dir(write_tiny_checkpoint(tmp_path / "legacy", seed=5, **SMALL), tmp_path / "new")
    sd = load_file(str(new / "model.safetensors"))
    del sd["model.layers.1.audio_mlp.up_proj.weight"]
    save_file(sd, str(new / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): model\.layers\.1\.audio_mlp\.up_proj\.weight"):
        load_model(new)


def test_codebook_size_must_count_the_stream_ids():
    with pytest.raises(ConfigError, match="codebook_size=1024 must count"):
        HiggsConfig.from_dict({**transformers_config(), "codebook_size": 1024})


def test_absent_fields_take_the_dataclass_defaults():
    """One source of truth: an absent field means upstream's default, the dataclass's (issue 16)."""
    raw = tiny_config(**SMALL)
    for k in ("use_delay_pattern", "encode_audio_in_tokens"):
        del raw[k]
    del raw["text_config"]["rope_theta"]
    cfg = HiggsConfig.from_dict(raw)
    assert (cfg.use_delay_pattern, cfg.encode_audio_in_tokens, cfg.text.rope_theta) == (False, False, 10000.0)
    del raw["pad_token_id"], raw["text_config"]["pad_token_id"]
    with pytest.raises(ConfigError, match="missing field 'pad_token_id'"):
        HiggsConfig.from_dict(raw)


# ---- audio tokenizer -------------------------------------------------------------------------------------------

TOKENIZER_CONFIG = {  # as transformers 5.x writes HiggsAudioV2TokenizerConfig (the release's values)
    "model_type": "higgs_audio_v2_tokenizer", "architectures": ["HiggsAudioV2TokenizerModel"],
    "sample_rate": 24000, "semantic_sample_rate": 16000, "codebook_size": 1024, "codebook_dim": 64,
    "downsample_factor": 320, "target_bandwidths": [0.5, 1, 1.5, 2], "kernel_size": 3, "unit_kernel_size": 3,
    "channel_ratios": [1, 1], "strides": [1, 1], "block_dilations": [1, 1],
    "acoustic_model_config": {"model_type": "dac", "encoder_hidden_size": 64, "decoder_hidden_size": 1024,
                              "hidden_size": 256, "downsampling_ratios": [8, 5, 4, 2, 3],
                              "upsampling_ratios": [8, 5, 4, 2, 3]},
    "semantic_model_config": {"model_type": "hubert", "hidden_size": 768, "num_hidden_layers": 12,
                              "num_attention_heads": 12, "intermediate_size": 3072},
}


def codec_to_transformers_dir(legacy_dir: Path, out: Path) -> Path:
    """Rewrite a legacy tokenizer as transformers' conversion does: keys by the real-hf map, weight norm folded."""
    pairs = _facts("tokenizer_old_to_new.json")
    sd = load_file(str(legacy_dir / "model.safetensors"))
    new = {}
    for k, v in sd.items():
        if k.endswith(".weight_v"):
            continue
        if k.endswith(".weight_g"):
            # torch._weight_norm: the kernel the legacy model runs on every forward (so decodes compare bitwise)
            v = torch._weight_norm(sd[k[:-1] + "v"], v, 0)
        new[pairs[k]] = v
    out.mkdir()
    save_file(new, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    return out


@pytest.fixture(scope="module")
def codec_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("codec")
    legacy = write_random_decoder(root / "legacy", seed=2)
    return legacy, codec_to_transformers_dir(legacy, root / "new")


def test_codec_in_both_layouts_decodes_identically(codec_dirs):
    legacy, new = codec_dirs
    a = AudioTokenizer.from_pretrained(legacy, decode_only=True)
    b = AudioTokenizer.from_pretrained(new, decode_only=True)
    assert b.cfg.layout == "transformers" and (b.cfg.n_q, b.cfg.ratios) == (8, (8, 5, 4, 2, 3))
    codes = torch.randint(0, 1024, (8, 12), generator=torch.Generator().manual_seed(0))
    wa, wb = a.decode(codes), b.decode(codes)
    assert wa.shape == wb.shape and wa.abs().max() > 0
    assert torch.equal(wa, wb)


def test_codec_missing_key_named_in_the_transformers_layout(codec_dirs, tmp_path):
    _, new = codec_dirs
    broken = tmp_path / "broken"
    broken.mkdir()
    sd = load_file(str(new / "model.safetensors"))
    del sd["acoustic_decoder.block.0.conv_t1.weight"]
    save_file(sd, str(broken / "model.safetensors"))
    (broken / "config.json").write_text((new / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"1 missing: \['acoustic_decoder\.block\.0\.conv_t1\.weight'\]"):
        AudioTokenizer.from_pretrained(broken, decode_only=True)


def test_codec_config_values_the_code_has_built_in_are_checked(codec_dirs, tmp_path):
    _, new = codec_dirs
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "model.safetensors").symlink_to(new / "model.safetensors")
    cfg = json.loads(json.dumps(TOKENIZER_CONFIG))
    cfg["acoustic_model_config"]["encoder_hidden_size"] = 32
    (odd / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"acoustic_model_config\.encoder_hidden_size=32 is not supported"):
        AudioTokenizer.from_pretrained(odd, decode_only=True)


@pytest.mark.parametrize("layout", ["legacy", "transformers"])
def test_codec_pointing_at_a_model_checkpoint_says_so(tmp_path, layout):
    d = write_tiny_checkpoint(tmp_path / "legacy", seed=0, **SMALL)
    if layout == "transformers":
        d = to_transformers_dir(d, tmp_path / "new")
    with pytest.raises(CheckpointError) as e:
        AudioTokenizer.from_pretrained(d, decode_only=True)
    assert "this is a model checkpoint, not the audio tokenizer" in str(e.value)
    assert "\n" not in str(e.value) and "unsupported keys" not in str(e.value)
