"""The prep pipeline: `prepare(PrepConfig(...))` runs the named steps below in order.

check the inputs -> read the base checkpoint's config and tokenizer -> read the manifest into fixed shards ->
claim --out (prep_state.json) -> run the shards not finished yet (inline or in a worker pool) -> gather the
shards' samples and errors -> report -> write index.json.

Shards are fixed ranges of `shard_size` manifest entries, so a re-run with the same settings (checked against
`prep_state.json`) skips finished shards and redoes half-written ones.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..audio import mel
from ..constants import CODE_FRAMES_PER_SECOND
from ..data.shards import FORMAT, VERSION, read_shard_meta, shard_complete, shard_name, write_index
from ..errors import PrepError
from ..fsio import atomic_write_json
from ..hub import is_repo_id, resolve_dir, resolved_revision
from . import worker as worker_mod
from .manifest import manifest_kind, read_json_array, scan_jsonl
from .plain_list import read_plain_list
from .pool import run_pool
from .settings import ModelSettings, PrepConfig, WorkerSettings, model_settings
from .table import DATASET_PATTERNS, TableSpec, scan_table, select_files
from .worker import ShardJob, Worker

__all__ = ["PrepConfig", "model_settings", "prepare"]

TOKENIZER_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json"]
REQUIRED_TOKENS = ("<|audio_bos|>", "<|audio_eos|>", "<|audio_out_bos|>", "<|begin_of_text|>", "<|eot_id|>")


@dataclass(frozen=True)
class Inputs:
    """The run's inputs, checked and resolved."""

    manifest: Path
    out: Path
    kind: str  # manifest_kind
    scene: str | None
    device: str
    workers: int
    table: TableSpec | None = None  # parquet input


@dataclass(frozen=True)
class Base:
    """What prep reads of the base checkpoint: its folder, text tokenizer and model settings."""

    dir: Path
    tok: object  # TextTokenizer
    model: ModelSettings


def prepare(cfg: PrepConfig, log=print) -> dict:
    """Run prep as `cfg` says; returns a summary dict. Raises PrepError (or another UserError) on a fatal problem
    (nothing usable, --strict with skipped entries, changed settings, an ambiguous plain list, ...)."""
    t0 = time.time()
    inputs = check_inputs(cfg)
    base = load_base(cfg.base_ckpt, log)
    jobs, notes = build_jobs(inputs, cfg, log)  # before --out is touched: a list may be refused
    claim_out_dir(inputs, base, cfg)
    if not cfg.max_tokens:
        log(f"prep: no --max_tokens: samples over {worker_mod.DEFAULT_MAX_TOKENS} merged tokens (about "
            f"{worker_mod.DEFAULT_MAX_TOKENS // CODE_FRAMES_PER_SECOND} s of audio) are skipped as too_long, checked "
            "from the file headers before decoding; set --max_tokens to change the limit")
    for note in notes:
        log(f"prep: {note}")
    todo = unfinished(jobs, inputs.out, log)
    progress = run_shards(jobs, todo, inputs, base, cfg)
    totals = gather(inputs.out, jobs)
    summary = report(totals, progress, inputs, len(jobs), time.time() - t0, log)
    check_outcome(totals, inputs, cfg.strict, progress.total)
    write_index(inputs.out, [j.name for j in jobs],
                {**base.model.record(), "mel_bins": mel.N_MELS, "tokenizer": base.tok.fingerprint,
                 "base_ckpt": recorded_source(cfg.base_ckpt), "base_revision": resolved_revision(base.dir),
                 "codec": recorded_source(cfg.codec), "manifest": str(inputs.manifest)})
    return summary


def recorded_source(path_or_repo: str) -> str:
    """How index.json names a checkpoint or codec: a local directory as an absolute path (generate and train read
    it from other working directories), a Hub repo id (with any @revision) as given."""
    p = Path(path_or_repo).expanduser()
    return str(p.resolve()) if p.exists() else str(path_or_repo)


