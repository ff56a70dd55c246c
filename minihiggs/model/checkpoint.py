"""Loading Higgs Audio v2 checkpoints: local directories or Hub repo ids (`owner/name[@revision]`), single or
sharded safetensors, in either layout (layouts.py: config.json's `model_type` says which).

The model is built on the meta device and every tensor is materialised exactly once, straight from the
safetensors file into its final dtype and device, shard by shard, its key renamed to the minihiggs name on the
fly: peak host memory stays near one copy of the weights (no randomly-initialised model plus a loaded state dict).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .. import layouts
from ..config import HiggsConfig
from ..constants import DEFAULT_BASE_REPO as DEFAULT_REPO
from ..errors import CheckpointError
from ..hub import resolve_dir, resolved_revision
from . import quant
from .higgs import HiggsAudioModel

# Weights, configs and every side file a transformers user of an export needs (processor, chat template).
HUB_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer*", "special_tokens_map.json",
                "generation_config.json", "processor_config.json", "preprocessor_config.json", "chat_template*"]
# Keys some checkpoints carry that hold nothing the model needs (buffers saved by older code).
STRAY_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")
STRAY_KEYS = {"audio_codebook_weights"}


def resolve_checkpoint(path_or_repo: str | os.PathLike = DEFAULT_REPO) -> Path:
    """A local checkpoint directory as is; otherwise a Hub repo id fetched (or found in the cache)."""
    return resolve_dir(path_or_repo, what="checkpoint", allow_patterns=HUB_PATTERNS)


def weight_files(ckpt: Path) -> list[Path]:
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (ckpt / f).is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard files listed but missing: {missing}")
        return [ckpt / f for f in files]
    single = ckpt / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(ckpt.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"{ckpt}: no model.safetensors, model.safetensors.index.json or *.safetensors")
    return found


def is_stray(key: str, cfg: HiggsConfig) -> bool:
    """A key some checkpoints carry that holds nothing the model needs (ignored on load, dropped by a conversion)."""
    if key in STRAY_KEYS or key.endswith(STRAY_SUFFIXES):
        return True
    # A checkpoint may ship tower weights while its config says not to use them (skip_audio_tower=true).
    return cfg.skip_audio_tower and key.startswith(("audio_tower.", "audio_encoder_proj."))


def _set_tensor(model: torch.nn.Module, key: str, value: torch.Tensor) -> None:
    mod_path, _, name = key.rpartition(".")
    mod = model.get_submodule(mod_path) if mod_path else model
    old = getattr(mod, name)
    if isinstance(old, torch.nn.Parameter):
        setattr(mod, name, torch.nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        mod.register_buffer(name, value, persistent=True)


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def safetensors_header(path: Path) -> tuple[dict, int]:
    """(tensor table, byte offset of the data section) of a safetensors file."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def read_tensor(f, info: dict, data_start: int, path: Path, key: str) -> torch.Tensor:
    """Read one tensor with a plain file read into a fresh buffer.

    Deliberately not mmap: pages of a mapped file count in the process RSS until it is unmapped, so loading
    through mmap holds the weights twice (the mapping + the materialised copy) at the peak.
    """
    dtype = _ST_DTYPES.get(info["dtype"])
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    t = torch.empty(info["shape"], dtype=dtype)
    nbytes = t.numel() * t.element_size()
    if end - begin != nbytes:
        raise CheckpointError(f"{path}: tensor {key} has {end - begin} bytes for shape {info['shape']}")
    f.seek(data_start + begin)
    if nbytes and f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) != nbytes:
        raise CheckpointError(f"{path}: truncated file (tensor {key})")
    return t


def internal_key(key: str, layout: str) -> str:
    """A checkpoint key of `layout` -> the minihiggs (legacy) name; a key without one keeps its name, so the
    strict report lists it as unexpected."""
    if layout == layouts.LEGACY:
        return key
    return layouts.model_key_to_legacy(key) or key


def load_state_into(model: HiggsAudioModel, files: list[Path], dtype: torch.dtype, device: torch.device,
                    quantize: str | None = None) -> None:
    """Materialise every parameter of a meta-device `model` from safetensors files, strictly. With `quantize`
    (quant.py), each decoder-layer projection is quantized on `device` as it is read, one tensor at a time."""
    expected = {k: v for k, v in model.state_dict().items()}
    layout = model.config.layout
    seen: set[str] = set()
    unexpected: list[str] = []
    mismatched: list[str] = []
    for path in files:
        header, data_start = safetensors_header(path)
        with open(path, "rb") as f:
            for file_key, info in header.items():
                key = internal_key(file_key, layout)
                if key not in expected:
                    if not is_stray(key, model.config):
                        unexpected.append(f"{file_key} ({path.name})")
                    continue
                if tuple(info["shape"]) != tuple(expected[key].shape):
                    mismatched.append(f"{file_key}: checkpoint {tuple(info['shape'])} vs model "
                                      f"{tuple(expected[key].shape)}")
                    continue
                t = read_tensor(f, info, data_start, path, key)
                if quantize and quant.is_quantized_key(key):
                    quant.quantize_into(model, key, t.to(device), quantize, dtype)
                else:
                    _set_tensor(model, key, t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype))
                seen.add(key)
    missing = sorted(layouts.model_key(k, layout) or k for k in set(expected) - seen)
    if missing or unexpected or mismatched:
        lines = []
        if missing:
            lines.append(f"missing keys ({len(missing)}): " + ", ".join(missing[:20])
                         + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:20]) +
                         (" ..." if len(unexpected) > 20 else ""))
        if mismatched:
            lines.append("shape mismatches: " + "; ".join(mismatched[:20]))
        raise CheckpointError(f"checkpoint {files[0].parent} does not match the model built from its config.json:\n  "
                              + "\n  ".join(lines))


def load_model(path_or_repo: str | os.PathLike = DEFAULT_REPO, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", quantize: str | None = None) -> HiggsAudioModel:
    """Build the model from a checkpoint's config.json and load its weights (strict, with a readable report).
    `quantize` ("nf4" | "int8", model/quant.py) stores the decoder layers' linears in 4 / 8 bits, computing in
    `dtype`.
    The model records where it came from: `checkpoint_dir` and `checkpoint_revision` (the Hub commit, None for a
    local directory); its config says the layout (`model.config.layout`)."""
    ckpt = resolve_checkpoint(path_or_repo)
    cfg = HiggsConfig.from_file(ckpt / "config.json")
    device = torch.device(device)
    with torch.device("meta"):
        model = HiggsAudioModel(cfg)
    load_state_into(model, weight_files(ckpt), dtype, device, quant.check_format(quantize))
    model.reset_buffers()
    model.checkpoint_dir = str(ckpt)
    model.checkpoint_revision = resolved_revision(ckpt)
    return model.eval()
