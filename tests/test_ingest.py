"""`python -m minihiggs.ingest` on synthetic long recordings made here: speech-like bursts (harmonics with a
syllable-rate envelope) separated by silences of known lengths. The cut points and durations are asserted against
the layout; the ASR path runs the tiny random Whisper of tests/data/eval_reference (gibberish transcripts: the
plumbing and the filters are what is checked); the manifest goes through prep.py into shards.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from helpers import run as run_prep
from minihiggs.data.dataset import ShardDataset
from minihiggs.errors import IngestError
from minihiggs.ingest.run import IngestConfig, ingest
from minihiggs.ingest.segment import SegmentRules, frame_levels, plan_segments

pytestmark = pytest.mark.usefixtures("one_thread")

SR = 16000
REF = Path(__file__).resolve().parent / "data" / "eval_reference"
WHISPER_SETS = sorted(p.parent for p in REF.glob("*/config.json")
                      if json.loads(p.read_text()).get("model_type") == "whisper")
# Frame levels are 10 ms; an onset or fade-out lands within a frame of the true edge, and the margin is added to
# the detected edge: two frames of slack.
EDGE = 0.021


def speechlike(seconds: float, seed: int, amp: float = 0.3) -> np.ndarray:
    """Voiced-speech-like: five harmonics of a gliding 110-150 Hz pitch, a 4 Hz syllable envelope that never
    falls below a third (no pause inside), some breath noise; 5 ms fades."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * SR))) / SR
    phase = 2 * np.pi * np.cumsum(130 + 20 * np.sin(2 * np.pi * 0.7 * t + seed)) / SR
    x = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.65 + 0.35 * np.sin(2 * np.pi * 4 * t + seed))
    x = amp * x / np.abs(x).max() + 0.01 * rng.standard_normal(len(t))
    fade = np.minimum(1, np.minimum(np.arange(len(t)), np.arange(len(t))[::-1]) / (0.005 * SR))
    return (x * fade).astype(np.float32)


def recording(layout: list[tuple[str, float]], seed: int = 0) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """("s", seconds) speech / ("q", seconds) quiet (noise at -80 dBFS) -> the wave and each burst's (start, end)."""
    rng = np.random.default_rng(seed + 100)
    parts, bursts, t = [], [], 0.0
    for k, (kind, sec) in enumerate(layout):
        if kind == "s":
            parts.append(speechlike(sec, seed + k))
            bursts.append((t, t + sec))
        else:
            parts.append((1e-4 * rng.standard_normal(int(round(sec * SR)))).astype(np.float32))
        t += sec
    return np.concatenate(parts), bursts


# Pauses of 0.8 s and 1.0 s cut; 0.15 s does not (under --min_pause 0.3); a lone 0.4 s burst between long pauses
# is too short; the file ends 0.6 s after the last burst.
LAYOUT = [("q", 0.5), ("s", 2.0), ("q", 0.8), ("s", 1.2), ("q", 0.15), ("s", 1.0), ("q", 1.0), ("s", 0.4),
          ("q", 2.0), ("s", 3.0), ("q", 0.6)]


def plan(wave: np.ndarray, path: Path, **rules):
    sf.write(path, wave, SR)
    with sf.SoundFile(str(path)) as f:
        return plan_segments(frame_levels(f), SegmentRules(**rules))


def test_cuts_land_in_the_pauses_with_the_margins(tmp_path):
    wave, b = recording(LAYOUT)
    pieces = plan(wave, tmp_path / "a.wav")
    m = SegmentRules().margin
    want = [(b[0][0] - m, b[0][1] + m, None),
            (b[1][0] - m, b[2][1] + m, None),  # the 0.15 s gap is inside speech: no cut
            (b[3][0] - m, b[3][1] + m, "too_short"),
            (b[4][0] - m, b[4][1] + m, None)]
    assert [p.problem for p in pieces] == [w[2] for w in want]
    for p, (start, end, _) in zip(pieces, want):
        assert abs(p.start - start) <= EDGE and abs(p.end - end) <= EDGE, (p, start, end)
    # a margin never takes more than half of a pause: with 0.5 s margins, the 0.8 s pause is split in the middle
    wide = plan(wave, tmp_path / "b.wav", margin=0.5)
    assert abs(wide[0].end - (b[0][1] + 0.4)) <= EDGE and abs(wide[1].start - (b[1][0] - 0.4)) <= EDGE
    assert abs(wide[0].start - 0.0) <= EDGE  # and never passes the file's start


