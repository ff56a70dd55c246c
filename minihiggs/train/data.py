"""Data for the training loop: the resumable training loader and each rank's validation batches.

Two ways to form a micro-batch: `--batch_size` samples, one per row, padded to the longest (`BucketBatchSampler`), or
with `--max_tokens_per_batch` one packed row of samples filling a token budget (`TokenBatchSampler`, `collate_packed`).
"""

from __future__ import annotations

import atexit
import multiprocessing
import signal
import weakref

import torch

from ..config import HiggsConfig
from ..data.batch import Batch, collate, collate_rows
from ..data.dataset import BucketBatchSampler, ShardDataset, TokenBatchSampler, pack_first_fit
from ..errors import ShardError, TrainConfigError, UserError


def check_dataset(ds: ShardDataset, cfg: HiggsConfig) -> None:
    """Shards prepared for another checkpoint layout (or holding ids the model cannot embed) would fail deep
    inside collate or the forward; say so up front, before the model is loaded."""
    ds.check_vocab(cfg.text.vocab_size)
    if ds.num_codebooks < cfg.audio_num_codebooks:
        raise ShardError(f"{ds.path}: prepared with {ds.num_codebooks} codebooks, the model needs "
                         f"{cfg.audio_num_codebooks} (re-run prep.py with this --base_ckpt)")
    if (ds.audio_in_token_id, ds.audio_out_token_id) != (cfg.audio_in_token_id, cfg.audio_out_token_id):
        raise ShardError(f"{ds.path}: prepared for audio token ids {ds.audio_in_token_id}/{ds.audio_out_token_id}, "
                         f"the model uses {cfg.audio_in_token_id}/{cfg.audio_out_token_id} (re-run prep.py with this "
                         f"--base_ckpt)")
    if ds.whisper != cfg.uses_whisper_features:
        raise ShardError(f"{ds.path}: prepared {'with' if ds.whisper else 'without'} Whisper features, but the "
                         f"checkpoint {'needs' if cfg.uses_whisper_features else 'does not use'} them; re-run "
                         f"prep.py with this --base_ckpt")


def train_sampler(ds: ShardDataset, train_idx: list[int], batch_size: int, max_tokens: int | None, seed: int,
                  rank: int, world_size: int) -> BucketBatchSampler:
    """This rank's resumable sampler: `batch_size` samples per micro-batch, or packed rows of `max_tokens`."""
    if max_tokens is None:
        return BucketBatchSampler(ds.lengths, train_idx, batch_size=batch_size, seed=seed, epoch=0, rank=rank,
                                  world_size=world_size)
    too_long = [i for i in train_idx if ds.lengths[i] > max_tokens]
    if too_long:
        worst = max(too_long, key=lambda i: ds.lengths[i])
        rec = ds.record(worst)
        raise TrainConfigError(f"--max_tokens_per_batch {max_tokens}: {len(too_long)} training sample(s) are longer "
                               f"(the longest, {rec['id']!r} from {rec['source']} line {rec['line']}, has "
                               f"{rec['length']} tokens); raise the budget or re-run prep.py with a lower --max_tokens")
    return TokenBatchSampler(ds.lengths, train_idx, max_tokens=max_tokens, seed=seed, epoch=0, rank=rank,
                             world_size=world_size)


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM / SIGINT. Schedulers (SLURM) and Ctrl-C signal the whole process group;
    a worker dying from it makes the main process raise "DataLoader worker ... killed" in the middle of the step
    it is supposed to finish. (torch's own worker handler would obey only the parent's SIGTERM, but it is C code
    and the signal reaches whichever thread of the worker does not block it.) The price: nothing outside the main
    process can stop a worker, so the main process must: `LoaderBatches.close` on every way out of the loop, and
    at interpreter exit for a pass left open (Python's exit-time `terminate()` + `join()` of daemonic children
    would wait for them forever)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class WorkerError:
    """A `UserError` raised while fetching a batch, carried to the main process as the batch itself: re-raised
    there as the same class with the same one-line message (torch would re-raise it with the worker's traceback
    inside the message)."""

    def __init__(self, error: UserError):
        self.cls, self.message = type(error), str(error)

    def exception(self) -> Exception:
        try:
            return self.cls(self.message)
        except Exception:  # a class whose constructor wants other arguments
            return UserError(self.message)


def collate_packed(samples: list, cfg: HiggsConfig, length: int | None = None) -> Batch:
    """One micro-batch of `TokenBatchSampler`: all its samples in one row, padded to `length` when given."""
    return collate_rows([samples], cfg, length=length)


