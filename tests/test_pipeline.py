"""prep.py -> ShardDataset -> collate -> model, for a checkpoint without and with a Whisper tower."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from minihiggs.prep import PrepConfig, prepare
from helpers import LLAMA_DIR, TOWER
from minihiggs import collate, load_model
from minihiggs.data.dataset import ShardDataset
from minihiggs.text.tokenizer import write_higgs_tokenizer
from minihiggs.model.tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    t = np.arange(16000 * 35) / 16000
    sf.write(d / "long_ref.wav", (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 16000)  # 35 s: 2 chunks
    sf.write(d / "short_ref.wav", (0.3 * np.sin(2 * np.pi * 300 * t[:24000])).astype(np.float32), 22050)
    np.save(d / "long.npy", rng.integers(0, 1024, (8, 875)))
    np.save(d / "short.npy", rng.integers(0, 1024, (8, 27)))
    for i in range(3):
        np.save(d / f"out{i}.npy", rng.integers(0, 1024, (8, 10 + i)))
    rows = []
    for i, ref in enumerate(["long", "short", "short"]):
        rows.append({"id": f"utt{i}", "speaker": "spk", "messages": [
            {"role": "system", "content": "Generate audio following instruction."},
            {"role": "user", "content": [{"type": "text", "text": f"Reference {i}"},
                                         {"type": "audio", "audio_url": f"{ref}_ref.wav",
                                          "audio_codes": f"{ref}.npy"}]},
            {"role": "assistant", "content": [{"type": "audio", "audio_codes": f"out{i}.npy"}]}]})
    (d / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return d


@pytest.mark.parametrize("tower", [False, True], ids=["no_tower", "tower"])
def test_prepared_shards_train(tower, data, tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", seed=0, hidden=32, heads=4, kv_heads=2, intermediate=48,
                                 layers=2, dual_layers=(0,), audio_tower=TOWER if tower else None)
    tok = write_higgs_tokenizer(LLAMA_DIR, tmp_path / "tok")
    for f in Path(tok).iterdir():
        shutil.copy(f, ckpt / f.name)
    summary = prepare(PrepConfig(manifest=str(data / "m.jsonl"), out=str(tmp_path / "shards"), base_ckpt=str(ckpt),
                                 codec="/nonexistent", progress=False), log=lambda *a: None)
    assert summary["samples"] == 3 and summary["skipped"] == 0
    ds = ShardDataset(tmp_path / "shards", verify="full")
    assert ds.whisper == tower
    model = load_model(ckpt).train()
    samples = [ds[i] for i in range(len(ds))]
    batch = collate(samples, model.config)
    if tower:
        # the 35 s reference is two 30 s chunks -> two placeholder triples, each with its own features and codes
        assert batch.whisper_features.shape[0] == 2 + 1 + 1
        assert batch.whisper_rows.tolist()[:2] == [750, 125]
        assert [c.shape[1] for c in samples[0].audio_codes] == [750, 125, 10]
    else:
        assert batch.whisper_features is None
        assert [c.shape[1] for c in samples[0].audio_codes] == [875, 10]
    text_n, audio_n = batch.target_counts()
    assert audio_n.tolist() == [(10 + 1) + (11 + 1) + (12 + 1)] * 8
    loss = model(batch).normalized()
    loss.backward()
    assert torch.isfinite(loss)
    if tower:  # the tower is in the graph (its gradient exists when not frozen)
        assert model.audio_tower.layers[0].fc1.weight.grad is not None
