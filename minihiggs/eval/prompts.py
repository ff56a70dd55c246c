"""The prompt set `python -m minihiggs.eval` scores: what to say, with whose voice, and the ground truth.

* prepared shards (`--shards`): the validation split (the stable id hash train.py uses, `--val_fraction`). Each
  utterance is said with its speaker's voice: the reference its sample already holds (prep --voice_clone), or
  else another utterance of the same speaker (a training one first, the lowest index: the same on every run).
  An utterance whose speaker has no other utterance (or no speaker) is left out and named in the log. The ground
  truth is the sample's own target codes, decoded with the codec like the generated ones (so SIM(truth, ref)
  is the ceiling of what the codec can reproduce).
* a prompts JSONL as `python -m minihiggs.generate --prompts` reads it (a reference is required here), plus an
  optional `truth_audio` (a WAV of the text said by the reference speaker) for the ceiling and the duration
  ratio.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..audio.io import load_audio
from ..errors import EvalError
from ..generate.prompt import Prompt, prompt_from_sample, reference_from_sample, tts_prompt
from ..generate.speak import References, read_prompts
from ..text.chatml import DEFAULT_SCENE


@dataclass
class EvalItem:
    name: str
    text: str                 # what should be heard (WER/CER reference)
    prompt: Prompt
    ref_codes: torch.Tensor   # the voice reference, [codebooks, frames]
    reference: str = ""       # where the voice comes from (a sample id, a file)
    truth_codes: torch.Tensor | None = None
    truth_wave_16k: object | None = None
    seed: int | None = None


def pick_references(speakers: list, val: list[int]) -> dict[int, int | None]:
    """For each validation index, another utterance of its speaker: a training one first, lowest index first."""
    val_set = set(val)
    by_speaker: dict = {}
    for j, s in enumerate(speakers):
        if s is not None:
            by_speaker.setdefault(s, []).append(j)
    out = {}
    for i in val:
        others = [j for j in by_speaker.get(speakers[i], []) if j != i]
        others.sort(key=lambda j: (j in val_set, j))
        out[i] = others[0] if others else None
    return out


def _audio_out_segments(sample, cfg) -> list[int]:
    """Indices into sample.audio_codes of the audio-out segments (placeholders in text order)."""
    ids = [t for t in sample.input_ids.tolist() if t in (cfg.audio_in_token_id, cfg.audio_out_token_id)]
    return [k for k, t in enumerate(ids) if t == cfg.audio_out_token_id]


def shard_items(path: str, tok, cfg, val_fraction: float, log) -> list[EvalItem]:
    from ..data.dataset import ShardDataset

    ds = ShardDataset(path)
    _, val = ds.split(val_fraction)
    refs = pick_references(ds.speakers, val)
    items = []
    for i in val:
        sample = ds[i]
        text_ids, truth = reference_from_sample(sample, tok, cfg)
        outs = _audio_out_segments(sample, cfg)
        if len(outs) > 1:  # prepared with a reference: keep it
            prompt = prompt_from_sample(sample, tok, cfg)
            ref_codes = sample.audio_codes[outs[0]][:cfg.audio_num_codebooks].long()
            ref_name = f"{ds.sample_ids[i]} (its own reference)"
        elif refs[i] is None:
            log(f"note: {ds.sample_ids[i]}: no other utterance of speaker {ds.speakers[i]!r} to take the voice "
                f"from; left out")
            continue
        else:
            ref = reference_from_sample(ds[refs[i]], tok, cfg)
            prompt = prompt_from_sample(sample, tok, cfg, reference=ref)
            ref_codes, ref_name = ref[1], ds.sample_ids[refs[i]]
        items.append(EvalItem(ds.sample_ids[i], tok.decode(text_ids), prompt, ref_codes, ref_name, truth_codes=truth))
    if not items:
        raise EvalError(f"{path}: no validation utterance with a voice reference (val_fraction={val_fraction}); "
                        f"the speakers need at least two utterances each")
    return items


def jsonl_items(path: str, tok, cfg, codec_name: str, device, shards: str | None) -> list[EvalItem]:
    refs = References(tok, cfg, codec_name, device, shards)
    items = []
    for it in read_prompts(path, Path("."), DEFAULT_SCENE, extra_fields=frozenset({"truth_audio"})):
        ref = refs.resolve(it)
        if ref is None:
            raise EvalError(f"{it.where}: scoring needs a voice reference (ref_audio, ref_codes or ref_sample)")
        truth = None
        if it.extra.get("truth_audio"):
            truth = load_audio(Path(path).parent / str(it.extra["truth_audio"]), 16000)
        prompt = tts_prompt(tok, it.text, scene=it.scene, reference=ref, name=it.where)
        ref_name = it.ref_sample or it.ref_codes or it.ref_audio or ""
        items.append(EvalItem(it.name, it.text, prompt, ref[1], ref_name, truth_wave_16k=truth, seed=it.seed))
    return items
