"""What generation loads: the model (a base checkpoint + a LoRA adapter, or a merged checkpoint), its text
tokenizer, and the audio tokenizer (codec).

An adapter is a directory with `adapter_config.json` + `adapter_model.safetensors`: a run's `best/`, `final/`
or `checkpoints/step-N` (or a Hub repo id). Its LoRA is applied unmerged, loaded strictly, then folded into the
weights for decoding (`merge_lora`: fp32 math, the base dtype kept), so a step costs the same as the base model's.
Without `--base_ckpt` the adapter's recorded base (`base_model_name_or_path`) is used.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from ..errors import AdapterError, CheckpointError
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
                          dtype: torch.dtype = torch.float32, merge: bool = True, log=None) -> HiggsAudioModel:
    """The model to generate with. `log(msg)` receives one-line notes (e.g. an adapter recorded for a base
    checkpoint of another name that still fits)."""
    log = log or (lambda m: print(m, file=sys.stderr))
    adir, recorded = None, None
    if adapter:
        adir = adapter_dir(adapter)
        acfg = read_adapter_config(adir)  # (its errors name the file already)
        recorded = recorded_base(acfg)  # (pinned to the recorded revision when it is a Hub repo id)
        if base_ckpt is None:
            if recorded is None:
                raise AdapterError(f"{adir / ADAPTER_CONFIG} records no base_model_name_or_path; pass --base_ckpt")
            base_ckpt = recorded
    if base_ckpt is None:
        raise CheckpointError("no model: pass --base_ckpt (a base or merged checkpoint) and/or --adapter")
    model = load_model(base_ckpt, dtype=dtype, device=device)
    if adir is None:
        return model
    try:
        load_adapter(model, adir, log=log)
    except AdapterError:
        raise
    except (KeyError, ValueError) as e:
        msg = e.args[0] if e.args else e
        made_for = f"it was trained on {recorded}" if recorded else "it records no base checkpoint"
        raise AdapterError(f"{adir}: this adapter was made for another base checkpoint ({made_for}), not "
                           f"{base_ckpt}: {msg}") from None
    if recorded and not _same_base(recorded, str(base_ckpt)):
        where = "" if is_repo_id(recorded) or Path(recorded).expanduser().is_dir() else " (no longer there)"
        log(f"note: {adir} was trained on {recorded}{where}; it fits {base_ckpt}, which is used")
    if merge:
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
    """The audio tokenizer; decode-only unless references must be encoded (`encode`)."""
    from ..codec import AudioTokenizer

    return AudioTokenizer.from_pretrained(codec, device=device, decode_only=not encode)
