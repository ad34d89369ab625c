"""Rewards for RL on the bundled digits model (issue 18): a classifier of scikit-learn's real digits.

A reward function takes decoded pixels and the prompted labels and returns one float per sample::

    reward_fn(pixels, labels) -> (B,) float32
    pixels : (B, F, H, W) or (B, H, W) float in [0, 1] (``DigitsModel.decode`` of the tokens)
    labels : (B,) int, the class each sample was prompted with

The default, :func:`digit_probability`, is the probability that a multinomial logistic regression
fit on the 1,797 real 8×8 digits (``sklearn.datasets.load_digits``) gives to the **prompted** class
(averaged over frames). Frames are 8×16 canvases; each is cut to the 8-column window centred on its
ink (:func:`ursa_engine.digits.crop_digit`), as the demo's classifier does, and the classifier is
fit on real digits placed at the left, centre and right of the canvas and cut the same way.

It is deliberately another model than the demo's check (:class:`ursa_engine.digits.DigitClassifier`,
an RBF SVM scored by argmax accuracy): a policy that games the reward's decision surface without
drawing better digits shows up as a gap between the two.
"""

from __future__ import annotations

import functools

import numpy as np

from ..digits import CANVAS, crop_digit, load_digits_array
from ..digits.data import DIGIT, place


class DigitProbabilityClassifier:
    """Class probabilities of digit frames of any canvas position (logistic regression on real digits).

    Parameters
    ----------
    images : (N, 8, 8) float in [0, 1], real digits
    labels : (N,) int in 0..9
    canvas : (H, W) of the frames it will score
    C : inverse L2 strength of the logistic regression
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, canvas=CANVAS, C: float = 1.0):
        from sklearn.linear_model import LogisticRegression

        columns = sorted({0, (canvas[1] - DIGIT) // 2, canvas[1] - DIGIT})  # the crop's jitter is learned
        xs = [crop_digit(np.stack([place(img, x0, canvas) for img in images])).reshape(len(images), -1)
              for x0 in columns]
        self.canvas = tuple(canvas)
        self.model = LogisticRegression(C=C, max_iter=3000).fit(np.concatenate(xs), np.tile(labels, len(columns)))

    def predict_proba(self, frames: np.ndarray) -> np.ndarray:
        """Frames (..., H, W) in [0, 1] -> class probabilities (..., 10) float32."""
        frames = np.asarray(frames, np.float32)
        if frames.shape[-2:] != self.canvas:
            raise ValueError(f"frames: expected (..., {self.canvas[0]}, {self.canvas[1]}), got {frames.shape}")
        lead = frames.shape[:-2]
        feats = crop_digit(frames).reshape(-1, self.canvas[0] * DIGIT)
        return self.model.predict_proba(feats).astype(np.float32).reshape(*lead, -1)


@functools.lru_cache(maxsize=1)
def digit_probability_classifier() -> DigitProbabilityClassifier:
    """The default reward's classifier, fit once per process (about a second) and then reused."""
    images, labels = load_digits_array()
    return DigitProbabilityClassifier(images, labels)


def digit_probability(pixels, labels) -> np.ndarray:
    """The default reward: p(prompted class | frame) under the real-digits classifier, mean over frames.

    Parameters
    ----------
    pixels : (B, F, H, W) or (B, H, W) float in [0, 1]
    labels : (B,) int, the prompted classes

    Returns
    -------
    (B,) float32 in [0, 1]
    """
    pixels = np.asarray(pixels, np.float32)
    labels = np.asarray(labels, np.int64).reshape(-1)
    if pixels.ndim == 3:
        pixels = pixels[:, None]
    if pixels.ndim != 4 or pixels.shape[0] != labels.shape[0]:
        raise ValueError(f"pixels: expected (B, F, H, W) or (B, H, W) with B = {labels.shape[0]} labels, "
                         f"got shape {pixels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"labels: expected digit classes 0..9, got [{labels.min()}, {labels.max()}]")
    probs = digit_probability_classifier().predict_proba(pixels)  # (B, F, 10)
    return np.take_along_axis(probs, labels[:, None, None], axis=-1)[..., 0].mean(1)


@functools.lru_cache(maxsize=1)
def demo_classifier():
    """The demo's own check (:class:`ursa_engine.digits.DigitClassifier`, argmax of an RBF SVM), fit once."""
    from ..digits import DigitClassifier

    images, labels = load_digits_array()
    return DigitClassifier(images, labels)


def demo_accuracy(pixels, labels) -> np.ndarray:
    """Per sample: 1.0 where the demo's classifier (argmax) names the prompted class, else 0.0.

    Parameters
    ----------
    pixels : (B, F, H, W) or (B, H, W) float in [0, 1]
    labels : (B,) int

    Returns
    -------
    (B,) float32 of 0 / 1 (for F > 1: the share of frames recognised)
    """
    pixels = np.asarray(pixels, np.float32)
    if pixels.ndim == 3:
        pixels = pixels[:, None]
    pred = demo_classifier().predict(pixels)  # (B, F)
    return (pred == np.asarray(labels, np.int64).reshape(-1, 1)).mean(1).astype(np.float32)
