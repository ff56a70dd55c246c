"""`python -m minihiggs.eval`: is the fine-tuned voice intelligible and still the speaker's? WER/CER (Whisper),
SIM (WavLM x-vector), the cheap signals and the real-time factor, per utterance and per model, side by side.

    python -m minihiggs.eval --shards data/shards --base_ckpt bosonai/higgs-audio-v2-generation-3B-base \\
        --model base=bosonai/higgs-audio-v2-generation-3B-base --model tuned=runs/me/best --out_dir runs/me/eval
    python -m minihiggs.eval --prompts prompts.jsonl --model runs/me/merged --out_dir eval/

The work is `minihiggs.eval.run.evaluate`; bad input ends in one `eval: error: ...` line (exit 2).
"""

from __future__ import annotations

import argparse
import sys

from ..cli import HelpFormatter, run
from ..constants import DEFAULT_CODEC_REPO


def parse_args(argv: list[str] | None = None):
    from ..generate.sampling import SamplingConfig
    from .asr import DEFAULT_ASR
    from .run import EvalConfig
    from .speaker import DEFAULT_SV

    ap = argparse.ArgumentParser(prog="python -m minihiggs.eval", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)  # (repeatable --model: argparse here, cli's rules)
    m = ap.add_argument_group("models (side by side)")
    m.add_argument("--model", action="append", default=[], metavar="[LABEL=]PATH",
                   help="a checkpoint (base or merged) or a LoRA adapter dir; repeat for several")
    m.add_argument("--base_ckpt", default=None, help="the base for adapters (default: each adapter's recorded base)")
    m.add_argument("--codec", default=DEFAULT_CODEC_REPO, help="audio tokenizer dir or Hub id")
    m.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    m.add_argument("--dtype", default=None, choices=["bf16", "bfloat16", "fp32", "float32"],
                   help="model and ASR dtype (default: bf16 on GPU, fp32 on CPU)")
    p = ap.add_argument_group("prompt set")
    p.add_argument("--shards", default=None, help="prepared shards: score their validation split (and resolve "
                                                  "ref_sample ids of --prompts)")
    p.add_argument("--val_fraction", type=float, default=0.05, help="validation share, as train.py chooses it")
    p.add_argument("--prompts", default=None, help="JSONL as `minihiggs.generate --prompts` reads it, with a "
                                                   "reference per line and optionally truth_audio")
    p.add_argument("--max_utterances", type=int, default=None, help="score only the first N")
    p.add_argument("--out_dir", required=True, help="WAVs per model, utterances.jsonl, summary.md, eval.png")
    s = ap.add_argument_group("scorers")
    s.add_argument("--asr_model", default=DEFAULT_ASR, help="Whisper dir or Hub id (128-mel: large-v3 or -turbo)")
    s.add_argument("--language", default="en", help="Whisper language token")
    s.add_argument("--sv_model", default=DEFAULT_SV, help="WavLMForXVector dir or Hub id")
    g = ap.add_argument_group("decoding (as minihiggs.generate)")
    g.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    g.add_argument("--top_k", type=int, default=None)
    g.add_argument("--top_p", type=float, default=0.95)
    g.add_argument("--seed", type=int, default=0, help="prompt k samples with seed + k (same for every model)")
    g.add_argument("--ras_win", type=int, default=7)
    g.add_argument("--ras_max_repeat", type=int, default=2)
    g.add_argument("--max_new_frames", type=int, default=1024, help="the length limit (25 per second)")
    g.add_argument("--batch_size", type=int, default=8, help="prompts generated (and transcribed) together")
    g.add_argument("--no_progress", action="store_true")
    a = ap.parse_args(argv)
    sampling = SamplingConfig(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed,
                              ras_win_len=a.ras_win, ras_win_max_num_repeat=a.ras_max_repeat)
    return EvalConfig(models=a.model, out_dir=a.out_dir, base_ckpt=a.base_ckpt, shards=a.shards, prompts=a.prompts,
                      val_fraction=a.val_fraction, max_utterances=a.max_utterances, codec=a.codec,
                      asr_model=a.asr_model, sv_model=a.sv_model, language=a.language, sampling=sampling,
                      max_new_frames=a.max_new_frames, batch_size=a.batch_size, device=a.device, dtype=a.dtype,
                      progress=not a.no_progress)


def main(argv: list[str] | None = None) -> int:
    from .run import evaluate

    def command(args: list[str] | None) -> None:
        evaluate(parse_args(args))

    return run("eval", command, argv)


if __name__ == "__main__":
    sys.exit(main())
