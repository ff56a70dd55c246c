"""Frozen base weights in 4 or 8 bits (`--quantize nf4|int8`), dequantized per matmul in the compute dtype.

Formats (weight W [out, in], any float dtype; bytes per weight in brackets):
  * ``nf4`` [0.516]: QLoRA's 4-bit NormalFloat. W is flattened and cut into blocks of 64; each block keeps its
    absmax `m_b` and one 4-bit code per weight, the nearest of the 16 NF4 levels (the normal distribution's
    quantiles, scaled to [-1, 1]) to w / m_b. Double quantization: the absmaxes, minus their mean, are stored in
    int8 with one fp32 scale per 256 of them. Per weight: |w - w^| <= g * (m_b + d_b) + d_b, where g = 0.1519
    is the largest half-gap between neighbouring levels and d_b <= scale / 2 the error of the stored absmax.
  * ``int8`` [1 + 4/in]: weight-only int8, one fp32 absmax scale per output row (s_o = max|W_o| / 127):
    |w - w^| <= s_o / 2.

Why not torchao's `NF4Tensor` (what torchtune's QLoRA uses): its import path moved between releases (torchao 0.18
has it under `quantization.quantize_.workflows.nf4`), each torchao release supports a narrow torch range while
minihiggs supports torch>=2.5, it is a tensor subclass standing in for the Parameter (so checkpoint, LoRA, FSDP2
and compile code would each meet it), and it has no int8 sibling. Here the codes are plain buffers of a small
module, and the matmul is an autograd Function that dequantizes in forward and again in backward, so no
dequantized weight is kept between the two (autograd's own `F.linear` would save one per layer: the whole model
in the compute dtype again).

What is quantized: the decoder layers' linears (attention q/k/v/o, the text MLP and the audio DualFFN MLP) --
`is_quantized_key`. Embeddings, the two heads and the Whisper tower stay in the compute dtype: embeddings are
row lookups, the fused loss multiplies the head weights directly, and together they are ~0.8 B of 5.8 B weights.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from .linear import Linear, matmul_nn, matmul_nt

FORMATS = ("nf4", "int8")
NF4_BLOCK = 64  # weights per absmax (QLoRA)
SCALE_BLOCK = 256  # absmaxes per fp32 scale of the double quantization (QLoRA)
# The 16 NF4 levels as published with QLoRA (bitsandbytes' table); tests derive them from normal quantiles.
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
NF4_HALF_GAP = max(b - a for a, b in zip(NF4_LEVELS, NF4_LEVELS[1:])) / 2

_TARGET = re.compile(r"^layers\.\d+\.(self_attn|mlp|audio_mlp|audio_attn)\.[a-z_]+_proj\.weight$")


def check_format(fmt: str | None) -> str | None:
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"quantize must be one of {', '.join(FORMATS)} (or none), got {fmt!r}")
    return fmt


def is_quantized_key(key: str) -> bool:
    """Whether a (minihiggs-named) checkpoint tensor is stored quantized: a decoder layer's projection weight."""
    return _TARGET.match(key) is not None


# ------------------------------------------------------------------------------------------------ the formats
def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, -x.numel() % multiple))


