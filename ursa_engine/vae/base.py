"""What every URSA tokenizer offers: pixels <-> code ids, input checks, uint8 frames, memory chunks.

Pixel tensors are float ``(B, 3, F, H, W)`` (or ``(B, 3, H, W)`` for one frame) in ``[-1, 1]``;
code ids are int64 ``(B, T, h, w)``. A video tokenizer with temporal stride ``s`` maps
``F = 1 + s·k`` frames to ``T = k + 1`` latent frames (frame 0 alone, then groups of ``s``);
an image tokenizer (``s = 1``) treats frames independently.

uint8 frames follow the authors' pipeline exactly: in, ``(x − 127.5) / 127.5`` in the
tokenizer's dtype; out, ``x · 127.5 + 127.5`` clamped to [0, 255] and **truncated** to uint8.

Memory: decoding runs batch items one by one (the authors' ``vae_batch_size=1``) and, inside the
network, per-frame work (2D convolutions, per-frame group norms, spatial attention) in chunks of
frames, temporal convolutions with their causal halo, and temporal attention in chunks of rows.
None of this changes a value: the chunked decode equals the plain one (tested at 1e-6 in fp32).
The chunk size comes from ``memory_budget`` (bytes of temporaries per layer, an estimate).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of per-layer temporaries a chunked decode aims for


class TokenizerError(ValueError):
    """A tokenizer folder that cannot be loaded: missing files, unknown class, bad config or weights."""


def frame_chunks(T: int, chunk: int | None) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(T)`` in steps of ``chunk`` (None or 0: one piece)."""
    step = T if not chunk else max(1, int(chunk))
    return [(s, min(s + step, T)) for s in range(0, T, step)] or [(0, 0)]


