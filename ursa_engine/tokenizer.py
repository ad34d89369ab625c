"""Prompt ids for the URSA transformer (DESIGN §3): the Qwen3 tokenizer (HF ``tokenizers``),
prompts left-padded (or truncated) to a fixed length, no attention mask: pads are attended.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

PROMPT_LENGTH = 320  # the length URSA prompts are padded to


def motion_prompt(prompt: str, motion: float | None) -> str:
    """URSA video checkpoints' optional ``motion=X, `` prefix (DESIGN §3); None leaves it out."""
    return prompt if motion is None else f"motion={float(motion):.1f}, {prompt}"


def pad_prompt_ids(ids: Sequence[Sequence[int]] | torch.Tensor, pad_id: int,
                   length: int = PROMPT_LENGTH) -> torch.Tensor:
    """Left-pad (or right-truncate, as HF ``truncation=True`` does) id lists to ``length``.

    Parameters
    ----------
    ids : a list of id sequences, or a (B, P) / (P,) integer tensor
    pad_id : the id used for padding

    Returns
    -------
    (B, length) int64 tensor
    """
    if isinstance(ids, torch.Tensor):
        if ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"prompt ids: expected an integer tensor, got {ids.dtype}")
        rows = [r.tolist() for r in (ids[None] if ids.dim() == 1 else ids)]
    else:
        rows = [list(r) for r in ids]
    out = torch.full((len(rows), length), pad_id, dtype=torch.long)
    for b, row in enumerate(rows):
        row = row[:length]
        if row:
            out[b, length - len(row):] = torch.as_tensor(row, dtype=torch.long)
    return out


class PromptTokenizer:
    """A ``tokenizer/`` folder's ``tokenizer.json`` with URSA's padding rules."""

    def __init__(self, tokenizer, pad_id: int, length: int = PROMPT_LENGTH):
        self.tokenizer, self.pad_id, self.length = tokenizer, pad_id, length

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, length: int = PROMPT_LENGTH,
                        default_pad: str = "<|endoftext|>") -> PromptTokenizer:
        from tokenizers import Tokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: no tokenizer.json (HF tokenizers format)")
        tok = Tokenizer.from_file(str(path))
        pad = default_pad
        config = folder / "tokenizer_config.json"
        if config.is_file():
            with open(config) as f:
                value = json.load(f).get("pad_token") or pad
            pad = value["content"] if isinstance(value, dict) else value
        pad_id = tok.token_to_id(pad)
        if pad_id is None:
            raise ValueError(f"{folder}: pad token {pad!r} is not in the vocabulary")
        return cls(tok, pad_id, length)

    def encode(self, prompts: str | Sequence[str], *, motion: float | None = None,
               length: int | None = None) -> torch.Tensor:
        """(B, length) int64 ids of the prompts, left-padded, with the optional motion prefix;
        ``length`` overrides the tokenizer's own for this call."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        texts = [motion_prompt(p, motion) for p in prompts]
        ids = [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=True)]
        return pad_prompt_ids(ids, self.pad_id, self.length if length is None else int(length))
