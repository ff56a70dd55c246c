"""Process group, device and model wrapping for `train.py`: one device, DDP, or FSDP2.

`python train.py` runs without a process group; under `torchrun` (RANK / WORLD_SIZE set) a group is created
(nccl on CUDA, gloo on CPU) and every collective below becomes real. All helpers are no-ops without a group, so
the loop reads the same in both cases.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import TrainConfigError
from ..wrappers import local_device


@dataclass
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    initialized: bool  # a process group exists (launched by torchrun)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_minutes: float = 30.0) -> DistEnv:
    """Create the process group when launched by torchrun; pick this rank's device."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    cuda = torch.cuda.is_available()
    if not launched:
        return DistEnv(0, 0, 1, torch.device("cuda", 0) if cuda else torch.device("cpu"), False)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if cuda:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=datetime.timedelta(minutes=timeout_minutes))
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistEnv(rank, local, world, device, True)


def cleanup(env: DistEnv) -> None:
    if env.initialized and dist.is_initialized():
        # gloo can abort at exit ("terminate called without an active exception") when one rank tears down
        # while another still has work queued; a barrier first makes the shutdown orderly.
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (one element without a group)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ---------------------------------------------------------------------------------------------------------------
# model wrapping


def is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def wrap_model(model: nn.Module, env: DistEnv, fsdp: bool = False) -> nn.Module:
    """The module the training forward goes through: `model` itself, DDP(model), or `model` sharded by FSDP2.

    DDP uses find_unused_parameters=True: which LoRA parameters get a gradient can depend on the batch (a batch
    without audio-in never runs the Whisper tower, which carries LoRA when --lora_targets names it), and a rank
    whose backward skips a parameter would otherwise leave the others waiting for its all-reduce forever.

    FSDP2 shards every decoder layer and then the root (embeddings, heads, the tower and everything else). The
    Whisper tower is deliberately *not* its own FSDP unit: its forward runs only for batches with audio-in, and
    a unit whose all-gather runs on some ranks only would deadlock. A tower carrying LoRA (--lora_targets
    audio_tower.*) on a rank without audio-in must not change the collectives either, hence two more settings:
    the root reduce-scatters zeros for parameters without a gradient on this rank (FSDP2 otherwise sends only
    those with one: the FSDP2 counterpart of find_unused_parameters), and the embedding output always requires
    grad, so that every decoder unit's post-backward reduce-scatter fires from autograd in the same order on
    every rank (otherwise a rank whose first layer input needs no grad defers that unit's reduce-scatter to the
    end of backward, behind the root's, and the ranks' collectives cross). Parameters that got no gradient on
    *any* rank then hold zeros where one process (and DDP) leave None, which AdamW would not skip: see
    `drop_globally_unused_grads`.
    """
    if fsdp:
        if not env.initialized:
            raise TrainConfigError("--fsdp needs a process group: launch with torchrun (e.g. --nproc_per_node=1)")
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # A decoder layer returns a view (`.view(b, n, d)`); nothing modifies it in place, so FSDP2's warning
        # about in-place ops on views does not apply here.
        warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
        mesh = init_device_mesh(env.device.type, (env.world_size,))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model.set_reduce_scatter_unused_params(True)
        model.embed_tokens.register_forward_hook(_output_requires_grad)
        _track_conditional_use(model)
        return model
    if env.initialized and env.world_size > 1:
        ids = [env.device.index] if env.device.type == "cuda" else None
        # No buffer sync per forward: the only buffers (RoPE frequencies, codebook offsets) are computed, identical
        # on every rank, and never change. (torch >= 2.13 renamed broadcast_buffers to forward_sync_buffers.)
        ddp = nn.parallel.DistributedDataParallel
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                   else {"broadcast_buffers": False})
        return ddp(model, device_ids=ids, find_unused_parameters=True, gradient_as_bucket_view=True, **no_sync)
    return model


def _output_requires_grad(module: nn.Module, args: Any, output: torch.Tensor) -> None:
    """Forward hook: a frozen module's output requires grad (while grad is enabled) whatever its inputs."""
    if torch.is_grad_enabled() and not output.requires_grad:
        output.requires_grad_(True)


def _mark_used(module: nn.Module, args: Any, output: Any) -> None:
    if torch.is_grad_enabled():
        module._minihiggs_used = True


def _track_conditional_use(model: nn.Module) -> None:
    """Record, per training forward, whether each LoRA module outside the decoder layers ran (the Whisper tower
    and its projector run only for batches with audio-in). The hook sits on the LoRALinear itself: it reads its
    lora_A / lora_B weights directly, never calling them. The decoder layers run every module on every batch (no
    data-dependent control flow), so their parameters are always used; they are also the compiled part, kept
    free of these hooks."""
    from ..lora.apply import LoRALinear

    in_layers = {id(m) for layer in model.layers for m in layer.modules()}
    owners = [m for m in model.modules() if isinstance(m, LoRALinear) and id(m) not in in_layers
              and any(p.requires_grad for p in m.parameters())]
    for m in owners:
        m._minihiggs_used = False
        m.register_forward_hook(_mark_used)
    model._minihiggs_conditional = owners  # a plain list attribute (not registered as submodules)


def drop_globally_unused_grads(module: nn.Module) -> None:
    """FSDP2, after the step's last backward: set to None the gradients of parameters that no rank used in any
    micro-batch of the step. Reduce-scattering unused parameters (see `wrap_model`) gave them zeros, and AdamW
    updates a zero gradient (its moments keep moving the weights) where one process and DDP skip the parameter.
    One small all-reduce per step; a no-op for DDP and one device."""
    owners = getattr(module, "_minihiggs_conditional", None)
    if not owners or not is_fsdp(module):
        return
    used = torch.tensor([float(m._minihiggs_used) for m in owners], device=local_device(next(module.parameters())))
    used = all_reduce_max(used)
    for m, u in zip(owners, used.tolist()):
        m._minihiggs_used = False
        if not u:
            for p in m.parameters():
                if p.requires_grad:
                    p.grad = None


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter of all but the last micro-batch of an optimizer step."""
    if enabled:
        yield
    elif isinstance(module, nn.parallel.DistributedDataParallel):
        with module.no_sync():
            yield
    elif is_fsdp(module):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield
