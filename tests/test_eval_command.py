"""`python -m minihiggs.eval` end to end on tiny random models (Higgs checkpoint + adapter, decode-only codec,
the tiny Whisper and WavLM of minihiggs.eval.tiny): files, side-by-side models, repeatability, one-line errors;
and the shard prompt set's choice of voice references."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from helpers import LLAMA_DIR, TINY
from minihiggs import load_model
from minihiggs.eval.__main__ import main as eval_main
from minihiggs.eval.prompts import pick_references
from minihiggs.eval.tiny import write_tiny_asr, write_tiny_speaker
from minihiggs.lora.adapter import save_adapter
from minihiggs.lora.apply import apply_lora
from minihiggs.model.tiny import write_tiny_checkpoint
from minihiggs.text.tokenizer import write_higgs_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
N_ITEMS, MAX_FRAMES = 3, 14


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    base = write_tiny_checkpoint(root / "base", seed=0, **TINY)
    write_higgs_tokenizer(LLAMA_DIR, base)
    model = load_model(base)
    apply_lora(model, r=4, alpha=8, seed=1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    adapter = save_adapter(model, root / "adapter", base_model_name_or_path=str(base))
    from minihiggs.codec.tiny import write_random_decoder

    codec = write_random_decoder(root / "codec")
    g = torch.Generator().manual_seed(0)
    lines = []
    for k in range(N_ITEMS):
        np.save(root / f"ref{k}.npy", torch.randint(0, 1024, (8, 20), generator=g).numpy())
        t = np.arange(16000 * (k + 1)) / 16000
        sf.write(root / f"truth{k}.wav", (0.2 * np.sin(2 * np.pi * 150 * t)).astype(np.float32), 16000)
        lines.append({"text": f"Sentence number {k}.", "name": f"u{k}", "ref_codes": f"ref{k}.npy",
                      "ref_text": "A reference.", "truth_audio": f"truth{k}.wav"})
    (root / "prompts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    scorers = ["--codec", str(codec), "--asr_model", str(write_tiny_asr(root / "asr")),
               "--sv_model", str(write_tiny_speaker(root / "sv")), "--max_new_frames", str(MAX_FRAMES),
               "--no_progress"]
    return {"root": root, "base": base, "scorers": scorers,
            "args": ["--prompts", str(root / "prompts.jsonl"), "--model", f"base={base}", "--model",
                     f"tuned={adapter}"] + scorers}


def run(args, capsys):
    code = eval_main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def rows_without_timing(path):
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    for r in rows:
        assert r.pop("rtf") > 0
    return rows


def test_eval_writes_rows_table_and_wavs_and_is_repeatable_batched(setup, capsys):
    root, args = setup["root"], setup["args"]
    code, out, err = run(args + ["--out_dir", str(root / "a"), "--batch_size", "3"], capsys)
    assert code == 0, err
    rows = rows_without_timing(root / "a" / "utterances.jsonl")
    assert [(r["model"], r["name"]) for r in rows] == [(m, f"u{k}") for m in ("base", "tuned") for k in range(N_ITEMS)]
    for r in rows:
        assert r["ref_words"] == 3 and 0 <= r["word_edits"] and r["wer"] == r["word_edits"] / 3
        assert r["stop_reason"] in ("eos", "length") and -1 <= r["sim"] <= 1 and -1 <= r["sim_truth"] <= 1
        assert r["seconds"] <= MAX_FRAMES / 25 and r["duration_ratio"] == pytest.approx(
            r["seconds"] / (int(r["name"][1:]) + 1))
        assert ("no_eos" in r["flags"]) == (r["stop_reason"] == "length")
        assert (root / "a" / r["model"] / f"{r['name']}.wav").is_file()
    # the two models generate different clips from the same seeds (the adapter changes the model)
    assert [r["repeated_frame_ratio"] for r in rows[:N_ITEMS]] != [r["repeated_frame_ratio"] for r in rows[N_ITEMS:]] \
        or [r["seconds"] for r in rows[:N_ITEMS]] != [r["seconds"] for r in rows[N_ITEMS:]] \
        or [r["sim"] for r in rows[:N_ITEMS]] != [r["sim"] for r in rows[N_ITEMS:]]
    summary = json.loads((root / "a" / "summary.json").read_text())
    assert set(summary) == {"base", "tuned"}
    base_rows = rows[:N_ITEMS]
    assert summary["base"]["wer"] == pytest.approx(sum(r["word_edits"] for r in base_rows) / (3 * N_ITEMS))
    table = (root / "a" / "summary.md").read_text()
    assert "| base | 3 |" in table and "| tuned | 3 |" in table and table.strip() in out
    # one prompt at a time gives the same clips and scores (seeded per prompt, batching changes nothing)
    code, _, err = run(args + ["--out_dir", str(root / "b"), "--batch_size", "1"], capsys)
    assert code == 0, err
    assert rows_without_timing(root / "b" / "utterances.jsonl") == rows


@pytest.mark.parametrize("extra, message", [
    (["--prompts", "/nonexistent.jsonl"], "prompts file not found"),
    (["--model", "base=/x", "--max_new_frames", "0"], "--max_new_frames"),
])
def test_one_line_errors(setup, extra, message, capsys, tmp_path):
    args = setup["args"]
    code, _, err = run(args + extra + ["--out_dir", str(tmp_path)], capsys)
    # one error line, the last (what was loaded before it is named on lines of its own: "base: ...")
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("eval: error: ") and message in lines[-1]
    assert sum(ln.startswith("eval:") for ln in lines) == 1


def test_no_prompt_set_and_duplicate_labels_are_errors(setup, capsys, tmp_path):
    args = setup["args"]
    code, _, err = run(["--model", "x", "--out_dir", str(tmp_path)], capsys)
    assert code == 2 and "--shards" in err
    code, _, err = run(args + ["--model", "base=/y", "--out_dir", str(tmp_path)], capsys)
    assert code == 2 and "'base'" in err and "twice" in err


def test_pick_references_by_hand():
    speakers = ["ava", "ben", "ava", None, "ava", "ben", "cleo"]
    val = [2, 5, 6, 3]
    # ava's 2 -> 0 (a training utterance, lowest index); ben's 5 -> 1; cleo has no other; no speaker -> none
    assert pick_references(speakers, val) == {2: 0, 5: 1, 6: None, 3: None}
    # a speaker whose only other utterance is in validation still gets it
    assert pick_references(["a", "a"], [0, 1]) == {0: 1, 1: 0}


def test_validation_shards_with_same_speaker_references(setup, capsys, tmp_path):
    """--shards: the validation split, each utterance voiced by another utterance of its speaker; the ground truth
    is the sample's own codes (duration ratio against its frames); a speaker with one utterance is left out."""
    from minihiggs.data.dataset import ShardDataset
    from minihiggs.prep import PrepConfig, prepare

    base = setup["base"]
    g = torch.Generator().manual_seed(3)
    lines, frames = [], {}
    for spk, n in (("ava", 4), ("ben", 4), ("cleo", 1)):
        for u in range(n):
            uid = f"{spk}_{u}"
            frames[uid] = 10 + 3 * u
            np.save(tmp_path / f"{uid}.npy", torch.randint(0, 1024, (8, frames[uid]), generator=g).numpy())
            lines.append({"id": uid, "speaker": spk, "messages": [
                {"role": "user", "content": f"Words of {spk} number {u}."},
                {"role": "assistant", "content": [{"type": "audio", "audio_codes": f"{uid}.npy"}]}]})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    prepare(PrepConfig(manifest=str(tmp_path / "m.jsonl"), out=str(tmp_path / "shards"), base_ckpt=str(base),
                       progress=False), log=lambda m: None)
    ds = ShardDataset(tmp_path / "shards")
    _, val = ds.split(0.5)
    code, out, err = run(setup["scorers"] + ["--model", str(base), "--shards", str(tmp_path / "shards"),
                                             "--val_fraction", "0.5", "--out_dir", str(tmp_path / "o")], capsys)
    assert code == 0, err
    rows = [json.loads(x) for x in (tmp_path / "o" / "utterances.jsonl").read_text().splitlines()]
    scored = [ds.sample_ids[i] for i in val if ds.speakers[i] != "cleo"]
    assert sorted({r["name"] for r in rows}) == sorted(scored) and scored
    for r in rows:
        spk = r["name"].split("_")[0]
        same = [ds.sample_ids[j] for j in range(len(ds)) if ds.speakers[j] == spk and ds.sample_ids[j] != r["name"]]
        train = [x for x in same if x not in {ds.sample_ids[i] for i in val}]
        assert r["reference"] == (train or same)[0]  # a training utterance of the speaker first
        assert r["text"] == f"Words of {r['name'].split('_')[0]} number {r['name'].split('_')[1]}."
        assert r["duration_ratio"] == pytest.approx(r["seconds"] / (frames[r["name"]] / 25))
    assert ("left out" in out) == any(ds.speakers[i] == "cleo" for i in val)
