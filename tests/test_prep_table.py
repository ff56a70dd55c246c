"""Parquet tables (what `datasets` writes and the Hub's dataset repos hold) through prep: a table written here with
good and bad rows, in two row groups and two splits -> shards whose samples match the rows (the transcript decoded
back from the token ids, the speaker, the audio codes equal to those of the same clip given as a file), and the bad
rows in prep_errors.jsonl with their parquet file and row.
"""

from __future__ import annotations

import io
import shutil
import json
import re

import pytest
import soundfile as sf
import torch

from helpers import errors_of, run, tone
from minihiggs.data.dataset import ShardDataset
from minihiggs.errors import PrepError
from minihiggs.hub import HubMissError

import pyarrow as pa  # the `parquet` extra: requirements-dev.txt installs it for `make test`
import pyarrow.parquet as pq

pytestmark = pytest.mark.usefixtures("one_thread")


def wav_bytes(k: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, tone(24000, 0.12, f0=150.0 + 70 * k, seed=k), 24000, format="WAV")
    return buf.getvalue()


# (text, speaker, audio as datasets stores it) -> the problem prep must report (None: a sample)
ROWS = [
    ("The first row is read aloud.", "amy", {"bytes": wav_bytes(0), "path": "a.wav"}, None),
    (None, "amy", {"bytes": wav_bytes(1), "path": None}, "no_target"),
    ("A clip given by its path.", "bob", {"bytes": None, "path": "clips/b.wav"}, None),
    ("Bytes that are no audio file.", "bob", {"bytes": b"not a wav at all", "path": None}, "corrupt_audio"),
    ("   ", "amy", {"bytes": wav_bytes(2), "path": None}, "no_target"),
    ("No audio in this row.", "amy", {"bytes": None, "path": None}, "missing_audio"),
    ("The last row, in the second group.", "bob", {"bytes": wav_bytes(3), "path": None}, None),
]


@pytest.fixture()
def table(tmp_path):
    """data/train-00000-of-00001.parquet (ROWS, row groups of 4) and a validation file of one row."""
    d = tmp_path / "ds"
    (d / "data" / "clips").mkdir(parents=True)
    (d / "data" / "clips" / "b.wav").write_bytes(wav_bytes(5))
    audio = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("audio", audio), ("sentence", pa.string()), ("client", pa.string())])

    def write(name, rows):
        t = pa.table({"audio": [r[2] for r in rows], "sentence": [r[0] for r in rows],
                      "client": [r[1] for r in rows]}, schema=schema)
        pq.write_table(t, d / "data" / name, row_group_size=4)

    write("train-00000-of-00001.parquet", ROWS)
    write("validation-00000-of-00001.parquet", [("Held out.", "cy", {"bytes": wav_bytes(9), "path": None}, None)])
    return d


def codes_of_files(tmp_path, clips: list[bytes], ckpt, codec) -> list[torch.Tensor]:
    """The codes prep stores for the same clips given as files in a ChatML manifest (the reference path)."""
    d = tmp_path / "ref"
    d.mkdir()
    lines = []
    for k, b in enumerate(clips):
        (d / f"{k}.wav").write_bytes(b)
        lines.append(json.dumps({"id": str(k), "messages": [{"role": "user", "content": "x"}, {
            "role": "assistant", "content": [{"type": "audio", "audio_url": f"{k}.wav"}]}]}))
    (d / "m.jsonl").write_text("\n".join(lines) + "\n")
    run(d / "m.jsonl", d / "out", ckpt, codec=codec, device="cpu")
    ds = ShardDataset(d / "out")
    return [ds[i].audio_codes[0] for i in range(len(ds))]


def test_table_rows_become_samples_and_bad_rows_are_reported(table, ckpts, codec_dir, tmp_path):
    out = tmp_path / "out"
    summary = run(table, out, ckpts["ff"], codec=str(codec_dir), device="cpu", split="train", text_column="sentence",
                  speaker_column="client")
    good = [r for r in ROWS if r[3] is None]
    assert summary["samples"] == len(good)
    train = table / "data" / "train-00000-of-00001.parquet"
    assert [(e["manifest"], e["row"], e["kind"]) for e in errors_of(out)] == \
        [(str(train), i, r[3]) for i, r in enumerate(ROWS) if r[3] is not None]
    ds = ShardDataset(out)
    tok = ckpts["tok"]
    want_codes = codes_of_files(tmp_path, [r[2]["bytes"] or (table / "data" / r[2]["path"]).read_bytes()
                                           for r in good], ckpts["ff"], str(codec_dir))
    for i, r in enumerate(good):
        s = ds[i]
        users = re.findall(r"<\|start_header_id\|>user<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>",
                           tok.decode(s.input_ids.tolist()), re.S)
        assert users == [r[0]] and ds.speakers[i] == r[1]
        assert len(s.audio_codes) == 1 and torch.equal(s.audio_codes[0], want_codes[i]), i
    assert len({tuple(c.flatten().tolist()) for c in want_codes}) == len(good)  # distinct clips: a swap would show


def test_table_flags_are_checked(table, ckpts, tmp_path):
    with pytest.raises(PrepError, match="--text_column 'text' is not a column"):
        run(table, tmp_path / "a", ckpts["ff"], device="cpu")
    with pytest.raises(PrepError, match="no parquet files of split 'test'"):
        run(table, tmp_path / "b", ckpts["ff"], device="cpu", split="test", text_column="sentence")


def test_a_hub_dataset_id_is_read_from_the_cache_as_a_dataset_repo(table, ckpts, codec_dir, tmp_path, monkeypatch):
    """Offline: the id resolves to the dataset snapshot in the Hugging Face cache (`datasets--owner--name`, what
    `huggingface-cli download --repo-type dataset` leaves there); a model repo of the same name would not do."""
    import huggingface_hub.constants as hc

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "datasets--someone--voices"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(table / "data", repo / "snapshots" / commit / "data")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    summary = run("someone/voices", tmp_path / "out", ckpts["ff"], codec=str(codec_dir), device="cpu",
                  split="validation", text_column="sentence", speaker_column="client")
    assert summary["samples"] == 1 and ShardDataset(tmp_path / "out").speakers == ["cy"]
    with pytest.raises(HubMissError, match="download someone/other --repo-type dataset"):
        run("someone/other", tmp_path / "out2", ckpts["ff"], device="cpu")
