"""The metric logger's sinks: TensorBoard event files read back with TensorBoard's own readers (its event loader and
EventAccumulator; tensorboard is a dev requirement), Weights & Biases in offline mode (extras), `--report_to`
parsing, the scalars the sinks show, and the matplotlib loss plot (extras)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from helpers import event_files, hide_package, read_events, wandb_history
from minihiggs.errors import TrainConfigError
from minihiggs.metrics.jsonl import read_metrics
from minihiggs.metrics.logger import make_logger, parse_report_to
from minihiggs.metrics.scalars import scalars
from minihiggs.metrics.tensorboard import TensorBoardSink

VAL = {"split": "val", "step": 3, "loss": 2.5, "text_loss": 1.25, "audio_loss": 1.25, "best": True,
       "audio_loss_per_codebook": [1.0 + k / 8 for k in range(8)], "text_targets": 10, "audio_targets": [4] * 8,
       "audio_acc": 0.5, "audio_acc_per_codebook": [0.25] * 8}
TRAIN = {"split": "train", "step": 2, "epoch": 0.25, "loss": 3.0, "text_loss": 2.0, "audio_loss": 1.0,
         "audio_loss_per_codebook": [1.0] * 8, "lr": 1e-3, "grad_norm": 0.75, "tokens_per_s": 123.4, "tokens": 999}


def f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


# ---- TensorBoard ----------------------------------------------------------------------------------------------

def by_step(events: list[dict]) -> dict[tuple[int, float], dict[str, float]]:
    """The scalar events of a file grouped by (step, wall_time): one record's values."""
    out: dict[tuple[int, float], dict[str, float]] = {}
    for e in events:
        if "values" in e:
            out.setdefault((e["step"], e["wall_time"]), {}).update(e["values"])
    return out


def test_tensorboard_event_file_reads_back(tmp_path):
    sink = TensorBoardSink(tmp_path / "tb")
    sink.write({**TRAIN, "time": 100.5})
    sink.write({"event": "checkpoint", "step": 2, "path": "x", "time": 101.0})  # no scalars: no event
    sink.write({**VAL, "time": 102.25})
    sink.write({**TRAIN, "step": 4, "loss": float("nan"), "time": 103.0})
    sink.close()
    (path,) = event_files(tmp_path / "tb")
    events = read_events(path)
    assert events[0]["file_version"] == "brain.Event:2" and "values" not in events[0]
    got = by_step(events)
    assert list(got) == [(2, 100.5), (3, 102.25), (4, 103.0)]
    tr, va, nan = got.values()
    assert tr == {k: f32(v) for k, v in scalars(TRAIN).items()}
    assert {"train/loss", "train/text_loss", "train/audio_loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
            "train/audio_loss_cb0", "train/audio_loss_cb7"} <= tr.keys()
    assert va["val/loss"] == 2.5 and va["val/audio_loss_cb7"] == f32(1.875) and va["val/audio_acc_cb3"] == 0.25
    assert math.isnan(nan["train/loss"])


def test_tensorboard_resume_marks_a_restart(tmp_path):
    first = TensorBoardSink(tmp_path)
    for step in (1, 2, 3, 4):
        first.write({"split": "train", "step": step, "loss": float(step)})
    first.close()
    second = TensorBoardSink(tmp_path)
    second.truncate_after(2)
    second.write({"split": "train", "step": 3, "loss": 30.0})
    second.close()
    assert len(event_files(tmp_path)) == 2 and second.path in event_files(tmp_path)
    events = read_events(second.path)
    assert events[1]["session_status"] == 1 and events[1]["step"] == 3  # START at the first re-done step
    assert events[2]["values"] == {"train/loss": 30.0}


