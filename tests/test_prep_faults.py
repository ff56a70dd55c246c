"""prep.py under faults: every good sample kept and every bad one reported, bounded memory for long clips,
workers that die with their parent, token ids the model cannot embed, ambiguous plain lists, clear messages."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from golden import REPO
from minihiggs.data.dataset import ShardDataset
from minihiggs.errors import PrepError
from minihiggs.prep import worker as prep_worker
from minihiggs.prep.manifest import BadEntry, ChatmlEntry
from minihiggs.prep.plain_list import read_plain_list
from helpers import NO_CODEC, codes_file, errors_of, run, tone

SYS = {"role": "system", "content": "Generate audio following instruction."}


def sample(text: str, **audio) -> dict:
    return {"messages": [SYS, {"role": "user", "content": text},
                         {"role": "assistant", "content": [{"type": "audio", **audio}]}]}


# ------------------------------------------------------------------------------------------ samples and ids

def test_token_ids_outside_the_vocabulary_are_a_skipped_sample(ckpts, tmp_path):
    """`<|image|>` is a special token of the Llama-3 tokenizer (id 128256) but not of the model (vocab_size
    128256). Was: written to the shards, and training died with IndexError (a device-side assert on CUDA)."""
    codes_file(tmp_path / "c.npy", 12, 1)
    lines = [sample("a plain sentence", audio_codes="c.npy"), sample("look: <|image|> here", audio_codes="c.npy"),
             sample("another one", audio_codes="c.npy")]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    summary = run(tmp_path / "m.jsonl", out, ckpts["ff"])
    assert summary["samples"] == 2
    (e,) = errors_of(out)
    assert (e["line"], e["kind"]) == (2, "bad_token") and "'<|image|>' (id 128256)" in e["reason"]
    ds = ShardDataset(out, vocab_size=128256)  # and what was written is embeddable
    assert max(ds.max_token_ids()) < 128256


def test_json_array_with_a_byte_order_mark(ckpts, tmp_path):
    """Was: refused whole ("a .json manifest must be a JSON array"), every good sample lost."""
    codes_file(tmp_path / "c.npy", 12, 1)
    text = json.dumps([sample("one", audio_codes="c.npy"), sample("two", audio_codes="c.npy")], indent=1)
    (tmp_path / "m.json").write_bytes(b"\xef\xbb\xbf" + text.encode())
    run(tmp_path / "m.json", tmp_path / "out", ckpts["ff"])
    ds = ShardDataset(tmp_path / "out")
    assert len(ds) == 2 and not errors_of(tmp_path / "out")
    assert [ds.record(i)["line"] for i in range(2)] == [i for i, ln in enumerate(text.splitlines(), 1) if ln == " {"]


def test_voice_clone_references_only_among_usable_utterances(ckpts, codec_variant, codec_dir, tmp_path):
    """A bad file must not take down the good utterance that would have used it as its reference (was: 2 of 4
    good rows lost in one set); a speaker without a usable reference is named. Also: a 10 ms clip is too short
    (empty_audio), not corrupt (the pre-check and the encoder now agree on its frame count)."""
    a, b = sorted((codec_variant / "clips").glob("*.wav"))[:2]  # whichever golden set: two of its clips
    gold = {p: load_file(codec_variant / "golden" / f"{p.stem}.safetensors")["codes"] for p in (a, b)}
    (tmp_path / "garbage.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + os.urandom(300))
    sf.write(tmp_path / "tiny.wav", tone(24000, 0.01), 24000)
    shutil.copy(a, tmp_path / "a_copy.wav")
    lst = ["path|text|speaker",
           f"{a}|A first clip.|spk1",                               # 2: good; its next utterance is garbage
           f"{tmp_path / 'garbage.wav'}|Broken.|spk1",              # 3: corrupt
           f"{b}|A second clip.|spk1",                              # 4: good
           f"{tmp_path / 'tiny.wav'}|Too short.|spk2",              # 5: 10 ms
           f"{tmp_path / 'a_copy.wav'}|The first again.|spk2"]      # 6: good, no usable partner
    (tmp_path / "list.txt").write_text("\n".join(lst) + "\n")
    out, log = tmp_path / "out", []
    summary = run(tmp_path / "list.txt", out, ckpts["ff"], codec=str(codec_dir), voice_clone=True, device="cpu",
                  log=log.append)
    assert [(e["line"], e["kind"]) for e in errors_of(out)] == [(3, "corrupt_audio"), (5, "empty_audio")]
    assert summary["samples"] == 3
    ds = ShardDataset(out)
    assert [ds.record(i)["line"] for i in range(3)] == [2, 4, 6]
    ref0, tgt0 = ds[0].audio_codes  # line 2: reference = line 4 (the next *usable* utterance of spk1)
    assert torch.equal(ref0, gold[b]) and torch.equal(tgt0, gold[a])
    ref1, tgt1 = ds[1].audio_codes
    assert torch.equal(ref1, gold[a]) and torch.equal(tgt1, gold[b])
    assert len(ds[2].audio_codes) == 1  # line 6: prepared without a reference, and the log says why
    assert any("speaker 'spk2' has no other usable utterance: 1 utterance(s) prepared without a reference" in m
               for m in log)


def test_codec_frame_count_agrees_with_the_encoder(codec_variant):
    """`frames(n) == 0` exactly when encoding n samples is refused (was: >= 1 for clips the encoder refuses,
    so a 10 ms clip passed the pre-check and failed in the codec as 'corrupt_audio')."""
    from minihiggs.codec.loading import CodecConfig
    from minihiggs.codec.tokenizer import AudioTokenizer

    with torch.device("meta"):  # only the conv arithmetic is used: no weights needed
        codec = AudioTokenizer(CodecConfig.from_file(codec_variant / "config.json"))
    for n in range(0, 2000, 7):
        try:
            codec._as_wave(np.full(n, 0.1, np.float32))
            accepted = True
        except ValueError:
            accepted = False
        assert accepted == (codec.frames(n) >= 1), n
    assert codec.frames(240) == 0  # 10 ms at 24 kHz


# ------------------------------------------------------------------------------------- long clips, memory

def test_long_clip_refused_from_its_header_before_decoding(ckpts, tmp_path, monkeypatch):
    """Was: a 10-minute clip decoded, resampled and encoded whole before --max_tokens applied (16.8 GB RSS and
    counting). Now its header says how long it is, and it is refused without being read."""
    sr = 8000
    with sf.SoundFile(tmp_path / "ten_minutes.wav", "w", sr, 1, "PCM_16") as f:
        chunk = tone(sr, 10.0)
        for _ in range(60):
            f.write(chunk)
    codes_file(tmp_path / "c.npy", 12, 1)
    lines = [sample("short", audio_codes="c.npy"), sample("long", audio_url="ten_minutes.wav")]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    decoded = []
    real_read = prep_worker.read_audio
    monkeypatch.setattr(prep_worker, "read_audio", lambda p: decoded.append(p) or real_read(p))
    for max_tokens, limit in ((None, "the default limit of 4096 merged tokens (set --max_tokens to change it)"),
                              (5000, "--max_tokens 5000")):
        out, log = tmp_path / f"out{max_tokens}", []
        summary = run(tmp_path / "m.jsonl", out, ckpts["ff"], max_tokens=max_tokens, log=log.append)  # no codec
        assert summary["samples"] == 1
        (e,) = errors_of(out)
        assert (e["line"], e["kind"]) == (2, "too_long")
        assert e["reason"].startswith(f"{tmp_path / 'ten_minutes.wav'}: 600.0 s of audio (file header) make at least ")
        assert e["reason"].endswith(f" merged tokens, over {limit}; not decoded")
        assert ("no --max_tokens" in " ".join(log)) == (max_tokens is None)
    assert decoded == []


# ------------------------------------------------------------------------------------ workers and parents

def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(x) for x in (task / "children").read_text().split()]
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"  # a zombie is dead
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers through /proc (Linux)")
def test_workers_die_with_their_parent(ckpts, tmp_path):
    """kill -9 of a `--workers 2` prep: was, the workers ran on indefinitely (~1.5 GB each, GPU memory on CUDA),
    still writing shards. Each worker here blocks reading a FIFO, as on a hung network file system."""
    os.mkfifo(tmp_path / "stuck.wav")
    lines = [sample(f"line {i}", audio_url="stuck.wav") for i in range(4)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    p = subprocess.Popen([sys.executable, "prep.py", "--manifest", str(tmp_path / "m.jsonl"), "--out",
                          str(tmp_path / "out"), "--base_ckpt", str(ckpts["ff"]), "--codec", NO_CODEC, "--workers",
                          "2", "--shard_size", "1", "--no_progress"], cwd=REPO, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    workers: list[int] = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None:
            # the two pool workers (spawned interpreters running the pool's worker loop), besides the resource tracker
            workers = [c for c in children(p.pid) if "resource_tracker" not in Path(f"/proc/{c}/cmdline").read_text()]
            if len(workers) == 2 and all((tmp_path / "out" / f"shard-0000{k}.bin.tmp").exists() for k in (0, 1)):
                break  # both are inside a shard, blocked on the FIFO
            time.sleep(0.2)
        assert len(workers) == 2 and p.poll() is None, p.stderr.read() if p.poll() is not None else workers
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        deadline = time.time() + 30
        while time.time() < deadline and any(alive(w) for w in workers):
            time.sleep(0.2)
        assert not any(alive(w) for w in workers), "prep workers outlived their parent"
    finally:
        for w in workers:
            if alive(w):
                os.kill(w, signal.SIGKILL)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------------- plain lists

def plain(tmp_path: Path, name: str, lines: list[str]) -> Path:
    (tmp_path / "wavs").mkdir(exist_ok=True)
    (tmp_path / name).write_text("\n".join(lines) + "\n")
    return tmp_path / name


def prompts(entries) -> list[tuple[int, str, str | None]]:
    """(line, transcript, speaker) of the ChatML objects read from a plain list."""
    return [(e.line, e.obj["messages"][-2]["content"], e.obj["speaker"]) for e in entries if isinstance(e, ChatmlEntry)]


def test_vctk_style_third_column_is_the_speaker(tmp_path):
    """Was: `id|text|speaker` read as `id|text|normalized`: the transcript became 'p225'."""
    vctk = plain(tmp_path, "vctk.txt", ["p225_001|Please call Stella.|p225", "p226_002|Ask her to bring these.|p226"])
    entries, _ = read_plain_list(vctk, False, None)
    assert prompts(entries) == [(1, "Please call Stella.", "p225"), (2, "Ask her to bring these.", "p226")]
    lj = plain(tmp_path, "lj.csv", ["LJ001|Mr. Smith, 1st.|Mister Smith, first.", "LJ002|Hi.|Hi."])
    entries, _ = read_plain_list(lj, False, None)
    assert prompts(entries) == [(1, "Mister Smith, first.", None), (2, "Hi.", None)]
    # a header says it outright, whatever the lines look like
    hdr = plain(tmp_path, "h.txt", ["id|text|speaker", "a1|Hello|bob", "a2|Bye|bob"])
    assert prompts(read_plain_list(hdr, False, None)[0]) == [(2, "Hello", "bob"), (3, "Bye", "bob")]


@pytest.mark.parametrize("lines,expect", [
    (["p225_001|Please call Stella.|p225", "LJ002|Printing, in the only sense.|Printing, in the only sense."],
     "m.txt:1: the third column reads as a speaker id here ('p225') and as normalized text on line 2"),
    (["a1|Hello|bob", "a2|Bye|alice"],
     "m.txt:1: cannot tell whether the third column is a speaker id or normalized text ('a1|Hello|bob'"),
], ids=["mixed", "undecidable"])
def test_ambiguous_third_column_is_refused(lines, expect, tmp_path):
    with pytest.raises(PrepError, match="add a header line 'id|text|speaker' or 'id|text|normalized'") as e:
        read_plain_list(plain(tmp_path, "m.txt", lines), False, None)
    assert expect in str(e.value) and str(tmp_path / "m.txt") in str(e.value)


# ----------------------------------------------------------------------------------------------- messages

def test_messages_name_the_right_column_path_delimiter_and_ids(ckpts, tmp_path):
    codes_file(tmp_path / "c.npy", 12, 1)
    (tmp_path / "garbage.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + os.urandom(300))
    broken = '{"messages": [{"role": "user", "content": "unterminated"}'
    good = json.dumps({**sample("x", audio_codes="c.npy"), "id": "same"})
    lines = [good, broken, json.dumps(sample("x", audio_url="garbage.wav")), good]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    log: list[str] = []
    run(tmp_path / "m.jsonl", tmp_path / "out", ckpts["ff"], log=log.append)
    errs = {e["line"]: e["reason"] for e in errors_of(tmp_path / "out")}
    # the JSON error at the end of line 2 is at its column 58 (was "column 1": the line's own newline counted)
    assert errs[2] == f"broken JSON (Expecting ',' delimiter at column {len(broken) + 1})"
    # libsndfile's reason without the path it repeats (was: the path twice)
    assert errs[3].count("garbage.wav") == 1 and errs[3].startswith(str(tmp_path / "garbage.wav") + ": ")
    # duplicate ids: which, and where (was: only a count)
    assert any("1 sample id(s) used more than once in m.jsonl: 'same' (lines 1, 4)" in m for m in log)
    # a one-column line of a '|' list is described as such (was: "','-separated")
    entries, _ = read_plain_list(plain(tmp_path, "l.txt", ["a1|Hello there.", "lonely"]), False, None)
    assert isinstance(entries[1], BadEntry) and (entries[1].line, entries[1].kind) == (2, "invalid")
    assert "expected at least 2 '|'-separated columns" in entries[1].reason
    # nothing usable: which manifest, and where the reasons are (was: neither)
    (tmp_path / "bad.jsonl").write_text(broken + "\n")
    with pytest.raises(PrepError) as e:
        run(tmp_path / "bad.jsonl", tmp_path / "bad", ckpts["ff"])
    assert str(e.value) == (f"{tmp_path / 'bad.jsonl'}: nothing usable: every entry (1) was skipped (the reasons "
                            f"are in {tmp_path / 'bad' / 'prep_errors.jsonl'})")
