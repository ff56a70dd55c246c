"""Model configuration, parsed from a Higgs Audio v2 checkpoint's `config.json` (either layout, see layouts.py).

Special-token ids come from the config (the transformers layout lacks two, which layouts.py supplies and prep /
generate check against the tokenizer). A field absent from config.json takes the dataclass default below, the one
place defaults are written (upstream's own defaults). Options the model cannot honour are refused with an error
naming the field and its value, instead of being silently ignored.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from . import layouts
from .errors import ConfigError


@dataclass
class TextConfig:
    """The Llama-3 backbone (`text_config` of the checkpoint)."""

    vocab_size: int = 128256
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 28
    num_attention_heads: int = 24
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # Llama's default; every Higgs config sets 500000
    rope_scaling: dict | None = None
    max_position_embeddings: int = 131072
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    pad_token_id: int | None = None

    @staticmethod
    def from_dict(d: dict) -> "TextConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"config.json: text_config: expected an object, got {type(d).__name__}")
        f = _Fields(d, "text_config.")
        _refuse(d, "text_config.hidden_act", d.get("hidden_act", "silu"), {"silu"})
        _refuse(d, "text_config.attention_bias", bool(d.get("attention_bias", False)), {False})
        _refuse(d, "text_config.mlp_bias", bool(d.get("mlp_bias", False)), {False})
        heads = f.int("num_attention_heads", minimum=1)
        hidden = f.int("hidden_size", minimum=1)
        head_dim = f.int("head_dim", None, minimum=1)
        if head_dim is None:
            if hidden % heads:
                raise ConfigError(f"config.json: text_config.hidden_size={hidden} is not divisible by "
                                  f"num_attention_heads={heads} (give text_config.head_dim)")
            head_dim = hidden // heads
        kv = f.int("num_key_value_heads", heads, minimum=1)
        if heads % kv:
            raise ConfigError(f"config.json: text_config.num_attention_heads={heads} is not a multiple of "
                              f"num_key_value_heads={kv}")
        return TextConfig(
            vocab_size=f.int("vocab_size", minimum=1),
            hidden_size=hidden,
            intermediate_size=f.int("intermediate_size", minimum=1),
            num_hidden_layers=f.int("num_hidden_layers", minimum=1),
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            rms_norm_eps=f.float("rms_norm_eps", _default(TextConfig, "rms_norm_eps")),
            rope_theta=f.float("rope_theta", _default(TextConfig, "rope_theta")),
            rope_scaling=_rope_scaling(d.get("rope_scaling")),
            max_position_embeddings=f.int("max_position_embeddings", _default(TextConfig, "max_position_embeddings"),
                                          minimum=1),
            pad_token_id=f.int("pad_token_id", None),
        )


@dataclass
class HiggsConfig:
    text: TextConfig
    audio_adapter_type: str = "dual_ffn_fast_forward"
    audio_dual_ffn_layers: list[int] = field(default_factory=list)
    audio_num_codebooks: int = 8
    audio_codebook_size: int = 1024
    audio_stream_bos_id: int = 1024
    audio_stream_eos_id: int = 1025
    use_delay_pattern: bool = False  # (upstream's defaults; the released checkpoint sets both true)
    encode_audio_in_tokens: bool = False
    audio_embed_avg: bool = False
    use_audio_out_embed_projector: bool = False
    skip_audio_tower: bool = True
    encode_whisper_embed: bool = False
    audio_encoder_config: dict | None = None
    pad_token_id: int | None = None
    audio_in_token_id: int = 0  # (required in config.json; 0 only for a hand-built config)
    audio_out_token_id: int = 0
    audio_out_bos_token_id: int | None = None
    audio_eos_token_id: int | None = None
    raw: dict = field(default_factory=dict, repr=False)  # the full config.json as read (either layout)
    layout: str = layouts.LEGACY  # the layout config.json was in (`layouts.LEGACY` / `layouts.TRANSFORMERS`)

    @property
    def codebook_stride(self) -> int:
        """Rows per codebook in the embedding/head: the codes plus the stream BOS and EOS."""
        return self.audio_codebook_size + 2

    @property
    def extra_audio_columns(self) -> int:
        """Merged columns a code segment adds beyond its frames: stream BOS + EOS, plus K-1 for the delay pattern."""
        return 2 + (self.audio_num_codebooks - 1 if self.use_delay_pattern else 0)

    @property
    def has_audio_tower(self) -> bool:
        return not self.skip_audio_tower

    @property
    def uses_whisper_features(self) -> bool:
        """Whether batches need Whisper log-mel features (prep computes them only then)."""
        return self.encode_whisper_embed and not self.skip_audio_tower

    def layer_kind(self, i: int) -> str:
        """'dual' (shared attention, text/audio FFNs), 'fast_forward' (audio passes through) or 'text'."""
        if i in self.audio_dual_ffn_layers:
            return "dual"
        return "fast_forward" if self.audio_adapter_type == "dual_ffn_fast_forward" else "text"

    @staticmethod
    def from_dict(d: dict) -> "HiggsConfig":
        """Parse a config.json of either layout (told apart by `model_type`)."""
        if not isinstance(d, dict):
            raise ConfigError(f"config.json: expected a JSON object, got {type(d).__name__}")
        if layouts.model_layout(d) == layouts.TRANSFORMERS:
            cfg = HiggsConfig._from_legacy_dict(layouts.model_config_to_legacy(d))
            cfg.raw, cfg.layout = d, layouts.TRANSFORMERS
            return cfg
        return HiggsConfig._from_legacy_dict(d)

    @staticmethod
    def _from_legacy_dict(d: dict) -> "HiggsConfig":
        if "text_config" not in d:
            raise ConfigError("config.json: missing field 'text_config' and model_type is not "
                              f"'{layouts.MODEL_TYPES[layouts.TRANSFORMERS]}' (is this a Higgs Audio v2 checkpoint?)")
        text = TextConfig.from_dict(d["text_config"])
        f = _Fields(d, "")
        _refuse(d, "audio_adapter_type", d.get("audio_adapter_type"), {"dual_ffn", "dual_ffn_fast_forward"})
        _refuse(d, "audio_decoder_proj_num_layers", int(d.get("audio_decoder_proj_num_layers") or 0), {0})
        _refuse(d, "use_rq_transformer", bool(d.get("use_rq_transformer", False)), {False})
        _refuse(d, "use_audio_out_self_attention", bool(d.get("use_audio_out_self_attention", False)), {False})
        skip_tower = bool(d.get("skip_audio_tower", _default(HiggsConfig, "skip_audio_tower")))
        encode_whisper = bool(d.get("encode_whisper_embed", _default(HiggsConfig, "encode_whisper_embed")))
        if not skip_tower and not d.get("audio_encoder_config"):
            raise ConfigError("config.json: skip_audio_tower=false but audio_encoder_config is missing")
        layers = d.get("audio_dual_ffn_layers") or []
        if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise ConfigError(f"config.json: audio_dual_ffn_layers={layers!r} must be a list of layer indices")
        bad = [i for i in layers if not 0 <= i < text.num_hidden_layers]
        if bad:
            raise ConfigError(f"config.json: audio_dual_ffn_layers={layers} has indices outside "
                              f"[0, {text.num_hidden_layers})")
        dflt = {name: _default(HiggsConfig, name) for name in (
            "audio_num_codebooks", "audio_codebook_size", "audio_stream_bos_id", "audio_stream_eos_id",
            "use_delay_pattern", "encode_audio_in_tokens", "audio_embed_avg", "use_audio_out_embed_projector",
            "skip_audio_tower", "encode_whisper_embed")}
        cfg = HiggsConfig(
            text=text,
            audio_adapter_type=d["audio_adapter_type"],
            audio_dual_ffn_layers=layers,
            audio_num_codebooks=f.int("audio_num_codebooks", dflt["audio_num_codebooks"], minimum=1),
            audio_codebook_size=f.int("audio_codebook_size", dflt["audio_codebook_size"], minimum=1),
            audio_stream_bos_id=f.int("audio_stream_bos_id", dflt["audio_stream_bos_id"]),
            audio_stream_eos_id=f.int("audio_stream_eos_id", dflt["audio_stream_eos_id"]),
            use_delay_pattern=bool(d.get("use_delay_pattern", dflt["use_delay_pattern"])),
            encode_audio_in_tokens=bool(d.get("encode_audio_in_tokens", dflt["encode_audio_in_tokens"])),
            audio_embed_avg=bool(d.get("audio_embed_avg", dflt["audio_embed_avg"])),
            use_audio_out_embed_projector=bool(d.get("use_audio_out_embed_projector",
                                                     dflt["use_audio_out_embed_projector"])),
            skip_audio_tower=skip_tower,
            encode_whisper_embed=encode_whisper,
            audio_encoder_config=d.get("audio_encoder_config"),
            pad_token_id=_pad_token_id(f.int("pad_token_id", None), text.pad_token_id),
            audio_in_token_id=f.int("audio_in_token_idx", minimum=0),
            audio_out_token_id=f.int("audio_out_token_idx", minimum=0),
            audio_out_bos_token_id=f.int("audio_out_bos_token_id", None),
            audio_eos_token_id=f.int("audio_eos_token_id", None),
            raw=d,
        )
        for name in ("audio_in_token_id", "audio_out_token_id"):
            v = getattr(cfg, name)
            if v >= text.vocab_size:
                raise ConfigError(f"config.json: {name.replace('_id', '_idx')}={v} is outside text_config.vocab_size "
                                  f"{text.vocab_size}")
        for name in ("audio_stream_bos_id", "audio_stream_eos_id"):
            v = getattr(cfg, name)
            if not cfg.audio_codebook_size <= v < cfg.codebook_stride:
                raise ConfigError(f"config.json: {name}={v} must be in [audio_codebook_size, audio_codebook_size+2)")
        return cfg

    @staticmethod
    def from_file(path: str | os.PathLike) -> "HiggsConfig":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: invalid JSON ({e})") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read ({e.strerror or e}) (is --base_ckpt a Higgs Audio v2 "
                              f"checkpoint directory?)") from None
        try:
            return HiggsConfig.from_dict(d)
        except ConfigError as e:
            msg = str(e).removeprefix("config.json: ")
            raise ConfigError(f"{path}: {msg}") from None


def _default(cls, name: str) -> Any:
    """The dataclass default of `cls.name`: what an absent config.json field means (written once, above)."""
    return cls.__dataclass_fields__[name].default


def _pad_token_id(top: int | None, text: int | None) -> int:
    """The padding id: the top-level field, else text_config's (older configs put it there only)."""
    if top is None and text is None:
        raise ConfigError("config.json: missing field 'pad_token_id' (neither at the top level nor in text_config)")
    return top if top is not None else text


