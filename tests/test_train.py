"""train.py in one process (CPU, fp32, tiny model): exact resume, accumulation, outputs, failures, early stop.

Runs call `train.main(argv)` in-process (no interpreter start-up per run). The distributed and signal tests are
in test_train_dist.py; the helpers here (`make_shards`, `train_args`, ...) are shared with it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import train
from helpers import adapter, event_files, hide_package, max_diff, read_events, train_args
from minihiggs import collate, load_model
from minihiggs.data.dataset import ShardDataset
from minihiggs.lora.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, read_adapter_config
from minihiggs.lora.apply import apply_lora
from minihiggs.metrics.jsonl import read_metrics
from minihiggs.metrics.plot import have_matplotlib
from minihiggs.metrics.scalars import scalars
from minihiggs.model.higgs import HiggsAudioModel
from minihiggs.train import checkpointing as ckpt_io
from minihiggs.train.data import collate_ids, val_batch_count, val_batches
from minihiggs.train.distributed import DistEnv
from minihiggs.train.schedule import lr_factor, warmup_steps
from minihiggs.train.step import evaluate, forward_backward
from synth import synth_samples

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------
# one straight run shared by several tests (dropout on: the resume test needs the RNG restored)


@pytest.fixture(scope="module")
def straight(shards, tiny_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "straight"
    assert train.main(train_args(shards, tiny_ckpt, out, lora_dropout=0.2, report_to="tensorboard")) == 0
    return out


def test_resume_is_bitwise_identical(straight, shards, tiny_ckpt, tmp_path):
    """12 steps straight == 6 steps + resume + 6 steps, bitwise (dropout 0.2, 2 micro-batches per step, an
    epoch boundary inside the second half)."""
    mid = straight / "checkpoints" / "step-00000006"
    state = ckpt_io.load_trainer_state(mid)
    assert state["step"] == 6 and state["epoch"] == 0 and state["batches_in_epoch"] == 12
    resumed = tmp_path / "resumed"
    assert train.main(train_args(shards, tiny_ckpt, resumed, lora_dropout=0.2) + ["--resume", str(mid)]) == 0
    a, b = adapter(straight / "final"), adapter(resumed / "final")
    assert all(torch.equal(a[k], b[k]) for k in a), f"max diff {max_diff(a, b)}"
    # ... and training did something (identical runs that do nothing would pass the line above): every lora_B
    # left its zero init, the adapter moved between the checkpoints, and so did the loss
    assert all(a[k].abs().max() > 0 for k in a if "lora_B" in k)
    six = adapter(mid)
    assert max_diff(six, a) > 0
    train_losses = [r["loss"] for r in read_metrics(straight / "metrics.jsonl") if r.get("split") == "train"]
    assert len(set(train_losses)) == len(train_losses) > 1
    sa = ckpt_io.load_trainer_state(straight / "checkpoints" / "step-00000012")
    sb = ckpt_io.load_trainer_state(resumed / "checkpoints" / "step-00000012")
    for k, v in sa["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg_sq"], sb["optimizer"]["state"][k]["exp_avg_sq"])
    # 17 batches: 9 steps in epoch 0
    assert (sa["epoch"], sa["batches_in_epoch"]) == (sb["epoch"], sb["batches_in_epoch"]) == (1, 6)
    # the resumed history continues the old one: metrics after the resume point only
    recs = read_metrics(resumed / "metrics.jsonl")
    assert recs[0]["event"] == "resume" and min(r["step"] for r in recs if r.get("split")) > 6


def test_outputs_metrics_and_plot(straight, tiny_ckpt):
    recs = read_metrics(straight / "metrics.jsonl")
    train_recs = [r for r in recs if r.get("split") == "train"]
    val_recs = [r for r in recs if r.get("split") == "val"]
    assert [r["step"] for r in train_recs] == list(range(2, 13, 2))
    assert [r["step"] for r in val_recs] == [0, 3, 6, 9, 12]  # 0: the base model
    for r in train_recs:
        assert {"loss", "text_loss", "audio_loss", "audio_loss_per_codebook", "lr", "grad_norm", "tokens_per_s",
                "epoch", "tokens"} <= r.keys()
        assert len(r["audio_loss_per_codebook"]) == 8 and r["tokens_per_s"] > 0
        assert r["loss"] == pytest.approx(r["text_loss"] + r["audio_loss"])
    for r in val_recs:
        assert len(r["audio_loss_per_codebook"]) == 8 and r["text_targets"] > 0
    # warmup 2 then cosine over 12 steps: the lr logged at step s is the one used by update s (0-based s-1)
    f = lr_factor("cosine", 2, 12)
    assert [r["lr"] for r in train_recs] == pytest.approx([1e-3 * f(r["step"] - 1) for r in train_recs])
    events = [r["event"] for r in recs if "event" in r]
    assert events[0] == "start" and events[-1] == "end" and events.count("checkpoint") == 2

    # every --save_steps and the end; each a complete PEFT adapter dir with the training state
    ckpts = ckpt_io.list_checkpoints(straight)
    assert [s for s, _ in ckpts] == [6, 12]
    d = ckpts[-1][1]
    assert {ADAPTER_WEIGHTS, ADAPTER_CONFIG, "trainer_state.pt", "trainer_state.json", "train_args.json"} \
        <= {p.name for p in d.iterdir()}
    args = json.loads((d / "train_args.json").read_text())
    assert "--train_manifest" in args["argv"] and args["args"]["lora_dropout"] == 0.2
    # which weights: the base folder as an absolute path, no Hub commit for a local folder
    assert args["base_dir"] == str(Path(tiny_ckpt).resolve()) and args["base_revision"] is None
    state = ckpt_io.load_trainer_state(d)
    assert {"optimizer", "scheduler", "rng", "epoch", "batches_in_epoch"} <= state.keys()
    assert "sampler" not in state  # the data position has one home: epoch + batches_in_epoch
    assert {"python", "numpy", "torch"} <= state["rng"][0].keys()
    assert torch.equal(adapter(d)[next(iter(adapter(d)))], adapter(straight / "final")[next(iter(adapter(d)))])

    best = json.loads((straight / "best" / "best.json").read_text())
    assert best["val"]["loss"] == pytest.approx(min(r["loss"] for r in val_recs))
    assert best["step"] == min(val_recs, key=lambda r: r["loss"])["step"]

    # loss.png needs matplotlib (an optional extra): drawn when it is installed, absent otherwise
    assert (straight / "loss.png").is_file() == have_matplotlib()


@pytest.mark.extras
def test_loss_png_of_a_run(straight):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (make test-extras)")
    from matplotlib.image import imread

    img = imread(straight / "loss.png")
    assert img.shape[:2] == (460, 2000) and img[..., :3].std() > 0.05  # four panels


def test_report_to_tensorboard_writes_the_metrics(straight):
    """--report_to tensorboard: the event file, read back, holds every train/val value of metrics.jsonl."""
    recs = read_metrics(straight / "metrics.jsonl")
    (path,) = event_files(straight / "tensorboard")
    events = read_events(path)
    assert events[0]["file_version"] == "brain.Event:2"
    got: dict[tuple[int, str], float] = {}
    for e in events[1:]:
        for tag, v in e["values"].items():
            got[(e["step"], tag)] = v
    want = {(r["step"], tag): v for r in recs for tag, v in scalars(r).items()}
    assert got.keys() == want.keys()
    assert all(got[k] == pytest.approx(want[k], rel=1e-6) for k in want)
    steps = lambda tag: sorted(s for s, t in got if t == tag)  # noqa: E731
    assert steps("train/loss") == list(range(2, 13, 2)) and steps("val/loss") == [0, 3, 6, 9, 12]
    assert steps("train/audio_loss_cb7") == steps("train/lr") == steps("train/tokens_per_s") == steps("train/loss")
    assert steps("val/audio_loss_cb0") == steps("val/text_loss") == steps("val/loss")


def test_report_to_wandb_without_wandb_is_one_line(shards, tiny_ckpt, tmp_path, monkeypatch, capsys):
    hide_package(monkeypatch, "wandb")
    assert train.main(train_args(shards, tiny_ckpt, tmp_path / "run", report_to="tensorboard,wandb")) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: --report_to wandb needs the wandb package") and err.count("\n") == 1


@pytest.mark.extras
def test_report_to_wandb_offline(shards, tiny_ckpt, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb not installed (make test-extras)")
    from helpers import wandb_history

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    assert train.main(train_args(shards, tiny_ckpt, out, max_steps=4, val_steps=2, save_steps=0,
                                 report_to="wandb")) == 0
    _, rows = wandb_history(out)
    logged = {(r["_step"], k): v for r in rows for k, v in r.items() if not k.startswith("_")}
    want = {(r["step"], k): v for r in read_metrics(out / "metrics.jsonl") for k, v in scalars(r).items()}
    assert logged.keys() == want.keys() and all(logged[k] == pytest.approx(want[k]) for k in want)


def test_loss_png_redrawn_at_every_validation(shards, tiny_ckpt, tmp_path, monkeypatch):
    """With matplotlib, loss.png is redrawn after each validation (a running job can be looked at), and once
    more at the end."""
    from minihiggs.metrics import plot

    seen = []
    monkeypatch.setattr(plot, "have_matplotlib", lambda: True)
    monkeypatch.setattr(plot, "render_metrics_png", lambda metrics, png: seen.append(
        sum(r.get("split") == "val" for r in read_metrics(metrics))) or Path(png))
    out = tmp_path / "run"
    assert train.main(train_args(shards, tiny_ckpt, out, max_steps=4, val_steps=2, save_steps=0)) == 0
    assert seen == [1, 2, 3, 3]  # after the validations at steps 0, 2, 4, then at the end


def test_without_matplotlib_no_png_and_one_note(shards, tiny_ckpt, tmp_path, monkeypatch, capsys):
    from minihiggs.metrics import plot

    monkeypatch.setattr(plot, "have_matplotlib", lambda: False)
    out = tmp_path / "run"
    assert train.main(train_args(shards, tiny_ckpt, out, max_steps=4, val_steps=2, save_steps=0)) == 0
    logged = capsys.readouterr().out
    assert logged.count("note: no loss.png: matplotlib is not installed") == 1 and "pip install matplotlib" in logged
    assert not (out / "loss.png").exists()


def test_final_adapter_loads_with_load_adapter_and_reproduces_val_loss(straight, shards, tiny_ckpt):
    """final/ is a PEFT-format adapter: a fresh base + load_adapter gives the final validation loss again."""
    cfg = read_adapter_config(straight / "final")
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["bias"] == "none"
    assert cfg["lora_dropout"] == 0.2 and Path(cfg["base_model_name_or_path"]) == tiny_ckpt.resolve()
    assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in adapter(straight / "final"))
    model = load_model(tiny_ckpt)
    load_adapter(model, straight / "final")
    ds = ShardDataset(shards)
    _, val_idx = ds.split(0.2)
    batches = [(collate_ids(ds, ids, model.config), False) for ids in val_batches(ds, val_idx, 2, 0, 1)]
    got = evaluate(model, batches, torch.device("cpu"))
    last_val = [r for r in read_metrics(straight / "metrics.jsonl") if r.get("split") == "val"][-1]
    assert got["total"] == pytest.approx(last_val["loss"], rel=1e-6, abs=1e-7)
    assert got["audio_loss_per_codebook"] == pytest.approx(last_val["audio_loss_per_codebook"], rel=1e-6)


def test_train_step_accumulation_equals_union_batch(tiny_ckpt):
    """forward_backward over k micro-batches (global-count normalisation) == one batch of their union: grads."""
    samples = synth_samples(6, seed=4)

    def grads(groups):
        model = load_model(tiny_ckpt)
        apply_lora(model, r=4, alpha=8, seed=0)
        with torch.no_grad():  # non-zero B so that A gets a gradient too
            for n, p in model.named_parameters():
                if n.endswith("lora_B.weight"):
                    p.copy_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
        model.train()
        res = forward_backward(model, [collate(g, model.config) for g in groups], torch.device("cpu"), 1, 8)
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, res

    g_union, r_union = grads([samples])
    g_micro, r_micro = grads([samples[:2], samples[2:3], samples[3:]])
    assert r_union.sums.report()["total"] == pytest.approx(r_micro.sums.report()["total"], rel=1e-6)
    assert r_union.tokens == r_micro.tokens
    for n in g_union:  # fp32 sums in another order: compare relative to each gradient's scale
        scale = float(g_union[n].abs().max())
        assert scale > 0 and float((g_micro[n] - g_union[n]).abs().max()) <= 1e-5 * scale, n


# ---------------------------------------------------------------------------------------------------------------
# failures


def nan_forward(monkeypatch, bad_calls: set[int]) -> list[int]:
    """Make the training forward return a NaN loss on the given (1-based) training-forward calls."""
    orig = HiggsAudioModel.forward
    calls = [0]

    def forward(self, batch):
        sums = orig(self, batch)
        if self.training:
            calls[0] += 1
            if calls[0] in bad_calls:
                sums.text_sum = sums.text_sum * float("nan")
        return sums

    monkeypatch.setattr(HiggsAudioModel, "forward", forward)
    return calls


def test_nonfinite_loss_skips_the_update(shards, tiny_ckpt, tmp_path, monkeypatch):
    nan_forward(monkeypatch, {5})  # grad_accum 2: the 3rd optimizer step
    out = tmp_path / "run"
    assert train.main(train_args(shards, tiny_ckpt, out, max_steps=6, save_steps=0, val_steps=0)) == 0
    recs = read_metrics(out / "metrics.jsonl")
    bad = [r for r in recs if r.get("event") == "nonfinite"]
    assert [r["step"] for r in bad] == [3] and bad[0]["loss"] == "nan"
    assert all(torch.isfinite(t).all() for t in adapter(out / "final").values())
    assert (out / "final").is_dir()


def test_nonfinite_in_a_row_stops_with_last_good_checkpoint(shards, tiny_ckpt, tmp_path, monkeypatch, capsys):
    nan_forward(monkeypatch, set(range(11, 100)))  # every step from the 6th on
    out = tmp_path / "run"
    assert train.main(train_args(shards, tiny_ckpt, out, max_steps=20, save_steps=4, val_steps=0)) == 1
    err = capsys.readouterr().err
    assert "5 non-finite" in err and "step-00000004" in err
    assert [s for s, _ in ckpt_io.list_checkpoints(out)] == [4]
    assert not (out / "final").exists()
    good = ckpt_io.latest_checkpoint(out)
    model = load_model(tiny_ckpt)
    load_adapter(model, good)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs if r.get("event") == "nonfinite"] == [6, 7, 8, 9, 10]
    assert recs[-1]["event"] == "stopped_nonfinite"


def test_crash_while_saving_keeps_the_previous_checkpoint(shards, tiny_ckpt, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_save = torch.save
    calls = [0]

    def failing_save(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] == 2:  # the second checkpoint: adapter files already written into the temp dir
            raise OSError("disk full (simulated)")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt_io.torch, "save", failing_save)
    # a failed write is the user's to fix (a full disk): one line naming the checkpoint, exit 2
    assert train.main(train_args(shards, tiny_ckpt, out, max_steps=12, save_steps=4, val_steps=0)) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("train.py: error: ")
    assert "step-00000008/trainer_state.pt: cannot write (disk full (simulated))" in err
    monkeypatch.setattr(ckpt_io.torch, "save", real_save)
    assert [s for s, _ in ckpt_io.list_checkpoints(out)] == [4]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    # a hard kill mid-save leaves a temp dir: ignored by `latest` and removed on the next start
    (out / "checkpoints" / ".tmp-step-00000008-x").mkdir()
    (out / "checkpoints" / ".tmp-step-00000008-x" / ADAPTER_WEIGHTS).write_bytes(b"partial")
    assert ckpt_io.latest_checkpoint(out).name == "step-00000004"
    assert train.main(train_args(shards, tiny_ckpt, out, max_steps=12, save_steps=4, val_steps=0,
                                 keep_checkpoints=2) + ["--resume", "latest"]) == 0
    assert [s for s, _ in ckpt_io.list_checkpoints(out)] == [8, 12]  # the oldest pruned
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    # and the result equals an uninterrupted run
    ref = tmp_path / "ref"
    assert train.main(train_args(shards, tiny_ckpt, ref, max_steps=12, save_steps=4, val_steps=0)) == 0
    a, b = adapter(ref / "final"), adapter(out / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_refuses_to_mix_runs_in_one_output_dir(straight, shards, tiny_ckpt, capsys):
    assert train.main(train_args(shards, tiny_ckpt, straight)) == 2
    assert "--resume latest" in capsys.readouterr().err
    assert train.main(train_args(shards, tiny_ckpt, straight, batch_size=3, seed=5) + ["--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert "--batch_size: checkpoint 2, now 3; --seed: checkpoint 0, now 5 (resume with the checkpoint's" in err


def test_shards_flag_takes_prep_output_and_says_so(shards, tiny_ckpt, tmp_path, capsys):
    """--shards (alias --train_manifest) takes prep.py's --out directory. Was: `--train_manifest data/train.jsonl`
    failed with '.../train.jsonl/index.json: not found', and an --output_dir inside the shards was accepted (run
    files mixed into them). Each case is one line, before any model load."""
    manifest = tmp_path / "train.jsonl"
    manifest.write_text('{"messages": []}\n')
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (manifest, tmp_path / "o1", f"--shards {manifest}: a file, not the directory of shards prep.py writes; for "
                                    f"a manifest, run prep.py first: python prep.py --manifest {manifest} --out "
                                    f"{tmp_path / 'shards'} --base_ckpt BASE, then train with --shards "
                                    f"{tmp_path / 'shards'}"),
        (empty, tmp_path / "o2", f"--shards {empty}: no index.json, not a directory prep.py wrote (give its --out "
                                 f"directory; run prep.py first)"),
        (shards, shards, f"--output_dir {shards}: is the --shards directory"),
        (shards, shards / "run", f"--output_dir {shards / 'run'}: is inside the --shards directory"),
    ]
    for data, out, expect in cases:
        assert train.main(train_args(data, tiny_ckpt, out)) == 2
        err = capsys.readouterr().err
        assert err.startswith("train.py: error: ") and expect in err and err.count("\n") == 1, err
    assert not (shards / "run").exists() and not (shards / "metrics.jsonl").exists()
    argv = train_args(shards, tiny_ckpt, tmp_path / "o5", max_steps=1, val_steps=0, save_steps=0)
    assert train.main(["--shards" if a == "--train_manifest" else a for a in argv]) == 0


def test_bad_inputs_are_one_clear_line_not_a_traceback(shards, tiny_ckpt, tmp_path, capsys):
    """Missing shards, a broken checkpoint, a bad --resume: exit 2 with the file named, no traceback."""
    broken = tmp_path / "broken_ckpt"
    broken.mkdir()
    (broken / "config.json").write_text((Path(tiny_ckpt) / "config.json").read_text())  # no weights
    cases = [
        (train_args(tmp_path / "no_shards", tiny_ckpt, tmp_path / "o1"), "no_shards: no such directory"),
        (train_args(shards, broken, tmp_path / "o2"), str(broken)),
        (train_args(shards, tiny_ckpt, tmp_path / "o3") + ["--resume", str(tmp_path)], "--resume"),
    ]
    for argv, expect in cases:
        assert train.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("train.py: error: ") and expect in err and "Traceback" not in err, err


def test_early_stopping(shards, tiny_ckpt, tmp_path):
    out = tmp_path / "run"
    # lr 0: the validation loss never improves after the first validation
    assert train.main(train_args(shards, tiny_ckpt, out, lr=0.0, max_steps=30, val_steps=2, save_steps=0)
                      + ["--early_stopping_patience", "2"]) == 0
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs if r.get("split") == "val"] == [0, 2, 4]
    assert [r for r in recs if r.get("event") == "early_stop"][0]["best_step"] == 0
    final = json.loads((out / "final" / "final.json").read_text())
    assert final["stop_reason"] == "early_stop" and final["step"] == 4


# ---------------------------------------------------------------------------------------------------------------
# units


def test_val_split_is_deterministic_and_shared_across_world_sizes(shards):
    ds = ShardDataset(shards)
    train_idx, val_idx = ds.split(0.2)
    assert (train_idx, val_idx) == ShardDataset(shards).split(0.2) and val_idx
    assert not set(train_idx) & set(val_idx) and len(train_idx) + len(val_idx) == len(ds)
    for world in (1, 2, 3, 8):
        per_rank = [val_batches(ds, val_idx, 2, r, world) for r in range(world)]
        flat = sorted(i for rank in per_rank for b in rank for i in b)
        assert flat == sorted(val_idx)  # every val sample exactly once, whatever the world size
        assert max(len(b) for b in per_rank) <= val_batch_count(len(val_idx), 2, world)


def test_lr_schedules():
    assert warmup_steps(0.1, 200) == 20 and warmup_steps(5, 200) == 5
    cos, lin, const = (lr_factor(k, 4, 20) for k in ("cosine", "linear", "constant"))
    assert [cos(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cos(4) == lin(4) == const(4) == 1.0
    assert cos(12) == pytest.approx(0.5) and lin(12) == pytest.approx(0.5) and const(19) == 1.0
    assert cos(20) == pytest.approx(0.0) and lin(20) == 0.0
    assert all(cos(s) >= cos(s + 1) for s in range(4, 20))


def test_resume_from_an_earlier_checkpoint_with_a_new_lr_and_max_steps(straight, shards, tiny_ckpt, tmp_path,
                                                                        capsys):
    """Resume step 6 of a 12-step run with another --lr and --max_steps into the same output dir (allowed: see
    check_resume_compatible). The LR is the *new* base times the *new* schedule from the first resumed update on
    (LambdaLR.load_state_dict alone kept the old base LR forever and the old shape for one step), and the
    checkpoint written at the end is kept: the old history's later checkpoints (step 12) are removed, not counted
    against --keep_checkpoints (which pruned the new step-8 and left `latest` on the abandoned step 12)."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(straight, out)
    assert [s for s, _ in ckpt_io.list_checkpoints(out)] == [6, 12]
    argv = train_args(shards, tiny_ckpt, out, lora_dropout=0.2, lr=5e-4, max_steps=8, log_steps=1, save_steps=0,
                      val_steps=0, keep_checkpoints=1)
    capsys.readouterr()
    assert train.main(argv + ["--resume", str(out / "checkpoints" / "step-00000006")]) == 0
    # the changes are said (was: taken silently), each as --flag OLD -> NEW
    (said,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("settings changed since")]
    for change in ("--max_steps 12 -> 8", "--lr 0.001 -> 0.0005", "--keep_checkpoints 3 -> 1", "--val_steps 3 -> 0"):
        assert change in said, said
    assert "--shards" not in said and "--output_dir" not in said and "--resume" not in said
    f = lr_factor("cosine", 2, 8)
    recs = read_metrics(out / "metrics.jsonl")
    lrs = {r["step"]: r["lr"] for r in recs if r.get("split") == "train" and r["step"] > 6}
    assert lrs == {7: 5e-4 * f(6), 8: 5e-4 * f(7)}
    assert [s for s, _ in ckpt_io.list_checkpoints(out)] == [8]
    assert ckpt_io.latest_checkpoint(out).name == "step-00000008"
    state = ckpt_io.load_trainer_state(ckpt_io.latest_checkpoint(out))
    assert state["scheduler"]["base_lrs"] == [5e-4] and state["scheduler"]["last_epoch"] == 8


