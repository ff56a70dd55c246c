"""The prep pipeline: settings, the manifest split into fixed shards, the worker pool, the index and the summary.

`run_prep(...)` is what `prep.py` calls. Shards are fixed ranges of `shard_size` manifest entries, so a re-run
with the same settings (checked against `prep_state.json`) skips finished shards and redoes half-written ones.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing as mp
import os
import queue as queue_mod
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import wait as futures_wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from ..audio import mel
from ..constants import CODE_FRAMES_PER_SECOND
from ..constants import DEFAULT_BASE_REPO as DEFAULT_BASE, DEFAULT_CODEC_REPO as DEFAULT_CODEC
from ..data.shards import FORMAT, VERSION, read_shard_meta, shard_complete, shard_name, write_index
from ..errors import PrepError
from ..fsio import atomic_write_json
from ..hub import resolve_dir, resolved_revision
from ..text.chatml import DEFAULT_SCENE
from . import worker as worker_mod
from .manifest import manifest_kind, read_json_array, read_plain_list, scan_jsonl
from .worker import Worker


def resolve_base(base: str) -> Path:
    """A local checkpoint dir, or a hub repo id (fetches only config.json and the tokenizer files)."""
    d = resolve_dir(base, what="--base_ckpt", allow_patterns=["config.json", "tokenizer.json", "tokenizer_config.json"])
    for name in ("config.json", "tokenizer.json"):
        if not (d / name).is_file():
            raise PrepError(f"{d}: --base_ckpt needs config.json and tokenizer.json ({name} missing)")
    return d


def model_settings(config: dict) -> dict:
    """The config fields prep needs, read by the same `HiggsConfig.from_dict` the trainer uses (so an absent
    field means the same thing on both sides: the model's defaults, e.g. no Whisper tower and 8 codebooks)."""
    from ..config import HiggsConfig
    from ..errors import ConfigError

    try:
        cfg = HiggsConfig.from_dict(config)
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise PrepError(f"config.json of --base_ckpt: {e}") from None
    return {"num_codebooks": int(cfg.audio_num_codebooks), "vocab_size": int(cfg.text.vocab_size),
            "codebook_size": int(cfg.audio_codebook_size),
            "audio_in_token_id": int(cfg.audio_in_token_id),
            "audio_out_token_id": int(cfg.audio_out_token_id),
            "whisper": bool(cfg.uses_whisper_features),
            "columns_per_segment": int(cfg.extra_audio_columns)}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 22), b""):
            h.update(b)
    return h.hexdigest()


def build_jobs(manifest: Path, kind: str, shard_size: int, voice_clone: bool, scene: str | None,
               max_tokens: int | None = None, log=print):
    """Split the manifest into fixed shards of `shard_size` entries. Returns (jobs, n_entries, notes)."""
    notes = []
    jobs = []
    if kind == "jsonl":
        lines, offs, lens = scan_jsonl(manifest)
        n = len(lines)
        for k, a in enumerate(range(0, n, shard_size)):
            b = min(n, a + shard_size)
            jobs.append({"k": k, "name": shard_name(k), "kind": "jsonl", "first": a, "last": b,
                         "lines": lines[a:b].tolist(), "offsets": offs[a:b].tolist(),
                         "lengths": lens[a:b].tolist()})
        return jobs, n, notes
    if kind == "json":
        entries = read_json_array(manifest)
    else:
        usable = None
        if voice_clone:  # references only among clips that will make it (one read of each, before the shards)
            log("prep: --voice_clone: checking every clip, so that references are chosen among usable ones")
            max_seconds = worker_mod.token_limit(max_tokens)[0] / CODE_FRAMES_PER_SECOND
            usable = functools.partial(worker_mod.reference_usable, max_seconds=max_seconds)
        entries, list_notes = read_plain_list(manifest, voice_clone, scene, usable)
        notes += list_notes
    n = len(entries)
    for k, a in enumerate(range(0, n, shard_size)):
        b = min(n, a + shard_size)
        jobs.append({"k": k, "name": shard_name(k), "kind": "objs", "first": a, "last": b,
                     "entries": entries[a:b]})
    return jobs, n, notes


