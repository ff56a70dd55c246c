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

from .higgs import Attention, DecoderLayer, HiggsAudioModel, apply_rope

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


def _qkv(attn: Attention, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
    b, n, _ = x.shape
    q = attn.q_proj(x).view(b, n, attn.n_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, n, attn.n_kv, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(b, n, attn.n_kv, attn.head_dim).transpose(1, 2)
    cos, sin = rope
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


# ---- prefill ------------------------------------------------------------------------------------------------------
def _prefill_attention(attn: Attention, x, rope, mask, cache: StaticKVCache, layer: int, row: int) -> torch.Tensor:
    """Causal self-attention over the prompt itself (no past); its keys/values go to slots 0..P-1 of `row`."""
    q, k, v = _qkv(attn, x, rope)
    n = x.shape[1]
    ck, cv = cache.kv(layer)
    ck[row, :, :n] = k[0]
    cv[row, :, :n] = v[0]
    if attn.n_kv != attn.n_heads:
        rep = attn.n_heads // attn.n_kv
        k = k[:, :, None].expand(1, attn.n_kv, rep, n, attn.head_dim).reshape(1, attn.n_heads, n, attn.head_dim)
        v = v[:, :, None].expand(1, attn.n_kv, rep, n, attn.head_dim).reshape(1, attn.n_heads, n, attn.head_dim)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return attn.o_proj(out.transpose(1, 2).reshape(1, n, attn.n_heads * attn.head_dim))


def _prefill_layer(layer: DecoderLayer, x, rope, masks, discrete, cache, i, row) -> torch.Tensor:
    """One decoder layer over a whole prompt row (batch 1), routed exactly as the training forward."""
    mask, ff_mask = masks
    n, d = x.shape[1], x.shape[2]
    audio_idx = torch.nonzero(discrete[0]).reshape(-1)
    text_idx = torch.nonzero(~discrete[0]).reshape(-1)
    if layer.kind == "dual":
        h = torch.where(discrete[..., None], layer.audio_input_layernorm(x), layer.input_layernorm(x))
        x = x + _prefill_attention(layer.self_attn, h, rope, mask, cache, i, row)
        flat = x.reshape(n, d)
        ffn = torch.zeros_like(flat)
        ffn = ffn.index_copy(0, text_idx, layer.mlp(layer.post_attention_layernorm(flat.index_select(0, text_idx))))
        ffn = ffn.index_copy(0, audio_idx, layer.audio_mlp(
            layer.audio_post_attention_layernorm(flat.index_select(0, audio_idx))))
        return (flat + ffn).view(1, n, d)
    if layer.kind == "fast_forward":
        h = x + _prefill_attention(layer.self_attn, layer.input_layernorm(x), rope, ff_mask, cache, i, row)
        rows = h.reshape(n, d).index_select(0, text_idx)
        rows = rows + layer.mlp(layer.post_attention_layernorm(rows))
        return x.reshape(n, d).index_copy(0, text_idx, rows).view(1, n, d)
    x = x + _prefill_attention(layer.self_attn, layer.input_layernorm(x), rope, mask, cache, i, row)
    return x + layer.mlp(layer.post_attention_layernorm(x))


@torch.no_grad()
def prefill(model: HiggsAudioModel, cache: StaticKVCache, row: int, x: torch.Tensor,
            discrete: torch.Tensor) -> torch.Tensor:
    """Run prompt row `row` (embeddings x [1, P, H], discrete-audio mask [1, P]) from position 0, filling its
    cache slots 0..P-1. Returns the final-normed hidden states [1, P, H]."""
    n = x.shape[1]
    if n > cache.max_len:
        raise ValueError(f"prompt of {n} positions does not fit a cache of {cache.max_len}")
    dev = x.device
    pos = torch.arange(n, device=dev)[None]
    rope = model.rotary_emb(pos, x.dtype)
    causal = torch.ones(n, n, dtype=torch.bool, device=dev).tril()
    eye = torch.eye(n, dtype=torch.bool, device=dev)
    ff_mask = (causal & ~discrete[:, None, :]) | eye  # audio keys hidden; a query always keeps itself
    masks = (causal[None, None], ff_mask[:, None])
    cache.audio[row].zero_()
    cache.audio[row, :n] = discrete[0]
    for i, layer in enumerate(model.layers):
        x = _prefill_layer(layer, x, rope, masks, discrete, cache, i, row)
    return model.norm(x)


# ---- one token per row ------------------------------------------------------------------------------------------
# The decode step is a few hundred tiny ops per token, so per-op host overhead matters (on CPU it is ~15% of a step
# of the `small` shape): plain Linears are called through F.linear (no module dispatch; a LoRA-wrapped one keeps
# its own forward), and with one position per row [B, 1, heads*d] views straight into [B, heads, 1, d] (no
# transposes). The arithmetic is the same ops in the same order, so results are bit-identical.
def _linear(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, mod.weight) if type(mod) is nn.Linear else mod(x)


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
