"""The training samples scored while training (`--eval_steps`, `--best_metric`, the cheap signals): logged to every
sink, plotted, choosing best/, and the training (and its resume) bitwise what it is without them. The scorers are
the tiny random ones of `minihiggs.eval.tiny` (their WER/SIM values mean nothing; that they are logged, stay
comparable across steps and pick best/ is what is tested)."""

from __future__ import annotations

import json

import pytest
import torch

import train
from helpers import adapter, event_files, read_events, train_args
from minihiggs.metrics.jsonl import read_metrics
from minihiggs.metrics.plot import have_matplotlib
from minihiggs.train import checkpointing as ckpt_io
from test_train_samples import ckpt, codec  # noqa: F401  (the tiny model with a tokenizer, the random codec)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    from minihiggs.eval.tiny import write_tiny_asr, write_tiny_speaker

    root = tmp_path_factory.mktemp("scorers")
    return str(write_tiny_asr(root / "asr")), str(write_tiny_speaker(root / "sv"))


@pytest.fixture(scope="module")
def prompts(shards, tmp_path_factory):
    """Two prompts: one with a voice reference (so SIM has a value), one without."""
    from minihiggs.data.dataset import ShardDataset

    p = tmp_path_factory.mktemp("prompts") / "say.jsonl"
    sid = ShardDataset(shards).sample_ids[0]
    p.write_text(json.dumps({"text": "Hello there, how are you.", "name": "hello", "ref_sample": sid}) + "\n"
                 + json.dumps({"text": "No voice given.", "name": "plain"}) + "\n")
    return str(p)


def eval_args(shards, ckpt, codec, out, prompts, scorers, **over):  # noqa: F811
    # lr 0.03: large enough that the samples (and so the scores) change from one scoring to the next
    opts = dict(lora_dropout=0.2, lr=0.03, sample_codec=str(codec), sample_max_frames=24, sample_prompts=prompts,
                eval_asr=scorers[0], eval_sim=scorers[1])
    return train_args(shards, ckpt, out, **{**opts, **over})


@pytest.fixture(scope="module")
def runs(shards, ckpt, codec, prompts, scorers, tmp_path_factory):  # noqa: F811
    """12 steps scored every 3 (best/ by SIM, TensorBoard on), its resume from step 6, and the same run with
    neither samples nor scoring."""
    root = tmp_path_factory.mktemp("runs")
    scored, resumed, plain = root / "scored", root / "resumed", root / "plain"
    on = dict(eval_steps=3, best_metric="sim")
    assert train.main(eval_args(shards, ckpt, codec, scored, prompts, scorers, report_to="tensorboard", **on)) == 0
    mid = scored / "checkpoints" / "step-00000006"
    assert train.main(eval_args(shards, ckpt, codec, resumed, prompts, scorers, **on) + ["--resume", str(mid)]) == 0
    assert train.main(eval_args(shards, ckpt, codec, plain, prompts, scorers, sample_steps=0)) == 0
    return scored, resumed, plain


def evals(out) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if r.get("split") == "eval"]


def test_scoring_leaves_training_and_resume_bitwise(runs):
    scored, resumed, plain = runs
    a, b, c = adapter(scored / "final"), adapter(resumed / "final"), adapter(plain / "final")
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    assert not evals(plain) and not (plain / "samples").exists()
    # the resumed run scores the same prompts with the same seeds: the same values at the same steps
    after = {r["step"]: r for r in evals(scored) if r["step"] > 6}
    got = evals(resumed)
    assert [r["step"] for r in got] == [9, 12]
    for r in got:
        assert {k: r[k] for k in ("wer", "cer", "sim")} == {k: after[r["step"]][k] for k in ("wer", "cer", "sim")}


def test_scores_are_logged_to_every_sink_and_choose_best(runs):
    scored, _, _ = runs
    recs = evals(scored)
    assert [r["step"] for r in recs] == [0, 3, 6, 9, 12]
    for r in recs:
        assert {"wer", "cer", "sim", "silence", "eos", "repeated", "flagged"} <= r.keys()
        assert set(r["flags"]) == set(r["transcripts"]) == {"hello", "plain"}
        assert "silent" not in r["flags"]["hello"] and r["silence"] < 0.5  # the random codec's noise is not silence
    sims = [r["sim"] for r in recs]
    assert len(set(sims)) > 1  # the weights moved, and so did the score: best/ is a real choice
    best = json.loads((scored / "best" / "best.json").read_text())
    want = max(recs, key=lambda r: r["sim"])  # (the first of equal values)
    assert best["metric"] == "sim" and best["step"] == want["step"] and best["value"] == pytest.approx(want["sim"])
    final = json.loads((scored / "final" / "final.json").read_text())
    assert final["best_step"] == want["step"] and final["best_metric"] == "sim"
    # TensorBoard got the same numbers as eval/<key>
    got = {(e["step"], tag): v for e in read_events(event_files(scored / "tensorboard")[0])[1:]
           for tag, v in e["values"].items()}
    for r in recs:
        for k in ("wer", "sim", "silence", "flagged"):
            assert got[(r["step"], f"eval/{k}")] == pytest.approx(r[k], rel=1e-6)  # (float32 in the event file)
    assert (scored / "loss.png").is_file() == have_matplotlib()