# ------------------------------------------------------------------------------------------------ the steps
def check_inputs(cfg: PrepConfig) -> Inputs:
    import torch

    manifest = resolve_manifest(cfg.manifest)
    if cfg.shard_size < 1:
        raise PrepError("--shard_size must be >= 1")
    kind = manifest_kind(manifest)
    if cfg.voice_clone and kind != "plain":
        # the flag pairs utterances of a plain list; a ChatML sample gives its reference in its own messages
        raise PrepError(f"{manifest}: --voice_clone applies to plain lists (.csv / .tsv / .txt / .list) only; in a "
                        f"ChatML manifest each sample gives its reference in its messages: drop --voice_clone")
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    table = None
    if kind == "table":
        table = TableSpec(select_files(manifest, cfg.split), cfg.audio_column, cfg.text_column, cfg.speaker_column,
                          cfg.scene_prompt or None)
    return Inputs(manifest, Path(cfg.out).resolve(), kind, cfg.scene_prompt or None, device, max(1, int(cfg.workers)),
                  table)


def resolve_manifest(manifest: str) -> Path:
    """A manifest file, a folder of parquet tables, or a Hub dataset id (its parquet files fetched)."""
    p = Path(manifest).expanduser()
    if p.is_file() or p.is_dir():
        return p.resolve()
    if is_repo_id(manifest) and not manifest.startswith((".", "/", "~")):
        return resolve_dir(manifest, what="--manifest dataset", allow_patterns=DATASET_PATTERNS, repo_type="dataset")
    raise PrepError(f"{p.resolve()}: manifest not found")


def resolve_base(base: str) -> Path:
    """A local checkpoint dir, or a hub repo id (fetches only config.json and the tokenizer files)."""
    d = resolve_dir(base, what="--base_ckpt", allow_patterns=TOKENIZER_FILES)
    for name in ("config.json", "tokenizer.json"):
        if not (d / name).is_file():
            raise PrepError(f"{d}: --base_ckpt needs config.json and tokenizer.json ({name} missing)")
    return d


def load_base(base_ckpt: str, log) -> Base:
    """The checkpoint's model settings and text tokenizer, which must define the Higgs special tokens at the ids
    config.json gives."""
    from ..text.tokenizer import TextTokenizer

    d = resolve_base(base_ckpt)
    ms = model_settings(json.loads((d / "config.json").read_text(encoding="utf-8")))
    tok = TextTokenizer.from_dir(d)
    for name, want in (("<|AUDIO|>", ms.audio_in_token_id), ("<|AUDIO_OUT|>", ms.audio_out_token_id)):
        try:
            got = tok.token_id(name)
        except KeyError:
            raise PrepError(f"{d}: the tokenizer does not define {name} (not a Higgs Audio tokenizer?)") from None
        if got != want:
            raise PrepError(f"{d}: tokenizer maps {name} to {got} but config.json says {want}")
    for name in REQUIRED_TOKENS:
        try:
            tok.token_id(name)
        except KeyError:
            raise PrepError(f"{d}: the tokenizer does not define {name}") from None
    if not ms.whisper:
        log("prep: this checkpoint does not use Whisper features (encode_whisper_embed false or "
            "skip_audio_tower true): none are stored")
    return Base(d, tok, ms)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 22), b""):
            h.update(b)
    return h.hexdigest()


def claim_out_dir(inputs: Inputs, base: Base, cfg: PrepConfig) -> None:
    """Record this run's settings in OUT/prep_state.json; shards of other settings are refused (or deleted with
    --overwrite), and the previous run's index and error list removed."""
    plain = inputs.kind == "plain"
    t = inputs.table
    fingerprint = {"format": FORMAT, "version": VERSION, "manifest": str(inputs.manifest),
                   "manifest_sha256": t.fingerprint() if t else file_sha256(inputs.manifest),
                   "shard_size": cfg.shard_size, "voice_clone": bool(cfg.voice_clone) if plain else False,
                   "scene_prompt": inputs.scene if plain or t else None, "max_tokens": cfg.max_tokens,
                   "tokenizer": base.tok.fingerprint, "codec": str(cfg.codec), **base.model.record()}
    if t:  # which rows and columns make the samples
        fingerprint["table"] = {"files": [str(f) for f in t.files], "audio_column": t.audio_column,
                                "text_column": t.text_column, "speaker_column": t.speaker_column}
    out = inputs.out
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "prep_state.json"
    if state_path.exists():
        old = json.loads(state_path.read_text(encoding="utf-8"))
        if old != fingerprint:
            if not cfg.overwrite:
                diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
                raise PrepError(f"{out} holds shards prepared with other settings ({', '.join(diff)} differ); "
                                "use a new --out, or --overwrite to delete them")
            for p in out.glob("shard-*"):
                p.unlink()
    atomic_write_json(state_path, fingerprint)
    for p in (out / "index.json", out / "prep_errors.jsonl"):
        if p.exists():
            p.unlink()


