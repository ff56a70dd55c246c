"""What `python -m minihiggs.generate` does: requests from the flags or a prompts file, references resolved, the
model loaded once, rows generated in batches with a progress bar, WAV + codes written per request.

Prompts file (JSONL, one object per line; relative paths resolve against the file's folder):

    {"text": "Hello there.", "name": "hello"}
    {"text": "Same voice.", "name": "clone", "ref_audio": "ref.wav", "ref_text": "What the reference says."}
    {"text": "From codes.", "ref_codes": "ref.npy", "ref_text": "...", "scene": "...", "seed": 3}
    {"text": "Like a training sample.", "ref_sample": "spk1_0003"}      (needs --shards; transcript from the sample)

`name` (default: the line number) names `<out_dir>/<name>.wav` and `.npy`.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..audio.io import load_audio
from ..constants import CODEC_SAMPLE_RATE, DEFAULT_CODEC_REPO
from ..errors import AudioError, CheckpointError, GenerateError, UserError
from ..text.chatml import DEFAULT_SCENE
from .engine import Engine, Request
from .loading import load_codec, load_generation_model, load_tokenizer, recorded_codec, stop_token_ids
from .output import write_generation
from .prompt import Prompt, load_codes, reference_from_sample, tts_prompt
from .sampling import SamplingConfig

ITEM_FIELDS = {"text", "name", "ref_audio", "ref_codes", "ref_text", "ref_sample", "scene", "seed"}


@dataclass
class SpeakConfig:
    base_ckpt: str | None = None
    adapter: str | None = None
    # one request from flags ...
    text: str | None = None
    out: str | None = None
    ref_audio: str | None = None
    ref_codes: str | None = None
    ref_text: str | None = None
    ref_sample: str | None = None
    scene: str | None = DEFAULT_SCENE
    # ... or many from a file
    prompts: str | None = None
    out_dir: str | None = None
    shards: str | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    max_new_frames: int = 1024
    batch_size: int = 8
    codec: str | None = None  # None: the one recorded with `shards` or the adapter's run (`choose_codec`)
    device: str | None = None
    dtype: str | None = None
    quantize: str | None = None  # "nf4" | "int8": the decoder linears in 4 / 8 bits (model/quant.py)
    progress: bool = True


@dataclass
class Item:
    """One request before its reference is resolved; `where` names it in errors (flag or file:line)."""

    text: str
    out: Path
    where: str
    name: str
    ref_audio: str | None = None
    ref_codes: str | None = None
    ref_text: str | None = None
    ref_sample: str | None = None
    scene: str | None = DEFAULT_SCENE
    seed: int | None = None
    extra: dict = field(default_factory=dict)  # the caller's `extra_fields` found on the line
    from_flags: bool = False  # the request of --text (errors name the flag), not a prompts file line

    def at(self, key: str) -> str:
        """Where `key` was given, to start an error message: its flag, or the prompts file line."""
        return f"--{key}" if self.from_flags else self.where


def read_prompts(path: str | os.PathLike, out_dir: Path, scene: str | None,
                 extra_fields: frozenset[str] = frozenset()) -> list[Item]:
    """Items of a prompts file; `extra_fields` are further keys a caller accepts (kept as given in Item.extra)."""
    path = Path(path)
    if not path.is_file():
        raise GenerateError(f"{path}: prompts file not found")
    base = path.parent
    items: list[Item] = []
    names: dict[str, int] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise GenerateError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise GenerateError(f"{where}: expected a JSON object")
        extra = sorted(set(obj) - ITEM_FIELDS - extra_fields)
        if extra:
            raise GenerateError(f"{where}: unknown field(s) {', '.join(map(repr, extra))} "
                                f"(known: {', '.join(sorted(ITEM_FIELDS | extra_fields))})")
        if not isinstance(obj.get("text"), str):
            raise GenerateError(f"{where}: 'text' (a string) is required")
        name = str(obj.get("name", f"{n:04d}"))
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise GenerateError(f"{where}: name {name!r} must be a plain file name (no path separators)")
        if name in names:
            raise GenerateError(f"{where}: name {name!r} is already used on line {names[name]}")
        names[name] = n
        seed = obj.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise GenerateError(f"{where}: 'seed' must be an integer")

        def rel(key: str, obj: dict = obj) -> str | None:
            v = obj.get(key)
            return None if v in (None, "") else str(base / os.path.expanduser(str(v)))

        items.append(Item(text=obj["text"], out=out_dir / f"{name}.wav", where=where, name=name,
                          ref_audio=rel("ref_audio"), ref_codes=rel("ref_codes"), ref_text=obj.get("ref_text"),
                          ref_sample=obj.get("ref_sample"), scene=obj.get("scene", scene), seed=seed,
                          extra={k: obj[k] for k in extra_fields if k in obj}))
    if not items:
        raise GenerateError(f"{path}: no prompts in the file")
    return items


class References:
    """Resolves an item's voice reference to (transcript, codes); loads the encoder / shards only when needed."""

    def __init__(self, tok, cfg, codec_name: str, device, shards: str | None, codec_origin: str = ""):
        """`codec_origin`: why this codec when --codec did not name it (e.g. "recorded in .../index.json"), added
        to its loading errors."""
        self.tok, self.cfg, self.codec_name, self.device, self.shards_path = tok, cfg, codec_name, device, shards
        self.codec_origin = codec_origin
        self._encoder = None
        self._shards = None
        self._ids: dict[str, int] | None = None

    def _load_codec(self, encode: bool):
        try:
            return load_codec(self.codec_name, self.device, encode=encode)
        except UserError as e:
            if not self.codec_origin:
                raise
            raise CheckpointError(f"{e} (the audio tokenizer: {self.codec_origin}; choose one with --codec)") \
                from None

    def encoder(self):
        if self._encoder is None:
            self._encoder = self._load_codec(encode=True)
        return self._encoder

    def decoder(self):
        """The audio tokenizer for decoding: the full one if references needed it, else a decode-only load."""
        return self._encoder if self._encoder is not None else self._load_codec(encode=False)

    def sample(self, sample_id: str, where: str):
        from ..data.dataset import ShardDataset

        if self.shards_path is None:
            raise GenerateError(f"{where}: a reference sample id needs --shards DIR (the prepared shards)")
        if self._shards is None:
            self._shards = ShardDataset(self.shards_path)
            self._ids = {s: i for i, s in enumerate(self._shards.sample_ids)}
        i = self._ids.get(sample_id)
        if i is None:
            some = ", ".join(list(self._ids)[:3])
            raise GenerateError(f"{where}: unknown sample id {sample_id!r}: not in {self.shards_path} "
                                f"({len(self._ids)} samples, e.g. {some})")
        return self._shards[i]

    def resolve(self, item: Item) -> tuple[str | list[int], torch.Tensor] | None:
        given = [k for k in ("ref_audio", "ref_codes", "ref_sample") if getattr(item, k)]
        if len(given) > 1:
            raise GenerateError(f"{item.at(given[1])}: give one reference (ref_audio, ref_codes or ref_sample), not "
                                f"{' and '.join(given)}")
        if not given:
            if item.ref_text:
                raise GenerateError(f"{item.at('ref_text')}: a transcript without a reference audio (give "
                                    f"ref_audio, ref_codes or ref_sample too)")
            return None
        cfg = self.cfg
        if item.ref_sample:
            text_ids, codes = reference_from_sample(self.sample(item.ref_sample, item.at("ref_sample")), self.tok, cfg)
            text = item.ref_text if item.ref_text else text_ids
        else:
            if not item.ref_text:
                raise GenerateError(f"{item.at('ref_text')}: missing: the reference audio ({given[0]}) needs its "
                                    f"transcript")
            text = item.ref_text
            if item.ref_codes:
                codes = load_codes(item.ref_codes, cfg.audio_num_codebooks, cfg.audio_codebook_size)
            else:
                # Read first: a missing or corrupt file is reported before the (large) encoder is loaded.
                wave = load_audio(item.ref_audio, CODEC_SAMPLE_RATE)
                if wave.size == 0 or not np.isfinite(wave).all() or float(np.abs(wave).max()) == 0.0:
                    raise AudioError(f"{item.ref_audio}: the reference audio is empty, silent or not finite")
                try:
                    codes = self.encoder().encode(wave)
                except ValueError as e:  # too short to give a code frame
                    raise GenerateError(f"{item.ref_audio}: cannot encode the reference audio ({e})") from None
        if (self.tok.encode(text) if isinstance(text, str) else text) == []:
            raise GenerateError(f"{item.at('ref_text' if item.ref_text else given[0])}: the reference transcript is "
                                f"empty")
        if codes.shape[1] == 0:
            raise GenerateError(f"{item.at(given[0])}: the reference audio has no code frames")
        return text, codes


