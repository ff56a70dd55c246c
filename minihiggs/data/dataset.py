"""Reading prepared shards: `ShardDataset`, the deterministic train/val split, and length-bucketed batching.

    ds = ShardDataset("data/prepared")                 # verifies index.json against every shard
    train_idx, val_idx = ds.split(val_fraction=0.05)   # by a stable hash of each sample id
    sampler = BucketBatchSampler(ds.lengths, train_idx, batch_size=8, seed=0, epoch=0,
                                 rank=rank, world_size=world_size)
    for batch_indices in sampler: samples = [ds[i] for i in batch_indices]

Reads are zero-copy views of memory-mapped shard files (only the converted int64 / float32 tensors are new
memory). Each sample's region is checked against its CRC-32 when read; `verify="full"` also hashes every shard
at open (sizes are always checked).
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from ..errors import ShardError
from .sample import Sample
from .shards import FORMAT, VERSION, decode_sample, read_shard_meta, sha256_file

_MAX_OPEN = 128
# What to do about a damaged shard: prep redoes a shard whose files are missing and keeps the others.
REBUILD = "delete {0}.* and re-run prep.py with the same --out to rebuild it"


class ShardDataset(torch.utils.data.Dataset):
    def __init__(self, path: str | os.PathLike, verify: str = "size", check_crc: bool = True,
                 vocab_size: int | None = None):
        """`vocab_size`: refuse shards holding token ids the model cannot embed (see `check_vocab`)."""
        if verify not in ("size", "full"):
            raise ValueError("verify must be 'size' or 'full'")
        self.path = Path(path)
        self.check_crc = check_crc
        index_path = self.path / "index.json"
        if not index_path.is_file():
            hint = " (prep did not finish: re-run prep.py with the same --out to resume)" \
                if any(self.path.glob("shard-*.json")) else ""
            raise ShardError(f"{index_path}: not found{hint}")
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ShardError(f"{index_path}: not valid JSON ({e})") from None
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise ShardError(f"{index_path}: format {index.get('format')!r} version {index.get('version')!r}, "
                             f"this minihiggs reads {FORMAT!r} version {VERSION}")
        self.index = index
        self.num_codebooks = int(index["num_codebooks"])
        self.audio_in_token_id = int(index["audio_in_token_id"])
        self.audio_out_token_id = int(index["audio_out_token_id"])
        self.whisper = bool(index.get("whisper", False))
        self.mel_bins = int(index.get("mel_bins", 128))

        self.shard_names: list[str] = []
        self._shard_max_id: list[int | None] = []  # per shard, as prep recorded it (None: an older shard)
        cols: dict[str, list] = {k: [] for k in ("shard", "offset", "nbytes", "crc", "n", "seg0", "nseg",
                                                "feat0", "nfeat", "length", "duration", "line")}
        frames: list[int] = []
        feat_len: list[int] = []
        feat_fill: list[float] = []
        feat_valid: list[int] = []
        self.sample_ids: list[str] = []
        self.speakers: list[str | None] = []
        self.sources: list[str] = []
        for k, entry in enumerate(index["shards"]):
            name = entry["name"]
            meta, meta_digest = read_shard_meta(self.path, name, with_digest=True)
            bin_path = self.path / f"{name}.bin"
            if meta["bytes"] != entry["bytes"] or meta["sha256"] != entry["sha256"] \
                    or len(meta["samples"]) != entry["samples"] \
                    or entry.get("meta_sha256", meta_digest) != meta_digest:
                raise ShardError(f"{self.path / (name + '.json')}: does not match index.json "
                                 "(shard rewritten after the index was made?)")
            if not bin_path.is_file():
                raise ShardError(f"{bin_path}: shard file missing")
            size = bin_path.stat().st_size
            if size != entry["bytes"]:
                kind = "truncated" if size < entry["bytes"] else "altered"
                raise ShardError(f"{bin_path}: {size} bytes but the index says {entry['bytes']} ({kind} shard; "
                                 f"{REBUILD.format(name)})")
            if verify == "full" and sha256_file(bin_path) != entry["sha256"]:
                raise ShardError(f"{bin_path}: sha256 differs from the index (altered or corrupt shard; "
                                 f"{REBUILD.format(name)})")
            self.shard_names.append(name)
            self._shard_max_id.append(meta.get("max_token_id"))
            for s in meta["samples"]:
                cols["shard"].append(k)
                cols["offset"].append(s["offset"])
                cols["nbytes"].append(s["nbytes"])
                cols["crc"].append(s["crc32"])
                cols["n"].append(s["n"])
                cols["seg0"].append(len(frames))
                cols["nseg"].append(len(s["frames"]))
                frames.extend(s["frames"])
                f = s.get("features")
                cols["feat0"].append(len(feat_len))
                cols["nfeat"].append(-1 if f is None else len(f))
                for L, fill, valid in f or []:
                    feat_len.append(L)
                    feat_fill.append(fill)
                    feat_valid.append(valid)
                cols["length"].append(s["length"])
                cols["duration"].append(s["duration"])
                cols["line"].append(s["line"])
                self.sample_ids.append(s["id"])
                self.speakers.append(s.get("speaker"))
                self.sources.append(s.get("source", ""))
        self._shard = np.asarray(cols["shard"], dtype=np.int32)
        self._offset = np.asarray(cols["offset"], dtype=np.int64)
        self._nbytes = np.asarray(cols["nbytes"], dtype=np.int64)
        self._crc = np.asarray(cols["crc"], dtype=np.uint32)
        self._n = np.asarray(cols["n"], dtype=np.int64)
        self._seg0 = np.asarray(cols["seg0"], dtype=np.int64)
        self._nseg = np.asarray(cols["nseg"], dtype=np.int32)
        self._feat0 = np.asarray(cols["feat0"], dtype=np.int64)
        self._nfeat = np.asarray(cols["nfeat"], dtype=np.int32)
        self._frames = np.asarray(frames, dtype=np.int64)
        self._feat_len = np.asarray(feat_len, dtype=np.int64)
        self._feat_fill = np.asarray(feat_fill, dtype=np.float32)
        self._feat_valid = np.asarray(feat_valid, dtype=np.int64)
        self.lengths = np.asarray(cols["length"], dtype=np.int64)
        self.durations = np.asarray(cols["duration"], dtype=np.float64)
        self.lines = np.asarray(cols["line"], dtype=np.int64)
        self._maps: OrderedDict[int, np.memmap] = OrderedDict()
        self._pid = os.getpid()
        if vocab_size is not None:
            self.check_vocab(vocab_size)

    # ------------------------------------------------------------------ vocabulary
    def max_token_ids(self) -> list[int]:
        """The largest token or label id of each shard: as recorded by prep, or (older shards) read from the
        samples' token regions."""
        out = []
        for k, recorded in enumerate(self._shard_max_id):
            if recorded is None:
                mm = self._map(k)
                recorded = -1
                for i in np.flatnonzero(self._shard == k):
                    n, off = int(self._n[i]), int(self._offset[i])
                    if n and off + 8 * n <= mm.shape[0]:  # input ids then labels: 2n int32 values
                        recorded = max(recorded, int(np.frombuffer(mm, dtype="<i4", count=2 * n, offset=off).max()))
            out.append(int(recorded))
        return out

    def check_vocab(self, vocab_size: int) -> None:
        """Refuse shards with a token id >= `vocab_size`: the embedding lookup would fail mid-run (IndexError on
        CPU, a device-side assert on CUDA). prep skips such samples; shards made for another checkpoint or by an
        older prep may still hold them."""
        for name, top in zip(self.shard_names, self.max_token_ids()):
            if top >= vocab_size:
                raise ShardError(f"{self.path / (name + '.bin')}: holds token id {top}, outside the model's "
                                 f"vocabulary (vocab_size {vocab_size}) (re-run prep.py with this --base_ckpt: it "
                                 f"skips such samples)")

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.sample_ids)

    def _map(self, k: int) -> np.ndarray:
        if self._pid != os.getpid():  # forked DataLoader worker: do not share the parent's maps
            self._maps = OrderedDict()
            self._pid = os.getpid()
        m = self._maps.get(k)
        if m is None:
            path = self.path / f"{self.shard_names[k]}.bin"
            try:
                m = np.memmap(path, dtype=np.uint8, mode="r")
            except (OSError, ValueError) as e:
                raise ShardError(f"{path}: cannot map shard ({e})") from None
            self._maps[k] = m
            if len(self._maps) > _MAX_OPEN:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(k)
        return m

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = OrderedDict()
        return state

    def record(self, i: int) -> dict:
        """Index metadata of sample i (id, shard, source file and line, speaker, duration, length)."""
        return {"id": self.sample_ids[i], "shard": self.shard_names[self._shard[i]], "source": self.sources[i],
                "line": int(self.lines[i]), "speaker": self.speakers[i], "duration": float(self.durations[i]),
                "length": int(self.lengths[i])}

    def __getitem__(self, i: int) -> Sample:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range ({len(self)} samples)")
        k = int(self._shard[i])
        mm = self._map(k)
        off, nb = int(self._offset[i]), int(self._nbytes[i])
        if off + nb > mm.shape[0]:
            raise ShardError(f"{self.path / (self.shard_names[k] + '.bin')}: sample {self.sample_ids[i]!r} lies "
                             f"past the end of the file (truncated shard; {REBUILD.format(self.shard_names[k])})")
        region = mm[off:off + nb]
        if self.check_crc and zlib.crc32(region) != int(self._crc[i]):
            raise ShardError(f"{self.path / (self.shard_names[k] + '.bin')}: sample {self.sample_ids[i]!r} fails its "
                             f"CRC-32 check (altered or corrupt shard; {REBUILD.format(self.shard_names[k])})")
        s0, ns = int(self._seg0[i]), int(self._nseg[i])
        nf = int(self._nfeat[i])
        features = None
        if nf >= 0:
            f0 = int(self._feat0[i])
            features = zip(self._feat_len[f0:f0 + nf], self._feat_fill[f0:f0 + nf], self._feat_valid[f0:f0 + nf])
        return decode_sample(region, int(self._n[i]), self._frames[s0:s0 + ns], features, self.num_codebooks,
                             self.mel_bins, self.sample_ids[i])

    # ------------------------------------------------------------------ split
    def split(self, val_fraction: float = 0.05, salt: str = "") -> tuple[list[int], list[int]]:
        """(train_indices, val_indices), each ascending. A sample is in val when a stable hash of its id falls
        below `val_fraction`: the same for every run, machine and world size, and a sample keeps its side
        when others are added. With val_fraction > 0 and at least 2 samples, val is never empty (the sample
        with the smallest hash is taken)."""
        return split_by_id(self.sample_ids, val_fraction, salt)


