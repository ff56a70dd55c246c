"""The two on-disk layouts of Higgs Audio v2, and the one mapping between them (config and keys, model and codec).

* `legacy`: boson-ai's original files (the Hub's revisions before 2026-04-04). The model's config.json nests the
  Llama fields under `text_config` (`model_type: higgs_audio`); tensor keys are the minihiggs module paths
  (`layers.N...`, `audio_codebook_embeddings.weight`, `audio_decoder_proj.audio_lm_head.weight`). The audio
  tokenizer is `model.pth` + a flat config (`ratios`, `D`, `n_q`, ...) with weight-normed convs (`weight_g`/`weight_v`).
* `transformers`: what transformers >= 5.3 saves (`HiggsAudioV2ForConditionalGeneration`, `model_type:
  higgs_audio_v2`; `HiggsAudioV2TokenizerModel`, `model_type: higgs_audio_v2_tokenizer`) and what the Hub's `main`
  serves since then. A flat model config with `rope_parameters` and `codebook_size` counting the stream BOS/EOS;
  keys under `model.`; the codec as safetensors with renamed modules and weight norm folded into `weight`.

The layout is read from config.json's `model_type`. Internally minihiggs always works in the legacy names and
the legacy config form (`HiggsConfig`, the codec's module tree); this module translates at the file boundary, in
both directions, and is the only code that knows there are two layouts. The transformers model is "every layer
DualFFN, no audio tower, no audio-out projector": legacy checkpoints with fast-forward layers, a Whisper tower
and the like still load, and are refused (one line) only when asked to be written in the transformers layout.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from .constants import DEFAULT_CODEC_REPO
from .errors import ConfigError

LEGACY, TRANSFORMERS = "legacy", "transformers"
LAYOUTS = (LEGACY, TRANSFORMERS)
MODEL_TYPES = {LEGACY: "higgs_audio", TRANSFORMERS: "higgs_audio_v2"}
CODEC_MODEL_TYPE = "higgs_audio_v2_tokenizer"
MODEL_CLASS = "HiggsAudioV2ForConditionalGeneration"

# Ids of the Higgs tokenizer that the transformers config has no field for (`<|AUDIO|>`, `<|audio_eos|>`) or the
# legacy config has none for (`<|reserved_special_token_6|>`, the delay filler). They are vocabulary facts: prep and
# generate check them against the checkpoint's tokenizer.json, so a tokenizer that disagrees is an error there.
AUDIO_IN_TOKEN_ID = 128015
AUDIO_EOS_TOKEN_ID = 128012
AUDIO_DELAY_TOKEN_ID = 128014
EOT_TOKEN_ID = 128009  # `<|eot_id|>`: the converted Hub config's eos (a turn ends there)


def model_layout(raw: Mapping[str, Any]) -> str:
    return TRANSFORMERS if raw.get("model_type") == MODEL_TYPES[TRANSFORMERS] else LEGACY


def is_model_config(raw: Mapping[str, Any]) -> bool:
    """Whether a config.json is a generation model's (either layout), e.g. one handed where a codec is expected."""
    return raw.get("model_type") in MODEL_TYPES.values() or "text_config" in raw


def codec_layout(raw: Mapping[str, Any]) -> str:
    return TRANSFORMERS if raw.get("model_type") == CODEC_MODEL_TYPE else LEGACY


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r} (choose {' or '.join(LAYOUTS)})")
    return layout


# ---- model config -------------------------------------------------------------------------------------------

# Llama fields that sit at the top level in the transformers config and under `text_config` in the legacy one.
TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "hidden_act",
               "attention_bias", "mlp_bias", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings")
# What transformers' `HiggsAudioV2Config` uses when `rope_parameters` is absent.
TRANSFORMERS_DEFAULT_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 0.125,
                             "high_freq_factor": 0.5, "original_max_position_embeddings": 1024}