_REQUIRED = object()


class _Fields:
    """Typed reads of one config.json object: a missing or mistyped field is a ConfigError naming it (a KeyError
    or `int('four')` would surface as a traceback without the field's path)."""

    def __init__(self, d: dict, prefix: str):
        self.d, self.prefix = d, prefix

    def _get(self, key: str, default: Any) -> Any:
        v = self.d.get(key)
        if v is None:
            if default is _REQUIRED:
                raise ConfigError(f"config.json: missing field '{self.prefix}{key}' (every Higgs Audio v2 config "
                                  f"has it: is this config.json complete?)")
            return default
        return v

    def int(self, key: str, default: Any = _REQUIRED, minimum: int | None = None) -> Any:
        v = self._get(key, default)
        if v is default:
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or isinstance(v, float) and not v.is_integer():
            raise ConfigError(f"config.json: {self.prefix}{key}={v!r} must be an integer")
        if minimum is not None and v < minimum:
            raise ConfigError(f"config.json: {self.prefix}{key}={v!r} must be >= {minimum}")
        return int(v)

    def float(self, key: str, default: Any = _REQUIRED) -> Any:
        v = self._get(key, default)
        if v is default:
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"config.json: {self.prefix}{key}={v!r} must be a finite number")
        return float(v)


ROPE_LLAMA3_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope_scaling(rs: Any) -> dict | None:
    """`text_config.rope_scaling`, checked here so that a bad one fails with the config, not at model build."""
    if rs is None:
        return None
    if not isinstance(rs, dict):
        raise ConfigError(f"config.json: text_config.rope_scaling={rs!r} must be an object or null")
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return rs
    if kind != "llama3":
        raise ConfigError(f"config.json: unsupported text_config.rope_scaling.rope_type={kind!r} (supported: 'llama3')")
    f = _Fields(rs, "text_config.rope_scaling.")
    vals = {k: f.float(k) for k in ROPE_LLAMA3_FIELDS}
    if not (vals["factor"] > 0 and vals["high_freq_factor"] > vals["low_freq_factor"] > 0
            and vals["original_max_position_embeddings"] > 0):
        raise ConfigError(f"config.json: text_config.rope_scaling={rs!r}: needs factor > 0, high_freq_factor > "
                          f"low_freq_factor > 0 and original_max_position_embeddings > 0")
    return rs


