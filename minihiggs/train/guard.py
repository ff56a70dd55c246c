"""The accepted-update check: an optimizer step is kept only if the loss, the gradient norm *and the updated
trainable weights* are finite; otherwise the weights and the optimizer state go back to what they were.

Finite loss and gradients do not make a finite update: with an absurd --lr the step itself overflows, and without
this check that state would be trained on and saved as the "last good" checkpoint.

Cost (the trainable LoRA state is small): before `optimizer.step()` one fused copy of the parameters and their
optimizer state into buffers kept across steps; after it one fused norm over the new parameters, read by the
loop in the same host sync as the loss and the gradient norm (no sync of its own). Copying back happens only for
a rejected step. Under FSDP2 each rank checks its shards and one tiny all-reduce combines the verdicts.
"""

from __future__ import annotations

import torch

from ..wrappers import local_tensor as _local  # (a DTensor's local shard shares its storage: copies stay local)
from .distributed import all_reduce_max


def _grouped(tensors: list[torch.Tensor]) -> dict[tuple, list[int]]:
    """Indexes by (device, dtype): a foreach op takes its fused path only on a list of one device and dtype
    (AdamW's step counters live on the CPU next to CUDA moments)."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


class UpdateGuard:
    def __init__(self, optimizer: torch.optim.Optimizer, sharded: bool = False):
        self.optimizer = optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.sharded = sharded
        self._copies: list[torch.Tensor] = []
        self._had_state: list[bool] = []

    def _tensors(self) -> list[torch.Tensor]:
        """Every parameter and every tensor of its optimizer state, in a fixed order (local shards)."""
        out = []
        for p in self.params:
            out.append(_local(p.detach()))
            for _, v in sorted(self.optimizer.state.get(p, {}).items()):
                if isinstance(v, torch.Tensor):
                    out.append(_local(v))
        return out

    @staticmethod
    def _copy(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
        for idx in _grouped(src).values():
            torch._foreach_copy_([dst[i] for i in idx], [src[i] for i in idx])

    @torch.no_grad()
    def snapshot(self) -> None:
        """Before `optimizer.step()`: remember the parameters and the optimizer state."""
        self._had_state = [bool(self.optimizer.state.get(p)) for p in self.params]
        src = self._tensors()
        if len(self._copies) != len(src) or any(
                (c.shape, c.dtype, c.device) != (s.shape, s.dtype, s.device) for c, s in zip(self._copies, src)):
            self._copies = [torch.empty_like(t) for t in src]  # the first step, and the one that creates the state
        self._copy(self._copies, src)

    @torch.no_grad()
    def weights_finite(self) -> torch.Tensor:
        """After `optimizer.step()`: a 0-dim bool tensor on the parameters' device, True when the norm of every
        updated parameter is finite: no NaN or inf, and no weight so large that the norm overflows (in fp32 from
        about 1e19, far beyond anything trainable). Not synchronised."""
        local = [_local(p.detach()) for p in self.params]
        ok = torch.stack([n.float() for idx in _grouped(local).values()
                          for n in torch._foreach_norm([local[i] for i in idx])]).isfinite().all()
        if self.sharded:  # every rank must reach the same verdict on its own shards
            ok = all_reduce_max((~ok).to(torch.float32)) == 0
        return ok

    @torch.no_grad()
    def restore(self) -> None:
        """Undo the last `optimizer.step()`: parameters and optimizer state as `snapshot` saw them (a parameter
        without state then has none again)."""
        for p, had in zip(self.params, self._had_state):
            if not had:
                self.optimizer.state.pop(p, None)
        self._copy(self._tensors(), self._copies)
