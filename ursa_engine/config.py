"""The transformer's sizes and vocabulary (DESIGN §3): :class:`ModelConfig`, its presets, and its
``transformer/config.json`` form.

It imports nothing from the package (nor torch): the model (:mod:`ursa_engine.model`) is built
from a config and the checkpoint reader (:mod:`ursa_engine.checkpoint`) derives every weight name
and shape from one, so the checkpoint code does not need the model to know the sizes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class ModelConfig:
    """Transformer sizes and vocabulary (DESIGN §3); field names follow ``transformer/config.json``."""

    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    num_hidden_layers: int = 28
    head_dim: int = 128
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    vocab_size: int = 215669  # text ids [0, lm_vocab_size) then K visual ids
    lm_vocab_size: int = 151669  # visual token v has input id lm_vocab_size + v
    lm_head_size: int = 64000  # K, the codebook size
    bov_token_id: int = 151652
    pad_token_id: int = 151643  # Qwen3 "<|endoftext|>", the tokenizer's pad

    PRESETS: ClassVar[dict[str, dict]] = {
        "ursa-0.6b": {"hidden_size": 1024, "intermediate_size": 3072,
                      "num_attention_heads": 16, "num_hidden_layers": 28},
        "ursa-1.7b": {"hidden_size": 2048, "intermediate_size": 6144,
                      "num_attention_heads": 16, "num_hidden_layers": 28},
        "ursa-4b": {"hidden_size": 2560, "intermediate_size": 9728,
                      "num_attention_heads": 32, "num_hidden_layers": 36},
        # CPU tests: every feature (GQA, 3D RoPE with both pair groups, K = 64 = FSQ (4, 4, 4))
        "tiny": {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "num_hidden_layers": 2, "head_dim": 16, "vocab_size": 576, "lm_vocab_size": 512,
                     "lm_head_size": 64,
                     "bov_token_id": 500, "pad_token_id": 1},
    }

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim: must be even for RoPE, got {self.head_dim}")
        if self.vocab_size < self.lm_vocab_size + self.lm_head_size:
            raise ValueError(f"vocab_size={self.vocab_size} < lm_vocab_size + lm_head_size = "
                             f"{self.lm_vocab_size + self.lm_head_size}: visual ids would not fit")
        for name in ("bov_token_id", "pad_token_id"):
            if not 0 <= getattr(self, name) < self.lm_vocab_size:
                raise ValueError(f"{name}={getattr(self, name)} is not a text id in [0, {self.lm_vocab_size})")

    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        """``"tiny" | "ursa-0.6b" | "ursa-1.7b" | "ursa-4b"``; keyword overrides win (e.g. ``lm_head_size``)."""
        if name not in cls.PRESETS:
            raise ValueError(f"preset: unknown {name!r}, expected one of {sorted(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """From a ``config.json`` dict; keys that are not fields (diffusers metadata...) are ignored.

        Missing fields take the Qwen3 / URSA defaults (``head_dim`` 128, ``rms_norm_eps`` 1e-6...).
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if "vocab_size" not in kwargs and {"lm_vocab_size", "lm_head_size"} <= kwargs.keys():
            kwargs["vocab_size"] = kwargs["lm_vocab_size"] + kwargs["lm_head_size"]
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ModelConfig:
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def num_params(self) -> int:
        """Parameter count (embedding, layers, final norm, lm_head)."""
        h, d, hq, hkv = self.hidden_size, self.head_dim, self.num_attention_heads, self.num_key_value_heads
        layer = h * (hq + 2 * hkv) * d + hq * d * h + 3 * h * self.intermediate_size + 2 * h + 2 * d
        return self.vocab_size * h + self.num_hidden_layers * layer + h + self.lm_head_size * h

    def forward_flops(self, seq_len: int, *, batch: int = 1, latent_tokens: int | None = None) -> float:
        """Matmul FLOPs of one forward (DESIGN §6 counting): linear layers, attention, lm_head."""
        h, d, hq, hkv = self.hidden_size, self.head_dim, self.num_attention_heads, self.num_key_value_heads
        per_token = h * (hq + 2 * hkv) * d + hq * d * h + 3 * h * self.intermediate_size
        linear = 2.0 * per_token * self.num_hidden_layers * seq_len
        attn = 4.0 * seq_len * seq_len * hq * d * self.num_hidden_layers
        head = 2.0 * (seq_len if latent_tokens is None else latent_tokens) * h * self.lm_head_size
        return batch * (linear + attn + head)
