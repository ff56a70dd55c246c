"""Batch building: `collate(samples, config) -> Batch`.

The reference expands `<|AUDIO|>` / `<|AUDIO_OUT|>` placeholders into audio columns *inside* the model, with
data-dependent scatter code. We do that expansion here, on the host, once per batch: the model then sees a
fixed layout (token ids, masks, flat index lists) and its forward has no data-dependent Python control flow,
which keeps it simple and `torch.compile`-friendly. Everything the loss needs (shifted targets) is also
prepared here, so the model never calls `nonzero()`.

Semantics (reference collator + merge, real-token results identical):
* each code segment becomes input `[BOS, codes, EOS]` and labels `[-100, codes, EOS]`, delay pattern applied
  to both (BOS/EOS fill for inputs, -100 for labels); a segment whose placeholder text label is -100 gets
  all -100 audio labels; the `<|AUDIO_OUT|>` text label is masked.
* an `<|AUDIO|>` placeholder expands to [Whisper rows of its chunk (tower checkpoints only), then its code
  columns]; an `<|AUDIO_OUT|>` to its code columns. Audio positions carry text label -100.
* rows are right-padded to a multiple of `round_to` (8) of the longest merged row (or to a fixed `length`).
The input samples are never mutated (the reference collator mutates labels; see the golden README, quirk 8).

Packing (`collate_rows`): a row may hold several samples back to back. Each gets its own `segment_ids` value and
positions restarting at 0; text targets never cross from one sample into the next (nor do audio targets: column 0
of every segment has no label), and attention stays inside each sample (model/attention.py), so every sample's
losses and gradients are those it has alone. `collate(samples)` puts one sample in each row.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Sequence

import torch

from ..audio.mel import whisper_rows
from ..config import HiggsConfig
from ..constants import IGNORE_INDEX as IGNORE
from .sample import Sample


def delay_pattern(codes: torch.Tensor, bos: int, eos: int) -> torch.Tensor:
    """[K, n] -> [K, n + K - 1]: codebook k shifted right by k; the left triangle is `bos`, the right `eos`."""
    k, n = codes.shape
    out = torch.full((k, n + k - 1), eos, dtype=codes.dtype)
    for i in range(k):
        out[i, :i] = bos
        out[i, i:i + n] = codes[i]
    return out


def revert_delay_pattern(columns: torch.Tensor) -> torch.Tensor:
    """Inverse of `delay_pattern`: [K, T] -> [K, T - K + 1], codebook k keeping its columns k .. T - K + k."""
    k, t = columns.shape
    n = max(t - k + 1, 0)
    return torch.stack([columns[i, i:i + n] for i in range(k)]) if k else columns[:, :n]


def segment_columns(codes: torch.Tensor, cfg: HiggsConfig, trained: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One code segment -> (input columns [K, n+2(+K-1)], label columns of the same shape)."""
    k = cfg.audio_num_codebooks
    codes = codes[:k].long()
    bos = torch.full((k, 1), cfg.audio_stream_bos_id, dtype=torch.long)
    eos = torch.full((k, 1), cfg.audio_stream_eos_id, dtype=torch.long)
    inputs = torch.cat([bos, codes, eos], dim=1)
    labels = torch.cat([torch.full((k, 1), IGNORE, dtype=torch.long), codes, eos], dim=1)
    if cfg.use_delay_pattern:
        inputs = delay_pattern(inputs, cfg.audio_stream_bos_id, cfg.audio_stream_eos_id)
        labels = delay_pattern(labels, IGNORE, IGNORE)
    if not trained:
        labels = torch.full_like(labels, IGNORE)
    return inputs, labels