def per_frame(fn, x: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """Apply a per-frame function ``fn`` ((B, C, t, H, W) -> (B, C', t, H', W')) over frame chunks
    of ``x`` and assemble the result; with one chunk this is just ``fn(x)``."""
    pieces = frame_chunks(x.shape[2], chunk)
    if len(pieces) == 1:
        return fn(x)
    out = None
    for s, e in pieces:
        y = fn(x[:, :, s:e])
        if out is None:
            out = y.new_empty((*y.shape[:2], x.shape[2], *y.shape[3:]))
        out[:, :, s:e] = y
    return out


class Tokenizer(nn.Module):
    """Base class of the tokenizer families (:mod:`.cosmos3d`, :mod:`.ibq`).

    Subclasses set ``temporal_stride``, ``spatial_stride``, ``in_channels``, ``quantizer`` and
    implement ``_encode(x, chunk)`` (pixels -> latents before quantization), ``_decode(z, chunk)``
    (dequantized codes -> pixels), ``num_frames(T)`` and ``_frame_bytes(h, w, itemsize)``.
    """

    class_name = ""  # the config.json "_class_name" of the family
    temporal_stride = 1
    spatial_stride = 8
    in_channels = 3

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        self.memory_budget = DEFAULT_MEMORY_BUDGET

    # ------------------------------------------------------------------ facts
    @property
    def codebook_size(self) -> int:
        return self.quantizer.size

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(T, h, w) code grid that *generates* a ``num_frames × height × width`` clip (the
        authors' ``(F − 1)/4 + 1``); the sizes are checked. What :meth:`encode` returns for a
        given clip can differ for clips longer than one tile: see :meth:`encoded_frames`."""
        s, ts = self.spatial_stride, self.temporal_stride
        for name, v in (("num_frames", num_frames), ("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if ts > 1 and (num_frames - 1) % ts:
            raise ValueError(f"num_frames: this tokenizer takes 1 + {ts}k frames (1, {1 + ts}, {1 + 2 * ts}, ...), "
                             f"got {num_frames}")
        for name, v in (("height", height), ("width", width)):
            if v % s:
                raise ValueError(f"{name}: must be a multiple of the spatial stride {s}, got {v}")
        T = (num_frames - 1) // ts + 1 if ts > 1 else num_frames
        return T, height // s, width // s

    def num_frames(self, T: int) -> int:
        """Pixel frames that decoding ``T`` latent frames gives (the authors' tiling included)."""
        return T

    def encoded_frames(self, num_frames: int) -> int:
        """Latent frames that encoding ``num_frames`` pixel frames gives (the authors' tiling included)."""
        return self.latent_shape(num_frames, self.spatial_stride, self.spatial_stride)[0]

    # ------------------------------------------------------------------ checks
    def _check_pixels(self, pixels) -> torch.Tensor:
        x = torch.as_tensor(pixels)
        if not x.is_floating_point():
            raise TypeError(f"pixels: expected a float tensor in [-1, 1], got {x.dtype} (uint8 frames go through "
                            "encode_frames)")
        x = x.unsqueeze(2) if x.dim() == 4 else x
        if x.dim() != 5:
            raise ValueError(f"pixels: expected (B, {self.in_channels}, F, H, W) or (B, {self.in_channels}, H, W), "
                             f"got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"pixels: expected {self.in_channels} channels on dim 1, got {x.shape[1]} "
                             f"(shape {tuple(x.shape)})")
        self.latent_shape(*x.shape[2:])
        if not torch.isfinite(x).all():
            raise ValueError("pixels: contains NaN or infinite values")
        return x.to(self.device, self.dtype)

    def _check_ids(self, ids) -> torch.Tensor:
        x = torch.as_tensor(ids)
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"ids: expected integer codes, got {x.dtype}")
        x = x.unsqueeze(1) if x.dim() == 3 else x
        if x.dim() != 4 or min(x.shape) < 1:
            raise ValueError(f"ids: expected (B, T, h, w) or (B, h, w) codes, got shape {tuple(x.shape)}")
        K = self.codebook_size
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= K:
            raise ValueError(f"ids: codes must lie in [0, {K}), got [{lo}, {hi}]")
        return x.to(self.device, torch.long)

    def chunk_frames(self, h: int, w: int, memory_budget: int | None = None) -> int:
        """Frames per chunk so that one layer's temporaries stay near ``memory_budget`` bytes."""
        budget = self.memory_budget if memory_budget is None else int(memory_budget)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return max(1, budget // max(1, self._frame_bytes(h, w, itemsize)))

    # ------------------------------------------------------------------ pixels <-> ids
    @torch.no_grad()
    def encode(self, pixels, *, chunk_frames: int | None = None, memory_budget: int | None = None) -> torch.Tensor:
        """Pixels (B, 3, F, H, W) or (B, 3, H, W) in [-1, 1] -> codes (B, T, h, w) int64.

        ``chunk_frames``: frames per chunk of per-frame work (0: none, the plain computation);
        default: from ``memory_budget`` (bytes; default :data:`DEFAULT_MEMORY_BUDGET`).
        """
        x = self._check_pixels(pixels)
        h, w = x.shape[-2] // self.spatial_stride, x.shape[-1] // self.spatial_stride
        chunk = self.chunk_frames(h, w, memory_budget) if chunk_frames is None else chunk_frames
        return torch.cat([self.quantizer.quantize(self._encode(x[b : b + 1], chunk)) for b in range(x.shape[0])])

    @torch.no_grad()
    def decode(self, ids, *, chunk_frames: int | None = None, memory_budget: int | None = None) -> torch.Tensor:
        """Codes (B, T, h, w) or (B, h, w) -> pixels (B, 3, F, H, W) in the tokenizer's dtype
        (values near [-1, 1], not clamped); ``F = num_frames(T)``. Chunking as in :meth:`encode`."""
        x = self._check_ids(ids)
        chunk = self.chunk_frames(*x.shape[-2:], memory_budget) if chunk_frames is None else chunk_frames
        out = [self._decode(self.quantizer.dequantize(x[b : b + 1], self.dtype), chunk) for b in range(x.shape[0])]
        return torch.cat(out) if len(out) > 1 else out[0]

    def encode_frames(self, frames, **options) -> torch.Tensor:
        """uint8 frames -> codes (B, T, h, w): an image (H, W, 3), a clip (F, H, W, 3) or a batch
        (B, F, H, W, 3); ``(x − 127.5) / 127.5`` in the tokenizer's dtype, as the authors."""
        x = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames)
        if x.dtype != torch.uint8:
            raise TypeError(f"frames: expected uint8 pixels, got {x.dtype}")
        if x.dim() not in (3, 4, 5) or x.shape[-1] != self.in_channels:
            raise ValueError(f"frames: expected (H, W, {self.in_channels}), (F, H, W, {self.in_channels}) or "
                             f"(B, F, H, W, {self.in_channels}) uint8, got shape {tuple(x.shape)}")
        while x.dim() < 5:
            x = x.unsqueeze(0)
        x = x.to(self.device).to(self.dtype).sub(127.5).div_(127.5)
        return self.encode(x.permute(0, 4, 1, 2, 3), **options)

    def decode_frames(self, ids, **options) -> np.ndarray:
        """Codes -> uint8 frames (B, F, H, W, 3): ``x · 127.5 + 127.5``, clamped, truncated."""
        return to_uint8(self.decode(ids, **options))

    # ------------------------------------------------------------------ files
    @classmethod
    def from_config(cls, config: dict) -> Tokenizer:
        """Random weights (tests, benchmarks) for a config dict of this family."""
        return cls(config)

    def save_pretrained(self, folder: str | os.PathLike, *, dtype: torch.dtype | None = None) -> None:
        """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` (the published layout)."""
        save_tokenizer(self, folder, dtype=dtype)

    # subclasses -----------------------------------------------------------
    def _encode(self, x: torch.Tensor, chunk: int | None) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _decode(self, z: torch.Tensor, chunk: int | None) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _frame_bytes(self, h: int, w: int, itemsize: int) -> int:  # pragma: no cover - abstract
        raise NotImplementedError


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(B, 3, F, H, W) pixels in [-1, 1] -> (B, F, H, W, 3) uint8, the authors' way: the affine map
    in the pixels' own dtype, clamp, then truncation (not rounding)."""
    x = pixels.mul(127.5).add_(127.5).clamp_(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).cpu().numpy()


def attention_bytes(tokens: int) -> int:
    """fp32 bytes of one single-head attention score matrix (the math backend's worst case)."""
    return 4 * tokens * tokens


def prod(*xs: int) -> int:
    return math.prod(xs)


def save_tokenizer(model: Tokenizer, folder: str | os.PathLike, *, dtype: torch.dtype | None = None) -> None:
    """Write ``config.json`` (with ``_class_name``) and ``diffusion_pytorch_model.safetensors``;
    files go to a temporary sibling first, config.json last."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    cfg = {"_class_name": model.class_name,
           **{k: list(v) if isinstance(v, tuple) else v for k, v in model.config.items()}}
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.saving-", dir=folder.parent))
    try:
        save_file(state, tmp / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        folder.mkdir(exist_ok=True)
        for new in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):
            os.replace(new, folder / new.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
