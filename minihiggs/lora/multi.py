"""Many LoRA adapters over one base model, chosen per batch row: rows of one forward may use different voices.

`AdapterBank.attach(model, adapter_dirs)` wraps every linear that any adapter targets in a `MultiLoRALinear`: the
frozen base weight (shared, untouched) plus the stacked adapters, `A [N+1, r, in]` and `B [N+1, out, r]` (slot 0
is "no adapter", all zeros; ranks are zero-padded to the largest one; an adapter not targeting a layer has zeros
there; each adapter's `scaling` is folded into its B in float32). A forward computes

    y = x @ W.T  +  bmm(bmm(x, A[rows].T), B[rows].T)          rows [batch]: each row's adapter slot

so N voices cost one base model plus N small adapters, and one weight read of the base serves every row. A row's
result does not depend on the other rows' adapters (the delta is per row; a zero delta adds exact zeros).
Before each forward the caller says which adapter each batch row uses: `bank.select([slot, ...])`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import AdapterError
from ..model.linear import Linear, linear
from .adapter import (
    adapter_scaling,
    check_not_merged,
    read_adapter_config,
    read_adapter_weights,
    resolve_adapter_dir,
    to_internal_naming,
)
from .apply import PEFT_PREFIX, lora_modules


class MultiLoRALinear(nn.Module):
    """A frozen linear plus per-row adapter deltas (see the module docstring)."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, bank: "AdapterBank"):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.model_layer = isinstance(base, Linear)
        self.register_buffer("lora_A", a, persistent=False)  # [N+1, r, in]
        self.register_buffer("lora_B", b, persistent=False)  # [N+1, out, r], scaling folded in
        self.bank = [bank]  # (a list: not a submodule)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias) if self.model_layer else nn.functional.linear(x, self.weight, self.bias)
        rows = self.bank[0].current
        a, b = self.lora_A[rows].to(x.dtype), self.lora_B[rows].to(x.dtype)
        if rows.shape[0] == 1:  # one row (a prefill, whose forward may flatten its positions): any shape
            return y + nn.functional.linear(nn.functional.linear(x, a[0]), b[0])
        if x.shape[0] != rows.shape[0]:
            raise RuntimeError(f"MultiLoRALinear: {rows.shape[0]} adapter slots selected for a batch of {x.shape[0]}")
        flat = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, T, in]
        delta = torch.bmm(torch.bmm(flat, a.transpose(1, 2)), b.transpose(1, 2))
        return y + delta.reshape(y.shape)


class AdapterBank:
    """The adapters attached to one model; slot i + 1 is `names[i]`, slot 0 the base model."""

    def __init__(self, names: list[str]):
        self.names = names
        self._rows: dict[int, torch.Tensor] = {}  # batch size -> its row-slot buffer (fixed address: CUDA graphs)
        self.device = torch.device("cpu")
        self.current = torch.zeros(1, dtype=torch.long)  # the slots of the next forward's rows

    def slot(self, name: str | None) -> int:
        return 0 if name is None else self.names.index(name) + 1

    def select(self, slots: list[int]) -> None:
        """The adapter slot of each row of the next forward(s): one slot per batch row, or one for a single row."""
        buf = self._rows.get(len(slots))
        if buf is None:
            buf = self._rows[len(slots)] = torch.zeros(len(slots), dtype=torch.long, device=self.device)
        buf.copy_(torch.tensor(slots, dtype=torch.long))
        self.current = buf

    @classmethod
    @torch.no_grad()
    def attach(cls, model: nn.Module, adapters: dict[str, str | os.PathLike]) -> "AdapterBank":
        """Wrap `model`'s targeted linears, in place, with every adapter of `adapters` ({name: directory}; PEFT files
        in either module naming, lora/adapter.py)."""
        if lora_modules(model):
            raise AdapterError("the base model already carries LoRA modules; attach adapters to a plain base")
        names = list(adapters)
        bank = cls(names)
        bank.device = next(model.parameters()).device
        per_path: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        for i, name in enumerate(names, start=1):
            d = resolve_adapter_dir(adapters[name])
            cfg = read_adapter_config(d)
            scale = adapter_scaling(cfg)
            check_not_merged(getattr(model, "checkpoint_dir", None), d)  # (applied twice otherwise)
            sd, _ = to_internal_naming(read_adapter_weights(d), str(d))  # either naming -> minihiggs module paths
            for key, a in sd.items():
                if not key.endswith(".lora_A.weight"):
                    continue
                path = key[len(PEFT_PREFIX):-len(".lora_A.weight")]
                b = sd.get(key.replace(".lora_A.", ".lora_B."))
                mod = _get(model, path)
                if b is None or not isinstance(mod, nn.Linear) or a.shape[1] != mod.in_features or \
                        b.shape[0] != mod.out_features or b.shape[1] != a.shape[0]:
                    raise AdapterError(f"{d}: {path} does not fit the base model (a LoRA for another base?)")
                per_path.setdefault(path, {})[i] = (a.float(), b.float() * scale)
        for path, by_slot in per_path.items():
            base = _get(model, path)
            r = max(a.shape[0] for a, _ in by_slot.values())
            w = base.weight
            a_all = torch.zeros(len(names) + 1, r, base.in_features, device=w.device)
            b_all = torch.zeros(len(names) + 1, base.out_features, r, device=w.device)
            for i, (a, b) in by_slot.items():
                a_all[i, :a.shape[0]] = a
                b_all[i, :, :b.shape[1]] = b
            parent, _, leaf = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, MultiLoRALinear(base, a_all, b_all, bank))
        return bank


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def adapter_names(dirs: list[str | os.PathLike]) -> list[str]:
    """Default names of adapter directories: their folder name (a run's `final/` or `best/`: the run's name)."""
    out = []
    for d in dirs:
        p = Path(d)
        out.append(p.parent.name if p.name in ("final", "best") else p.name)
    return out
