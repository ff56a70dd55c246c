"""The Llama-3 text tokenizer as a `tiktoken.Encoding`, built from a checkpoint's HF `tokenizer.json`.

No `transformers` / `tokenizers` at run time. The ids equal what the checkpoint's HF fast tokenizer gives for
`tokenizer.encode(text, add_special_tokens=False)`:

* BPE ranks: `model.vocab` maps byte-level strings (GPT-2 `bytes_to_unicode` alphabet) to ids; mapped back to
  raw bytes they are tiktoken's mergeable ranks (Llama-3's merges are in id order, so rank BPE == merge BPE).
* `model.ignore_merges`: tiktoken always looks a whole pre-token up in the vocab first, which is what HF does
  only with `ignore_merges: true`. Without it (false or absent, HF's default) HF runs the merges even for a
  pre-token that is itself a vocab entry, and a few hundred Llama-3 entries cannot be built by the merges
  (e.g. ' việc', 'ıldı', ' характ'): HF splits them. Those entries are then left out of the ranks (the merges
  never produce them, in any context), so tiktoken splits them too; decode still knows them.
* Pre-tokenizer: the `Split` regex of `tokenizer.json` (the Llama-3 pattern; used as the default when the file
  has none).
* Special tokens: `added_tokens` of `tokenizer.json`, overridden by `added_tokens_decoder` of
  `tokenizer_config.json` when present. Upstream encodes ChatML text with special tokens recognised anywhere
  in the text (HF splits added tokens first), so `encode()` allows every special token by default.

`write_higgs_tokenizer` turns a stock Llama-3 tokenizer directory into one with Higgs Audio's special-token
names (Higgs renames reserved Llama specials 128011-128027), for tests and demos.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import tiktoken

# The Llama-3 pre-tokenizer pattern (what tokenizer.json's Split carries).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)

# Special tokens that Higgs Audio v2's tokenizer renames (id -> content), from the released
# bosonai/higgs-audio-v2-generation-3B-base tokenizer_config.json.
HIGGS_SPECIAL_TOKENS: dict[int, str] = {
    128011: "<|audio_bos|>",
    128012: "<|audio_eos|>",
    128013: "<|audio_out_bos|>",
    128015: "<|AUDIO|>",
    128016: "<|AUDIO_OUT|>",
    128017: "<|recipient|>",
    128018: "<|scene_desc_start|>",
    128019: "<|scene_desc_end|>",
    128020: "<|generation_instruction_start|>",
    128021: "<|generation_instruction_end|>",
    128022: "<SE>",
    128023: "</SE>",
    128024: "<SE_s>",
    128025: "</SE_s>",
    128026: "<SE_e>",
    128027: "</SE_e>",
}


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable stand-in character -> byte value."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _split_pattern(pre_tokenizer: dict | None) -> str | None:
    """The regex of the first `Split` pre-tokenizer (Isolated), searched through a `Sequence`."""
    if not pre_tokenizer:
        return None
    if pre_tokenizer.get("type") == "Sequence":
        for p in pre_tokenizer.get("pretokenizers", []):
            pat = _split_pattern(p)
            if pat:
                return pat
        return None
    if pre_tokenizer.get("type") == "Split":
        pat = pre_tokenizer.get("pattern", {})
        return pat.get("Regex") or None
    return None


def _rank_bpe(piece: bytes, ranks: dict[bytes, int]) -> list[bytes]:
    """tiktoken's merge loop (lowest-rank adjacent pair first, leftmost on ties) without the whole-piece lookup."""
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best_rank, best_i = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best_rank is None or r < best_rank):
                best_rank, best_i = r, i
        if best_rank is None:
            break
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


_UNREACHABLE: dict[str, dict[bytes, int]] = {}  # by tokenizer.json digest: the scan takes ~1 s


def unreachable_tokens(ranks: dict[bytes, int]) -> dict[bytes, int]:
    """Vocab entries that BPE merging cannot build from their own bytes (only a whole-piece lookup yields them).
    A merge sequence inside a token's span does not depend on its neighbours (they can only take bytes away), so
    such an entry is never produced by merging in any text. (Two-byte entries are always reachable.)"""
    return {b: i for b, i in ranks.items() if len(b) > 2 and _rank_bpe(b, ranks) != [b]}


