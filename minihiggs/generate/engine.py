"""The generation loop: prefill each prompt, then one element per row and step over a static KV cache, with
upstream's mode machine per row (golden README §4.1).

    engine = Engine(model)
    [gen] = engine.generate([Request(prompt, SamplingConfig(temperature=0.7, seed=1), max_new_tokens=1024)])
    gen.codes()          # [8, frames] for the audio tokenizer (delay pattern reverted, BOS/EOS frames dropped)

A row's iteration mode comes from its last token: `<|audio_out_bos|>` -> AUDIO_INIT (the new column is all BOS,
no head, no random draw), `<|AUDIO_OUT|>` -> AUDIO (8 codes from the audio head of the fed column), anything
else -> TEXT (a token from the text head). Every iteration after the prefill feeds exactly one element: the
previous text token, or the previous audio column. The column that completes a segment's delay pattern comes
with `<|audio_eos|>` and is not fed back; the row continues in TEXT mode from `<|audio_eos|>`. A row stops
after `max_new_tokens` iterations (every audio column and AUDIO_INIT count, as upstream) or when it selects a
stop token (`<|end_of_text|>`, `<|eot_id|>`).

Batching: rows have their own prompt lengths, positions, modes, generators and stop points; each row gets what
it gets alone (prefill is per row; decode steps are batched, sampling is per row on CPU with the row's own
generator). What a batch gains is throughput: one weight read per step serves every row (see README).
`generate` is built from three pieces, `new_row`, `prefill_row` and `decode_step`, which `batcher.Batcher` also
drives with rows that join and leave between steps (continuous batching, streaming).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..data.batch import revert_delay_pattern
from ..model.higgs import HiggsAudioModel
from ..model.kv_cache import StaticKVCache, decode_one_token, prefill
from .cuda_graph import GraphedStep
from .prompt import MergedPrompt, Prompt, merge_prompt
from .sampling import AudioIds, AudioSelection, DelayState, SamplingConfig, select_audio, select_text

TEXT, AUDIO_INIT, AUDIO = 0, 1, 2  # iteration kinds (the golden files' `step_kind` values)
# Llama-3 <|end_of_text|> (the released generation_config's eos_token_id) and <|eot_id|>: the serve engine's stop
# strings. They are text-tokenizer ids, not part of the model config.
DEFAULT_STOP_TOKENS = (128001, 128009)


@dataclass
class Request:
    prompt: Prompt
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    max_new_tokens: int = 1024  # iterations, as upstream counts them (each audio column is one)


@dataclass
class Generation:
    """What one request produced (upstream `generate` outputs, per row)."""

    name: str
    prompt_length: int  # merged prompt positions
    text_tokens: list[int]  # generated tokens, one <|AUDIO_OUT|> per audio segment (upstream outputs[0][len(prompt):])
    audio: list[torch.Tensor]  # per segment [K, T_i]: raw columns with the delay pattern, leading BOS column
    stop_reason: str  # "max_new_tokens" or "stop_token"
    iterations: int
    codebook_size: int = 1024

    def segment_codes(self) -> list[torch.Tensor]:
        """Per segment what the serve engine decodes: delay pattern reverted, clipped to the codebook (BOS/EOS
        become codebook_size - 1), first (BOS) and last frame dropped -> [K, T_i - 9]."""
        return [revert_delay_pattern(a).clip(0, self.codebook_size - 1)[:, 1:-1] for a in self.audio]

    def codes(self) -> torch.Tensor:
        """All segments' served codes, concatenated in time ([K, frames]; the waveforms are concatenated too)."""
        segs = self.segment_codes()
        return torch.cat(segs, dim=1) if segs else torch.zeros(0, 0, dtype=torch.long)

    @property
    def frames(self) -> int:
        return int(self.codes().shape[1]) if self.audio else 0


@dataclass
class _Row:
    """Host-side state of one request while it is generated."""

    req: Request
    merged: MergedPrompt
    gen: torch.Generator | None
    last: int  # last token of the compact list (prompt + generated text tokens): decides the mode
    pos: int  # next free cache slot = position of the next fed element
    history: torch.Tensor  # [K, cap] every audio-out column of the context (RAS window), `hist` filled
    hist: int
    tokens: list[int] = field(default_factory=list)
    segments: list[list[torch.Tensor]] = field(default_factory=list)
    delay: DelayState = field(default_factory=DelayState)
    feed_col: torch.Tensor | None = None  # the column to feed next (AUDIO iterations)
    iterations: int = 0
    done: bool = False
    stop_reason: str = ""


Trace = Callable[[int, dict], None]


