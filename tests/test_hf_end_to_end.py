"""The whole chain on checkpoints saved by transformers in its own layout (issue 15's "done when"): prep.py ->
train.py -> python -m minihiggs.generate -> python -m minihiggs.export, through the real commands, with a model
set and an audio tokenizer set of tests/data/hf_reference (what HiggsAudioV2ForConditionalGeneration and
HiggsAudioV2TokenizerModel wrote) and the synthetic voices of `python -m minihiggs.tiny`.

Sets are chosen by property (8 codebooks, as the tiny voices' codes have), never by name."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from helpers import REPO
from hf_inputs import checkpoint_dir, model_sets, tokenizer_sets
from minihiggs import load_model
from minihiggs.tiny import main as tiny_main


def cli(*argv, cwd):
    r = subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{argv[:2]} exited {r.returncode}:\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A transformers-layout base with the Higgs text tokenizer files beside it, a transformers-layout audio
    tokenizer, and the tiny voices (their codes given as .npy, so prep needs no encoder)."""
    root = tmp_path_factory.mktemp("hf_e2e")
    assert tiny_main(["--out", str(root / "tiny")]) == 0
    sets = [s for s in model_sets() if json.loads((s / "checkpoint" / "config.json").read_text())["num_codebooks"] == 8]
    assert sets, "no transformers reference model set with 8 codebooks (the tiny voices' codes have 8)"
    base = checkpoint_dir(sets[0] / "checkpoint", root / "ref")
    codes = json.loads((base / "config.json").read_text())["codebook_size"] - 2  # (less the stream BOS and EOS)
    for f in (root / "tiny" / "data" / "codes").glob("*.npy"):  # the voices' codes folded into this codebook
        np.save(f, np.load(f) % codes)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(root / "tiny" / "base" / name, base / name)
    assert tokenizer_sets(), "no transformers reference audio tokenizer set"
    codec = checkpoint_dir(tokenizer_sets()[0] / "checkpoint", root / "ref")
    return root, base, codec


@pytest.mark.heavy
def test_prep_train_generate_export_on_transformers_checkpoints(chain):
    root, base, codec = chain
    assert json.loads((base / "config.json").read_text())["model_type"] == "higgs_audio_v2"
    assert json.loads((codec / "config.json").read_text())["model_type"] == "higgs_audio_v2_tokenizer"
    cli("prep.py", "--manifest", root / "tiny/data/train.jsonl", "--out", root / "shards", "--base_ckpt", base,
        "--codec", codec, "--no_progress", cwd=REPO)
    index = json.loads((root / "shards/index.json").read_text())
    assert index["base_ckpt"] == str(base) and index["codec"] == str(codec) and index["base_revision"] is None

    cli("train.py", "--shards", root / "shards", "--output_dir", root / "run", "--base_ckpt", base, "--max_steps", 4,
        "--batch_size", 4, "--lr", 3e-3, "--log_steps", 2, "--val_steps", 0, "--save_steps", 0, "--sample_steps", 0,
        cwd=REPO)
    adapter = root / "run" / "final"
    keys = list(load_file(str(adapter / "adapter_model.safetensors")))
    # saved with the transformers model's module paths, so PEFT on HiggsAudioV2ForConditionalGeneration finds them
    assert keys and all(k.startswith("base_model.model.model.layers.") for k in keys), keys[:3]
    assert any(load_file(str(adapter / "adapter_model.safetensors"))[k].abs().max() > 0 for k in keys if "lora_B" in k)

    # generate: base from the adapter's record, codec from the shards' index
    r = cli("-m", "minihiggs.generate", "--adapter", adapter, "--text", "Hello there.", "--ref_sample", "ava_000",
            "--shards", root / "shards", "--out", root / "hello.wav", "--max_new_frames", 30, "--temperature", 0,
            "--no_progress", cwd=REPO)
    assert f"codec: {codec}" in r.stderr
    wav, sr = sf.read(root / "hello.wav")
    assert sr == 24000 and wav.size > 0 and np.isfinite(wav).all()

    # export: the base's layout by default, and what it is merged from is the base + adapter
    cli("-m", "minihiggs.export", "--adapter", adapter, "--out", root / "merged", cwd=REPO)
    cfg = json.loads((root / "merged" / "config.json").read_text())
    assert cfg["model_type"] == "higgs_audio_v2"
    merged, b = load_model(root / "merged").state_dict(), load_model(base).state_dict()
    assert merged.keys() == b.keys()
    # the merged weights are W + scale * B A of the trained adapter: a LoRA target differs from the base, a
    # non-target (a norm) does not (test_export_layout checks the merged model's outputs against base + adapter)
    q = next(k for k in merged if k.endswith("self_attn.q_proj.weight"))
    norm = next(k for k in merged if k.endswith("input_layernorm.weight"))
    assert not torch.equal(merged[q], b[q]) and torch.equal(merged[norm], b[norm])

    # the merged checkpoint speaks on its own, and refuses the same adapter on top of it (one line)
    cli("-m", "minihiggs.generate", "--base_ckpt", root / "merged", "--codec", codec, "--text", "Hello there.",
        "--ref_sample", "ava_000", "--shards", root / "shards", "--out", root / "merged.wav", "--max_new_frames", 30,
        "--temperature", 0, "--no_progress", cwd=REPO)
    r = subprocess.run([sys.executable, "-m", "minihiggs.generate", "--base_ckpt", root / "merged", "--adapter",
                        adapter, "--codec", codec, "--text", "x", "--out", root / "twice.wav"], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "already merged" in r.stderr.strip().splitlines()[-1]
