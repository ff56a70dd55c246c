"""Training checkpoints: atomic, resumable, pruned.

Layout (all under `--output_dir`):

    checkpoints/step-00000100/          one per --save_steps and at the end (the newest --keep_checkpoints kept)
        adapter_model.safetensors       the LoRA weights, PEFT format (so a checkpoint is also a loadable adapter)
        adapter_config.json, README.md
        trainer_state.pt                optimizer, scheduler, every rank's RNG states (python, numpy, torch,
                                        cuda), data position (epoch, batches consumed), best-val bookkeeping
        trainer_state.json              the same bookkeeping, human-readable (no tensors)
        train_args.json                 the command line and the parsed arguments
    best/                               adapter with the lowest validation loss so far (+ best.json)
    final/                              adapter at the end of training (+ final.json)
    metrics.jsonl, loss.png

A checkpoint is written into `checkpoints/.tmp-step-.../`, its files and the directory fsync'ed, and renamed to
`step-N` only then (the parent fsync'ed after), so a crash or a power loss at any point leaves every `step-N`
directory whole: without the fsyncs the rename can reach the disk before the data, and `latest` would pick a
checkpoint of empty files. `.tmp-*` leftovers are ignored and removed at the next start. Old checkpoints are
renamed away before deletion for the same reason. Pruning counts back from the checkpoint just written;
checkpoints of later steps belong to a history abandoned by resuming from an earlier one and are removed.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..errors import ResumeError
from ..fsio import (TMP_MARK, atomic_write_json, fsync_dir, fsync_tree, remove_dir_atomically, remove_stale,
                    writing)
from ..lora.adapter import ADAPTER_WEIGHTS, save_adapter
from ..lora.apply import load_lora_state_dict, lora_state_dict
from .distributed import DistEnv, all_gather_objects, barrier, is_fsdp

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
ARGS_FILE = "train_args.json"
_NAME = re.compile(r"^step-(\d+)$")
# What a failed write of the run's outputs asks the user to do.
WRITE_HINT = "free disk space or fix the directory, then continue with --resume latest"


# ---------------------------------------------------------------------------------------------------------------
# RNG states (stored without numpy objects, so `torch.load(weights_only=True)` reads them)


def rng_state(device: torch.device) -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# finding checkpoints


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = _NAME.match(d.name)
        if m and d.is_dir() and (d / STATE_FILE).is_file():
            out.append((int(m.group(1)), d))
    return sorted(out)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """`--resume latest` -> the newest checkpoint of output_dir (None when there is none yet: a fresh start, so
    a preemptible job can always be launched with `--resume latest`); `--resume DIR` -> DIR, which must be a
    checkpoint (or an output dir, meaning its newest checkpoint)."""
    if not resume:
        return None
    if resume == "latest":
        return latest_checkpoint(output_dir)
    p = Path(resume)
    if (p / STATE_FILE).is_file():
        return p
    if p.is_dir() and latest_checkpoint(p) is not None:
        return latest_checkpoint(p)
    raise ResumeError(f"--resume {resume}: not a checkpoint directory (no {STATE_FILE}) and not an output "
                      f"directory with checkpoints")


def remove_stale_temporaries(output_dir: str | Path) -> list[Path]:
    """Remove what a killed run left half-written (every name with the `.tmp-` marker): `checkpoints/.tmp-step-*`
    (a checkpoint being written), `.step-*.del.tmp-*` (one being pruned), `.best.tmp-*` / `.final.tmp-*` /
    `.best.old.tmp-*` (an adapter being written or replaced), `metrics.jsonl.tmp-*` / `loss.png.tmp-*` and
    `best/best.json.tmp-*` / `final/final.json.tmp-*` (a file being replaced). Rank 0, at start-up."""
    out = Path(output_dir)
    return [p for d in (checkpoint_root(out), out, out / "best", out / "final") for p in remove_stale(d)]


# What a resume may change (each change is printed): the LR schedule, the length of the run, the cadence of logs,
# validation, checkpoints and samples, the runtime. What it may not: everything that decides the data order, the
# split or the adapter's shape (`MUST_MATCH`), and the number of processes (each has its own RNG streams).
MUST_MATCH = ("shards", "batch_size", "max_tokens_per_batch", "seed", "val_fraction", "lora_r", "lora_alpha",
              "lora_targets", "best_metric", "quantize")  # (best_metric: the recorded best value is of that metric;
# quantize: the frozen weights themselves differ)
NOT_SETTINGS = ("resume", "output_dir")  # where the run is, not how it trains


def _same(key: str, old, new) -> bool:
    if key == "shards":
        return old is None or Path(old).resolve() == Path(new).resolve()
    return old == new


def check_resume_compatible(state: dict, record: dict, cfg, world_size: int, ckpt: Path) -> list[str]:
    """Refuse a resume whose settings would not continue the run exactly (a `ResumeError` listing each `--flag`
    with its checkpoint and current value); return the changes it may make, as "--flag OLD -> NEW". `record` is
    the checkpoint's train_args.json (its "args": the settings of the run that wrote it)."""
    saved = dict(record.get("args", {}))
    if "train_manifest" in saved:  # (the former name of --shards)
        saved.setdefault("shards", saved.pop("train_manifest"))
    for k in ("batch_size", "seed"):  # (also in the trainer state, for checkpoints without train_args.json)
        if k in state:
            saved.setdefault(k, state[k])
    now = vars(cfg)
    problems = []
    if state.get("world_size") != world_size:
        problems.append(f"the number of processes: checkpoint {state.get('world_size')}, now {world_size} "
                        f"(torchrun --nproc_per_node)")
    if "batch_size" in saved:  # (a checkpoint without a record of max_tokens_per_batch did not pack)
        saved.setdefault("max_tokens_per_batch", None)
    problems += [f"--{k}: checkpoint {saved[k]!r}, now {now[k]!r}" for k in MUST_MATCH
                 if k in saved and not _same(k, saved[k], now[k])]
    if problems:
        raise ResumeError(f"--resume {ckpt}: the run cannot continue exactly with different settings: "
                          + "; ".join(problems) + " (resume with the checkpoint's values, or start a new "
                                                  "--output_dir)")
    return [f"--{k} {saved[k]!r} -> {v!r}" for k, v in now.items()
            if k in saved and k not in MUST_MATCH + NOT_SETTINGS and saved[k] != v]