def test_a_stretch_without_a_pause_is_reported_not_cut(tmp_path):
    wave, b = recording([("q", 0.4), ("s", 2.0), ("q", 0.5), ("s", 120.0), ("q", 0.5), ("s", 1.5), ("q", 0.3)], 3)
    pieces = plan(wave, tmp_path / "long.wav")
    assert [p.problem for p in pieces] == [None, "no_pause", None]
    assert abs(pieces[1].start - b[1][0]) <= EDGE and abs(pieces[1].end - b[1][1]) <= EDGE
    assert all(p.seconds <= 30 for p in pieces if p.problem is None)
    # with a larger limit the same stretch is one segment
    assert [p.problem for p in plan(wave, tmp_path / "l2.wav", max_seconds=130)] == [None, None, None]


def test_hysteresis_holds_soft_speech_but_does_not_start_on_it(tmp_path):
    """Speech 32 dB under the speech level lies between the quiet threshold (35 dB under) and the onset (29 dB
    under): inside a run it is still speech, on its own it never starts one."""
    soft = 10 ** (-32 / 20)
    parts = [recording([("q", 0.5)])[0], speechlike(1.5, 1), speechlike(0.8, 2) * soft, speechlike(1.5, 3),
             recording([("q", 1.5)], 1)[0], speechlike(0.8, 4) * soft, recording([("q", 1.5)], 2)[0]]
    pieces = plan(np.concatenate(parts), tmp_path / "soft.wav")
    assert len(pieces) == 1 and pieces[0].problem is None
    assert abs(pieces[0].start - 0.3) <= EDGE and abs(pieces[0].end - (0.5 + 3.8 + 0.2)) <= EDGE