def _refuse(d: dict, name: str, value: Any, allowed: set) -> None:
    if value not in allowed:
        raise ConfigError(f"config.json: unsupported {name}={value!r} (supported: {sorted(map(repr, allowed))})")


def rope_inv_freq(cfg: TextConfig):
    """RoPE inverse frequencies, including the `llama3` long-context rescaling.

    Both parameterisations seen in the wild ({low 1, high 4, original 8192} and {0.125, 0.5, 1024}) go through
    the same formula: wavelengths shorter than original/high_freq_factor keep their frequency, those longer than
    original/low_freq_factor are divided by `factor`, and the band between is smoothly interpolated.
    Computed in float32 with the same operation order as the reference, so the frequencies are bit-identical.
    """
    import torch

    dim = cfg.head_dim
    # On the CPU whatever the ambient device (a meta-device build would otherwise run these ops as meta kernels)
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    rs = cfg.rope_scaling
    if not rs:
        return inv
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return inv
    if kind != "llama3":
        raise ConfigError(f"config.json: unsupported text_config.rope_scaling.rope_type={kind!r} (supported: 'llama3')")
    factor = float(rs["factor"])
    low = float(rs["low_freq_factor"])
    high = float(rs["high_freq_factor"])
    old_ctx = float(rs["original_max_position_embeddings"])
    low_wavelen = old_ctx / low
    high_wavelen = old_ctx / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)
