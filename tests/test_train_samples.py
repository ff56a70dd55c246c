"""Audio samples while training (`--sample_steps`, `--sample_prompts`) and the validation accuracy per codebook:
files and metrics records appear, and the training itself (and its resume) stays bitwise what it is without."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

import train
from helpers import LLAMA_DIR, TINY, adapter, train_args
from minihiggs import collate, load_model
from minihiggs.metrics.jsonl import read_metrics
from minihiggs.model.loss import LossSums
from minihiggs.model.tiny import write_tiny_checkpoint
from minihiggs.text.tokenizer import write_higgs_tokenizer
from synth import synth_samples

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The training tests' tiny model, with the text tokenizer that samples need."""
    d = write_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "tiny", seed=0, **TINY)
    write_higgs_tokenizer(LLAMA_DIR, d)
    return d


@pytest.fixture(scope="module")
def codec(tmp_path_factory):
    from minihiggs.codec.tiny import write_random_decoder

    return write_random_decoder(tmp_path_factory.mktemp("codec") / "codec")


@pytest.fixture(scope="module")
def runs(shards, ckpt, codec, tmp_path_factory):
    """12 steps with samples at every validation (steps 0, 3, 6, 9, 12), the same without samples, and a resume
    of the first from its step-6 checkpoint (dropout on, so any RNG draw by the samples would show)."""
    root = tmp_path_factory.mktemp("runs")
    common = dict(lora_dropout=0.2, sample_codec=str(codec), sample_max_frames=24)
    with_s, without = root / "with", root / "without"
    assert train.main(train_args(shards, ckpt, with_s, **common)) == 0
    assert train.main(train_args(shards, ckpt, without, **{**common, "sample_steps": 0})) == 0
    resumed = root / "resumed"
    mid = with_s / "checkpoints" / "step-00000006"
    assert train.main(train_args(shards, ckpt, resumed, **common) + ["--resume", str(mid)]) == 0
    return with_s, without, resumed


