"""Merge a LoRA adapter into its base checkpoint and write a full checkpoint, in the base's layout or the other
one (layouts.py; the command is `python -m minihiggs.export`).

For every module the adapter holds (`base_model.model.<path>.lora_{A,B}.weight`, either naming) the base tensor
`<path>.weight` becomes `W + (alpha/r) * B @ A`, computed in float32 and cast back to W's dtype (the same ops
as PEFT's `merge_and_unload` and `minihiggs.lora.merge_lora`); every other tensor is copied bit for bit, under
its key in the output layout and its dtype, including keys the minihiggs model does not use (buffers the
transformers layout has no name for are dropped when converting). The merge streams the base one tensor at a
time (peak memory about one output shard), so the model itself is never built.

Output: `model-00001-of-0000N.safetensors` shards (at most --max_shard_size each, a single larger tensor gets
a shard of its own) + `model.safetensors.index.json` ({"metadata": {"total_size"}, "weight_map"}) + every
non-weight file of the base directory (config.json, generation_config.json, tokenizer, processor and chat-template
files), config.json converted when the layout changes (a legacy base written in the transformers layout also gets
generation_config.json and processor_config.json) + `merged_adapters.json` (what was merged: adapter, sha256,
scale; earlier merges of the base carried over). Written to a temporary sibling directory and renamed into place,
world-readable like any file. `minihiggs.load_model(out)` loads it; so does upstream's `HiggsAudioModel` (legacy)
or transformers' `HiggsAudioV2ForConditionalGeneration` (transformers layout).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import layouts
from ..config import HiggsConfig
from ..constants import DEFAULT_CODEC_REPO
from ..errors import CheckpointError
from ..fsio import atomic_dir, make_readable
from ..model.quant import check_format, is_quantized_key, roundtrip
from ..model.checkpoint import internal_key, is_stray, read_tensor, resolve_checkpoint, safetensors_header, weight_files
from .adapter import (
    ADAPTER_WEIGHTS,
    MERGED_RECORD,
    adapter_record,
    adapter_scaling,
    check_not_merged,
    merged_adapters,
    read_adapter_config,
    read_adapter_weights,
    recorded_base,
    resolve_adapter_dir,
    to_internal_naming,
)
from .apply import PEFT_PREFIX, peft_matcher

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


def adapter_plan(cfg: dict, sd: dict[str, torch.Tensor], base_shapes: dict[str, tuple],
                 naming: str = layouts.LEGACY) -> dict[str, tuple]:
    """base weight key -> (A, B) for every module of the adapter, validated against the base and the config.
    `sd` and `base_shapes` are keyed by minihiggs names; `naming` is the adapter's own, which its
    target_modules are read in."""
    mods: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
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
    selected = {p for p in candidates if (q := layouts.model_key(p, naming)) is not None and match(q)}
    stray = sorted(set(mods) - selected)
    if stray:
        raise ValueError(f"adapter holds weights for modules its target_modules {cfg['target_modules']!r} does "
                         f"not select: {stray[:10]}")
    return plan


def copy_side_files(base_dir: Path, out_dir: Path, skip: set[str] = frozenset()) -> list[str]:
    """Copy every top-level non-weight file of the base (config.json, tokenizer files, ...) except `skip`;
    returns the names."""
    copied = []
    for f in sorted(base_dir.iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.name.endswith(WEIGHT_SUFFIXES) \
                or f.name.endswith(".index.json") or f.name in skip:
            continue
        shutil.copyfile(f, out_dir / f.name)  # follows Hub-cache symlinks
        copied.append(f.name)
    return copied


def written_side_files(base_dir: Path, base: HiggsConfig, layout: str, codec: str) -> dict[str, dict]:
    """Side files written instead of (or besides) the base's (name -> JSON): config.json when the layout changes;
    for the transformers layout the generation and processor configs a transformers user needs, when the base
    does not ship them in that layout."""
    out = {}
    if layout != base.layout:
        out["config.json"] = layouts.model_config_to_legacy(base.raw) if layout == layouts.LEGACY else \
            layouts.model_config_to_transformers(base.raw, base)
    if layout == layouts.TRANSFORMERS:
        if base.layout == layouts.LEGACY or not (base_dir / "generation_config.json").is_file():
            out["generation_config.json"] = layouts.generation_config(base)
        if not (base_dir / "processor_config.json").is_file():
            out["processor_config.json"] = layouts.processor_config(base, codec)
    return out


def output_key(key: str, base: HiggsConfig, layout: str) -> str | None:
    """A base key (minihiggs name) in the output layout; None for a stray buffer the layout has no name for."""
    out = layouts.model_key(key, layout)
    if out is None and not is_stray(key, base):
        raise CheckpointError(f"{key}: the {layout} layout has no name for this tensor (keep the base's layout)")
    return out


def export_merged(adapter: str | os.PathLike, out_dir: str | os.PathLike, base: str | os.PathLike | None = None,
                  max_shard_size: int | str = "5GB", overwrite: bool = False, layout: str | None = None,
                  codec: str = DEFAULT_CODEC_REPO, quantize: str | None = None, log=print) -> dict:
    """Merge `adapter` into its base and write the full checkpoint to `out_dir` in `layout` (default: the base's).
    Returns a summary dict. `codec` is what a transformers-layout processor_config.json names as the audio tokenizer
    (when it is written, not copied). An adapter the base already holds merged is refused (merged_adapters.json).

    An existing non-empty `out_dir` is an error unless overwrite=True (then it is replaced as a whole, after
    the new checkpoint is complete). `quantize` ("nf4" | "int8": the adapter was trained on a quantized base, see
    model/quant.py) merges into the weights as that run computed with them, W^ + (alpha/r) * B @ A: the merged
    checkpoint then keeps the quantization error of the adapted linears in full precision (README: Small GPUs)."""
    check_format(quantize)
    adapter_dir = resolve_adapter_dir(adapter)
    cfg = read_adapter_config(adapter_dir)
    sd, naming = to_internal_naming(read_adapter_weights(adapter_dir), str(adapter_dir / ADAPTER_WEIGHTS))
    if base is None:
        base = recorded_base(cfg)
        if base is None:
            raise ValueError(f"{adapter_dir}/adapter_config.json has no base_model_name_or_path; pass --base_ckpt")
    base_dir = resolve_checkpoint(base)
    base_cfg = HiggsConfig.from_file(base_dir / "config.json")
    layout = layouts.check_layout(layout or base_cfg.layout)
    check_not_merged(base_dir, adapter_dir, log)
    files = weight_files(base_dir)
    max_bytes = parse_size(max_shard_size)

    headers = {f: safetensors_header(f) for f in files}
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        order = [(k, base_dir / f) for k, f in json.loads(index.read_text())["weight_map"].items()]
    else:
        order = [(k, f) for f in files for k in headers[f][0]]
    names = {k: internal_key(k, base_cfg.layout) for k, _ in order}
    shapes = {names[k]: tuple(headers[f][0][k]["shape"]) for k, f in order}
    plan = adapter_plan(cfg, sd, shapes, naming)
    scaling = adapter_scaling(cfg)
    side = written_side_files(base_dir, base_cfg, layout, codec)
    entry = {**adapter_record(adapter_dir, cfg), "layout": layout, **({"quantize": quantize} if quantize else {})}
    record = {"merged": merged_adapters(base_dir) + [entry]}

    out_dir = Path(out_dir)
    if out_dir.resolve() == base_dir.resolve():
        raise ValueError("--out must differ from the base checkpoint directory")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass --overwrite to replace it")
    with atomic_dir(out_dir, replace=True) as tmp:
        shards, total = _write_shards(tmp, order, headers, names, plan, scaling, base_cfg, layout, max_bytes,
                                      quantize)
        copied = copy_side_files(base_dir, tmp, skip=set(side) | {MERGED_RECORD})
        for name, obj in {**side, MERGED_RECORD: record}.items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
    summary = {"out": str(out_dir), "base": str(base_dir), "adapter": str(adapter_dir), "layout": layout,
               "merged_modules": len(plan), "tensors": sum(map(len, shards)), "shards": len(shards),
               "total_size": total, "scaling": scaling, "copied": copied, "written": sorted(side)}
    if log:
        log(f"merged {len(plan)} LoRA modules (scale {scaling:g}) into {base_dir}: {summary['tensors']} tensors, "
            f"{total / 1e9:.3f} GB in {len(shards)} shard(s), {layout} layout -> {out_dir} "
            f"(+ {', '.join(copied + sorted(side)) or 'no side files'})")
    return summary


def _write_shards(tmp: Path, order, headers, names, plan, scaling, base_cfg, layout, max_bytes, quantize=None):
    """Stream the base tensors (merged where the plan says) into shards + index under `tmp`; (shards, bytes)."""
    total = 0
    shards: list[list[str]] = []
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
            out_key = output_key(names[key], base_cfg, layout)
            if out_key is None:
                continue
            if f not in handles:
                handles[f] = open(f, "rb")
            header, data_start = headers[f]
            t = read_tensor(handles[f], header[key], data_start, f, key)
            if names[key] in plan:
                a, b = plan[names[key]]
                with torch.no_grad():
                    w = roundtrip(t, quantize) if quantize and is_quantized_key(names[key]) else t.float()
                    t = (w + (b.float() @ a.float()) * scaling).to(t.dtype)
            nbytes = t.numel() * t.element_size()
            if cur and cur_bytes + nbytes > max_bytes:
                flush()
            cur[out_key] = t.contiguous()
            cur_bytes += nbytes
            total += nbytes
        flush()
    finally:
        for h in handles.values():
            h.close()
    weight_map = {}
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(tmp / f"shard-{i:05d}.tmp", tmp / name)
        make_readable(tmp / name)
        weight_map.update({k: name for k in keys})
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return shards, total