# ---------------------------------------------------------------------------------------------------------------
# saving


class _RememberedWrites:
    """A binary file whose first failed write (its OSError) is remembered: torch's zip writer turns an OSError
    raised by a write into "RuntimeError: [enforce fail at inline_container.cc] unexpected pos ..." (a full disk
    then reads as a torch bug)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_torch_file(obj: Any, path: Path) -> None:
    """`torch.save(obj, path)`, where a failed write (a full disk, a quota) raises its own OSError."""
    with open(path, "wb") as f:
        out = _RememberedWrites(f)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is not None:
                raise out.error from None
            raise


def optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """The optimizer's full state (rank 0; a collective under FSDP2, where the states are sharded)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, state: dict, env: DistEnv) -> None:
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, optim_state_dict=state if env.is_main else {},
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        optimizer.load_state_dict(state)


def save_adapter_all_ranks(model: nn.Module, out_dir: Path | None, env: DistEnv, base: str,
                           info: tuple[str, dict] | None = None) -> None:
    """Rank 0 writes the adapter (and `info`: (file name, JSON object) written into it, e.g. best.json). Under
    FSDP2 the LoRA weights are sharded and `save_adapter` gathers them with collectives, so the other ranks take
    part in the same gathers (`lora_state_dict`, same order) and write nothing. Call on every rank."""
    if env.is_main:
        with writing(out_dir, WRITE_HINT):
            save_adapter(model, out_dir, base_model_name_or_path=base)
            if info is not None:
                atomic_write_json(Path(out_dir) / info[0], info[1], indent=2)
    elif is_fsdp(model):
        lora_state_dict(model)


def save_checkpoint(output_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, args_record: dict, env: DistEnv, base: str, keep: int) -> Path:
    """Write `checkpoints/step-N` atomically (call on every rank). `state` is the trainer bookkeeping (data
    position, best val, ...); optimizer/scheduler-independent parts are added here. Returns the directory."""
    root = checkpoint_root(output_dir)
    final = root / f"step-{step:08d}"
    opt_state = optimizer_state(optimizer, model)
    rngs = all_gather_objects(rng_state(env.device))  # each rank's own streams (dropout differs per rank)
    tmp: Path | None = None
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_MARK}step-{step:08d}-", dir=root))
    try:
        with writing(final, WRITE_HINT):
            save_adapter_all_ranks(model, tmp, env, base)
            if env.is_main:
                full = {**state, "step": step, "world_size": env.world_size, "optimizer": opt_state, "rng": rngs,
                        "version": 1}
                with writing(final / STATE_FILE, WRITE_HINT):
                    save_torch_file(full, tmp / STATE_FILE)
                summary = {k: v for k, v in full.items() if k not in ("optimizer", "scheduler", "rng")}
                (tmp / STATE_JSON).write_text(json.dumps(summary, indent=2, default=str))
                (tmp / ARGS_FILE).write_text(json.dumps(args_record, indent=2, default=str))
                fsync_tree(tmp)  # the data on disk before the name that makes it a checkpoint
                if final.exists():  # the same step saved twice (e.g. --save_steps hit on the last step): replace
                    remove_dir_atomically(final)
                tmp.rename(final)
                tmp = None
                fsync_dir(root)
                prune(output_dir, keep, current=step)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    return final


