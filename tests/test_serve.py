"""`python -m minihiggs.serve` with real clients (the `openai` package and plain HTTP) against a server on
127.0.0.1 started here: a tiny base, two LoRA adapters of different ranks and targets, a random decode-only codec.
Concurrent requests for different voices get what they get alone; streamed bodies equal whole ones; a client that
disconnects frees its row; bad requests get OpenAI-shaped 4xx errors."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import torch
import uvicorn

from helpers import LLAMA_DIR, TINY
from minihiggs import load_model
from minihiggs.generate import Engine, Request, SamplingConfig, tts_prompt
from minihiggs.generate.loading import load_codec, load_generation_model, stop_token_ids
from minihiggs.lora.adapter import save_adapter
from minihiggs.lora.apply import apply_lora
from minihiggs.model.tiny import write_tiny_checkpoint
from minihiggs.serve.__main__ import ServeArgs, build
from minihiggs.serve.app import pcm16
from minihiggs.serve.voices import VoiceError, load_voices, read_presets
from minihiggs.text.tokenizer import TextTokenizer, write_higgs_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 24  # decoding steps per request (~0.6 s of audio)


def make_adapter(base, out, r, targets, seed):
    model = load_model(base)
    apply_lora(model, r=r, alpha=2 * r, targets=targets, seed=seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed * 1000 + len(n)))
    return save_adapter(model, out, base_model_name_or_path=str(base))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from minihiggs.codec.tiny import write_random_decoder

    root = tmp_path_factory.mktemp("serve")
    base = write_tiny_checkpoint(root / "base", seed=0, **TINY)
    write_higgs_tokenizer(LLAMA_DIR, base)
    voices = root / "voices"
    voices.mkdir()
    make_adapter(base, voices / "cleo", 4, None, 1)  # a sub-directory adapter: the voice "cleo"
    make_adapter(base, root / "ben_run" / "final", 2, ["q_proj", "v_proj", "down_proj"], 2)
    np.save(voices / "ref.npy", np.random.default_rng(0).integers(0, 1024, (8, 10)))
    (voices / "config.json").write_text(json.dumps({
        "ava": {"transcript": "The words of the reference.", "codes_file": "ref.npy"},
        "ben": {"adapter": "../ben_run/final", "transcript": "Other words.", "codes_file": "ref.npy",
                "scene": "Audio is recorded from a quiet room. Speaker: ben."}}))
    return {"base": base, "voices": voices, "codec": write_random_decoder(root / "codec")}


@pytest.fixture(scope="module")
def server(files):
    app, service = build(ServeArgs(voices=str(files["voices"]), base_ckpt=str(files["base"]),
                                   codec=str(files["codec"]), slots=4, max_len=1536, max_tokens=1200,
                                   max_input_tokens=40, chunk=6, first_chunk=2), log=lambda m: None)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a free port, held from here on
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield {"url": url, "service": service, "client": openai.OpenAI(base_url=url + "/v1", api_key="none")}
    srv.should_exit = True
    thread.join(timeout=10)
    service.close()


def speech(server, voice, text="Hello there.", seed=1, **kw) -> bytes:
    """The whole body of a non-streamed request, through the openai client."""
    r = server["client"].audio.speech.create(model="minihiggs", voice=voice, input=text, response_format="pcm",
                                             extra_body={"seed": seed, "max_tokens": STEPS, **kw})
    return r.content


def test_lists_models_voices_and_health(server):
    assert httpx.get(server["url"] + "/health").json()["status"] == "ok"
    assert [m.id for m in server["client"].models.list().data] == ["minihiggs"]
    voices = {v["name"]: v for v in httpx.get(server["url"] + "/v1/audio/voices").json()["voices"]}
    assert set(voices) == {"ava", "ben", "cleo"}
    assert voices["ava"]["adapter"] is None and voices["ava"]["reference"]
    assert voices["cleo"]["adapter"].endswith("cleo") and not voices["cleo"]["reference"]


def test_concurrent_voices_get_what_they_get_alone(server):
    """Three voices (no adapter, two adapters of different ranks/targets) batched together, seeded sampling and
    greedy: each body is bytewise its body when it runs alone."""
    jobs = [("ava", 1, 0.7), ("ben", 2, 0.7), ("cleo", 3, 0.7), ("ben", 4, 0.0), ("cleo", 4, 0.0)]
    alone = [speech(server, v, seed=s, temperature=t) for v, s, t in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda j: speech(server, j[0], seed=j[1], temperature=j[2]), jobs))
    assert all(len(a) > 0 for a in alone)
    for job, a, b in zip(jobs, alone, together):
        assert a == b, job
    assert len({a for a in alone}) == len(alone)  # the voices differ (the comparison above is not vacuous)


def test_an_adapter_row_is_the_adapter_model(server, files):
    """The batched per-row LoRA gives the codes of the plain LoRA model (greedy; audio within 1 LSB of 16 bits)."""
    model = load_generation_model(str(files["base"]), str(files["voices"] / "cleo"), merge=False, log=lambda m: None)
    tok = TextTokenizer.from_dir(files["base"])
    req = Request(tts_prompt(tok, "Hello there."), SamplingConfig(temperature=0, seed=4), STEPS)
    [gen] = Engine(model, stop_tokens=stop_token_ids(tok)).generate([req])
    want = np.frombuffer(pcm16(load_codec(files["codec"]).decode(gen.codes())), "<i2").astype(int)
    got = np.frombuffer(speech(server, "cleo", seed=4, temperature=0.0), "<i2").astype(int)
    assert got.shape == want.shape and np.abs(got - want).max() <= 1


def test_streamed_wav_equals_the_whole_one(server):
    whole = server["client"].audio.speech.create(model="minihiggs", voice="ben", input="Stream me.",
                                                 response_format="wav", extra_body={"seed": 5, "max_tokens": STEPS})
    with server["client"].audio.speech.with_streaming_response.create(
            model="minihiggs", voice="ben", input="Stream me.", response_format="wav",
            extra_body={"seed": 5, "max_tokens": STEPS, "stream": True}) as r:
        parts = list(r.iter_bytes())
    streamed = b"".join(parts)
    assert streamed[:4] == b"RIFF" and whole.content[:4] == b"RIFF"
    assert streamed[44:] == whole.content[44:] and len(whole.content) > 44
    assert len(parts) >= 2


def test_plain_http_streams_pcm_in_chunks(server):
    sizes = []
    body = {"model": "minihiggs", "input": "Plain HTTP.", "voice": "ava", "response_format": "pcm", "stream": True,
            "seed": 6, "max_tokens": STEPS}
    with httpx.stream("POST", server["url"] + "/v1/audio/speech", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "audio/pcm"
        for b in r.iter_raw():
            sizes.append(len(b))
    assert sum(sizes) > 0 and sizes[0] <= 2 * 960 * 2  # the short first chunk (2 frames of 16-bit samples)


def test_a_client_that_disconnects_frees_its_row(server):
    service = server["service"]
    body = {"input": "A long one.", "voice": "cleo", "response_format": "pcm", "stream": True, "seed": 7,
            "max_tokens": 1200}  # ~1200 steps: far longer than this test waits
    with httpx.stream("POST", server["url"] + "/v1/audio/speech", json=body, timeout=60) as r:
        next(r.iter_raw())
        assert service.batcher.busy == 1
    deadline = time.time() + 20
    while service.batcher.busy and time.time() < deadline:
        time.sleep(0.05)
    assert service.batcher.busy == 0
    assert len(speech(server, "ava")) > 0  # and the server keeps serving


@pytest.mark.parametrize("body,param,message", [
    ({"input": "Hi.", "voice": "nobody"}, "voice", "unknown voice 'nobody'"),
    ({"input": "", "voice": "ava"}, "input", "input is empty"),
    ({"input": "word " * 100, "voice": "ava"}, "input", "tokens long; this server takes at most 40"),
    ({"input": "Hi.", "voice": "ava", "temperature": "hot"}, "temperature", "valid number"),
    ({"input": "Hi.", "voice": "ava", "stream": "yes"}, "stream", "valid boolean"),
    ({"input": "Hi.", "voice": "ava", "response_format": "mp3"}, "response_format", "'wav' or 'pcm'"),
    ({"voice": "ava"}, "input", "Field required"),
    ({"input": "Hi.", "voice": "ava", "max_tokens": 0}, "max_tokens", "max_tokens must lie in [1, 1200]"),
])
def test_bad_requests_get_openai_shaped_errors(server, body, param, message):
    r = httpx.post(server["url"] + "/v1/audio/speech", json=body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and message in err["message"], err


def test_the_openai_client_sees_a_bad_request(server):
    with pytest.raises(openai.BadRequestError, match="unknown voice"):
        server["client"].audio.speech.create(model="minihiggs", voice="nobody", input="Hi.")
    assert httpx.get(server["url"] + "/health").json()["busy"] == 0


@pytest.mark.parametrize("config,message", [
    ('{"x": {"transcript": "t", "codes_file": "missing.npy"}}', "codes_file"),
    ('{"x": {"transcript": "t", "audio": "a.wav"}}', "unknown field(s) 'audio'"),
    ('{"x": {"transcript": "t"}}', "give a reference"),
    ('{"x": {"adapter": 3}}', "'adapter' must be a string"),
    ('{"x": \n[', "config.json:2: not valid JSON"),
])
def test_bad_voice_presets_are_named(tmp_path, config, message):
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(VoiceError, match="config.json") as e:
        read_presets(tmp_path)
        load_voices(tmp_path, None, None, "codec", "cpu")
    assert message in str(e.value)


def test_the_command_names_what_is_wrong(tmp_path, capsys):
    from minihiggs.serve.__main__ import main

    assert main(["--voices", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip().endswith("nowhere: voices directory not found")
    (tmp_path / "config.json").write_text('{"x": {"adapter": "missing_run/final"}}')
    assert main(["--voices", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("serve: error: ") and "config.json ['x']" in err and "missing_run" in err, err


def test_chat_completions_stream_the_same_audio_as_sse_deltas(server):
    """`POST /v1/chat/completions` (modalities text+audio) through the openai client: SSE chunks whose
    `delta.audio.data` (base64 PCM) add up to the speech endpoint's body for the same request."""
    import base64

    want = speech(server, "ben", text="Chat with me.", seed=8)
    chunks = server["client"].chat.completions.create(
        model="minihiggs", modalities=["text", "audio"], audio={"voice": "ben", "format": "pcm16"}, stream=True,
        messages=[{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Chat with me."}],
        extra_body={"seed": 8, "max_tokens": STEPS})
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    audio = [d.audio.model_dump() if hasattr(d.audio, "model_dump") else d.audio for d in deltas]
    got = b"".join(base64.b64decode(a["data"]) for a in audio if a and a.get("data"))
    assert audio[0]["transcript"] == "Chat with me."
    assert got == want and len(audio) >= 3
    r = httpx.post(server["url"] + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi."}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "modalities"