class TextTokenizer:
    """Thin wrapper over a tiktoken Encoding with the HF-compatible defaults used by prep."""

    def __init__(self, encoding: tiktoken.Encoding, special_tokens: dict[str, int], source: str = "",
                 extra_decoder: dict[int, bytes] | None = None):
        self.encoding = encoding
        self.special_tokens = dict(special_tokens)
        self.source = source
        self._extra_decoder = dict(extra_decoder or {})  # vocab ids left out of the ranks (see ignore_merges)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "TextTokenizer":
        """Build from a directory holding `tokenizer.json` (and optionally `tokenizer_config.json`)."""
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise FileNotFoundError(f"{tj}: no tokenizer.json (needed to build the text tokenizer)")
        with open(tj, "rb") as f:
            raw = f.read()
        data = json.loads(raw)
        model = data.get("model", {})
        if model.get("type") != "BPE":
            raise ValueError(f"{tj}: expected a BPE model, got {model.get('type')!r}")
        dec = _byte_decoder()
        ranks: dict[bytes, int] = {}
        for tok, idx in model["vocab"].items():
            try:
                ranks[bytes(dec[ch] for ch in tok)] = int(idx)
            except KeyError as e:
                raise ValueError(f"{tj}: vocab entry {tok!r} is not byte-level BPE") from e
        extra: dict[int, bytes] = {}
        if not model.get("ignore_merges", False):
            key = hashlib.sha256(raw).hexdigest()
            if key not in _UNREACHABLE:
                _UNREACHABLE[key] = unreachable_tokens(ranks)
            for b, i in _UNREACHABLE[key].items():
                del ranks[b]
                extra[i] = b
        specials: dict[str, int] = {}
        for t in data.get("added_tokens", []):
            specials[t["content"]] = int(t["id"])
        cfg_path = path / "tokenizer_config.json"
        cfg_bytes = b""
        if cfg_path.is_file():
            cfg_bytes = cfg_path.read_bytes()
            cfg = json.loads(cfg_bytes)
            overrides = {int(k): v["content"] for k, v in (cfg.get("added_tokens_decoder") or {}).items()}
            if overrides:
                by_id = {i: s for s, i in specials.items()}
                by_id.update(overrides)
                specials = {s: i for i, s in by_id.items()}
        # A special token must not shadow a BPE id.
        bpe_ids = set(ranks.values()) | set(extra)
        specials = {s: i for s, i in specials.items() if i not in bpe_ids}
        pattern = _split_pattern(data.get("pre_tokenizer")) or LLAMA3_PATTERN
        digest = hashlib.sha256(raw + b"\0" + cfg_bytes).hexdigest()[:16]
        enc = tiktoken.Encoding(name=f"hf-{digest}", pat_str=pattern, mergeable_ranks=ranks,
                                special_tokens=specials)
        return cls(enc, specials, source=str(path), extra_decoder=extra)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings inside it become their ids (as HF does) by default."""
        if allow_special:
            return self.encoding.encode(text, allowed_special="all", disallowed_special=())
        return self.encoding.encode(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if not self._extra_decoder or not any(i in self._extra_decoder for i in ids):
            return self.encoding.decode(ids)
        out, run = [], []
        for i in ids:
            b = self._extra_decoder.get(i)
            if b is None:
                run.append(i)
                continue
            if run:
                out.append(self.encoding.decode_bytes(run))
                run = []
            out.append(b)
        if run:
            out.append(self.encoding.decode_bytes(run))
        return b"".join(out).decode("utf-8", errors="replace")

    def token_id(self, content: str) -> int:
        """Id of a special token by its content, e.g. token_id('<|AUDIO|>')."""
        try:
            return self.special_tokens[content]
        except KeyError:
            raise KeyError(f"special token {content!r} is not defined by the tokenizer at {self.source}") from None

    @property
    def n_vocab(self) -> int:
        return self.encoding.n_vocab

    @property
    def fingerprint(self) -> str:
        return self.encoding.name


def write_higgs_tokenizer(src_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Copy a Llama-3 tokenizer dir (tokenizer.json [+ tokenizer_config.json]) to `out_dir`, renaming the
    special tokens Higgs Audio renames (`HIGGS_SPECIAL_TOKENS`). The BPE is untouched. Returns `out_dir`."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(src_dir / "tokenizer.json", encoding="utf-8") as f:
        data = json.load(f)
    for t in data.get("added_tokens", []):
        if int(t["id"]) in HIGGS_SPECIAL_TOKENS:
            t["content"] = HIGGS_SPECIAL_TOKENS[int(t["id"])]
    with open(out_dir / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
    cfg_src = src_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_src.read_text(encoding="utf-8")) if cfg_src.is_file() else {}
    dec = cfg.setdefault("added_tokens_decoder", {})
    for i, content in HIGGS_SPECIAL_TOKENS.items():
        entry = dec.setdefault(str(i), {"lstrip": False, "normalized": False, "rstrip": False,
                                        "single_word": False, "special": True})
        entry["content"] = content
    cfg.pop("chat_template", None)  # the Llama chat template does not describe Higgs ChatML
    with open(out_dir / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=1)
    return out_dir
