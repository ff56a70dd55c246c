"""ChatML manifests -> token ids, labels and audio references, with the upstream rules exactly.

Rules (upstream `prepare_chatml_sample`):
* turn 0 starts with `<|begin_of_text|>`; every turn starts with `<|start_header_id|>{role}<|end_header_id|>\\n\\n`
  (labels -100);
* an assistant `recipient` adds `{recipient}<|recipient|>` (always labelled, as upstream does);
* text items are tokenized with special tokens recognised; labelled when the role is assistant and
  (`start_index` is None or turn >= start_index). Special tokens in text: upstream's HF tokenizer turns a
  special-token string anywhere in the text into that token, and so do we (deliberately: the TTS system prompt
  relies on `<|scene_desc_start|>`, and ids must equal upstream's), so `<|eot_id|>` typed in a transcript
  becomes a real turn end, as it would upstream. The one exception is the audio placeholders (below);
* audio items: user/system -> `<|audio_bos|><|AUDIO|><|audio_eos|>` (labels -100), assistant ->
  `<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>` (labelled under the same condition as text);
* a turn ends with `<|eom_id|>` when the next turn is also the assistant's, else `<|eot_id|>`; labelled under
  the same condition.

Stricter than upstream (upstream misaligns audio silently in these cases; we reject the sample):
unknown roles, unknown fields, text or a recipient containing `<|AUDIO|>` / `<|AUDIO_OUT|>`, a recipient on a
non-assistant turn.

Manifest extensions: a top-level `"id"` (sample id), and `"audio_codes": "codes.npy"` on an audio item
(precomputed int codes [num_codebooks, frames]; then `audio_url` is only needed for Whisper features).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..constants import IGNORE_INDEX as IGNORE
from ..errors import ManifestError

TTS_SYSTEM = "Generate audio following instruction."
DEFAULT_SCENE = "Audio is recorded from a quiet room."

ROLES = ("system", "user", "assistant")
TOP_FIELDS = {"messages", "speaker", "start_index", "misc", "id"}
MESSAGE_FIELDS = {"role", "content", "recipient"}
TEXT_FIELDS = {"type", "text"}
AUDIO_FIELDS = {"type", "audio_url", "raw_audio", "offset", "duration", "row_id", "audio_codes"}

AUDIO_IN_TRIPLE = "<|audio_bos|><|AUDIO|><|audio_eos|>"
AUDIO_OUT_TRIPLE = "<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>"


@dataclass
class AudioItem:
    """One audio item of a ChatML sample, in placeholder order."""

    role: str
    turn: int
    trained: bool  # assistant audio whose placeholder is labelled
    audio_url: str | None = None  # resolved path
    raw_audio: str | None = None  # base64 audio file bytes
    audio_codes: str | None = None  # resolved path of a .npy with [num_codebooks, frames] int codes
    offset: float | None = None  # seconds
    duration: float | None = None  # seconds

    @property
    def is_input(self) -> bool:
        return self.role in ("user", "system")

    def cache_key(self) -> tuple:
        return (self.audio_url, self.raw_audio and hash(self.raw_audio), self.offset, self.duration)


@dataclass
class ChatMLSample:
    messages: list[dict]
    start_index: int | None = None
    speaker: str | None = None
    misc: dict | None = None
    id: str | None = None


@dataclass
class Encoded:
    input_ids: list[int]
    label_ids: list[int]
    audio: list[AudioItem] = field(default_factory=list)
    speaker: str | None = None


def resolve_path(path: str, base_dir: str | None) -> str:
    path = os.path.expanduser(path)
    if base_dir and not os.path.isabs(path):
        path = os.path.join(base_dir, path)
    return os.path.normpath(path)


def _check_text(s: Any, where: str) -> str:
    if not isinstance(s, str):
        raise ManifestError(f"{where}: expected a string, got {type(s).__name__}")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ManifestError(f"{where}: text is not valid UTF-8 ({e.reason} at {e.start})",
                            "bad_text_encoding") from None
    return s


def _unknown(obj: dict, allowed: set, where: str) -> None:
    extra = sorted(set(obj) - allowed)
    if extra:
        raise ManifestError(f"{where}: unknown field(s) {', '.join(map(repr, extra))}", "unknown_field")


def parse_chatml(obj: Any, base_dir: str | None = None) -> ChatMLSample:
    """Validate one manifest object and normalise its content to lists of typed dicts. Raises ManifestError."""
    if not isinstance(obj, dict):
        raise ManifestError(f"expected a JSON object, got {type(obj).__name__}")
    _unknown(obj, TOP_FIELDS, "sample")
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ManifestError("sample: 'messages' must be a non-empty list")
    start_index = obj.get("start_index")
    if start_index is not None and (isinstance(start_index, bool) or not isinstance(start_index, int)):
        raise ManifestError(f"sample: 'start_index' must be an integer or null, got {start_index!r}")
    speaker = obj.get("speaker")
    if speaker is not None:
        speaker = _check_text(speaker, "sample.speaker") if isinstance(speaker, str) else str(speaker)
    misc = obj.get("misc")
    if misc is not None and not isinstance(misc, dict):
        raise ManifestError("sample: 'misc' must be an object or null")
    if speaker is None and misc and misc.get("speaker") is not None:
        speaker = str(misc["speaker"])
    sid = obj.get("id")
    if sid is not None:
        sid = _check_text(sid, "sample.id") if isinstance(sid, str) else str(sid)
    out = []
    for t, m in enumerate(msgs):
        where = f"messages[{t}]"
        if not isinstance(m, dict):
            raise ManifestError(f"{where}: expected an object")
        _unknown(m, MESSAGE_FIELDS, where)
        role = m.get("role")
        if role not in ROLES:
            raise ManifestError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        recipient = m.get("recipient")
        if recipient:
            _check_text(recipient, f"{where}.recipient")
            if role != "assistant":
                raise ManifestError(f"{where}: 'recipient' is only allowed on assistant turns")
        content = m.get("content")
        if content is None:
            content = ""
        items = content if isinstance(content, list) else [content]
        norm = []
        for j, it in enumerate(items):
            w = f"{where}.content[{j}]" if isinstance(content, list) else f"{where}.content"
            if isinstance(it, str):
                norm.append({"type": "text", "text": _check_text(it, w)})
                continue
            if not isinstance(it, dict):
                raise ManifestError(f"{w}: expected a string or an object")
            typ = it.get("type")
            if typ is None:  # upstream dacite picks the dataclass by its fields
                typ = "audio" if "audio_url" in it or "audio_codes" in it else "text"
            if typ == "text":
                _unknown(it, TEXT_FIELDS, w)
                norm.append({"type": "text", "text": _check_text(it.get("text"), f"{w}.text")})
            elif typ == "audio":
                _unknown(it, AUDIO_FIELDS, w)
                a = {"type": "audio"}
                for k in ("audio_url", "raw_audio", "audio_codes"):
                    v = it.get(k)
                    if v is not None and v != "":
                        a[k] = _check_text(v, f"{w}.{k}")
                for k in ("offset", "duration"):
                    v = it.get(k)
                    if v is not None:
                        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                            raise ManifestError(f"{w}.{k}: expected a non-negative number, got {v!r}")
                        a[k] = float(v)
                if not any(k in a for k in ("audio_url", "raw_audio", "audio_codes")):
                    raise ManifestError(f"{w}: audio item has no 'audio_url', 'raw_audio' or 'audio_codes'",
                                        "missing_audio")
                for k in ("audio_url", "audio_codes"):
                    if k in a:
                        a[k] = resolve_path(a[k], base_dir)
                norm.append(a)
            else:
                raise ManifestError(f"{w}: unknown content type {typ!r}", "unknown_field")
        if role == "user" and all(it["type"] == "text" for it in norm) and not "".join(
                it["text"] for it in norm).strip():
            # A transcript left empty (e.g. ingest without ASR, not yet reviewed): the audio that answers it would
            # be trained as speech for no text.
            raise ManifestError(f"{where}: empty text (a user turn needs its transcript)", "empty_text")
        out.append({"role": role, "content": norm, "recipient": recipient or None})
    return ChatMLSample(messages=out, start_index=start_index, speaker=speaker, misc=misc, id=sid)


def encode_chatml(sample: ChatMLSample, tok) -> Encoded:
    """Token ids, labels and audio items in placeholder order. `tok` needs `encode(str) -> list[int]` (special
    tokens recognised) and `token_id(str)`."""
    audio_in_id, audio_out_id = tok.token_id("<|AUDIO|>"), tok.token_id("<|AUDIO_OUT|>")
    ids: list[int] = []
    labels: list[int] = []
    audio: list[AudioItem] = []
    msgs = sample.messages
    si = sample.start_index
    for t, m in enumerate(msgs):
        role = m["role"]
        trained = role == "assistant" and (si is None or t >= si)
        prefix = ("<|begin_of_text|>" if t == 0 else "") + f"<|start_header_id|>{role}<|end_header_id|>\n\n"
        p = tok.encode(prefix)
        ids += p
        labels += [IGNORE] * len(p)
        if m.get("recipient"):
            r = tok.encode(f"{m['recipient']}<|recipient|>")
            if audio_in_id in r or audio_out_id in r:
                raise ManifestError(f"messages[{t}]: recipient contains an audio placeholder token "
                                    "(<|AUDIO|> / <|AUDIO_OUT|>); it would misalign the audio")
            ids += r
            labels += r
        for item in m["content"]:
            if item["type"] == "text":
                x = tok.encode(item["text"])
                if audio_in_id in x or audio_out_id in x:
                    raise ManifestError(f"messages[{t}]: text contains an audio placeholder token "
                                        "(<|AUDIO|> / <|AUDIO_OUT|>); it would misalign the audio")
                ids += x
                labels += x if trained else [IGNORE] * len(x)
            else:
                if role == "assistant":
                    x = tok.encode(AUDIO_OUT_TRIPLE)
                    labels += x if trained else [IGNORE] * len(x)
                else:
                    x = tok.encode(AUDIO_IN_TRIPLE)
                    labels += [IGNORE] * len(x)
                ids += x
                audio.append(AudioItem(role=role, turn=t, trained=trained and role == "assistant",
                                       audio_url=item.get("audio_url"), raw_audio=item.get("raw_audio"),
                                       audio_codes=item.get("audio_codes"), offset=item.get("offset"),
                                       duration=item.get("duration")))
        nxt = msgs[t + 1]["role"] if t + 1 < len(msgs) else None
        post = tok.encode("<|eom_id|>" if role == "assistant" and nxt == "assistant" else "<|eot_id|>")
        ids += post
        labels += post if trained else [IGNORE] * len(post)
    return Encoded(ids, labels, audio, sample.speaker)


def expand_audio_in(input_ids: list[int], label_ids: list[int], audio_in_id: int,
                    chunks: list[int]) -> tuple[list[int], list[int]]:
    """Repeat the k-th `<|audio_bos|><|AUDIO|><|audio_eos|>` triple `chunks[k]` times (one per 30 s Whisper
    chunk), exactly as the upstream collator does."""
    out_ids: list[int] = []
    out_lab: list[int] = []
    k = 0
    i = 0
    n = len(input_ids)
    while i < n:
        if i + 1 < n and input_ids[i + 1] == audio_in_id:
            if k >= len(chunks):
                raise ValueError(f"more <|AUDIO|> placeholders than the {len(chunks)} chunk counts given")
            c = chunks[k]
            k += 1
            out_ids += input_ids[i:i + 3] * c
            out_lab += label_ids[i:i + 3] * c
            i += 3
        else:
            out_ids.append(input_ids[i])
            out_lab.append(label_ids[i])
            i += 1
    if k != len(chunks):
        raise ValueError(f"{len(chunks)} chunk counts for {k} <|AUDIO|> placeholders")
    return out_ids, out_lab


# ---------------------------------------------------------------------------------------------- TTS prompts
def tts_system_prompt(scene: str | None = DEFAULT_SCENE) -> str:
    """Upstream generation's single-speaker system message."""
    if scene:
        return f"{TTS_SYSTEM}\n\n<|scene_desc_start|>\n{scene}\n<|scene_desc_end|>"
    return TTS_SYSTEM


def tts_sample(text: str, audio: str, scene: str | None = DEFAULT_SCENE, reference: tuple[str, str] | None = None,
               speaker: str | None = None, sample_id: str | None = None) -> dict:
    """A ChatML manifest object for one (text, audio) pair. With `reference=(ref_text, ref_audio)`: the upstream
    voice-clone layout (user: reference transcript, assistant: reference audio, not trained via start_index,
    then user: target text, assistant: target audio)."""
    msgs = [{"role": "system", "content": tts_system_prompt(scene)}]
    if reference is not None:
        msgs += [{"role": "user", "content": reference[0]},
                 {"role": "assistant", "content": [{"type": "audio", "audio_url": reference[1]}]}]
    msgs += [{"role": "user", "content": text},
             {"role": "assistant", "content": [{"type": "audio", "audio_url": audio}]}]
    obj: dict = {"messages": msgs, "speaker": speaker}
    if reference is not None:
        obj["start_index"] = len(msgs) - 2
    if sample_id is not None:
        obj["id"] = sample_id
    return obj