def test_samples_do_not_change_training_or_resume(runs):
    with_s, without, resumed = runs
    a, b, c = adapter(with_s / "final"), adapter(without / "final"), adapter(resumed / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert not (without / "samples").exists()
    va = [r["loss"] for r in read_metrics(with_s / "metrics.jsonl") if r.get("split") == "val"]
    vb = [r["loss"] for r in read_metrics(without / "metrics.jsonl") if r.get("split") == "val"]
    assert va == vb


def test_samples_are_written_at_every_validation(runs):
    with_s, _, resumed = runs
    recs = [r for r in read_metrics(with_s / "metrics.jsonl") if r.get("event") == "samples"]
    assert [r["step"] for r in recs] == [0, 3, 6, 9, 12]
    for r in recs:
        d = with_s / "samples" / f"step-{r['step']:08d}"
        assert r["dir"] == str(d) and r["audio"] and 1 <= len(r["files"]) <= 4
        for f in r["files"]:
            codes = np.load(d / f"{f['name']}.npy")
            wave, sr = sf.read(d / f"{f['name']}.wav")
            assert sr == 24000 and codes.shape == (8, f["frames"]) and len(wave) == 960 * f["frames"]
    first, last = (with_s / "samples" / f"step-{s:08d}" for s in (0, 12))
    names = sorted(p.name for p in first.glob("*.npy"))
    assert names == sorted(p.name for p in last.glob("*.npy"))
    # the adapter moved between step 0 and 12, and so did what it says (the files are not copies)
    assert any(not np.array_equal(np.load(first / n), np.load(last / n)) for n in names)
    # the resumed run continues: samples after the resume point only, the same as the straight run's
    rs = [r["step"] for r in read_metrics(resumed / "metrics.jsonl") if r.get("event") == "samples"]
    assert rs == [9, 12]
    for n in names:
        assert np.array_equal(np.load(resumed / "samples" / "step-00000012" / n), np.load(last / n))


def test_sample_prompts_file_and_explicit_steps(shards, ckpt, codec, tmp_path):
    from minihiggs.data.dataset import ShardDataset

    sid = ShardDataset(shards).sample_ids[0]
    p = tmp_path / "say.jsonl"
    p.write_text(json.dumps({"text": "Hello from training.", "name": "hello"}) + "\n" +
                 json.dumps({"text": "Cloned.", "name": "clone", "ref_sample": sid}) + "\n")
    out = tmp_path / "run"
    assert train.main(train_args(shards, ckpt, out, max_steps=6, sample_steps=4, sample_prompts=str(p),
                                 sample_codec=str(codec), sample_max_frames=16)) == 0
    recs = [r for r in read_metrics(out / "metrics.jsonl") if r.get("event") == "samples"]
    assert [r["step"] for r in recs] == [0, 4, 6]  # step 0, every 4, the last step
    assert all([f["name"] for f in r["files"]] == ["hello", "clone"] for r in recs)
    assert (out / "samples" / "step-00000004" / "clone.wav").is_file()


def test_bad_sample_prompts_stop_the_run_before_training(shards, ckpt, tmp_path, capsys):
    p = tmp_path / "say.jsonl"
    p.write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    assert train.main(train_args(shards, ckpt, tmp_path / "run", sample_prompts=str(p))) == 2
    assert "say.jsonl:2: unknown field(s) 'txt'" in capsys.readouterr().err


def test_validation_reports_teacher_forced_accuracy_per_codebook(runs, ckpt):
    with_s, _, _ = runs
    val = [r for r in read_metrics(with_s / "metrics.jsonl") if r.get("split") == "val"]
    for r in val:
        assert len(r["audio_acc_per_codebook"]) == 8 and all(0.0 <= a <= 1.0 for a in r["audio_acc_per_codebook"])
        assert r["audio_acc"] == pytest.approx(sum(r["audio_acc_per_codebook"]) / 8)
    # the hit counts are the argmax of the audio logits the loss already has, per codebook
    model = load_model(ckpt)
    with torch.no_grad():
        model.audio_decoder_proj.audio_lm_head.weight.mul_(30)  # a peaked head: some codes are hit
        batch = collate(synth_samples(6, seed=3), model.config)
        sums = model(batch)
        flat = model.forward_hidden(batch).hidden.reshape(-1, model.config.text.hidden_size)
        logits = model.audio_logits(flat[batch.audio_out_pos[batch.audio_loss_rows]])
    t = batch.audio_loss_targets
    want = ((logits.argmax(-1) == t) & (t != -100)).sum(0)
    assert torch.equal(sums.audio_correct, want) and int(want.sum()) > 0
    back = LossSums.from_vector(sums.as_vector(), 8)
    assert torch.equal(back.audio_correct, want) and torch.equal(back.audio_count, sums.audio_count)
    assert LossSums.from_vector(sums.as_vector()[:18]).audio_correct is None  # the 2 + 2K prefix is unchanged
    rep = (sums + sums).report()
    assert rep["audio_acc_per_codebook"] == pytest.approx((want / t.ne(-100).sum(0)).tolist())


@pytest.mark.parametrize("sig,nth,opts,step", [
    ("SIGTERM", 2, dict(max_steps=12, val_steps=3), 3),  # during the samples of the step-3 validation
    ("SIGINT", 2, dict(max_steps=12, val_steps=3), 3),  # Ctrl-C there: the same (was: one more step, then saved)
    ("SIGTERM", 1, dict(max_steps=4, val_steps=0), 4),  # during the samples of the end-of-run validation
])
def test_stop_during_samples_saves_first(sig, nth, opts, step, shards, ckpt, codec, tmp_path):
    """A stop request while samples are generated abandons them: the checkpoint of that step comes at once (was:
    the samples ran to the end, 20+ s on CPU, before anything was written, then one more step). The samples of
    that step are not written; the resumed run ends as a straight one."""
    from test_train_faults import run_injected

    from minihiggs.train import checkpointing as ckpt_io

    out = tmp_path / "run"
    # (--sample_max_frames 400: long enough that a sample not abandoned would be seen to run on)
    args = train_args(shards, ckpt, out, save_steps=0, log_steps=1, sample_codec=str(codec),
                      sample_max_frames=400, **opts)
    r = run_injected(f"samples_{sig}_{nth}", args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"step {step}: samples abandoned ({sig}: the checkpoint comes first)" in r.stdout
    assert [s for s, _ in ckpt_io.list_checkpoints(out)] == [step]
    assert not (out / "samples" / f"step-{step:08d}").exists() and not (out / "final").exists()
    events = [e.get("event") for e in read_metrics(out / "metrics.jsonl") if e.get("event")]
    assert events[-3:] == ["samples_abandoned", "checkpoint", "interrupted"]
