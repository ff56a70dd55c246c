"""Hand-written LoRA (no peft): `LoRALinear`, target matching, PEFT-keyed state dicts, merging.

`LoRALinear` *is* an `nn.Linear` (subclass) that takes over the frozen base layer's own `weight`/`bias`
Parameters, so every base key of `model.state_dict()` is unchanged by `apply_lora` and checkpoint code keeps
working. The adapter lives in two bias-free sub-linears, exactly as PEFT lays it out:

    <path>.weight            [out, in]  frozen base weight (any dtype)
    <path>.bias              [out]      frozen base bias (Whisper tower only)
    <path>.lora_A.weight     [r, in]    Kaiming-uniform(a=sqrt(5)), like PEFT's `init_lora_weights=True`
    <path>.lora_B.weight     [out, r]   zeros

    y = x @ W.T + b + scaling * ((dropout(x) @ A.T) @ B.T),   scaling = alpha / r   (alpha / sqrt(r) with rsLoRA)

which is PEFT's `result + lora_B(lora_A(dropout(x))) * scaling` op for op, so fp32 results are bitwise PEFT's on
the same base product. The base product is the wrapped layer's own: `F.linear` for a plain `nn.Linear`, the model's
`Linear` (oneDNN for frozen fp32 weights on CPU, model/linear.py) for the Higgs model's layers; on that CPU path the
whole LoRA product is one fused autograd step (lora/fused.py: same math, another summation order).
The PEFT file key of a parameter is `base_model.model.<path>.lora_A.weight` (see `lora_state_dict`).

dtypes. A/B are stored in `lora_dtype` (default float32) whatever the base dtype: with a bf16 base on GPU the
optimizer then updates fp32 master weights (AdamW's tiny steps survive). For the matmul A/B are cast to the
*input's* dtype (a no-op in fp32; bf16 GEMMs under a bf16 model); gradients flow back through the cast into the
fp32 parameters. `lora_dtype=None` stores A/B in the base weight's dtype.

Compile / FSDP2. Plain Parameters and submodules, no hooks, no parametrizations; `enabled`/`merged` are
Python bools (a change re-specialises a compiled graph, nothing else). FSDP2 requires a uniform dtype only
among *trainable* parameters of a group, so a bf16 frozen base with fp32 LoRA params shards fine;
`lora_state_dict` gathers DTensors (a collective: call it on every rank) and `load_lora_state_dict`
re-distributes into them.

Target patterns (`apply_lora(targets=...)`), each matched against the path of every `nn.Linear` module
(paths are the checkpoint key names minus `.weight`: `layers.3.self_attn.q_proj`, `layers.0.audio_mlp.up_proj`,
`audio_tower.layers.1.self_attn.k_proj`, ...). A pattern matches a path when it matches the *whole path or
any suffix of it that starts after a dot*:
  * a plain name (letters, digits, `_`, `.`): equality, i.e. PEFT's list semantics (`path == name or
    path.endswith("." + name)`): `q_proj` hits `layers.*.self_attn.q_proj` *and* the Whisper tower's
    `audio_tower.layers.*.self_attn.q_proj` (quirk 14), `mlp.gate_proj` hits `layers.*.mlp.gate_proj` but not
    `audio_mlp.gate_proj`;
  * a glob (contains `*`, `?` or `[`, nothing regex-only; or prefixed `glob:`): `fnmatch` (`*` crosses dots),
    e.g. `audio_mlp.*`, `layers.1?.mlp.*`;
  * a regex (contains one of `\\ ^ $ + ( ) { } |`; or prefixed `re:`): `re.fullmatch`, e.g. `audio_mlp\\..*`,
    `(self_attn|mlp)\\.(q|k|v|o|gate|up|down)_proj`. A regex starting with `^` must match the whole path
    (`^layers\\.\\d+\\.audio_mlp\\..*` keeps the tower out).
A pattern that matches no `nn.Linear` is an error naming it; a plain name that hits a non-Linear module is an
error too (as in PEFT). `load_adapter` uses PEFT's exact semantics instead (`peft=True` below).
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model.linear import Linear, linear, use_onednn
from ..model.quant import quant_linear
from ..wrappers import full_tensor, is_dtensor, unwrap

PEFT_PREFIX = "base_model.model."

# q, k, v, o + gate/up/down: PEFT suffix names, so they hit `mlp.*` and `audio_mlp.*` alike. With the default
# (targets=None) the Whisper tower stays frozen; name its modules explicitly (e.g. `audio_tower.*`) to adapt it.
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOWER_PREFIX = "audio_tower."

_NAME_RE = re.compile(r"^[A-Za-z0-9_.]+$")
_REGEX_ONLY = set("\\^$+(){}|")
_GLOB_CHARS = set("*?[")


class LoRALinear(nn.Linear):
    """A frozen `nn.Linear` plus a trainable low-rank update; see the module docstring.

    Built from an existing linear with `LoRALinear(base, r, alpha)`: it shares (does not copy) the base's
    `weight` and `bias` Parameters and freezes them.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 lora_dtype: torch.dtype | None = torch.float32, use_rslora: bool = False,
                 generator: torch.Generator | None = None):
        if not isinstance(base, nn.Linear) or isinstance(base, LoRALinear):
            raise TypeError(f"LoRALinear wraps a plain nn.Linear, got {type(base).__name__}")
        if int(r) != r or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {dropout!r}")
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a fresh weight
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight  # None for a quantized base (model/quant.py), whose weight is `qweight`
        self.qweight = getattr(base, "qweight", None)
        self.bias = base.bias
        self.base_class = type(base)  # a merge gives this class back (a plain model Linear for a quantized base)
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(False)
        self.r = int(r)
        self.lora_alpha = alpha
        self.use_rslora = bool(use_rslora)
        self.scaling = alpha / math.sqrt(self.r) if use_rslora else alpha / self.r
        like = base.weight if self.qweight is None else self.qweight.scale
        dev = like.device
        dtype = (like.dtype if self.qweight is None else self.qweight.dtype) if lora_dtype is None else lora_dtype
        self.lora_dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, self.r, bias=False, device=dev, dtype=dtype)
        self.lora_B = nn.Linear(self.r, self.out_features, bias=False, device=dev, dtype=dtype)
        self.enabled = True
        self.merged = False
        self.reset_lora_parameters(generator)

    def reset_parameters(self) -> None:
        """Re-initialise the adapter only (A Kaiming, B zeros); the frozen base weights are never touched, so
        meta-device flows (`to_empty()` + `reset_parameters()` + load the base) keep working."""
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """PEFT's `init_lora_weights=True`: A ~ kaiming_uniform(a=sqrt(5)) (= U(-1/sqrt(in), 1/sqrt(in))), B = 0."""
        a = self.lora_A.weight
        if a.device.type == "meta":
            pass
        elif generator is not None and generator.device != a.device:
            tmp = torch.empty(a.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(tmp, a=math.sqrt(5), generator=generator)
            a.copy_(tmp)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_B.weight)

    def base_product(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            return quant_linear(x, self.qweight, self.bias)
        return (linear if issubclass(self.base_class, Linear) else F.linear)(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.merged:
            return self.base_product(x)
        a = self.lora_A.weight
        b = self.lora_B.weight
        if issubclass(self.base_class, Linear) and self.qweight is None and use_onednn(x, self.weight) and \
                a.dtype == b.dtype == x.dtype and (self.bias is None or not self.bias.requires_grad):
            from .fused import frozen_lora_linear  # the CPU fp32 form (one autograd step, in-place accumulation)

            return frozen_lora_linear(x, self.lora_dropout(x), self.weight, self.bias, a, b, self.scaling)
        result = self.base_product(x)
        h = self.lora_dropout(x)
        return result + F.linear(F.linear(h, a.to(h.dtype)), b.to(h.dtype)) * self.scaling

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in float32, [out, in] (PEFT's `get_delta_weight`, same op order)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """Fold the update into the base weight in fp32 (`W + scaling * B @ A`, cast back to W's dtype) and
        return a plain linear of the wrapped layer's class sharing the merged weight/bias. This module is then
        marked merged (its own forward stops adding the update) and should be discarded."""
        if self.merged:
            raise RuntimeError("LoRALinear is already merged")
        if self.qweight is not None:  # into the dequantized weight: a full-precision Linear again (the memory is back)
            self.weight = nn.Parameter(self.qweight.dequantize(self.qweight.dtype), requires_grad=False)
            self.qweight, self.base_class = None, Linear
        w = self.weight
        if is_dtensor(w):
            raise RuntimeError("merge a LoRA model after gathering it; sharded (DTensor) weights are not supported")
        w.data.copy_((w.data.float() + self.delta_weight()).to(w.dtype))
        self.merged = True
        lin = self.base_class.__new__(self.base_class)
        nn.Module.__init__(lin)
        lin.in_features, lin.out_features = self.in_features, self.out_features
        lin.weight = self.weight
        lin.bias = self.bias
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, r={self.r}, alpha={self.lora_alpha}, scaling={self.scaling:g}, "
                f"lora_dtype={self.lora_A.weight.dtype}, enabled={self.enabled}, merged={self.merged}")


# ---------------------------------------------------------------------------------------------------------------
# target matching


def _pattern_kind(p: str) -> tuple[str, str]:
    if p.startswith("re:"):
        return "regex", p[3:]
    if p.startswith("glob:"):
        return "glob", p[5:]
    if _NAME_RE.match(p):
        return "name", p
    if set(p) & _REGEX_ONLY:
        return "regex", p
    if set(p) & _GLOB_CHARS:
        return "glob", p
    return "regex", p


def _suffixes(path: str) -> list[str]:
    """The path and every suffix of it that starts after a dot."""
    parts = path.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


def make_matcher(pattern: str):
    """path -> bool for one target pattern (semantics in the module docstring)."""
    kind, body = _pattern_kind(pattern)
    if not body:
        raise ValueError(f"empty LoRA target pattern {pattern!r}")
    if kind == "name":
        return lambda path: path == body or path.endswith("." + body)
    if kind == "glob":
        return lambda path: any(fnmatch.fnmatchcase(s, body) for s in _suffixes(path))
    try:
        if body.startswith("^"):
            rx = re.compile(body[1:])
            return lambda path: rx.fullmatch(path) is not None
        rx = re.compile(body)
    except re.error as e:
        raise ValueError(f"LoRA target pattern {pattern!r} is not a valid regex: {e}") from None
    return lambda path: any(rx.fullmatch(s) is not None for s in _suffixes(path))


def peft_matcher(target_modules: str | Iterable[str]):
    """PEFT 0.13's `check_target_module_exists`: a str is `re.fullmatch` on the module path; a list hits a
    module whose path equals an entry or ends with "." + entry."""
    if isinstance(target_modules, str):
        rx = re.compile(target_modules)
        return lambda path: rx.fullmatch(path) is not None
    names = list(target_modules)
    return lambda path: any(path == n or path.endswith("." + n) for n in names)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """path -> LoRALinear, in module order."""
    return {n: m for n, m in unwrap(model).named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA A/B Parameters (what the optimizer should see), in module order."""
    out = []
    for m in lora_modules(model).values():
        out += [m.lora_A.weight, m.lora_B.weight]
    return out


def _linear_candidates(model: nn.Module) -> tuple[dict[str, nn.Linear], dict[str, nn.Module]]:
    linears, others = {}, {}
    for path, m in model.named_modules():
        if not path:
            continue
        if isinstance(m, nn.Linear):
            linears[path] = m
        else:
            others[path] = m
    return linears, others


@dataclass
class LoRAReport:
    modules: list[str]  # wrapped module paths, in model order
    by_pattern: dict[str, list[str]]  # every target pattern -> the paths it matched
    trainable_params: int  # LoRA parameters (elements)
    total_params: int  # all parameters of the model after wrapping (elements)
    r: int
    alpha: float
    dropout: float
    scaling: float
    targets: list[str] | str = field(default_factory=list)

    def summary(self) -> str:
        pct = 100.0 * self.trainable_params / max(self.total_params, 1)
        lines = [f"LoRA r={self.r} alpha={self.alpha:g} (scaling {self.scaling:g}) dropout={self.dropout:g}: "
                 f"{len(self.modules)} modules, {self.trainable_params:,} trainable of "
                 f"{self.total_params:,} parameters ({pct:.4f}%)"]
        for p, hits in self.by_pattern.items():
            lines.append(f"  {p!r}: {len(hits)} modules")
        return "\n".join(lines)


@dataclass
class LoRAConfig:
    """What apply_lora did; stored on the model as `_minihiggs_lora` (used by save_adapter's defaults)."""
    r: int
    alpha: float
    dropout: float
    targets: list[str] | str
    modules: list[str]
    use_rslora: bool = False
    peft: bool = False  # targets were interpreted with PEFT semantics


def apply_lora(model: nn.Module, r: int = 16, alpha: float = 32.0, dropout: float = 0.0,
               targets: Iterable[str] | str | None = None, *, lora_dtype: torch.dtype | None = torch.float32,
               use_rslora: bool = False, seed: int | None = None, peft: bool = False) -> LoRAReport:
    """Wrap every targeted `nn.Linear` of `model` in a `LoRALinear`, in place, and freeze everything else.

    targets: patterns (module docstring); default `DEFAULT_TARGETS`. peft=True: interpret `targets` exactly
    like PEFT's `target_modules` (a str is a full-match regex, a list entries are module-name suffixes).
    seed: initialise every A from one `torch.Generator(seed)` (in module order) instead of the global RNG.
    Raises ValueError for a pattern matching no nn.Linear (named in the message), and when the model already
    carries LoRA.
    """
    model = unwrap(model)
    if lora_modules(model):
        raise ValueError("model already has LoRA modules; merge_lora() or build a fresh model first")
    default = targets is None
    if default:
        targets = list(DEFAULT_TARGETS)
    if isinstance(targets, str) and not peft:
        targets = [targets]
    if not isinstance(targets, str):
        targets = list(targets)
        if not targets:
            raise ValueError("no LoRA targets given")
    linears, others = _linear_candidates(model)

    by_pattern: dict[str, list[str]] = {}
    if peft:
        match = peft_matcher(targets)
        if isinstance(targets, list):
            # PEFT raises when an explicitly named target is not a supported layer.
            bad = [p for p in others if match(p)]
            if bad:
                raise ValueError(f"LoRA targets {targets} hit modules that are not nn.Linear: {bad[:8]}")
        key = targets if isinstance(targets, str) else ", ".join(targets)
        by_pattern[key] = [p for p in linears if match(p)]
        if not by_pattern[key]:
            raise ValueError(f"LoRA target_modules {targets!r} matched no nn.Linear module "
                             f"(e.g. {list(linears)[:4]})")
    else:
        for pat in targets:
            match = make_matcher(pat)
            hits = [p for p in linears if match(p)]
            if _pattern_kind(pat)[0] == "name":
                bad = [p for p in others if match(p)]
                if bad:
                    raise ValueError(f"LoRA target {pat!r} names modules that are not nn.Linear: {bad[:8]} "
                                     f"(LoRA supports nn.Linear only)")
            if not hits:
                raise ValueError(f"LoRA target pattern '{pat}' matched no nn.Linear module "
                                 f"(example paths: {list(linears)[:4]})")
            by_pattern[pat] = hits
    if default:  # the default adapts the language model only; the audio tower is opt-in
        by_pattern = {k: [p for p in v if not p.startswith(TOWER_PREFIX)] for k, v in by_pattern.items()}
    chosen = set().union(*by_pattern.values())
    paths = [p for p in linears if p in chosen]  # model order
    # A model can declare modules LoRA must not wrap ({path: why}), e.g. a head its fused loss multiplies by the
    # weight directly: refused here, before anything is changed, rather than silently ignored later.
    refused = getattr(model, "LORA_UNSUPPORTED", {})
    bad = [f"{p} ({refused[p]})" for p in paths if p in refused]
    if bad:
        raise ValueError(f"LoRA on {', '.join(bad)} is not supported; adapt other modules")

    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for path in paths:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        wrapped = LoRALinear(linears[path], r, alpha, dropout, lora_dtype=lora_dtype, use_rslora=use_rslora,
                             generator=gen)
        setattr(parent, name, wrapped)
    trainable = sum(p.numel() for p in lora_parameters(model))
    total = sum(p.numel() for p in model.parameters())
    model._minihiggs_lora = LoRAConfig(int(r), alpha, float(dropout), targets, paths, use_rslora, peft)
    scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
    return LoRAReport(paths, by_pattern, trainable, total, int(r), alpha, float(dropout), scaling, targets)


# ---------------------------------------------------------------------------------------------------------------
# state dicts (PEFT keys), switches, merging


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`base_model.model.<path>.lora_{A,B}.weight` -> tensor (detached, the parameters' dtype), model order.

    DTensor (FSDP2) parameters are gathered with `full_tensor()`, a collective: call on every rank.
    """
    out = {}
    for path, m in lora_modules(model).items():
        out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = full_tensor(m.lora_A.weight.detach())
        out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = full_tensor(m.lora_B.weight.detach())
    return out


def normalize_peft_key(key: str) -> str:
    """Accept PEFT's in-memory names (`.lora_A.default.weight`) and keys without the `base_model.model.` prefix."""
    key = re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", key)
    return key if key.startswith(PEFT_PREFIX) else PEFT_PREFIX + key


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """Copy LoRA weights keyed like `lora_state_dict` into the model's LoRA parameters (cast to their dtype).

    strict: keys the model lacks and LoRA parameters the dict lacks are errors listing them. Shapes must match.
    """
    params = {}
    for path, m in lora_modules(model).items():
        params[f"{PEFT_PREFIX}{path}.lora_A.weight"] = m.lora_A.weight
        params[f"{PEFT_PREFIX}{path}.lora_B.weight"] = m.lora_B.weight
    given = {normalize_peft_key(k): v for k, v in sd.items()}
    unexpected = sorted(set(given) - set(params))
    missing = sorted(set(params) - set(given))
    if strict and (unexpected or missing):
        raise KeyError(f"LoRA state dict does not fit the model: {len(unexpected)} unexpected keys "
                       f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}; {len(missing)} missing keys "
                       f"{missing[:10]}{' ...' if len(missing) > 10 else ''}")
    bad = [f"{k}: file {tuple(given[k].shape)} vs model {tuple(params[k].shape)}"
           for k in params if k in given and tuple(given[k].shape) != tuple(params[k].shape)]
    if bad:
        raise ValueError("LoRA shape mismatch: " + "; ".join(bad[:10]))
    for k, p in params.items():
        if k not in given:
            continue
        src = given[k].detach()
        if is_dtensor(p):
            from torch.distributed.tensor import distribute_tensor
            src = distribute_tensor(src.to(device=p.device, dtype=p.dtype), p.device_mesh, p.placements)
            p.data.copy_(src)
        else:
            p.data.copy_(src.to(device=p.device, dtype=p.dtype))


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every LoRA update on or off (off: the model computes exactly the base model)."""
    for m in lora_modules(model).values():
        m.enabled = bool(enabled)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight (fp32 math, original dtype kept) and replace each
    `LoRALinear` by a plain linear of the class it wrapped, in place; returns the (unwrapped) model. Parameters
    keep their requires_grad (frozen after apply_lora). The `enabled` switch is ignored: every update is merged."""
    model = unwrap(model)
    for path, m in lora_modules(model).items():
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, name, m.merge())
    if hasattr(model, "_minihiggs_lora"):
        del model._minihiggs_lora
    return model
