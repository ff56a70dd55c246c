"""Synthetic ChatML-shaped samples for tests (real special-token ids, random text and codes)."""

from __future__ import annotations

import torch

from minihiggs.data.sample import Sample

BOS, SH, EH, NL, EOT = 128000, 128006, 128007, 271, 128009
AUDIO_BOS, AUDIO_EOS, AUDIO_OUT_BOS, AUDIO, AUDIO_OUT = 128011, 128012, 128013, 128015, 128016


def synth_sample(g: torch.Generator, n_text: int = 6, audio_in: int | None = 5, audio_out: int | None = 7,
                 train_audio: bool = True, train_text_turn: bool = False, sid: str = "") -> Sample:
    def rnd(n):
        return torch.randint(0, 128000, (n,), generator=g).tolist()

    ids, labels, codes = [BOS, SH, 9125, EH, NL] + rnd(n_text) + [EOT], None, []
    labels = [-100] * len(ids)

    def add(toks, lab):
        ids.extend(toks)
        labels.extend(toks if lab else [-100] * len(toks))

    add([SH, 882, EH, NL] + rnd(n_text), False)
    if audio_in:
        add([AUDIO_BOS, AUDIO, AUDIO_EOS], False)
        codes.append(torch.randint(0, 1024, (8, audio_in), generator=g))
    add([EOT, SH, 78191, EH, NL], False)
    if audio_out:
        add([AUDIO_OUT_BOS, AUDIO_OUT, AUDIO_EOS, EOT], train_audio)
        codes.append(torch.randint(0, 1024, (8, audio_out), generator=g))
    if train_text_turn:
        add([SH, 882, EH, NL] + rnd(3) + [EOT, SH, 78191, EH, NL], False)
        add(rnd(n_text) + [EOT], True)
    return Sample(torch.tensor(ids), torch.tensor(labels), codes, sample_id=sid)


def synth_samples(n: int, seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        out.append(synth_sample(g, n_text=3 + i % 4, audio_in=(4 + i) if i % 3 else None, audio_out=5 + 2 * (i % 3),
                                train_audio=i % 4 != 3, train_text_turn=i % 2 == 1, sid=f"s{i}"))
    return out
