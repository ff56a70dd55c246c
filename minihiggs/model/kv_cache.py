"""Incremental (KV-cached) forward of the Higgs model for generation: a preallocated static cache, a prefill of
one prompt row, then one position per row and step (gpt-fast style).

The cache holds keys/values `[B, kv_heads, S, head_dim]` per layer, allocated once for the whole call, plus a
per-slot flag `audio[B, S]` (the slot holds a discrete-audio position). Each row keeps its own length, so a
batch mixes prompts of different lengths, modes and stop points; a step writes row b's new keys at its own
position `pos[b]` and attends over the slots `<= pos[b]`.

Routing per fed element: the training forward's own, `DecoderLayer.forward` (higgs.py), run with this module's
`StepInputs` as its `LayerContext` (one position per row, the cache as the attention's keys and values):
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
from .higgs import HiggsAudioModel

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
class StepInputs:
    """The `LayerContext` (higgs.py) of one decode step: each row's one new element, its keys/values written into
    the cache at the row's own slot and attended over the visible slots. `mode` (a Python string: one graph each)
    decides the routing statically where the batch allows it ("audio": every row feeds an audio column; "text":
    every row feeds a text token) and per row with `torch.where` otherwise ("mixed")."""

    def __init__(self, cache: StaticKVCache, rope, pos: torch.Tensor, is_audio: torch.Tensor, mode: str):
        if mode not in MODES:
            raise ValueError(f"decode mode {mode!r}: choose one of {', '.join(MODES)}")
        self.cache, self.rope, self.pos, self.mode = cache, rope, pos, mode
        self.is_audio = is_audio[:, None, None]
        self.all_audio = mode == "audio"
        self.layer = 0  # the layer being run: whose cache `attend` reads and writes
        own = cache.slots[None, :] == pos[:, None]
        visible = cache.slots[None, :] <= pos[:, None]
        # Fast-forward layers never see audio keys; a query keeps its own slot so that no softmax row is empty (an
        # audio row's result there is discarded, and its key, written here, is never visible: its slot is flagged).
        ff_visible = (visible & ~cache.audio) | own
        self.mask, self.ff_mask = visible[:, None, None, :], ff_visible[:, None, None, :]

    def attend(self, q, k, v, fast_forward: bool) -> torch.Tensor:
        """q [B, heads, 1, d], k/v [B, kv_heads, 1, d]: write each row's key/value at its slot pos[b], attend over
        the visible slots."""
        b, heads, _, d = q.shape
        ck, cv = self.cache.kv(self.layer)
        ck[self.cache.rows, :, self.pos] = k[:, :, 0]
        cv[self.cache.rows, :, self.pos] = v[:, :, 0]
        # GQA without copying the cache: the `rep` query heads sharing one kv head become `rep` query rows of it.
        n_kv = k.shape[1]
        out = F.scaled_dot_product_attention(q.reshape(b, n_kv, heads // n_kv, d), ck, cv,
                                             attn_mask=self.ff_mask if fast_forward else self.mask)
        return out.reshape(b, heads, 1, d)

    def select(self, x, audio, text) -> torch.Tensor:
        if self.mode == "audio":
            return audio(x)
        if self.mode == "text":
            return text(x)
        return torch.where(self.is_audio, audio(x), text(x))

    branch = select  # one position per row: both FFNs run on every row of a mixed step anyway

    def text_only(self, x, h, text) -> torch.Tensor:
        out = text(h)
        return out if self.mode == "text" else torch.where(self.is_audio, x, out)


@torch.no_grad()
def decode_one_token(model: HiggsAudioModel, cache: StaticKVCache, x: torch.Tensor, pos: torch.Tensor,
                     is_audio: torch.Tensor, mode: str) -> torch.Tensor:
    """One new element per row: embeddings x [B, 1, H] at positions pos [B] (int64), is_audio [B] bool (an audio
    column, else a text token). Returns the final-normed hidden states [B, H]. Static shapes, no host sync."""
    cache.audio[cache.rows, pos] = is_audio
    step = StepInputs(cache, model.rotary_emb(pos[:, None], x.dtype), pos, is_audio, mode)
    for i, layer in enumerate(model.layers):
        step.layer = i
        x = layer(x, step)  # the training forward's routing (DecoderLayer.forward), one position per row
    return model.norm(x)[:, 0]
