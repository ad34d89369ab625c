"""Offline training data: scikit-learn's handwritten digits as images and moving-digit videos.

``sklearn.datasets.load_digits`` ships 1,797 grey 8×8 digits (values 0..16) inside scikit-learn, so
nothing is downloaded. A sample is a clip of ``F`` frames of an ``8 × 16`` canvas (``CANVAS``) with
one digit placed at column ``x0`` and moving ``v`` pixels a frame to the left or right; an image is
a one-frame clip. Frames are float32 in [0, 1].

With the 2×2 patch tokenizer (:mod:`ursa_engine.digits.tokenizer`) a frame is a 4×8 grid of
tokens and one video frame is one latent frame (there is no temporal compression).
"""

from __future__ import annotations

import numpy as np

CANVAS = (8, 16)  # (H, W) pixels of every frame
DIGIT = 8  # the digits are 8×8
VIDEO_FRAMES = 4  # latent frames of a training video
SPEEDS = (-2, -1, 1, 2)  # pixels per frame


def load_digits_array() -> tuple[np.ndarray, np.ndarray]:
    """The scikit-learn digits: images (1797, 8, 8) float32 in [0, 1] and labels (1797,) int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def split(n: int, *, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed train / held-out split of ``n`` digit indices."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = round(n * test_fraction)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def place(digit: np.ndarray, x0: int, canvas=CANVAS) -> np.ndarray:
    """An 8×8 digit pasted on an empty canvas at column ``x0`` (vertically it fills the canvas)."""
    H, W = canvas
    out = np.zeros((H, W), np.float32)
    out[:, x0 : x0 + DIGIT] = digit
    return out


def random_motion(frames: int, rng: np.random.Generator, canvas=CANVAS) -> tuple[int, int]:
    """(x0, v): a start column and a speed that keep the digit inside the canvas for ``frames``."""
    room = canvas[1] - DIGIT
    if frames == 1:
        return int(rng.integers(0, room + 1)), 0
    speeds = [v for v in SPEEDS if abs(v) * (frames - 1) <= room]
    v = int(rng.choice(speeds))
    span = abs(v) * (frames - 1)
    x0 = int(rng.integers(0, room - span + 1))
    return (x0 + span, v) if v < 0 else (x0, v)


def make_clips(images: np.ndarray, frames: int, rng: np.random.Generator, canvas=CANVAS) -> np.ndarray:
    """Moving-digit clips, one per image: (N, frames, H, W) float32 (``frames = 1``: still images)."""
    out = np.zeros((len(images), frames, *canvas), np.float32)
    for n, img in enumerate(images):
        x0, v = random_motion(frames, rng, canvas)
        for f in range(frames):
            out[n, f] = place(img, x0 + v * f, canvas)
    return out


def crop_digit(frames: np.ndarray) -> np.ndarray:
    """Cut the 8-column window centred on the ink: (..., H, W) -> (..., H, 8).

    The window is centred on the column centre of mass, so a generated frame is classified
    wherever its digit stands.
    """
    H, W = frames.shape[-2:]
    flat = frames.reshape(-1, H, W)
    cols = flat.sum(1)  # (N, W)
    mass = cols.sum(1)
    centre = (cols * np.arange(W)).sum(1) / np.maximum(mass, 1e-6)
    start = np.clip(np.round(centre - (DIGIT - 1) / 2), 0, W - DIGIT).astype(int)
    start[mass <= 1e-6] = (W - DIGIT) // 2
    out = np.stack([f[:, s : s + DIGIT] for f, s in zip(flat, start, strict=True)])
    return out.reshape(*frames.shape[:-1], DIGIT)


class DigitClassifier:
    """A classifier fit on the real digits, applied to frames of any canvas position.

    Training images are the real digits placed on the canvas at every column and cut back out by
    :func:`crop_digit` (so crop jitter is part of what it learned); prediction crops the same way.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, canvas=CANVAS):
        from sklearn.svm import SVC

        xs, ys = [], []
        for x0 in sorted({0, (canvas[1] - DIGIT) // 2, canvas[1] - DIGIT}):  # edges clip the crop
            framed = np.stack([place(img, x0, canvas) for img in images])
            xs.append(crop_digit(framed).reshape(len(images), -1))
            ys.append(labels)
        self.canvas = canvas
        self.model = SVC(gamma="scale", C=10.0).fit(np.concatenate(xs), np.concatenate(ys))

    def predict(self, frames: np.ndarray) -> np.ndarray:
        """Frames (..., H, W) in [0, 1] -> predicted classes (...,) int64."""
        lead = frames.shape[:-2]
        feats = crop_digit(np.asarray(frames, np.float32)).reshape(-1, frames.shape[-2] * DIGIT)
        return self.model.predict(feats).astype(np.int64).reshape(lead)
