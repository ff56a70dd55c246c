"""Word and character error rates by edit distance (Levenshtein: substitutions, deletions, insertions cost 1).

Per utterance an `ErrorCount` (edits, reference length); a corpus rate is the sum of edits over the sum of
reference lengths (as jiwer and Seed-TTS-eval compute it), not the mean of per-utterance rates. Both texts go
through `normalize_text` first. CER counts the characters of the normalised text, single spaces included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from .normalize import normalize_text


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Minimum substitutions + deletions + insertions turning `ref` into `hyp` (one row of the DP table kept)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


@dataclass(frozen=True)
class ErrorCount:
    edits: int
    ref_len: int

    @property
    def rate(self) -> float:
        """edits / ref_len; an empty reference gives 0 if the hypothesis is empty too, else inf."""
        if self.ref_len == 0:
            return 0.0 if self.edits == 0 else float("inf")
        return self.edits / self.ref_len

    def __add__(self, other: "ErrorCount") -> "ErrorCount":
        return ErrorCount(self.edits + other.edits, self.ref_len + other.ref_len)


def word_errors(reference: str, hypothesis: str) -> ErrorCount:
    ref, hyp = normalize_text(reference).split(), normalize_text(hypothesis).split()
    return ErrorCount(edit_distance(ref, hyp), len(ref))


def char_errors(reference: str, hypothesis: str) -> ErrorCount:
    ref, hyp = normalize_text(reference), normalize_text(hypothesis)
    return ErrorCount(edit_distance(ref, hyp), len(ref))


def corpus_rate(counts: Iterable[ErrorCount]) -> float:
    """Sum of edits over sum of reference lengths."""
    return sum(counts, ErrorCount(0, 0)).rate
