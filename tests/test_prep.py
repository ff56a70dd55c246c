"""prep.py end to end: real audio files, every kind of bad input, Whisper features, resume, workers, codec."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

import prep
from minihiggs.errors import PrepError
from minihiggs.prep import worker as prep_worker
from minihiggs.prep.pipeline import model_settings
from golden import REPO
from helpers import LLAMA_DIR, NO_CODEC, codes_file, errors_of, run, tone
from minihiggs.audio.io import load_audio
from minihiggs.text.chatml import encode_chatml, parse_chatml, tts_sample
from minihiggs.data.dataset import ShardDataset
from minihiggs.audio.mel import whisper_features

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A folder of real audio files, precomputed codes, and a manifest with every kind of bad input."""
    d = tmp_path_factory.mktemp("data")
    (d / "audio").mkdir()
    sf.write(d / "audio" / "a16.wav", tone(16000, 0.8), 16000)
    sf.write(d / "audio" / "b48.flac", tone(48000, 0.6, 2), 48000)
    (d / "audio" / "garbage.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk" + os.urandom(200))
    sf.write(d / "audio" / "empty.wav", np.zeros(0, np.float32), 16000)
    sf.write(d / "audio" / "silent.wav", np.zeros(8000, np.float32), 16000)
    sf.write(d / "audio" / "long.wav", tone(16000, 65.0, f0=180.0), 16000)
    cA, cB, cC = (codes_file(d / n, f, s) for n, f, s in (("cA.npy", 20, 1), ("cB.npy", 15, 2), ("cC.npy", 12, 3)))
    codes_file(d / "cLong.npy", 2000, 4)
    codes_file(d / "cBad.npy", 10, 5, C=4)
    codes_file(d / "cL65.npy", 1625, 6)
    sys_msg = {"role": "system", "content": "Generate audio following instruction."}
    good_a = {"messages": [sys_msg,
                           {"role": "user", "content": [{"type": "text", "text": "Repeat after me, naïve café: 42!"},
                                                        {"type": "audio", "audio_url": "audio/a16.wav",
                                                         "audio_codes": cA}]},
                           {"role": "assistant", "content": [{"type": "audio", "audio_url": "audio/b48.flac",
                                                              "audio_codes": cB}]}],
              "speaker": "alice", "id": "good-a"}
    good_b = {"messages": [{"role": "user", "content": "hello\n\n  world"},
                           {"role": "assistant", "content": [{"type": "audio", "audio_codes": cC}]}]}
    good_c = {"messages": [{"role": "user", "content": [{"type": "audio", "audio_url": "audio/a16.wav",
                                                         "audio_codes": cA}]},
                           {"role": "assistant", "content": "the transcript"}], "misc": {"speaker": "bob"}}
    tts = lambda audio, **kw: {"messages": [{"role": "user", "content": "x"},  # noqa: E731
                                            {"role": "assistant", "content": [{"type": "audio", **audio}]}], **kw}
    lines = [
        json.dumps(good_a),                                                            # 1
        json.dumps(tts({"audio_url": "audio/nope.wav"})),                             # 2 missing audio
        '{"messages": [{"role": "user", "content": "unterminated"}',                   # 3 broken JSON
        json.dumps(good_b),                                                            # 4
        json.dumps(tts({"audio_url": "audio/garbage.wav"})),                          # 5 corrupt audio
        json.dumps({**good_b, "foo": 1}),                                              # 6 unknown field
        json.dumps(tts({"audio_url": "audio/empty.wav"})),                            # 7 empty audio
        json.dumps(tts({"audio_url": "audio/silent.wav"})),                           # 8 silent audio
        None,                                                                          # 9 non-UTF-8 text
        json.dumps({**good_b, "start_index": 5}),                                      # 10 no trainable target
        json.dumps(tts({"audio_codes": "cLong.npy"})),                                # 11 over max_tokens
        "",                                                                            # 12 blank: ignored
        json.dumps(tts({"audio_codes": cC, "volume": 3})),                            # 13 unknown audio field
        json.dumps(tts({"audio_codes": "cBad.npy"})),                                 # 14 bad codes shape
        json.dumps(tts({"audio_codes": "nope.npy"})),                                 # 15 missing codes file
        json.dumps(good_c),                                                            # 16
        json.dumps({"messages": [{"role": "user", "content": "a <|AUDIO|> b"},        # 17 placeholder in text
                                 {"role": "assistant", "content": "c"}]}),
        json.dumps([1, 2, 3]),                                                         # 18 not an object
    ]
    raw = []
    for ln in lines:
        if ln is None:
            raw.append(b'{"messages": [{"role": "user", "content": "caf\xe9 latin-1"}, '
                       b'{"role": "assistant", "content": "x"}]}')
        else:
            raw.append(ln.encode("utf-8"))
    raw[0] = b"\xef\xbb\xbf" + raw[0]  # a byte-order mark is tolerated
    (d / "train.jsonl").write_bytes(b"\n".join(raw) + b"\n")
    expected_errors = {2: "missing_audio", 3: "bad_json", 5: "corrupt_audio", 6: "unknown_field", 7: "empty_audio",
                       8: "silent_audio", 9: "bad_text_encoding", 10: "no_target", 11: "too_long",
                       13: "unknown_field", 14: "bad_codes", 15: "missing_audio", 17: "invalid", 18: "invalid"}
    return {"dir": d, "manifest": d / "train.jsonl", "good": [(1, good_a), (4, good_b), (16, good_c)],
            "errors": expected_errors}


