"""Continuous batching: requests join and leave a running batch between decode steps.

    batcher = Batcher(engine, slots=8, max_len=2048, bank=bank)     # bank: per-row LoRA adapters (optional)
    ticket = batcher.submit(request, adapter=bank.slot("ava"))       # any thread
    while batcher.step(): ...                                         # one thread: admit, one decode step, emit
    ticket.frames.get()                                               # served code frames [K, n] ..., then None

The cache has `slots` rows of `max_len` positions, allocated once. A new request takes a free row: its prompt is
prefilled alone into that row (the Engine's `prefill_row`), then it joins the next decode steps; a finished or
cancelled request frees its row at once. A row's arithmetic does not depend on the other rows (per-row positions,
masks, modes, generators and adapter deltas), so a request gets the codes it gets alone.

Each request's new audio columns are reverted incrementally (`stream.DelayReverter`) and handed to its ticket as
served code frames, so a caller can decode audio while the rest is generated.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

import torch

from .engine import Engine, Generation, Request, _Row
from .stream import DelayReverter


@dataclass
class Ticket:
    """One submitted request: `frames` receives [K, n] code tensors, then None (finished: `generation` or `error`
    is set)."""

    request: Request
    adapter: int = 0
    frames: queue.Queue = field(default_factory=queue.Queue)
    generation: Generation | None = None
    error: Exception | None = None
    cancelled: bool = False

    def __iter__(self):
        """The frames as they come (blocking), until the request ends."""
        while (item := self.frames.get()) is not None:
            yield item
        if self.error is not None:
            raise self.error


@dataclass
class _Slot:
    ticket: Ticket
    row: _Row
    reverter: DelayReverter
    seen: tuple[int, int] = (0, 0)  # (segments, columns of the last one) already handed to the reverter


class Batcher:
    def __init__(self, engine: Engine, slots: int, max_len: int, bank=None):
        """bank: a `lora.multi.AdapterBank` attached to `engine.model` (each ticket names its slot), or None."""
        self.engine, self.bank = engine, bank
        self.cache = engine._cache_for(slots, max_len)
        self.slots: list[_Slot | None] = [None] * self.cache.batch
        self.max_len = self.cache.max_len
        self._pending: list[Ticket] = []
        self._lock = threading.Lock()
        self.wakeup = threading.Event()  # set by submit: a driver loop may sleep on it while idle

    # ---- any thread -----------------------------------------------------------------------------------------------
    def submit(self, request: Request, adapter: int = 0) -> Ticket:
        ticket = Ticket(request, adapter)
        with self._lock:
            self._pending.append(ticket)
        self.wakeup.set()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Stop a request (e.g. its client went away); its row is freed before the next step."""
        ticket.cancelled = True

    @property
    def busy(self) -> int:
        return sum(s is not None for s in self.slots) + len(self._pending)

    # ---- the driver thread ----------------------------------------------------------------------------------------
    def step(self) -> bool:
        """Free cancelled rows, admit waiting requests into free rows, run one decode step. Returns whether any
        request is still running or waiting."""
        for b, s in enumerate(self.slots):
            if s is not None and s.ticket.cancelled:
                self._finish(b, None)
        self._admit()
        rows = [s.row if s is not None else None for s in self.slots]
        if any(r is not None for r in rows):
            self._select([s.ticket.adapter if s is not None else 0 for s in self.slots])
            self.engine.decode_step(self.cache, rows)
            for b, s in enumerate(self.slots):
                if s is not None:
                    self._emit(b, s)
        with self._lock:
            return any(s is not None for s in self.slots) or bool(self._pending)

    def _admit(self) -> None:
        while None in self.slots:
            with self._lock:
                if not self._pending:
                    return
                ticket = self._pending.pop(0)
            if ticket.cancelled:
                ticket.frames.put(None)
                continue
            b = self.slots.index(None)
            try:
                row = self.engine.new_row(ticket.request)
                need = len(row.merged.input_ids) + ticket.request.max_new_tokens
                if need > self.max_len:
                    raise ValueError(f"prompt + max_new_tokens = {need} positions; this server holds {self.max_len}")
                self._select([ticket.adapter])
                self.engine.prefill_row(self.cache, b, row)
            except Exception as e:  # this request's own problem: report it to its caller, keep serving
                ticket.error = e
                ticket.frames.put(None)
                continue
            self.slots[b] = _Slot(ticket, row, DelayReverter(self.engine.cfg.audio_num_codebooks,
                                                             self.engine.cfg.audio_codebook_size,
                                                             self.engine.cfg.use_delay_pattern))
            self._emit(b, self.slots[b])

    def _select(self, adapters: list[int]) -> None:
        if self.bank is not None:
            self.bank.select(adapters)

    def _emit(self, b: int, s: _Slot) -> None:
        """Hand the row's new columns to its reverter and the served frames to its ticket."""
        segs = s.row.segments
        n_seg, n_col = s.seen
        frames = []
        for si in range(max(n_seg - 1, 0), len(segs)):
            if si >= n_seg:
                s.reverter.reset()  # a new segment
                start = 0
            else:
                start = n_col
            for col in segs[si][start:]:
                f = s.reverter.push(col)
                if f is not None:
                    frames.append(f)
        s.seen = (len(segs), len(segs[-1]) if segs else 0)
        if frames:
            s.ticket.frames.put(torch.stack(frames, dim=1))
        if s.row.done:
            self._finish(b, self.engine.generation(s.row))

    def fail_all(self, error: Exception) -> None:
        """End every running request with `error` (after a failed step; the rows are freed)."""
        for b, s in enumerate(self.slots):
            if s is not None:
                s.ticket.error = error
                self._finish(b, None)

    def _finish(self, b: int, generation: Generation | None) -> None:
        s = self.slots[b]
        self.slots[b] = None
        s.ticket.generation = generation
        s.ticket.frames.put(None)
