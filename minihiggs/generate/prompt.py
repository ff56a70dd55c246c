"""Generation prompts, built as upstream's generation example and serve engine build them (golden README §3).

    system     "Generate audio following instruction." + the <|scene_desc_start|> block (scene description)
    [user      the reference transcript          ]  voice clone (examples/generation.py):
    [assistant the reference audio (audio out)   ]  the reference is the previous assistant turn's audio
    user       the text to speak
    postfix    <|start_header_id|>assistant<|end_header_id|>\\n\\n [+ <|audio_out_bos|> when audio is forced]

Turn rules are `prepare_chatml_sample`'s (text/chatml.py): `<|begin_of_text|>` first, `<|eot_id|>` after each
turn (`<|eom_id|>` when the next turn is also the assistant's), an assistant audio as
`<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>`. Each `<|AUDIO_OUT|>` of the prompt carries its codes; merged
(`merge_prompt`) it becomes the segment's `[BOS, codes, EOS]` columns with the delay pattern, n + 9 columns, as in
training.

References come as precomputed codes (`.npy`, [8, frames]), as a WAV encoded with `minihiggs.codec`, or as a
sample of prepared shards (`reference_from_sample`: its trained audio-out segment and the user turn before it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
import torch

from ..config import HiggsConfig
from ..constants import IGNORE_INDEX
from ..data.batch import Batch, collate
from ..data.sample import Sample
from ..errors import GenerateError
from ..text.chatml import DEFAULT_SCENE, tts_system_prompt


@dataclass
class AudioPart:
    """An audio content of a prompt turn: raw codes [num_codebooks, frames]."""

    codes: torch.Tensor


Part = Union[str, list, AudioPart]  # text, already-tokenized text (list[int]) or audio


@dataclass
class Turn:
    role: str  # system / user / assistant
    parts: list  # list[Part]


@dataclass
class Prompt:
    """A ready prompt: unmerged ChatML ids (with one `<|AUDIO_OUT|>` per context audio) + those audios' codes."""

    ids: list[int]
    context_codes: list[torch.Tensor] = field(default_factory=list)
    force_audio: bool = True
    name: str = ""


def prompt_ids(turns: list[Turn], tok, force_audio: bool = True) -> Prompt:
    """ChatML ids of `turns` + the serve engine's assistant postfix. `tok` needs `encode(str)` (special tokens
    recognised). Audio parts must sit in assistant turns (the serve engine drops audio-in codes)."""
    ids: list[int] = []
    codes: list[torch.Tensor] = []
    for t, turn in enumerate(turns):
        ids += tok.encode(("<|begin_of_text|>" if t == 0 else "") +
                          f"<|start_header_id|>{turn.role}<|end_header_id|>\n\n")
        for part in turn.parts:
            if isinstance(part, AudioPart):
                if turn.role != "assistant":
                    raise GenerateError(f"prompt turn {t} ({turn.role}): reference audio must be an assistant turn")
                ids += tok.encode("<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>")
                codes.append(part.codes)
            elif isinstance(part, str):
                ids += tok.encode(part)
            else:
                ids += [int(i) for i in part]
        nxt = turns[t + 1].role if t + 1 < len(turns) else None
        ids += tok.encode("<|eom_id|>" if turn.role == "assistant" and nxt == "assistant" else "<|eot_id|>")
    postfix = "<|start_header_id|>assistant<|end_header_id|>\n\n" + ("<|audio_out_bos|>" if force_audio else "")
    ids += tok.encode(postfix)
    return Prompt(ids, codes, force_audio)


def tts_prompt(tok, text: str | list[int], scene: str | None = DEFAULT_SCENE,
               reference: tuple[str | list[int], torch.Tensor] | None = None, force_audio: bool = True,
               name: str = "") -> Prompt:
    """The TTS prompt of upstream's generation example: system (scene), [reference transcript + audio], text."""
    body = tok.encode(text) if isinstance(text, str) else list(text)
    if not body:
        raise GenerateError(f"{name + ': ' if name else ''}the text to speak is empty (it tokenizes to nothing)")
    turns = [Turn("system", [tts_system_prompt(scene)])]
    if reference is not None:
        ref_text, ref_codes = reference
        turns += [Turn("user", [ref_text]), Turn("assistant", [AudioPart(ref_codes)])]
    turns.append(Turn("user", [body]))
    p = prompt_ids(turns, tok, force_audio)
    p.name = name
    return p


# ---- references -------------------------------------------------------------------------------------------------
def load_codes(path: str | Path, num_codebooks: int, codebook_size: int) -> torch.Tensor:
    """A `.npy` of int codes [num_codebooks, frames] (extra codebooks are dropped, as in training)."""
    path = Path(path)
    if not path.is_file():
        raise GenerateError(f"{path}: reference codes file not found")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises ValueError / OSError / EOFError for damaged files
        raise GenerateError(f"{path}: not a readable .npy file ({type(e).__name__}: {e})") from None
    if arr.ndim != 2 or arr.shape[0] < num_codebooks or arr.shape[1] == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise GenerateError(f"{path}: expected integer codes [{num_codebooks}, frames], got {arr.dtype} "
                            f"{list(arr.shape)}")
    arr = arr[:num_codebooks].astype(np.int64)
    if arr.min() < 0 or arr.max() >= codebook_size:
        raise GenerateError(f"{path}: codes must lie in [0, {codebook_size}), got [{arr.min()}, {arr.max()}]")
    return torch.from_numpy(np.ascontiguousarray(arr))