class Engine:
    """Generation with a model (base, base + LoRA, or merged), on its device and dtype."""

    def __init__(self, model: HiggsAudioModel, stop_tokens: tuple[int, ...] = DEFAULT_STOP_TOKENS,
                 cuda_graphs: bool | None = None):
        """cuda_graphs: replay pure-audio and pure-text decode steps from CUDA graphs (default: on for CUDA)."""
        self.model = model.eval()
        cfg = model.config
        self.cfg = cfg
        self.ids = AudioIds(cfg.audio_num_codebooks, cfg.audio_stream_bos_id, cfg.audio_stream_eos_id,
                            cfg.audio_out_token_id, int(cfg.audio_eos_token_id), cfg.use_delay_pattern)
        self.audio_out_bos = int(cfg.audio_out_bos_token_id)
        self.stop_tokens = frozenset(int(t) for t in stop_tokens)
        self.device = model.embed_tokens.weight.device
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        # The cache (and its graphs) of the last call, reused while the batch size and length bucket stay the same:
        # stale slots are never visible (a slot is written before any query can see it).
        self._cache: StaticKVCache | None = None
        self._graphs: dict[str, GraphedStep] = {}

    def _cache_for(self, batch: int, length: int) -> StaticKVCache:
        bucket = 256 if self.device.type == "cuda" else 16
        length = -(-length // bucket) * bucket
        c = self._cache
        if c is None or c.batch != batch or c.max_len != length:
            self._cache, self._graphs = None, {}
            c = self._cache = StaticKVCache(self.model, batch, length)
        return c

    def _step(self, cache: StaticKVCache, tokens, cols, is_audio, pos, mode: str, need_audio: bool,
              need_text: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Embed, trunk and the heads the rows need: (hidden [B, H], audio logits [B, K, C], text logits [B, V])."""
        def run(tokens, cols, is_audio, pos, audio_head=need_audio, text_head=need_text):
            h = decode_one_token(self.model, cache, self._embed_step(tokens, cols, is_audio, mode), pos, is_audio, mode)
            return (h, self.model.audio_logits(h) if audio_head else None,
                    self._text_logits(h) if text_head else None)

        args = (tokens.to(self.device), cols.to(self.device), is_audio.to(self.device), pos.to(self.device))
        if not self.cuda_graphs or mode == "mixed":  # (mixed steps are rare: at most one per row and segment)
            return run(*args)
        g = self._graphs.get(mode)
        if g is None:
            # Captured with the parked position (the last slot), so the warm-up runs write nothing visible.
            park = torch.full_like(args[3], cache.max_len - 1)
            heads = dict(audio_head=mode == "audio", text_head=mode == "text")
            g = self._graphs[mode] = GraphedStep(lambda *a: run(*a, **heads), (*args[:3], park))
        return g(*args)

    # ---- model calls --------------------------------------------------------------------------------------------
    def _embed_step(self, tokens: torch.Tensor, cols: torch.Tensor, is_audio: torch.Tensor, mode: str) -> torch.Tensor:
        model = self.model
        if mode == "audio":
            x = model.embed_audio(cols.T)
        elif mode == "text":
            x = model.embed_tokens(tokens)
        else:
            x = torch.where(is_audio[:, None], model.embed_audio(cols.T), model.embed_tokens(tokens))
        return x[:, None].to(model.embed_tokens.weight.dtype)

    def _text_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.audio_decoder_proj.text_lm_head(h).float()

    # ---- the loop -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, requests: list[Request], on_step: Callable[[int], None] | None = None,
                 trace: Trace | None = None) -> list[Generation]:
        """Generate every request (one batch of rows). `on_step(active_rows)` is called after each iteration;
        `trace(row, record)` (tests, debugging) receives each iteration's inputs, logits and choices."""
        if not requests:
            return []
        rows = [self.new_row(r) for r in requests]
        cache = self._cache_for(len(rows), max(len(row.merged.input_ids) + row.req.max_new_tokens for row in rows))
        # Iteration 0 of every row: its prefill (alone, batch 1) and its first selection.
        for b, row in enumerate(rows):
            self.prefill_row(cache, b, row, trace)
        if on_step is not None:
            on_step(sum(not r.done for r in rows))
        while not all(r.done for r in rows):
            self.decode_step(cache, rows, trace)
            if on_step is not None:
                on_step(sum(not r.done for r in rows))
        return [self.generation(row) for row in rows]

    # ---- the pieces of the loop (also driven by `batcher.Batcher`, whose rows join and leave between steps) -------
    def new_row(self, r: Request) -> _Row:
        """A request's host-side state (prompt merged, sampling checked)."""
        if r.max_new_tokens < 1:
            raise ValueError(f"{r.prompt.name or 'request'}: max_new_tokens must be >= 1")
        r.sampling.validate()
        m = merge_prompt(r.prompt, self.cfg)
        hist = torch.zeros(self.cfg.audio_num_codebooks, m.columns.shape[1] + r.max_new_tokens + 1, dtype=torch.long)
        hist[:, :m.columns.shape[1]] = m.columns
        return _Row(r, m, r.sampling.generator(), last=int(m.input_ids[-1]), pos=len(m.input_ids), history=hist,
                    hist=m.columns.shape[1])

    def prefill_row(self, cache: StaticKVCache, b: int, row: _Row, trace: Trace | None = None) -> None:
        """Iteration 0 of `row` in cache row `b`: its prompt's prefill and its first selection."""
        hidden = prefill(self.model, cache, b, row.merged.batch.to(self.device))
        kind = self._kind(row)
        logits = self._text_logits(hidden[:, -1]).cpu() if kind == TEXT else None
        info = {"past_seen": 0, "fed": None, "hidden": hidden[0, -1].float().cpu()} if trace else None
        self._advance(b, row, kind, None, logits, info, trace)

    def decode_step(self, cache: StaticKVCache, rows: list[_Row | None], trace: Trace | None = None) -> None:
        """One iteration of every unfinished row (`rows[b]` lives in cache row b; None: a free cache row)."""
        max_len, n = cache.max_len, cache.batch
        pos = torch.zeros(n, dtype=torch.long)
        tokens = torch.zeros(n, dtype=torch.long)
        cols = torch.zeros(n, self.cfg.audio_num_codebooks, dtype=torch.long)
        is_audio = torch.zeros(n, dtype=torch.bool)
        kinds = [self._kind(r) if r is not None and not r.done else None for r in rows] + [None] * (n - len(rows))
        active_audio = {k == AUDIO for k in kinds if k is not None}
        mode = "mixed" if len(active_audio) == 2 else ("audio" if active_audio == {True} else "text")
        for b, kind in enumerate(kinds):
            row = rows[b] if b < len(rows) else None
            # A finished row (or a free one) is fed a dummy of the batch's kind at its last free slot (never read
            # again: a row's next prompt overwrites its slots from 0, a slot is written before any query sees it).
            audio = kind == AUDIO if kind is not None else mode == "audio"
            is_audio[b] = audio
            pos[b] = min(row.pos, max_len - 1) if row is not None else max_len - 1
            if kind == AUDIO:
                cols[b] = row.feed_col
            elif kind is not None:
                tokens[b] = row.last
        h, audio_logits, text_logits = self._step(cache, tokens, cols, is_audio, pos, mode, AUDIO in kinds,
                                                  TEXT in kinds)
        # Selection runs on CPU with each row's own generator (upstream's draws, any device).
        audio_logits = audio_logits.float().cpu() if AUDIO in kinds else None
        text_logits = text_logits.float().cpu() if TEXT in kinds else None
        for b, kind in enumerate(kinds):
            if kind is None:
                continue
            row = rows[b]
            info = None
            if trace is not None:
                fed = ("audio", cols[b].clone()) if kind == AUDIO else ("text", int(tokens[b]))
                info = {"past_seen": row.pos, "hidden": h[b].float().cpu(), "fed": fed}
            row.pos += 1
            self._advance(b, row, kind, audio_logits[b] if kind == AUDIO else None,
                          text_logits[b:b + 1] if kind == TEXT else None, info, trace)

    def generation(self, row: _Row) -> Generation:
        return Generation(name=row.req.prompt.name, prompt_length=len(row.merged.input_ids), text_tokens=row.tokens,
                          audio=[torch.stack(s, dim=1) for s in row.segments], stop_reason=row.stop_reason,
                          iterations=row.iterations, codebook_size=self.cfg.audio_codebook_size)

    def _kind(self, row: _Row) -> int:
        if row.last == self.audio_out_bos:
            return AUDIO_INIT
        if row.last == self.cfg.audio_out_token_id:
            return AUDIO
        return TEXT

    def _advance(self, b: int, row: _Row, kind: int, raw_audio: torch.Tensor | None, text_logits: torch.Tensor | None,
                 info: dict | None, trace: Trace | None) -> None:
        """Select this iteration's token/column for `row` from its logits ([K, C] audio / [1, V] text, CPU float32)
        and update its state. `info` (tracing only) is completed and handed to the trace callback."""
        ids = self.ids
        sel: AudioSelection | None = None
        delay_in = row.delay
        if kind == AUDIO:
            window = row.history[:, :row.hist]
            sel = select_audio(raw_audio, window, row.delay, row.req.sampling, row.gen, ids)
            row.delay = sel.state
            row.segments[-1].append(sel.tokens)
            row.history[:, row.hist] = sel.tokens
            row.hist += 1
            token = sel.text_token
            if token == ids.audio_out_token:
                row.feed_col = sel.tokens
            else:  # <|audio_eos|>: the segment is complete and its last column is not fed back
                row.tokens.append(token)
                row.last = token
        elif kind == AUDIO_INIT:
            token = ids.audio_out_token
            bos = torch.full((ids.num_codebooks,), ids.bos, dtype=torch.long)
            row.segments.append([bos])
            row.history[:, row.hist] = bos
            row.hist += 1
            row.delay = DelayState()
            row.feed_col = bos
            row.tokens.append(token)
            row.last = token
        else:
            token = select_text(text_logits, row.req.sampling, row.gen)
            row.tokens.append(token)
            row.last = token
        row.iterations += 1
        if info is not None:
            info.update(kind=kind, token=token, selection=sel, delay_in=delay_in, audio_logits=raw_audio,
                        text_logits=text_logits)
            trace(b, info)
        if token in self.stop_tokens:
            row.done, row.stop_reason = True, "stop_token"
        elif row.iterations >= row.req.max_new_tokens:
            row.done, row.stop_reason = True, "max_new_tokens"
