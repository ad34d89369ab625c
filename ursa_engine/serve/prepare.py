"""Request preparation for the continuous batcher (issue 14, issues 20 / 23): checks, budgets,
conditioning and previews; a request in, its :class:`~ursa_engine.serve.jobs.Job` out.

Everything runs in the caller's thread (an HTTP worker), before the job is queued: a bad request
is refused with a ValueError naming its field, and nothing of it reaches the worker thread.

The job's initial state is built by :func:`ursa_engine.inputs.prepare_inputs`, the function that
prepares :meth:`Engine.generate`'s inputs, with the request's ``n`` samples as its batch: the same
checks (every error names the field), the same initial tokens, seeds and conditioning (DESIGN §2.4:
frames written into the initial tokens, resampled at ``t = 1 − cond_noise_scale`` when asked), and
the same frozen set ``(mask (1, n_tokens), values (n, n_tokens))`` that the batcher writes back
after every step, so a conditioned request's tokens equal :meth:`Engine.generate`'s.
"""

from __future__ import annotations

import inspect
import uuid

import torch

from .. import _validate
from ..inputs import prepare_inputs
from ..paths import MetricPath
from ..rowwise import guided_steps
from .jobs import GenerationRequest, Job

# Engine.generate's token-level inpainting (known_tokens / known_mask) is prepared by prepare_inputs
# once it takes them; until then :func:`_hold_known` gives the same initial state and frozen set.
_INPUTS_INPAINT = "known_tokens" in inspect.signature(prepare_inputs).parameters


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
    known = {k: conditioning.pop(k) for k in ("known_tokens", "known_mask")}
    if _INPUTS_INPAINT:
        conditioning.update(known)
    negative = request.negative_ids[None] if request.negative_ids is not None else None
    inp = prepare_inputs(e, request.prompt_ids[None].expand(n, -1), negative, shape, guidance_scale=gs,
                         guidance_trunc=gt, num_steps=request.num_steps, shift=request.shift,
                         temperature=request.temperature, top_k=request.top_k, top_p=request.top_p, seed=request.seed,
                         **conditioning)
    x, freeze = inp.x, inp.freeze
    if not _INPUTS_INPAINT and known["known_tokens"] is not None:
        x, freeze = _hold_known(known["known_tokens"], known["known_mask"], x, freeze, shape, sched.path.size)
    neg = inp.neg if inp.neg is not None else inp.cond  # unguided at every step: never read
    job = Job(job_id or uuid.uuid4().hex, request, sched, guided, x, inp.seeds, inp.cond.contiguous(),
              neg.contiguous(), k=1 if skip else 0, freeze=freeze, previews=previews)
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
    for name in ("cond_latents", "known_tokens"):
        codes = getattr(request, name)
        if codes is not None and (not isinstance(codes, torch.Tensor) or codes.is_floating_point()
                                  or codes.is_complex() or codes.dtype == torch.bool):
            what = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise ValueError(f"{name}: expected a tensor of integer codes, got {what}")
    if (request.known_tokens is None) != (request.known_mask is None):
        given, missing = ("known_tokens", "known_mask") if request.known_mask is None else ("known_mask",
                                                                                            "known_tokens")
        raise ValueError(f"{missing}: {given} is given without it (inpainting needs both)")
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


def _hold_known(known_tokens, known_mask, x: torch.Tensor, freeze, shape, K: int):
    """Inpainting's initial tokens and frozen set, for a ``prepare_inputs`` that does not take
    ``known_tokens`` yet: the masked tokens start at and hold the known codes; the frozen set is
    the union with the frozen frames (known tokens win where both give a value).

    Parameters
    ----------
    known_tokens : (1 or B, T, h, w) integer codes in [0, K)
    known_mask : bool (T, h, w) or (1, T, h, w)
    x : (B, n) initial tokens; freeze : the frames' (mask (1, n), values (B, n)) or None

    Returns
    -------
    (x (B, n), freeze (mask (1, n), values (B, n)))
    """
    B, n = x.shape
    codes = known_tokens.to(x.device)
    codes = codes[None] if codes.dim() == 3 else codes
    if codes.dim() != 4 or codes.shape[0] not in (1, B) or tuple(codes.shape[1:]) != tuple(shape):
        raise ValueError(f"known_tokens: expected (1 or {B}, {', '.join(map(str, shape))}) codes, "
                         f"got {tuple(codes.shape)}")
    if codes.numel() and (codes.min() < 0 or codes.max() >= K):
        raise ValueError(f"known_tokens: codes must lie in [0, {K})")
    mask = torch.as_tensor(known_mask, device=x.device)
    if mask.dtype != torch.bool:
        raise ValueError(f"known_mask: expected a bool tensor, got {mask.dtype}")
    mask = mask[0] if mask.dim() == 4 and mask.shape[0] == 1 else mask
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"known_mask: expected shape {tuple(shape)}, got {tuple(known_mask.shape)}")
    mask = mask.reshape(1, n)
    values = codes.long().reshape(-1, n).expand(B, n)
    x = torch.where(mask, values, x)
    if freeze is not None:
        values = torch.where(mask, values, freeze[1])
        mask = mask | freeze[0]
    return x.contiguous(), (mask, values.contiguous())


__all__ = ["conditioning_options", "prepare_job", "preview_steps"]
