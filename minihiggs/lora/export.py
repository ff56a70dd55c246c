"""Merge a LoRA adapter into its base checkpoint and write a full checkpoint in the upstream layout
(the command is `python -m minihiggs.export`).

For every module the adapter holds (`base_model.model.<path>.lora_{A,B}.weight`) the base tensor
`<path>.weight` becomes `W + (alpha/r) * B @ A`, computed in float32 and cast back to W's dtype (the same ops
as PEFT's `merge_and_unload` and `minihiggs.lora.merge_lora`); every other tensor is copied bit for bit, under
its original key name and dtype, including keys the minihiggs model does not use. The merge streams the
base one tensor at a time (peak memory about one output shard), so the model itself is never built.

Output: `model-00001-of-0000N.safetensors` shards (at most --max_shard_size each, a single larger tensor gets
a shard of its own) + `model.safetensors.index.json` ({"metadata": {"total_size"}, "weight_map"}) + every
non-weight file of the base directory (config.json, generation_config.json, tokenizer files, ...). Written to
a temporary sibling directory and renamed into place. `minihiggs.load_model(out)` and the upstream
`HiggsAudioModel.from_pretrained(out)` load it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..fsio import atomic_dir
from ..model.checkpoint import read_tensor, resolve_checkpoint, safetensors_header, weight_files
from .adapter import ADAPTER_WEIGHTS, adapter_scaling, read_adapter_config, read_adapter_weights, resolve_adapter_dir
from .apply import PEFT_PREFIX, normalize_peft_key, peft_matcher

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """"5GB" -> 5_000_000_000 (decimal units as in transformers; KiB/MiB/GiB binary); ints pass through."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot parse size {size!r} (e.g. 5GB, 500MB, 2GiB, 1000000)")
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return n


def adapter_plan(cfg: dict, sd: dict[str, torch.Tensor], base_shapes: dict[str, tuple]) -> dict[str, tuple]:
    """base weight key -> (A, B) for every module of the adapter, validated against the base and the config."""
    mods: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        k = normalize_peft_key(k)
        m = re.fullmatch(re.escape(PEFT_PREFIX) + r"(.+)\.(lora_[AB])\.weight", k)
        if not m:
            raise KeyError(f"{ADAPTER_WEIGHTS}: unexpected key {k!r} (only lora_A/lora_B weights are supported)")
        mods.setdefault(m.group(1), {})[m.group(2)] = v
    r = int(cfg["r"])
    errors, plan = [], {}
    for path, ab in mods.items():
        if set(ab) != {"lora_A", "lora_B"}:
            errors.append(f"{path}: has {sorted(ab)} only")
            continue
        a, b = ab["lora_A"], ab["lora_B"]
        key = f"{path}.weight"
        if key not in base_shapes:
            errors.append(f"{path}: the base checkpoint has no {key}")
            continue
        out_f, in_f = base_shapes[key] if len(base_shapes[key]) == 2 else (None, None)
        if tuple(a.shape) != (r, in_f) or tuple(b.shape) != (out_f, r):
            errors.append(f"{path}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit r={r} and base "
                          f"{key} {tuple(base_shapes[key])}")
            continue
        plan[key] = (a, b)
    if errors:
        raise ValueError("adapter does not fit the base checkpoint:\n  " + "\n  ".join(errors[:20]))
    # The adapter must only hold modules its own target_modules selects (PEFT semantics over the base's 2-D weights).
    match = peft_matcher(cfg["target_modules"])
    candidates = [k[:-len(".weight")] for k, s in base_shapes.items() if k.endswith(".weight") and len(s) == 2]
    selected = {p for p in candidates if match(p)}
    stray = sorted(set(mods) - selected)
    if stray:
        raise ValueError(f"adapter holds weights for modules its target_modules {cfg['target_modules']!r} does "
                         f"not select: {stray[:10]}")
    return plan