def shard_hashes(out):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(out).glob("shard-*.bin"))}


def test_bad_inputs_reported_good_samples_intact(ckpts, data, tmp_path):
    out = tmp_path / "out"
    summary = run(data["manifest"], out, ckpts["ff"], shard_size=4, max_tokens=1000)
    errs = errors_of(out)
    assert {e["line"]: e["kind"] for e in errs} == data["errors"]
    assert [e["line"] for e in errs] == sorted(data["errors"])
    assert all(e["manifest"] == str(data["manifest"]) and e["reason"] for e in errs)
    assert "nope.wav" in next(e for e in errs if e["line"] == 2)["reason"]
    assert summary["samples"] == 3 and summary["skipped"] == len(data["errors"])
    ds = ShardDataset(out, verify="full")
    assert len(ds) == 3 and not ds.whisper
    assert ds.sample_ids == ["good-a", "train.jsonl:4", "train.jsonl:16"]
    assert [ds.record(i)["line"] for i in range(3)] == [1, 4, 16]
    assert [ds.speakers[i] for i in range(3)] == ["alice", None, "bob"]
    tok = ckpts["tok"]
    for i, (_, obj) in enumerate(data["good"]):
        s = ds[i]
        enc = encode_chatml(parse_chatml(obj, str(data["dir"])), tok)
        assert s.input_ids.tolist() == enc.input_ids
        assert s.label_ids.tolist() == enc.label_ids
        assert s.whisper_features is None
        want = [np.load(a.audio_codes) for a in enc.audio]
        assert len(s.audio_codes) == len(want)
        for got, w in zip(s.audio_codes, want):
            assert np.array_equal(got.numpy(), w)
        s.validate(128015, 128016, 8)
    # lengths for bucketing: text tokens + (frames + 9) per code segment
    s0 = ds[0]
    assert ds.lengths[0] == len(s0.input_ids) - 2 + (20 + 9) + (15 + 9)


def test_whisper_checkpoint_stores_features_for_audio_in(ckpts, data, tmp_path):
    out = tmp_path / "out"
    run(data["manifest"], out, ckpts["whisper"], shard_size=100, max_tokens=1000)
    ds = ShardDataset(out)
    assert ds.whisper and len(ds) == 3
    want, lens = whisper_features(load_audio(data["dir"] / "audio" / "a16.wav", 16000))
    for i, n_in in ((0, 1), (1, 0), (2, 1)):
        s = ds[i]
        assert len(s.whisper_features) == n_in and len(s.whisper_lengths) == n_in
        for f in s.whisper_features:
            assert torch.equal(f, want[0])
        assert s.whisper_lengths == lens * n_in
        s.validate(128015, 128016, 8)


