"""The HTTP API (FastAPI), OpenAI-compatible where OpenAI has the endpoint:

    POST /v1/audio/speech   {model, input, voice, response_format: wav|pcm, stream, temperature, top_p, top_k, seed,
                             max_tokens} -> audio/wav (16-bit PCM, 24 kHz mono) or audio/pcm (s16le, 24 kHz mono)
    POST /v1/chat/completions  {messages, modalities: ["text", "audio"], audio: {voice}, stream, ...}: the last user
                             message spoken; streamed as SSE chunks with `delta.audio.data` (base64 PCM)
    GET  /v1/audio/voices   the voices and what each is made of
    GET  /v1/models         the one model served
    GET  /health            {"status": "ok", ...}

The audio body is always sent in chunks as it is decoded (`generate.stream.StreamDecoder`: a short first chunk,
then `chunk` frames at a time); with `stream: false` the server generates everything first and sends it with a
Content-Length. A streamed WAV's header declares an unknown length (0xFFFFFFFF, as streaming WAV writers do).
Errors are JSON in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`. A client that goes away
mid-stream has its request cancelled; its batch row is free for the next request.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid
from typing import Literal

import numpy as np
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from ..generate.sampling import SamplingConfig
from ..generate.stream import StreamDecoder
from .service import RequestError, SpeechService

MEDIA = {"wav": "audio/wav", "pcm": "audio/pcm"}


class Sampling(BaseModel):
    """The decoding fields both endpoints take (upstream's serve-engine arguments)."""

    model_config = ConfigDict(extra="ignore")  # (OpenAI clients may send speed / instructions: not supported, ignored)

    model: StrictStr | None = None
    stream: StrictBool = False
    temperature: StrictFloat | StrictInt = Field(0.7, ge=0)
    top_p: StrictFloat | StrictInt = Field(0.95, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=0)
    seed: StrictInt | None = None
    max_tokens: StrictInt | None = None


class SpeechRequest(Sampling):
    input: StrictStr
    voice: StrictStr
    response_format: Literal["wav", "pcm"] = "wav"


class ChatAudio(BaseModel):
    voice: StrictStr
    format: Literal["pcm16", "wav"] = "pcm16"  # (streamed: always pcm16, as OpenAI; whole: a WAV)


class ChatRequest(Sampling):
    messages: list[dict]
    modalities: list[StrictStr] = ["text"]
    audio: ChatAudio | None = None
    max_completion_tokens: StrictInt | None = None

    def last_user_text(self) -> str | None:
        """The last user message's text (a string, or the `text` parts of a content list)."""
        for m in reversed(self.messages):
            if m.get("role") == "user":
                c = m.get("content")
                if isinstance(c, list):
                    c = "".join(p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text")
                return c if isinstance(c, str) else None
        return None


def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


def pcm16(wave) -> bytes:
    return (np.clip(wave.numpy(), -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def wav_header(sample_rate: int, data_bytes: int | None) -> bytes:
    """A 16-bit mono PCM WAV header; `data_bytes` None: unknown (streaming)."""
    size = 0xFFFFFFFF if data_bytes is None else data_bytes
    riff = 0xFFFFFFFF if data_bytes is None else 36 + data_bytes
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate,
                                                                          sample_rate * 2, 2, 16)
            + b"data" + struct.pack("<I", size))


def create_app(service: SpeechService, model_id: str = "minihiggs", stream: dict | None = None) -> FastAPI:
    """`stream`: `StreamDecoder` settings (chunk, first_chunk, right, crossfade)."""
    app = FastAPI(title="minihiggs speech server")
    rate = service.codec.sample_rate

    @app.exception_handler(RequestValidationError)
    async def bad_fields(_, exc: RequestValidationError):
        e = exc.errors()[0]
        field = next((str(x) for x in e.get("loc", ()) if x != "body"), None)  # (not the union member's name)
        return error(400, f"{field or 'body'}: {e.get('msg')}", field)

    @app.get("/health")
    async def health():
        return {"status": "ok", "voices": len(service.voices), "busy": service.batcher.busy}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "owned_by": "minihiggs"}]}

    @app.get("/v1/audio/voices")
    async def voices():
        return {"voices": [v.describe() for v in service.voices.values()]}

    def start(text: str, voice: str, body: Sampling, max_tokens: int | None) -> tuple | JSONResponse:
        """Submit one request: (ticket, decoder), or an error response for a bad request."""
        sampling = SamplingConfig(temperature=float(body.temperature), top_p=float(body.top_p), top_k=body.top_k,
                                  seed=body.seed)
        try:
            req, adapter = service.request(text, voice, sampling, max_tokens)
        except RequestError as e:
            return error(e.status, str(e), e.param)
        return service.submit(req, adapter), StreamDecoder(service.codec, **(stream or {}))

    async def pcm_chunks(ticket, decoder):
        """16-bit PCM bytes as they are decoded; cancels the request when the client goes away."""
        try:
            while (frames := await asyncio.to_thread(ticket.frames.get)) is not None:
                for wave in await asyncio.to_thread(decoder.push, frames):
                    yield pcm16(wave)
            if ticket.error is not None:
                raise ticket.error
            for wave in await asyncio.to_thread(decoder.finish):
                yield pcm16(wave)
        finally:
            service.cancel(ticket)  # (a no-op once it has finished)

    @app.post("/v1/audio/speech")
    async def speech(body: SpeechRequest):
        started = start(body.input, body.voice, body, body.max_tokens)
        if isinstance(started, JSONResponse):
            return started
        if body.stream:
            async def body_stream():
                if body.response_format == "wav":
                    yield wav_header(rate, None)
                async for b in pcm_chunks(*started):
                    yield b
            return StreamingResponse(body_stream(), media_type=MEDIA[body.response_format])
        try:
            data = b"".join([b async for b in pcm_chunks(*started)])
        except Exception as e:
            return error(500, f"generation failed: {type(e).__name__}: {e}", kind="server_error")
        if body.response_format == "wav":
            data = wav_header(rate, len(data)) + data
        return Response(data, media_type=MEDIA[body.response_format])

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        """Audio output of a chat completion: the last user message is spoken in `audio.voice`; with `stream`, SSE
        chunks carry `delta.audio.data` (base64 16-bit PCM), else `message.audio.data` is a base64 WAV."""
        if "audio" not in body.modalities or body.audio is None:
            return error(400, "this server answers with audio: set modalities [\"text\", \"audio\"] and audio.voice",
                         "modalities")
        text = body.last_user_text()
        if text is None:
            return error(400, "no user message with text content", "messages")
        steps = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        started = start(text, body.audio.voice, body, steps)
        if isinstance(started, JSONResponse):
            return started
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(delta: dict, finish: str | None = None) -> str:
            obj = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model_id,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return f"data: {json.dumps(obj)}\n\n"

        if body.stream:
            async def events():
                yield chunk({"role": "assistant", "audio": {"id": ident, "transcript": text}})
                async for b in pcm_chunks(*started):
                    yield chunk({"audio": {"id": ident, "data": base64.b64encode(b).decode()}})
                yield chunk({}, "stop")
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        try:
            data = b"".join([b async for b in pcm_chunks(*started)])
        except Exception as e:
            return error(500, f"generation failed: {type(e).__name__}: {e}", kind="server_error")
        audio = {"id": ident, "data": base64.b64encode(wav_header(rate, len(data)) + data).decode(),
                 "transcript": text, "expires_at": created + 3600}
        return {"id": ident, "object": "chat.completion", "created": created, "model": model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": None, "audio": audio},
                             "finish_reason": "stop"}]}

    return app
