"""A generation's inputs, prepared once for every runner (DESIGN §4, §8).

:meth:`Engine.generate` (one process) and :mod:`ursa_engine.distributed.generate` (a mesh) build
the same whole-batch inputs with the same checks, in the same order: prompt ids, the guided steps,
negative prompt ids, per-sample seeds ``seed + b``, initial tokens, conditioning frames, known tokens
(inpainting). All of it
is cheap and deterministic, so every rank of a mesh prepares it in full and keeps its part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import _validate, conditioning
from .paths import MetricPath


@dataclass
class GenerationInputs:
    cond: torch.Tensor            # (B, P) prompt ids
    neg: torch.Tensor | None      # (B, P) negative prompt ids, when any step is guided
    seeds: torch.Tensor           # (B,) per-sample RNG keys
    x: torch.Tensor               # (B, n) initial tokens (conditioning frames written in)
    freeze: tuple | None          # (mask (1, n) bool, values (B, n)) of frozen tokens: frames and known tokens
    sched: object                 # the Scheduler of this call
    guided: list[bool]            # per step: guidance on
    skip_first: bool              # metric path: step 0 is the identity (t_0 = 0, no model call)
    shape: tuple[int, ...]        # (T, H, W)
    n: int                        # tokens per sample
    B: int
    opts: dict                    # sampler options: guidance_scale, guidance_trunc, temperature, top_k, top_p

    @property
    def use_cfg(self) -> bool:
        return any(self.guided)


def prepare_inputs(engine, prompt_ids, negative_prompt_ids=None, latents_shape=(1, 40, 64), *,
                   guidance_scale=7.0, guidance_trunc=0.9, num_steps=None, shift=None, temperature=1.0, top_k=0,
                   top_p=1.0, seed=0, motion=None, cond_latents=None, cond_indices=None, cond_noise_scale=0.0,
                   freeze_cond=False, latents=None, image=None, video=None, num_cond_frames=None,
                   prompt_length=None, known_tokens=None, known_mask=None) -> GenerationInputs:
    """Check the options of :meth:`Engine.generate` and build the whole batch's inputs.

    Frozen tokens (DESIGN §2.4): the conditioning frames when ``freeze_cond``, and the
    ``known_mask`` tokens (inpainting), always. They are the union of both; where both give a value
    the known token wins. ``freeze`` is None when nothing is frozen (an empty ``known_mask`` runs
    exactly as a plain generation); its mask and values are contiguous tensors of their own
    (a graph runner copies a new call's into its static buffers).
    """
    device = engine.device
    _validate.positive("temperature", temperature)  # before anything runs (the sampler checks too late)
    _validate.filtering(top_k, top_p, engine.scheduler.path.size)
    shape = _validate.latents_shape(latents_shape)
    n = math.prod(shape)
    cond = engine.encode_prompts(prompt_ids, motion=motion, length=prompt_length)
    B = cond.shape[0]
    guidance_scale, guidance_trunc = float(guidance_scale), float(guidance_trunc)
    if not math.isfinite(guidance_scale) or not math.isfinite(guidance_trunc):
        raise ValueError(f"guidance_scale / guidance_trunc: must be finite, got {guidance_scale}, {guidance_trunc}")
    sched = engine.scheduler_for(num_steps, shift, shape[0])
    N = sched.num_steps
    guided = [guidance_scale != 1.0 and float(sched.times[k]) < guidance_trunc for k in range(N)]
    skip_first = isinstance(sched.path, MetricPath) and N > 1
    if skip_first:
        guided[0] = False
    neg = None
    if any(guided):
        neg = negative_prompt_ids if negative_prompt_ids is not None else [[]]
        neg = engine.encode_prompts(neg, name="negative_prompt_ids", length=cond.shape[1])
        if neg.shape[0] not in (1, B):
            raise ValueError(f"negative_prompt_ids: expected 1 or {B} prompts, got {neg.shape[0]}")
        neg = neg.expand(B, -1)
    seeds = engine.sample_seeds(seed, B)
    if latents is None:
        x = engine.initial_tokens(B, shape, seed)
    else:
        x = torch.as_tensor(latents, device=device)
        if tuple(x.shape) != (B, *shape) or x.is_floating_point():
            raise ValueError(f"latents: expected integer tokens of shape {(B, *shape)}, got {tuple(x.shape)}")
        if x.min() < 0 or x.max() >= sched.path.size:
            raise ValueError(f"latents: tokens must lie in [0, {sched.path.size})")
        x = x.long().clone()
    if image is not None or video is not None:
        if cond_latents is not None:
            raise ValueError("cond_latents: give conditioning as tokens (cond_latents) or as pixels (image= / "
                             "video=), not both")
        cond_latents = engine.encode_condition(image=image, video=video, latents_shape=shape,
                                               num_cond_frames=num_cond_frames, batch=B)
    elif num_cond_frames is not None:
        raise ValueError("num_cond_frames: applies to video= only")
    frozen = values = None  # (T, H, W) bool, (B, T, H, W)
    if cond_latents is not None:
        mask, values = conditioning.condition_frames(cond_latents, cond_indices, B, shape, engine.scheduler.path,
                                                     float(cond_noise_scale), seeds)
        x = torch.where(mask[None, :, None, None], values, x)
        if freeze_cond:
            frozen = mask[:, None, None].expand(shape)
    elif cond_indices is not None:
        raise ValueError("cond_indices: given without cond_latents")
    if known_tokens is not None or known_mask is not None:
        known, known_values = conditioning.known_region(known_tokens, known_mask, B, shape, sched.path.size, device)
        if known.any():  # an empty region: nothing to hold, the plain generation
            x = torch.where(known, known_values, x)
            values = known_values if frozen is None else torch.where(known, known_values, values)
            frozen = known if frozen is None else frozen | known
    freeze = None
    if frozen is not None:
        freeze = (frozen.reshape(1, n).contiguous(), values.reshape(B, n).contiguous())
    opts = {"guidance_scale": guidance_scale, "guidance_trunc": guidance_trunc, "temperature": temperature,
            "top_k": top_k, "top_p": top_p}
    return GenerationInputs(cond=cond, neg=neg, seeds=seeds, x=x.reshape(B, n).contiguous(), freeze=freeze,
                            sched=sched, guided=guided, skip_first=skip_first, shape=shape, n=n, B=B, opts=opts)