def copy_side_files(base_dir: Path, out_dir: Path) -> list[str]:
    """Copy every top-level non-weight file of the base (config.json, tokenizer files, ...); returns the names."""
    copied = []
    for f in sorted(base_dir.iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.name.endswith(WEIGHT_SUFFIXES) \
                or f.name.endswith(".index.json"):
            continue
        shutil.copyfile(f, out_dir / f.name)  # follows Hub-cache symlinks
        copied.append(f.name)
    return copied


def export_merged(adapter: str | os.PathLike, out_dir: str | os.PathLike, base: str | os.PathLike | None = None,
                  max_shard_size: int | str = "5GB", overwrite: bool = False, log=print) -> dict:
    """Merge `adapter` into its base and write the full checkpoint to `out_dir`. Returns a summary dict.

    An existing non-empty `out_dir` is an error unless overwrite=True (then it is replaced as a whole, after
    the new checkpoint is complete)."""
    adapter_dir = resolve_adapter_dir(adapter)
    cfg = read_adapter_config(adapter_dir)
    sd = read_adapter_weights(adapter_dir)
    if base is None:
        base = cfg.get("base_model_name_or_path") or None
        if base is None:
            raise ValueError(f"{adapter_dir}/adapter_config.json has no base_model_name_or_path; pass --base")
    base_dir = resolve_checkpoint(base)
    files = weight_files(base_dir)
    max_bytes = parse_size(max_shard_size)

    headers = {f: safetensors_header(f) for f in files}
    order: list[tuple[str, Path]] = []
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        order = [(k, base_dir / f) for k, f in json.loads(index.read_text())["weight_map"].items()]
    else:
        order = [(k, f) for f in files for k in headers[f][0]]
    shapes = {k: tuple(headers[f][0][k]["shape"]) for k, f in order}
    plan = adapter_plan(cfg, sd, shapes)
    scaling = adapter_scaling(cfg)

    out_dir = Path(out_dir)
    if out_dir.resolve() == base_dir.resolve():
        raise ValueError("--out must differ from the base checkpoint directory")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass --overwrite to replace it")
    total = 0
    shards: list[list[str]] = []
    with atomic_dir(out_dir, replace=True) as tmp:
        handles = {}
        try:
            cur: dict[str, torch.Tensor] = {}
            cur_bytes = 0

            def flush():
                nonlocal cur, cur_bytes
                if cur:
                    save_file(cur, str(tmp / f"shard-{len(shards):05d}.tmp"), metadata={"format": "pt"})
                    shards.append(list(cur))
                    cur, cur_bytes = {}, 0

            for key, f in order:
                if f not in handles:
                    handles[f] = open(f, "rb")
                header, data_start = headers[f]
                t = read_tensor(handles[f], header[key], data_start, f, key)
                if key in plan:
                    a, b = plan[key]
                    with torch.no_grad():
                        t = (t.float() + (b.float() @ a.float()) * scaling).to(t.dtype)
                nbytes = t.numel() * t.element_size()
                if cur and cur_bytes + nbytes > max_bytes:
                    flush()
                cur[key] = t.contiguous()
                cur_bytes += nbytes
                total += nbytes
            flush()
        finally:
            for h in handles.values():
                h.close()
        n = len(shards)
        weight_map = {}
        for i, keys in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp / f"shard-{i:05d}.tmp", tmp / name)
            weight_map.update({k: name for k in keys})
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        copied = copy_side_files(base_dir, tmp)
    summary = {"out": str(out_dir), "base": str(base_dir), "adapter": str(adapter_dir),
               "merged_modules": len(plan), "tensors": len(order), "shards": n, "total_size": total,
               "scaling": scaling, "copied": copied}
    if log:
        log(f"merged {len(plan)} LoRA modules (scale {scaling:g}) into {base_dir}: {len(order)} tensors, "
            f"{total / 1e9:.3f} GB in {n} shard(s) -> {out_dir} (+ {', '.join(copied) or 'no side files'})")
    return summary