@pytest.mark.extras
def test_loss_png_has_the_scores_panel(runs):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (make test-extras)")
    from matplotlib.image import imread

    scored, _, plain = runs
    assert imread(scored / "loss.png").shape[:2] == (460, 2500)  # five panels
    assert imread(plain / "loss.png").shape[:2] == (460, 2000)  # four: nothing was scored


def test_silent_endless_samples_are_flagged(shards, ckpt, codec, tmp_path, monkeypatch):  # noqa: F811
    """Cheap signals need no --eval_steps: a model whose output decodes to silence and never ends (the random
    model emits no EOS within the budget) is flagged in the logged metrics."""
    from minihiggs.codec import AudioTokenizer

    monkeypatch.setattr(AudioTokenizer, "decode", lambda self, codes, chunk=None: torch.zeros(960 * codes.shape[-1]))
    out = tmp_path / "run"
    assert train.main(train_args(shards, ckpt, out, max_steps=2, val_steps=0, sample_steps=2,
                                 sample_codec=str(codec), sample_max_frames=16)) == 0
    recs = evals(out)
    assert [r["step"] for r in recs] == [0, 2]
    for r in recs:
        assert r["silence"] == 1.0 and r["eos"] == 0.0 and r["flagged"] == 1.0
        assert all({"silent", "no_eos"} <= set(f) for f in r["flags"].values())
        assert "wer" not in r and "sim" not in r  # (not scored: no --eval_steps)


def test_stop_during_scoring_saves_first(shards, ckpt, codec, prompts, scorers, tmp_path):  # noqa: F811
    """SIGTERM while the step-3 samples are transcribed: the scoring is abandoned, the checkpoint of step 3
    comes at once, nothing of step 3 is judged."""
    from test_train_faults import run_injected

    out = tmp_path / "run"
    args = eval_args(shards, ckpt, codec, out, prompts, scorers, eval_steps=3, best_metric="wer", save_steps=0)
    r = run_injected("scoring_SIGTERM_2", args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 3: samples abandoned (SIGTERM: the checkpoint comes first)" in r.stdout
    assert [s for s, _ in ckpt_io.list_checkpoints(out)] == [3]
    assert [r["step"] for r in evals(out)] == [0]
    events = [e.get("event") for e in read_metrics(out / "metrics.jsonl") if e.get("event")]
    assert events[-3:] == ["samples_abandoned", "checkpoint", "interrupted"]
    assert json.loads((out / "best" / "best.json").read_text())["step"] == 0


def test_best_metric_needs_eval_steps(shards, ckpt, tmp_path, capsys):  # noqa: F811
    assert train.main(train_args(shards, ckpt, tmp_path / "run", best_metric="wer")) == 2
    assert "--best_metric wer needs --eval_steps N" in capsys.readouterr().err


@pytest.mark.heavy
def test_ddp_scoring_and_resume_are_bitwise(shards, ckpt, codec, prompts, scorers, tmp_path):  # noqa: F811
    """2 ranks, dropout on, best/ by WER: rank 0 scores, every rank judges the same value (a collective), and 4
    steps straight == 2 + resume + 2, bitwise, with the same scores after the resume point."""
    from test_train_dist import torchrun

    args = dict(batch_size=2, grad_accum=2, max_steps=4, val_steps=2, save_steps=2, log_steps=1, eval_steps=2,
                best_metric="wer")
    out, again = tmp_path / "straight", tmp_path / "resumed"
    torchrun(["train.py", *eval_args(shards, ckpt, codec, out, prompts, scorers, **args)])
    mid = out / "checkpoints" / "step-00000002"
    torchrun(["train.py", *eval_args(shards, ckpt, codec, again, prompts, scorers, **args), "--resume", str(mid)])
    a, b = adapter(out / "final"), adapter(again / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    recs, after = evals(out), evals(again)
    assert [r["step"] for r in recs] == [0, 2, 4] and [r["step"] for r in after] == [4]
    assert after[0]["wer"] == recs[-1]["wer"]
    want = min(recs, key=lambda r: r["wer"])["step"]
    assert json.loads((out / "final" / "final.json").read_text())["best_step"] == want
    assert ckpt_io.load_trainer_state(mid)["best_step"] == min(recs[:2], key=lambda r: r["wer"])["step"]
