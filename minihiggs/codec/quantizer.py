"""Residual vector quantizer (8 layers x 1024 codewords of dim 64, projected from/to 1024 channels).

Names mirror the checkpoint: `quantizer.vq.layers.{i}.{project_in,project_out,_codebook.embed}`.
Only inference is implemented: the EMA statistics (cluster_size, embed_avg, inited) are training state
and are dropped by the loader.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Codebook(nn.Module):
    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("embed", torch.empty(size, dim))

    def scores(self, z: torch.Tensor) -> torch.Tensor:
        """-(squared distance) of rows z [N, dim] to every codeword -> [N, size].

        Spelled exactly as the reference (|z|^2 - 2 z.E^T + |E|^2, negated): a different but equivalent
        formula rounds differently and can flip near-tied codes.
        """
        e = self.embed.t()
        return -(z.pow(2).sum(1, keepdim=True) - 2 * z @ e + e.pow(2).sum(0, keepdim=True))


class VQLayer(nn.Module):
    def __init__(self, dim: int, codebook_dim: int, size: int):
        super().__init__()
        self.project_in = nn.Linear(dim, codebook_dim)
        self.project_out = nn.Linear(codebook_dim, dim)
        self._codebook = Codebook(size, codebook_dim)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, dim] -> codes [B, T]; the first of several equal best scores wins (argmax semantics)."""
        z = self.project_in(x)
        return self._codebook.scores(z.reshape(-1, z.shape[-1])).max(dim=-1).indices.view(z.shape[:-1])

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, T] -> [B, T, dim]."""
        return self.project_out(F.embedding(codes, self._codebook.embed))


class ResidualVQ(nn.Module):
    def __init__(self, n_q: int, dim: int, codebook_dim: int, size: int):
        super().__init__()
        self.layers = nn.ModuleList(VQLayer(dim, codebook_dim, size) for _ in range(n_q))


class Quantizer(nn.Module):
    def __init__(self, n_q: int = 8, dim: int = 1024, codebook_dim: int = 64, size: int = 1024):
        super().__init__()
        self.vq = ResidualVQ(n_q, dim, codebook_dim, size)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, dim] -> codes [B, n_q, T]: each layer quantizes what the previous ones left over."""
        residual = x
        codes = []
        for layer in self.vq.layers:
            c = layer.encode(residual)
            residual = residual - layer.decode(c)
            codes.append(c)
        return torch.stack(codes, dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, n_q, T] -> sum of the layers' projected codewords [B, T, dim]."""
        out = self.vq.layers[0].decode(codes[:, 0])
        for i in range(1, codes.shape[1]):
            out = out + self.vq.layers[i].decode(codes[:, i])
        return out
