"""Attention masking for one forward: which keys each query sees (`AttentionSpec`), and the kernels applying it.

The rule, identical for every backend:
  * causal within one sample: a row may hold several samples (packing); a query sees the keys of its own sample
    at or before its position;
  * fast-forward layers: discrete-audio keys are removed (text cannot attend to audio codes in those layers);
  * a query always sees itself, so a padded query (which sees nothing else) never softmaxes over nothing (NaN).

Backends (`HiggsAudioModel.attention_backend`, "auto" picks per batch, see `choose_backend`):
  dense  one [B, 1, L, L] boolean mask for `scaled_dot_product_attention`. O(L^2) memory and work per row;
         measured the fastest for short single-sample rows on CPU, and what compiled CPU layers use.
  docs   one causal SDPA call per sample span (the spans come from collate, on the host: no device sync), the
         padding tail copied from V (a query that sees only itself). Work is the sum of l^2 over samples instead
         of L^2 per row (6x faster than `dense` on a packed 2048-position row on CPU). A Python loop over spans:
         eager only (under torch.compile it would specialise on every batch's boundaries).
  flex   `flex_attention` with a `BlockMask` built from the same rule: blocks that no query may see are skipped,
         no dense mask exists. Its fused kernel needs torch.compile, so it is the choice for compiled CUDA layers.
         (torch 2.13 runs flex_attention's forward on CPU, eager or compiled, but has no CPU backward.)

Grouped-query attention runs without copying K/V (`enable_gqa=True`, torch >= 2.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "dense", "docs", "flex")
# Rows up to this length that hold one sample each use the dense mask on CPU (measured: at 512 positions dense
# and per-sample calls cost the same; at 1024 per-sample calls are ~30% faster, and far more on packed rows).
DENSE_MAX_LEN_CPU = 512


@dataclass
class AttentionSpec:
    """How one forward masks attention in one kind of layer (built once per forward, shared by its layers)."""

    backend: str
    mask: torch.Tensor | None = None  # dense: [B, 1, L, L] bool
    spans: tuple[tuple[int, int, int], ...] | None = None  # docs: (row, start, stop) of every sample, row-major
    span_masks: tuple[torch.Tensor | None, ...] | None = None  # docs: per span [l, l] bool (fast-forward) or None
    row_len: int = 0  # docs: L
    block_mask: object | None = None  # flex: torch.nn.attention.flex_attention.BlockMask


def choose_backend(requested: str, device: torch.device, compiled: bool, packed: bool, row_len: int) -> str:
    if requested != "auto":
        return requested
    if compiled:
        return "flex" if device.type == "cuda" else "dense"
    if device.type == "cuda":
        return "dense"  # SDPA's memory-efficient kernel takes the mask; `docs` would launch many small kernels
    return "docs" if packed or row_len > DENSE_MAX_LEN_CPU else "dense"


def build_spec(backend: str, segment_ids: torch.Tensor, valid: torch.Tensor, discrete: torch.Tensor | None,
               spans: tuple[tuple[int, int, int], ...]) -> AttentionSpec:
    """segment_ids [B, L] (sample index within its row, -1 at padding), valid [B, L] bool, discrete [B, L] bool
    when discrete-audio keys are removed (fast-forward layers), else None."""
    n = segment_ids.shape[1]
    if backend == "dense":
        pos = torch.arange(n, device=segment_ids.device)
        causal = pos[None, :, None] >= pos[None, None, :]
        keys = valid if discrete is None else valid & ~discrete
        mask = causal & (segment_ids[:, :, None] == segment_ids[:, None, :]) & keys[:, None, :]
        mask = mask | torch.eye(n, dtype=torch.bool, device=segment_ids.device)
        return AttentionSpec("dense", mask=mask[:, None])
    if backend == "docs":
        span_masks = None
        if discrete is not None:
            masks = []
            for row, s, e in spans:
                m = torch.ones(e - s, e - s, dtype=torch.bool, device=segment_ids.device).tril()
                m = (m & ~discrete[row, s:e][None, :]) | torch.eye(e - s, dtype=torch.bool, device=m.device)
                masks.append(m)
            span_masks = tuple(masks)
        return AttentionSpec("docs", spans=spans, span_masks=span_masks, row_len=n)
    if backend == "flex":
        return AttentionSpec("flex", block_mask=_block_mask(segment_ids, valid, discrete))
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _block_mask(segment_ids: torch.Tensor, valid: torch.Tensor, discrete: torch.Tensor | None):
    from torch.nn.attention.flex_attention import create_block_mask

    keys = valid if discrete is None else valid & ~discrete

    def mask_mod(b, h, q, k):
        return ((segment_ids[b, q] == segment_ids[b, k]) & (k <= q) & keys[b, k]) | (q == k)

    b, n = segment_ids.shape
    return create_block_mask(mask_mod, b, None, n, n, device=segment_ids.device)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """q [B, H, L, D], k/v [B, H_kv, L, D] (H a multiple of H_kv) -> [B, H, L, D]."""
    gqa = q.shape[1] != k.shape[1]
    if spec.backend == "dense":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=spec.mask, enable_gqa=gqa)
    if spec.backend == "flex":
        return _flex(q, k, v, block_mask=spec.block_mask, enable_gqa=gqa)
    return _docs(q, k, v, spec, gqa)


def _flex(q, k, v, block_mask, enable_gqa):
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def _docs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, gqa: bool) -> torch.Tensor:
    rep = q.shape[1] // k.shape[1]
    rows: list[list[torch.Tensor]] = [[] for _ in range(q.shape[0])]
    ends = [0] * q.shape[0]
    for i, (row, s, e) in enumerate(spec.spans):
        sl = slice(s, e)
        m = spec.span_masks[i] if spec.span_masks is not None else None
        rows[row].append(F.scaled_dot_product_attention(q[row:row + 1, :, sl], k[row:row + 1, :, sl],
                                                        v[row:row + 1, :, sl], attn_mask=m, is_causal=m is None,
                                                        enable_gqa=gqa))
        ends[row] = e
    out = []
    for row, pieces in enumerate(rows):
        if ends[row] < spec.row_len:  # padding: each query sees only itself, so its output is its own value
            tail = v[row:row + 1, :, ends[row]:]
            pieces.append(tail.repeat_interleave(rep, dim=1) if rep > 1 else tail)
        out.append(torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0])
    return torch.cat(out, dim=0) if len(out) > 1 else out[0]