def prune(output_dir: str | Path, keep: int, current: int | None = None) -> None:
    """Keep the newest `keep` checkpoints (0: all) up to step `current`, the one just written (never pruned).
    Checkpoints of later steps come from the history this run left by resuming an earlier checkpoint (its
    metrics were truncated there too): superseded, so removed. Counted instead, they pruned this run's newest
    checkpoint, and `latest` picked them over it."""
    ckpts = list_checkpoints(output_dir)
    if current is not None:
        for s, d in ckpts:
            if s > current:
                remove_dir_atomically(d)
        ckpts = [(s, d) for s, d in ckpts if s <= current]
    if keep > 0:
        for _, d in ckpts[:-keep]:
            remove_dir_atomically(d)


# ---------------------------------------------------------------------------------------------------------------
# loading


def _read_trainer_state(ckpt: Path) -> dict:
    state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not {"step", "optimizer", "rng"} <= state.keys():
        raise ValueError("not a minihiggs trainer state")
    return state


def check_adapter_file(ckpt: Path) -> list[str]:
    """The keys of the checkpoint's adapter_model.safetensors, after checking its header and size (cheap: no
    tensor is read), so that a damaged file is refused before the model is loaded. Raises ValueError."""
    from safetensors import safe_open

    path = ckpt / ADAPTER_WEIGHTS
    with safe_open(str(path), framework="pt") as f:  # validates the header and the file size
        keys = list(f.keys())
    if not keys or not all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys):
        raise ValueError("not a LoRA adapter (no lora_A / lora_B weights)")
    return keys


def _unreadable(path: Path, e: Exception) -> str:
    reason = " ".join(str(e).split()) or type(e).__name__
    return f"{path}: unreadable ({type(e).__name__}: {reason[:200]})"


def _read_checked(ckpt: Path) -> tuple[dict | None, str | None]:
    """(trainer state, None), or (None, why `ckpt` cannot be resumed from: its state or adapter unreadable)."""
    try:
        state = _read_trainer_state(ckpt)
    except Exception as e:  # any failure to read the file means the same: damaged
        return None, _unreadable(ckpt / STATE_FILE, e)
    try:
        check_adapter_file(ckpt)
    except Exception as e:
        return None, _unreadable(ckpt / ADAPTER_WEIGHTS, e)
    return state, None


def load_trainer_state(ckpt: Path) -> dict:
    """The checkpoint's trainer state, its adapter file checked too. A damaged checkpoint (truncated, overwritten)
    is a ResumeError that names the newest older checkpoint of the same run that is intact."""
    state, problem = _read_checked(ckpt)
    if state is not None:
        return state
    older = [d for _, d in reversed(list_checkpoints(ckpt.parent.parent)) if d.name < ckpt.name]
    intact = next((d for d in older if _read_checked(d)[1] is None), None)
    hint = f"resume from the newest intact one: --resume {intact}" if intact is not None else \
        "no older intact checkpoint in this run: start again in a new --output_dir"
    raise ResumeError(f"{problem} ({hint})")


def load_adapter_weights(model: nn.Module, ckpt: Path) -> None:
    """Copy the checkpoint's LoRA weights into `model` (LoRA already applied with the same config)."""
    from safetensors.torch import load_file

    try:
        load_lora_state_dict(model, load_file(str(ckpt / ADAPTER_WEIGHTS)), strict=True)
    except (KeyError, ValueError) as e:
        raise ResumeError(f"{ckpt / ADAPTER_WEIGHTS}: does not match this run's LoRA ({e.args[0]}) (resume with the "
                          f"--lora_* settings and --base_ckpt of the run that wrote it)") from None


def read_args_record(ckpt: Path) -> dict[str, Any]:
    p = ckpt / ARGS_FILE
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ResumeError(f"{p}: unreadable ({e}) (restore it, or resume from another checkpoint)") from None
