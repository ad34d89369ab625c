"""``ursa-engine demo``: the embedded digits model, sampled on the CPU with the engine.

Generates, from the default model in ``ursa_engine/assets/digits`` (trained by
``scripts/train_digits.py`` with :mod:`ursa_engine.training`):

* class-conditional images (``per_class`` of each digit) and 4-frame moving-digit videos (one per
  digit), with classifier-free guidance against the empty prompt;
* one image-to-video: a generated digit, moved to the left edge, given as latent frame 0;
* one start-end interpolation: the same digit two pixels a frame apart, given as the first and
  last latent frames.

Given frames are frozen (``freeze_cond=True``, DESIGN §2.4): the small model, stepping a clean
frame like any token, redraws about a fifth of its tokens (near-identical patches) by the end.

Outputs in ``--out``: ``samples.png`` (a grid: images, one column per class; then the videos,
two per row; then the image-to-video and the interpolation, given frames framed in grey) and
``samples.npz`` with ``frames`` float32 (N, 1, H, W) in [0, 1] and ``labels`` int64 (N,) for the
class-conditional images (F = 1), ``video_frames`` (M, F, H, W) / ``video_labels`` (M,) for the
class-conditional videos, ``i2v_frames`` / ``i2v_given`` and ``interp_frames`` / ``interp_given``
(the given frames as decoded pixels, ``*_label`` their class).
"""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import digits
from .engine import Engine

DEFAULT_ROOT = Path(__file__).resolve().parent / "assets" / "digits"


@dataclass
class DigitsModel:
    """The engine, the patch tokenizer (pixel decoder) and the conventions of a digits checkpoint."""

    engine: Engine
    tokenizer: digits.PatchTokenizer
    meta: dict

    @classmethod
    def load(cls, root: str | Path | None = None, *, threads: int | None = None) -> DigitsModel:
        root = Path(root) if root is not None else DEFAULT_ROOT
        if not (root / "transformer").is_dir():
            raise FileNotFoundError(f"root: {root} holds no trained digits model (run scripts/train_digits.py)")
        if threads:
            torch.set_num_threads(threads)
        with open(root / "digits.json") as f:
            meta = json.load(f)
        engine = Engine.from_pretrained(root, device="cpu", dtype=torch.float32, prompt_length=meta["prompt_length"],
                                        mode="eager")
        return cls(engine, digits.PatchTokenizer.from_pretrained(root / "vae"), meta)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.meta["latent_grid"])

    def prompts(self, labels) -> torch.Tensor:
        return digits.prompt_ids(labels, self.engine.model.config.pad_token_id)

    def generate(self, labels, frames: int = 1, *, seed: int = 0, num_steps: int = 25,
                 guidance_scale: float = 3.0, guidance_trunc: float = 0.9, **kwargs) -> torch.Tensor:
        """Latent tokens (B, frames, h, w) for class labels (B,)."""
        out = self.engine.generate(self.prompts(labels), latents_shape=(frames, *self.grid), seed=seed,
                                   num_steps=num_steps, guidance_scale=guidance_scale,
                                   guidance_trunc=guidance_trunc, **kwargs)
        return out.tokens

    def decode(self, tokens: torch.Tensor) -> np.ndarray:
        """Tokens (..., h, w) -> float32 pixels (..., H, W) in [0, 1]."""
        return self.tokenizer.decode(tokens).clamp(0, 1).numpy().astype(np.float32)

    def encode(self, frames) -> torch.Tensor:
        return self.tokenizer.encode(frames)


def shift_digit(frame: np.ndarray, x0: int) -> np.ndarray:
    """The digit of a frame (H, W) re-placed with its 8-column window starting at column ``x0``."""
    return digits.data.place(digits.crop_digit(frame), x0, frame.shape)


