"""train.py under faults: signals anywhere in a run (real signals, subprocesses), DataLoader workers that must
never hang an exit, torchrun's double delivery, bad inputs refused up front in one line, updates that break the
weights, stale temporaries, shards the model cannot embed.

This file is also a runner: `python tests/test_train_faults.py --inject WHAT -- TRAIN_ARGS...` runs train.py's
`main` with a real signal sent to itself at a chosen point of the run (see `inject`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # the runner: make the repo and tests/ importable
    sys.path[:0] = [str(REPO), str(REPO / "tests")]

TIMEOUT = 120  # a hang shows up as a timeout, not a stuck test run


def inject(what: str) -> None:
    """Arrange for a real signal at one point of the run, sent by the process to itself (deterministic timing):
    `setup` SIGTERM while the model loads; `val0` SIGTERM during the step-0 validation; `final_val` SIGTERM
    during the final validation; `repeat_sigterm` SIGTERM in the 3rd training forward and again after the grace
    period; `abort` the same with SIGINT (a deliberate second Ctrl-C). `slow_steps` sends nothing: training
    forwards after the 2nd take half a second more (signals from outside then surely meet a running step)."""
    from minihiggs.model.higgs import HiggsAudioModel
    from minihiggs.train import recipe
    from minihiggs.train.signals import GRACE_S

    if what == "full_disk":  # the disk fills up 64 bytes into the second checkpoint's trainer_state.pt
        import builtins
        import errno
        import io

        real_open, opened = builtins.open, []

        class FullDisk(io.RawIOBase):
            def __init__(self, f):
                self.f, self.n = f, 0

            def writable(self):
                return True

            def write(self, b):
                if self.n + len(b) > 64:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                self.n += len(b)
                return self.f.write(b)

            def close(self):
                self.f.close()
                super().close()

        def open_(file, mode="r", *a, **k):
            f = real_open(file, mode, *a, **k)
            if str(file).endswith("trainer_state.pt") and "w" in mode:
                opened.append(file)
                return FullDisk(f) if len(opened) == 2 else f
            return f

        builtins.open = open_
        return
    if what.startswith(("samples_", "scoring_")):  # samples_SIGTERM_2: that signal at the 2nd sample generation;
        # scoring_SIGTERM_2: in the 2nd transcription of the samples
        if what.startswith("samples_"):
            from minihiggs.generate.engine import Engine as owner
            name = "generate"
        else:
            from minihiggs.eval.asr import Transcriber as owner
            name = "transcribe"
        _, sig, nth = what.split("_")
        real, calls = getattr(owner, name), []

        def signalling(self, *a, **k):
            calls.append(1)
            if len(calls) == int(nth):
                os.kill(os.getpid(), getattr(signal, sig))
                time.sleep(0.5)  # (the handler runs here)
            return real(self, *a, **k)

        setattr(owner, name, signalling)
        return
    if what == "slow_save":  # each checkpoint takes 3 s more: a signal surely arrives while it is written
        real_save = recipe.ckpt_io.save_checkpoint

        def save_checkpoint(*a, **k):
            print("writing a checkpoint", flush=True)
            time.sleep(3.0)
            return real_save(*a, **k)

        recipe.ckpt_io.save_checkpoint = save_checkpoint
        what = "slow_steps"
    if what == "setup":
        real_load = recipe.load_model

        def load_model(*a, **k):
            os.kill(os.getpid(), signal.SIGTERM)
            return real_load(*a, **k)

        recipe.load_model = load_model
        return
    orig = HiggsAudioModel.forward
    calls = {"train": 0, "eval": 0}

    def forward(self, batch):
        kind = "train" if self.training else "eval"
        calls[kind] += 1
        if what in ("val0", "final_val") and kind == "eval" and calls["eval"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        if what == "slow_steps" and kind == "train" and calls["train"] > 2:
            time.sleep(0.5)
        if what in ("repeat_sigterm", "abort") and kind == "train" and calls["train"] == 3:
            sig = signal.SIGINT if what == "abort" else signal.SIGTERM
            os.kill(os.getpid(), sig)
            time.sleep(GRACE_S + 0.5)  # a long step: the second signal comes well after the grace period
            os.kill(os.getpid(), sig)
        return orig(self, batch)

    HiggsAudioModel.forward = forward


def run_injected(what: str, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), "--inject", what, "--", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=TIMEOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})


if __name__ != "__main__":
    import errno
    import json
    import shutil

    import pytest
    import torch

    import train
    from helpers import adapter, make_shards, train_args
    from minihiggs.data.dataset import ShardDataset
    from minihiggs.errors import ShardError
    from minihiggs.lora.adapter import ADAPTER_WEIGHTS
    from minihiggs.metrics.jsonl import read_metrics
    from minihiggs.train import checkpointing as ckpt_io
    from minihiggs.train import recipe as recipe_mod
    from synth import synth_samples

    pytestmark = pytest.mark.usefixtures("one_thread")
    FAST = dict(max_steps=6, val_steps=0, save_steps=0)

    def one_error_line(stderr: str) -> str:
        """The last stderr line, checked to be the one `train.py: error:` line (no traceback anywhere)."""
        assert "Traceback" not in stderr, stderr[-3000:]
        lines = [ln for ln in stderr.splitlines() if ln.startswith("train.py:")]
        assert len(lines) == 1, stderr[-3000:]
        return lines[0]

    # -------------------------------------------------------------------------------------- loader workers

    def corrupt(shards: Path, tmp: Path) -> Path:
        bad = tmp / "bad_shards"
        shutil.copytree(shards, bad)
        b = bytearray((bad / "shard-00001.bin").read_bytes())
        b[100] ^= 0xFF  # a flipped bit in a sample of the second shard
        (bad / "shard-00001.bin").write_bytes(bytes(b))
        return bad

    def test_corrupt_shard_with_a_worker_exits_with_one_line(shards, tiny_ckpt, tmp_path):
        """Was: the worker's traceback inside the message, then a hang forever in the exit-time join of a
        worker that ignored SIGTERM."""
        bad = corrupt(shards, tmp_path)
        args = train_args(bad, tiny_ckpt, tmp_path / "run", num_workers=1, max_steps=40, val_steps=0, save_steps=0)
        try:
            r = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True,
                               timeout=TIMEOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        except subprocess.TimeoutExpired:
            pytest.fail("train.py hung after a DataLoader worker raised")
        assert r.returncode == 2, r.stderr[-3000:]
        line = one_error_line(r.stderr)
        assert line.startswith("train.py: error: ") and "shard-00001.bin" in line and "CRC-32" in line
        assert "DataLoader worker" not in r.stderr

    LEFT_OPEN = r"""
