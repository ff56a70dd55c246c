"""LoRA adapters in PEFT's on-disk format (no peft needed).

A directory holding
  adapter_model.safetensors   `base_model.model.<module path>.lora_A.weight` [r, in], `.lora_B.weight` [out, r]
                              (metadata {"format": "pt"}), exactly the keys `PeftModel.save_pretrained` writes
  adapter_config.json         PEFT 0.13's LoraConfig fields (sorted keys, indent 2, like PEFT)
  README.md                   a stub model card (PEFT writes one too)

`PeftModel.from_pretrained(<upstream HiggsAudioModel>, dir)` loads what `save_adapter` writes, and
`load_adapter` loads what PEFT writes. `target_modules` follows PEFT's rules: a list of names matches a module
whose path equals an entry or ends with "." + entry; a string is a full-match regex over module paths.

Module paths follow the base's layout (layouts.py): an adapter trained on a transformers-layout base is saved with
that model's paths (`base_model.model.model.layers.N.self_attn.q_proj...`), so PEFT on
`HiggsAudioV2ForConditionalGeneration` loads every tensor; `load_adapter` reads either naming onto either layout,
and refuses an adapter none of whose modules exists in the model (PEFT would load it as a silent no-op).

A merged checkpoint (`python -m minihiggs.export`) lists what was merged into it in `merged_adapters.json`:
loading one of those adapters onto it again is refused (it would apply twice); another adapter gets a note.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save

from .. import layouts
from ..errors import AdapterError, UnsupportedAdapterError
from ..fsio import atomic_dir, file_sha256
from ..hub import is_repo_id, resolve_dir, split_revision
from ..wrappers import unwrap
from .apply import (
    PEFT_PREFIX,
    LoRAConfig,
    LoRALinear,
    LoRAReport,
    apply_lora,
    load_lora_state_dict,
    lora_modules,
    lora_state_dict,
    normalize_peft_key,
    peft_matcher,
)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

MERGED_RECORD = "merged_adapters.json"  # in a merged checkpoint: what export merged into it

# The class PEFT records for the base, per layout (the legacy one mirrors the PEFT-written golden config).
AUTO_MAPPING = {
    layouts.LEGACY: {"base_model_class": "HiggsAudioModel",
                     "parent_library": "boson_multimodal.model.higgs_audio.modeling_higgs_audio"},
    layouts.TRANSFORMERS: {"base_model_class": layouts.MODEL_CLASS,
                           "parent_library": "transformers.models.higgs_audio_v2.modeling_higgs_audio_v2"},
}


def _num(x: float) -> float | int:
    """8.0 -> 8 (PEFT stores what the user passed; ints are the common case)."""
    return int(x) if float(x).is_integer() else float(x)


# ---------------------------------------------------------------------------------------------------------------
# config


def adapter_config_dict(r: int, alpha: float, dropout: float, target_modules: list[str] | str,
                        base_model_name_or_path: str = "", use_rslora: bool = False, revision: str | None = None,
                        layout: str = layouts.LEGACY) -> dict:
    """PEFT 0.13 LoraConfig as `save_pretrained` writes it (every field of the PEFT-written golden config).
    `revision`: the base's Hub commit (None for a local base)."""
    if isinstance(target_modules, (list, tuple, set)):
        target_modules = sorted(target_modules)
    return {
        "alpha_pattern": {},
        "auto_mapping": dict(AUTO_MAPPING[layout]),
        "base_model_name_or_path": str(base_model_name_or_path or ""),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": _num(alpha),
        "lora_dropout": float(dropout),
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": int(r),
        "rank_pattern": {},
        "revision": revision,
        "target_modules": target_modules,
        "task_type": None,
        "use_dora": False,
        "use_rslora": bool(use_rslora),
    }