def test_long_audio_in_is_chunked(ckpts, data, tmp_path):
    d = data["dir"]
    obj = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Transcribe:"},
                                                     {"type": "audio", "audio_url": "audio/long.wav",
                                                      "audio_codes": "cL65.npy"}]},
                        {"role": "assistant", "content": "words"}]}
    (d / "long.jsonl").write_text(json.dumps(obj) + "\n")
    run(d / "long.jsonl", tmp_path / "w", ckpts["whisper"])
    run(d / "long.jsonl", tmp_path / "f", ckpts["ff"])
    s = ShardDataset(tmp_path / "w")[0]
    codes = np.load(d / "cL65.npy")
    ids = s.input_ids.tolist()
    assert ids.count(128015) == 3 and ids.count(128011) == 3
    i = ids.index(128011)
    assert ids[i:i + 9] == [128011, 128015, 128012] * 3
    assert [c.shape[1] for c in s.audio_codes] == [750, 750, 125]
    assert np.array_equal(torch.cat(s.audio_codes, 1).numpy(), codes)
    want, lens = whisper_features(load_audio(d / "audio" / "long.wav", 16000))
    assert s.whisper_lengths == lens == [3000, 3000, 500]
    for a, b in zip(s.whisper_features, want):
        assert torch.equal(a, b)
    # without the Whisper tower: one placeholder, one segment, no features
    s = ShardDataset(tmp_path / "f")[0]
    assert s.input_ids.tolist().count(128015) == 1 and [c.shape[1] for c in s.audio_codes] == [1625]
    assert s.whisper_features is None


