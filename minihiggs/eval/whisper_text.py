"""Whisper's tokenizer as a `tiktoken.Encoding`, built from the files of a Whisper Hub repo.

A Whisper repo (`openai/whisper-large-v3`, `-turbo`, any size) ships its byte-level BPE as `tokenizer.json`
(`model.vocab` + `added_tokens`) and/or `vocab.json` + `added_tokens.json`; either is read here. As for the Llama-3
tokenizer (`minihiggs.text.tokenizer`), vocab ids are the tiktoken ranks and vocab entries that the merges cannot
build are left out of the ranks (decode still knows them), so `encode` gives the HF tokenizer's ids. The
pre-tokenizer is GPT-2's pattern (Whisper's tokenizer.json has a plain ByteLevel pre-tokenizer, no Split regex).

Special tokens (`<|endoftext|>`, `<|startoftranscript|>`, `<|en|>`..., `<|transcribe|>`, `<|notimestamps|>`,
timestamps) are the added tokens; a transcript is decoded with all of them dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import tiktoken

from ..errors import CheckpointError, EvalError
from ..text.tokenizer import TextTokenizer, _byte_decoder, unreachable_tokens

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
TOKENIZER_FILES = ["tokenizer.json", "vocab.json", "added_tokens.json"]


def _read_json(path: Path):
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the Whisper tokenizer file ({e})") from None


def _vocab_and_specials(root: Path) -> tuple[dict[str, int], dict[str, int], bytes]:
    """(BPE vocab, added tokens, raw bytes for the fingerprint) from tokenizer.json or vocab.json."""
    tj = root / "tokenizer.json"
    if tj.is_file():
        data = _read_json(tj)
        specials = {t["content"]: int(t["id"]) for t in data.get("added_tokens", [])}
        return data.get("model", {}).get("vocab", {}), specials, tj.read_bytes()
    vj = root / "vocab.json"
    if not vj.is_file():
        raise CheckpointError(f"{root}: no tokenizer.json or vocab.json (the Whisper tokenizer files)")
    at = root / "added_tokens.json"
    specials = {k: int(v) for k, v in _read_json(at).items()} if at.is_file() else {}
    return _read_json(vj), specials, vj.read_bytes() + (at.read_bytes() if at.is_file() else b"")


def load_whisper_tokenizer(path: str | os.PathLike) -> TextTokenizer:
    """The Whisper tokenizer of a local directory (resolve a Hub id with `minihiggs.hub.resolve_dir` first)."""
    root = Path(path)
    vocab, specials, raw = _vocab_and_specials(root)
    if not vocab:
        raise CheckpointError(f"{root}: the Whisper tokenizer has an empty vocabulary")
    dec = _byte_decoder()
    ranks: dict[bytes, int] = {}
    special_ids = set(specials.values())
    for tok, idx in vocab.items():
        if int(idx) in special_ids:  # vocab.json of the released repos lists <|endoftext|> too
            continue
        try:
            ranks[bytes(dec[ch] for ch in tok)] = int(idx)
        except KeyError:
            raise CheckpointError(f"{root}: vocab entry {tok!r} is not byte-level BPE") from None
    extra = {i: b for b, i in unreachable_tokens(ranks).items()}
    for b in extra.values():
        del ranks[b]
    for need in ("<|endoftext|>", "<|startoftranscript|>", "<|transcribe|>", "<|notimestamps|>"):
        if need not in specials:
            raise CheckpointError(f"{root}: the tokenizer defines no {need} (not a Whisper tokenizer?)")
    enc = tiktoken.Encoding(name=f"whisper-{hashlib.sha256(raw).hexdigest()[:16]}", pat_str=GPT2_PATTERN,
                            mergeable_ranks=ranks, special_tokens=specials)
    return TextTokenizer(enc, specials, source=str(root), extra_decoder=extra)


def transcript(tok: TextTokenizer, ids) -> str:
    """Text of generated ids: every added token (specials, timestamps) dropped, surrounding spaces stripped."""
    specials = set(tok.special_tokens.values())
    return tok.decode([int(i) for i in ids if int(i) not in specials]).strip()


def prompt_ids(tok: TextTokenizer, language: str = "en") -> list[int]:
    """<|startoftranscript|><|lang|><|transcribe|><|notimestamps|>: transcribe, no timestamps."""
    lang = f"<|{language}|>"
    if lang not in tok.special_tokens:
        raise EvalError(f"language {language!r}: the Whisper tokenizer at {tok.source} has no token {lang}")
    return [tok.token_id(n) for n in ("<|startoftranscript|>", lang, "<|transcribe|>", "<|notimestamps|>")]