def test_tensorboard_event_accumulator_reads_our_files(tmp_path):
    """TensorBoard's EventAccumulator (what `tensorboard --logdir` shows): the scalars, and the orphaned points of
    a resumed run purged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = TensorBoardSink(tmp_path)
    for step in (1, 2, 3, 4):
        first.write({**TRAIN, "step": step, "loss": float(step)})
    first.write({**VAL, "step": 2})
    first.close()
    second = TensorBoardSink(tmp_path)
    second.truncate_after(2)
    for step in (3, 4, 5):
        second.write({**TRAIN, "step": step, "loss": 10.0 * step})
    second.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert set(scalars(TRAIN)) | set(scalars(VAL)) <= set(acc.Tags()["scalars"])
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0),
                                                                       (5, 50.0)]
    assert [(e.step, e.value) for e in acc.Scalars("val/audio_loss_cb2")] == [(2, 1.25)]
    assert acc.Scalars("train/lr")[0].value == pytest.approx(1e-3)


def test_tensorboard_missing_is_one_clear_error(tmp_path, monkeypatch):
    hide_package(monkeypatch, "tensorboard")
    with pytest.raises(TrainConfigError) as e:
        make_logger(tmp_path, enabled=False, report_to="tensorboard")  # every rank checks, not only rank 0
    msg = str(e.value)
    assert "\n" not in msg and "--report_to tensorboard" in msg and "pip install tensorboard" in msg


# ---- scalars, --report_to ------------------------------------------------------------------------------------

def test_scalars_of_a_record():
    got = scalars(VAL)
    assert got["val/loss"] == 2.5 and got["val/audio_acc"] == 0.5
    assert [got[f"val/audio_loss_cb{k}"] for k in range(8)] == VAL["audio_loss_per_codebook"]
    assert not {k for k in got if k.split("/")[1] in ("step", "time", "best", "text_targets")}
    assert not [k for k in got if "audio_targets" in k] and "train/tokens" not in scalars(TRAIN)
    assert scalars({"event": "start", "step": 0, "total_steps": 10}) == {}


def test_report_to_parsing():
    assert parse_report_to("jsonl") == ["jsonl"]
    assert parse_report_to("wandb, TensorBoard") == ["jsonl", "tensorboard", "wandb"]  # JSONL always on
    assert parse_report_to(["tensorboard"]) == ["jsonl", "tensorboard"]
    with pytest.raises(TrainConfigError, match="'mlflow'.*jsonl,tensorboard,wandb"):
        parse_report_to("tensorboard,mlflow")


def test_logger_fans_out_and_only_rank0_writes(tmp_path):
    log = make_logger(tmp_path, report_to="jsonl,tensorboard")
    assert [s.name for s in log.sinks] == ["jsonl", "tensorboard"]
    log.log(TRAIN)
    log.close()
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["loss"] == 3.0
    (path,) = event_files(tmp_path / "tensorboard")
    (values,) = by_step(read_events(path)).values()
    assert values == {k: f32(v) for k, v in scalars(TRAIN).items()}
    other = make_logger(tmp_path / "rank1", enabled=False, report_to="jsonl,tensorboard")
    other.log(TRAIN)
    assert other.sinks == [] and not (tmp_path / "rank1").exists()
    # a fresh (not resumed) run starts its histories afresh
    again = make_logger(tmp_path, report_to="tensorboard")
    again.close()
    assert not (tmp_path / "metrics.jsonl").exists() and event_files(tmp_path / "tensorboard") == [again.sinks[1].path]


def test_wandb_missing_is_one_clear_error(tmp_path, monkeypatch):
    hide_package(monkeypatch, "wandb")
    with pytest.raises(TrainConfigError) as e:
        make_logger(tmp_path, enabled=False, report_to="wandb")  # every rank checks, not only rank 0
    msg = str(e.value)
    assert "\n" not in msg and "--report_to wandb" in msg and "pip install wandb" in msg


# ---- Weights & Biases (offline) ------------------------------------------------------------------------------

@pytest.mark.extras
def test_wandb_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb not installed (make test-extras)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    log = make_logger(tmp_path, report_to="wandb", config={"lr": 1e-3})
    log.log(VAL | {"step": 0})
    log.log(TRAIN)
    log.log({"event": "checkpoint", "step": 2})
    log.close()
    run_id, rows = wandb_history(tmp_path)
    assert json.loads((tmp_path / "wandb_run.json").read_text())["id"] == run_id
    by_step = {r["_step"]: r for r in rows}
    assert sorted(by_step) == [0, 2]
    assert by_step[2]["train/loss"] == 3.0 and by_step[2]["train/audio_loss_cb0"] == 1.0
    assert by_step[0]["val/audio_loss_cb7"] == 1.875 and by_step[0]["val/audio_acc"] == 0.5
    # a resumed run continues the same W&B run
    log = make_logger(tmp_path, report_to="wandb", resume=True)
    log.log(TRAIN | {"step": 4})
    log.close()
    assert json.loads((tmp_path / "wandb_run.json").read_text())["id"] == run_id


# ---- loss plot (matplotlib) ----------------------------------------------------------------------------------

@pytest.mark.extras
def test_loss_png_drawn_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (make test-extras)")
    from matplotlib.image import imread

    from minihiggs.metrics.plot import render_metrics_png

    png = render_metrics_png(write_run(tmp_path), tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(png)
    assert img.shape[0] == 460 and img.shape[1] == 2000  # four panels
    assert img[..., :3].std() > 0.05  # curves, not a blank canvas
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert render_metrics_png(empty, tmp_path / "empty.png").is_file()  # a run with no record yet still draws


def plot_script():
    import importlib.util

    from helpers import REPO

    spec = importlib.util.spec_from_file_location("plot_metrics", REPO / "scripts" / "plot_metrics.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_run(d: Path) -> Path:
    log = make_logger(d)
    for step in range(0, 10, 2):
        log.log({**TRAIN, "step": step + 1, "loss": 3.0 - step / 10})
        log.log({**VAL, "step": step, "loss": 2.5 - step / 10})
    return d / "metrics.jsonl"


def test_plot_script_without_matplotlib_says_how(tmp_path, monkeypatch, capsys):
    write_run(tmp_path)
    hide_package(monkeypatch, "matplotlib")
    assert plot_script().main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("plot_metrics.py: error: no loss.png: matplotlib") and err.count("\n") == 1
    assert not (tmp_path / "loss.png").exists()
    assert plot_script().main([str(tmp_path / "nowhere")]) == 2 and "not found" in capsys.readouterr().err


@pytest.mark.extras
def test_plot_script_draws(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (make test-extras)")
    write_run(tmp_path)
    assert plot_script().main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "train: 5 points, loss 3.0000 (step 1) -> 2.2000 (step 9)" in out and "val: 5 points" in out
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
