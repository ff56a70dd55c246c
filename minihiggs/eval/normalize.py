"""The text normalisation applied before WER/CER: Seed-TTS-eval's English rule, written out.

Seed-TTS-eval (the benchmark behind the published WER 2.44 of Higgs Audio v2) removes every punctuation mark but
the apostrophe from both the reference and the ASR transcript, collapses double spaces and lowercases. Whisper's
full English normaliser (number spelling, British/American spelling maps) is *not* used: scores stay comparable
with the benchmark, and a transcript that writes "twenty" for "20" counts as an error here, as it does there.

Removed: ASCII `string.punctuation` (what Seed-TTS-eval removes, `$+<=>^`|~` included) and every other
Unicode punctuation character (category P*: curly quotes, dashes, ellipses, which Whisper emits). One difference:
a removed mark becomes a space here (Seed-TTS-eval deletes it), so "well—maybe" stays two words. The typographic
apostrophe becomes ASCII, so "don’t" and "don't" compare equal.
"""

from __future__ import annotations

import string
import unicodedata

_APOSTROPHES = {"\u2019": "'", "\u2018": "'", "\u02bc": "'"}


_ASCII_PUNCT = set(string.punctuation) - {"'"}


def _keep(ch: str) -> bool:
    return ch == "'" or (ch not in _ASCII_PUNCT and not unicodedata.category(ch).startswith("P"))


def normalize_text(text: str) -> str:
    """NFKC, typographic apostrophes -> "'", punctuation but "'" replaced by spaces, whitespace collapsed,
    lowercased."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(_APOSTROPHES.get(ch, ch) for ch in text)
    text = "".join(ch if _keep(ch) else " " for ch in text)
    return " ".join(text.lower().split())