def validate_adapter_config(cfg: dict, where: str = "adapter_config.json") -> None:
    """Raise for anything this LoRA cannot reproduce exactly (rather than silently loading something else)."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{where}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    for k in ("r", "lora_alpha", "target_modules"):
        if k not in cfg:
            raise AdapterError(f"{where}: missing field {k!r}")
    if cfg.get("bias", "none") != "none":
        raise UnsupportedAdapterError(f"{where}: bias={cfg['bias']!r} (trained biases) is not supported")
    for k in ("use_dora", "fan_in_fan_out", "layers_to_transform", "layer_replication", "rank_pattern",
              "alpha_pattern", "modules_to_save"):
        v = cfg.get(k)
        if not (v is None or v is False or v == {} or v == []):
            raise UnsupportedAdapterError(f"{where}: {k}={v!r} is not supported")
    init = cfg.get("init_lora_weights", True)
    if not (init is True or init is False or init == "gaussian"):
        # PiSSA / OLoRA / LoftQ-style inits also rewrite the *base* weights: loading only A/B would be wrong.
        raise UnsupportedAdapterError(f"{where}: init_lora_weights={init!r} is not supported")
    if cfg["target_modules"] == "all-linear":
        raise UnsupportedAdapterError(f"{where}: target_modules='all-linear' is not supported; list the modules")


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {adapter_dir}")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    validate_adapter_config(cfg, str(path))
    return cfg


def read_adapter_weights(adapter_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {adapter_dir} (only safetensors adapters are supported)")
    return load_file(str(path))


def adapter_scaling(cfg: dict) -> float:
    r, alpha = cfg["r"], cfg["lora_alpha"]
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def resolve_adapter_dir(adapter: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory, or a Hugging Face repo id ("owner/name[@revision]", downloaded with huggingface_hub)."""
    return resolve_dir(adapter, what="adapter", allow_patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md"],
                       revision=revision)


# ---------------------------------------------------------------------------------------------------------------
# naming (legacy or transformers module paths) and merged checkpoints


def _module_of(key: str) -> tuple[str, str]:
    """A PEFT file key -> (module path, 'lora_A' | 'lora_B' | other suffix)."""
    body = normalize_peft_key(key)[len(PEFT_PREFIX):]
    m = re.fullmatch(r"(.+)\.(lora_[AB])\.weight", body)
    return (m.group(1), m.group(2)) if m else (body, "")


def to_internal_naming(sd: dict[str, torch.Tensor], where: str) -> tuple[dict[str, torch.Tensor], str]:
    """Adapter tensors keyed in either naming -> keyed by minihiggs (legacy) paths, plus the naming they had."""
    paths = {_module_of(k)[0] for k in sd}
    naming = layouts.naming_of_paths(paths)
    if naming is None:
        raise AdapterError(f"{where}: mixes legacy and transformers module paths (e.g. {sorted(paths)[:2]})")
    if naming == layouts.LEGACY:
        return {normalize_peft_key(k): v for k, v in sd.items()}, naming
    out = {}
    for k, v in sd.items():
        path, kind = _module_of(k)
        out[f"{PEFT_PREFIX}{layouts.model_key_to_legacy(path)}.{kind}.weight" if kind else normalize_peft_key(k)] = v
    return out, naming


def recorded_base(cfg: dict) -> str | None:
    """The base an adapter_config.json records, pinned to its `revision` when it is a Hub repo id."""
    name, rev = cfg.get("base_model_name_or_path") or None, cfg.get("revision")
    return f"{name}@{rev}" if name and rev and is_repo_id(name) else name


def adapter_record(adapter_dir: Path, cfg: dict) -> dict:
    """How a merged checkpoint names an adapter it holds (merged_adapters.json)."""
    return {"adapter": str(adapter_dir), "sha256": file_sha256(adapter_dir / ADAPTER_WEIGHTS), "r": cfg["r"],
            "lora_alpha": cfg["lora_alpha"], "scaling": adapter_scaling(cfg), "revision": cfg.get("revision")}


def merged_adapters(checkpoint_dir: str | os.PathLike | None) -> list[dict]:
    """What `python -m minihiggs.export` merged into a checkpoint (empty for a base checkpoint)."""
    path = Path(checkpoint_dir or "") / MERGED_RECORD
    if not checkpoint_dir or not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text(encoding="utf-8"))["merged"])
    except (ValueError, KeyError, TypeError) as e:
        raise AdapterError(f"{path}: unreadable ({e})") from None


def check_not_merged(checkpoint_dir: str | os.PathLike | None, adapter_dir: Path, log=None) -> None:
    """Refuse an adapter that `checkpoint_dir` already holds merged; note any other adapter stacked on a merge."""
    merged = merged_adapters(checkpoint_dir)
    if not merged:
        return
    sha = file_sha256(adapter_dir / ADAPTER_WEIGHTS)
    if any(m.get("sha256") == sha for m in merged):
        raise AdapterError(f"{adapter_dir}: this adapter is already merged into {checkpoint_dir} (see its "
                           f"{MERGED_RECORD}); applying it again would count it twice: use that checkpoint alone")
    (log or _note)(f"note: {checkpoint_dir} already holds {len(merged)} merged adapter(s) "
                   f"({', '.join(m.get('adapter', '?') for m in merged)}); {adapter_dir} is stacked on top")