def test_formats_rates_and_channels(ckpts, tmp_path):
    """WAV and FLAC at 16 / 22.05 / 44.1 / 48 kHz, mono and stereo: decoded, down-mixed and resampled the way
    the reference does (checked through the Whisper features, which see the waveform)."""
    lines, files = [], []
    for sr in (16000, 22050, 44100, 48000):
        for ext in ("wav", "flac"):
            for ch in (1, 2):
                name = f"t{sr}_{ch}.{ext}"
                sf.write(tmp_path / name, tone(sr, 0.5, ch, f0=100 + sr / 1000, seed=sr + ch), sr)
                files.append(name)
                codes_file(tmp_path / f"{name}.npy", 13, sr + ch)
                lines.append(json.dumps({"messages": [
                    {"role": "user", "content": [{"type": "audio", "audio_url": name, "audio_codes": f"{name}.npy"}]},
                    {"role": "assistant", "content": "ok"}]}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    run(tmp_path / "m.jsonl", tmp_path / "out", ckpts["whisper"], shard_size=5)
    ds = ShardDataset(tmp_path / "out")
    assert len(ds) == len(files) == 16
    for i, name in enumerate(files):
        data, sr = sf.read(tmp_path / name, dtype="float32", always_2d=True)
        mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
        ref = load_audio(tmp_path / name, 16000)
        assert abs(len(ref) - len(mono) * 16000 / sr) < 1
        f, v = whisper_features(ref)
        s = ds[i]
        assert torch.equal(s.whisper_features[0], f[0]) and s.whisper_lengths == v
        assert np.array_equal(s.audio_codes[0].numpy(), np.load(tmp_path / f"{name}.npy"))


def test_json_array_manifest_line_numbers(ckpts, data, tmp_path):
    good = [o for _, o in data["good"]]
    text = json.dumps(good[:2], indent=2)
    text = text[:-2] + ',\n  {"messages": [1, 2]},\n' + json.dumps(good[2], indent=2) + "\n]"
    (data["dir"] / "arr.json").write_text(text)
    lines = text.splitlines()
    line_bad = next(i for i, ln in enumerate(lines, 1) if '"messages": [1, 2]' in ln)
    run(data["dir"] / "arr.json", tmp_path / "out", ckpts["ff"])
    ds = ShardDataset(tmp_path / "out")
    assert len(ds) == 3
    assert [ds.record(i)["line"] for i in range(3)] == [2, next(i for i, ln in enumerate(lines, 1)
                                                             if ln.startswith("  {") and i > 2 and i < line_bad),
                                                        line_bad + 1]
    assert [(e["line"], e["kind"]) for e in errors_of(tmp_path / "out")] == [(line_bad, "invalid")]
    # broken JSON in an array: entries before the break are kept, the break is reported at its line
    (data["dir"] / "broken.json").write_text(json.dumps(good[:1], indent=1)[:-1] + ',\n {"messages": oops}\n]')
    run(data["dir"] / "broken.json", tmp_path / "b", ckpts["ff"])
    assert len(ShardDataset(tmp_path / "b")) == 1
    errs = errors_of(tmp_path / "b")
    assert len(errs) == 1 and errs[0]["kind"] == "bad_json"
    assert errs[0]["line"] == (data["dir"] / "broken.json").read_text().splitlines().index(' {"messages": oops}') + 1


def test_resume_after_interrupted_run(ckpts, data, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    run(data["manifest"], clean, ckpts["ff"], shard_size=3, max_tokens=1000)
    out = tmp_path / "out"
    real_run = prep_worker.Worker.run
    calls = []

    def crashing(self, job):
        calls.append(job.name)
        if job.name == "shard-00002":
            raise KeyboardInterrupt  # interrupted in the middle of this shard
        return real_run(self, job)

    monkeypatch.setattr(prep_worker.Worker, "run", crashing)
    with pytest.raises(KeyboardInterrupt):
        run(data["manifest"], out, ckpts["ff"], shard_size=3, max_tokens=1000)
    assert calls == ["shard-00000", "shard-00001", "shard-00002"]
    assert not (out / "index.json").exists()
    with pytest.raises(Exception, match="prep did not finish"):
        ShardDataset(out)
    # a half-written shard: data file without its index, and a stray temporary file
    (out / "shard-00003.bin").write_bytes(b"partial")
    (out / "shard-00004.bin.tmp").write_bytes(b"partial")
    st0 = (out / "shard-00000.bin").stat()
    calls.clear()

    def counting(self, job):
        calls.append(job.name)
        return real_run(self, job)

    monkeypatch.setattr(prep_worker.Worker, "run", counting)
    run(data["manifest"], out, ckpts["ff"], shard_size=3, max_tokens=1000)
    assert calls == ["shard-00002", "shard-00003", "shard-00004", "shard-00005"]
    st1 = (out / "shard-00000.bin").stat()
    assert (st0.st_ino, st0.st_mtime_ns) == (st1.st_ino, st1.st_mtime_ns)  # finished shard not redone
    assert not list(out.glob("*.tmp"))
    assert shard_hashes(out) == shard_hashes(clean)
    assert errors_of(out) == errors_of(clean)
    assert len(ShardDataset(out, verify="full")) == 3
    # a complete run re-run does nothing
    calls.clear()
    run(data["manifest"], out, ckpts["ff"], shard_size=3, max_tokens=1000)
    assert calls == [] and shard_hashes(out) == shard_hashes(clean)


def test_changed_settings_refused_unless_overwrite(ckpts, data, tmp_path):
    out = tmp_path / "out"
    run(data["manifest"], out, ckpts["ff"], shard_size=3)
    with pytest.raises(PrepError, match="shard_size"):
        run(data["manifest"], out, ckpts["ff"], shard_size=4)
    run(data["manifest"], out, ckpts["ff"], shard_size=4, overwrite=True)
    assert len(ShardDataset(out)) == 4  # no max_tokens now: line 11 is usable
    assert (out / "shard-00004.bin").exists() and not (out / "shard-00005.bin").exists()


def test_strict_and_nothing_usable(ckpts, data, tmp_path):
    with pytest.raises(PrepError, match="--strict"):
        run(data["manifest"], tmp_path / "s", ckpts["ff"], strict=True)
    assert not (tmp_path / "s" / "index.json").exists() and errors_of(tmp_path / "s")
    lines = data["manifest"].read_bytes().splitlines()
    (data["dir"] / "bad.jsonl").write_bytes(b"\n".join([lines[1], lines[2], lines[5]]) + b"\n")
    with pytest.raises(PrepError, match="nothing usable"):
        run(data["dir"] / "bad.jsonl", tmp_path / "n", ckpts["ff"])
    assert [e["line"] for e in errors_of(tmp_path / "n")] == [1, 2, 3]


def test_wrong_tokenizer_refused(ckpts, tmp_path, data):
    d = tmp_path / "stock"
    d.mkdir()
    shutil.copy(LLAMA_DIR / "tokenizer.json", d / "tokenizer.json")
    shutil.copy(ckpts["ff"] / "config.json", d / "config.json")
    with pytest.raises(PrepError, match="AUDIO"):
        run(data["manifest"], tmp_path / "out", d)


def test_two_workers_same_output(ckpts, data, tmp_path):
    run(data["manifest"], tmp_path / "one", ckpts["ff"], shard_size=3, max_tokens=1000)
    summary = run(data["manifest"], tmp_path / "two", ckpts["ff"], shard_size=3, max_tokens=1000, workers=2)
    assert summary["clips_processed"] == 17
    assert shard_hashes(tmp_path / "two") == shard_hashes(tmp_path / "one")
    assert errors_of(tmp_path / "two") == errors_of(tmp_path / "one")


def test_cli_and_makefile(ckpts, data, tmp_path):
    rc = prep.main(["--manifest", str(data["manifest"]), "--out", str(tmp_path / "cli"), "--base_ckpt",
                    str(ckpts["ff"]), "--codec", NO_CODEC, "--max_tokens", "1000", "--no_progress"])
    assert rc == 0 and len(ShardDataset(tmp_path / "cli")) == 3
    rc = prep.main(["--manifest", str(data["manifest"]), "--out", str(tmp_path / "cli2"), "--base_ckpt",
                    str(ckpts["ff"]), "--codec", NO_CODEC, "--strict", "--no_progress"])
    assert rc == 2  # a user error, as in the other commands
    make = subprocess.run(["make", "-n", "-W", ".venv/.installed", "prep", "MANIFEST=m.jsonl", "OUT=o",
                           "ARGS=--workers 2"], cwd=REPO, capture_output=True, text=True)
    assert make.returncode == 0, make.stderr
    assert "prep.py --manifest m.jsonl --out o --workers 2" in make.stdout


# ------------------------------------------------------------------------------------------- with the codec
def test_plain_list_voice_clone_with_codec(ckpts, codec_variant, codec_dir, tmp_path):
    """A `path|text|speaker` list through the real-architecture codec: codes equal the golden codes of the
    tokenizer clips, the voice-clone layout pairs utterances of the same speaker, bad lines are reported."""
    a, b = sorted((codec_variant / "clips").glob("*.wav"))[:2]
    gold = {p: load_file(codec_variant / "golden" / f"{p.stem}.safetensors")["codes"] for p in (a, b)}
    lst = [f"{a}|A rising chirp.|spk1".encode(),
           b"only-one-column",
           f"{b}|A short tone.|spk1".encode(),
           "caf\xe9|latin-1 line|spk1".encode("latin-1"),
           f"{tmp_path / 'missing.wav'}|Gone.|spk2".encode()]
    (tmp_path / "list.csv").write_bytes(b"path|text|speaker\n" + b"\n".join(lst) + b"\n")
    out = tmp_path / "out"
    summary = run(tmp_path / "list.csv", out, ckpts["ff"], codec=str(codec_dir), voice_clone=True, device="cpu")
    assert summary["samples"] == 2
    assert [(e["line"], e["kind"]) for e in errors_of(out)] == [(3, "invalid"), (5, "bad_text_encoding"),
                                                                (6, "missing_audio")]
    ds = ShardDataset(out)
    assert ds.sample_ids == [str(a), str(b)]
    tok = ckpts["tok"]
    s = ds[0]  # target a, reference b (the next utterance of spk1)
    obj = tts_sample("A rising chirp.", str(a), reference=("A short tone.", str(b)), speaker="spk1")
    enc = encode_chatml(parse_chatml(obj), tok)
    assert s.input_ids.tolist() == enc.input_ids and s.label_ids.tolist() == enc.label_ids
    assert torch.equal(s.audio_codes[0], gold[b]) and torch.equal(s.audio_codes[1], gold[a])
    s = ds[1]
    assert torch.equal(s.audio_codes[0], gold[a]) and torch.equal(s.audio_codes[1], gold[b])
    assert ds.speakers == ["spk1", "spk1"]


def test_raw_audio_offset_duration(ckpts, tmp_path):
    import base64
    import io

    from minihiggs.audio.io import resample

    wave = tone(22050, 2.0, 2, seed=9)
    buf = io.BytesIO()
    sf.write(buf, wave, 22050, format="FLAC")
    b64 = base64.b64encode(buf.getvalue()).decode()
    sf.write(tmp_path / "x.wav", wave, 22050)
    codes_file(tmp_path / "c.npy", 10, 1)
    item = lambda **kw: {"messages": [{"role": "user", "content": [{"type": "audio", "audio_codes": "c.npy", **kw}]},  # noqa: E731
                                      {"role": "assistant", "content": "ok"}]}
    lines = [item(raw_audio=b64), item(audio_url="x.wav", offset=0.5, duration=1.0),
             item(raw_audio=base64.b64encode(b"not audio at all").decode()), item(audio_url="x.wav", offset=5.0)]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    run(tmp_path / "m.jsonl", tmp_path / "out", ckpts["whisper"])
    assert [(e["line"], e["kind"]) for e in errors_of(tmp_path / "out")] == [(3, "corrupt_audio"), (4, "empty_audio")]
    ds = ShardDataset(tmp_path / "out")
    flac = sf.read(io.BytesIO(buf.getvalue()), dtype="float32")[0].mean(axis=1, dtype=np.float32)  # 16-bit FLAC
    wav = sf.read(tmp_path / "x.wav", dtype="float32")[0].mean(axis=1, dtype=np.float32)
    full, _ = whisper_features(resample(flac, 22050, 16000))
    part, _ = whisper_features(resample(wav[11025:11025 + 22050], 22050, 16000))
    assert torch.equal(ds[0].whisper_features[0], full[0])
    assert torch.equal(ds[1].whisper_features[0], part[0]) and ds[1].whisper_lengths == [100]


@pytest.mark.parametrize("workers", [1, 2])
def test_codec_needed_but_unavailable(workers, ckpts, data, tmp_path):
    """In a pool worker too, the user error arrives as its one line (a bug in a worker keeps its traceback)."""
    line = json.dumps({"messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": [{"type": "audio", "audio_url": str(data["dir"] / "audio" / "a16.wav")}]}]})
    (tmp_path / "m.jsonl").write_text(f"{line}\n{line}\n")
    with pytest.raises(PrepError, match="^cannot load the audio tokenizer '/nonexistent/codec' [^\n]*$"):
        run(tmp_path / "m.jsonl", tmp_path / "out", ckpts["ff"], workers=workers, shard_size=1)


# ------------------------------------------------------------------------------------------- review fixes
def test_settings_read_like_the_trainer(ckpts, data, tmp_path):
    """A config.json without the optional audio fields means the model's defaults (no Whisper tower, 8
    codebooks) to the trainer; prep must read it the same way, or train.py refuses the shards (or prep rejects
    every clip for a codebook count the model does not have)."""
    from minihiggs.config import HiggsConfig
    from minihiggs.train.data import check_dataset

    d = tmp_path / "ckpt"
    shutil.copytree(ckpts["ff"], d)
    cfg = json.loads((d / "config.json").read_text())
    for k in ("encode_whisper_embed", "skip_audio_tower", "audio_num_codebooks", "audio_encoder_config"):
        cfg.pop(k, None)
    (d / "config.json").write_text(json.dumps(cfg))
    model_cfg = HiggsConfig.from_dict(cfg)
    ms = model_settings(cfg)
    assert ms.whisper == model_cfg.uses_whisper_features
    assert ms.num_codebooks == model_cfg.audio_num_codebooks == 8
    run(data["manifest"], tmp_path / "out", d, max_tokens=1000)
    ds = ShardDataset(tmp_path / "out")
    assert len(ds) == 3
    check_dataset(ds, model_cfg)  # raises ShardError on a mismatch


def test_changed_codec_refused_on_resume(ckpts, data, tmp_path):
    # codes from two different audio tokenizers must never be mixed in one prepared directory
    out = tmp_path / "out"
    run(data["manifest"], out, ckpts["ff"], shard_size=3, codec="/codec/one")
    with pytest.raises(PrepError, match="codec"):
        run(data["manifest"], out, ckpts["ff"], shard_size=3, codec="/codec/two")


def test_dead_worker_is_an_error_not_a_hang(ckpts, data, tmp_path):
    """A worker process that dies (OOM killer, native crash) must fail the run, not hang it forever."""
    (tmp_path / "crash_helper.py").write_text(
        "import os\nfrom minihiggs.prep import pool\n\n"
        "def run_job(job):\n"
        "    if job.name == 'shard-00001':\n"
        "        os._exit(3)  # dies like a process killed for memory\n"
        "    return pool._W.run(job)\n")
    script = (
        "import sys\n"
        f"sys.path[:0] = [{str(tmp_path)!r}, {str(REPO)!r}]\n"
        "import crash_helper\n"
        "from minihiggs.prep import PrepConfig, prepare, pool\n"
        "from minihiggs.errors import PrepError\n"
        "pool._run_job = crash_helper.run_job\n"
        "try:\n"
        f"    prepare(PrepConfig({str(data['manifest'])!r}, {str(tmp_path / 'out')!r},\n"
        f"                       base_ckpt={str(ckpts['ff'])!r}, codec={NO_CODEC!r}, workers=2, shard_size=3,\n"
        f"                       progress=False), log=lambda *a: None)\n"
        "except PrepError as e:\n"
        "    print('PREP_ERROR', e)\n"
        "    sys.exit(7)\n")
    try:
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=120, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail("prep hung after a worker process died")
    assert r.returncode == 7, r.stdout + r.stderr
    assert "worker process died" in r.stdout
    # the finished shards are kept; a normal re-run resumes and completes
    run(data["manifest"], tmp_path / "out", ckpts["ff"], shard_size=3, max_tokens=None)
    assert len(ShardDataset(tmp_path / "out")) == 4
