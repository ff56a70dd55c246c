"""Tokenizer config, checkpoint reading and the strict checkpoint -> model key mapping, for both layouts
(layouts.py): the legacy `model.pth` (or a safetensors file with its keys) with weight-norm pairs, and the
transformers `model.safetensors` with renamed modules and folded weights. config.json's `model_type` says which.

The reference loads `model.pth` with `load_state_dict(strict=False)`, which silently ignores any name
mismatch (a renamed key leaves a layer at its random init and nothing complains). Here every one of the
checkpoint's tensors must be either consumed by a parameter or listed by name as deliberately unused;
anything else, and any missing or mis-shaped tensor, is an error that lists the offending keys.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from .. import layouts
from ..constants import DEFAULT_CODEC_REPO as DEFAULT_REPO  # noqa: F401  (re-exported by minihiggs.codec)
from ..errors import CheckpointError, ConfigError
from ..hub import HubMissError, resolve_dir

HUB_FILES = ["config.json", "model.safetensors", "model.pth"]


@dataclass(frozen=True)
class CodecConfig:
    """The parts of the reference's `config.json` that shape the model (see `from_dict` for what is refused)."""

    sample_rate: int = 24000
    ratios: tuple[int, ...] = (8, 5, 4, 2, 3)
    D: int = 256
    n_q: int = 8
    bins: int = 1024
    codebook_dim: int = 64
    semantic_sample_rate: int = 16000
    semantic_dim: int = 768
    acoustic_channels: int = 64  # DAC encoder width, fixed in the reference (`dac2.Encoder(64, ...)`)
    decoder_channels: int = 1024  # DAC decoder width, fixed in the reference (`dac2.Decoder(D, 1024, ...)`)
    layout: str = layouts.LEGACY  # the layout of the files it was read from (names and weight norm)

    @property
    def hop_length(self) -> int:
        return math.prod(self.ratios)

    @property
    def frame_rate(self) -> int:
        return math.ceil(self.sample_rate / self.hop_length)

    @property
    def quantizer_dim(self) -> int:
        return self.D + self.semantic_dim

    @property
    def semantic_downsample(self) -> int:
        """HuBERT frames (320 samples at 16 kHz) per codec frame; the reference keeps every n-th."""
        return int(self.hop_length / (self.sample_rate / self.semantic_sample_rate) / 320)

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "CodecConfig":
        # Options that exist in the reference constructor but that we do not implement; refuse rather than ignore.
        fixed = {
            "semantic_techer": "hubert_base_general", "downsample_mode": "step_down", "vq_scale": 1,
            "merge_mode": "concat", "semantic_mode": "classic",
        }
        # Accepted but without effect on encode/decode in the reference (bandwidth selection is never used).
        inert = {"n_filters", "target_bandwidths", "normalize", "causal", "last_layer_semantic", "device"}
        shaped = {"sample_rate", "ratios", "D", "n_q", "bins", "codebook_dim", "semantic_sample_rate"}
        unknown = sorted(set(d) - set(fixed) - inert - shaped)
        if unknown:
            raise CheckpointError(f"tokenizer config.json has unsupported keys: {unknown}")
        for key, want in fixed.items():
            if key in d and d[key] != want:
                raise CheckpointError(f"tokenizer config.json: {key}={d[key]!r} is not supported (only {want!r})")
        if not isinstance(d.get("bins", 1024), int):
            raise CheckpointError(f"tokenizer config.json: bins={d['bins']!r} selects FSQ, which is not supported")
        if not isinstance(d.get("codebook_dim"), int):
            raise CheckpointError("tokenizer config.json: codebook_dim must be set (an RVQ without projections is not "
                                  "supported)")
        cfg = CodecConfig(
            sample_rate=int(d.get("sample_rate", 16000)),
            ratios=tuple(int(r) for r in d.get("ratios", (8, 5, 4, 2))),
            D=int(d.get("D", 128)),
            n_q=int(d.get("n_q", 8)),
            bins=int(d.get("bins", 1024)),
            codebook_dim=int(d["codebook_dim"]),
            semantic_sample_rate=int(d.get("semantic_sample_rate") or 16000),
        )
        if cfg.semantic_downsample < 1 or \
                cfg.hop_length * cfg.semantic_sample_rate != cfg.semantic_downsample * 320 * cfg.sample_rate:
            raise CheckpointError(
                f"tokenizer config.json: hop {cfg.hop_length} at {cfg.sample_rate} Hz is not a whole number of "
                f"HuBERT frames at {cfg.semantic_sample_rate} Hz"
            )
        return cfg

    @staticmethod
    def from_file(path: str | os.PathLike) -> "CodecConfig":
        """A tokenizer config.json of either layout; a generation model's config.json is refused in one line."""
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: invalid JSON ({e})") from None
        if not isinstance(d, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        if layouts.is_model_config(d):
            raise CheckpointError(f"{Path(path).parent}: this is a model checkpoint, not the audio tokenizer (pass the "
                                  f"tokenizer's directory or Hub id, e.g. {DEFAULT_REPO}, as the codec)")
        if layouts.codec_layout(d) == layouts.LEGACY:
            return CodecConfig.from_dict(d)
        try:
            legacy = layouts.codec_config_to_legacy(d)
        except ConfigError as e:
            raise CheckpointError(f"{path}: {e}") from None
        return dataclasses.replace(CodecConfig.from_dict(legacy), layout=layouts.TRANSFORMERS)


# --- checkpoint files -------------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a `model.pth` (torch.load, weights_only) or `model.safetensors`, on CPU."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        # mmap avoids a second in-RAM copy of the 800 MB file; only the zip format (torch.save default) supports it.
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a flat dict of tensors (a state dict)")
    return sd


def resolve(path_or_repo_id: str | os.PathLike) -> tuple[Path, Path]:
    """(config.json, weights) for a local directory, a local weights file, or a Hub repo id."""
    p = Path(os.path.expanduser(os.fspath(path_or_repo_id)))
    if p.is_file():
        root, weights = p.parent, p
    else:
        root = resolve_dir(path_or_repo_id, what="audio tokenizer", allow_patterns=HUB_FILES)
        weights = None
    config = root / "config.json"
    if not config.is_file():
        raise HubMissError(f"{root}: config.json missing next to the tokenizer weights")
    if weights is None:
        found = [root / n for n in ("model.safetensors", "model.pth") if (root / n).is_file()]
        if not found:
            CodecConfig.from_file(config)  # a (sharded) model checkpoint is named as such first
            raise HubMissError(f"{root}: no model.safetensors (transformers layout) or model.pth (legacy) in the "
                               f"tokenizer directory")
        weights = found[0]
    return config, weights


# --- key mapping ---------------------------------------------------------------------------------------------

# Convs under these prefixes are stored as torch.nn.utils.weight_norm pairs (weight_g [out,1,1], weight_v), norm over
# dim 0.
WEIGHT_NORM_PREFIXES = ("encoder.", "decoder_2.")
# HuBERT's positional conv uses the parametrization API (original0 = g [1,1,k], original1 = v), norm over dim 2.
POS_CONV = "semantic_model.encoder.pos_conv_embed.conv."


def unused_tensors(cfg: CodecConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensors that neither encode nor decode reads, by exact name and shape.

    fc_post1 and decoder_semantic only serve the training-time semantic reconstruction loss; the codebook's
    EMA statistics only matter while training; masked_spec_embed is HuBERT's SpecAugment vector (train only).
    """
    d, q = cfg.semantic_dim, cfg.quantizer_dim
    out: dict[str, tuple[int, ...]] = {
        "fc_post1.weight": (d, q),
        "fc_post1.bias": (d,),
        "decoder_semantic.conv1.conv.weight": (d, d, 3),
        "decoder_semantic.conv2.conv.weight": (d, d, 3),
    }
    for b in range(2):
        p = f"decoder_semantic.conv_blocks.{b}."
        out[p + "conv.conv.weight"] = (d, d, 3)
        out[p + "conv.conv.bias"] = (d,)
        for r in range(2):
            out[p + f"res_units.{r}.conv1.conv.weight"] = (d, d, 3)
            out[p + f"res_units.{r}.conv2.weight"] = (d, d, 1)
    for i in range(cfg.n_q):
        p = f"quantizer.vq.layers.{i}._codebook."
        out[p + "inited"] = (1,)
        out[p + "cluster_size"] = (cfg.bins,)
        out[p + "embed_avg"] = (cfg.bins, cfg.codebook_dim)
    if cfg.layout == layouts.LEGACY:  # (transformers does not save it)
        out["semantic_model.masked_spec_embed"] = (d,)
    return out


def _sources(name: str, shape: tuple[int, ...], cfg: CodecConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensors (minihiggs name -> shape) that produce model tensor `name` of `shape`. The transformers
    layout stores the DAC convs folded (one `weight`), HuBERT's positional conv as the same parametrization pair."""
    if name.startswith(WEIGHT_NORM_PREFIXES) and name.endswith(".weight") and cfg.layout == layouts.LEGACY:
        base = name[: -len("weight")]
        return {base + "weight_g": (shape[0], 1, 1), base + "weight_v": shape}
    if name == POS_CONV + "weight":
        return {POS_CONV + "parametrizations.weight.original0": (1, 1, shape[2]),
                POS_CONV + "parametrizations.weight.original1": shape}
    return {name: shape}


def expected_tensors(model_shapes: Mapping[str, tuple[int, ...]], cfg: CodecConfig) -> dict[str, tuple[int, ...]]:
    """Every checkpoint key (-> shape) this architecture reads or deliberately drops."""
    want: dict[str, tuple[int, ...]] = {}
    for name, shape in model_shapes.items():
        want.update(_sources(name, tuple(shape), cfg))
    want.update(unused_tensors(cfg))
    return want


def check_keys(ckpt_shapes: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]) -> None:
    missing = sorted(set(expected) - set(ckpt_shapes))
    unexpected = sorted(set(ckpt_shapes) - set(expected))
    bad = sorted(f"{k}: {tuple(ckpt_shapes[k])} (expected {expected[k]})"
                 for k in set(expected) & set(ckpt_shapes) if tuple(ckpt_shapes[k]) != tuple(expected[k]))
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {missing}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {unexpected}")
        if bad:
            parts.append(f"{len(bad)} with the wrong shape: {bad}")
        raise CheckpointError("tokenizer checkpoint does not match the architecture; " + "; ".join(parts))


# Checkpoint prefixes only encoding reads (acoustic encoder, HuBERT + semantic conv stack, the prior projection)
# or nothing reads at all (the semantic reconstruction head): optional, and ignored, when loading decode-only.
ENCODER_SIDE_PREFIXES = ("encoder.", "semantic_model.", "encoder_semantic.", "fc_prior.", "fc_post1.",
                         "decoder_semantic.")


def file_keys(names, cfg: CodecConfig) -> dict[str, str]:
    """minihiggs checkpoint name -> the key it has in the files of `cfg.layout`."""
    if cfg.layout == layouts.LEGACY:
        return {n: n for n in names}
    return {n: layouts.codec_key_to_transformers(n, len(cfg.ratios)) for n in names}


def convert_checkpoint(
    ckpt: Mapping[str, torch.Tensor], model_shapes: Mapping[str, tuple[int, ...]], cfg: CodecConfig,
    decode_only: bool = False,
) -> dict[str, torch.Tensor]:
    """Checkpoint tensors -> model state dict: strict key/shape check, weight norm folded, unused tensors dropped.

    Names and shapes are checked before any data is touched, so `ckpt` may hold meta tensors for a dry run.
    decode_only: `model_shapes` is a decode-only model's; encoder-side tensors may be absent (and are ignored),
    every decoder-side tensor is still checked strictly.
    """
    expected = expected_tensors(model_shapes, cfg)
    if decode_only:
        encoder_side = tuple(layouts.codec_prefix(p, cfg.layout) for p in ENCODER_SIDE_PREFIXES)
        ckpt = {k: v for k, v in ckpt.items() if not k.startswith(encoder_side)}
        expected = {k: v for k, v in expected.items() if not k.startswith(ENCODER_SIDE_PREFIXES)}
    names = file_keys(expected, cfg)  # checked under the file's own names, so a report names what the file holds
    check_keys({k: tuple(v.shape) for k, v in ckpt.items()}, {names[k]: s for k, s in expected.items()})
    ckpt = {k: ckpt[names[k]] for k in expected}
    for i in range(cfg.n_q):
        inited = ckpt[f"quantizer.vq.layers.{i}._codebook.inited"]
        if not inited.is_meta and not bool(inited.item()):
            # The reference would run k-means on the first batch it sees and use the result as the codebook.
            raise CheckpointError(f"quantizer.vq.layers.{i}: codebook was never initialised (inited=0); not a trained "
                                  "checkpoint")
    out: dict[str, torch.Tensor] = {}
    for name, shape in model_shapes.items():
        src = _sources(name, tuple(shape), cfg)
        if len(src) == 1:
            out[name] = ckpt[name]
            continue
        g, v = (ckpt[k] for k in src)
        out[name] = layouts.fold_weight_norm(g, v, dim=2 if name.startswith(POS_CONV) else 0)
    return out
