"""Transcripts of segments with Whisper's own confidence measures, and the filters Whisper's `transcribe` applies.

Greedy decoding as `minihiggs.eval.asr` does it (its model, prompt and suppression rules), keeping per clip:
* `avg_logprob`: the sum of the log-probabilities of the chosen tokens, <|endoftext|> included, over (tokens + 1),
  with the suppressed tokens masked before the softmax (openai-whisper's DecodingResult.avg_logprob);
* `no_speech_prob`: the probability of <|nospeech|> at the <|startoftranscript|> position;
* `compression_ratio`: UTF-8 bytes of the text over its zlib-compressed bytes (a repetition loop compresses well).
Filters (`AsrRules`, defaults of openai-whisper's transcribe): a segment is dropped as `no_speech` when
no_speech_prob > no_speech_threshold (0.6) and avg_logprob < logprob_threshold (-1.0); as `low_confidence` when
avg_logprob < logprob_threshold; as `repetitive` when compression_ratio > compression_ratio_threshold (2.4); as
`no_transcript` when the text is empty. Whisper retries such windows at a higher temperature; a data set is better
off without them.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch

from ..audio.mel import log_mel_batch


@dataclass(frozen=True)
class AsrRules:
    no_speech_threshold: float = 0.6
    logprob_threshold: float = -1.0
    compression_ratio_threshold: float = 2.4


@dataclass(frozen=True)
class Heard:
    text: str
    avg_logprob: float
    no_speech_prob: float | None  # None: the tokenizer has no <|nospeech|> token
    compression_ratio: float
    tokens: tuple[int, ...] = ()  # the generated ids, <|endoftext|> excluded


def compression_ratio(text: str) -> float:
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


def problem(h: Heard, rules: AsrRules) -> tuple[str, str] | None:
    """(report kind, reason) when the transcript is not to be trusted, else None."""
    if h.no_speech_prob is not None and h.no_speech_prob > rules.no_speech_threshold \
            and h.avg_logprob < rules.logprob_threshold:
        return "no_speech", (f"no_speech_prob {h.no_speech_prob:.2f} > {rules.no_speech_threshold} and avg_logprob "
                             f"{h.avg_logprob:.2f} < {rules.logprob_threshold}")
    if h.avg_logprob < rules.logprob_threshold:
        return "low_confidence", f"avg_logprob {h.avg_logprob:.2f} < {rules.logprob_threshold}"
    if h.compression_ratio > rules.compression_ratio_threshold:
        return "repetitive", f"compression ratio {h.compression_ratio:.2f} > {rules.compression_ratio_threshold}"
    if not h.text:
        return "no_transcript", "the ASR heard no words"
    return None


class ScoredAsr:
    """`minihiggs.eval.asr.Transcriber`'s model, decoding clips of at most 30 s with their scores."""

    def __init__(self, transcriber):
        from ..eval.whisper_text import transcript

        self.t = transcriber
        self.transcript = transcript
        specials = transcriber.tokenizer.special_tokens
        self.no_speech_id = specials.get("<|nospeech|>", specials.get("<|nocaptions|>"))
        self.sot_id = specials["<|startoftranscript|>"]

    @torch.no_grad()
    def __call__(self, waves_16k: list[np.ndarray]) -> list[Heard]:
        t, model = self.t, self.t.model
        feats, _ = log_mel_batch([np.asarray(w, dtype=np.float32) for w in waves_16k])
        enc = model.encode(feats.to(t.device, next(model.parameters()).dtype))
        prompt, rules, b = t.prompt, t.rules, enc.shape[0]
        max_new = min(t.max_new_tokens, model.decoder.config.max_target_positions - len(prompt))
        caches = model.decoder.new_cache(enc, len(prompt) + max_new)
        logits = model.decoder(torch.tensor([prompt] * b, device=enc.device), caches, 0).float()
        no_speech = None
        if self.no_speech_id is not None:
            no_speech = logits[:, prompt.index(self.sot_id)].softmax(-1)[:, self.no_speech_id].tolist()
        logits, pos = logits[:, -1], len(prompt)
        chosen, total = [[] for _ in range(b)], torch.zeros(b, dtype=torch.float64)
        done = torch.zeros(b, dtype=torch.bool)
        for step in range(max_new):
            if rules.suppress:
                logits[:, rules.suppress] = float("-inf")
            if step == 0 and rules.begin_suppress:
                logits[:, rules.begin_suppress] = float("-inf")
            logp = logits.log_softmax(-1)
            nxt = logp.argmax(-1)
            for i in range(b):
                if not done[i]:
                    total[i] += float(logp[i, nxt[i]])
                    if int(nxt[i]) != rules.eos:
                        chosen[i].append(int(nxt[i]))
            done |= (nxt == rules.eos).cpu()
            if bool(done.all()) or step + 1 == max_new:
                break
            logits = model.decoder(nxt[:, None], caches, pos)[:, -1].float()
            pos += 1
        out = []
        for i in range(b):
            text = self.transcript(t.tokenizer, chosen[i])
            out.append(Heard(text, float(total[i]) / (len(chosen[i]) + 1),
                             None if no_speech is None else float(no_speech[i]), compression_ratio(text),
                             tuple(chosen[i])))
        return out
