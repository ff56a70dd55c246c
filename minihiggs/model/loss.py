"""The fused dual (text + audio) loss head.

Loss definition (matches the reference numbers):
  text  : logits at merged position t are scored against the text label at t+1 (ignore -100), mean over targets.
  audio : audio-out row j is scored against label column j+1 of the audio-out stream, per codebook (ignore -100);
          audio_loss = mean over codebooks of the per-codebook means.
  total = text_loss + audio_loss.

The head returns *sums and target counts* (`LossSums`), never means: gradient accumulation and data
parallelism then divide by global counts, so k micro-batches (or N ranks) give exactly the loss and gradients
of one batch of their union.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..constants import IGNORE_INDEX as IGNORE
from .linear import matmul_nn, matmul_nt


@dataclass
class LossSums:
    text_sum: torch.Tensor  # [] fp32: sum of text cross-entropies
    text_count: torch.Tensor  # [] int64: number of text targets
    audio_sum: torch.Tensor  # [num_codebooks] fp32: per-codebook sums of audio cross-entropies
    audio_count: torch.Tensor  # [num_codebooks] int64: per-codebook target counts
    # [num_codebooks] int64: targets whose logits' argmax is the target (teacher-forced top-1 hits); None if unknown
    audio_correct: torch.Tensor | None = None

    def normalized(self, text_denom: torch.Tensor | float | None = None,
                   audio_denom: torch.Tensor | None = None) -> torch.Tensor:
        """text_sum/text_denom + mean_k audio_sum_k/audio_denom_k, the differentiable training loss.

        Denominators default to this batch's own counts. Pass global counts (all micro-batches of an optimizer
        step, all ranks) to make accumulation exact. A denominator of 0 contributes 0, never NaN.
        """
        td = self.text_count if text_denom is None else text_denom
        ad = self.audio_count if audio_denom is None else audio_denom
        td = torch.as_tensor(td, device=self.text_sum.device, dtype=torch.float32)
        ad = torch.as_tensor(ad, device=self.audio_sum.device, dtype=torch.float32)
        text = self.text_sum / td.clamp(min=1)
        audio = (self.audio_sum / ad.clamp(min=1)).mean()
        return text + audio

    def detach(self) -> "LossSums":
        return LossSums(self.text_sum.detach(), self.text_count.detach(), self.audio_sum.detach(),
                        self.audio_count.detach(), None if self.audio_correct is None else self.audio_correct.detach())

    def __add__(self, other: "LossSums") -> "LossSums":
        correct = None if self.audio_correct is None or other.audio_correct is None else \
            self.audio_correct + other.audio_correct
        return LossSums(self.text_sum + other.text_sum, self.text_count + other.text_count,
                        self.audio_sum + other.audio_sum, self.audio_count + other.audio_count, correct)

    def as_vector(self) -> torch.Tensor:
        """Flatten to one fp64 vector (for one all_reduce): [text_sum, text_count, audio_sum (K), audio_count (K)]
        then audio_correct (K) when known, so the first 2 + 2K entries never move. Inverse: `from_vector`."""
        parts = [self.text_sum.double().reshape(1), self.text_count.double().reshape(1), self.audio_sum.double(),
                 self.audio_count.double()]
        if self.audio_correct is not None:
            parts.append(self.audio_correct.double())
        return torch.cat(parts)

    @staticmethod
    def from_vector(v: torch.Tensor, num_codebooks: int | None = None) -> "LossSums":
        """Inverse of `as_vector`. Without `num_codebooks` the vector is read as 2 + 2K (no hit counts)."""
        k = (v.numel() - 2) // 2 if num_codebooks is None else num_codebooks
        correct = v[2 + 2 * k:2 + 3 * k].round().long() if v.numel() >= 2 + 3 * k else None
        return LossSums(v[0].float(), v[1].round().long(), v[2:2 + k].float(), v[2 + k:2 + 2 * k].round().long(),
                        correct)

    def report(self) -> dict:
        """Means as Python floats: total, text_loss, audio_loss, audio_loss_per_codebook, and the counts."""
        tc = int(self.text_count)
        text = float(self.text_sum) / tc if tc else 0.0
        per_cb = [float(s) / int(c) if int(c) else 0.0 for s, c in zip(self.audio_sum, self.audio_count)]
        audio = sum(per_cb) / len(per_cb) if per_cb else 0.0
        out = {"total": text + audio, "text_loss": text, "audio_loss": audio,
               "audio_loss_per_codebook": per_cb, "text_targets": tc,
               "audio_targets": [int(c) for c in self.audio_count]}
        if self.audio_correct is not None:
            acc = [int(h) / int(c) if int(c) else 0.0 for h, c in zip(self.audio_correct, self.audio_count)]
            out["audio_acc_per_codebook"] = acc
            out["audio_acc"] = sum(acc) / len(acc) if acc else 0.0
        return out


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, y_i) without ever materialising the [rows, vocab] logits.

    Rows are processed `chunk` at a time with fp32 log-sum-exp; the gradients w.r.t. h (and W when it is
    trainable) are computed in the same pass and kept, so memory is O(chunk * vocab) instead of
    O(rows * vocab) — for the 128256-wide Llama-3 head that is the difference between MBs and GBs.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(h.dtype, torch.float32)  # fp32 at least (fp64 inputs stay fp64)
        total = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=acc, device=w.device) if need_w else None
        for s in range(0, h.shape[0], chunk):
            hc, tc = h[s:s + chunk], targets[s:s + chunk]
            logits = matmul_nt(hc, w).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
            if need_h or need_w:
                g = (logits - lse[:, None]).exp_()  # softmax
                g[torch.arange(g.shape[0], device=g.device), tc] -= 1.0  # d CE / d logits
                g = g.to(h.dtype)
                if need_h:
                    grad_h[s:s + chunk] = matmul_nn(g, w)
                if need_w:
                    grad_w += (g.t() @ hc).to(grad_w.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.w_dtype) if grad_w is not None else None
        return gh, gw, None, None


def text_ce_sum(rows: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused text head + cross-entropy over the rows that have a text target. Returns (sum, count).

    A Python loop over data-dependent row counts: it always runs eagerly, also inside code being compiled (there
    through `torch.compiler.disable`, made on demand: decorating at import would load torch._dynamo, ~70 MB, into
    every eager run; code can only be compiled once that module is loaded)."""
    if "torch._dynamo" in sys.modules:
        return _eager_text_ce_sum()(rows, weight, targets, chunk)
    return _text_ce_sum(rows, weight, targets, chunk)


