"""A 2×2 patch tokenizer for the digit frames: k-means codes, a pixel decoder and the metric table.

Encoding maps each non-overlapping 2×2 patch of a frame (values in [0, 1]) to the nearest of K
centroids in pixel space; decoding pastes the centroids back. The codebook of the metric path
(DESIGN §2.1: embeddings are L2-normalized before the distance) is ``(centroid − 0.5, 0.5)``: the
centred pixels give opposite directions to ink and background, and the constant last coordinate
keeps every vector away from zero (a mid-grey patch is not the zero vector), so the normalized
distance grows with the pixel difference and its sign.

Files: ``patch_tokenizer.safetensors`` with ``centroids`` (K, p·p) float32 and ``config.json``
with the patch size; the metric table is derived from the centroids.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

EMBED_OFFSET = 0.5
WEIGHTS = "patch_tokenizer.safetensors"
CONFIG = "config.json"


def patches(frames: torch.Tensor, p: int) -> torch.Tensor:
    """(..., H, W) -> (..., H/p, W/p, p·p) non-overlapping patches, row-major inside a patch."""
    *lead, H, W = frames.shape
    x = frames.reshape(*lead, H // p, p, W // p, p)
    return x.movedim(-3, -2).reshape(*lead, H // p, W // p, p * p)


def unpatch(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of :func:`patches`: (..., h, w, p·p) -> (..., h·p, w·p)."""
    *lead, h, w, _ = x.shape
    return x.reshape(*lead, h, w, p, p).movedim(-2, -3).reshape(*lead, h * p, w * p)


class PatchTokenizer:
    """k-means over ``p × p`` patches (DESIGN §2.1 codebook for the demo model).

    Parameters
    ----------
    centroids : (K, p·p) float tensor, pixel values of each code
    patch : p
    """

    def __init__(self, centroids: torch.Tensor, patch: int = 2):
        centroids = torch.as_tensor(centroids, dtype=torch.float32)
        if centroids.dim() != 2 or centroids.shape[1] != patch * patch:
            raise ValueError(f"centroids: expected (K, {patch * patch}), got {tuple(centroids.shape)}")
        self.centroids, self.patch = centroids.contiguous(), patch

    @property
    def size(self) -> int:
        return self.centroids.shape[0]

    @classmethod
    def fit(cls, frames: np.ndarray, K: int = 256, *, patch: int = 2, seed: int = 0) -> PatchTokenizer:
        """k-means (scikit-learn) over the patches of ``frames`` (..., H, W) in [0, 1].

        The empty patch is always code 0 (exactly zero pixels): backgrounds stay clean.
        """
        from sklearn.cluster import KMeans

        data = patches(torch.as_tensor(frames, dtype=torch.float32), patch).reshape(-1, patch * patch).numpy()
        blank = np.all(data == 0, axis=1)
        ink = np.unique(np.round(data[~blank], 4), axis=0)  # distinct patches: k-means on shapes, not counts
        km = KMeans(n_clusters=K - 1, n_init=1, random_state=seed).fit(ink)
        cent = np.concatenate([np.zeros((1, patch * patch)), np.clip(km.cluster_centers_, 0, 1)])
        return cls(torch.as_tensor(cent, dtype=torch.float32), patch)

    def encode(self, frames) -> torch.Tensor:
        """Frames (..., H, W) in [0, 1] -> tokens (..., H/p, W/p) int64 (nearest centroid)."""
        x = patches(torch.as_tensor(frames, dtype=torch.float32), self.patch)
        flat = x.reshape(-1, x.shape[-1])
        c = self.centroids
        out = torch.empty(flat.shape[0], dtype=torch.long)
        for s in range(0, flat.shape[0], 1 << 16):  # ||x − c||² up to the per-row constant ||x||²
            d = (c * c).sum(1) - 2 * flat[s : s + (1 << 16)] @ c.T  # (chunk, K)
            out[s : s + (1 << 16)] = d.argmin(1)
        return out.view(x.shape[:-1])

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (..., h, w) -> frames (..., h·p, w·p) float32 in [0, 1]."""
        return unpatch(self.centroids[torch.as_tensor(tokens, dtype=torch.long)], self.patch)

    def embeddings(self) -> torch.Tensor:
        """The metric path's code table ``(centroid − 0.5, 0.5)``: (K, p·p + 1), no zero row."""
        K = self.size
        return torch.cat([self.centroids - 0.5, torch.full((K, 1), EMBED_OFFSET)], 1)

    def save(self, folder: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": "PatchTokenizer", "patch_size": self.patch, "codebook_size": self.size}
        writes = ((WEIGHTS, lambda tmp: save_file({"centroids": self.centroids}, tmp)),
                  (CONFIG, lambda tmp: tmp.write_text(json.dumps(config, indent=2))))
        for name, write in writes:  # atomic: each file via a temporary sibling, then os.replace
            tmp = folder / f".{name}.{os.getpid()}.tmp"
            try:
                write(tmp)
                os.replace(tmp, folder / name)
            finally:
                tmp.unlink(missing_ok=True)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> PatchTokenizer:
        from safetensors.torch import load_file

        folder = Path(folder)
        with open(folder / CONFIG) as f:
            cfg = json.load(f)
        return cls(load_file(folder / WEIGHTS)["centroids"], int(cfg["patch_size"]))
