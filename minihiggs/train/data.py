"""Data for the training loop: the resumable training loader and each rank's validation batches."""

from __future__ import annotations

import functools
import signal

import torch

from ..config import HiggsConfig
from ..data.batch import Batch, collate
from ..data.dataset import BucketBatchSampler, ShardDataset
from ..errors import ShardError


def check_dataset(ds: ShardDataset, cfg: HiggsConfig) -> None:
    """Shards prepared for another checkpoint layout would fail deep inside collate; say so up front."""
    if ds.num_codebooks < cfg.audio_num_codebooks:
        raise ShardError(f"{ds.path}: prepared with {ds.num_codebooks} codebooks, the model needs "
                         f"{cfg.audio_num_codebooks}")
    if (ds.audio_in_token_id, ds.audio_out_token_id) != (cfg.audio_in_token_id, cfg.audio_out_token_id):
        raise ShardError(f"{ds.path}: prepared for audio token ids {ds.audio_in_token_id}/{ds.audio_out_token_id}, "
                         f"the model uses {cfg.audio_in_token_id}/{cfg.audio_out_token_id}")
    if ds.whisper != cfg.uses_whisper_features:
        raise ShardError(f"{ds.path}: prepared {'with' if ds.whisper else 'without'} Whisper features, but the "
                         f"checkpoint {'needs' if cfg.uses_whisper_features else 'does not use'} them; re-run "
                         f"prep.py with this --base_ckpt")


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM / SIGINT. Schedulers (SLURM, torchrun) and Ctrl-C signal the whole
    process group; a worker dying from it makes the main process raise "DataLoader worker ... killed" in the
    middle of the step it is supposed to finish. Workers still exit when the main process does."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def train_loader(ds: ShardDataset, sampler: BucketBatchSampler, cfg: HiggsConfig, num_workers: int,
                 pin_memory: bool) -> torch.utils.data.DataLoader:
    """Batches come from `sampler` (set its epoch and position before each `iter`). The loader gets its own
    generator: creating an iterator otherwise draws a seed from the *global* torch RNG, which would shift the
    dropout stream at every epoch start and break bitwise resume."""
    return torch.utils.data.DataLoader(
        ds, batch_sampler=sampler, collate_fn=functools.partial(collate, cfg=cfg), num_workers=num_workers,
        pin_memory=pin_memory, generator=torch.Generator().manual_seed(0), worker_init_fn=_ignore_stop_signals,
        persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None)


def val_batches(ds: ShardDataset, val_idx: list[int], batch_size: int, rank: int,
                world_size: int) -> list[list[int]]:
    """This rank's validation batches: an interleaved slice of the (length-sorted) val set, cut into batches.

    Every rank returns the same number of batches (FSDP2 forwards are collectives); a rank with fewer samples
    repeats its last batch, marked by the caller as padding (weight 0). Sorting by length keeps padding low.
    """
    order = sorted(val_idx, key=lambda i: (int(ds.lengths[i]), i))
    mine = order[rank::world_size]
    batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    return batches


def val_batch_count(n_val: int, batch_size: int, world_size: int) -> int:
    """Batches per rank needed so that every rank covers its slice (the largest slice decides)."""
    per_rank = -(-n_val // world_size)
    return -(-per_rank // batch_size)


def collate_ids(ds: ShardDataset, ids: list[int], cfg: HiggsConfig) -> Batch:
    return collate([ds[i] for i in ids], cfg)


def validation_set(ds: ShardDataset, val_idx: list[int], batch_size: int, rank: int, world_size: int,
                   cfg: HiggsConfig) -> list[tuple[Batch, bool]]:
    """This rank's collated validation batches, each with its padding flag (see `val_batches`), built once."""
    n = val_batch_count(len(val_idx), batch_size, world_size) if val_idx else 0
    if not n:
        return []
    mine = val_batches(ds, val_idx, batch_size, rank, world_size)
    pads = [(mine[-1] if mine else val_idx[:1], True)] * (n - len(mine))
    return [(collate_ids(ds, ids, cfg), pad) for ids, pad in [(b, False) for b in mine] + pads]
