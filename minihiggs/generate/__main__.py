"""`python -m minihiggs.generate`: speak text with a (fine-tuned) Higgs Audio v2 model -> WAV + codes.

    python -m minihiggs.generate --base_ckpt CKPT --adapter runs/me/best --text "Hello." --out hello.wav
    python -m minihiggs.generate --adapter runs/me/final --text "..." --ref_audio ref.wav --ref_text "..." --out a.wav
    python -m minihiggs.generate --base_ckpt runs/me/merged --prompts prompts.jsonl --out_dir out/

Decoding is upstream's (serve-engine defaults: temperature 0.7, top-p 0.95, RAS 7/2); --temperature 0 is greedy.
The work is `minihiggs.generate.speak.speak`; bad input ends in one `generate: error: ...` line (exit 2).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from ..cli import flag, parse_flags, run
from ..constants import DEFAULT_CODEC_REPO
from ..text.chatml import DEFAULT_SCENE

PROG = "generate"  # the name in error lines


@dataclass
class GenerateArgs:
    # -- model
    base_ckpt: str | None = flag(None, "base (or merged) checkpoint dir or Hub id; default: the adapter's recorded "
                                       "base", "model")
    adapter: str | None = flag(None, "LoRA adapter dir: a run's best/, final/ or checkpoints/step-N", "model")
    codec: str | None = flag(None, "audio tokenizer dir or Hub id (default: the one recorded with --shards or with "
                                   f"the adapter's run, else {DEFAULT_CODEC_REPO})", "model")
    device: str | None = flag(None, "cuda / cpu (default: cuda when available)", "model")
    dtype: str | None = flag(None, "model dtype (default: bf16 on GPU, fp32 on CPU)", "model",
                             choices=["bf16", "bfloat16", "fp32", "float32"])
    quantize: str | None = flag(None, "store the decoder linears in 4-bit NormalFloat (nf4) or 8 bits (int8); an "
                                      "adapter then stays unmerged (README: Small GPUs)", "model",
                                choices=["nf4", "int8"])
    # -- what to say
    text: str | None = flag(None, "the text to speak", "what to say")
    out: str | None = flag(None, "output WAV (the codes go beside it as .npy)", "what to say")
    scene: str = flag(DEFAULT_SCENE, "scene description of the system prompt ('' for none)", "what to say")
    ref_audio: str | None = flag(None, "voice reference WAV (encoded with --codec)", "what to say")
    ref_codes: str | None = flag(None, "voice reference as codes .npy [8, frames]", "what to say")
    ref_text: str | None = flag(None, "transcript of the reference", "what to say")
    ref_sample: str | None = flag(None, "a prepared sample id as the reference (with --shards)", "what to say")
    shards: str | None = flag(None, "prepared shard directory (prep.py --out) for --ref_sample", "what to say")
    prompts: str | None = flag(None, "JSONL of {text, name, ref_audio|ref_codes|ref_sample, ref_text, scene, seed}, "
                                     "one request per line", "what to say")
    out_dir: str | None = flag(None, "output directory for --prompts", "what to say")
    batch_size: int = flag(8, "prompts decoded together", "what to say")
    # -- decoding
    temperature: float = flag(0.7, "0: greedy", "decoding (upstream serve-engine semantics)")
    top_k: int | None = flag(None, "keep the k best (0 / unset: off)", "decoding (upstream serve-engine semantics)")
    top_p: float = flag(0.95, "nucleus mass (1: off)", "decoding (upstream serve-engine semantics)")
    seed: int | None = flag(None, "sampling seed (one generator per prompt)", "decoding (upstream serve-engine "
                                                                               "semantics)")
    ras_win: int = flag(7, "repetition-aware sampling window (0: off)", "decoding (upstream serve-engine semantics)")
    ras_max_repeat: int = flag(2, "RAS: redraw a code seen this often in the window",
                               "decoding (upstream serve-engine semantics)")
    max_new_frames: int = flag(1024, "decoding steps at most (upstream's max_new_tokens: each audio frame and each "
                                     "text token is one; 25 frames per second of audio)",
                               "decoding (upstream serve-engine semantics)")
    no_progress: bool = flag(False, "no progress bar", "decoding (upstream serve-engine semantics)")


def speak_config(a: GenerateArgs):
    """The flags as `speak`'s SpeakConfig."""
    from .sampling import SamplingConfig
    from .speak import SpeakConfig

    sampling = SamplingConfig(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed,
                              ras_win_len=a.ras_win, ras_win_max_num_repeat=a.ras_max_repeat)
    return SpeakConfig(base_ckpt=a.base_ckpt, adapter=a.adapter, text=a.text, out=a.out, ref_audio=a.ref_audio,
                       ref_codes=a.ref_codes, ref_text=a.ref_text, ref_sample=a.ref_sample, scene=a.scene or None,
                       prompts=a.prompts, out_dir=a.out_dir, shards=a.shards, sampling=sampling,
                       max_new_frames=a.max_new_frames, batch_size=a.batch_size, codec=a.codec, device=a.device,
                       dtype=a.dtype, quantize=a.quantize, progress=not a.no_progress)


def generate(argv: list[str] | None) -> None:
    args = parse_flags(GenerateArgs, argv, prog="python -m minihiggs.generate", description=__doc__.split("\n\n")[0])
    from .speak import speak

    speak(speak_config(args))


def main(argv: list[str] | None = None) -> int:
    return run(PROG, generate, argv)


if __name__ == "__main__":
    sys.exit(main())
