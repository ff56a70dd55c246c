"""One training example, before batching.

A `Sample` is what prep stores and the dataset returns: the ChatML token ids with audio placeholders, their
labels (same positions as the inputs; the loss shifts), and one entry of audio codes per placeholder, in
the order the placeholders appear in the text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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

    def validate(self, audio_in_id: int, audio_out_id: int, num_codebooks: int) -> None:
        """Raise ValueError (naming the sample) unless placeholders and audio entries line up one to one."""
        where = f"sample {self.sample_id!r}" if self.sample_id else "sample"
        if self.input_ids.ndim != 1 or self.label_ids.shape != self.input_ids.shape:
            raise ValueError(f"{where}: input_ids {tuple(self.input_ids.shape)} and label_ids "
                             f"{tuple(self.label_ids.shape)} must be equal-length 1-D tensors")
        n_in = int((self.input_ids == audio_in_id).sum())
        n_out = int((self.input_ids == audio_out_id).sum())
        if n_in + n_out != len(self.audio_codes):
            raise ValueError(f"{where}: {n_in} <|AUDIO|> + {n_out} <|AUDIO_OUT|> placeholders but "
                             f"{len(self.audio_codes)} audio code segments")
        for i, c in enumerate(self.audio_codes):
            if c.ndim != 2 or c.shape[0] < num_codebooks:
                raise ValueError(f"{where}: audio segment {i} has shape {tuple(c.shape)}, "
                                 f"expected [{num_codebooks}, frames]")
        if self.whisper_features is not None:
            if len(self.whisper_features) != n_in or len(self.whisper_lengths or []) != n_in:
                raise ValueError(f"{where}: {n_in} <|AUDIO|> placeholders but "
                                 f"{len(self.whisper_features)} whisper feature chunks")
