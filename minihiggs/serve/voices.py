"""Voices of a directory, listed and checked at start-up.

`DIR/config.json` uses upstream's voice-preset format (`{"name": {"transcript": "...", "audio_file": "name.wav"}}`)
with optional fields of our own:

    {"ava":  {"transcript": "What ava.wav says.", "audio_file": "ava.wav"},                  a reference clip
     "ben":  {"adapter": "runs/ben/final"},                                                    a fine-tuned voice
     "cleo": {"adapter": "runs/cleo/final", "transcript": "...", "codes_file": "cleo.npy",    both, reference as codes
              "scene": "Audio is recorded from a quiet room."}}

Paths are relative to DIR. Each sub-directory of DIR holding an adapter (`adapter_config.json`) and not named in
config.json is a voice too, named after the directory. A WAV reference is encoded once at start-up (this needs the
full audio tokenizer); `codes_file` (.npy [8, frames]) needs none.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..generate.loading import adapter_dir
from ..generate.speak import Item, References
from ..lora.adapter import ADAPTER_CONFIG
from ..text.chatml import DEFAULT_SCENE

PRESETS = "config.json"
FIELDS = {"transcript", "audio_file", "codes_file", "adapter", "scene"}


class VoiceError(UserError, ValueError):
    """A voice of the voices directory is unusable (the message names the file and the voice)."""


@dataclass
class Voice:
    name: str
    adapter: str | None = None  # resolved adapter directory
    reference: tuple[str | list[int], torch.Tensor] | None = None  # (transcript, codes [8, frames])
    scene: str | None = DEFAULT_SCENE

    def describe(self) -> dict:
        return {"name": self.name, "adapter": self.adapter, "reference": self.reference is not None,
                "reference_frames": int(self.reference[1].shape[1]) if self.reference else 0, "scene": self.scene}


def read_presets(directory: str | Path) -> dict[str, dict]:
    """{name: entry} of DIR/config.json plus adapter sub-directories; paths made absolute; entries and adapter
    directories checked (references are checked by `load_voices`)."""
    d = Path(directory)
    if not d.is_dir():
        raise VoiceError(f"{d}: voices directory not found")
    path = d / PRESETS
    entries: dict[str, dict] = {}
    if path.is_file():
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise VoiceError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise VoiceError(f"{path}: expected an object {{voice name: {{transcript, audio_file, ...}}}}")
        for name, e in obj.items():
            where = f"{path} [{name!r}]"
            if not isinstance(e, dict):
                raise VoiceError(f"{where}: expected an object with {', '.join(sorted(FIELDS))}")
            extra = sorted(set(e) - FIELDS)
            if extra:
                raise VoiceError(f"{where}: unknown field(s) {', '.join(map(repr, extra))} (known: "
                                 f"{', '.join(sorted(FIELDS))})")
            bad = [k for k, v in e.items() if not isinstance(v, str)]
            if bad:
                raise VoiceError(f"{where}: {bad[0]!r} must be a string")
            if not (e.get("audio_file") or e.get("codes_file") or e.get("adapter")):
                raise VoiceError(f"{where}: give a reference (audio_file or codes_file + transcript), an adapter, "
                                 f"or both")
            entries[str(name)] = {k: (str(d / v) if k in ("audio_file", "codes_file", "adapter") else v)
                                  for k, v in e.items()} | {"where": where}
    for sub in sorted(p for p in d.iterdir() if (p / ADAPTER_CONFIG).is_file()):
        entries.setdefault(sub.name, {"adapter": str(sub), "where": str(sub)})
    for e in entries.values():
        if e.get("adapter"):
            try:
                e["adapter"] = str(adapter_dir(e["adapter"]).resolve())
            except UserError as err:
                raise VoiceError(f"{e['where']}: {err}") from None
    if not entries:
        raise VoiceError(f"{d}: no voices ({PRESETS} is missing and no sub-directory holds an adapter)")
    return entries


def load_voices(directory: str | Path, tok, cfg, codec_name: str, device) -> dict[str, Voice]:
    """Every voice of `directory`, references resolved (encoded / loaded and checked) and adapters checked."""
    refs = References(tok, cfg, codec_name, device, shards=None)
    voices = {}
    for name, e in read_presets(directory).items():
        where = e["where"]
        item = Item(text="", out=Path(), where=where, name=name, ref_audio=e.get("audio_file"),
                    ref_codes=e.get("codes_file"), ref_text=e.get("transcript"))
        for key in ("audio_file", "codes_file"):
            if e.get(key) and not Path(e[key]).is_file():
                raise VoiceError(f"{where}: {key} {e[key]} not found")
        try:
            reference = refs.resolve(item)
        except UserError as err:
            raise VoiceError(f"{where}: {err}" if where not in str(err) else str(err)) from None
        voices[name] = Voice(name, e.get("adapter"), reference, e.get("scene", DEFAULT_SCENE))
    return voices
