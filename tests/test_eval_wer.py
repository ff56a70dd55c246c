"""WER/CER by edit distance and the normaliser, on cases worked out by hand."""

from __future__ import annotations

import pytest

from minihiggs.eval.normalize import normalize_text
from minihiggs.eval.wer import ErrorCount, char_errors, corpus_rate, edit_distance, word_errors


@pytest.mark.parametrize("ref, hyp, d", [
    ("", "", 0), ("abc", "", 3), ("", "ab", 2), ("abc", "abc", 0),
    ("kitten", "sitting", 3),        # k->s, e->i, +g
    ("flaw", "lawn", 2),             # -f, +n
    ("intention", "execution", 5),
])
def test_edit_distance(ref, hyp, d):
    assert edit_distance(ref, hyp) == d
    assert edit_distance(hyp, ref) == d


def test_normalizer():
    assert normalize_text("Hello, World!  It’s  “fine”…") == "hello world it's fine"
    assert normalize_text("Well—maybe; (not) [sure]?") == "well maybe not sure"
    assert normalize_text("ÉCOLE 20% + $5 = x_y") == "école 20 5 x y"  # Seed-TTS-eval drops string.punctuation
    assert normalize_text("don't  rock'n'roll") == "don't rock'n'roll"  # apostrophes stay; digits stay digits


def test_word_errors_by_hand():
    # ref: the cat sat on the mat (6 words); hyp: substitution cat->bat, deletion of "on", insertion "down"
    c = word_errors("The cat sat on the mat.", "the bat sat the mat down")
    assert c == ErrorCount(3, 6) and c.rate == pytest.approx(0.5)
    assert word_errors("Hello, world!", "hello world").edits == 0  # case and punctuation do not count


def test_char_errors_by_hand():
    c = char_errors("abc de", "abd de")  # 6 characters, one substitution
    assert c == ErrorCount(1, 6)


def test_corpus_rate_pools_counts():
    counts = [ErrorCount(1, 2), ErrorCount(0, 8)]
    assert corpus_rate(counts) == pytest.approx(0.1)  # 1 / 10, not the mean of 0.5 and 0
    assert ErrorCount(0, 0).rate == 0.0 and ErrorCount(2, 0).rate == float("inf")