def _note(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# save / load


def _lora_linear_paths(model: nn.Module) -> list[str]:
    """Paths of every base nn.Linear (LoRA-wrapped or not), excluding the A/B sub-linears."""
    paths, inside = [], set()
    for path, m in model.named_modules():
        if any(path.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, LoRALinear):
            inside.add(path)
        if isinstance(m, nn.Linear) and path:
            paths.append(path)
    return paths


def _in_naming(paths: list[str], naming: str) -> list[str]:
    """minihiggs module paths in `naming` (paths without a counterpart there are left out)."""
    return [q for q in (layouts.model_key(p, naming) for p in paths) if q is not None]


def encode_target_modules(model: nn.Module, targets: list[str] | str | None,
                          naming: str = layouts.LEGACY) -> list[str] | str:
    """`target_modules` that makes PEFT pick exactly the model's LoRA modules, read over the module paths of
    `naming` (the layout the adapter is saved for).

    The given targets are kept when, read with PEFT's rules, they select exactly the wrapped modules (the
    usual case: plain names like "q_proj"). Otherwise (globs, regexes, suffix names PEFT would read
    differently) a full-match regex listing the wrapped paths is written, which PEFT reads exactly.
    """
    model = unwrap(model)
    wrapped = _in_naming(list(lora_modules(model)), naming)
    linears = _in_naming(_lora_linear_paths(model), naming)
    if targets is not None and (isinstance(targets, str) or all(isinstance(t, str) for t in targets)):
        cand = targets if isinstance(targets, str) else list(targets)
        try:
            match = peft_matcher(cand)
            if [p for p in linears if match(p)] == wrapped:
                return cand if isinstance(cand, str) else sorted(set(cand))
        except re.error:
            pass
    return "(?:" + "|".join(re.escape(p) for p in wrapped) + ")"


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, r: int | None = None, alpha: float | None = None,
                 dropout: float | None = None, targets: list[str] | str | None = None,
                 base_model_name_or_path: str = "") -> Path:
    """Write the model's LoRA weights + a PEFT adapter_config.json to `out_dir` (atomically, see `atomic_dir`).

    r / alpha / dropout / targets default to what `apply_lora` recorded on the model; given values must agree
    with the LoRA modules actually present (a mismatch is an error, not a silently wrong config). Module paths
    are those of the base's layout; `revision` records the base's Hub commit (`load_model` notes it on the model).
    Returns the directory.
    """
    model = unwrap(model)
    mods = lora_modules(model)
    if not mods:
        raise ValueError("model has no LoRA modules to save")
    rec: LoRAConfig | None = getattr(model, "_minihiggs_lora", None)
    ranks = {m.r for m in mods.values()}
    alphas = {float(m.lora_alpha) for m in mods.values()}
    drops = {float(getattr(m.lora_dropout, "p", 0.0)) for m in mods.values()}
    rslora = {m.use_rslora for m in mods.values()}
    if len(ranks) != 1 or len(alphas) != 1 or len(rslora) != 1:
        raise ValueError(f"LoRA modules disagree on r/alpha/rslora ({ranks}, {alphas}, {rslora}); "
                         f"per-module ranks are not supported")
    mr, malpha, mrs = ranks.pop(), alphas.pop(), rslora.pop()
    if r is not None and int(r) != mr:
        raise ValueError(f"save_adapter(r={r}) but the model's LoRA rank is {mr}")
    if alpha is not None and float(alpha) != malpha:
        raise ValueError(f"save_adapter(alpha={alpha}) but the model's LoRA alpha is {malpha:g}")
    if dropout is None:
        dropout = rec.dropout if rec is not None else (drops.pop() if len(drops) == 1 else 0.0)
    if targets is None and rec is not None:
        targets = rec.targets
    naming = getattr(getattr(model, "config", None), "layout", layouts.LEGACY)
    target_modules = encode_target_modules(model, targets, naming)
    alpha_out = alpha if alpha is not None else (rec.alpha if rec is not None else malpha)
    # PEFT reads base_model_name_or_path as a plain repo id: a pinned `owner/name@rev` goes to `revision`, which
    # holds the commit the weights came from (load_model notes it) whenever there is one.
    base_name, pinned = split_revision(str(base_model_name_or_path or ""))
    cfg = adapter_config_dict(mr, alpha_out, dropout, target_modules, base_name, use_rslora=mrs,
                              revision=getattr(model, "checkpoint_revision", None) or pinned, layout=naming)

    tensors = {}
    for k, v in lora_state_dict(model).items():
        path, kind = _module_of(k)
        tensors[f"{PEFT_PREFIX}{layouts.model_key(path, naming)}.{kind}.weight"] = v.detach().to("cpu").contiguous()
    with atomic_dir(out_dir) as tmp:
        # Serialised here and written by Python: a full disk is then an OSError (ENOSPC) like every other write
        # (safetensors' own file writer reports it as an opaque SafetensorError).
        (tmp / ADAPTER_WEIGHTS).write_bytes(save(tensors, metadata={"format": "pt"}))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True))
        (tmp / "README.md").write_text(
            f"---\nbase_model: '{cfg['base_model_name_or_path']}'\nlibrary_name: peft\n---\n\n"
            f"# LoRA adapter for Higgs Audio v2 (written by minihiggs)\n\n"
            f"r={mr}, lora_alpha={cfg['lora_alpha']}, {len(mods)} modules. Load with "
            f"`minihiggs.adapter.load_adapter(model, dir)` or `peft.PeftModel.from_pretrained(model, dir)`.\n")
    return Path(out_dir)


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, *,
                 lora_dtype: torch.dtype | None = torch.float32, log=None) -> LoRAReport:
    """Apply LoRA to `model` as the adapter's config says (PEFT target semantics) and load its weights strictly.

    The adapter may use either layout's module paths, whatever the model's layout. An adapter none of whose
    modules exists in the model is an AdapterError; unknown or missing keys raise a KeyError listing them; an
    adapter already merged into the model's checkpoint is refused (`check_not_merged`, `log` gets its notes).
    If the model already carries LoRA (e.g. to reload into the same model), the modules must be exactly those
    the config selects, with the same r and scaling. Returns the `LoRAReport` (base frozen, LoRA trainable).
    """
    adapter_dir = resolve_adapter_dir(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    where = adapter_dir / ADAPTER_WEIGHTS
    sd, naming = to_internal_naming(read_adapter_weights(adapter_dir), str(where))
    model = unwrap(model)
    check_not_merged(getattr(model, "checkpoint_dir", None), adapter_dir, log)
    linears = _lora_linear_paths(model)
    paths = sorted({_module_of(k)[0] for k in sd})
    if not set(paths) & set(linears):
        raise AdapterError(f"{where}: none of its {len(paths)} modules (e.g. {paths[0] if paths else '-'}) exists in "
                           f"this model: an adapter for another model")
    targets = cfg["target_modules"]
    match = peft_matcher(targets)  # PEFT reads target_modules over the module paths of the adapter's naming
    want = [p for p in linears if (q := layouts.model_key(p, naming)) is not None and match(q)]
    r, alpha, dropout = int(cfg["r"]), cfg["lora_alpha"], float(cfg.get("lora_dropout", 0.0))
    existing = lora_modules(model)
    if existing:
        if want != list(existing):
            raise ValueError(f"model already has LoRA on {len(existing)} modules but {adapter_dir} targets "
                             f"{len(want)}; load into a fresh model")
        scale = adapter_scaling(cfg)
        bad = [p for p, m in existing.items() if m.r != r or not math.isclose(m.scaling, scale)]
        if bad:
            raise ValueError(f"existing LoRA modules differ from {adapter_dir} in r/scaling: {bad[:5]}")
        report = LoRAReport(list(existing), {str(targets): list(existing)},
                            sum(m.lora_A.weight.numel() + m.lora_B.weight.numel() for m in existing.values()),
                            sum(p.numel() for p in model.parameters()), r, alpha, dropout, scale, targets)
    else:
        if not want:
            raise ValueError(f"LoRA target_modules {targets!r} of {adapter_dir} matched no nn.Linear module")
        exact = "(?:" + "|".join(re.escape(p) for p in want) + ")"  # the selection, in the model's own paths
        report = apply_lora(model, r=r, alpha=alpha, dropout=dropout, targets=exact, peft=True,
                            lora_dtype=lora_dtype, use_rslora=bool(cfg.get("use_rslora", False)))
        model._minihiggs_lora.targets = report.targets = targets
    try:
        load_lora_state_dict(model, sd, strict=True)
    except KeyError as e:
        raise KeyError(f"{where}: {e.args[0]}") from None
    return report