def _items(cfg: SpeakConfig) -> list[Item]:
    if cfg.prompts:
        if cfg.text is not None:
            raise GenerateError("give --text or --prompts, not both")
        if not cfg.out_dir:
            raise GenerateError("--prompts needs --out_dir (where <name>.wav files go)")
        return read_prompts(cfg.prompts, Path(cfg.out_dir), cfg.scene)
    if cfg.text is None:
        raise GenerateError("nothing to say: pass --text \"...\" (or --prompts FILE.jsonl)")
    if not cfg.out:
        raise GenerateError("--text needs --out FILE.wav")
    out = Path(cfg.out)
    return [Item(text=cfg.text, out=out, where="--text", name=out.stem, ref_audio=cfg.ref_audio,
                 ref_codes=cfg.ref_codes, ref_text=cfg.ref_text, ref_sample=cfg.ref_sample, scene=cfg.scene,
                 from_flags=True)]


def choose_codec(cfg: SpeakConfig) -> tuple[str, str]:
    """(audio tokenizer, why it was chosen): --codec, else the one recorded with --shards or the adapter's run,
    else the released one."""
    if cfg.codec:
        return cfg.codec, "--codec"
    found = recorded_codec(cfg.shards, cfg.adapter)
    if found:
        return found[0], f"recorded in {found[1]}"
    return DEFAULT_CODEC_REPO, "the default, as neither --shards nor the adapter's run records one"