import sys
sys.path[:0] = sys.argv[1:3]
from minihiggs.config import HiggsConfig
from minihiggs.data.dataset import BucketBatchSampler, ShardDataset
from minihiggs.train.data import LoaderBatches, train_loader
ds = ShardDataset(sys.argv[3])
loader = train_loader(ds, BucketBatchSampler(ds.lengths, range(len(ds)), batch_size=2),
                      HiggsConfig.from_file(sys.argv[4]), 1, False)
batches = LoaderBatches(loader)
next(batches)
raise RuntimeError("a crash with the pass still open")
"""

    @pytest.mark.parametrize("private", ["with", "without"])
    def test_loader_workers_ignore_outside_signals_and_never_hang_an_exit(private, shards, tiny_ckpt, monkeypatch):
        """A worker ignores SIGTERM / SIGINT from outside (a scheduler or Ctrl-C signalling the process group),
        so the main process stops it: on close, and at exit for a pass left open (was: Python's exit-time
        terminate() was ignored too, and its join() waited forever). `without`: a torch without the private
        `_shutdown_workers` (the orderly shutdown): close still stops the worker."""
        if private == "without":
            from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

            monkeypatch.delattr(_MultiProcessingDataLoaderIter, "_shutdown_workers")
            monkeypatch.setattr(_MultiProcessingDataLoaderIter, "__del__", lambda self: None)  # (it calls it)
        from minihiggs.config import HiggsConfig
        from minihiggs.data.dataset import BucketBatchSampler
        from minihiggs.train.data import LoaderBatches, train_loader

        ds = ShardDataset(shards)
        sampler = BucketBatchSampler(ds.lengths, range(len(ds)), batch_size=2)
        loader = train_loader(ds, sampler, HiggsConfig.from_file(Path(tiny_ckpt) / "config.json"), 1, False)
        batches = LoaderBatches(loader)
        try:
            next(batches)
            (worker,) = batches.workers
            for sig in ("TERM", "INT"):  # from another process, as a scheduler's or a terminal's would be
                subprocess.run(["kill", f"-{sig}", str(worker.pid)], check=True)
            time.sleep(0.3)
            next(batches)
            assert worker.is_alive()
        finally:
            batches.close()
        assert not worker.is_alive()
        if private == "without":
            return
        try:
            r = subprocess.run([sys.executable, "-c", LEFT_OPEN, str(REPO), str(REPO / "tests"), str(shards),
                                str(Path(tiny_ckpt) / "config.json")], capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the interpreter's exit waited forever for a DataLoader worker")
        assert r.returncode == 1 and "a crash with the pass still open" in r.stderr

    # ---------------------------------------------------------------------------------------- the signal rule

    RULE_SCRIPT = r"""
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
from minihiggs.train.signals import Interrupted, StopRequest

