"""Tiny complete checkpoint folders for tests: transformer/, scheduler/, vae/, tokenizer/ (DESIGN §3).

``write_tiny_root(root, family="cosmos3d" | "ibq")`` writes a random but well-formed URSA root that
``ue.Engine.from_pretrained`` and ``URSAPipeline.from_pretrained`` load on the CPU in well under a
second. The transformer's ``lm_head_size`` is the tokenizer's K and the scheduler's code table is
the tokenizer's own (FSQ digits for Cosmos, ``quantizer.embedding.weight`` for IBQ), as in a
published checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

import ursa_engine as ue
from ursa_engine.checkpoint import save_transformer

# Tokenizer configs small enough for CPU tests.
# Cosmos: K = 64, strides 4 (time) x 8 (space): a 9 x 32 x 48 clip <-> 3 x 4 x 6 codes.
TINY_COSMOS = {"block_out_channels": [8, 16, 16], "layers_per_block": 1, "latent_channels": 4, "sample_frames": 9,
               "fsq_levels": [4, 4, 4], "num_vq_embeddings": 64, "vq_embed_dim": 3}
# IBQ: K = 100, stride 4: a 32 x 48 image <-> 8 x 12 codes.
TINY_IBQ = {"block_out_channels": [32, 32, 64], "layers_per_block": 1, "latent_channels": 4,
            "num_vq_embeddings": 100, "vq_embed_dim": 8, "spatial_stride": 4}

FAMILIES = ("cosmos3d", "ibq")
SCHEDULES = {"cosmos3d": {"alpha": 1.0, "c": 5.0}, "ibq": {"alpha": 0.5, "c": 6.0}}  # the paper's (§2.2)
TEXT_VOCAB = {"[UNK]": 0, "<|endoftext|>": 1, "a": 3, "bear": 4, "cat": 5, "walking": 6, "on": 7, "snow": 8}


def tiny_tokenizer(family: str = "cosmos3d", *, seed: int = 0):
    """A random tiny tokenizer of ``family`` (fp32, CPU); the global torch RNG is left untouched."""
    from ursa_engine.vae import CosmosFSQTokenizer, IBQTokenizer

    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "cosmos3d":
            return CosmosFSQTokenizer.from_config(TINY_COSMOS).eval()
        return IBQTokenizer.from_config(TINY_IBQ).eval()


def tiny_model_config(K: int) -> ue.ModelConfig:
    """The ``tiny`` preset with a lm_head of K codes (text ids stay [0, 512))."""
    base = ue.ModelConfig.preset("tiny")
    return ue.ModelConfig.preset("tiny", lm_head_size=K, vocab_size=base.lm_vocab_size + K)


def write_tiny_root(root: str | os.PathLike, *, family: str = "cosmos3d", with_vae: bool = True,
                    tokenizer: bool = True, seed: int = 0, shift: float = 1.0) -> Path:
    """Write a complete tiny checkpoint root and return its path.

    Parameters
    ----------
    root : the folder (created if missing)
    family : ``"cosmos3d"`` (video, K = 64, :data:`TINY_COSMOS`) or ``"ibq"`` (image, K = 100, :data:`TINY_IBQ`)
    with_vae : write ``vae/`` (the tokenizer with random weights)
    tokenizer : write ``tokenizer/tokenizer.json`` (a WordLevel vocabulary of a few words, pad id 1)
    seed : seeds the random transformer and tokenizer weights
    shift : ``scheduler_config.json``'s shift
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    vae = tiny_tokenizer(family, seed=seed)
    K = vae.codebook_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ue.URSATransformer(tiny_model_config(K), init_std=0.2)
    save_transformer(model, root / "transformer")
    emb = ue.Codebook.fsq(vae.quantizer.levels).emb if family == "cosmos3d" else vae.quantizer.embedding.weight
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({**SCHEDULES[family], "shift": shift}))
    torch.save({"path.emb": emb.detach().float().clone()}, root / "scheduler" / "scheduler_model.pth")
    if with_vae:
        vae.save_pretrained(root / "vae")
    if tokenizer:
        import tokenizers

        tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(TEXT_VOCAB, unk_token="[UNK]"))
        tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
        (root / "tokenizer").mkdir(exist_ok=True)
        tok.save(str(root / "tokenizer" / "tokenizer.json"))
    return root