class PositionKind(IntEnum):
    """What a merged position holds (collate's per-position bookkeeping)."""

    PAD = -1
    TEXT = 0
    AUDIO_IN = 1  # a code column of an <|AUDIO|> segment (discrete audio)
    AUDIO_OUT = 2  # a code column of an <|AUDIO_OUT|> segment (discrete audio)
    WHISPER = 3  # a Whisper tower row of an <|AUDIO|> clip (continuous: routed like text)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L] merged token ids (placeholder id at audio columns, pad id at padding)
    attention_mask: torch.Tensor  # [B, L] bool
    position_ids: torch.Tensor  # [B, L] int64
    labels: torch.Tensor  # [B, L] text labels at the same positions as inputs (-100 at audio/padding)
    discrete_mask: torch.Tensor  # [B, L] bool: audio-in code columns | audio-out columns
    audio_out_mask: torch.Tensor  # [B, L] bool
    audio_in_mask: torch.Tensor  # [B, L] bool: audio-in code columns and Whisper rows
    discrete_idx: torch.Tensor  # [D] flat (b*L+t) indices of discrete-audio positions
    other_idx: torch.Tensor  # [B*L-D] flat indices of every other position (text, Whisper rows, padding)
    audio_in_pos: torch.Tensor  # [M] flat positions of audio-in code columns (row-major)
    audio_in_codes: torch.Tensor  # [K, M]
    audio_out_pos: torch.Tensor  # [N] flat positions of audio-out columns (row-major = stream order)
    audio_out_codes: torch.Tensor  # [K, N]
    audio_out_labels: torch.Tensor  # [K, N] aligned with audio_out_codes (the loss shifts by one column)
    text_loss_pos: torch.Tensor  # [R] flat positions t whose next label (t+1, same row) is a target
    text_loss_targets: torch.Tensor  # [R] those labels
    audio_loss_rows: torch.Tensor  # [Q] indices into the N audio-out columns that have any target next column
    audio_loss_targets: torch.Tensor  # [Q, K] label column j+1 for each such column j (-100 = no target)
    whisper_features: torch.Tensor | None = None  # [C, mel, 3000] one row per <|AUDIO|> chunk (tower only)
    whisper_feature_mask: torch.Tensor | None = None  # [C, 3000]
    whisper_pos: torch.Tensor | None = None  # [Σ rows] flat positions of Whisper rows, chunk after chunk
    whisper_rows: torch.Tensor | None = None  # [C] rows used from each chunk
    segment_ids: torch.Tensor | None = None  # [B, L] int64: the sample's index within its row, -1 at padding
    # (row, start, stop) of every sample, row-major: plain ints that stay on the host (attention spans)
    spans: tuple[tuple[int, int, int], ...] = ()

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        return Batch(**kw)

    def pin_memory(self) -> "Batch":
        kw = {f.name: (v.pin_memory() if isinstance(v, torch.Tensor) else v)
              for f in fields(self) for v in [getattr(self, f.name)]}
        return Batch(**kw)

    def target_counts(self) -> tuple[int, torch.Tensor]:
        """(text targets, per-codebook audio targets) — known before the forward, for global normalisation."""
        text = int(self.text_loss_targets.numel())
        audio = (self.audio_loss_targets != IGNORE).sum(0).cpu() if self.audio_loss_targets.numel() else \
            torch.zeros(self.audio_out_codes.shape[0], dtype=torch.long)
        return text, audio

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) positions, counted on the host (no device sync)."""
        return sum(e - s for _, s, e in self.spans) if self.spans else int(self.attention_mask.sum())

    @property
    def packed(self) -> bool:
        """Whether some row holds more than one sample."""
        return len(self.spans) > self.input_ids.shape[0]


def _check_sample(s: Sample, cfg: HiggsConfig) -> None:
    s.validate(cfg.audio_in_token_id, cfg.audio_out_token_id, cfg.audio_num_codebooks)
    if cfg.uses_whisper_features and s.whisper_features is None and bool((s.input_ids == cfg.audio_in_token_id).any()):
        raise ValueError(f"sample {s.sample_id!r}: this checkpoint has a Whisper audio tower "
                         "(skip_audio_tower=false, encode_whisper_embed=true) but the sample has no whisper_features; "
                         "re-run prep.py with this checkpoint")


def _expand(s: Sample, cfg: HiggsConfig) -> dict:
    """Expand one sample's placeholders. Returns per-position lists plus the audio pieces of this sample."""
    ids: list[int] = []
    labels: list[int] = []
    kind: list[int] = []  # a PositionKind per position
    in_cols, out_cols, out_labels, whisper_chunks = [], [], [], []
    seg = 0
    whisper_i = 0
    use_whisper = cfg.uses_whisper_features
    tok_ids = s.input_ids.tolist()
    tok_labels = s.label_ids.tolist()
    for tok, lab in zip(tok_ids, tok_labels):
        if tok == cfg.audio_in_token_id:
            if use_whisper:
                feats = s.whisper_features[whisper_i]
                n_mel = int(s.whisper_lengths[whisper_i])
                rows = whisper_rows(n_mel)
                whisper_chunks.append((feats, n_mel, rows))
                whisper_i += 1
                ids += [tok] * rows
                labels += [IGNORE] * rows
                kind += [PositionKind.WHISPER] * rows
            codes = s.audio_codes[seg]
            seg += 1
            if cfg.encode_audio_in_tokens:
                cols, _ = segment_columns(codes, cfg, trained=False)
                in_cols.append(cols)
                n = cols.shape[1]
                ids += [tok] * n
                labels += [IGNORE] * n
                kind += [PositionKind.AUDIO_IN] * n
        elif tok == cfg.audio_out_token_id:
            cols, lab_cols = segment_columns(s.audio_codes[seg], cfg, trained=lab != IGNORE)
            seg += 1
            out_cols.append(cols)
            out_labels.append(lab_cols)
            n = cols.shape[1]
            ids += [tok] * n
            labels += [IGNORE] * n  # the <|AUDIO_OUT|> text label is always masked
            kind += [PositionKind.AUDIO_OUT] * n
        else:
            ids.append(tok)
            labels.append(lab)
            kind.append(PositionKind.TEXT)
    return dict(ids=ids, labels=labels, kind=kind, in_cols=in_cols, out_cols=out_cols, out_labels=out_labels,
                whisper=whisper_chunks)


