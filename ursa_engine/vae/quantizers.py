"""The two code tables of URSA's tokenizers: FSQ (Cosmos video) and IBQ (image VQ).

FSQ (implicit, DESIGN §2.1): code ``i`` has mixed-radix digits ``q_j`` (first level fastest) and
coordinates ``(q_j − L_j//2) / (L_j//2)``. Quantizing bounds each channel with the authors'
``tanh`` map (``eps = 1e-3``; even levels shifted by half a step), rounds half to even, and
reads the digits back; the bound runs in fp32 whatever the model dtype (as the authors' type
promotion does).

IBQ (explicit table ``E`` of shape (K, m)): a latent vector takes the code with the **largest
inner product** ``z · E_k`` (not the nearest one), computed in the model dtype in row chunks so
the (tokens, K) score matrix never exists in full (4,096 × 131,072 at 1024²).
"""

from __future__ import annotations

import math

import torch
from torch import nn

COSMOS_LEVELS = (8, 8, 8, 5, 5, 5)  # the authors' FSQuantizer() default: K = 64,000
_IBQ_ROW_CHUNK = 1024  # rows of the (chunk, K) score block (K = 131,072: 512 MiB in fp32)


class FSQuantizer(nn.Module):
    """Finite scalar quantization with ``levels`` (no parameters)."""

    def __init__(self, levels=COSMOS_LEVELS):
        super().__init__()
        self.levels = tuple(int(v) for v in levels)
        if not self.levels or min(self.levels) < 2:
            raise ValueError(f"levels: expected integers >= 2, got {levels}")
        self._basis = tuple(math.prod(self.levels[:j]) for j in range(len(self.levels)))

    def _tables(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(levels, levels // 2, mixed-radix basis) as int64 tensors on ``device`` (no buffers: a
        tokenizer built on the meta device and loaded with ``assign=True`` needs none restored)."""
        lv = torch.tensor(self.levels, dtype=torch.int64, device=device)
        return lv, lv // 2, torch.tensor(self._basis, dtype=torch.int64, device=device)

    @property
    def size(self) -> int:
        return math.prod(self.levels)

    @property
    def dim(self) -> int:
        return len(self.levels)

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """(B, m, *S) latents -> (B, *S) int64 codes."""
        levels, half, basis = self._tables(z.device)
        z = z.movedim(1, -1).float()
        half_l = (levels.float() - 1) * (1 + 1e-3) / 2
        offset = (levels % 2 == 0).float() * 0.5
        shift = torch.atanh(offset / half_l)
        digits = (torch.tanh(z + shift) * half_l - offset).round() + half
        return (digits.long() * basis).sum(-1)

    def dequantize(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, *S) codes -> (B, m, *S) coordinates in ``dtype``."""
        levels, half, basis = self._tables(ids.device)
        q = torch.div(ids.long().unsqueeze(-1), basis, rounding_mode="floor") % levels - half
        return (q.float() / half.float()).to(dtype).movedim(-1, 1)


class VQuantizer(nn.Module):
    """A learned table ``embedding.weight`` (K, m); codes by the largest inner product."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(size, dim)

    @property
    def size(self) -> int:
        return self.embedding.num_embeddings

    @property
    def dim(self) -> int:
        return self.embedding.embedding_dim

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """(B, m, *S) latents -> (B, *S) int64 codes: ``argmax_k z · E_k`` (first maximum on ties)."""
        flat = z.movedim(1, -1)
        lead = flat.shape[:-1]
        flat = flat.reshape(-1, flat.shape[-1]).to(self.embedding.weight.dtype)
        out = torch.empty(flat.shape[0], dtype=torch.long, device=z.device)
        for s in range(0, flat.shape[0], _IBQ_ROW_CHUNK):
            out[s : s + _IBQ_ROW_CHUNK] = (flat[s : s + _IBQ_ROW_CHUNK] @ self.embedding.weight.T).argmax(-1)
        return out.view(lead)

    def dequantize(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.embedding(ids.long()).to(dtype).movedim(-1, 1)
