"""Streaming audio while decoding: generated columns -> served code frames -> waveform chunks.

Two incremental steps, each equal to its offline counterpart:

  * `DelayReverter` turns one segment's delay-patterned columns into served frames as soon as they are complete
    (frame f needs column f + K - 1), dropping the first (BOS) and last (EOS) frame as `Generation.segment_codes`
    does; the last complete frame is held back until the next one (or the segment's end) shows it is not the last.
  * `StreamDecoder` decodes windows of frames with `left`/`right` frames of context around the chunk it emits and
    keeps only the chunk's samples (overlap-trim). An output sample of the DAC decoder depends on the latent frames
    within its receptive field (`receptive_field`, derived from the conv stack); with contexts covering it each
    emitted sample sees exactly the inputs of the offline decode, so the concatenated stream equals
    `codec.decode(all frames)` up to float rounding. With a smaller context only samples within
    (receptive field - context) frames of a chunk boundary can differ; an optional linear crossfade over the
    first `crossfade` samples of each chunk (blending the previous window's extra samples) hides that seam.

The first chunk is shorter (`first_chunk` frames) so the first audio comes early; later chunks are `chunk` frames.
A chunk is emitted once `right` frames after it exist (or the generation has ended).
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn as nn

from ..codec.acoustic import ResidualUnit, Snake1d


# ---- the decoder's receptive field --------------------------------------------------------------------------------
def _input_span(m: nn.Module, lo: int, hi: int) -> tuple[int, int]:
    """The input indices [lo', hi'] that outputs [lo, hi] of module `m` depend on (1-d conv arithmetic)."""
    if isinstance(m, nn.Sequential):
        for child in reversed(m):
            lo, hi = _input_span(child, lo, hi)
        return lo, hi
    if isinstance(m, ResidualUnit):  # x + block(x)
        a, b = _input_span(m.block, lo, hi)
        return min(a, lo), max(b, hi)
    if isinstance(m, Snake1d):
        return lo, hi
    if isinstance(m, nn.ConvTranspose1d):  # output o = i * s - p + j * d, j in [0, k)
        (k,), (s,), (p,), (d,) = m.kernel_size, m.stride, m.padding, m.dilation
        return math.ceil((lo + p - d * (k - 1)) / s), (hi + p) // s
    if isinstance(m, nn.Conv1d):  # output i reads inputs i * s - p + j * d, j in [0, k)
        (k,), (s,), (p,), (d,) = m.kernel_size, m.stride, m.padding, m.dilation
        return lo * s - p, hi * s - p + d * (k - 1)
    for attr in ("model", "block"):  # Decoder / DecoderBlock: their Sequential
        if isinstance(getattr(m, attr, None), nn.Sequential):
            return _input_span(getattr(m, attr), lo, hi)
    raise TypeError(f"receptive field: no rule for {type(m).__name__}")


def receptive_field(decoder: nn.Module, hop: int) -> tuple[int, int]:
    """(left, right): an output sample of latent frame f depends on latent frames f - left .. f + right only."""
    f0 = 1000  # any frame far from the edges (the arithmetic is shift-invariant)
    left = right = 0
    for n in range(f0 * hop, (f0 + 1) * hop):
        a, b = _input_span(decoder, n, n)
        left, right = max(left, f0 - a), max(right, b - f0)
    return left, right


# ---- delay pattern, reverted incrementally ------------------------------------------------------------------------
class DelayReverter:
    """Columns of one audio segment in (with the delay pattern, leading BOS column first) -> served frames out."""

    def __init__(self, num_codebooks: int, codebook_size: int, delay_pattern: bool = True):
        self.k = num_codebooks if delay_pattern else 1
        self.codebook_size = codebook_size
        self.reset()

    def reset(self) -> None:
        """A new segment starts (its frames are decoded after the previous segment's, as offline)."""
        self.columns: list[torch.Tensor] = []  # the last K columns
        self.complete = 0  # reverted frames completed so far
        self.held: torch.Tensor | None = None  # the last complete frame: dropped if it turns out to be the last

    def push(self, column: torch.Tensor) -> torch.Tensor | None:
        """Add the next column [K]; returns a served frame [K] when one is known to be served."""
        self.columns = (self.columns + [column])[-self.k:]
        if len(self.columns) < self.k:
            return None
        frame = torch.stack([self.columns[i][i] for i in range(len(column))]) if self.k > 1 else column.clone()
        self.complete += 1
        out, self.held = self.held, frame.clip(0, self.codebook_size - 1)
        return out if self.complete > 2 else None  # reverted frame 0 is the BOS frame, never served


# ---- chunked decoding ---------------------------------------------------------------------------------------------
class StreamDecoder:
    """Code frames in (`push`), waveform chunks out; `finish()` flushes the rest."""

    def __init__(self, codec, chunk: int = 25, first_chunk: int = 5, left: int | None = None,
                 right: int | None = None, crossfade: int = 0):
        """chunk / first_chunk: frames per emitted chunk; left / right: context frames (default: the decoder's
        receptive field, i.e. exact); crossfade: samples blended at the start of each later chunk (needs
        right * hop >= crossfade)."""
        if chunk < 1 or first_chunk < 1:
            raise ValueError("chunk sizes must be >= 1 frame")
        rf_left, rf_right = receptive_field(codec.decoder_2, codec.hop_length)
        self.codec, self.chunk, self.first_chunk = codec, chunk, first_chunk
        self.left = rf_left if left is None else left
        self.right = rf_right if right is None else right
        self.hop = codec.hop_length
        if crossfade < 0 or crossfade > self.right * self.hop or crossfade > min(chunk, first_chunk) * self.hop:
            raise ValueError(f"crossfade must lie in [0, min(right context, chunk) * {self.hop}] samples")
        self.crossfade = crossfade
        self.frames: list[torch.Tensor] = []  # every served frame so far ([K] each)
        self.emitted = 0  # frames whose samples were emitted
        self.tail: torch.Tensor | None = None  # the previous window's samples after its chunk (crossfade)

    def push(self, frames: torch.Tensor) -> list[torch.Tensor]:
        """frames [K, n] -> the chunks [samples] (float32, CPU) that became ready."""
        self.frames.extend(frames.unbind(1))
        out = []
        while True:
            size = self.first_chunk if self.emitted == 0 else self.chunk
            if len(self.frames) < self.emitted + size + self.right:
                return out
            out.append(self._emit(self.emitted + size))

    def finish(self) -> list[torch.Tensor]:
        """Everything not yet emitted (the stream has ended, so no right context is missing)."""
        out = []
        while len(self.frames) > self.emitted:
            size = self.first_chunk if self.emitted == 0 else self.chunk
            out.append(self._emit(min(len(self.frames), self.emitted + size)))
        return out

    def _emit(self, end: int) -> torch.Tensor:
        start, n = self.emitted, len(self.frames)
        lo, hi = max(0, start - self.left), min(n, end + self.right)
        codes = torch.stack(self.frames[lo:hi], dim=1)
        wave = self.codec.decode(codes, chunk=hi - lo)  # one window, no inner chunking
        chunk = wave[(start - lo) * self.hop:(end - lo) * self.hop].clone()
        x = min(self.crossfade, chunk.shape[0])
        if self.tail is not None and x:
            fade = torch.arange(1, x + 1, dtype=chunk.dtype) / (x + 1)
            chunk[:x] = self.tail[:x] * (1 - fade) + chunk[:x] * fade
        self.tail = wave[(end - lo) * self.hop:(end - lo) * self.hop + self.crossfade].clone()
        self.emitted = end
        return chunk


# ---- one request, streamed --------------------------------------------------------------------------------------
def stream_speech(engine, request, codec, chunk: int = 25, first_chunk: int = 5, **context) -> Iterator[torch.Tensor]:
    """Generate `request` and yield its waveform in chunks (float32 [samples] at codec.sample_rate) while decoding;
    the concatenation equals `codec.decode(generation.codes())` (see the module docstring). `context`: `left`,
    `right`, `crossfade` of `StreamDecoder`."""
    from .batcher import Batcher  # (batcher uses DelayReverter from here)

    length = len(engine.new_row(request).merged.input_ids) + request.max_new_tokens
    batcher = Batcher(engine, slots=1, max_len=length)
    ticket = batcher.submit(request)
    decoder = StreamDecoder(codec, chunk, first_chunk, **context)
    try:
        while batcher.step() or not ticket.frames.empty():
            while not ticket.frames.empty():
                frames = ticket.frames.get()
                if frames is None:
                    break
                yield from decoder.push(frames)
    finally:
        batcher.cancel(ticket)
    if ticket.error is not None:
        raise ticket.error
    yield from decoder.finish()
