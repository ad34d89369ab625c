"""Pixel arguments of generation (``image=`` / ``video=``, DESIGN §2.4 conditioning frames): checks and
shapes, before anything is encoded.

Pixels are uint8 RGB, channels last, as the authors' pipeline takes them: an image ``(H, W, 3)``, a
PIL image, a batch ``(B, H, W, 3)`` (or a list of images); a video ``(F, H, W, 3)`` or
``(B, F, H, W, 3)``. Every error names the argument.
"""

from __future__ import annotations

import numpy as np
import torch


def _is_pil(x) -> bool:
    return type(x).__module__.startswith("PIL.") and hasattr(x, "convert")


def _to_array(x, name: str):
    if _is_pil(x):
        return np.asarray(x.convert("RGB"))
    if isinstance(x, (list, tuple)):
        if not x:
            raise ValueError(f"{name}: got an empty list")
        items = [_to_array(v, name) for v in x]
        shapes = {tuple(v.shape) for v in items}
        if len(shapes) != 1:
            raise ValueError(f"{name}: the listed images have different shapes {sorted(shapes)}")
        return np.stack(items)
    if isinstance(x, torch.Tensor):
        return x
    return np.asarray(x)


def is_pixels(x) -> bool:
    """Whether a ``video=`` argument is uint8 pixels (last dim 3) rather than integer tokens."""
    if _is_pil(x) or (isinstance(x, (list, tuple)) and x and _is_pil(x[0])):
        return True
    dtype = x.dtype if isinstance(x, (torch.Tensor, np.ndarray)) else None
    return dtype in (torch.uint8, np.uint8) and x.ndim in (4, 5) and x.shape[-1] == 3


def as_frames(x, name: str, *, image: bool) -> torch.Tensor:
    """uint8 pixels -> a (B, F, H, W, 3) uint8 tensor (images get F = 1)."""
    t = _to_array(x, name)
    if not isinstance(t, torch.Tensor):
        t = np.ascontiguousarray(t)
        t = torch.from_numpy(t if t.flags.writeable else t.copy())  # PIL arrays are read-only
    if t.dtype != torch.uint8:
        raise TypeError(f"{name}: expected uint8 RGB pixels (0..255), got {t.dtype}")
    forms = "(H, W, 3) or (B, H, W, 3)" if image else "(F, H, W, 3) or (B, F, H, W, 3)"
    if t.dim() not in ((3, 4) if image else (4, 5)) or t.shape[-1] != 3 or 0 in t.shape:
        raise ValueError(f"{name}: expected {forms} uint8 RGB pixels, got shape {tuple(t.shape)}")
    if image:
        return t[None, None] if t.dim() == 3 else t[:, None]
    return t[None] if t.dim() == 4 else t


def check_size(frames: torch.Tensor, name: str, grid: tuple[int, int], stride: int) -> None:
    """Pixel height / width must be the latent grid times the tokenizer's spatial stride."""
    H, W = frames.shape[2:4]
    h, w = grid
    if (H, W) != (h * stride, w * stride):
        raise ValueError(f"{name}: frames of {H}x{W} pixels (HxW), but the latent grid {h}x{w} needs "
                         f"{h * stride}x{w * stride} (spatial stride {stride})")


def check_batch(frames: torch.Tensor, name: str, batch: int) -> None:
    if frames.shape[0] not in (1, batch):
        raise ValueError(f"{name}: a batch of {frames.shape[0]}, but there are {batch} prompts (expected 1 or {batch})")


def cond_frame_count(num_frames: int, num_cond_frames, temporal_stride: int, name: str = "video") -> int:
    """The number of (last) video frames to encode: ``num_cond_frames`` or all, checked to be 1 + s·k."""
    n = num_frames if num_cond_frames is None else num_cond_frames
    what = "num_cond_frames" if num_cond_frames is not None else name
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"num_cond_frames: expected a positive int, got {num_cond_frames!r}")
    if n > num_frames:
        raise ValueError(f"num_cond_frames: {n} frames asked, but {name} has only {num_frames}")
    s = temporal_stride
    if s > 1 and (n - 1) % s:
        hint = "" if num_cond_frames is not None else " (or pass num_cond_frames= to use its last 1 + s·k)"
        raise ValueError(f"{what}: the video tokenizer encodes 1 + {s}k frames (1, {1 + s}, {1 + 2 * s}, ...), "
                         f"got {n}{hint}")
    return int(n)