def model_config_to_legacy(d: Mapping[str, Any]) -> dict:
    """A transformers `higgs_audio_v2` config.json -> the legacy form `HiggsConfig.from_dict` reads."""
    rope = dict(d.get("rope_parameters") or TRANSFORMERS_DEFAULT_ROPE)
    text = {k: d[k] for k in TEXT_FIELDS if k in d}
    if "rope_theta" in rope:
        text["rope_theta"] = rope.pop("rope_theta")
    text["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    size = d.get("codebook_size", 1024)
    bos, eos = d.get("audio_stream_bos_id", 1024), d.get("audio_stream_eos_id", 1025)
    if not (isinstance(size, int) and {bos, eos} == {size - 2, size - 1}):
        raise ConfigError(f"config.json: codebook_size={size!r} must count the codes plus the stream BOS {bos} and "
                          f"EOS {eos} as its last two ids (the released checkpoint has 1026)")
    layers = text.get("num_hidden_layers", 28)
    return {
        "architectures": ["HiggsAudioModel"], "model_type": MODEL_TYPES[LEGACY], "text_config": text,
        "audio_adapter_type": "dual_ffn",
        "audio_dual_ffn_layers": list(range(layers)) if isinstance(layers, int) else [],
        "audio_num_codebooks": d.get("num_codebooks", 8), "audio_codebook_size": size - 2,
        "audio_stream_bos_id": bos, "audio_stream_eos_id": eos,
        "use_delay_pattern": True, "encode_audio_in_tokens": True, "skip_audio_tower": True,
        "encode_whisper_embed": False, "audio_embed_avg": False, "use_audio_out_embed_projector": False,
        "use_audio_out_self_attention": False, "use_rq_transformer": False, "audio_decoder_proj_num_layers": 0,
        "pad_token_id": d.get("pad_token_id"),
        "audio_in_token_idx": AUDIO_IN_TOKEN_ID, "audio_out_token_idx": d.get("audio_token_id", 128016),
        "audio_out_bos_token_id": d.get("audio_bos_token_id", 128013), "audio_eos_token_id": AUDIO_EOS_TOKEN_ID,
    }


def model_config_to_transformers(legacy: Mapping[str, Any], cfg) -> dict:
    """The legacy config.json (`legacy`, parsed as `cfg`, a HiggsConfig) -> a transformers `higgs_audio_v2` one.
    Refuses, naming the field, what the transformers model cannot express."""
    t = cfg.text
    not_expressible = [
        (sorted(cfg.audio_dual_ffn_layers) != list(range(t.num_hidden_layers)),
         f"audio_dual_ffn_layers covers {len(cfg.audio_dual_ffn_layers)} of {t.num_hidden_layers} layers"),
        (cfg.has_audio_tower, "skip_audio_tower=false (a Whisper audio tower)"),
        (cfg.use_audio_out_embed_projector, "use_audio_out_embed_projector=true"),
        (cfg.audio_embed_avg, "audio_embed_avg=true"),
        (not cfg.use_delay_pattern, "use_delay_pattern=false"),
    ]
    why = [msg for bad, msg in not_expressible if bad]
    if why:
        raise ConfigError(f"config.json: {'; '.join(why)}: the transformers layout is every layer DualFFN, no tower, "
                          f"summed codebook embeddings and the delay pattern (keep --layout legacy)")
    text = dict(legacy["text_config"])
    rope = {"rope_type": "default", **(t.rope_scaling or {}), "rope_theta": t.rope_theta}
    rope.pop("type", None)
    out = {"architectures": [MODEL_CLASS], "model_type": MODEL_TYPES[TRANSFORMERS]}
    out.update({k: text[k] for k in TEXT_FIELDS if k in text})
    out.update({
        "head_dim": t.head_dim, "num_key_value_heads": t.num_key_value_heads, "rope_parameters": rope,
        "tie_word_embeddings": False, "pad_token_id": cfg.pad_token_id, "eos_token_id": EOT_TOKEN_ID,
        "num_codebooks": cfg.audio_num_codebooks, "codebook_size": cfg.codebook_stride,
        "audio_token_id": cfg.audio_out_token_id, "audio_bos_token_id": cfg.audio_out_bos_token_id,
        "audio_delay_token_id": AUDIO_DELAY_TOKEN_ID, "audio_stream_bos_id": cfg.audio_stream_bos_id,
        "audio_stream_eos_id": cfg.audio_stream_eos_id,
    })
    if "torch_dtype" in legacy or "dtype" in legacy:
        out["dtype"] = legacy.get("dtype", legacy.get("torch_dtype"))
    return out


def generation_config(cfg) -> dict:
    """generation_config.json for a transformers-layout export (the values the converted Hub repo has)."""
    return {"bos_token_id": cfg.raw.get("text_config", cfg.raw).get("bos_token_id"), "eos_token_id": EOT_TOKEN_ID,
            "pad_token_id": cfg.pad_token_id, "ras_win_len": 7, "ras_win_max_num_repeat": 2, "use_text_head": True}


def processor_config(cfg, codec: str = DEFAULT_CODEC_REPO) -> dict:
    """processor_config.json for a transformers-layout export of a legacy base (the fields transformers'
    `HiggsAudioV2Processor.save_pretrained` writes; the audio tokenizer is referenced by repo id or path)."""
    return {
        "audio_bos_token": "<|audio_out_bos|>", "audio_eos_token": "<|audio_eos|>", "audio_token": "<|AUDIO_OUT|>",
        "audio_stream_bos_id": cfg.audio_stream_bos_id, "audio_stream_eos_id": cfg.audio_stream_eos_id,
        "audio_tokenizer": {"audio_tokenizer_class": "HiggsAudioV2TokenizerModel",
                            "audio_tokenizer_name_or_path": codec},
        "feature_extractor": {"feature_extractor_type": "DacFeatureExtractor", "feature_size": 1, "hop_length": 1,
                              "padding_side": "right", "padding_value": 0.0, "return_attention_mask": True,
                              "sampling_rate": 24000},
        "processor_class": "HiggsAudioV2Processor",
    }


# ---- model keys (also LoRA module paths: the same prefixes without `.weight`) -----------------------------

# (legacy prefix, transformers prefix); a name maps when it equals a prefix or continues it after a dot.
MODEL_PREFIXES = (
    ("audio_codebook_embeddings", "model.embed_audio_tokens.embed_audio_tokens"),
    ("embed_tokens", "model.embed_tokens"),
    ("layers", "model.layers"),
    ("norm", "model.norm"),
    ("audio_decoder_proj.audio_lm_head", "audio_lm_head"),
    ("audio_decoder_proj.text_lm_head", "text_lm_head"),
)


def _swap_prefix(name: str, pairs) -> str | None:
    for old, new in pairs:
        if name == old or name.startswith(old + "."):
            return new + name[len(old):]
    return None


def model_key_to_transformers(name: str) -> str | None:
    """A legacy key or module path -> its transformers name; None for modules the transformers model lacks."""
    return _swap_prefix(name, MODEL_PREFIXES)


def model_key_to_legacy(name: str) -> str | None:
    """A transformers key or module path -> its legacy (minihiggs) name; None when it has no counterpart."""
    return _swap_prefix(name, [(new, old) for old, new in MODEL_PREFIXES])


def model_key(name: str, layout: str) -> str | None:
    """A legacy key or module path in `layout`'s naming."""
    return name if layout == LEGACY else model_key_to_transformers(name)


def naming_of_paths(paths) -> str | None:
    """Which naming a set of module paths uses (an adapter's): transformers paths all have a legacy counterpart
    and legacy ones never start with a transformers prefix. None when neither fits every path."""
    paths = list(paths)
    if paths and all(model_key_to_legacy(p) is not None for p in paths):
        return TRANSFORMERS
    if all(model_key_to_legacy(p) is None for p in paths):
        return LEGACY
    return None


# ---- codec config -------------------------------------------------------------------------------------------

# Fields of the transformers tokenizer config whose value the (legacy-shaped) codec code has built in.
_CODEC_FIXED = {"kernel_size": 3, "channel_ratios": [1, 1], "strides": [1, 1], "block_dilations": [1, 1],
                "unit_kernel_size": 3, "downsample_factor": 320}
_DAC_FIXED = {"encoder_hidden_size": 64, "decoder_hidden_size": 1024}
_HUBERT_FIXED = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                 "conv_dim": [512] * 7, "conv_kernel": [10, 3, 3, 3, 3, 2, 2], "conv_stride": [5, 2, 2, 2, 2, 2, 2],
                 "num_conv_pos_embeddings": 128, "num_conv_pos_embedding_groups": 16, "feat_extract_norm": "group",
                 "do_stable_layer_norm": False, "conv_bias": False, "hidden_act": "gelu"}