def _clear_shard(out: Path, name: str) -> None:
    for suffix in (".bin", ".bin.tmp", ".json", ".json.tmp", ".errors.jsonl", ".errors.jsonl.tmp"):
        p = out / f"{name}{suffix}"
        if p.exists():
            p.unlink()


@dataclass
class PrepConfig:
    """Everything a prep run depends on (the command-line flags of prep.py)."""

    manifest: str
    out: str
    base_ckpt: str = DEFAULT_BASE
    codec: str = DEFAULT_CODEC
    workers: int = 1
    shard_size: int = 1000
    max_tokens: int | None = None
    strict: bool = False
    voice_clone: bool = False
    device: str | None = None
    scene_prompt: str | None = DEFAULT_SCENE
    overwrite: bool = False
    progress: bool = True


def prepare(cfg: PrepConfig, log=print) -> dict:
    """Run prep as `cfg` says; returns a summary dict. Raises PrepError (or another UserError) on a fatal problem."""
    return run_prep(**{**vars(cfg), "log": log})


def run_prep(manifest, out, base_ckpt: str = DEFAULT_BASE, codec: str = DEFAULT_CODEC, workers: int = 1,
             shard_size: int = 1000, max_tokens: int | None = None, strict: bool = False,
             voice_clone: bool = False, device: str | None = None, scene_prompt: str | None = DEFAULT_SCENE,
             overwrite: bool = False, progress: bool = True,
             log=print) -> dict:
    """Run prep; returns a summary dict. Raises PrepError on a fatal problem (nothing usable, --strict, ...)."""
    import torch

    t0 = time.time()
    manifest = Path(manifest).resolve()
    out = Path(out).resolve()
    if not manifest.is_file():
        raise PrepError(f"{manifest}: manifest not found")
    if shard_size < 1:
        raise PrepError("--shard_size must be >= 1")
    base_dir = resolve_base(base_ckpt)
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    ms = model_settings(config)
    from ..text.tokenizer import TextTokenizer

    tok = TextTokenizer.from_dir(base_dir)
    for name, want in (("<|AUDIO|>", ms["audio_in_token_id"]), ("<|AUDIO_OUT|>", ms["audio_out_token_id"])):
        try:
            got = tok.token_id(name)
        except KeyError:
            raise PrepError(f"{base_dir}: the tokenizer does not define {name} (not a Higgs Audio tokenizer?)") from None
        if got != want:
            raise PrepError(f"{base_dir}: tokenizer maps {name} to {got} but config.json says {want}")
    for name in ("<|audio_bos|>", "<|audio_eos|>", "<|audio_out_bos|>", "<|begin_of_text|>", "<|eot_id|>"):
        try:
            tok.token_id(name)
        except KeyError:
            raise PrepError(f"{base_dir}: the tokenizer does not define {name}") from None
    if not ms["whisper"]:
        log("prep: this checkpoint does not use Whisper features (encode_whisper_embed false or "
            "skip_audio_tower true): none are stored")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    workers = max(1, int(workers))
    kind = manifest_kind(manifest)
    fingerprint = {"format": FORMAT, "version": VERSION, "manifest": str(manifest),
                   "manifest_sha256": file_sha256(manifest), "shard_size": shard_size,
                   "voice_clone": bool(voice_clone) if kind == "plain" else False,
                   "scene_prompt": scene_prompt if kind == "plain" else None, "max_tokens": max_tokens,
                   "tokenizer": tok.fingerprint, "codec": str(codec), **ms}
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "prep_state.json"
    if state_path.exists():
        old = json.loads(state_path.read_text(encoding="utf-8"))
        if old != fingerprint:
            if not overwrite:
                diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
                raise PrepError(f"{out} holds shards prepared with other settings ({', '.join(diff)} differ); "
                                "use a new --out, or --overwrite to delete them")
            for p in out.glob("shard-*"):
                p.unlink()
    atomic_write_json(state_path, fingerprint)
    for p in (out / "index.json", out / "prep_errors.jsonl"):
        if p.exists():
            p.unlink()

    if not max_tokens:
        log(f"prep: no --max_tokens: samples over {worker_mod.DEFAULT_MAX_TOKENS} merged tokens (about "
            f"{worker_mod.DEFAULT_MAX_TOKENS // CODE_FRAMES_PER_SECOND} s of audio) are skipped as too_long, checked "
            "from the file headers before decoding; set --max_tokens to change the limit")
    jobs, n_entries, notes = build_jobs(manifest, kind, shard_size, voice_clone, scene_prompt, max_tokens, log)
    for note in notes:
        log(f"prep: {note}")
    todo, done = [], []
    for j in jobs:
        if shard_complete(out, j["name"]):
            done.append(j)
        else:
            _clear_shard(out, j["name"])
            todo.append(j)
    if done:
        log(f"prep: resuming: {len(done)} of {len(jobs)} shard(s) already finished")
    settings = {"out": str(out), "manifest": str(manifest), "manifest_name": manifest.name,
                "base_dir": str(manifest.parent), "tokenizer_dir": str(base_dir), "codec": codec,
                "device": device, "max_tokens": max_tokens, **ms,
                "codec_batch_clips": 32 if device.startswith("cuda") else 8,
                "threads": max(1, (os.cpu_count() or 1) // workers), "parent_pid": os.getpid()}

    from tqdm import tqdm

    done_entries = sum(j["last"] - j["first"] for j in done)
    bar = tqdm(total=n_entries, initial=done_entries, unit="clip", disable=not progress, dynamic_ncols=True,
               desc="prep")
    stats = {"clips": 0, "seconds": 0.0}
    t_run = time.time()

    def on_progress(clips, seconds):
        stats["clips"] += clips
        stats["seconds"] += seconds
        el = max(time.time() - t_run, 1e-6)
        bar.update(clips)
        bar.set_postfix_str(f"{stats['clips'] / el:.1f} clips/s, {stats['seconds'] / 3600 / el:.5f} audio-h/s",
                            refresh=False)

    results = []
    try:
        if workers == 1 or len(todo) <= 1:
            class _Q:
                def put(self, item):
                    on_progress(*item)

            w = Worker(settings, _Q(), tok)
            for j in todo:
                results.append(w.run(j))
        else:
            # ProcessPoolExecutor, not multiprocessing.Pool: a worker that dies (killed for memory, a crash in
            # native code, a failing initializer) breaks the executor and every pending future raises, where
            # Pool silently replaces the worker and waits forever for the lost shard.
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            ex = ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx, initializer=worker_mod._init_worker,
                                     initargs=(settings, q))
            ok = False

            def drain(timeout: float) -> None:
                """Hand every queued progress message to the bar (waiting up to `timeout` for the next one)."""
                try:
                    while True:
                        on_progress(*q.get(timeout=timeout))
                except queue_mod.Empty:
                    pass

            try:
                pending = {ex.submit(worker_mod._run_job, j) for j in todo}
                while pending:
                    drain(0.2)
                    finished, pending = futures_wait(pending, timeout=0)
                    for f in finished:
                        try:
                            res = f.result()
                        except BrokenProcessPool:
                            raise PrepError("a worker process died (killed for memory, or crashed); finished "
                                            "shards are kept: re-run the same command to resume") from None
                        if "failed" in res:
                            raise PrepError(f"worker failed on {res['name']}: {res['failed']}\n"
                                            f"{res['traceback']}")
                        results.append(res)
                drain(0.05)
                ok = True
            finally:
                if ok:
                    ex.shutdown(wait=True)
                else:  # stop the other workers now (their half-written shards are redone on resume)
                    procs = list((getattr(ex, "_processes", None) or {}).values())
                    ex.shutdown(wait=False, cancel_futures=True)
                    for p in procs:
                        p.terminate()
                    for p in procs:
                        p.join()
    finally:
        bar.close()
    elapsed = time.time() - t_run

    # ---- index, errors, summary
    errors_out, kinds = [], {}
    total_samples, total_seconds = 0, 0.0
    ids_seen: dict[str, list[int]] = {}
    with open(out / "prep_errors.jsonl.tmp", "w", encoding="utf-8") as ef:
        for j in jobs:
            meta = read_shard_meta(out, j["name"])
            total_samples += len(meta["samples"])
            total_seconds += sum(r["duration"] for r in meta["samples"])
            for r in meta["samples"]:
                ids_seen.setdefault(r["id"], []).append(r["line"])
            with open(out / f"{j['name']}.errors.jsonl", encoding="utf-8") as f:
                for row in f:
                    ef.write(row)
                    e = json.loads(row)
                    kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
                    errors_out.append(e)
    os.replace(out / "prep_errors.jsonl.tmp", out / "prep_errors.jsonl")
    n_err = len(errors_out)
    summary = {"samples": total_samples, "skipped": n_err, "skipped_by_kind": kinds, "shards": len(jobs),
               "audio_hours": total_seconds / 3600, "seconds": time.time() - t0, "run_seconds": elapsed,
               "clips_processed": stats["clips"], "audio_seconds_processed": stats["seconds"],
               "out": str(out), "errors_file": str(out / "prep_errors.jsonl")}
    rate = stats["clips"] / elapsed if elapsed > 0 else 0.0
    log(f"prep: {total_samples} sample(s) in {len(jobs)} shard(s), {total_seconds / 3600:.3f} h of audio; "
        f"{n_err} skipped" + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(kinds.items()))})" if kinds else "")
        + f"; this run {stats['clips']} entries in {elapsed:.1f} s ({rate:.1f} clips/s, "
        f"{stats['seconds'] / 3600 / max(elapsed, 1e-9) * 3600:.1f} audio-hours/hour)")
    if n_err:
        log(f"prep: skipped entries are listed in {out / 'prep_errors.jsonl'}")
        for e in errors_out[:10]:
            log(f"  {Path(e['manifest']).name}:{e['line']}: {e['reason']}")
        if n_err > 10:
            log(f"  ... and {n_err - 10} more")
    dups = {k: v for k, v in ids_seen.items() if len(v) > 1}
    if dups:
        shown = "; ".join(f"{k!r} (lines {', '.join(map(str, v))})" for k, v in list(dups.items())[:5])
        log(f"prep: warning: {len(dups)} sample id(s) used more than once in {manifest.name}: {shown}"
            + (f"; ... and {len(dups) - 5} more" if len(dups) > 5 else "")
            + ". The train/val split hashes ids: samples sharing an id always land on the same side; give each "
              "sample its own \"id\"")
    if total_samples == 0:
        raise PrepError(f"{manifest}: nothing usable: every entry ({n_entries}) was skipped (the reasons are in "
                        f"{out / 'prep_errors.jsonl'})")
    if strict and n_err:
        raise PrepError(f"--strict: {n_err} entr{'y was' if n_err == 1 else 'ies were'} skipped "
                        f"(see {out / 'prep_errors.jsonl'}); no index.json written")
    write_index(out, [j["name"] for j in jobs],
                {**ms, "mel_bins": mel.N_MELS, "tokenizer": tok.fingerprint, "base_ckpt": str(base_ckpt),
                 "base_revision": resolved_revision(base_dir), "codec": str(codec), "manifest": str(manifest)})
    return summary
