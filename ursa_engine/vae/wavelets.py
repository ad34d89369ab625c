"""Haar wavelet patching of the Cosmos video tokenizer (the authors' ``Patcher3D``).

One level of the 3D transform splits every axis (time, height, width) into its even and odd
samples and keeps their scaled sum (low band) and difference (high band): 8 bands, stacked on
the channel axis in the order ``4·band_t + 2·band_h + band_w`` (low = 0, high = 1), each band
holding all C input channels (channel ``band·C + c``). A level scales by ``1/√2`` per axis and
by ``1/(2√2)`` overall, so the all-low band is the mean of the 2×2×2 block; :func:`idwt3d` is its
exact inverse. The authors implement it with strided grouped convolutions after a one-sample
reflect pad; for even sizes (the only ones the tokenizer feeds it) the pad is never read, and
the same numbers come out of the reshapes below without copying the input 8 times.
"""

from __future__ import annotations

import math

import torch

_S = 1.0 / math.sqrt(2.0)  # the Haar filter taps (0.7071067811865476)
_RESCALE_3D = 2.0 * math.sqrt(2.0)


def _split(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) Haar bands of ``x`` along ``dim`` (even length)."""
    a, b = x.unflatten(dim, (x.shape[dim] // 2, 2)).unbind(dim + 1)
    return (a + b) * _S, (a - b) * _S


def _merge(low: torch.Tensor, high: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of :func:`_split`: interleave ``(low ± high)/√2`` along ``dim``."""
    return torch.stack(((low + high) * _S, (low - high) * _S), dim + 1).flatten(dim, dim + 1)


def dwt3d(x: torch.Tensor) -> torch.Tensor:
    """One level: (B, C, T, H, W) with even T, H, W -> (B, 8C, T/2, H/2, W/2)."""
    for name, size in zip("THW", x.shape[2:], strict=True):
        if size % 2:
            raise ValueError(f"x: the wavelet transform needs even sizes, got {name}={size}")
    bands = []
    for t in _split(x, 2):
        for h in _split(t, 3):
            bands.extend(_split(h, 4))
    return torch.cat(bands, 1).mul_(1.0 / _RESCALE_3D)


def idwt3d(y: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dwt3d`: (B, 8C, T, H, W) -> (B, C, 2T, 2H, 2W)."""
    if y.shape[1] % 8:
        raise ValueError(f"y: channels must be a multiple of 8 (8 wavelet bands), got {y.shape[1]}")
    bands = list(y.chunk(8, 1))
    w = [_merge(bands[i], bands[i + 1], 4) for i in range(0, 8, 2)]  # (t, h) pairs, width merged
    h = [_merge(w[i], w[i + 1], 3) for i in range(0, 4, 2)]
    return _merge(h[0], h[1], 2).mul_(_RESCALE_3D)


def patchify(x: torch.Tensor, levels: int) -> torch.Tensor:
    """The encoder's input transform: the first frame repeated ``2**levels`` times (the causal
    "frame 0 stands alone" convention), then ``levels`` wavelet levels.

    (B, C, 1 + 4k, H, W) -> (B, C·8^levels, k + 1, H / 2^levels, W / 2^levels) for levels = 2.
    """
    p = 2**levels
    x = torch.cat([x[:, :, :1].expand(-1, -1, p, -1, -1), x[:, :, 1:]], 2)
    for _ in range(levels):
        x = dwt3d(x)
    return x


def unpatchify(y: torch.Tensor, levels: int) -> torch.Tensor:
    """The decoder's output transform: ``levels`` inverse levels, then the ``2**levels − 1``
    leading copies of frame 0 dropped: T latent-rate frames -> ``2**levels · T − 2**levels + 1``."""
    for _ in range(levels):
        y = idwt3d(y)
    return y[:, :, 2**levels - 1 :]
