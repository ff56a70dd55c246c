"""Incremental (KV-cached) forward of the Higgs model for generation: a preallocated static cache, a prefill of
one prompt row, then one position per row and step (gpt-fast style).

The cache holds keys/values `[B, kv_heads, S, head_dim]` per layer, allocated once for the whole call, plus a
per-slot flag `audio[B, S]` (the slot holds a discrete-audio position). Each row keeps its own length, so a
batch mixes prompts of different lengths, modes and stop points; a step writes row b's new keys at its own
position `pos[b]` and attends over the slots `<= pos[b]`.

Routing per fed element, the same rules as the training forward (higgs.py):
  dual          shared attention, audio norms + `audio_mlp` for an audio column, the text ones otherwise;
  fast_forward  an audio column skips the layer (output = input) and audio slots are never visible as keys,
                so the layer is a plain Llama layer over the text positions only. Positions still advance with
                every fed element: the position of row b's next element is its own count `pos[b]`, never the
                fill level of some layer's cache (upstream's static cache reads that from layer 0, which
                breaks models whose layer 0 is fast-forward; golden README §7 quirk 1);
  text          a plain causal Llama layer over everything (`dual_ffn` adapter type).

`decode_one_token` has static shapes ([B, 1] inputs, fixed S) and no host synchronisation, so it can be
captured in a CUDA graph or compiled; `mode` (a Python string, one graph each) says which paths the batch
needs: "audio" (every row feeds an audio column: fast-forward layers are skipped outright and only the audio
FFNs run), "text" (every row feeds a text token), "mixed" (both, selected per row).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.batch import Batch
from .higgs import Attention, DecoderLayer, HiggsAudioModel, apply_rope
from .linear import Linear, linear

MODES = ("audio", "text", "mixed")


class StaticKVCache(nn.Module):
    """Keys and values of every layer for `batch` rows of up to `max_len` positions (buffers, so a compiled or
    graph-captured step sees fixed addresses)."""

    def __init__(self, model: HiggsAudioModel, batch: int, max_len: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        t = model.config.text
        w = model.embed_tokens.weight
        dtype, device = dtype or w.dtype, device or w.device
        shape = (batch, t.num_key_value_heads, max_len, t.head_dim)
        self.batch, self.max_len = batch, max_len
        self.n_layers = t.num_hidden_layers
        for i in range(self.n_layers):
            self.register_buffer(f"k{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
            self.register_buffer(f"v{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("audio", torch.zeros(batch, max_len, dtype=torch.bool, device=device), persistent=False)
        self.register_buffer("slots", torch.arange(max_len, device=device), persistent=False)
        self.register_buffer("rows", torch.arange(batch, device=device), persistent=False)

    def kv(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"k{i}"), getattr(self, f"v{i}")


# ---- prefill ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def prefill(model: HiggsAudioModel, cache: StaticKVCache, row: int, batch: Batch) -> torch.Tensor:
    """Run one prompt (a collated one-row `Batch`, no padding) from position 0 through the model's own training
    forward, and keep every layer's keys/values in slots 0..P-1 of cache row `row` (a fast-forward layer's keys at
    the prompt's audio columns are stored too, but flagged audio and never visible). Returns the final-normed
    hidden states [1, P, H]."""
    n = batch.input_ids.shape[1]
    if n > cache.max_len:
        raise ValueError(f"prompt of {n} positions does not fit a cache of {cache.max_len}")
    sink: list = []
    hidden = model.forward_hidden(batch, kv_sink=sink).hidden
    for i, (k, v) in enumerate(sink):
        ck, cv = cache.kv(i)
        ck[row, :, :n] = k[0]
        cv[row, :, :n] = v[0]
    cache.audio[row].zero_()
    cache.audio[row, :n] = batch.discrete_mask[0]
    return hidden


# ---- one token per row ------------------------------------------------------------------------------------------
# The decode step is a few hundred tiny ops per token, so per-op host overhead matters (on CPU it is ~15% of a step
# of the `small` shape): plain Linears are called through `model.linear.linear` (no module dispatch; frozen fp32
# weights on CPU still take its oneDNN GEMM; a LoRA-wrapped one keeps its own forward), and with one position per
# row [B, 1, heads*d] views straight into [B, heads, 1, d] (no transposes). Same arithmetic as the module calls.
def _linear(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return linear(x, mod.weight) if type(mod) in (nn.Linear, Linear) else mod(x)


def _mlp(mlp, x: torch.Tensor) -> torch.Tensor:
    return _linear(mlp.down_proj, F.silu(_linear(mlp.gate_proj, x)) * _linear(mlp.up_proj, x))


def _step_attention(attn: Attention, x, rope, mask, cache: StaticKVCache, layer: int, pos) -> torch.Tensor:
    """x [B, 1, H]: write each row's key/value at its slot pos[b], attend over the visible slots."""
    b = x.shape[0]
    cos, sin = rope
    q = _linear(attn.q_proj, x).view(b, attn.n_heads, 1, attn.head_dim)
    k = _linear(attn.k_proj, x).view(b, attn.n_kv, 1, attn.head_dim)
    v = _linear(attn.v_proj, x).view(b, attn.n_kv, 1, attn.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    ck, cv = cache.kv(layer)
    ck[cache.rows, :, pos] = k[:, :, 0]
    cv[cache.rows, :, pos] = v[:, :, 0]
    # GQA without copying the cache: the `rep` query heads sharing one kv head become `rep` query rows of it.
    rep = attn.n_heads // attn.n_kv
    out = F.scaled_dot_product_attention(q.view(b, attn.n_kv, rep, attn.head_dim), ck, cv, attn_mask=mask)
    return _linear(attn.o_proj, out.reshape(b, 1, attn.n_heads * attn.head_dim))


def _step_layer(layer: DecoderLayer, x, rope, masks, is_audio, cache, i, pos, mode: str) -> torch.Tensor:
    mask, ff_mask = masks
    if layer.kind == "dual":
        if mode == "audio":
            x = x + _step_attention(layer.self_attn, layer.audio_input_layernorm(x), rope, mask, cache, i, pos)
            return x + _mlp(layer.audio_mlp, layer.audio_post_attention_layernorm(x))
        if mode == "text":
            x = x + _step_attention(layer.self_attn, layer.input_layernorm(x), rope, mask, cache, i, pos)
            return x + _mlp(layer.mlp, layer.post_attention_layernorm(x))
        a = is_audio[:, None, None]
        h = torch.where(a, layer.audio_input_layernorm(x), layer.input_layernorm(x))
        x = x + _step_attention(layer.self_attn, h, rope, mask, cache, i, pos)
        return x + torch.where(a, _mlp(layer.audio_mlp, layer.audio_post_attention_layernorm(x)),
                               _mlp(layer.mlp, layer.post_attention_layernorm(x)))
    if layer.kind == "fast_forward":
        if mode == "audio":
            return x  # every row feeds audio: the layer is skipped and its cache slot left unwritten
        h = x + _step_attention(layer.self_attn, layer.input_layernorm(x), rope, ff_mask, cache, i, pos)
        out = h + _mlp(layer.mlp, layer.post_attention_layernorm(h))
        # (an audio row's key written here is never visible: its slot is flagged audio)
        return out if mode == "text" else torch.where(is_audio[:, None, None], x, out)
    x = x + _step_attention(layer.self_attn, layer.input_layernorm(x), rope, mask, cache, i, pos)
    return x + _mlp(layer.mlp, layer.post_attention_layernorm(x))


@torch.no_grad()
def decode_one_token(model: HiggsAudioModel, cache: StaticKVCache, x: torch.Tensor, pos: torch.Tensor,
                     is_audio: torch.Tensor, mode: str) -> torch.Tensor:
    """One new element per row: embeddings x [B, 1, H] at positions pos [B] (int64), is_audio [B] bool (an audio
    column, else a text token). Returns the final-normed hidden states [B, H]. Static shapes, no host sync."""
    cache.audio[cache.rows, pos] = is_audio
    rope = model.rotary_emb(pos[:, None], x.dtype)
    own = cache.slots[None, :] == pos[:, None]
    visible = cache.slots[None, :] <= pos[:, None]
    # Fast-forward layers never see audio keys; a query keeps its own slot so that no softmax row is empty (an
    # audio row's result there is discarded).
    ff_visible = (visible & ~cache.audio) | own
    masks = (visible[:, None, None, :], ff_visible[:, None, None, :])
    for i, layer in enumerate(model.layers):
        x = _step_layer(layer, x, rope, masks, is_audio, cache, i, pos, mode)
    return model.norm(x)[:, 0]
