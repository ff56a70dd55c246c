"""What generation loads: the model (a base checkpoint + a LoRA adapter, or a merged checkpoint), its text
tokenizer, and the audio tokenizer (codec).

An adapter is a directory with `adapter_config.json` + `adapter_model.safetensors`: a run's `best/`, `final/`
or `checkpoints/step-N` (or a Hub repo id). Its LoRA is applied unmerged, loaded strictly, then folded into the
weights for decoding (`merge_lora`: fp32 math, the base dtype kept), so a step costs the same as the base model's.
Without `--base_ckpt` the adapter's recorded base (`base_model_name_or_path`) is used; without `--codec` the
audio tokenizer recorded with the shards or with the adapter's training run (`recorded_codec`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from ..errors import AdapterError, CheckpointError, UserError
from ..hub import is_repo_id
from ..lora.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    load_adapter,
    read_adapter_config,
    recorded_base,
    resolve_adapter_dir,
)
from ..lora.apply import merge_lora
from ..model.checkpoint import load_model, resolve_checkpoint
from ..model.higgs import HiggsAudioModel
from ..text.tokenizer import TextTokenizer

STOP_TOKEN_NAMES = ("<|end_of_text|>", "<|eot_id|>")  # the serve engine's stop strings


def _same_base(recorded: str, given: str) -> bool:
    if recorded == given:
        return True
    a, b = Path(recorded).expanduser(), Path(given).expanduser()
    if a.is_dir() and b.is_dir():
        return a.resolve() == b.resolve()
    return False


def adapter_dir(adapter: str | os.PathLike) -> Path:
    """The adapter directory, with a clear error when `adapter` is not one."""
    d = resolve_adapter_dir(adapter)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (d / name).is_file():
            hint = " (a training run directory? pass its best/, final/ or checkpoints/step-N)" \
                if (d / "final").is_dir() or (d / "best").is_dir() or (d / "checkpoints").is_dir() else ""
            raise AdapterError(f"{d}: not a LoRA adapter directory, {name} is missing{hint}")
    return d


def load_generation_model(base_ckpt: str | None, adapter: str | None = None, *, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32, merge: bool = True, quantize: str | None = None,
                          log=None) -> HiggsAudioModel:
    """The model to generate with. `log(msg)` receives one-line notes: what was loaded (`base: DIR`, `adapter:
    DIR`, resolved) and e.g. an adapter recorded for a base checkpoint of another name that still fits.
    With `quantize` (model/quant.py) an adapter is never merged: merging would bring the full-precision weights
    back; its low-rank product runs beside each quantized matmul instead."""
    log = log or (lambda m: print(m, file=sys.stderr))
    adir, recorded, base_note = None, None, ""
    if adapter:
        adir = adapter_dir(adapter)
        acfg = read_adapter_config(adir)  # (its errors name the file already)
        recorded = recorded_base(acfg)  # (pinned to the recorded revision when it is a Hub repo id)
        if base_ckpt is None:
            if recorded is None:
                raise AdapterError(f"{adir / ADAPTER_CONFIG} records no base_model_name_or_path; pass --base_ckpt")
            base_ckpt, base_note = recorded, f" (recorded in {adir.resolve() / ADAPTER_CONFIG})"
    if base_ckpt is None:
        raise CheckpointError("no model: pass --base_ckpt (a base or merged checkpoint) and/or --adapter")
    model = load_model(base_ckpt, dtype=dtype, device=device, quantize=quantize)
    log(f"base: {Path(model.checkpoint_dir).resolve()}{base_note}")
    if adir is None:
        return model
    log(f"adapter: {adir.resolve()}")
    try:
        load_adapter(model, adir, log=log)
    except UserError:
        raise  # (its message says what is wrong: e.g. an adapter already merged into this checkpoint)
    except (KeyError, ValueError) as e:  # names or shapes that do not fit this base
        msg = e.args[0] if e.args else e
        made_for = f"it was trained on {recorded}" if recorded else "it records no base checkpoint"
        raise AdapterError(f"{adir}: this adapter was made for another base checkpoint ({made_for}), not "
                           f"{base_ckpt}: {msg}") from None
    if recorded and not _same_base(recorded, str(base_ckpt)):
        where = "" if is_repo_id(recorded) or Path(recorded).expanduser().is_dir() else " (no longer there)"
        log(f"note: {adir} was trained on {recorded}{where}; it fits {base_ckpt}, which is used")
    if merge and not quantize:
        merge_lora(model)
    return model.eval()


def load_tokenizer(model: HiggsAudioModel) -> TextTokenizer:
    """The text tokenizer shipped with the model's checkpoint (tokenizer.json [+ tokenizer_config.json])."""
    ckpt = Path(getattr(model, "checkpoint_dir", "") or resolve_checkpoint())
    if not (ckpt / "tokenizer.json").is_file():
        raise CheckpointError(f"{ckpt}: no tokenizer.json next to the weights (generation needs the text tokenizer)")
    tok = TextTokenizer.from_dir(ckpt)
    cfg = model.config
    for name, want in (("<|AUDIO_OUT|>", cfg.audio_out_token_id), ("<|audio_out_bos|>", cfg.audio_out_bos_token_id),
                       ("<|audio_eos|>", cfg.audio_eos_token_id)):
        try:
            got = tok.token_id(name)
        except KeyError:
            raise CheckpointError(f"{ckpt}: the tokenizer does not define {name} (not a Higgs Audio tokenizer?)") \
                from None
        if got != want:
            raise CheckpointError(f"{ckpt}: the tokenizer maps {name} to {got} but config.json says {want}")
    return tok