class _Batches(torch.utils.data.Dataset):
    """The loader's dataset: one `__getitems__` call per batch (sample reads + collate), UserErrors as values.
    A `TokenBatchSampler`'s batch becomes one packed row (padded to `packed_length` when given: one shape for
    compiled layers), a `BucketBatchSampler`'s one row per sample."""

    def __init__(self, ds: ShardDataset, cfg: HiggsConfig, packed: bool, packed_length: int | None):
        self.ds, self.cfg, self.packed, self.packed_length = ds, cfg, packed, packed_length

    def __len__(self) -> int:
        return len(self.ds)

    def __getitems__(self, indices: list[int]) -> Batch | WorkerError:
        try:
            samples = [self.ds[i] for i in indices]
            if self.packed:
                return collate_packed(samples, self.cfg, self.packed_length)
            return collate(samples, self.cfg)
        except UserError as e:
            return WorkerError(e)


def _as_is(batch):
    return batch


def train_loader(ds: ShardDataset, sampler: BucketBatchSampler | TokenBatchSampler, cfg: HiggsConfig,
                 num_workers: int, pin_memory: bool, packed_length: int | None = None) -> torch.utils.data.DataLoader:
    """Batches come from `sampler` (set its epoch and position before each `iter`); iterate through
    `LoaderBatches`. The loader gets its own generator: creating an iterator otherwise draws a seed from the
    *global* torch RNG, which would shift the dropout stream at every epoch start and break bitwise resume."""
    packed = getattr(sampler, "max_tokens", None) is not None
    return torch.utils.data.DataLoader(
        _Batches(ds, cfg, packed, packed_length), batch_sampler=sampler, collate_fn=_as_is, num_workers=num_workers,
        pin_memory=pin_memory, generator=torch.Generator().manual_seed(0),
        worker_init_fn=_ignore_stop_signals, persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None)


class LoaderBatches:
    """One pass of the loader: `next()` gives a Batch or raises the worker's UserError (one line); `close()` stops
    the workers now. Close it on every way out (the loop does, in `finally`); a pass still open at interpreter
    exit (e.g. kept alive by a traceback) is closed then, before Python's own wait for its child processes."""

    def __init__(self, loader: torch.utils.data.DataLoader):
        before = {p.pid for p in multiprocessing.active_children()}
        self._it = iter(loader)
        # This pass's worker processes: the children that `iter` started (torch keeps its own list private).
        self.workers = [p for p in multiprocessing.active_children() if p.pid not in before]
        _OPEN.add(self)

    def __next__(self) -> Batch:
        batch = next(self._it)
        if isinstance(batch, WorkerError):
            self.close()
            raise batch.exception()
        return batch

    def close(self) -> None:
        it, self._it = self._it, None
        _OPEN.discard(self)
        if it is None:
            return
        # torch's orderly shutdown (tells the workers to exit, waits a few seconds, then terminate(): ignored by
        # them) has no public name; the iterator's __del__ calls it. Without it (another torch), the workers are
        # killed below at once: they hold nothing that needs an orderly end.
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        del it
        for w in self.workers:
            if w.is_alive():  # a worker still busy (or stuck) after that: no more waiting
                w.kill()
                w.join(timeout=5)


_OPEN: "weakref.WeakSet[LoaderBatches]" = weakref.WeakSet()


@atexit.register  # (runs before multiprocessing's exit handler, registered earlier when torch was imported)
def _close_open_passes() -> None:
    for batches in list(_OPEN):
        batches.close()


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


def packed_val_rows(ds: ShardDataset, val_idx: list[int], max_tokens: int, rank: int,
                    world_size: int) -> tuple[list[list[int]], int]:
    """(this rank's packed validation rows, rows per rank): the val set packed first-fit decreasing (deterministic,
    the same for every run), dealt out interleaved across ranks."""
    rows = pack_first_fit(sorted(val_idx), ds.lengths, max_tokens)
    return rows[rank::world_size], -(-len(rows) // world_size)


def validation_set(ds: ShardDataset, val_idx: list[int], batch_size: int, rank: int, world_size: int,
                   cfg: HiggsConfig, max_tokens: int | None = None,
                   packed_length: int | None = None) -> list[tuple[Batch, bool]]:
    """This rank's collated validation batches, each with its padding flag (see `val_batches`), built once; packed
    rows of at most `max_tokens` tokens (padded to `packed_length`) when given. The losses are the same either way."""
    if max_tokens is not None and val_idx:
        mine, n = packed_val_rows(ds, val_idx, max_tokens, rank, world_size)
        pads = [(mine[-1] if mine else [val_idx[0]], True)] * (n - len(mine))
        return [(collate_packed([ds[i] for i in ids], cfg, packed_length), pad)
                for ids, pad in [(r, False) for r in mine] + pads]
    n = val_batch_count(len(val_idx), batch_size, world_size) if val_idx else 0
    if not n:
        return []
    mine = val_batches(ds, val_idx, batch_size, rank, world_size)
    pads = [(mine[-1] if mine else val_idx[:1], True)] * (n - len(mine))
    return [(collate_ids(ds, ids, cfg), pad) for ids, pad in [(b, False) for b in mine] + pads]
