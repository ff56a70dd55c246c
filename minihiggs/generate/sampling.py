"""Token selection exactly as upstream generation does it: logits processors, text selection, and the audio-column
selection with repetition-aware sampling (RAS) and the delay-pattern counters (golden README §4.3-4.5).

Everything here runs on CPU float32 tensors with a per-row `torch.Generator`: the random calls (one
`multinomial` on `[1, vocab]` per sampled text step; one on `[8, 1026]` per sampled audio step, then one on
`[r, 1026]` with replacement when RAS picks r rows) have the shapes and order of upstream's one-prompt calls, so
a seeded generation gives upstream's codes, and a row of a batch gets what it gets alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings of one request (upstream serve-engine argument names and defaults)."""

    temperature: float = 0.7  # 0: greedy (no processors at all)
    top_k: int | None = None  # None / 0: off
    top_p: float = 0.95  # >= 1: off
    ras_win_len: int | None = 7  # None / <= 0: RAS off
    ras_win_max_num_repeat: int = 2
    seed: int | None = None  # None: the global torch generator (not reproducible unless torch is seeded)

    @property
    def do_sample(self) -> bool:
        return self.temperature != 0

    @property
    def ras(self) -> bool:
        return self.ras_win_len is not None and self.ras_win_len > 0

    def validate(self) -> "SamplingConfig":
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p:
            raise ValueError(f"top_p must be > 0, got {self.top_p}")
        if self.ras_win_max_num_repeat < 1:
            raise ValueError(f"ras_win_max_num_repeat must be >= 1, got {self.ras_win_max_num_repeat}")
        return self

    def generator(self) -> torch.Generator | None:
        """A fresh CPU generator for one request (upstream: one per generate call)."""
        return torch.Generator().manual_seed(self.seed) if self.seed is not None else None

    def processors(self) -> list[tuple[str, float]]:
        """Upstream's warper list (transformers 4.46 order), only when sampling: temperature if != 1, top-k if
        set, top-p if < 1."""
        if not self.do_sample:
            return []
        out: list[tuple[str, float]] = []
        if self.temperature != 1.0:
            out.append(("temperature", float(self.temperature)))
        if self.top_k:
            out.append(("top_k", int(self.top_k)))
        if self.top_p < 1.0:
            out.append(("top_p", float(self.top_p)))
        return out


def process(scores: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Apply the processors to [rows, vocab] float32 scores, with the same tensor ops as transformers 4.46's
    TemperatureLogitsWarper / TopKLogitsWarper / TopPLogitsWarper (filter value -inf, min_tokens_to_keep 1)."""
    for name, value in cfg.processors():
        if name == "temperature":
            scores = scores / value
        elif name == "top_k":
            k = min(max(int(value), 1), scores.shape[-1])
            kth = torch.topk(scores, k)[0][..., -1, None]
            scores = scores.masked_fill(scores < kth, -float("inf"))
        else:
            sorted_logits, sorted_idx = torch.sort(scores, descending=False)
            cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            remove = cum <= (1 - value)
            remove[..., -1:] = False  # the largest entry always stays
            scores = scores.masked_fill(remove.scatter(1, sorted_idx, remove), -float("inf"))
    return scores


def select_text(logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator | None) -> int:
    """logits [1, vocab] float32 -> the next text token: argmax of the raw logits (first maximum) when greedy,
    else one multinomial draw from the processed distribution."""
    if not cfg.do_sample:
        return int(torch.argmax(logits[0]))
    probs = torch.softmax(process(logits, cfg), dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen)[0, 0])


@dataclass
class DelayState:
    """Delay-pattern counters of the audio segment being generated (reset for each segment)."""

    num_delay: int = 0  # codebooks already released from the leading BOS triangle, minus one
    num_remaining: int | None = None  # columns left after the first EOS (None: no EOS seen yet)


@dataclass(frozen=True)
class AudioIds:
    num_codebooks: int
    bos: int  # stream BOS code (1024)
    eos: int  # stream EOS code (1025)
    audio_out_token: int  # <|AUDIO_OUT|>
    audio_eos_token: int  # <|audio_eos|>
    delay_pattern: bool = True


@dataclass
class AudioSelection:
    tokens: torch.Tensor  # [K] the column to emit
    text_token: int  # <|AUDIO_OUT|>, or <|audio_eos|> when this column completes the segment
    pre_ras_tokens: torch.Tensor  # [K] step-1 selection (argmax / sample), before RAS and the delay pattern
    ras_resampled: torch.Tensor  # [K] bool: rows redrawn by RAS
    scores: torch.Tensor  # [K, C] processed scores (the raw logits when greedy)
    state: DelayState = field(default_factory=DelayState)


def select_audio(raw: torch.Tensor, window: torch.Tensor, state: DelayState, cfg: SamplingConfig,
                 gen: torch.Generator | None, ids: AudioIds) -> AudioSelection:
    """One audio column from the raw logits [K, C] (float32) of the fed column (golden README §4.4).

    `window` [K, w]: the audio-out columns of the context so far (reference segments, earlier segments, BOS
    columns, as stored, i.e. with the delay pattern); RAS compares with its last `ras_win_len` columns.
    Returns the column, the text token and the updated counters (`state` itself is not modified).
    """
    k_books = raw.shape[0]
    scores = process(raw, cfg)
    if cfg.do_sample:
        tokens = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=gen).squeeze(1)
    else:
        tokens = torch.argmax(scores, dim=-1)
    pre = tokens.clone()
    resampled = torch.zeros(k_books, dtype=torch.bool)
    if cfg.ras:
        # Repetition-aware sampling: a row whose choice already occurs >= max_repeat times in the window is
        # redrawn from the *raw* logits (no processors), also in greedy mode; no row, no draw.
        rep = (window[:, -cfg.ras_win_len:] == tokens[:, None]).sum(dim=1)
        rows = torch.nonzero(rep >= cfg.ras_win_max_num_repeat).squeeze(1)
        if rows.numel():
            tokens[rows] = raw[rows].softmax(dim=-1).multinomial(1, replacement=True, generator=gen).squeeze(1)
            resampled[rows] = True
    num_delay, num_remaining = state.num_delay, state.num_remaining
    text_token = ids.audio_out_token
    if ids.delay_pattern:
        if num_delay + 1 < k_books:  # the leading triangle: codebooks above num_delay are still BOS
            tokens[num_delay + 1:] = ids.bos
            num_delay += 1
        if num_remaining is not None:  # the trailing triangle: one more codebook forced to EOS per column
            tokens[:k_books - num_remaining] = ids.eos
            num_remaining -= 1
        else:
            eos = torch.nonzero(tokens == ids.eos)
            if eos.numel():
                j = int(eos[0, 0])  # the lowest EOS codebook (upstream names it "last" but takes the first)
                tokens[:j] = ids.eos
                num_remaining = k_books - j - 1
        if num_remaining is not None and num_remaining <= 0:
            text_token, num_delay, num_remaining = ids.audio_eos_token, 0, None
    return AudioSelection(tokens, text_token, pre, resampled, scores, DelayState(num_delay, num_remaining))
