"""The LoRA product on CPU fp32 as one autograd step: y = x W^T (+ b) + s (x_d A^T) B^T, W and b frozen.

Written op by op (PEFT's `result + lora_B(lora_A(dropout(x))) * scaling`), the low-rank update costs as much as
the frozen product itself on CPU: the [rows, out] update is materialised, scaled and added in separate passes
(and again in backward), and those passes are memory-bound. Here the update is accumulated into the product in
place (`addmm_`, the scaling applied to the rank-r intermediate), in backward the input gradient of the update
is accumulated into that of the frozen product the same way, and the thin rank-r GEMMs go through oneDNN in the
orientation it runs fastest (MKL's sgemm takes 0.65-0.8 ms for [1016, 1408] x [1408, 4] or its transpose on the
2-core CI machine, oneDNN 0.1-0.17 ms). Same math in another order: results equal to ~1e-7 relative, not bitwise.

Used by `LoRALinear` for the model's own `Linear` layers when the frozen product goes through oneDNN (CPU, fp32,
see model/linear.py); everything else keeps the op-by-op form.
"""

from __future__ import annotations

import torch

from ..model.linear import matmul_nn


def _nt(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ bias) through oneDNN; the operands may be transposed views."""
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


class _FrozenLoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, xd, w, bias, a, b, scaling: float):
        n_out = w.shape[0]
        y = _nt(x, w, bias)
        xd2 = xd.reshape(-1, xd.shape[-1])
        hs = _nt(xd2, a) * scaling  # [rows, r]: the scaled low-rank intermediate
        y.view(-1, n_out).addmm_(hs, b.t())
        ctx.save_for_backward(xd2, hs, w, a, b)
        ctx.scaling, ctx.x_shape, ctx.same = scaling, x.shape, xd is x
        return y

    @staticmethod
    def backward(ctx, grad):
        xd2, hs, w, a, b = ctx.saved_tensors
        g = grad.reshape(-1, w.shape[0]).contiguous()
        need_x, need_xd, need_a, need_b = (ctx.needs_input_grad[i] for i in (0, 1, 4, 5))
        gh = _nt(g, b.t()) * ctx.scaling if (need_x or need_xd or need_a) else None  # d loss / d (xd A^T)
        grad_a = _nt(gh.t(), xd2.t()) if need_a else None  # gh^T xd
        grad_b = _nt(hs.t().contiguous(), g.t()).t().contiguous() if need_b else None  # (hs^T g)^T = g^T hs
        grad_x = grad_xd = None
        if ctx.same:  # no dropout: one input, both gradients accumulate into one GEMM's output
            if need_x or need_xd:
                grad_x = matmul_nn(g, w).addmm_(gh, a).view(ctx.x_shape)
        else:
            grad_x = matmul_nn(g, w).view(ctx.x_shape) if need_x else None
            grad_xd = (gh @ a).view(ctx.x_shape) if need_xd else None
        return grad_x, grad_xd, None, None, grad_a, grad_b, None


def frozen_lora_linear(x: torch.Tensor, xd: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                       a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """x W^T + bias + scaling (xd A^T) B^T; `xd` is x after LoRA dropout (x itself without). Callers check
    `use_onednn(x, w)` and that A/B have x's dtype."""
    return _FrozenLoRALinear.apply(x, xd, w, bias, a, b, scaling)