_EAGER = None


def _eager_text_ce_sum():
    global _EAGER
    if _EAGER is None:
        _EAGER = torch.compiler.disable(_text_ce_sum)
    return _EAGER


def _text_ce_sum(rows: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    count = torch.full((), targets.numel(), dtype=torch.long, device=rows.device)  # a fill, not a host copy
    if targets.numel() == 0:
        # keep the graph connected (DDP/FSDP expect every forward to touch the same parameters)
        return (rows.sum() * 0.0).float() + (weight[:1].sum() * 0.0).float(), count
    return _ChunkedLinearCrossEntropy.apply(rows, weight, targets, chunk), count


def audio_ce_sums(logits: torch.Tensor, targets: torch.Tensor, num_codebooks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-codebook CE sums and counts. logits [Q, K, C] fp32, targets [Q, K] (-100 = no target)."""
    if targets.numel() == 0:
        zero = logits.sum() * 0.0
        return zero.expand(num_codebooks).clone(), torch.zeros(num_codebooks, dtype=torch.long, device=logits.device)
    ce = F.cross_entropy(logits.float().permute(0, 2, 1), targets, ignore_index=IGNORE, reduction="none")  # [Q, K]
    return ce.sum(0), (targets != IGNORE).sum(0)


@torch.no_grad()
def audio_top1_hits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-codebook count of targets whose logits' argmax equals them: teacher-forced top-1 accuracy numerators
    (denominators: the target counts). logits [Q, K, C], targets [Q, K] (-100 = no target) -> [K] int64."""
    if targets.numel() == 0:
        return torch.zeros(logits.shape[1] if logits.dim() == 3 else 0, dtype=torch.long, device=logits.device)
    return ((logits.argmax(-1) == targets) & (targets != IGNORE)).sum(0)
