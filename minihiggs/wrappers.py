"""What sits between a module and the code that uses it: DDP / torch.compile wrappers and FSDP2's DTensors.

One definition each, used by LoRA, checkpoints and the trainer. DTensor is detected with `isinstance` (torch's
public `torch.distributed.tensor.DTensor`) once that module is loaded: no DTensor can exist before, and not importing
it keeps ~40 MB of modules out of a single-process run (a build without distributed support simply has none).
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn


def _dtensor_class() -> type | tuple:
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", ()) if module is not None else ()  # isinstance(x, ()) is always False


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel (`.module`) and torch.compile (`._orig_mod`) wrappers. An FSDP2 module is
    the model itself (fully_shard changes the class in place), so it is returned as is."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def is_dtensor(t: torch.Tensor) -> bool:
    dtensor = _dtensor_class()
    return isinstance(t, dtensor) or isinstance(getattr(t, "data", None), dtensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered to a plain tensor (a collective: call on every rank); plain tensors pass through."""
    return t.full_tensor() if isinstance(t, _dtensor_class()) else t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's data: a DTensor's local shard (sharing its storage), or the tensor itself."""
    return t.to_local() if isinstance(t, _dtensor_class()) else t


def local_device(t: torch.Tensor) -> torch.device:
    """The device holding this rank's data (a DTensor's local shard, or the tensor itself)."""
    return t.to_local().device if isinstance(t, _dtensor_class()) else t.device
