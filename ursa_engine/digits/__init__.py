"""The embedded default model's data, tokenizer and prompts (scikit-learn's digits).

Prompts are class labels as two text ids, ``[DIGIT_WORD, CLASS_BASE + label]`` ("digit 3"),
left-padded like URSA prompts (DESIGN §3) but to ``PROMPT_LENGTH = 2`` instead of 320: the
unconditional (negative) prompt is the empty prompt, i.e. two pad ids.
"""

from __future__ import annotations

import torch

from .data import CANVAS, VIDEO_FRAMES, DigitClassifier, crop_digit, load_digits_array, make_clips, split
from .tokenizer import PatchTokenizer

PROMPT_LENGTH = 2
DIGIT_WORD = 2  # text id standing for "digit"
CLASS_BASE = 3  # text id of class c is CLASS_BASE + c


def prompt_ids(labels, pad_id: int) -> torch.Tensor:
    """Class labels (B,) -> (B, 2) prompt ids; a label of -1 gives the empty prompt (all pads)."""
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    ids = torch.stack([torch.full_like(labels, DIGIT_WORD), CLASS_BASE + labels], 1)
    return torch.where(labels[:, None] < 0, torch.full_like(ids, pad_id), ids)


__all__ = [
    "CANVAS",
    "PROMPT_LENGTH",
    "VIDEO_FRAMES",
    "DigitClassifier",
    "PatchTokenizer",
    "crop_digit",
    "load_digits_array",
    "make_clips",
    "prompt_ids",
    "split",
]
