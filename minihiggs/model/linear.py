"""Linear layers with frozen weights, and their CPU fp32 GEMMs through oneDNN.

On CPU, fp32 `F.linear` / `@` go to MKL's sgemm, which runs its AVX2 kernels on AMD processors; oneDNN's JIT (the
`mkldnn._linear_pointwise` op behind inductor's CPU linear fusions) uses AVX-512 where the CPU has it. Measured on
the 2-core EPYC CI machine, [1016, 512] x [512, 1408] fp32: 2.5-3x the GEMM throughput. Same fp32 arithmetic, another
summation order (differences around 1e-7 relative).

Used for every *frozen* weight in eager CPU fp32 runs — the forward product and the input gradient of backward (a
frozen weight needs no weight gradient), in the decoder projections (`Linear`, and LoRA's base product) and the
fused loss heads. Everything else — CUDA, bf16, trainable weights, DTensors, code being compiled (inductor picks
its own GEMMs) — takes the plain `F.linear`. The op is probed once; if it is missing or disagrees, MKL it is.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..wrappers import is_dtensor

_ONEDNN_OK: bool | None = None  # probed on first use


def _onednn_available() -> bool:
    global _ONEDNN_OK
    if _ONEDNN_OK is None:
        try:
            op = torch.ops.mkldnn._linear_pointwise
            g = torch.Generator().manual_seed(0)
            x, w = torch.randn(5, 24, generator=g), torch.randn(7, 24, generator=g)
            ok = torch.allclose(op(x, w, None, "none", [], ""), x @ w.t(), rtol=1e-5, atol=1e-5)
            ok = ok and torch.allclose(op(x @ w.t(), w.t(), None, "none", [], ""), (x @ w.t()) @ w, rtol=1e-5,
                                       atol=1e-4)
            _ONEDNN_OK = bool(ok) and torch.backends.mkldnn.is_available()
        except (AttributeError, RuntimeError, NotImplementedError):
            _ONEDNN_OK = False
    return _ONEDNN_OK


def use_onednn(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether x @ w.T with this (frozen) weight takes the oneDNN path (not for zero rows: a DualFFN branch a batch
    does not use, whose backward would be a GEMM with an empty reduction, which oneDNN refuses)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32 and x.numel() > 0
            and not w.requires_grad and not is_dtensor(w) and not torch.compiler.is_compiling()
            and _onednn_available())


def matmul_nt(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T (w [out, in]), no autograd: for code that computes its own gradients (the fused loss heads)."""
    if use_onednn(x, w):
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    return x @ w.t()


def matmul_nn(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """g @ w (w [out, in]): the input gradient of x @ w.T, no autograd."""
    if use_onednn(g, w):
        return torch.ops.mkldnn._linear_pointwise(g, w.t(), None, "none", [], "")
    return g @ w


class _FrozenLinear(torch.autograd.Function):
    """y = x @ w.T + b with w, b frozen: backward returns only the input gradient, g @ w."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(w)
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (w,) = ctx.saved_tensors
        return matmul_nn(grad.contiguous(), w) if ctx.needs_input_grad[0] else None, None, None


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through oneDNN for frozen fp32 weights on CPU (see the module docstring)."""
    if use_onednn(x, w) and (b is None or not b.requires_grad):
        return _FrozenLinear.apply(x, w, b)
    return F.linear(x, w, b)


class Linear(nn.Linear):
    """`nn.Linear` whose product goes through `linear` (same parameters, same state-dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def project(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """mod(x) for the projections of the decoder layers. A plain `Linear` is computed directly, without the module
    call: a decode step is a few hundred tiny ops per token and the call's host overhead was ~15% of a CPU step of the
    `small` shape (nothing hooks these modules). Any other module (a LoRA wrapper) is called as usual."""
    return linear(x, mod.weight, mod.bias) if type(mod) is Linear else mod(x)