def test_checkpoint_is_fsynced_before_it_is_renamed_into_place(tiny_ckpt, tmp_path, monkeypatch):
    """Every file of a checkpoint and its directory reach the disk before the rename that makes it `step-N`,
    and the parent directory after it: otherwise a power loss can leave a `step-N` of empty files, which
    `latest` would choose (and the older checkpoints may already be pruned)."""
    import os

    # Descriptors are identified by inode (os.fstat): a rename keeps it, and no /proc is needed.
    events: list[tuple[str, object]] = []
    real_fsync, real_rename = os.fsync, Path.rename

    def inode(path) -> tuple[int, int]:
        st = os.stat(path)
        return st.st_dev, st.st_ino

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", (st.st_dev, st.st_ino)))
        return real_fsync(fd)

    def rename(self, target):
        events.append(("rename", str(target)))
        return real_rename(self, target)

    model = load_model(tiny_ckpt)
    apply_lora(model, r=4, alpha=8, seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    env = DistEnv(0, 0, 1, torch.device("cpu"), False)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "rename", rename)
    final = ckpt_io.save_checkpoint(tmp_path, 3, model, opt, {"epoch": 0}, {"argv": []}, env, str(tiny_ckpt), 2)
    assert final == tmp_path / "checkpoints" / "step-00000003" and (final / ckpt_io.STATE_FILE).is_file()
    i = events.index(("rename", str(final)))
    synced = {x for kind, x in events[:i] if kind == "fsync"}
    assert {inode(p) for p in final.iterdir()} <= synced  # every file, while under its temporary directory
    assert inode(final) in synced  # the temporary directory itself, before it gets the step-N name
    assert ("fsync", inode(tmp_path / "checkpoints")) in events[i + 1:]  # the parent, after the rename
