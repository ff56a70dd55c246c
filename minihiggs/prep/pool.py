"""Shard jobs on a pool of spawned worker processes (`prep.py --workers N`): a dead worker fails the run instead of
hanging it, and no worker outlives prep."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import wait as futures_wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from ..errors import PrepError, UserError
from .settings import WorkerSettings
from .worker import ShardJob, ShardResult, Worker

_W: Worker | None = None  # this pool process's worker


def _init_worker(settings: WorkerSettings, q) -> None:
    global _W
    import torch

    die_with_parent(settings.parent_pid)
    torch.set_num_threads(max(1, settings.threads))
    _W = Worker(settings, q)


def die_with_parent(parent: int | None) -> None:
    """A pool worker must not outlive prep: killed with -9, the parent cannot stop it, and it would keep its
    memory (and GPU memory) and go on writing shards. Linux: the kernel sends SIGKILL when the parent dies
    (PR_SET_PDEATHSIG); everywhere: a thread notices the parent pid change within a second (also covers a parent
    that died before the prctl, and a kernel that sends the death signal when the *thread* that forked exits)."""
    import threading
    import time

    if parent is None:
        return
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, name="minihiggs-parent-watch", daemon=True).start()


@dataclass
class JobFailure:
    """An exception of a pool worker, as text: a class defined in a spawned __mp_main__ may not unpickle in the
    parent."""

    name: str
    error: str
    traceback: str
    user_error: bool  # a UserError (its message is the whole story), not a bug


def _run_job(job: ShardJob) -> ShardResult | JobFailure:
    try:
        return _W.run(job)
    except Exception as e:
        import traceback

        if isinstance(e, UserError):
            return JobFailure(job.name, str(e), "", True)
        return JobFailure(job.name, f"{type(e).__name__}: {e}", traceback.format_exc(), False)


def run_pool(todo: list[ShardJob], settings: WorkerSettings, workers: int, progress) -> None:
    """The jobs on a pool of spawned worker processes. ProcessPoolExecutor, not multiprocessing.Pool: a worker that
    dies (killed for memory, a crash in native code, a failing initializer) breaks the executor and every pending
    future raises, where Pool silently replaces the worker and waits forever for the lost shard. `progress.put`
    receives the workers' reports."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ex = ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx, initializer=_init_worker,
                             initargs=(settings, q))

    def drain(timeout: float) -> None:
        """Hand every queued progress message to the bar (waiting up to `timeout` for the next one)."""
        try:
            while True:
                progress.put(q.get(timeout=timeout))
        except queue_mod.Empty:
            pass

    ok = False
    try:
        pending = {ex.submit(_run_job, j) for j in todo}
        while pending:
            drain(0.2)
            finished, pending = futures_wait(pending, timeout=0)
            for f in finished:
                try:
                    res = f.result()
                except BrokenProcessPool:
                    raise PrepError("a worker process died (killed for memory, or crashed); finished "
                                    "shards are kept: re-run the same command to resume") from None
                if isinstance(res, JobFailure) and res.user_error:
                    raise PrepError(res.error)
                if isinstance(res, JobFailure):  # a bug: its traceback from the worker
                    raise RuntimeError(f"prep worker failed on {res.name}: {res.error}\n{res.traceback}")
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
