"""Checkpoint loading: sharded/single files, the strict key report, stray keys, Hub errors, peak memory."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import REPO
from minihiggs import load_model
from minihiggs.model.checkpoint import CheckpointError
from minihiggs.model.tiny import write_tiny_checkpoint

SMALL = dict(hidden=32, heads=4, kv_heads=2, intermediate=48, layers=2, dual_layers=(0,))


def test_sharded_equals_single(tmp_path):
    single = write_tiny_checkpoint(tmp_path / "single", seed=4, **SMALL)
    sharded = write_tiny_checkpoint(tmp_path / "sharded", seed=4, max_shard_bytes=3_000_000, **SMALL)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    a, b = load_model(single).state_dict(), load_model(sharded).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_model(single, dtype=torch.bfloat16).norm.weight.dtype == torch.bfloat16


def test_missing_and_unexpected_keys_are_reported(tmp_path):
    d = write_tiny_checkpoint(tmp_path / "c", seed=0, **SMALL)
    sd = load_file(str(d / "model.safetensors"))
    del sd["layers.0.audio_mlp.up_proj.weight"]
    sd["layers.0.some_new_adapter.weight"] = torch.zeros(2)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_model(d)
    msg = str(e.value)
    assert "missing keys (1): layers.0.audio_mlp.up_proj.weight" in msg
    assert "unexpected keys (1): layers.0.some_new_adapter.weight" in msg


def test_shape_mismatch_is_reported(tmp_path):
    d = write_tiny_checkpoint(tmp_path / "c", seed=0, **SMALL)
    sd = load_file(str(d / "model.safetensors"))
    sd["norm.weight"] = torch.ones(31)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"norm.weight: checkpoint \(31,\) vs model \(32,\)"):
        load_model(d)


def test_known_stray_keys_are_ignored(tmp_path):
    d = write_tiny_checkpoint(tmp_path / "c", seed=0, **SMALL)
    sd = load_file(str(d / "model.safetensors"))
    sd["audio_codebook_weights"] = torch.ones(8) / 8
    sd["layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    sd["audio_tower.conv1.weight"] = torch.ones(2)  # tower weights with skip_audio_tower=true: unused
    save_file(sd, str(d / "model.safetensors"))
    m = load_model(d)
    assert torch.equal(m.norm.weight, sd["norm.weight"])


def test_offline_uncached_repo_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache.*huggingface-cli download"):
        load_model("someone/not-a-cached-model")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        load_model(str(tmp_path / "nope" / "deeper" / "x"))


def test_loading_1gb_sharded_checkpoint_peaks_below_1_4x(tmp_path):
    """Weights are materialised once: peak RSS of a fresh loading process < 1.4 x the checkpoint size."""
    d = write_tiny_checkpoint(tmp_path / "big", seed=0, hidden=1024, heads=8, kv_heads=4, intermediate=1024,
                              layers=1, dual_layers=(0,), max_shard_bytes=300_000_000)
    size = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    assert 0.9e9 < size < 1.3e9
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec from the (large) parent process.
    code = ("import sys, torch; sys.path.insert(0, sys.argv[2]); from minihiggs import load_model;"
            "m = load_model(sys.argv[1]); n = sum(p.numel() for p in m.parameters());"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1];"
            "print(int(hwm) * 1024, n)")
    out = subprocess.run([sys.executable, "-c", code, str(d), str(REPO)], check=True, capture_output=True, text=True)
    peak, n = map(int, out.stdout.split())
    assert n * 4 > 0.9 * size
    print(f"\ncheckpoint {size / 1e9:.2f} GB, peak RSS {peak / 1e9:.2f} GB ({peak / size:.2f}x)")
    assert peak < 1.4 * size, f"peak RSS {peak / 1e9:.2f} GB >= 1.4 x {size / 1e9:.2f} GB"