def run_demo(out: str | Path | None = None, *, root=None, seed: int = 0, per_class: int = 4,
             image_steps: int = 25, video_steps: int = 25, guidance_scale: float = 3.0, threads: int | None = None,
             verbose: bool = True) -> dict:
    """Run the whole demo; write ``samples.png`` / ``samples.npz`` under ``out`` (if given).

    Returns the arrays written to ``samples.npz`` plus ``seconds`` (wall time of the generation).
    """
    t0 = time.perf_counter()
    dm = DigitsModel.load(root, threads=threads)
    F = int(dm.meta["video_frames"])
    W = dm.meta["canvas"][1]
    gen = {"num_steps": image_steps, "guidance_scale": guidance_scale}

    labels = np.repeat(np.arange(10), per_class)
    images = dm.decode(dm.generate(labels, 1, seed=seed, **gen))  # (N, 1, H, W)

    video_labels = np.arange(10)
    gen["num_steps"] = video_steps
    videos = dm.decode(dm.generate(video_labels, F, seed=seed + 1000, **gen))  # (10, F, H, W)

    # image-to-video: the first generated 3, moved to the left edge, as latent frame 0
    i2v_label = 3
    given = shift_digit(images[int(np.flatnonzero(labels == i2v_label)[0]), 0], 0)
    cond = dm.encode(given[None, None])  # (1, 1, h, w)
    i2v = dm.decode(dm.generate([i2v_label], F, seed=seed + 2000, cond_latents=cond, cond_indices=[0],
                                freeze_cond=True, **gen))

    # start-end interpolation: the first generated 7 moved by 2 pixels a frame (the fastest training
    # motion) from near the left edge: given as the first and the last latent frames
    it_label = 7
    digit = images[int(np.flatnonzero(labels == it_label)[0]), 0]
    span = min(2 * (F - 1), W - 8)
    start = min(1, W - 8 - span)
    ends = np.stack([shift_digit(digit, start), shift_digit(digit, start + span)])
    cond = dm.encode(ends[None])  # (1, 2, h, w)
    interp = dm.decode(dm.generate([it_label], F, seed=seed + 3000, cond_latents=cond, cond_indices=[0, F - 1],
                                   freeze_cond=True, **gen))
    seconds = time.perf_counter() - t0

    result = {"frames": images, "labels": labels.astype(np.int64), "video_frames": videos,
              "video_labels": video_labels.astype(np.int64), "i2v_frames": i2v,
              "i2v_given": given[None].astype(np.float32),
              "i2v_label": np.int64(i2v_label), "interp_frames": interp, "interp_given": ends.astype(np.float32),
              "interp_label": np.int64(it_label)}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(out / "samples.npz", **result)
        write_png(out / "samples.png", sample_grid(result, per_class))
        if verbose:
            print(f"wrote {out / 'samples.png'} and {out / 'samples.npz'}: {len(labels)} images, "
                  f"{len(video_labels)} videos of {F} frames, 1 image-to-video, 1 interpolation "
                  f"in {seconds:.1f}s on the CPU")
    result["seconds"] = seconds
    return result


# ------------------------------------------------------------------------------------ the PNG grid
def sample_grid(r: dict, per_class: int, *, scale: int = 4) -> np.ndarray:
    """One uint8 greyscale picture of every sample (tiles of H×W, a 1-pixel gap between tiles)."""
    H, W = r["frames"].shape[-2:]
    cols = 10
    blank = np.full((H, W), 0.15, np.float32)
    rows = []
    imgs = r["frames"][:, 0].reshape(10, per_class, H, W)
    rows += [list(imgs[:, j]) for j in range(per_class)]
    rows.append([blank] * cols)
    vids = r["video_frames"]
    F = vids.shape[1]
    for i in range(0, len(vids), 2):
        row = []
        for v in vids[i : i + 2]:
            row += list(v) + [blank]
        rows.append(row)
    rows.append([blank] * cols)
    rows.append([_framed(r["i2v_given"][0])] + [blank] + list(r["i2v_frames"][0]))
    interp = list(r["interp_frames"][0])
    interp[0], interp[F - 1] = _framed(interp[0]), _framed(interp[F - 1])
    rows.append(interp)
    gap = 1
    out = np.full((len(rows) * (H + gap) + gap, cols * (W + gap) + gap), 0.3, np.float32)
    for y, row in enumerate(rows):
        for x, tile in enumerate(row[:cols]):
            out[gap + y * (H + gap) : gap + y * (H + gap) + H, gap + x * (W + gap) : gap + x * (W + gap) + W] = tile
    big = np.kron(out, np.ones((scale, scale), np.float32))
    return (np.clip(big, 0, 1) * 255).round().astype(np.uint8)


def _framed(tile: np.ndarray) -> np.ndarray:
    t = tile.copy()
    t[0, :] = t[-1, :] = t[:, 0] = t[:, -1] = np.maximum(t[0, :].max(), 0.5)
    return t


def write_png(path: str | Path, img: np.ndarray) -> None:
    """Write a 2-D uint8 array as an 8-bit greyscale PNG (standard library only)."""
    h, w = img.shape
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # atomic: a temporary sibling, then os.replace
    try:
        tmp.write_bytes(png)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main_from_args(args) -> int:
    run_demo(args.out, root=args.root, seed=args.seed, per_class=args.per_class, image_steps=args.steps,
             video_steps=args.steps, guidance_scale=args.guidance)
    return 0