def send(sig, wait=0.05):
    os.kill(os.getpid(), sig)
    time.sleep(wait)

stop = StopRequest(grace_s=0.5).install()  # setup: not deferred
try:
    send(signal.SIGTERM)
    print("setup: not stopped")
except Interrupted as e:
    print("setup", e.signal_name, e.abort)
stop = StopRequest(grace_s=0.5).install()
stop.defer()
send(signal.SIGTERM, 0.8)  # a stop request
send(signal.SIGTERM, 0.8)  # a copy (torchrun's, forwarded), well after the grace period: the same request
send(signal.SIGTERM)       # and another
print("repeats", stop.signal)
stop = StopRequest(grace_s=0.5).install()
stop.defer()
send(signal.SIGINT)        # Ctrl-C reaching the whole process group ...
send(signal.SIGINT)        # ... and torchrun's copy of it 50 ms later: no abort
print("duplicate ctrl-c", stop.signal)
try:
    time.sleep(0.6)
    send(signal.SIGINT)    # a deliberate second Ctrl-C, after the grace period
    print("not aborted")
except Interrupted as e:
    print("abort", e.signal_name, e.abort)
"""

    def test_stop_rule_with_real_signals():
        """Setup: the first signal stops at once (nothing to save). Loop: repeated SIGTERMs at any distance are
        one request; a SIGINT within the grace period too; a SIGINT after it aborts."""
        script = RULE_SCRIPT
        r = subprocess.run([sys.executable, "-c", script, str(REPO)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == ["setup SIGTERM False", "repeats SIGTERM", "duplicate ctrl-c SIGINT",
                                         "abort SIGINT True"], r.stdout + r.stderr
        assert r.stderr.count("received again: already stopping") == 2  # said once per stop request

    @pytest.mark.parametrize("where", ["setup", "val0", "final_val"])
    def test_signal_outside_the_loop_is_honoured(where, shards, tiny_ckpt, tmp_path):
        """Was: the handler was installed only after the step-0 validation and removed before the final one,
        the end checkpoint and final/: SIGTERM there killed the run (-15), with no message and no checkpoint."""
        out = tmp_path / "run"
        opts = dict(max_steps=4, save_steps=0, log_steps=1, val_steps=0 if where == "final_val" else 2)
        r = run_injected(where, train_args(shards, tiny_ckpt, out, **opts))
        assert r.returncode == 0, r.stderr[-3000:]
        if where == "setup":
            assert one_error_line(r.stderr) == "train.py: stopped by SIGTERM during setup: nothing trained, " \
                                               "nothing to save"
            assert not ckpt_io.list_checkpoints(out)
            return
        if where == "val0":  # interrupted before any step: nothing to save, the same command starts afresh
            assert "before the first step: nothing to save" in r.stdout
            assert not ckpt_io.list_checkpoints(out)
            return
        # the final validation: the end checkpoint is written; the resumed run validates and writes final/
        assert [s for s, _ in ckpt_io.list_checkpoints(out)] == [4] and not (out / "final").exists()
        assert "validation interrupted by SIGTERM" in r.stdout and "stopped by SIGTERM at step 4" in r.stdout
        assert train.main(train_args(shards, tiny_ckpt, out, **opts) + ["--resume", "latest"]) == 0
        ref = tmp_path / "ref"
        assert train.main(train_args(shards, tiny_ckpt, ref, **opts)) == 0
        a, b = adapter(ref / "final"), adapter(out / "final")
        assert all(torch.equal(a[k], b[k]) for k in a)
        vals = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r.get("split") == "val"]
        assert vals == [r["loss"] for r in read_metrics(ref / "metrics.jsonl") if r.get("split") == "val"]

    def test_repeated_sigterm_never_aborts(shards, tiny_ckpt, tmp_path):
        """A second SIGTERM long after the first (a scheduler's copy, then torchrun's) is the same request: the
        step finishes and a checkpoint is written. (Was: 'second signal: abort', the steps lost.)"""
        out = tmp_path / "run"
        r = run_injected("repeat_sigterm", train_args(shards, tiny_ckpt, out, max_steps=20, save_steps=0,
                                                      val_steps=0, grad_accum=1, num_workers=1))
        assert r.returncode == 0, r.stderr[-3000:]
        assert "already stopping" in r.stderr and "stopped by SIGTERM at step 3" in r.stdout
        assert [s for s, _ in ckpt_io.list_checkpoints(out)] == [3]

    def test_late_second_ctrl_c_aborts_without_hanging(shards, tiny_ckpt, tmp_path):
        """A deliberate second Ctrl-C aborts at once, exit 130, one line, with a DataLoader worker running.
        (Was: 'aborting without a checkpoint', then a hang in the exit-time join of the worker.)"""
        out = tmp_path / "run"
        try:
            r = run_injected("abort", train_args(shards, tiny_ckpt, out, max_steps=20, save_steps=0, val_steps=0,
                                                 grad_accum=1, num_workers=1))
        except subprocess.TimeoutExpired:
            pytest.fail("train.py hung after an abort with a DataLoader worker")
        assert r.returncode == 130, r.stderr[-3000:]
        assert one_error_line(r.stderr).startswith("train.py: aborted by a second SIGINT: no checkpoint written")
        assert not ckpt_io.list_checkpoints(out)

    # ------------------------------------------------------------------------------ torchrun: double delivery

    def rank_pids(launcher: int) -> list[int]:
        """The children of the torchrun process (the ranks), from /proc."""
        kids = []
        for task in Path(f"/proc/{launcher}/task").iterdir():
            kids += [int(x) for x in (task / "children").read_text().split()]
        return kids

    @pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the rank pids through /proc (Linux)")
    def test_torchrun_double_delivery_saves_and_exits_0(shards, tiny_ckpt, tmp_path):
        """SIGTERM to every rank (as a scheduler sends it), then to torchrun, which forwards its own copy to every
        rank: the ranks finish the step, save one checkpoint and exit 0. (Was: the forwarded copy counted as the
        'second signal: abort', every rank aborted without a checkpoint.) torchrun itself then exits 1 with a
        SignalException traceback, whatever its ranks did: the README says so."""
        out = tmp_path / "run"
        args = train_args(shards, tiny_ckpt, out, max_steps=100000, save_steps=0, val_steps=0, log_steps=1,
                          grad_accum=1)
        p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              str(Path(__file__).resolve()), "--inject", "slow_steps", "--", *args], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
        try:
            metrics = out / "metrics.jsonl"
            deadline = time.time() + TIMEOUT
            while time.time() < deadline and p.poll() is None:
                if metrics.is_file() and sum(r.get("split") == "train" for r in read_metrics(metrics)) >= 2:
                    break
                time.sleep(0.1)
            ranks = rank_pids(p.pid)
            assert len(ranks) == 2 and p.poll() is None
            for pid in ranks:
                os.kill(pid, signal.SIGTERM)
            os.kill(p.pid, signal.SIGTERM)  # torchrun forwards SIGTERM to every rank
            stdout, stderr = p.communicate(timeout=TIMEOUT)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        assert "aborted" not in stderr and "aborting" not in stderr, stderr[-3000:]
        # Both ranks took the stop; the forwarded copy either printed "already stopping" or merged with the first
        # (the kernel does not queue a signal that is still pending, e.g. while a rank waits in a collective).
        assert stderr.count("SIGTERM received: finishing") == 2
        ckpts = ckpt_io.list_checkpoints(out)
        assert len(ckpts) == 1, stdout[-2000:] + stderr[-3000:]
        step = ckpts[0][0]
        assert f"stopped by SIGTERM at step {step}; continue with --resume latest" in stdout
        assert read_metrics(metrics)[-1]["event"] == "interrupted"
        assert ckpt_io.load_trainer_state(ckpts[0][1])["world_size"] == 2

    @pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the rank pids through /proc (Linux)")
    def test_torchrun_copy_during_the_checkpoint_meets_the_stop_handler(shards, tiny_ckpt, tmp_path):
        """The scheduler's SIGTERM reaches the ranks; torchrun's forwarded copy comes later, while the ranks write
        their checkpoint (3 s each here), and a third copy reaches them after it, as they exit. Every copy must
        meet the stop handler: one checkpoint, and no rank killed by a default handler."""
        out = tmp_path / "run"
        args = train_args(shards, tiny_ckpt, out, max_steps=100000, save_steps=0, val_steps=0, log_steps=1,
                          grad_accum=1)
        p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              str(Path(__file__).resolve()), "--inject", "slow_save", "--", *args], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
        try:
            metrics = out / "metrics.jsonl"
            deadline = time.time() + TIMEOUT
            while time.time() < deadline and p.poll() is None:
                if metrics.is_file() and sum(r.get("split") == "train" for r in read_metrics(metrics)) >= 2:
                    break
                time.sleep(0.1)
            ranks = rank_pids(p.pid)
            assert len(ranks) == 2 and p.poll() is None
            for pid in ranks:
                os.kill(pid, signal.SIGTERM)
            time.sleep(2.0)  # the step (0.5 s) is done; the checkpoint (3 s) is being written
            os.kill(p.pid, signal.SIGTERM)  # torchrun forwards its copy to every rank
            stdout, stderr = p.communicate(timeout=TIMEOUT)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        assert "exitcode  : -15" not in stderr and "Signal 15" not in stderr, stderr[-3000:]
        assert stderr.count("SIGTERM received again: already stopping") == 2, stderr[-3000:]
        ckpts = ckpt_io.list_checkpoints(out)
        assert len(ckpts) == 1, stdout[-2000:] + stderr[-3000:]
        assert f"stopped by SIGTERM at step {ckpts[0][0]}; continue with --resume latest" in stdout

    def test_full_disk_while_writing_trainer_state_is_one_line(shards, tiny_ckpt, tmp_path):
        """The disk fills up inside torch.save of trainer_state.pt (simulated: its writes fail with ENOSPC after 64
        bytes, as a full disk's do). Was: a 55-line traceback ending in torch's 'RuntimeError: [enforce fail at
        inline_container.cc] unexpected pos', exit 1. Now one line naming the file, the last good checkpoint
        intact, nothing half-written left, and the run resumes from it."""
        out = tmp_path / "run"
        opts = dict(max_steps=4, save_steps=2, val_steps=0)
        r = run_injected("full_disk", train_args(shards, tiny_ckpt, out, **opts))
        assert r.returncode == 2, r.stderr[-3000:]
        assert one_error_line(r.stderr) == (
            f"train.py: error: {out / 'checkpoints' / 'step-00000004' / 'trainer_state.pt'}: cannot write (No space "
            f"left on device) (free disk space or fix the directory, then continue with --resume latest)")
        assert [s for s, _ in ckpt_io.list_checkpoints(out)] == [2]
        assert not [p for p in (out / "checkpoints").iterdir() if ".tmp-" in p.name]
        assert ckpt_io.load_trainer_state(ckpt_io.latest_checkpoint(out))["step"] == 2
        assert train.main(train_args(shards, tiny_ckpt, out, **opts) + ["--resume", "latest"]) == 0
        assert [s for s, _ in ckpt_io.list_checkpoints(out)] == [2, 4]

    # -------------------------------------------------------------------------- bad inputs: one line, up front

    def forbid_model_load(monkeypatch) -> None:
        """From now on a model load fails the test: the inputs must be refused before it."""
        def refuse(*a, **k):
            raise AssertionError("the model was loaded before the inputs were checked")

        monkeypatch.setattr(recipe_mod, "load_model", refuse)

    @pytest.fixture()
    def no_model_load(monkeypatch):
        forbid_model_load(monkeypatch)

    def broken_config(tiny_ckpt: Path, tmp: Path, edit) -> Path:
        d = tmp / "ckpt"
        shutil.copytree(tiny_ckpt, d)
        cfg = json.loads((d / "config.json").read_text())
        edit(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
        return d

    @pytest.mark.parametrize("edit,expect", [
        (lambda c: c["text_config"].pop("hidden_size"), "missing field 'text_config.hidden_size'"),
        (lambda c: c["text_config"].update(num_attention_heads="four"),
         "text_config.num_attention_heads='four' must be an integer"),
        (lambda c: c["text_config"].update(rope_scaling={"rope_type": "llama3", "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 8192}),
         "missing field 'text_config.rope_scaling.factor'"),
        (lambda c: c.pop("audio_in_token_idx"), "missing field 'audio_in_token_idx'"),
    ], ids=["missing", "mistyped", "rope_without_factor", "missing_top_level"])
    def test_config_json_errors_name_the_field(edit, expect, shards, tiny_ckpt, tmp_path, capsys, no_model_load):
        """Was: KeyError / ValueError tracebacks (raised while the model was built)."""
        ckpt = broken_config(tiny_ckpt, tmp_path, edit)
        assert train.main(train_args(shards, ckpt, tmp_path / "run", **FAST)) == 2
        assert one_error_line(capsys.readouterr().err).startswith(f"train.py: error: {ckpt / 'config.json'}: {expect}")

    def checkpointed_run(shards, tiny_ckpt, out: Path) -> list[Path]:
        assert train.main(train_args(shards, tiny_ckpt, out, max_steps=6, save_steps=2, val_steps=0)) == 0
        return [d for _, d in ckpt_io.list_checkpoints(out)]

    def test_truncated_trainer_state_names_the_intact_checkpoint(shards, tiny_ckpt, tmp_path, capsys, monkeypatch):
        """Was: an OSError traceback from torch.load, no hint that an older checkpoint is intact."""
        out = tmp_path / "run"
        c2, c4, c6 = checkpointed_run(shards, tiny_ckpt, out)
        forbid_model_load(monkeypatch)
        state = c6 / ckpt_io.STATE_FILE
        state.write_bytes(state.read_bytes()[:len(state.read_bytes()) // 2])
        capsys.readouterr()
        argv = train_args(shards, tiny_ckpt, out, max_steps=8, save_steps=2, val_steps=0)
        assert train.main(argv + ["--resume", "latest"]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert line.startswith(f"train.py: error: {state}: unreadable (") and line.endswith(f"--resume {c4})")
        # the adapter of the middle one damaged too: the hint goes further back
        (c4 / ADAPTER_WEIGHTS).write_bytes(b"garbage, not safetensors")
        assert train.main(argv + ["--resume", "latest"]) == 2
        assert one_error_line(capsys.readouterr().err).endswith(f"--resume {c2})")

    def test_garbage_adapter_refused_before_the_model_loads(shards, tiny_ckpt, tmp_path, capsys, monkeypatch):
        """Was: refused only after the model had loaded (minutes for the 3B model)."""
        out = tmp_path / "run"
        *_, last = checkpointed_run(shards, tiny_ckpt, out)
        forbid_model_load(monkeypatch)
        (last / ADAPTER_WEIGHTS).write_bytes(os.urandom(300))
        capsys.readouterr()
        assert train.main(train_args(shards, tiny_ckpt, out, max_steps=8, save_steps=2, val_steps=0)
                          + ["--resume", str(last)]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"{last / ADAPTER_WEIGHTS}: unreadable" in line and "--resume" in line

    def test_unusable_output_dir(shards, tiny_ckpt, tmp_path, capsys, monkeypatch, no_model_load):
        a_file = tmp_path / "a_file"
        a_file.write_text("x")
        for out, expect in ((a_file, "exists and is not a directory"),
                            (a_file / "run", "a part of the path is a file, not a directory")):
            assert train.main(train_args(shards, tiny_ckpt, out, **FAST)) == 2
            assert one_error_line(capsys.readouterr().err) == \
                f"train.py: error: --output_dir {out}: {expect} (choose another --output_dir)"
        # a read-only file system (simulated: the test runs as root, and creating a read-only mount needs more)
        real = Path.write_bytes

        def read_only(self, data):
            if self.name.startswith(".write-probe-"):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
            return real(self, data)

        monkeypatch.setattr(Path, "write_bytes", read_only)
        out = tmp_path / "ro"
        assert train.main(train_args(shards, tiny_ckpt, out, **FAST)) == 2
        assert one_error_line(capsys.readouterr().err) == (f"train.py: error: --output_dir {out}: not writable "
                                                           f"(Read-only file system) (choose a writable --output_dir)")

    def test_full_disk_while_writing_best_is_one_line(shards, tiny_ckpt, tmp_path, capsys, monkeypatch):
        """Was: a 44-line error. Now the path and what to do; nothing half-written is left behind."""
        from minihiggs import fsio

        real = fsio.fsync_tree

        def full(d):  # the disk fills up while best/ is written (ext4 and others report it at fsync)
            if Path(d).name.startswith(".best.tmp-"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # (no file name, as from write/fsync)
            return real(d)

        monkeypatch.setattr(fsio, "fsync_tree", full)
        out = tmp_path / "run"
        assert train.main(train_args(shards, tiny_ckpt, out, max_steps=4, val_steps=2, save_steps=0)) == 2
        assert one_error_line(capsys.readouterr().err) == (
            f"train.py: error: {out / 'best'}: cannot write (No space left on device) (free disk space or fix the "
            f"directory, then continue with --resume latest)")
        assert not [p for p in out.iterdir() if ".tmp-" in p.name]

    def test_stale_temporaries_of_every_kind_are_removed(shards, tiny_ckpt, tmp_path):
        """kill -9 during any write leaves a `.tmp-` name; the next start removes them all."""
        out = tmp_path / "run"
        checkpointed_run(shards, tiny_ckpt, out)  # (best/ and final/ too)
        stale = [out / ".best.tmp-abc123", out / ".final.tmp-abc123", out / ".best.old.tmp-abc123",
                 out / "checkpoints" / ".tmp-step-00000008-abc123", out / "checkpoints" / "..tmp-step-00000008-x",
                 out / "checkpoints" / ".step-00000002.del.tmp-abc123"]
        for d in stale:
            d.mkdir()
            (d / ADAPTER_WEIGHTS).write_bytes(b"partial")
        files = [out / "metrics.jsonl.tmp-abc123", out / "loss.png.tmp-abc123", out / "best" / "best.json.tmp-ab",
                 out / "final" / "final.json.tmp-ab", out / "best" / f"{ADAPTER_WEIGHTS}.tmp-ab"]
        for f in files:
            f.write_bytes(b"partial")
        assert train.main(train_args(shards, tiny_ckpt, out, max_steps=8, save_steps=2, val_steps=0)
                          + ["--resume", "latest"]) == 0
        assert not [p for p in stale + files if p.exists()]
        assert [s for s, _ in ckpt_io.list_checkpoints(out)] == [4, 6, 8]

    # ------------------------------------------------------------------------- updates that break the weights

    def test_update_that_breaks_the_weights_is_rejected(shards, tiny_ckpt, tmp_path):
        """An absurd --lr: the loss and the gradient norm are finite, the update itself makes the LoRA weights
        non-finite or so large that their norm overflows (here ~1e20). Was: accepted and saved as a checkpoint (the
        next forward overflowed). Now: rejected, weights and optimizer state as before it."""
        out = tmp_path / "run"
        assert train.main(train_args(shards, tiny_ckpt, out, lr=1e20, max_steps=3, save_steps=1, val_steps=0,
                                     log_steps=1)) == 0
        bad = [r for r in read_metrics(out / "metrics.jsonl") if r.get("event") == "nonfinite"]
        assert [r["step"] for r in bad] == [1, 2, 3]
        assert all(r["weights_finite"] is False and r["loss"] != "nan" for r in bad)
        init = tmp_path / "init"  # lr 0: the adapter as initialised
        assert train.main(train_args(shards, tiny_ckpt, init, lr=0.0, max_steps=1, save_steps=0, val_steps=0)) == 0
        a = adapter(init / "final")
        for d in [d for _, d in ckpt_io.list_checkpoints(out)] + [out / "final"]:
            b = adapter(d)
            assert all(torch.equal(a[k], b[k]) for k in a), d
        state = ckpt_io.load_trainer_state(ckpt_io.latest_checkpoint(out))
        assert state["optimizer"]["state"] == {}  # no update was ever accepted: no moments, no step count

    def test_guard_restores_weights_and_optimizer_state_exactly():
        from minihiggs.train.guard import UpdateGuard

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        guard = UpdateGuard(opt)

        def step(lr):
            opt.param_groups[0]["lr"] = lr
            model(torch.randn(5, 4)).square().sum().backward()
            guard.snapshot()
            opt.step()
            ok = bool(guard.weights_finite())
            if not ok:
                guard.restore()
            opt.zero_grad()
            return ok

        assert not step(1e20) and opt.state_dict()["state"] == {}  # a rejected first step: no state at all
        assert step(1e-2) and step(1e-2)
        before = ({k: v.clone() for k, v in model.state_dict().items()},
                  {i: {k: v.clone() for k, v in s.items()} for i, s in opt.state_dict()["state"].items()})
        with torch.no_grad():
            model[0].weight[0, 0] = float("nan")  # a NaN weight must be caught too (not only a large norm)
            assert not bool(guard.weights_finite())
            model[0].weight[0, 0] = before[0]["0.weight"][0, 0]
        assert not step(1e20)
        assert all(torch.equal(v, before[0][k]) for k, v in model.state_dict().items())
        after = opt.state_dict()["state"]
        assert after.keys() == before[1].keys()
        assert all(torch.equal(after[i][k], v) for i, s in before[1].items() for k, v in s.items())

    # ------------------------------------------------------------------------------- ids the model can't embed

    def test_shards_with_ids_outside_the_vocabulary_are_refused(tiny_ckpt, tmp_path, capsys, no_model_load):
        """Was: IndexError mid-run (a device-side assert on CUDA). Now refused before training starts, also for
        shards of an older prep that did not record their largest id."""
        samples = synth_samples(12, seed=3)
        samples[7].input_ids[3] = 128256  # e.g. <|image|> of the Llama-3 tokenizer: vocab_size is 128256
        data = make_shards(tmp_path / "data", samples, per_shard=4)
        with pytest.raises(ShardError, match="shard-00001.bin: holds token id 128256"):
            ShardDataset(data, vocab_size=128256)
        assert ShardDataset(data, vocab_size=128257).max_token_ids()[1] == 128256
        for p in data.glob("shard-*.json"):  # an older shard: no max_token_id recorded (the reader scans)
            meta = json.loads(p.read_text())
            meta.pop("max_token_id")
            p.write_text(json.dumps(meta))
        for p in data.glob("index.json"):
            idx = json.loads(p.read_text())
            for e in idx["shards"]:
                e.pop("meta_sha256")
            p.write_text(json.dumps(idx))
        ds = ShardDataset(data)
        assert ds.max_token_ids()[1] == 128256 and max(ds.max_token_ids()[::2]) < 128256
        assert train.main(train_args(data, tiny_ckpt, tmp_path / "run", val_fraction=0.0, **FAST)) == 2
        assert "shard-00001.bin: holds token id 128256, outside the model's vocabulary (vocab_size 128256)" in \
            one_error_line(capsys.readouterr().err)


if __name__ == "__main__" and "--inject" in sys.argv:
    i = sys.argv.index("--inject")
    inject(sys.argv[i + 1])
    import train as train_cmd
    from minihiggs.train.signals import StopRequest

    code = train_cmd.main(sys.argv[sys.argv.index("--") + 1:], stop=StopRequest().install())  # (as train.py)
    if os.environ.get("WORLD_SIZE", "1") != "1":  # as train.py does under torchrun (skips a flaky gloo teardown)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
    sys.exit(code)