def build_jobs(inputs: Inputs, cfg: PrepConfig, log=print) -> tuple[list[ShardJob], list[str]]:
    """The manifest's entries split into fixed shards of `shard_size`, and notes for the log."""
    notes: list[str] = []
    if inputs.kind == "jsonl":
        entries = scan_jsonl(inputs.manifest)
    elif inputs.kind == "json":
        entries = read_json_array(inputs.manifest)
    elif inputs.kind == "table":
        entries = scan_table(inputs.table)
    else:
        usable = None
        if cfg.voice_clone:  # references only among clips that will make it (one read of each, before the shards)
            log("prep: --voice_clone: checking every clip, so that references are chosen among usable ones")
            max_seconds = worker_mod.token_limit(cfg.max_tokens)[0] / CODE_FRAMES_PER_SECOND
            usable = functools.partial(worker_mod.reference_usable, max_seconds=max_seconds)
        entries, notes = read_plain_list(inputs.manifest, cfg.voice_clone, inputs.scene, usable)
    size = cfg.shard_size
    jobs = [ShardJob(shard_name(k), a, min(len(entries), a + size), entries[a:a + size])
            for k, a in enumerate(range(0, len(entries), size))]
    return jobs, notes


def unfinished(jobs: list[ShardJob], out: Path, log) -> list[ShardJob]:
    """The jobs whose shard is not complete; their leftovers (a half-written shard) are removed."""
    todo = []
    for j in jobs:
        if not shard_complete(out, j.name):
            for suffix in (".bin", ".bin.tmp", ".json", ".json.tmp", ".errors.jsonl", ".errors.jsonl.tmp"):
                (out / f"{j.name}{suffix}").unlink(missing_ok=True)
            todo.append(j)
    if len(todo) < len(jobs):
        log(f"prep: resuming: {len(jobs) - len(todo)} of {len(jobs)} shard(s) already finished")
    return todo