def _merge_row(samples: Sequence[Sample], cfg: HiggsConfig) -> dict:
    """The samples of one row back to back: their expansions concatenated, plus each sample's length."""
    parts = [_expand(s, cfg) for s in samples]
    row = {key: [x for p in parts for x in p[key]] for key in parts[0]}
    row["lengths"] = [len(p["ids"]) for p in parts]
    return row


def collate(samples: list[Sample], cfg: HiggsConfig, round_to: int = 8) -> Batch:
    """Build a right-padded `Batch`, one sample per row. Pure: the samples are not modified."""
    if not samples:
        raise ValueError("collate: empty list of samples")
    return collate_rows([[s] for s in samples], cfg, round_to)


def collate_rows(rows: Sequence[Sequence[Sample]], cfg: HiggsConfig, round_to: int = 8,
                 length: int | None = None) -> Batch:
    """Build a `Batch` whose row i holds the samples `rows[i]` back to back (packing), right-padded to a multiple
    of `round_to` of the longest row, or to `length` when given (a fixed shape for compiled layers; a longer row
    is never cut: the longest row wins). Pure: the samples are not modified."""
    if not rows or not all(len(r) for r in rows):
        raise ValueError("collate_rows: every row needs at least one sample")
    for r in rows:
        for s in r:
            _check_sample(s, cfg)
    # (upstream-layout samples: one placeholder triple per chunk of a long Whisper clip)
    rows = [_merge_row([s.expanded(cfg.audio_in_token_id) for s in r], cfg) for r in rows]
    b = len(rows)
    length = max([len(r["ids"]) for r in rows] + [length or 0])
    length = (length + round_to - 1) // round_to * round_to
    k = cfg.audio_num_codebooks

    input_ids = torch.full((b, length), cfg.pad_token_id, dtype=torch.long)
    labels = torch.full((b, length), IGNORE, dtype=torch.long)
    kind = torch.full((b, length), PositionKind.PAD, dtype=torch.long)
    segment_ids = torch.full((b, length), -1, dtype=torch.long)
    # The reference's positions are cumsum(mask) - 1 in a row and 1 at masked positions; here they restart at
    # every sample of a packed row.
    position_ids = torch.ones((b, length), dtype=torch.long)
    spans = []
    for i, r in enumerate(rows):
        n = len(r["ids"])
        input_ids[i, :n] = torch.tensor(r["ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(r["labels"], dtype=torch.long)
        kind[i, :n] = torch.tensor(r["kind"], dtype=torch.long)
        start = 0
        for j, m in enumerate(r["lengths"]):
            segment_ids[i, start:start + m] = j
            position_ids[i, start:start + m] = torch.arange(m)
            spans.append((i, start, start + m))
            start += m
    attention = segment_ids >= 0

    flat_kind = kind.reshape(-1)
    discrete = (kind == PositionKind.AUDIO_IN) | (kind == PositionKind.AUDIO_OUT)
    audio_in_pos = torch.nonzero(flat_kind == PositionKind.AUDIO_IN).reshape(-1)
    audio_out_pos = torch.nonzero(flat_kind == PositionKind.AUDIO_OUT).reshape(-1)

    def cat_cols(cols: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(cols, dim=1) if cols else torch.zeros((k, 0), dtype=torch.long)

    audio_in_codes = cat_cols([c for r in rows for c in r["in_cols"]])
    audio_out_codes = cat_cols([c for r in rows for c in r["out_cols"]])
    audio_out_labels = cat_cols([c for r in rows for c in r["out_labels"]])
    assert audio_in_codes.shape[1] == audio_in_pos.numel() and audio_out_codes.shape[1] == audio_out_pos.numel()

    # Text targets: position t predicts the label at t+1 of the same sample.
    nxt = torch.full_like(labels, IGNORE)
    nxt[:, :-1] = labels[:, 1:].masked_fill(segment_ids[:, 1:] != segment_ids[:, :-1], IGNORE)
    text_loss_pos = torch.nonzero(nxt.reshape(-1) != IGNORE).reshape(-1)
    text_loss_targets = nxt.reshape(-1)[text_loss_pos]

    # Audio targets: column j predicts label column j+1 of the concatenated audio-out stream. Column 0 of every
    # segment is -100 in all codebooks, so a segment's last column never pairs with the next segment.
    shifted = torch.full_like(audio_out_labels, IGNORE)
    shifted[:, :-1] = audio_out_labels[:, 1:]
    audio_loss_rows = torch.nonzero((shifted != IGNORE).any(0)).reshape(-1)
    audio_loss_targets = shifted[:, audio_loss_rows].T.contiguous()

    batch = Batch(
        input_ids=input_ids, attention_mask=attention, position_ids=position_ids, labels=labels,
        discrete_mask=discrete, audio_out_mask=kind == PositionKind.AUDIO_OUT,
        audio_in_mask=(kind == PositionKind.AUDIO_IN) | (kind == PositionKind.WHISPER),
        discrete_idx=torch.nonzero(discrete.reshape(-1)).reshape(-1),
        other_idx=torch.nonzero(~discrete.reshape(-1)).reshape(-1),
        audio_in_pos=audio_in_pos, audio_in_codes=audio_in_codes,
        audio_out_pos=audio_out_pos, audio_out_codes=audio_out_codes, audio_out_labels=audio_out_labels,
        text_loss_pos=text_loss_pos, text_loss_targets=text_loss_targets,
        audio_loss_rows=audio_loss_rows, audio_loss_targets=audio_loss_targets,
        segment_ids=segment_ids, spans=tuple(spans),
    )
    if cfg.uses_whisper_features:
        chunks = [c for r in rows for c in r["whisper"]]
        n_mel = int(cfg.audio_encoder_config.get("num_mel_bins", 128)) if cfg.audio_encoder_config else 128
        if chunks:
            feats = torch.stack([c[0].float() for c in chunks])
            frames = feats.shape[-1]
            mask = torch.arange(frames)[None, :] < torch.tensor([c[1] for c in chunks])[:, None]
            batch.whisper_features = feats
            batch.whisper_feature_mask = mask.int()
            batch.whisper_rows = torch.tensor([c[2] for c in chunks], dtype=torch.long)
        else:
            batch.whisper_features = torch.zeros((0, n_mel, 3000))
            batch.whisper_feature_mask = torch.zeros((0, 3000), dtype=torch.int32)
            batch.whisper_rows = torch.zeros(0, dtype=torch.long)
        batch.whisper_pos = torch.nonzero(flat_kind == PositionKind.WHISPER).reshape(-1)
        assert int(batch.whisper_rows.sum()) == batch.whisper_pos.numel()
    return batch