def stop_token_ids(tok: TextTokenizer) -> tuple[int, ...]:
    return tuple(tok.token_id(n) for n in STOP_TOKEN_NAMES)


def load_codec(codec: str | os.PathLike, device: str | torch.device = "cpu", encode: bool = False):
    """The audio tokenizer; decode-only unless references must be encoded (`encode`). Its `checkpoint_dir` is the
    resolved directory (a Hub id's snapshot), as `load_model` records it for the model."""
    from ..codec import AudioTokenizer
    from ..codec.loading import resolve

    config, weights = resolve(codec)
    tokenizer = AudioTokenizer.from_files(config, weights, device=device, decode_only=not encode)
    tokenizer.checkpoint_dir = str(config.parent)
    return tokenizer


# ---- the codec a run was made with ------------------------------------------------------------------------------
SHARD_INDEX = "index.json"  # prep's record of a prepared directory (minihiggs.data.shards)
TRAIN_ARGS = "train_args.json"  # a training checkpoint's record of its settings (minihiggs.train.checkpointing)


def recorded_codec(shards: str | os.PathLike | None, adapter: str | os.PathLike | None) -> tuple[str, str] | None:
    """(codec, the file that records it) when `--codec` is not given: the one prep used for `shards`, else the one
    the adapter's training run used (its --sample_codec, else the codec recorded in its --train_manifest shards);
    None when nothing records one. Only local files are read (a Hub adapter records no run)."""
    if shards is not None:
        found = _codec_of_shards(Path(shards))
        if found:
            return found
    if adapter is None or not Path(adapter).expanduser().is_dir():
        return None
    record = _train_args_of(Path(adapter).expanduser())
    if record is None:
        return None
    args = _read_json(record).get("args")
    if not isinstance(args, dict):
        return None
    if args.get("sample_codec"):
        return str(args["sample_codec"]), str(record.resolve())
    return _codec_of_shards(Path(args["train_manifest"])) if args.get("train_manifest") else None


def _codec_of_shards(shards: Path) -> tuple[str, str] | None:
    index = shards.expanduser() / SHARD_INDEX
    codec = _read_json(index).get("codec") if index.is_file() else None
    return (str(codec), str(index.resolve())) if codec else None


def _train_args_of(adapter: Path) -> Path | None:
    """The train_args.json of an adapter's run: the checkpoint's own (checkpoints/step-N), else the newest
    checkpoint's of the run holding best/ or final/."""
    if (adapter / TRAIN_ARGS).is_file():
        return adapter / TRAIN_ARGS
    records = sorted((adapter.parent / "checkpoints").glob(f"step-*/{TRAIN_ARGS}"))
    return records[-1] if records else None


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # (only a default is looked for here; the file's owner reports it when it is used)
    return obj if isinstance(obj, dict) else {}
