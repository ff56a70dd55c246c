"""The speech service behind the HTTP API: one base model, every voice's adapter attached per row
(`lora.multi.AdapterBank`), a continuous batcher (`generate.batcher`) driven by one background thread, and the
checks that turn a request into a `generate.Request` (or a one-line `RequestError`).
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass

from ..errors import UserError
from ..generate.batcher import Batcher, Ticket
from ..generate.engine import Engine, Request
from ..generate.loading import stop_token_ids
from ..generate.prompt import tts_prompt
from ..generate.sampling import SamplingConfig
from ..lora.multi import AdapterBank
from .voices import Voice


class RequestError(UserError, ValueError):
    """A bad request: `param` names the field (OpenAI's error shape), `status` the HTTP status."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


@dataclass
class Limits:
    slots: int = 8  # rows decoded together (concurrent requests; more wait for a free row)
    max_len: int = 2048  # positions per row: prompt (with the voice's reference) + generated steps
    max_input_tokens: int = 600  # the text to speak, in tokens
    max_tokens: int = 1024  # decoding steps per request at most (25 per second of audio)


class SpeechService:
    def __init__(self, model, tok, codec, voices: dict[str, Voice], limits: Limits | None = None, log=None):
        self.tok, self.codec, self.voices, self.limits = tok, codec, voices, limits or Limits()
        self.log = log or (lambda m: print(m, file=sys.stderr))
        adapters = sorted({v.adapter for v in voices.values() if v.adapter})
        self.bank = AdapterBank.attach(model, {a: a for a in adapters}) if adapters else None
        self.engine = Engine(model, stop_tokens=stop_token_ids(tok))
        self.batcher = Batcher(self.engine, self.limits.slots, self.limits.max_len, self.bank)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="minihiggs-batcher", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        b = self.batcher
        while not self._stop.is_set():
            b.wakeup.clear()
            try:
                more = b.step()
            except Exception as e:  # a bug must not stop the server: fail the running requests, keep serving
                self.log(f"serve: decode step failed: {type(e).__name__}: {e}")
                b.fail_all(e)
                more = False
            if not more:
                b.wakeup.wait(0.5)

    def close(self) -> None:
        self._stop.set()
        self.batcher.wakeup.set()
        self._thread.join(timeout=5)

    # ---- requests -----------------------------------------------------------------------------------------------
    def request(self, text: str, voice: str, sampling: SamplingConfig, max_tokens: int | None) -> tuple[Request, int]:
        """(the generation request, its adapter slot); RequestError for anything the client got wrong."""
        v = self.voices.get(voice)
        if v is None:
            raise RequestError(f"unknown voice {voice!r} (voices: {', '.join(sorted(self.voices))})", "voice")
        if not text.strip():
            raise RequestError("input is empty", "input")
        n = len(self.tok.encode(text))
        if n > self.limits.max_input_tokens:
            raise RequestError(f"input is {n} tokens long; this server takes at most {self.limits.max_input_tokens}",
                               "input")
        steps = self.limits.max_tokens if max_tokens is None else max_tokens
        if not 1 <= steps <= self.limits.max_tokens:
            raise RequestError(f"max_tokens must lie in [1, {self.limits.max_tokens}], got {steps}", "max_tokens")
        try:
            sampling.validate()
        except ValueError as e:
            raise RequestError(str(e), str(e).split(" ")[0]) from None
        prompt = tts_prompt(self.tok, text, scene=v.scene, reference=v.reference, name=voice)
        need = len(prompt.ids) + sum(c.shape[1] + 8 for c in prompt.context_codes) + steps
        if need > self.batcher.max_len:
            raise RequestError(f"input + voice reference + max_tokens need {need} positions; this server holds "
                               f"{self.batcher.max_len} per request (lower max_tokens or shorten the input)", "input")
        return Request(prompt, sampling, steps), (self.bank.slot(v.adapter) if v.adapter else 0)

    def submit(self, request: Request, adapter: int) -> Ticket:
        return self.batcher.submit(request, adapter)

    def cancel(self, ticket: Ticket) -> None:
        self.batcher.cancel(ticket)
        self.batcher.wakeup.set()