def _codec_quantizers(d: Mapping[str, Any], hop: int, sample_rate: int, bins: int) -> int:
    """transformers derives the RVQ depth from the largest target bandwidth (kbps) at 25 Hz x log2(bins) bits."""
    import math

    bandwidths = d.get("target_bandwidths") or [0.5, 1, 1.5, 2, 4]
    frame_rate = math.ceil(sample_rate / hop)
    return int(1000 * bandwidths[-1] // (frame_rate * math.ceil(math.log2(bins))))


def codec_config_to_legacy(d: Mapping[str, Any]) -> dict:
    """A transformers `higgs_audio_v2_tokenizer` config.json -> the legacy flat form `CodecConfig.from_dict` reads.
    Values the codec code has built in must match (an error names the field otherwise)."""
    ac = dict(d.get("acoustic_model_config") or {})
    sem = dict(d.get("semantic_model_config") or {})
    for where, fixed, given in (("", _CODEC_FIXED, d), ("acoustic_model_config.", _DAC_FIXED, ac),
                                ("semantic_model_config.", _HUBERT_FIXED, sem)):
        for k, want in fixed.items():
            if k in given and given[k] != want:
                raise ConfigError(f"tokenizer config.json: {where}{k}={given[k]!r} is not supported (only {want!r})")
    ratios = list(ac.get("downsampling_ratios") or [8, 5, 4, 2])
    if list(ac.get("upsampling_ratios") or ratios) != ratios:
        raise ConfigError(f"tokenizer config.json: acoustic_model_config.upsampling_ratios="
                          f"{ac['upsampling_ratios']} must equal downsampling_ratios={ratios}")
    sample_rate, bins = int(d.get("sample_rate", 24000)), int(d.get("codebook_size", 1024))
    hop = 1
    for r in ratios:
        hop *= int(r)
    return {"sample_rate": sample_rate, "ratios": ratios, "D": int(ac.get("hidden_size", 256)),
            "n_q": _codec_quantizers(d, hop, sample_rate, bins), "bins": bins,
            "codebook_dim": int(d.get("codebook_dim", 64)),
            "semantic_sample_rate": int(d.get("semantic_sample_rate", 16000))}


# ---- codec keys ---------------------------------------------------------------------------------------------

_INNER = ("snake1", "conv1", "snake2", "conv2")  # a DAC residual unit's Sequential, by index
_WEIGHT_NORM = re.compile(r"\.weight_[gv]$")


def _dac_path(path: str, n: int) -> str:
    """A legacy DAC module path (`encoder.block...` / `decoder_2.model...`) -> transformers'; n = len(ratios)."""
    m = re.match(r"(encoder\.block|decoder_2\.model)\.(\d+)(.*)$", path)
    if not m:
        return path
    side, i, rest = m.group(1), int(m.group(2)), m.group(3)
    top = "acoustic_encoder" if side == "encoder.block" else "acoustic_decoder"
    ends = {0: "conv1", n + 1: "snake1", n + 2: "conv2"}
    if i in ends:
        return f"{top}.{ends[i]}{rest}"
    m = re.match(r"\.block\.(\d+)(?:\.block\.(\d+))?(.*)$", rest)
    j, k, tail = int(m.group(1)), m.group(2), m.group(3)
    blk = f"{top}.block.{i - 1}"
    if top == "acoustic_encoder":  # residual units 0-2, snake 3, strided conv 4
        if j <= 2:
            return f"{blk}.res_unit{j + 1}.{_INNER[int(k)]}{tail}"
        return f"{blk}.{'snake1' if j == 3 else 'conv1'}{tail}"
    if j <= 1:  # decoder: snake 0, transposed conv 1, residual units 2-4
        return f"{blk}.{'snake1' if j == 0 else 'conv_t1'}{tail}"
    return f"{blk}.res_unit{j - 1}.{_INNER[int(k)]}{tail}"


_CODEC_RENAMES = ((r"^quantizer\.vq\.layers\.", "quantizer.quantizers."), (r"\._codebook\.", ".codebook."),
                  (r"^fc_prior\.", "fc."), (r"^fc_post1\.", "fc1."), (r"^fc_post2\.", "fc2."),
                  (r"^((?:en|de)coder_semantic\.(?:.*\.)?conv\d?)\.conv\.(weight|bias)$", r"\1.\2"))
CODEC_DROPPED = ("semantic_model.masked_spec_embed",)  # HuBERT's SpecAugment vector, not saved by transformers
# Top-level module prefixes of the tokenizer, legacy -> transformers (the others keep their name).
CODEC_TOP_RENAMES = {"encoder.": "acoustic_encoder.", "decoder_2.": "acoustic_decoder.", "fc_prior.": "fc.",
                     "fc_post1.": "fc1.", "fc_post2.": "fc2."}


def codec_prefix(prefix: str, layout: str) -> str:
    """A legacy top-level tokenizer prefix (`encoder.`, `fc_prior.`, ...) in `layout`'s naming."""
    return CODEC_TOP_RENAMES.get(prefix, prefix) if layout == TRANSFORMERS else prefix


def codec_key_to_transformers(key: str, n_blocks: int) -> str | None:
    """A legacy tokenizer key (a `model.pth` key or a minihiggs codec parameter) -> transformers' name;
    `weight_g`/`weight_v` both name the folded `weight`. None for tensors transformers does not keep."""
    if key in CODEC_DROPPED:
        return None
    key = _WEIGHT_NORM.sub(".weight", key)
    key = _dac_path(key, n_blocks)
    for pattern, repl in _CODEC_RENAMES:
        key = re.sub(pattern, repl, key)
    return key


def fold_weight_norm(g, v, dim: int):
    """The conv weight a weight-norm pair stands for: g * v / ||v|| with the norm over every dim but `dim`.
    torch._weight_norm is the kernel both torch weight-norm APIs run on every forward, so the folded weight is
    bit-identical to what the legacy model computes."""
    import torch

    return torch._weight_norm(v.float(), g.float(), dim)
