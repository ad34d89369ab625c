"""Assembling an :class:`~ursa_engine.engine.Engine` from a checkpoint root (``Engine.from_pretrained``, DESIGN §3).

A root holds ``transformer/``, ``scheduler/`` and optionally ``tokenizer/`` (prompts) and ``vae/``
(pixels); it may be a hub id (:func:`ursa_engine.hub.resolve_root`) and may get a transformer-only
overlay (:func:`ursa_engine.checkpoint.read_weights`, DESIGN §9).
"""

from __future__ import annotations

import os

import torch

from .model import URSATransformer
from .scheduler import Scheduler
from .tokenizer import PROMPT_LENGTH, PromptTokenizer


def load_engine(cls, root: str | os.PathLike, *, dtype: torch.dtype | None = None, device=None,
                num_steps: int | None = None, shift: float | None = None, variant: str | None = None,
                load_vae: bool = True, transformer_weights: str | os.PathLike | None = None,
                revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                local_files_only: bool | None = None, token: str | bool | None = None, **options):
    """``cls.from_pretrained``'s work (``cls``: :class:`~ursa_engine.engine.Engine` or a subclass);
    the parameters are documented there."""
    from .compat import KineticOptimalScheduler
    from .hub import resolve_root

    root = resolve_root(root, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                        token=token, variant=variant, transformer_weights=transformer_weights is None)
    for sub in ("transformer", "scheduler"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"root: {root} has no {sub}/ folder (expected transformer/, scheduler/, "
                                    "optionally tokenizer/ and vae/)")
    if options.get("mesh") is not None:  # checked and set up before any weight is read (issue 13)
        from .distributed import setup_mesh

        options["mesh"], device = setup_mesh(options["mesh"], config_folder=root / "transformer", device=device)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None and torch.device(device).type == "cuda":
        dtype = torch.bfloat16  # DESIGN §4
    loaded = KineticOptimalScheduler.from_pretrained(root / "scheduler")
    vae = None
    if load_vae and (root / "vae").is_dir():
        from .vae import load_tokenizer

        vae = load_tokenizer(root / "vae", dtype=dtype, device=device, variant=variant)
        if vae.codebook_size != loaded.path.size:
            raise ValueError(f"root: {root / 'vae'} has a tokenizer of K={vae.codebook_size} codes but the "
                             f"codebook of {root / 'scheduler'} has K={loaded.path.size}")
    if transformer_weights is None:
        model = URSATransformer.from_pretrained(root / "transformer", dtype=dtype, device=device, variant=variant)
    else:
        from .checkpoint import read_weights

        cfg, state = read_weights(root / "transformer", dtype=dtype, device=device, overlay=transformer_weights)
        model = URSATransformer(cfg, device="meta")
        model.load_state_dict(state, strict=True, assign=True)
        model.requires_grad_(False)
    if vae is not None and dtype is None:
        vae.to(dtype=model.dtype)  # the engine's dtype: the transformer checkpoint's own
    sched = Scheduler(loaded.path, num_steps or 50, shift=loaded.shift if shift is None else shift)
    tokenizer = None
    if (root / "tokenizer" / "tokenizer.json").is_file():
        tokenizer = PromptTokenizer.from_pretrained(root / "tokenizer",
                                                    length=options.get("prompt_length", PROMPT_LENGTH))
    return cls(model, sched, tokenizer=tokenizer, default_steps=num_steps or "authors", vae=vae, **options)

