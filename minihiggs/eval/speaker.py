"""Speaker similarity (SIM): the x-vector of a WavLM speaker-verification model, pure PyTorch.

Default model: `microsoft/wavlm-base-plus-sv` (transformers' `WavLMForXVector`: WavLM-base-plus fine-tuned on
VoxCeleb1 with an x-vector head and AM-softmax). Seed-TTS-eval scores SIM with a *WavLM-large* fine-tuned for
speaker verification (UniSpeech's `wavlm_large_finetune.pth` with an ECAPA-TDNN head), which is not published in
a loadable safetensors/transformers layout; the base-plus x-vector model is the closest one that is. Its
cosines are therefore on another scale than the paper's SIM (not comparable to upstream's 67.70): compare
models with each other, and with the ground-truth ceiling this command reports, never with published numbers.

Forward path (HF `WavLMForXVector`, `feat_extract_norm="group"`, post-LN encoder), one clip at a time (group
norm over the whole clip makes a padded batch differ from the clip alone):

    h  = feature_projection(conv feature extractor(wave))          # as HuBERT (minihiggs.codec.semantic)
    h  = layer_norm(h + pos_conv(h)); states = [h]
    for layer: h = ln2(h' + ffn(h')), h' = ln1(h + attn(h) + gated relative position bias); states += [h]
    x  = projector(sum softmax(layer_weights)_i * states_i)          # or the last state without the weighted sum
    x  = TDNN layers (dilated conv1d + ReLU); embedding = Linear([mean_t x, std_t x])   (std: unbiased)

The relative position bias (WavLM): bucketed relative distance -> per-head bias (`rel_attn_embed`, layer 0 only,
then reused by every layer), scaled per query by a gate computed from that layer's input
(`gru_rel_pos_linear`, `gru_rel_pos_const`). SIM = cosine of two embeddings.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..codec.semantic import FEATURE_CONVS, FeatureExtractor, FeatureProjection, PositionalConv
from ..errors import CheckpointError, ConfigError
from ..hub import resolve_dir
from ..model.checkpoint import weight_files

DEFAULT_SV = "microsoft/wavlm-base-plus-sv"
HUB_PATTERNS = ["config.json", "preprocessor_config.json", "*.safetensors", "pytorch_model.bin"]
SAMPLE_RATE = 16000


@dataclass
class SpeakerConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    conv_dim: int
    num_conv_pos_embeddings: int
    num_conv_pos_embedding_groups: int
    num_buckets: int
    max_bucket_distance: int
    use_weighted_layer_sum: bool
    tdnn_dim: tuple[int, ...]
    tdnn_kernel: tuple[int, ...]
    tdnn_dilation: tuple[int, ...]
    xvector_output_dim: int

    @classmethod
    def from_dict(cls, d: dict, where: str = "config.json") -> "SpeakerConfig":
        def need(name, want):
            if d.get(name, want) != want:
                raise ConfigError(f"{where}: {name}={d.get(name)!r} is not supported (only {want!r}, as in "
                                  f"{DEFAULT_SV})")

        need("feat_extract_norm", "group")
        need("do_stable_layer_norm", False)
        need("conv_bias", False)
        need("feat_extract_activation", "gelu")
        need("hidden_act", "gelu")
        need("layer_norm_eps", 1e-5)
        need("add_adapter", False)
        if [tuple(x) for x in zip(d.get("conv_kernel", ()), d.get("conv_stride", ()))] != list(FEATURE_CONVS):
            raise ConfigError(f"{where}: conv_kernel/conv_stride must be WavLM's {FEATURE_CONVS}")
        dims = set(d.get("conv_dim", ()))
        if len(dims) != 1:
            raise ConfigError(f"{where}: conv_dim must be one width repeated, got {d.get('conv_dim')}")
        try:
            cfg = cls(conv_dim=dims.pop(), tdnn_dim=tuple(d["tdnn_dim"]), tdnn_kernel=tuple(d["tdnn_kernel"]),
                      tdnn_dilation=tuple(d["tdnn_dilation"]),
                      **{k: d[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                           "intermediate_size", "num_conv_pos_embeddings",
                                           "num_conv_pos_embedding_groups", "num_buckets", "max_bucket_distance",
                                           "xvector_output_dim")},
                      use_weighted_layer_sum=bool(d.get("use_weighted_layer_sum", False)))
        except KeyError as e:
            raise ConfigError(f"{where}: missing field {e.args[0]} (not a WavLMForXVector config?)") from None
        if not len(cfg.tdnn_dim) == len(cfg.tdnn_kernel) == len(cfg.tdnn_dilation):
            raise ConfigError(f"{where}: tdnn_dim, tdnn_kernel and tdnn_dilation must have the same length")
        return cfg


def relative_buckets(length: int, num_buckets: int, max_distance: int, device) -> torch.Tensor:
    """[T, T] bucket of key j relative to query i (T5-style: exact below num_buckets/4, log-spaced above,
    separate halves for keys after / not after the query)."""
    pos = torch.arange(length, device=device)
    rel = pos[None, :] - pos[:, None]
    half = num_buckets // 2
    exact = half // 2
    dist = rel.abs()
    far = exact + (torch.log(dist.clamp(min=1).float() / exact) / math.log(max_distance / exact)
                   * (half - exact)).to(torch.long)
    far = far.clamp(max=half - 1)
    return (rel > 0).long() * half + torch.where(dist < exact, dist, far)


class WavLMAttention(nn.Module):
    def __init__(self, cfg: SpeakerConfig, has_bias_table: bool):
        super().__init__()
        d, self.heads = cfg.hidden_size, cfg.num_attention_heads
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.gru_rel_pos_const = nn.Parameter(torch.ones(1, self.heads, 1, 1))
        self.gru_rel_pos_linear = nn.Linear(d // self.heads, 8)
        if has_bias_table:
            self.rel_attn_embed = nn.Embedding(cfg.num_buckets, self.heads)

    def forward(self, x: torch.Tensor, pos_bias: torch.Tensor) -> torch.Tensor:
        """x [B, T, d]; pos_bias [H, T, T] (ungated)."""
        b, t, d = x.shape

        def split(y):
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        # Gate per (head, query) from this layer's input: the 8 outputs are summed in 2 groups of 4.
        g = self.gru_rel_pos_linear(split(x)).view(b, self.heads, t, 2, 4).sum(-1).sigmoid()
        gate = g[..., :1] * (g[..., 1:] * self.gru_rel_pos_const - 1.0) + 2.0  # [B, H, T, 1]
        o = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                           attn_mask=gate * pos_bias)
        return self.out_proj(o.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    def __init__(self, cfg: SpeakerConfig):
        super().__init__()
        self.intermediate_dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.output_dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_dense(F.gelu(self.intermediate_dense(x)))


class WavLMLayer(nn.Module):
    """Post-LN: ln1(x + attn(x)), then ln2(h + ffn(h))."""

    def __init__(self, cfg: SpeakerConfig, has_bias_table: bool):
        super().__init__()
        self.attention = WavLMAttention(cfg, has_bias_table)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=1e-5)
        self.feed_forward = FeedForward(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=1e-5)

    def forward(self, x: torch.Tensor, pos_bias: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm(x + self.attention(x, pos_bias))
        return self.final_layer_norm(x + self.feed_forward(x))


class WavLMEncoder(nn.Module):
    def __init__(self, cfg: SpeakerConfig):
        super().__init__()
        self.config = cfg
        self.pos_conv_embed = PositionalConv(cfg.hidden_size, cfg.num_conv_pos_embeddings,
                                             cfg.num_conv_pos_embedding_groups)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=1e-5)
        self.layers = nn.ModuleList(WavLMLayer(cfg, i == 0) for i in range(cfg.num_hidden_layers))

    def forward(self, h: torch.Tensor) -> list[torch.Tensor]:
        """Every hidden state: the encoder input (after pos conv + layer_norm) and each layer's output."""
        cfg = self.config
        h = self.layer_norm(h + self.pos_conv_embed(h))
        buckets = relative_buckets(h.shape[1], cfg.num_buckets, cfg.max_bucket_distance, h.device)
        pos_bias = self.layers[0].attention.rel_attn_embed(buckets).permute(2, 0, 1).to(h.dtype)  # [H, T, T]
        states = [h]
        for layer in self.layers:
            h = layer(h, pos_bias)
            states.append(h)
        return states


