"""Request preparation for the continuous batcher (issue 14, issues 20 / 23): checks, budgets,
conditioning and previews; a request in, its :class:`~ursa_engine.serve.jobs.Job` out.

Everything runs in the caller's thread (an HTTP worker), before the job is queued: a bad request
is refused with a ValueError naming its field, and nothing of it reaches the worker thread.

The job's initial state is built by :func:`ursa_engine.inputs.prepare_inputs`, the function that
prepares :meth:`Engine.generate`'s inputs, with the request's ``n`` samples as its batch: the same
checks (every error names the field), the same initial tokens, seeds and conditioning (DESIGN §2.4:
frames written into the initial tokens, resampled at ``t = 1 − cond_noise_scale`` when asked;
inpainting's known tokens likewise), and the same frozen set ``(mask (1, n_tokens), values (n,
n_tokens))`` (frozen frames and known tokens, their union, known tokens winning) that the batcher
writes back after every step, so a conditioned request's tokens equal :meth:`Engine.generate`'s.
"""

from __future__ import annotations

import uuid

import torch

from .. import _validate
from ..inputs import prepare_inputs
from ..paths import MetricPath
from ..rowwise import guided_steps
from .jobs import GenerationRequest, Job


def prepare_job(batcher, request: GenerationRequest, job_id: str | None = None) -> Job:
    """Check ``request`` against ``batcher``'s budgets and build its job (see the module docstring).

    Raises ValueError naming the field (``latents_shape``, ``n``, ``lora``, ``cond_latents``,
    ``known_mask``, ``preview_steps``, ...) before anything is queued.
    """
    e = batcher.engine
    shape = _validate.latents_shape(request.latents_shape)
    n = request.n
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    batcher.check_size(shape, n)  # before anything is allocated
    if request.lora is not None and request.lora not in batcher.loras.adapters:
        have = ", ".join(batcher.loras.names) or "none"
        raise ValueError(f"lora: no adapter {request.lora!r} on this server (it has: {have})")
    sched = e.scheduler_for(request.num_steps, request.shift, shape[0])
    if sched.mask_sampler == "confidence":
        raise ValueError("sampler: the confidence sampler ranks whole samples; serve it with Engine.generate")
    gs = _validate.finite("guidance_scale", request.guidance_scale)
    gt = _validate.finite("guidance_trunc", request.guidance_trunc)
    skip = isinstance(sched.path, MetricPath) and sched.num_steps > 1
    guided = guided_steps(sched, gs, gt, skip_first=skip)
    peak = n * (2 if any(guided) else 1)
    if peak > batcher.max_rows:
        raise ValueError(f"n: {n} samples need {peak} rows per step, over this server's budget of "
                         f"{batcher.max_rows} (max_rows)")
    batcher.check_size(shape, n, peak)
    previews = preview_steps(request.preview_steps, sched.num_steps)
    conditioning = conditioning_options(request)
    negative = request.negative_ids[None] if request.negative_ids is not None else None
    inp = prepare_inputs(e, request.prompt_ids[None].expand(n, -1), negative, shape, guidance_scale=gs,
                         guidance_trunc=gt, num_steps=request.num_steps, shift=request.shift,
                         temperature=request.temperature, top_k=request.top_k, top_p=request.top_p, seed=request.seed,
                         **conditioning)
    neg = inp.neg if inp.neg is not None else inp.cond  # unguided at every step: never read
    job = Job(job_id or uuid.uuid4().hex, request, sched, guided, inp.x, inp.seeds, inp.cond.contiguous(),
              neg.contiguous(), k=1 if skip else 0, freeze=inp.freeze, previews=previews)
    job._event({"event": "queued"})
    return job


def preview_steps(steps, num_steps: int) -> frozenset:
    """The checked ``preview_steps``: ints in [1, ``num_steps``] (the ``"step"`` events' ``step``)."""
    if steps is None:
        return frozenset()
    if isinstance(steps, (str, bytes)) or not hasattr(steps, "__iter__"):
        raise ValueError(f"preview_steps: expected a list of step numbers, got {steps!r}")
    steps = list(steps)
    bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= num_steps]
    if bad:
        raise ValueError(f"preview_steps: expected ints in [1, {num_steps}] (the request's steps), got {bad}")
    return frozenset(steps)


def conditioning_options(request: GenerationRequest) -> dict:
    """The request's conditioning as :func:`~ursa_engine.inputs.prepare_inputs` keywords, checked for
    what a batcher request adds (already-encoded codes, options that need their tensor)."""
    for name, what in (("cond_latents", "integer codes"), ("known_tokens", "integer codes"),
                       ("known_mask", "a bool mask")):
        t = getattr(request, name)
        if t is None:
            continue
        mask = name == "known_mask"
        if (not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex()
                or (t.dtype == torch.bool and not mask)):
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a tensor of {what}, got {got}")
    if request.cond_latents is None:
        for name, off in (("cond_noise_scale", 0.0), ("freeze_cond", False)):
            if getattr(request, name) != off:
                raise ValueError(f"{name}: applies to cond_latents, which is not given")
    scale = request.cond_noise_scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 <= scale <= 1.0:
        raise ValueError(f"cond_noise_scale: expected a number in [0, 1], got {scale!r}")
    if not isinstance(request.freeze_cond, bool):
        raise ValueError(f"freeze_cond: expected a bool, got {request.freeze_cond!r}")
    return dict(cond_latents=request.cond_latents, cond_indices=request.cond_indices, cond_noise_scale=float(scale),
                freeze_cond=request.freeze_cond, known_tokens=request.known_tokens, known_mask=request.known_mask)


__all__ = ["conditioning_options", "prepare_job", "preview_steps"]