class Progress:
    """The progress bar over manifest entries, and what this run processed (entries, seconds of audio)."""

    def __init__(self, total: int, done: int, enabled: bool):
        from tqdm import tqdm

        self.total = total
        self.clips, self.seconds = 0, 0.0
        self.t0 = time.time()
        self.elapsed = 0.0
        self.bar = tqdm(total=total, initial=done, unit="clip", disable=not enabled, dynamic_ncols=True, desc="prep")

    def put(self, item: tuple[int, float]) -> None:
        """A worker's report: (entries done, seconds of audio written); the Worker's queue interface."""
        clips, seconds = item
        self.clips += clips
        self.seconds += seconds
        el = max(time.time() - self.t0, 1e-6)
        self.bar.update(clips)
        self.bar.set_postfix_str(f"{self.clips / el:.1f} clips/s, {self.seconds / 3600 / el:.5f} audio-h/s",
                                 refresh=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        self.elapsed = time.time() - self.t0


def run_shards(jobs: list[ShardJob], todo: list[ShardJob], inputs: Inputs, base: Base, cfg: PrepConfig) -> Progress:
    """Make the unfinished shards `todo`: in this process, or on a pool of `--workers` processes."""
    settings = WorkerSettings(out=inputs.out, manifest=inputs.manifest, tokenizer_dir=base.dir, codec=cfg.codec,
                              device=inputs.device, max_tokens=cfg.max_tokens, model=base.model,
                              codec_batch_clips=32 if inputs.device.startswith("cuda") else 8,
                              threads=max(1, (os.cpu_count() or 1) // inputs.workers), parent_pid=os.getpid(),
                              table=inputs.table)
    total = sum(j.last - j.first for j in jobs)
    progress = Progress(total, done=total - sum(j.last - j.first for j in todo), enabled=cfg.progress)
    with progress:
        if inputs.workers == 1 or len(todo) <= 1:
            run_inline(todo, settings, base.tok, progress)
        else:
            run_pool(todo, settings, inputs.workers, progress)
    return progress


def run_inline(todo: list[ShardJob], settings: WorkerSettings, tok, progress: Progress) -> None:
    w = Worker(settings, progress, tok)
    for j in todo:
        w.run(j)


@dataclass
class Totals:
    """What the finished shards hold: samples, seconds of audio, skipped entries, where each id is used."""

    samples: int
    seconds: float
    errors: list[dict]
    id_lines: dict[str, list[int]]


def gather(out: Path, jobs: list[ShardJob]) -> Totals:
    """Read every shard's metadata and errors; writes OUT/prep_errors.jsonl (all shards' errors, in order)."""
    totals = Totals(0, 0.0, [], {})
    with open(out / "prep_errors.jsonl.tmp", "w", encoding="utf-8") as ef:
        for j in jobs:
            meta = read_shard_meta(out, j.name)
            totals.samples += len(meta["samples"])
            totals.seconds += sum(r["duration"] for r in meta["samples"])
            for r in meta["samples"]:
                totals.id_lines.setdefault(r["id"], []).append(r["line"])
            with open(out / f"{j.name}.errors.jsonl", encoding="utf-8") as f:
                for row in f:
                    ef.write(row)
                    totals.errors.append(json.loads(row))
    os.replace(out / "prep_errors.jsonl.tmp", out / "prep_errors.jsonl")
    return totals


def check_outcome(totals: Totals, inputs: Inputs, strict: bool, n_entries: int) -> None:
    """No index.json when nothing is usable, or with --strict when an entry was skipped."""
    errors_file = inputs.out / "prep_errors.jsonl"
    if totals.samples == 0:
        raise PrepError(f"{inputs.manifest}: nothing usable: every entry ({n_entries}) was skipped (the reasons are "
                        f"in {errors_file})")
    if strict and totals.errors:
        n = len(totals.errors)
        raise PrepError(f"--strict: {n} entr{'y was' if n == 1 else 'ies were'} skipped (see {errors_file}); no "
                        "index.json written")


def report(totals: Totals, progress: Progress, inputs: Inputs, n_shards: int, seconds: float, log) -> dict:
    """Log the run's summary, the first skipped entries and duplicate ids; returns the summary dict."""
    kinds: dict[str, int] = {}
    for e in totals.errors:
        kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
    n_err, elapsed, out = len(totals.errors), progress.elapsed, inputs.out
    rate = progress.clips / elapsed if elapsed > 0 else 0.0
    log(f"prep: {totals.samples} sample(s) in {n_shards} shard(s), {totals.seconds / 3600:.3f} h of audio; "
        f"{n_err} skipped" + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(kinds.items()))})" if kinds else "")
        + f"; this run {progress.clips} entries in {elapsed:.1f} s ({rate:.1f} clips/s, "
        f"{progress.seconds / max(elapsed, 1e-9):.1f} audio-hours/hour)")
    if n_err:
        log(f"prep: skipped entries are listed in {out / 'prep_errors.jsonl'}")
        for e in totals.errors[:10]:
            at = f":{e['line']}" if "line" in e else f" row {e['row']}"
            log(f"  {Path(e['manifest']).name}{at}: {e['reason']}")
        if n_err > 10:
            log(f"  ... and {n_err - 10} more")
    dups = {k: v for k, v in totals.id_lines.items() if len(v) > 1}
    if dups:
        shown = "; ".join(f"{k!r} (lines {', '.join(map(str, v))})" for k, v in list(dups.items())[:5])
        log(f"prep: warning: {len(dups)} sample id(s) used more than once in {inputs.manifest.name}: {shown}"
            + (f"; ... and {len(dups) - 5} more" if len(dups) > 5 else "")
            + ". The train/val split hashes ids: samples sharing an id always land on the same side; give each "
              "sample its own \"id\"")
    return {"samples": totals.samples, "skipped": n_err, "skipped_by_kind": kinds, "shards": n_shards,
            "audio_hours": totals.seconds / 3600, "seconds": seconds, "run_seconds": elapsed,
            "clips_processed": progress.clips, "audio_seconds_processed": progress.seconds,
            "out": str(out), "errors_file": str(out / "prep_errors.jsonl")}