class WavLM(nn.Module):
    def __init__(self, cfg: SpeakerConfig):
        super().__init__()
        self.feature_extractor = FeatureExtractor(cfg.conv_dim)
        self.feature_projection = FeatureProjection(cfg.conv_dim, cfg.hidden_size)
        self.encoder = WavLMEncoder(cfg)

    def forward(self, wave: torch.Tensor) -> list[torch.Tensor]:
        return self.encoder(self.feature_projection(self.feature_extractor(wave).transpose(1, 2)))


class TDNNLayer(nn.Module):
    """A dilated conv1d whose weight is stored as a Linear over (kernel x in_dim) (HF's `kernel`), then ReLU."""

    def __init__(self, d_in: int, d_out: int, kernel: int, dilation: int):
        super().__init__()
        self.shape, self.dilation = (d_out, kernel, d_in), dilation
        self.kernel = nn.Linear(d_in * kernel, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, d_in] -> [B, T', d_out]
        w = self.kernel.weight.view(self.shape).transpose(1, 2)  # Linear's input is (kernel-major, channel-minor)
        return F.relu(F.conv1d(x.transpose(1, 2), w, self.kernel.bias, dilation=self.dilation)).transpose(1, 2)


class SpeakerEncoder(nn.Module):
    """`WavLMForXVector` without the training-only classifier/objective: wave -> x-vector embedding."""

    def __init__(self, cfg: SpeakerConfig):
        super().__init__()
        self.config = cfg
        self.wavlm = WavLM(cfg)
        if cfg.use_weighted_layer_sum:
            self.layer_weights = nn.Parameter(torch.full((cfg.num_hidden_layers + 1,), 1.0))
        self.projector = nn.Linear(cfg.hidden_size, cfg.tdnn_dim[0])
        dims = (cfg.tdnn_dim[0],) + cfg.tdnn_dim
        self.tdnn = nn.ModuleList(TDNNLayer(dims[i], dims[i + 1], k, dl)
                                  for i, (k, dl) in enumerate(zip(cfg.tdnn_kernel, cfg.tdnn_dilation)))
        self.feature_extractor = nn.Linear(2 * cfg.tdnn_dim[-1], cfg.xvector_output_dim)

    def min_samples(self) -> int:
        """Shortest clip whose TDNN output has 2 frames (the unbiased std needs two)."""
        frames = 2 + sum(dl * (k - 1) for k, dl in zip(self.config.tdnn_kernel, self.config.tdnn_dilation))
        n = frames
        for k, s in reversed(FEATURE_CONVS):
            n = (n - 1) * s + k
        return n

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """[B, n] 16 kHz (every row its full length) -> [B, xvector_output_dim]."""
        states = self.wavlm(wave)
        if self.config.use_weighted_layer_sum:
            w = self.layer_weights.softmax(-1)
            h = sum(wi * s for wi, s in zip(w, states))
        else:
            h = states[-1]
        x = self.projector(h)
        for layer in self.tdnn:
            x = layer(x)
        return self.feature_extractor(torch.cat([x.mean(1), x.std(1)], -1))


# Checkpoint tensors nothing at inference reads: the AM-softmax classifier/objective and SpecAugment's vector.
_UNUSED = ("classifier.", "objective.", "wavlm.masked_spec_embed")
_POS_CONV = "wavlm.encoder.pos_conv_embed.conv."


def convert_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF keys -> ours: unused heads dropped, the positional conv's weight norm (dim 2) folded."""
    out = {k: v for k, v in sd.items() if not k.startswith(_UNUSED)}
    for g_key, v_key in ((_POS_CONV + "weight_g", _POS_CONV + "weight_v"),
                         (_POS_CONV + "parametrizations.weight.original0",
                          _POS_CONV + "parametrizations.weight.original1")):
        if g_key in out and v_key in out:
            g, v = out.pop(g_key), out.pop(v_key)
            out[_POS_CONV + "weight"] = torch._weight_norm(v.float(), g.float(), 2)  # the kernel both APIs call
    return out


def _read_weights(root: Path) -> dict[str, torch.Tensor]:
    pt = root / "pytorch_model.bin"
    if pt.is_file() and not any(root.glob("model*.safetensors*")):
        # some SV repos (wavlm-base-plus-sv among them) predate safetensors: tensors only, never pickled code
        return torch.load(pt, map_location="cpu", weights_only=True)
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in weight_files(root):
        sd.update(load_file(str(f)))
    return sd


class SpeakerScorer:
    """Speaker embeddings of 16 kHz waveforms and their cosine similarity."""

    def __init__(self, path_or_repo: str | os.PathLike = DEFAULT_SV, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        root = resolve_dir(path_or_repo, what="speaker-verification model", allow_patterns=HUB_PATTERNS)
        try:
            cfg = SpeakerConfig.from_dict(json.loads((root / "config.json").read_text()), str(root / "config.json"))
            pre = root / "preprocessor_config.json"
            self.normalize = bool(json.loads(pre.read_text()).get("do_normalize", False)) if pre.is_file() else False
        except (OSError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise CheckpointError(f"{root}: cannot read config.json / preprocessor_config.json ({e})") from None
        model = SpeakerEncoder(cfg)
        sd = convert_state(_read_weights(root))
        want = model.state_dict()
        missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
        if missing or unexpected:
            raise CheckpointError(f"{root}: weights do not match WavLMForXVector: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}")
        model.load_state_dict(sd, strict=True)
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device = torch.device(device)

    def prepare(self, wave_16k) -> torch.Tensor:
        """The model input [n] of one clip: as the repo's feature extractor gives it (zero mean, unit variance
        with `do_normalize`), zero-padded up to the model's shortest input."""
        w = torch.as_tensor(np.asarray(wave_16k, dtype=np.float32)).reshape(-1)
        if self.normalize:  # Wav2Vec2FeatureExtractor: (x - mean) / sqrt(var + 1e-7), population variance
            w = (w - w.mean()) / torch.sqrt(w.var(correction=0) + 1e-7)
        if w.numel() < self.model.min_samples():
            w = F.pad(w, (0, self.model.min_samples() - w.numel()))
        p = next(self.model.parameters())
        return w.to(p.device, p.dtype)

    @torch.no_grad()
    def embed(self, wave_16k) -> torch.Tensor:
        """[xvector_output_dim] float32 embedding of one clip."""
        return self.model(self.prepare(wave_16k)[None])[0].float().cpu()

    def similarity(self, wave_a, wave_b) -> float:
        return cosine(self.embed(wave_a), self.embed(wave_b))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.float()[None], b.float()[None])[0])
