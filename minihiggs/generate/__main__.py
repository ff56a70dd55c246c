"""`python -m minihiggs.generate`: speak text with a (fine-tuned) Higgs Audio v2 model -> WAV + codes.

    python -m minihiggs.generate --base_ckpt CKPT --adapter runs/me/best --text "Hello." --out hello.wav
    python -m minihiggs.generate --adapter runs/me/final --text "..." --ref_audio ref.wav --ref_text "..." --out a.wav
    python -m minihiggs.generate --base_ckpt runs/me/merged --prompts prompts.jsonl --out_dir out/

Decoding is upstream's (serve-engine defaults: temperature 0.7, top-p 0.95, RAS 7/2); --temperature 0 is greedy.
The work is `minihiggs.generate.speak.speak`; bad input ends in one `generate: error: ...` line (exit 2).
"""

from __future__ import annotations

import argparse
import sys

from ..constants import DEFAULT_CODEC_REPO
from ..errors import UserError
from ..text.chatml import DEFAULT_SCENE


def parse_args(argv: list[str] | None = None):
    from .sampling import SamplingConfig
    from .speak import SpeakConfig

    ap = argparse.ArgumentParser(prog="python -m minihiggs.generate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = ap.add_argument_group("model")
    m.add_argument("--base_ckpt", default=None, help="base (or merged) checkpoint dir or Hub id; default: the "
                                                     "adapter's recorded base")
    m.add_argument("--adapter", default=None, help="LoRA adapter dir: a run's best/, final/ or checkpoints/step-N")
    m.add_argument("--codec", default=DEFAULT_CODEC_REPO, help="audio tokenizer dir or Hub id")
    m.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    m.add_argument("--dtype", default=None, choices=["bf16", "bfloat16", "fp32", "float32"],
                   help="model dtype (default: bf16 on GPU, fp32 on CPU)")
    r = ap.add_argument_group("what to say")
    r.add_argument("--text", default=None, help="the text to speak")
    r.add_argument("--out", default=None, help="output WAV (the codes go beside it as .npy)")
    r.add_argument("--scene", default=DEFAULT_SCENE, help="scene description of the system prompt ('' for none)")
    r.add_argument("--ref_audio", default=None, help="voice reference WAV (encoded with --codec)")
    r.add_argument("--ref_codes", default=None, help="voice reference as codes .npy [8, frames]")
    r.add_argument("--ref_text", default=None, help="transcript of the reference")
    r.add_argument("--ref_sample", default=None, help="a prepared sample id as the reference (with --shards)")
    r.add_argument("--shards", default=None, help="prepared shard directory (prep.py --out) for --ref_sample")
    r.add_argument("--prompts", default=None, help="JSONL of {text, name, ref_audio|ref_codes|ref_sample, "
                                                   "ref_text, scene, seed}, one request per line")
    r.add_argument("--out_dir", default=None, help="output directory for --prompts")
    r.add_argument("--batch_size", type=int, default=8, help="prompts decoded together")
    s = ap.add_argument_group("decoding (upstream serve-engine semantics)")
    s.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    s.add_argument("--top_k", type=int, default=None, help="keep the k best (0 / unset: off)")
    s.add_argument("--top_p", type=float, default=0.95, help="nucleus mass (1: off)")
    s.add_argument("--seed", type=int, default=None, help="sampling seed (one generator per prompt)")
    s.add_argument("--ras_win", type=int, default=7, help="repetition-aware sampling window (0: off)")
    s.add_argument("--ras_max_repeat", type=int, default=2, help="RAS: redraw a code seen this often in the window")
    s.add_argument("--max_new_frames", type=int, default=1024,
                   help="decoding iterations (upstream's max_new_tokens; 25 per second of audio)")
    s.add_argument("--no_progress", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    sampling = SamplingConfig(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed,
                              ras_win_len=a.ras_win, ras_win_max_num_repeat=a.ras_max_repeat)
    return SpeakConfig(base_ckpt=a.base_ckpt, adapter=a.adapter, text=a.text, out=a.out, ref_audio=a.ref_audio,
                       ref_codes=a.ref_codes, ref_text=a.ref_text, ref_sample=a.ref_sample, scene=a.scene or None,
                       prompts=a.prompts, out_dir=a.out_dir, shards=a.shards, sampling=sampling,
                       max_new_frames=a.max_new_frames, batch_size=a.batch_size, codec=a.codec, device=a.device,
                       dtype=a.dtype, progress=not a.no_progress)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    from .speak import speak

    try:
        speak(cfg)
    except UserError as e:
        print(f"generate: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
