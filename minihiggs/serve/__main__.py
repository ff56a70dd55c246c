"""python -m minihiggs.serve --voices DIR [--base_ckpt CKPT] [--codec CODEC] [--port 8000]: serve the voices of DIR
(see minihiggs/serve/voices.py) over an OpenAI-compatible HTTP API (minihiggs/serve/app.py)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from ..cli import flag, parse_flags, run
from ..errors import UserError

PROG = "serve"


class ServeError(UserError, RuntimeError):
    """The server cannot start (no base checkpoint, the web extra missing)."""


@dataclass
class ServeArgs:
    voices: str = flag(None, "voices directory: config.json (upstream's preset format + adapter/codes_file/scene) "
                             "and/or adapter sub-directories", required=True)
    base_ckpt: str | None = flag(None, "base checkpoint (default: the one the voices' adapters record)")
    codec: str | None = flag(None, "audio tokenizer (default: the one recorded with the first adapter's run, else "
                                   "the released one)")
    host: str = flag("127.0.0.1", "address to listen on")
    port: int = flag(8000, "port (0: any free one)")
    model_id: str = flag("minihiggs", "the model name /v1/models lists")
    slots: int = flag(8, "requests decoded together (more wait for a free row)")
    max_len: int = flag(2048, "positions per request: prompt + voice reference + generated steps")
    max_input_tokens: int = flag(600, "longest text to speak, in tokens")
    max_tokens: int = flag(1024, "decoding steps per request at most (25 per second of audio)")
    chunk: int = flag(25, "frames per streamed chunk (25 per second)")
    first_chunk: int = flag(5, "frames of the first chunk (low time to first audio)")
    lookahead: int | None = flag(None, "frames decoded after a chunk before it is sent (default: the codec "
                                       "decoder's receptive field, so the stream equals the offline decode; fewer: "
                                       "earlier audio, seams blended over --crossfade samples)")
    crossfade: int = flag(0, "samples blended at each chunk seam (at most lookahead * 960)")
    device: str | None = flag(None, "cuda / cpu (default: cuda when available)")
    dtype: str | None = flag(None, "bf16 / fp32 (default: bf16 on cuda)")


def build(a: ServeArgs, log=None):
    """(FastAPI app, SpeechService) for the flags; everything is loaded and checked here."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ServeError("the server needs the web extra: pip install -e .[serve] (fastapi, uvicorn)") from None
    from ..constants import DEFAULT_CODEC_REPO
    from ..generate.loading import adapter_dir, load_codec, load_tokenizer, recorded_codec
    from ..generate.speak import default_device, default_dtype
    from ..lora.adapter import read_adapter_config, recorded_base
    from ..model.checkpoint import load_model
    from ..generate.stream import StreamDecoder
    from .app import create_app
    from .service import Limits, SpeechService
    from .voices import load_voices, read_presets

    log = log or (lambda m: print(m, file=sys.stderr))
    adapters = [e["adapter"] for e in read_presets(a.voices).values() if e.get("adapter")]
    base = a.base_ckpt
    if base is None and adapters:
        base = recorded_base(read_adapter_config(adapter_dir(adapters[0])))
    if base is None:
        raise ServeError("no base checkpoint: pass --base_ckpt (no adapter of the voices records one)")
    device = default_device(a.device)
    model = load_model(base, dtype=default_dtype(a.dtype, device), device=device)
    log(f"base: {model.checkpoint_dir}")
    tok = load_tokenizer(model)
    found = recorded_codec(None, adapters[0]) if adapters and not a.codec else None
    codec_name = a.codec or (found[0] if found else DEFAULT_CODEC_REPO)
    voices = load_voices(a.voices, tok, model.config, codec_name, device)
    codec = load_codec(codec_name, device)
    log(f"codec: {codec_name}")
    for v in voices.values():
        log(f"voice {v.name}: adapter {v.adapter or '-'}, reference "
            f"{v.reference[1].shape[1] if v.reference else 0} frames")
    service = SpeechService(model, tok, codec, voices, Limits(a.slots, a.max_len, a.max_input_tokens, a.max_tokens),
                            log=log)
    stream = dict(chunk=a.chunk, first_chunk=a.first_chunk, right=a.lookahead, crossfade=a.crossfade)
    try:
        StreamDecoder(codec, **stream)  # (its own checks of the chunk flags, before serving)
    except ValueError as e:
        raise ServeError(f"--chunk/--first_chunk/--lookahead/--crossfade: {e}") from None
    return create_app(service, a.model_id, stream), service


def serve(argv: list[str] | None) -> None:
    a = parse_flags(ServeArgs, argv, prog="python -m minihiggs.serve", description=__doc__.split("\n\n")[0])
    app, service = build(a)
    import uvicorn

    try:
        uvicorn.run(app, host=a.host, port=a.port, log_level="info")
    finally:
        service.close()


def main(argv: list[str] | None = None) -> int:
    return run(PROG, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