def quantize_nf4(w: torch.Tensor) -> dict[str, torch.Tensor]:
    blocks = _pad_to(w.detach().float().reshape(-1), NF4_BLOCK).view(-1, NF4_BLOCK)
    absmax = blocks.abs().amax(dim=1)
    mean = absmax.mean()
    centred = _pad_to(absmax - mean, SCALE_BLOCK).view(-1, SCALE_BLOCK)
    scale = centred.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
    absmax_q = (centred / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    stored = {"absmax_q": absmax_q.view(-1)[:absmax.numel()], "scale": scale, "mean": mean.reshape(1)}
    # Codes against the absmax as it will be read back (not the exact one): the nearest level of what is stored.
    m = _absmax(stored)
    m = torch.where(m == 0, torch.ones_like(m), m)
    levels = torch.tensor(NF4_LEVELS, device=w.device)
    codes = torch.bucketize(blocks / m[:, None], (levels[1:] + levels[:-1]) / 2).to(torch.uint8).view(-1)
    stored["codes"] = (codes[0::2] << 4) | codes[1::2]  # two per byte (the padded length is even)
    return stored


def _absmax(t: dict[str, torch.Tensor]) -> torch.Tensor:
    q = t["absmax_q"]
    scales = t["scale"].repeat_interleave(SCALE_BLOCK)[:q.numel()]
    return q.float() * scales + t["mean"]


# Dequantization works through the weight in pieces of this many blocks of 64, each into its slice of the output:
# the fp32 intermediates (int32 indices, levels, scaled levels) then take a few MB instead of 3-4x the weight.
# Measured, one LoRA step of two 3B layers at 256 tokens: transient memory 0.525 -> 0.217 GiB (nf4),
# 0.266 -> 0.200 GiB (int8).
DEQUANT_BLOCKS = 16384


def dequantize_nf4(t: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    packed = t["codes"].view(-1, NF4_BLOCK // 2)
    absmax = _absmax(t)
    levels = torch.tensor(NF4_LEVELS, device=packed.device)
    out = torch.empty(packed.shape[0], NF4_BLOCK, dtype=dtype, device=packed.device)
    for i in range(0, packed.shape[0], DEQUANT_BLOCKS):
        p = packed[i:i + DEQUANT_BLOCKS]
        codes = torch.stack([p >> 4, p & 15], dim=2).view(p.shape[0], NF4_BLOCK).int()
        out[i:i + DEQUANT_BLOCKS] = levels[codes] * absmax[i:i + DEQUANT_BLOCKS, None]
    return out.view(-1)[:shape[0] * shape[1]].view(shape)


def quantize_int8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
    return {"codes": (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), "scale": scale}


def dequantize_int8(t: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    codes, scale = t["codes"], t["scale"]
    out = torch.empty(shape, dtype=dtype, device=codes.device)
    rows = max(1, DEQUANT_BLOCKS * NF4_BLOCK // shape[1])
    for i in range(0, shape[0], rows):
        out[i:i + rows] = codes[i:i + rows].float() * scale[i:i + rows, None]
    return out


_QUANTIZE = {"nf4": quantize_nf4, "int8": quantize_int8}
_DEQUANTIZE = {"nf4": dequantize_nf4, "int8": dequantize_int8}


def roundtrip(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """W as the quantized model computes with it (fp32): what `export` merges an adapter of a quantized run into."""
    return _DEQUANTIZE[fmt](_QUANTIZE[fmt](w), tuple(w.shape), torch.float32)


# ------------------------------------------------------------------------------------------------ the modules
class QuantizedWeight(nn.Module):
    """A frozen [out, in] weight in `fmt`, as buffers (codes and scales); `dequantize(dtype)` gives it back.
    `dtype` is the compute dtype the model was loaded in (what a merge gives the weight back in). Built by
    `QuantizedWeight.of(w, fmt, dtype)`, or from stored tensors."""

    def __init__(self, fmt: str, shape: tuple[int, int], tensors: dict[str, torch.Tensor],
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.fmt = check_format(fmt)
        self.dtype = dtype
        self.shape = tuple(shape)
        self.names = list(tensors)
        for name, t in tensors.items():
            self.register_buffer(name, t)

    @classmethod
    def of(cls, w: torch.Tensor, fmt: str, dtype: torch.dtype = torch.float32) -> "QuantizedWeight":
        return cls(fmt, tuple(w.shape), _QUANTIZE[check_format(fmt)](w), dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self.names}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return _DEQUANTIZE[self.fmt](self.tensors(), self.shape, dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def extra_repr(self) -> str:
        return f"{self.fmt}, shape={self.shape}"


class _QuantLinearFn(torch.autograd.Function):
    """y = x @ W^.T (+ b) with W^ dequantized here and again in backward (only the input gradient: W is frozen)."""

    @staticmethod
    def forward(ctx, x, bias, qw: QuantizedWeight):
        ctx.qw = qw
        y = matmul_nt(x, qw.dequantize(x.dtype))
        return y if bias is None else y + bias.to(y.dtype)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        w = ctx.qw.dequantize(grad.dtype)
        if grad.device.type == "cpu" and grad.dtype == torch.bfloat16:
            # CPU bf16 `g @ W` takes a slow kernel (measured [128, 8192] x [8192, 3072]: 26 s vs 0.65 s for the
            # same product as `g @ (W.T).T`, the forward's layout)
            return matmul_nt(grad, w.t().contiguous()), None, None
        return matmul_nn(grad.contiguous(), w), None, None


def quant_linear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    return _QuantLinearFn.apply(x, bias, qw)


class QuantLinear(Linear):
    """A model `Linear` whose frozen weight is a `QuantizedWeight` (`qweight`); `weight` is None. LoRA wraps it
    like any linear (lora/apply.py)."""

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None):
        nn.Module.__init__(self)  # not nn.Linear.__init__: no full-precision weight is ever allocated
        self.out_features, self.in_features = qweight.shape
        self.register_parameter("weight", None)
        self.qweight = qweight
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self.qweight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.qweight.fmt}"


def quantize_into(model: nn.Module, key: str, w: torch.Tensor, fmt: str, dtype: torch.dtype) -> None:
    """Replace the linear owning checkpoint tensor `key` (`<path>.weight`) by a `QuantLinear` of `w`."""
    install(model, key, QuantizedWeight.of(w, fmt, dtype))


def install(model: nn.Module, key: str, qw: QuantizedWeight) -> None:
    """Replace the linear owning checkpoint tensor `key` (`<path>.weight`) by a `QuantLinear` holding `qw`."""
    path = key.rpartition(".")[0]
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    old = getattr(parent, name)
    if old.bias is not None and old.bias.device.type == "meta":
        raise ValueError(f"{path}: quantized linears with a bias are not supported")
    setattr(parent, name, QuantLinear(qw, old.bias))


def quantized_bytes(model: nn.Module) -> int:
    return sum(m.nbytes() for m in model.modules() if isinstance(m, QuantizedWeight))