def test_bad_input_is_one_line(tmp_path, capsys):
    from minihiggs.ingest.__main__ import main

    assert main(["--input", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--no_progress"]) == 2
    assert capsys.readouterr().err.strip() == f"ingest: error: {tmp_path / 'nope'}: --input is not a folder"
    (tmp_path / "empty").mkdir()
    assert main(["--input", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--no_progress"]) == 2
    assert "no recordings" in capsys.readouterr().err


def test_speakers_from_folders_or_a_map_and_an_unreadable_file(tmp_path):
    corpus(tmp_path / "in")
    (tmp_path / "in" / "extra.wav").write_bytes((tmp_path / "in" / "bob" / "read.flac").read_bytes())
    (tmp_path / "in" / "broken.wav").write_bytes(b"RIFF not really a wave file")  # reported, the rest goes on
    (tmp_path / "map.txt").write_text("amy|Amy Smith\nextra.wav\tGuest\n")
    cases = {"folders": ({}, {"amy/long.wav": "amy", "bob/read.flac": "bob", "extra.wav": "in"}),
             "map": ({"speaker_map": str(tmp_path / "map.txt")},
                     {"amy/long.wav": "Amy Smith", "bob/read.flac": "bob", "extra.wav": "Guest"})}
    for name, (kw, want) in cases.items():
        ingest(IngestConfig(input=str(tmp_path / "in"), out=str(tmp_path / name), asr="none", progress=False, **kw),
               log=lambda *a: None)
        lines = [json.loads(x) for x in (tmp_path / name / "manifest.jsonl").read_text().splitlines()]
        assert {x["misc"]["source"]: x["speaker"] for x in lines} == want, name
        report = [json.loads(x) for x in (tmp_path / name / "ingest_report.jsonl").read_text().splitlines()]
        assert ("broken.wav", "unreadable") in {(r["source"], r["kind"]) for r in report}
    (tmp_path / "bad.txt").write_text("amy Amy\n")
    with pytest.raises(IngestError, match=r"bad.txt:1: expected 'path\|speaker'"):
        ingest(IngestConfig(input=str(tmp_path / "in"), out=str(tmp_path / "x"), asr="none",
                            speaker_map=str(tmp_path / "bad.txt")), log=lambda *a: None)


@pytest.fixture(scope="module")
def whisper_dir():
    assert WHISPER_SETS, f"no Whisper set under {REF}"
    return WHISPER_SETS[0]


@pytest.fixture(scope="module")
def scored_asr(whisper_dir):
    from minihiggs.eval.asr import Transcriber
    from minihiggs.ingest.transcribe import ScoredAsr

    return ScoredAsr(Transcriber(whisper_dir))


class Counting:
    """The real ASR, counting the segments it is asked to transcribe."""

    def __init__(self, asr):
        self.asr, self.segments = asr, 0

    def __call__(self, waves):
        self.segments += len(waves)
        return self.asr(waves)


def corpus(root: Path) -> dict[str, list[tuple[float, float]]]:
    """amy/long.wav (LAYOUT, with a clipped burst added), bob/read.wav + read.txt (a sidecar transcript)."""
    (root / "amy").mkdir(parents=True)
    (root / "bob").mkdir()
    wave, bursts = recording(LAYOUT + [("q", 1.0)], seed=1)
    loud, lb = recording([("s", 1.5), ("q", 0.6)], seed=9)
    loud = np.clip(loud * 8, -1, 1)  # full-scale clipping over much of the burst
    wave = np.concatenate([wave, loud])
    bursts.append((lb[0][0] + len(wave) / SR - len(loud) / SR, lb[0][1] + len(wave) / SR - len(loud) / SR))
    sf.write(root / "amy" / "long.wav", wave, SR)
    read, rb = recording([("q", 0.7), ("s", 2.5), ("q", 0.9)], seed=5)
    sf.write(root / "bob" / "read.flac", read, SR)
    (root / "bob" / "read.txt").write_text("  A sentence read\nfrom the page.\n")
    return {"amy/long.wav": bursts, "bob/read.flac": rb}


def lenient(**kw) -> dict:
    """ASR filters off: the tiny random Whisper's gibberish is kept."""
    return dict(logprob_threshold=-1e9, no_speech_threshold=1.0, compression_ratio_threshold=1e9, **kw)


def test_ingest_writes_traceable_normalised_segments_and_reports_the_rest(tmp_path, scored_asr):
    bursts = corpus(tmp_path / "in")
    asr = Counting(scored_asr)
    cfg = IngestConfig(input=str(tmp_path / "in"), out=str(tmp_path / "out"), progress=False, **lenient())
    summary = ingest(cfg, asr=asr, log=lambda *a: None)
    out = tmp_path / "out"
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    report = [json.loads(x) for x in (out / "ingest_report.jsonl").read_text().splitlines()]
    assert [(r["source"], r["kind"]) for r in report] == [("amy/long.wav", "too_short"), ("amy/long.wav", "clipped")]
    assert summary["segments"] == len(lines) == 4
    amy = [x for x in lines if x["misc"]["source"] == "amy/long.wav"]
    b = bursts["amy/long.wav"]
    for x, (a, e) in zip(amy, [(b[0][0], b[0][1]), (b[1][0], b[2][1]), (b[4][0], b[4][1])]):
        assert abs(x["misc"]["start"] - (a - 0.2)) <= EDGE and abs(x["misc"]["end"] - (e + 0.2)) <= EDGE
        assert x["speaker"] == "amy" and x["misc"]["transcript"] == "asr"
        assert x["messages"][1]["content"] and isinstance(x["misc"]["avg_logprob"], float)
        clip, sr = sf.read(out / x["messages"][2]["content"][0]["audio_url"])
        assert sr == 24000 and abs(len(clip) / sr - (x["misc"]["end"] - x["misc"]["start"])) < 2 / SR
        rms = 20 * np.log10(np.sqrt(np.mean(clip ** 2)))
        assert abs(rms - (-20.0)) < 0.1, rms  # the loudness target (16-bit rounding is far below 0.1 dB)
    assert asr.segments == 3  # once per kept amy segment; bob's sidecar needs no ASR
    bob = [x for x in lines if x["misc"]["source"] == "bob/read.flac"]
    assert len(bob) == 1 and bob[0]["messages"][1]["content"] == "A sentence read from the page."
    assert bob[0]["misc"]["transcript"] == "sidecar" and bob[0]["speaker"] == "bob"
    rb = bursts["bob/read.flac"][0]
    assert abs(bob[0]["misc"]["start"] - (rb[0] - 0.2)) <= EDGE and abs(bob[0]["misc"]["end"] - (rb[1] + 0.2)) <= EDGE

    # resumable: a second run redoes nothing, a lost part redoes only its recording, the files come out the same
    before = (out / "manifest.jsonl").read_bytes(), (out / "ingest_report.jsonl").read_bytes()
    again = Counting(scored_asr)
    ingest(cfg, asr=again, log=lambda *a: None)
    assert again.segments == 0
    (out / "parts" / "amy" / "long.wav.json").unlink()
    ingest(cfg, asr=again, log=lambda *a: None)
    assert again.segments == 3
    assert ((out / "manifest.jsonl").read_bytes(), (out / "ingest_report.jsonl").read_bytes()) == before
    with pytest.raises(IngestError, match="min_seconds"):
        ingest(IngestConfig(input=cfg.input, out=cfg.out, progress=False, min_seconds=2.0, **lenient()),
               asr=again, log=lambda *a: None)


def test_scored_asr_matches_the_eval_transcriber_and_a_teacher_forced_pass(scored_asr):
    """The same tokens as minihiggs.eval's greedy decoding; avg_logprob recomputed by one decoder pass over
    prompt + tokens + <|endoftext|> without the cache, with the suppression masks applied, as Whisper scores."""
    from minihiggs.audio.mel import log_mel_batch

    t = scored_asr.t
    waves = [speechlike(1.3, 1)[::3].copy(), speechlike(2.2, 2)[::3].copy() * 0.1]
    heard = scored_asr(waves)
    assert [h.text for h in heard] == t.transcribe(waves)
    feats, _ = log_mel_batch(waves)
    enc = t.model.encode(feats)
    limit = min(t.max_new_tokens, t.model.decoder.config.max_target_positions - len(t.prompt))
    for i, h in enumerate(heard):  # a clip that ran into the limit has no <|endoftext|> to score
        ids = t.prompt + list(h.tokens) + ([t.rules.eos] if len(h.tokens) < limit else [])
        with torch.no_grad():
            caches = t.model.decoder.new_cache(enc[i:i + 1], len(ids))
            logits = t.model.decoder(torch.tensor([ids]), caches, 0)[0].float()
        total = 0.0
        for step, pos in enumerate(range(len(t.prompt) - 1, len(ids) - 1)):
            row = logits[pos].clone()
            row[t.rules.suppress] = float("-inf")
            if step == 0:
                row[t.rules.begin_suppress] = float("-inf")
            total += float(row.log_softmax(-1)[ids[pos + 1]])
        assert h.avg_logprob == pytest.approx(total / (len(h.tokens) + 1), rel=1e-4, abs=1e-5)
        assert 0.0 <= h.no_speech_prob <= 1.0


def test_the_asr_filters_drop_what_they_should(tmp_path, scored_asr):
    corpus(tmp_path / "in")
    base = dict(input=str(tmp_path / "in"), progress=False)
    ingest(IngestConfig(out=str(tmp_path / "all"), **base, **lenient()), asr=scored_asr, log=lambda *a: None)
    lines = [json.loads(x) for x in (tmp_path / "all" / "manifest.jsonl").read_text().splitlines()]
    scores = sorted(x["misc"]["avg_logprob"] for x in lines if x["misc"]["transcript"] == "asr")
    assert len(set(scores)) == 3, scores
    cut = (scores[0] + scores[1]) / 2  # the lowest-scored segment falls under it
    ingest(IngestConfig(out=str(tmp_path / "cut"), **base, logprob_threshold=cut, no_speech_threshold=1.0,
                        compression_ratio_threshold=1e9), asr=scored_asr, log=lambda *a: None)
    kept = [json.loads(x) for x in (tmp_path / "cut" / "manifest.jsonl").read_text().splitlines()]
    report = [json.loads(x) for x in (tmp_path / "cut" / "ingest_report.jsonl").read_text().splitlines()]
    assert sorted(x["misc"]["avg_logprob"] for x in kept if x["misc"]["transcript"] == "asr") == scores[1:]
    low = [r for r in report if r["kind"] == "low_confidence"]
    assert len(low) == 1 and f"avg_logprob {scores[0]:.2f} <" in low[0]["reason"]


def test_ingested_folder_becomes_shards(tmp_path, scored_asr, ckpts, codec_dir):
    """The two commands: ingest, then prep on its manifest; every kept segment is a sample with its transcript."""
    corpus(tmp_path / "in")
    ingest(IngestConfig(input=str(tmp_path / "in"), out=str(tmp_path / "ing"), progress=False, **lenient()),
           asr=scored_asr, log=lambda *a: None)
    lines = [json.loads(x) for x in (tmp_path / "ing" / "manifest.jsonl").read_text().splitlines()]
    run_prep(tmp_path / "ing" / "manifest.jsonl", tmp_path / "shards", ckpts["ff"], codec=str(codec_dir),
             device="cpu")
    ds = ShardDataset(tmp_path / "shards")
    assert len(ds) == len(lines)
    tok = ckpts["tok"]
    got = {}
    for i in range(len(ds)):
        s = ds[i]
        got[s.sample_id] = tok.decode(s.input_ids.tolist())
    for x in lines:
        assert f"<|end_header_id|>\n\n{x['messages'][1]['content']}<|eot_id|>" in got[x["id"]]