def id_hash(sample_id: str, salt: str = "") -> float:
    """A stable value in [0, 1) from a sample id (sha256, not Python's randomised hash)."""
    d = hashlib.sha256((salt + "\0" + sample_id).encode("utf-8")).digest()
    return int.from_bytes(d[:8], "big") / 2.0 ** 64


def split_by_id(sample_ids: list[str], val_fraction: float = 0.05, salt: str = "") -> tuple[list[int], list[int]]:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError("val_fraction must be in [0, 1)")
    h = np.asarray([id_hash(s, salt) for s in sample_ids], dtype=np.float64)
    val = h < val_fraction
    if val_fraction > 0 and len(h) >= 2 and not val.any():
        val[int(np.argmin(h))] = True
    idx = np.arange(len(h))
    return idx[~val].tolist(), idx[val].tolist()


class BucketBatchSampler(torch.utils.data.Sampler):
    """Length-bucketed batches with a deterministic shuffle per (seed, epoch).

    The epoch's `indices` are shuffled, cut into pools of `batch_size * pool_batches` samples, each pool sorted
    by length and cut into batches (so a batch holds samples of similar length), and the batch order shuffled.
    With world_size > 1 every rank gets the same number of batches, disjoint from the others' (batches beyond
    a multiple of world_size are dropped for that epoch; the reshuffle next epoch covers them). The last batch
    may be smaller than `batch_size` unless `drop_last`.

    Resume: `state_dict()` records (seed, epoch, position); `load_state_dict()` / `skip(n)` continue exactly
    after the first n batches of the epoch (a finished pass resets the position to 0). With a prefetching DataLoader
    pass the number of batches the trainer
    actually consumed: `state_dict(batches_done=step_in_epoch)`.
    """

    def __init__(self, lengths, indices, batch_size: int, seed: int = 0, epoch: int = 0, rank: int = 0,
                 world_size: int = 1, pool_batches: int = 50, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.indices = np.asarray(list(indices), dtype=np.int64)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.pool_batches = int(pool_batches)
        self.drop_last = bool(drop_last)
        self.position = 0

    def all_batches(self) -> list[list[int]]:
        """Every batch of this epoch in order, before the split across ranks."""
        rng = np.random.default_rng([self.seed, self.epoch])
        perm = self.indices[rng.permutation(len(self.indices))]
        pool = self.batch_size * self.pool_batches
        batches: list[list[int]] = []
        for p in range(0, len(perm), pool):
            chunk = perm[p:p + pool]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            for b in range(0, len(chunk), self.batch_size):
                batch = chunk[b:b + self.batch_size]
                if len(batch) < self.batch_size and self.drop_last:
                    continue
                batches.append(batch.tolist())
        order = rng.permutation(len(batches))
        return [batches[j] for j in order]

    def batches(self) -> list[list[int]]:
        """This rank's batches for the epoch."""
        b = self.all_batches()
        per_rank = len(b) // self.world_size
        return b[self.rank:per_rank * self.world_size:self.world_size]

    def __len__(self) -> int:
        return len(self.all_batches()) // self.world_size

    def __iter__(self):
        b = self.batches()
        while self.position < len(b):
            batch = b[self.position]
            self.position += 1
            yield batch
        self.position = 0  # a finished pass; the next one (after set_epoch) starts at the beginning

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.position = 0

    def skip(self, n_batches: int) -> None:
        """Start this epoch's iteration after its first `n_batches` batches."""
        self.position = int(n_batches)

    def state_dict(self, batches_done: int | None = None) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position if batches_done is None
                else int(batches_done), "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("world_size", self.world_size) != self.world_size or \
                state.get("batch_size", self.batch_size) != self.batch_size:
            raise ValueError("sampler state was saved with a different world_size or batch_size")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


class TokenBatchSampler(BucketBatchSampler):
    """Packed micro-batches: each batch is the sample indices of one row whose merged lengths sum to at most
    `max_tokens` (collate them with `collate_rows([samples])`).

    Per (seed, epoch) the indices are shuffled and cut into pools of `pool_size` samples; each pool is packed
    first-fit decreasing (longest first, each into the first row with room), which leaves little padding, and the
    order of all rows is shuffled. Deterministic and resumable exactly like `BucketBatchSampler` (`state_dict`
    records `max_tokens` instead of `batch_size`); with world_size > 1 every rank gets the same number of rows.
    A sample longer than `max_tokens` cannot be packed: a ValueError names how many there are.
    """

    def __init__(self, lengths, indices, max_tokens: int, seed: int = 0, epoch: int = 0, rank: int = 0,
                 world_size: int = 1, pool_size: int = 1024):
        super().__init__(lengths, indices, batch_size=1, seed=seed, epoch=epoch, rank=rank, world_size=world_size)
        if max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        self.max_tokens = int(max_tokens)
        self.pool_size = int(pool_size)
        too_long = self.lengths[self.indices] > self.max_tokens if len(self.indices) else np.zeros(0, dtype=bool)
        if too_long.any():
            raise ValueError(f"{int(too_long.sum())} sample(s) are longer than max_tokens={self.max_tokens} (longest "
                             f"{int(self.lengths[self.indices].max())})")

    def all_batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        perm = self.indices[rng.permutation(len(self.indices))]
        rows: list[list[int]] = []
        for p in range(0, len(perm), self.pool_size):
            rows.extend(pack_first_fit(perm[p:p + self.pool_size], self.lengths, self.max_tokens))
        order = rng.permutation(len(rows))
        return [rows[j] for j in order]

    def state_dict(self, batches_done: int | None = None) -> dict:
        state = super().state_dict(batches_done)
        del state["batch_size"]
        return {**state, "max_tokens": self.max_tokens}

    def load_state_dict(self, state: dict) -> None:
        if state.get("max_tokens") != self.max_tokens:
            raise ValueError("sampler state was saved with a different max_tokens")
        super().load_state_dict(state)


def pack_first_fit(indices, lengths, max_tokens: int) -> list[list[int]]:
    """First-fit decreasing: rows of sample indices, each summing to <= max_tokens; order-stable for equal lengths,
    samples within a row in descending length."""
    indices = np.asarray(indices, dtype=np.int64)
    order = indices[np.argsort(-np.asarray(lengths)[indices], kind="stable")]
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order.tolist():
        n = int(lengths[i])
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_tokens - n)
    return rows
