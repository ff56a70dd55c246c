"""One training example, before batching.

A `Sample` is what prep stores and the dataset returns: the ChatML token ids with audio placeholders, their
labels (same positions as the inputs; the loss shifts), and one entry of audio codes per placeholder, in
the order the placeholders appear in the text.

The reference's raw samples (upstream layout) differ for a Whisper clip longer than 30 s: ONE `<|AUDIO|>`
placeholder for the clip but one code segment (and one Whisper chunk) per 30 s chunk; its collator repeats the
`<|audio_bos|><|AUDIO|><|audio_eos|>` triple once per chunk. Such a sample says how many chunks each `<|AUDIO|>`
clip has (`audio_in_chunks`) and `expanded()` (called by `collate`) turns it into the one-placeholder-per-segment
layout that prep writes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..text.chatml import expand_audio_in


@dataclass
class Sample:
    input_ids: torch.Tensor  # [T] int64: text tokens, <|AUDIO|> / <|AUDIO_OUT|> placeholders included
    label_ids: torch.Tensor  # [T] int64: -100 where nothing is trained; same positions as input_ids
    # One [num_codebooks, frames] int64 tensor per placeholder (<|AUDIO|> or <|AUDIO_OUT|>), in text order.
    audio_codes: list[torch.Tensor] = field(default_factory=list)
    # Whisper checkpoints only: one [num_mel_bins, 3000] float32 log-mel chunk per <|AUDIO|> placeholder, and the
    # number of valid mel frames of each (ceil(samples / 160)). A clip longer than 30 s is several placeholders.
    whisper_features: list[torch.Tensor] | None = None
    whisper_lengths: list[int] | None = None
    sample_id: str = ""
    # Upstream layout only: the number of 30 s chunks of each <|AUDIO|> clip, in text order (see the module doc);
    # audio_codes and whisper_features then hold one entry per chunk. None: one placeholder per segment.
    audio_in_chunks: list[int] | None = None

    def expanded(self, audio_in_id: int) -> "Sample":
        """This sample with one placeholder per code segment: each `<|AUDIO|>` triple repeated per chunk of its
        clip, labels alike, as the reference collator does. The sample itself is not modified."""
        if self.audio_in_chunks is None:
            return self
        ids, labels = expand_audio_in(self.input_ids.tolist(), self.label_ids.tolist(), audio_in_id,
                                      [int(c) for c in self.audio_in_chunks])
        return dataclasses.replace(self, input_ids=torch.tensor(ids, dtype=self.input_ids.dtype),
                                   label_ids=torch.tensor(labels, dtype=self.label_ids.dtype), audio_in_chunks=None)

    def validate(self, audio_in_id: int, audio_out_id: int, num_codebooks: int) -> None:
        """Raise ValueError (naming the sample) unless placeholders and audio entries line up one to one."""
        where = f"sample {self.sample_id!r}" if self.sample_id else "sample"
        if self.input_ids.ndim != 1 or self.label_ids.shape != self.input_ids.shape:
            raise ValueError(f"{where}: input_ids {tuple(self.input_ids.shape)} and label_ids "
                             f"{tuple(self.label_ids.shape)} must be equal-length 1-D tensors")
        n_in = int((self.input_ids == audio_in_id).sum())
        n_out = int((self.input_ids == audio_out_id).sum())
        if self.audio_in_chunks is not None:
            if len(self.audio_in_chunks) != n_in or any(int(c) < 1 for c in self.audio_in_chunks):
                raise ValueError(f"{where}: audio_in_chunks={list(self.audio_in_chunks)} must give a chunk count "
                                 f">= 1 for each of its {n_in} <|AUDIO|> placeholders")
            n_in = sum(int(c) for c in self.audio_in_chunks)
        if n_in + n_out != len(self.audio_codes):
            hint = ("" if self.audio_in_chunks is not None else "; an upstream-layout sample (one <|AUDIO|> per clip, "
                    "one code segment per 30 s chunk) must give its chunk counts in audio_in_chunks")
            raise ValueError(f"{where}: {n_in} <|AUDIO|> (chunks) + {n_out} <|AUDIO_OUT|> placeholders but "
                             f"{len(self.audio_codes)} audio code segments{hint}")
        for i, c in enumerate(self.audio_codes):
            if c.ndim != 2 or c.shape[0] < num_codebooks:
                raise ValueError(f"{where}: audio segment {i} has shape {tuple(c.shape)}, "
                                 f"expected [{num_codebooks}, frames]")
        if self.whisper_features is not None:
            if len(self.whisper_features) != n_in or len(self.whisper_lengths or []) != n_in:
                raise ValueError(f"{where}: {n_in} <|AUDIO|> placeholders (chunks) but "
                                 f"{len(self.whisper_features)} whisper feature chunks")