def note(msg: str) -> None:
    """What was loaded and why, on stderr (stdout lists the files written)."""
    print(msg, file=sys.stderr)


def default_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def default_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
    if dtype not in table:
        raise GenerateError(f"--dtype {dtype!r}: expected one of {', '.join(table)}")
    return table[dtype]


def speak(cfg: SpeakConfig, log=print) -> list[dict]:
    """Run the command; returns one summary per written file. Raises UserError for bad input."""
    if cfg.max_new_frames < 1 or cfg.batch_size < 1:
        raise GenerateError("--max_new_frames and --batch_size must be >= 1")
    try:
        cfg.sampling.validate()
    except ValueError as e:
        raise GenerateError(str(e)) from None
    items = _items(cfg)  # flags, the prompts file and the reference files are checked before anything is loaded
    for it in items:
        if it.ref_codes and not Path(it.ref_codes).is_file():
            raise GenerateError(f"{it.ref_codes}: reference codes file not found")
        if it.ref_audio and not Path(it.ref_audio).is_file():
            raise AudioError(f"{it.ref_audio}: audio file not found")
    device = default_device(cfg.device)
    dtype = default_dtype(cfg.dtype, device)
    model = load_generation_model(cfg.base_ckpt, cfg.adapter, device=device, dtype=dtype, quantize=cfg.quantize,
                                  log=note)
    tok = load_tokenizer(model)
    codec_name, why = choose_codec(cfg)
    refs = References(tok, model.config, codec_name, device, cfg.shards, "" if cfg.codec else why)
    requests = []
    for it in items:
        prompt: Prompt = tts_prompt(tok, it.text, scene=it.scene, reference=refs.resolve(it), name=it.where)
        sampling = cfg.sampling if it.seed is None else replace(cfg.sampling, seed=it.seed)
        requests.append(Request(prompt, sampling, cfg.max_new_frames))
    codec = refs.decoder()
    note(f"codec: {Path(codec.checkpoint_dir).resolve()} ({why})")
    engine = Engine(model, stop_tokens=stop_token_ids(tok))
    out: list[dict] = []
    from tqdm import tqdm

    for s in range(0, len(requests), cfg.batch_size):
        chunk = list(range(s, min(s + cfg.batch_size, len(requests))))
        desc = f"speak {chunk[0] + 1}-{chunk[-1] + 1}/{len(requests)}" if len(requests) > 1 else "speak"
        # Counts decoding steps (each audio frame and each text token is one), up to the --max_new_frames limit;
        # a generation that stops earlier closes the bar at its last step.
        with tqdm(total=cfg.max_new_frames, desc=desc, unit="step", disable=not cfg.progress, leave=False,
                  dynamic_ncols=True, mininterval=0.5) as bar:
            def on_step(active: int) -> None:
                bar.update(1)
                bar.set_postfix(rows=active, refresh=False)

            gens = engine.generate([requests[i] for i in chunk], on_step=on_step)
            bar.total = bar.n
            bar.refresh()
        for i, gen in zip(chunk, gens):
            gen.name = items[i].name
            if gen.frames == 0:
                log(f"warning: {items[i].where}: no audio frames generated (stop: {gen.stop_reason} after "
                    f"{gen.iterations} steps)")
            info = write_generation(gen, codec, items[i].out)
            out.append(info)
            log(f"wrote {info['wav']} ({info['frames']} frames, {info['seconds']:.2f} s, {info['iterations']} "
                f"decoding steps, stop: {info['stop']}) + {Path(info['codes']).name}")
    return out
