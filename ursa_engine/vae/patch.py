"""The bundled digits model's patch tokenizer as a tokenizer family (``_class_name: PatchTokenizer``).

The digits codes are k-means centroids of 2×2 grey patches (:mod:`ursa_engine.digits.tokenizer`);
here they speak the common interface: pixels (B, 3, F, H, W) in [-1, 1], the grey level being the
mean of the three channels mapped to [0, 1]; decoding repeats the grey level on three channels.
Frames are independent (temporal stride 1), the spatial stride is the patch size.
"""

from __future__ import annotations

import torch
from torch import nn

from ..digits.tokenizer import PatchTokenizer as _Patches
from .base import Tokenizer


class _Codes:
    """The quantizer face of the centroid table (the table itself is the tokenizer's parameter
    ``centroids``, the name the digits folder stores it under)."""

    def __init__(self, owner: DigitsPatchTokenizer):
        self.owner = owner

    @property
    def size(self) -> int:
        return self.owner.centroids.shape[0]

    def _patches(self) -> _Patches:
        return _Patches(self.owner.centroids.detach().float().cpu(), self.owner.spatial_stride)

    def quantize(self, z: torch.Tensor) -> torch.Tensor:  # (B, 1, T, H, W) grey in [0, 1] -> (B, T, h, w)
        return self._patches().encode(z[:, 0].float().cpu()).to(z.device)

    def dequantize(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # -> (B, 1, T, H, W)
        return self._patches().decode(ids.cpu())[:, None].to(ids.device, dtype)


class DigitsPatchTokenizer(Tokenizer):
    """Grey 2×2 patch codes of the digits demo model (``ursa_engine/assets/digits/vae``)."""

    class_name = "PatchTokenizer"
    temporal_stride = 1

    def __init__(self, config: dict | None = None):
        cfg = {"patch_size": 2, "codebook_size": 256, **(config or {})}
        super().__init__(cfg)
        self.spatial_stride = int(cfg["patch_size"])
        p = self.spatial_stride
        self.centroids = nn.Parameter(torch.zeros(int(cfg["codebook_size"]), p * p), requires_grad=False)
        self.quantizer = _Codes(self)

    def _encode(self, x: torch.Tensor, chunk: int | None) -> torch.Tensor:
        return ((x.mean(1, keepdim=True) + 1) / 2).clamp(0, 1)  # "latents" = the grey frames

    def _decode(self, z: torch.Tensor, chunk: int | None) -> torch.Tensor:
        return (z * 2 - 1).expand(-1, 3, -1, -1, -1).contiguous()

    def encode(self, pixels, **options) -> torch.Tensor:
        x = self._check_pixels(pixels)
        return self.quantizer.quantize(self._encode(x, None))

    def _frame_bytes(self, h: int, w: int, itemsize: int) -> int:
        return 4 * 3 * h * w * self.spatial_stride**2 * itemsize
