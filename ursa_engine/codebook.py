"""Codebooks and their normalized squared-Euclidean distance (DESIGN §2.1)."""

from __future__ import annotations

import math
import os
from functools import cached_property

import torch

NORM_EPS = 1e-5


def fsq_table(levels: tuple[int, ...]) -> torch.Tensor:
    """The implicit FSQ code table, shape (prod(levels), len(levels)), float32.

    Index ``i`` has mixed-radix digits (first level fastest); digit ``q`` of level ``L`` maps to
    ``(q - L//2) / (L//2)``.
    """
    idx = torch.arange(math.prod(levels), dtype=torch.int64)
    cols = []
    for level in levels:
        half = level // 2
        cols.append(((idx % level) - half).to(torch.float32) / half)
        idx = idx // level
    return torch.stack(cols, dim=-1)


def _fsq_levels_of(emb: torch.Tensor) -> tuple[int, ...] | None:
    """The FSQ levels whose implicit table equals ``emb`` exactly, else None.

    Checkpoints ship their FSQ codebook as an explicit table; recognising it lets kernels compute
    codes from the index instead of reading the table (same values, so the same law).
    """
    K, m = emb.shape
    if m > 16:
        return None
    levels = []
    for col in emb.unbind(-1):
        n = torch.unique(col).numel()
        if n < 2 or n > 64:
            return None
        levels.append(n)
    if math.prod(levels) != K:
        return None
    levels = tuple(levels)
    return levels if torch.equal(fsq_table(levels), emb) else None


def normalize(emb: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """``e / max(||e||, eps)`` row-wise."""
    return emb / emb.norm(dim=-1, keepdim=True).clamp_min(eps)


class Codebook:
    """A table of ``K`` code embeddings of dimension ``m`` with the metric of DESIGN §2.1.

    Parameters
    ----------
    emb : Tensor (K, m)
        Code embeddings (any float dtype; kept in float32).
    levels : tuple of int, optional
        Set by :meth:`fsq`: kernels may then compute codes from the index instead of the table.
    """

    def __init__(self, emb: torch.Tensor, *, levels: tuple[int, ...] | None = None):
        if not isinstance(emb, torch.Tensor):
            raise TypeError(f"emb: expected a (K, m) tensor, got {type(emb).__name__}")
        if emb.dim() != 2 or emb.shape[0] < 2 or emb.shape[1] < 1:
            raise ValueError(f"emb: expected shape (K, m) with K >= 2, got {tuple(emb.shape)}")
        if not emb.is_floating_point():
            raise TypeError(f"emb: expected a float tensor, got {emb.dtype}")
        if not torch.isfinite(emb).all():
            raise ValueError("emb: contains NaN or infinite values")
        self.emb = emb.detach().to(torch.float32).contiguous()
        self.levels = tuple(levels) if levels is not None else _fsq_levels_of(self.emb)

    @classmethod
    def fsq(cls, levels=(8, 8, 8, 5, 5, 5)) -> "Codebook":
        """The Cosmos-style FSQ codebook (default K = 64,000, m = 6)."""
        levels = tuple(int(v) for v in levels)
        if not levels or any(v < 2 for v in levels):
            raise ValueError(f"levels: every level must be >= 2, got {levels}")
        return cls(fsq_table(levels), levels=levels)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Codebook":
        """Load ``"path.emb"`` from a scheduler folder or a ``.pth`` / ``.safetensors`` file.

        ``.pth`` files are read with ``weights_only=True``: nothing is unpickled but tensors.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            for name in ("scheduler_model.pth", "scheduler_model.safetensors"):
                if os.path.isfile(os.path.join(path, name)):
                    path = os.path.join(path, name)
                    break
            else:
                raise FileNotFoundError(f"path: {path!r} holds neither scheduler_model.pth nor "
                                        "scheduler_model.safetensors")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"path: no such codebook file {path!r}")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            try:
                state = load_file(path)
            except Exception as err:  # noqa: BLE001 - re-raised with the argument named
                raise ValueError(f"path: {path!r} is not a readable safetensors file ({err})") from err
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - re-raised with the argument named
                raise ValueError(f"path: {path!r} is not a tensors-only torch file ({err})") from err
        if not isinstance(state, dict) or "path.emb" not in state:
            keys = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
            raise KeyError(f"path: {path!r} has no 'path.emb' entry (found {keys})")
        emb = state["path.emb"]
        if not isinstance(emb, torch.Tensor) or emb.dim() != 2:
            raise ValueError(f"path: {path!r} entry 'path.emb' must be a (K, m) tensor, got "
                             f"{tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__}")
        return cls(emb)

    @property
    def size(self) -> int:
        """K, the number of codes."""
        return self.emb.shape[0]

    @property
    def dim(self) -> int:
        """m, the embedding dimension."""
        return self.emb.shape[1]

    @cached_property
    def normalized(self) -> torch.Tensor:
        """ê, shape (K, m), float32."""
        return normalize(self.emb)

    def normalized_on(self, device) -> torch.Tensor:
        """ê on ``device`` (cached per device)."""
        cache = self.__dict__.setdefault("_on_device", {})
        key = str(torch.device(device))
        if key not in cache:
            cache[key] = self.normalized.to(device)
        return cache[key]

    def distance(self, x: torch.Tensor, y: torch.Tensor | None = None, *, power: int = 2) -> torch.Tensor:
        """Dense ``d(x, y)`` (DESIGN §2.1), float64.

        x : LongTensor S; y : LongTensor broadcastable to S, or None for all codes.
        Returns S (y given) or S + (K,) (y None). ``d(x, x) = 0`` exactly, ``d >= 0``.
        """
        e = self.normalized_on(x.device).to(torch.float64)
        ex = e[x]
        if y is None:
            d = (ex * ex).sum(-1, keepdim=True) + (e * e).sum(-1) - 2 * ex @ e.T
            same = x.unsqueeze(-1) == torch.arange(self.size, device=x.device)
        else:
            ey = e[y]
            d = (ex * ex).sum(-1) + (ey * ey).sum(-1) - 2 * (ex * ey).sum(-1)
            same = x == y
        d = d.clamp_min(0).masked_fill(same, 0.0)
        return d * d if power == 4 else d

    def __repr__(self) -> str:
        kind = f"fsq{self.levels}" if self.levels else "table"
        return f"Codebook({kind}, K={self.size}, m={self.dim})"