def reference_from_sample(sample: Sample, tok, cfg: HiggsConfig) -> tuple[list[int], torch.Tensor]:
    """(transcript ids, codes) of a prepared sample: its last audio-out segment and the user turn before it."""
    ids = sample.input_ids.tolist()
    outs = [i for i, t in enumerate(ids) if t in (cfg.audio_out_token_id, cfg.audio_in_token_id)]
    last_out = max((i for i in outs if ids[i] == cfg.audio_out_token_id), default=None)
    if last_out is None:
        raise GenerateError(f"sample {sample.sample_id!r} has no audio-out segment to use as a reference")
    seg = outs.index(last_out)
    header = tok.encode("<|start_header_id|>user<|end_header_id|>\n\n")
    eot = tok.encode("<|eot_id|>")
    start = None
    for i in range(last_out - len(header), -1, -1):
        if ids[i:i + len(header)] == header:
            start = i + len(header)
            break
    if start is None:
        raise GenerateError(f"sample {sample.sample_id!r} has no user turn before its audio")
    end = start
    while end < last_out and ids[end:end + len(eot)] != eot:
        end += 1
    return ids[start:end], sample.audio_codes[seg][:cfg.audio_num_codebooks].long()


def prompt_from_sample(sample: Sample, tok, cfg: HiggsConfig,
                       reference: tuple[str | list[int], torch.Tensor] | None = None, name: str = "") -> Prompt:
    """The generation prompt of a prepared sample: its ids up to the last assistant turn (system turn, scene,
    any reference turns, the text) + the serve engine's postfix, with its context audio. `reference` inserts a
    voice reference (user transcript + assistant audio) after the system turn, as upstream's voice clone does."""
    ids = sample.input_ids.tolist()
    header = tok.encode("<|start_header_id|>assistant<|end_header_id|>\n\n")
    cut = next((i for i in range(len(ids) - len(header), -1, -1) if ids[i:i + len(header)] == header), None)
    if cut is None:
        raise GenerateError(f"sample {sample.sample_id!r} has no assistant turn")
    body = ids[:cut]
    if cfg.audio_in_token_id in body:
        raise GenerateError(f"sample {sample.sample_id!r}: audio-in (<|AUDIO|>) content is not supported in "
                            f"generation prompts")
    codes = [c[:cfg.audio_num_codebooks].long() for c in sample.audio_codes[:body.count(cfg.audio_out_token_id)]]
    if reference is not None:
        eot, start = tok.encode("<|eot_id|>"), tok.encode("<|begin_of_text|>")
        system = start + tok.encode("<|start_header_id|>system<|end_header_id|>\n\n")
        at = len(start) if body[:len(start)] == start else 0
        if body[:len(system)] == system:  # after the system turn's <|eot_id|>
            at = next(i for i in range(len(system), len(body)) if body[i:i + len(eot)] == eot) + len(eot)
        ref_text, ref_codes = reference
        turns = [Turn("user", [ref_text]), Turn("assistant", [AudioPart(ref_codes)])]
        ref = prompt_ids(turns, tok, force_audio=False)
        # prompt_ids starts a conversation (<|begin_of_text|>) and ends with the assistant postfix: keep the turns
        ref_ids = ref.ids[len(start):len(ref.ids) - len(header)]
        n_before = body[:at].count(cfg.audio_out_token_id)
        body = body[:at] + ref_ids + body[at:]
        codes = codes[:n_before] + ref.context_codes + codes[n_before:]
    return Prompt(body + header + tok.encode("<|audio_out_bos|>"), codes, True, name or sample.sample_id)


# ---- merging ----------------------------------------------------------------------------------------------------
@dataclass
class MergedPrompt:
    """The prompt as the model sees it: collated exactly like a training sample (each `<|AUDIO_OUT|>` replaced by
    its `[BOS, codes, EOS]` columns with the delay pattern), one row, no padding."""

    batch: Batch

    @property
    def input_ids(self) -> torch.Tensor:  # [P] (the placeholder id at audio columns)
        return self.batch.input_ids[0]

    @property
    def discrete(self) -> torch.Tensor:  # [P] bool: audio-out column positions
        return self.batch.discrete_mask[0]

    @property
    def columns(self) -> torch.Tensor:  # [K, N] the columns (BOS / codes / EOS, delay pattern applied)
        return self.batch.audio_out_codes


def merge_prompt(prompt: Prompt, cfg: HiggsConfig) -> MergedPrompt:
    if any(t == cfg.audio_in_token_id for t in prompt.ids):
        raise GenerateError(f"{prompt.name or 'prompt'}: audio-in (<|AUDIO|>) content is not supported in "
                            f"generation prompts (the serve engine drops it); give references as assistant audio")
    n_out = sum(t == cfg.audio_out_token_id for t in prompt.ids)
    if n_out != len(prompt.context_codes):
        raise GenerateError(f"{prompt.name or 'prompt'}: {n_out} <|AUDIO_OUT|> placeholders but "
                            f"{len(prompt.context_codes)} audio code segments")
    if prompt.ids and prompt.ids[-1] == cfg.audio_out_token_id:
        raise GenerateError(f"{prompt.name or 'prompt'}: a prompt may not end with <|AUDIO_OUT|> (continuing given "
                            f"audio is not supported)")
    ids = torch.tensor(prompt.ids, dtype=torch.long)
    sample = Sample(ids, torch.full_like(ids, IGNORE_INDEX), [torch.as_tensor(c).long() for c in prompt.context_codes],
                    sample_id=prompt.name or "")
    return MergedPrompt(collate([sample], cfg, round_to=1))
