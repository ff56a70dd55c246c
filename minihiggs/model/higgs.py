"""The Higgs Audio v2 model: a Llama-3 backbone with DualFFN audio layers, codebook embeddings and heads.

Module paths equal the upstream checkpoint keys (no `model.` prefix), so weights load by name and LoRA
adapters keep PEFT's key layout. The forward takes a `Batch` (see batch.py: the placeholder expansion is
already done on the host) and returns loss *sums and counts* through the fused loss head.

Layer kinds (config.layer_kind):
  dual          shared attention; per position either the audio norms + `audio_mlp` (discrete-audio positions:
                audio-in codes and audio-out) or the text norms + `mlp`.
  fast_forward  every discrete-audio position passes through unchanged and is masked as a key (text cannot
                attend to audio codes in this layer); the rest is a normal Llama layer.
  text          a plain Llama layer (non-dual layers of the `dual_ffn` adapter type), causal.

Attention is confined to each sample of a (possibly packed) row; how the mask is applied (a dense mask,
per-sample calls, or flex_attention's block mask) is an `AttentionSpec` built once per forward (attention.py).
The DualFFN routing is two index lists whose lengths vary per batch: compiled layers see them as dynamic sizes
(`compile_layers`), so any text/audio ratio runs the same graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from ..config import HiggsConfig, TextConfig, rope_inv_freq
from ..data.batch import Batch
from .attention import BACKENDS, AttentionSpec, attend, build_spec, choose_backend
from .linear import Linear, project
from .loss import LossSums, audio_ce_sums, audio_top1_hits, text_ce_sum


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics, cast back before the weight (the Llama convention, matters under bf16)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Embedding(nn.Embedding):
    """`nn.Embedding` whose random init is skipped on the meta device: there it is a no-op anyway (`load_model` builds
    on meta and fills every weight from the checkpoint), but meta `normal_` would load torch._dynamo (~70 MB of RSS)
    into every eager process."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("inv_freq", rope_inv_freq(cfg).to(torch.get_default_device()), persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :].float()
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, heads, L, D]; cos/sin [B, L, D]
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = Linear(h, self.n_heads * self.head_dim, bias=False)
        self.k_proj = Linear(h, self.n_kv * self.head_dim, bias=False)
        self.v_proj = Linear(h, self.n_kv * self.head_dim, bias=False)
        self.o_proj = Linear(self.n_heads * self.head_dim, h, bias=False)

    def forward(self, x: torch.Tensor, ctx: "LayerContext", fast_forward: bool = False) -> torch.Tensor:
        b, n, _ = x.shape
        q = project(self.q_proj, x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = project(self.k_proj, x).view(b, n, self.n_kv, self.head_dim).transpose(1, 2)
        v = project(self.v_proj, x).view(b, n, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = ctx.rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = ctx.attend(q, k, v, fast_forward)  # [B, heads, L, d]
        return project(self.o_proj, out.transpose(1, 2).reshape(b, n, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = Linear(hidden, inter, bias=False)
        self.up_proj = Linear(hidden, inter, bias=False)
        self.down_proj = Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(self.down_proj, swiglu(project(self.gate_proj, x), project(self.up_proj, x)))


class _SwiGLU(torch.autograd.Function):
    """silu(g) * u keeping only g and u for backward (silu is recomputed there): autograd's silu + mul would also
    keep silu(g), one [rows, intermediate] activation more per MLP (~1/4 of a step's activation memory)."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(g, u)
        return F.silu(g) * u

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g, u = ctx.saved_tensors
        sig = torch.sigmoid(g)
        dg = grad * u * sig * (1 + g * (1 - sig)) if ctx.needs_input_grad[0] else None  # silu'(g) = s(1 + g(1 - s))
        du = grad * F.silu(g) if ctx.needs_input_grad[1] else None
        return dg, du


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    # Compiled code keeps plain ops: inductor decides itself what to recompute.
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return F.silu(g) * u
    return _SwiGLU.apply(g, u)


class LayerContext(Protocol):
    """What a decoder layer needs besides its input: rotary tables, attention, and the per-position routing
    between the audio and the text branches. One layer forward (`DecoderLayer.forward`) serves every caller;
    the training / prefill forward (`LayerInputs`, a whole sequence) and the one-token decode step
    (`kv_cache.StepInputs`) differ only in how they implement these."""

    rope: tuple[torch.Tensor, torch.Tensor]
    all_audio: bool  # every position is discrete audio and the caller may skip fast-forward layers outright

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fast_forward: bool) -> torch.Tensor:
        """Roped q [B, heads, L, d], k/v [B, kv_heads, L, d] -> [B, heads, L, d] (fast-forward: audio keys hidden)."""

    def select(self, x: torch.Tensor, audio: Callable, text: Callable) -> torch.Tensor:
        """Per position audio(x) or text(x) for cheap position-wise functions (norms): both may run everywhere."""

    def branch(self, x: torch.Tensor, audio: Callable, text: Callable) -> torch.Tensor:
        """Per position audio(x) or text(x) for the FFNs: each runs only where needed if the context can."""

    def text_only(self, x: torch.Tensor, h: torch.Tensor, text: Callable) -> torch.Tensor:
        """text(h) at text positions, x (unchanged) at discrete-audio positions (fast-forward layers)."""


@dataclass
class LayerInputs:
    """The `LayerContext` of a forward over whole sequences (training, evaluation, generation prefill): per-batch
    tensors every layer needs, computed once per forward. The DualFFN routing is two index lists."""

    rope: tuple[torch.Tensor, torch.Tensor]
    attn: AttentionSpec  # dual and text layers: causal within each sample
    ff_attn: AttentionSpec | None  # fast-forward layers: the same, discrete-audio keys removed (None: no such layer)
    discrete: torch.Tensor  # [B, L, 1] bool
    discrete_idx: torch.Tensor  # flat indices
    other_idx: torch.Tensor
    kv_sink: list | None = None  # when a list, each layer appends its (roped keys, values) [B, kv_heads, L, d]
    all_audio = False  # a whole sequence is never skipped: its text positions need every layer

    def attend(self, q, k, v, fast_forward: bool) -> torch.Tensor:
        if self.kv_sink is not None:  # a generation prefill keeps every layer's keys/values for its KV cache
            self.kv_sink.append((k, v))
        # GQA: the kernels read the n_kv heads directly, K/V are never copied
        return attend(q, k, v, self.ff_attn if fast_forward else self.attn)

    def select(self, x, audio, text) -> torch.Tensor:
        return torch.where(self.discrete, audio(x), text(x))

    def branch(self, x, audio, text) -> torch.Tensor:
        b, n, d = x.shape
        flat = x.reshape(b * n, d)
        out = torch.zeros_like(flat)
        out = out.index_copy(0, self.other_idx, text(flat.index_select(0, self.other_idx)))
        out = out.index_copy(0, self.discrete_idx, audio(flat.index_select(0, self.discrete_idx)))
        return out.view(b, n, d)

    def text_only(self, x, h, text) -> torch.Tensor:
        b, n, d = x.shape
        rows = text(h.reshape(b * n, d).index_select(0, self.other_idx))
        return x.reshape(b * n, d).index_copy(0, self.other_idx, rows).view(b, n, d)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: HiggsConfig, kind: str):
        super().__init__()
        t = cfg.text
        self.kind = kind
        self.self_attn = Attention(t)
        self.mlp = MLP(t.hidden_size, t.intermediate_size)
        self.input_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        if kind == "dual":
            # The reference builds the audio FFN from text_config too (audio_ffn_* sizes are unused).
            self.audio_mlp = MLP(t.hidden_size, t.intermediate_size)
            self.audio_input_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps)
            self.audio_post_attention_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """The layer's routing, the one used by training, generation prefill and decode (see the module doc)."""
        if self.kind == "dual":
            h = ctx.select(x, self.audio_input_layernorm, self.input_layernorm)
            x = x + self.self_attn(h, ctx)
            return x + ctx.branch(x, self._audio_ffn, self._text_ffn)
        if self.kind == "fast_forward":
            if ctx.all_audio:
                return x  # nothing here reads audio positions: the layer (and its cache slot) is skipped
            h = x + self.self_attn(self.input_layernorm(x), ctx, fast_forward=True)
            # Only non-audio rows go through the MLP; audio rows keep the layer input unchanged.
            return ctx.text_only(x, h, self._text_residual_ffn)
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self._text_ffn(x)

    def _text_ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.post_attention_layernorm(x))

    def _audio_ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.audio_mlp(self.audio_post_attention_layernorm(x))

    def _text_residual_ffn(self, h: torch.Tensor) -> torch.Tensor:
        return h + self._text_ffn(h)


class AudioDecoderProjector(nn.Module):
    """The two output heads (`audio_decoder_proj.*` in the checkpoint)."""

    def __init__(self, cfg: HiggsConfig):
        super().__init__()
        h = cfg.text.hidden_size
        self.text_lm_head = Linear(h, cfg.text.vocab_size, bias=False)
        self.audio_lm_head = Linear(h, cfg.audio_num_codebooks * cfg.codebook_stride, bias=False)


@dataclass
class ForwardOutput:
    hidden: torch.Tensor  # [B, L, H] after the final norm
    hidden_states: list[torch.Tensor] | None  # [embeddings, input of layer 1, ..., final normed] if requested
    whisper_hidden: torch.Tensor | None = None  # [C, frames, d] tower output (after its final LayerNorm)
    whisper_embed: torch.Tensor | None = None  # [Σ rows, H] projected rows placed into the sequence


class HiggsAudioModel(nn.Module):
    # Modules `apply_lora` refuses: the fused text loss multiplies by this weight directly, chunk by chunk, so an
    # adapter on it would be silently ignored.
    LORA_UNSUPPORTED = {"audio_decoder_proj.text_lm_head": "the fused text loss head multiplies by the weight "
                                                           "directly; adapt the backbone or the audio head instead"}

    def __init__(self, cfg: HiggsConfig):
        super().__init__()
        self.config = cfg
        t = cfg.text
        self.embed_tokens = Embedding(t.vocab_size, t.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, cfg.layer_kind(i)) for i in range(t.num_hidden_layers)])
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(t)
        self.audio_codebook_embeddings = Embedding(cfg.audio_num_codebooks * cfg.codebook_stride, t.hidden_size)
        self.audio_decoder_proj = AudioDecoderProjector(cfg)
        if cfg.use_audio_out_embed_projector:
            self.audio_out_embed_projector = Linear(t.hidden_size, t.hidden_size, bias=False)
        if cfg.has_audio_tower:
            from .whisper import AudioEncoderProjector, WhisperConfig, WhisperEncoder

            self.audio_tower = WhisperEncoder(WhisperConfig.from_dict(cfg.audio_encoder_config))
            self.audio_encoder_proj = AudioEncoderProjector(self.audio_tower.config.d_model, t.hidden_size)
        offsets = torch.arange(cfg.audio_num_codebooks, device="cpu") * cfg.codebook_stride  # (no meta kernels)
        self.register_buffer("codebook_offsets", offsets.to(torch.get_default_device()), persistent=False)
        self.text_chunk_rows = 1024  # rows of the 128k-wide text head evaluated at once in the fused loss
        # Recompute each decoder layer in backward instead of storing its activations (training only): the
        # 3B model at a few thousand tokens per row otherwise needs tens of GB for activations.
        self.activation_checkpointing = False
        # How attention masks are applied ("auto", "dense", "docs", "flex"; see attention.py) and whether the
        # decoder layers run compiled (`compile_layers`), which "auto" takes into account.
        self.attention_backend = "auto"
        self.layers_compiled = False

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each decoder layer (and each Whisper tower layer) in backward instead of storing its
        activations; training only. The 3B model at a few thousand tokens per row otherwise needs tens of GB."""
        self.activation_checkpointing = bool(enabled)
        if self.config.has_audio_tower:
            self.audio_tower.checkpoint_layers = bool(enabled)

    def compile_layers(self, **compile_kwargs) -> None:
        """torch.compile each decoder layer (layers of one kind share a graph). The trunk is compiled, the fused
        loss head runs eagerly by design (see loss.py). Shapes that change from batch to batch (the DualFFN
        routing lists, always; the row length when it is not fixed) become dynamic sizes instead of recompiles."""
        for layer in self.layers:
            layer.compile(**compile_kwargs)
        self.layers_compiled = True

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (after construction on the meta device)."""
        cfg = self.config
        dev = self.embed_tokens.weight.device
        self.codebook_offsets = (torch.arange(cfg.audio_num_codebooks) * cfg.codebook_stride).to(dev)
        self.rotary_emb.inv_freq = rope_inv_freq(cfg.text).to(dev)

    # ---- embeddings -------------------------------------------------------------------------------------------
    def embed_audio(self, codes: torch.Tensor) -> torch.Tensor:
        """[K, n] codes -> [n, H]: sum (or mean) over codebooks of emb[code_k + k * (codebook_size + 2)]."""
        e = self.audio_codebook_embeddings(codes + self.codebook_offsets[:, None])
        e = e.mean(0) if self.config.audio_embed_avg else e.sum(0)
        if self.config.use_audio_out_embed_projector:
            e = self.audio_out_embed_projector(e)
        return e

    def embed(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        b, n = batch.input_ids.shape
        x = self.embed_tokens(batch.input_ids)
        d = x.shape[-1]
        flat = x.reshape(b * n, d)
        whisper_hidden = whisper_embed = None
        if self.config.has_audio_tower and batch.whisper_features is not None and batch.whisper_features.shape[0] > 0:
            feats = batch.whisper_features.to(self.audio_encoder_proj.linear.weight.dtype)
            whisper_hidden, _ = self.audio_tower(feats, batch.whisper_feature_mask)
            rows = torch.arange(whisper_hidden.shape[1], device=x.device)[None, :] < batch.whisper_rows[:, None]
            whisper_embed = self.audio_encoder_proj(whisper_hidden[rows])
            flat = flat.index_copy(0, batch.whisper_pos, whisper_embed.to(flat.dtype))
        if batch.audio_in_pos.numel() > 0:
            flat = flat.index_copy(0, batch.audio_in_pos, self.embed_audio(batch.audio_in_codes).to(flat.dtype))
        if batch.audio_out_pos.numel() > 0:
            flat = flat.index_copy(0, batch.audio_out_pos, self.embed_audio(batch.audio_out_codes).to(flat.dtype))
        return flat.view(b, n, d), whisper_hidden, whisper_embed

    # ---- trunk ------------------------------------------------------------------------------------------------
    def layer_inputs(self, batch: Batch, dtype: torch.dtype) -> LayerInputs:
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend {self.attention_backend!r}: choose one of {', '.join(BACKENDS)}")
        b, n = batch.input_ids.shape
        seg = batch.segment_ids
        spans = batch.spans
        if seg is None:  # a Batch built by hand without packing information: one sample per row
            seg = torch.where(batch.attention_mask, 0, -1)
            lengths = batch.attention_mask.sum(1).tolist()
            spans = tuple((i, 0, int(m)) for i, m in enumerate(lengths))
        backend = choose_backend(self.attention_backend, batch.input_ids.device, self.layers_compiled,
                                 len(spans) > b, n)
        has_ff = any(layer.kind == "fast_forward" for layer in self.layers)
        return LayerInputs(
            rope=self.rotary_emb(batch.position_ids, dtype),
            attn=build_spec(backend, seg, batch.attention_mask, None, spans),
            ff_attn=build_spec(backend, seg, batch.attention_mask, batch.discrete_mask, spans) if has_ff else None,
            discrete=batch.discrete_mask[:, :, None],
            discrete_idx=batch.discrete_idx, other_idx=batch.other_idx,
        )

    def forward_hidden(self, batch: Batch, output_hidden_states: bool = False,
                       kv_sink: list | None = None) -> ForwardOutput:
        """The trunk over a batch: embeddings, every decoder layer, the final norm. `kv_sink` (a list) receives
        each layer's roped keys and values, in layer order (a generation prefill fills its KV cache from them)."""
        x, wh, we = self.embed(batch)
        li = self.layer_inputs(batch, x.dtype)
        li.kv_sink = kv_sink
        if self.layers_compiled:
            _mark_routing_dynamic(li)
        states = [x] if output_hidden_states else None
        for layer in self.layers:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, li, use_reentrant=False)
            else:
                x = layer(x, li)
            if states is not None:
                states.append(x)
        x = self.norm(x)
        if states is not None:
            states[-1] = x  # the reference's last hidden state is after the final norm
        return ForwardOutput(hidden=x, hidden_states=states, whisper_hidden=wh, whisper_embed=we)

    # ---- heads ------------------------------------------------------------------------------------------------
    def audio_logits(self, rows: torch.Tensor) -> torch.Tensor:
        """[n, H] hidden rows -> [n, K, codebook_size+2] fp32 audio logits."""
        k = self.config.audio_num_codebooks
        return self.audio_decoder_proj.audio_lm_head(rows).float().view(rows.shape[0], k, self.config.codebook_stride)

    def loss_sums(self, hidden: torch.Tensor, batch: Batch) -> LossSums:
        flat = hidden.reshape(-1, hidden.shape[-1])
        head = self.audio_decoder_proj.text_lm_head
        text_sum, text_count = text_ce_sum(flat.index_select(0, batch.text_loss_pos), head.weight,
                                           batch.text_loss_targets, self.text_chunk_rows)
        rows = flat.index_select(0, batch.audio_out_pos.index_select(0, batch.audio_loss_rows))
        logits = self.audio_logits(rows)
        audio_sum, audio_count = audio_ce_sums(logits, batch.audio_loss_targets, self.config.audio_num_codebooks)
        return LossSums(text_sum, text_count, audio_sum, audio_count, audio_top1_hits(logits, batch.audio_loss_targets))

    def forward(self, batch: Batch) -> LossSums:
        return self.loss_sums(self.forward_hidden(batch).hidden, batch)


def _mark_routing_dynamic(li: LayerInputs) -> None:
    """The DualFFN routing lists change length with every batch's text/audio ratio: declare those sizes dynamic
    so compiled layers trace them symbolically once instead of recompiling per batch. (Sizes 0 and 1 would be
    specialised anyway, so they are left alone; such a batch costs one more graph, once.)"""
    for t in (li.discrete_idx, li.other_idx):
        if t.shape[0] >= 2:
            torch._dynamo.mark_dynamic(t, 0)
