"""One step of the continuous batch (issue 14, DESIGN §8): the rows of the running jobs of one latent
shape through one forward pass and their per-row sampler steps (:class:`~ursa_engine.serve.batcher.Batcher`
runs it from its worker thread).

Rows are ordered guided jobs first (their unconditional rows ``R .. R + G`` align with conditional
rows ``0 .. G``), then by sampler options and adapter (:func:`~ursa_engine.serve.jobs.step_key`).
After the step (eager, or a CUDA-graph replay of :mod:`ursa_engine.serve.graphs`) every job takes
its rows back and its frozen tokens (conditioning frames, inpainting's known tokens: DESIGN §2.4)
are written back over them, as :meth:`Engine.generate` does after each step; the write-back is
outside the captured graph, so conditioned and plain jobs share forward passes and graph buckets.

Previews (issue 23: streamed partial images): a job whose 1-based step ``k + 1`` is one of its
``preview_steps`` also gets the model's prediction of its clean tokens at this step, x̂1, drawn by
:meth:`Scheduler.draw <ursa_engine.scheduler.Scheduler.draw>` on the same logits with the step's own
uniforms (lane 0 of DESIGN §2.5: its seeds, step and token indices; its guidance, temperature,
filtering and ``argmax_last``), token range by token range, into ``job.preview`` (n, tokens), frozen
tokens written in. The draw is a read beside the step: the step's tokens are the same with or without
it. Such a step runs eagerly (:meth:`GraphCache.usable <ursa_engine.serve.graphs.GraphCache.usable>`
says no): a graph replay never exposes its logits.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch

from ..model import latent_positions, sequence_ids, token_chunks
from .jobs import Job, rep, row_groups, step_key

ROPE_CACHE = 8  # (prompt length, shape) rope tables kept


def forward_and_step(batcher, jobs: list[Job]) -> int:
    """One step of ``jobs`` (one latent shape): each job's ``x`` becomes its next tokens (frozen
    tokens written back). Returns the forward pass's rows (cond + uncond)."""
    model = batcher.engine.model
    # guided jobs first: their uncond rows R .. R + G align with cond rows 0 .. G; within one
    # sampler group the rows of one adapter side by side (one run each for the segmented matmul)
    jobs = sorted(jobs, key=lambda j: (*step_key(j), j.request.lora or ""))
    shape = jobs[0].shape
    n = math.prod(shape)
    x = torch.cat([j.x for j in jobs])  # (R, n)
    R = x.shape[0]
    guided_jobs = [j for j in jobs if j.guided[j.k]]
    G = sum(j.request.n for j in guided_jobs)
    ids = torch.cat([j.cond_ids for j in jobs] + [j.neg_ids for j in guided_jobs])
    P = ids.shape[1]
    latents = torch.cat([x, x[:G]]) if G else x
    ids = sequence_ids(ids, latents, model.config)
    rope = rope_for(batcher, P, shape)
    for j in jobs:  # x̂1 buffers of the jobs that preview this step (filled by the eager step)
        j.preview = torch.empty_like(j.x) if j.k + 1 in j.previews else None
    if batcher.graphs is not None and batcher.graphs.usable(jobs):
        x_next = batcher.graphs.run(jobs, ids, x, G, rope)
    else:
        cond = rep([j.request.lora for j in jobs], [j.request.n for j in jobs])
        with batcher.loras.rows(cond + cond[:G]):  # uncond rows R + i take cond row i's adapter
            x_next = eager_step(batcher, jobs, ids, x, G, rope, n)
    r = 0
    for j in jobs:
        rows = x_next[r : r + j.request.n]
        if j.freeze is not None:  # Engine.generate's write-back (LoopState.body): given tokens hold
            mask, values = j.freeze
            rows = torch.where(mask, values, rows)
            if j.preview is not None:  # known tokens are known in the prediction too
                j.preview = torch.where(mask, values, j.preview)
        j.x = rows
        r += j.request.n
    return R + G


def eager_step(batcher, jobs: list[Job], ids, x, G: int, rope, n: int) -> torch.Tensor:
    """The step without graphs: hidden states of all rows, then the head and the sampler by token
    ranges within the engine's logits budget. Returns x_next (R, n)."""
    model = batcher.engine.model
    R = x.shape[0]
    hidden = model.hidden_states(ids, rope=rope, latent_tokens=n)  # (R + G, n, H)
    x_next = torch.empty_like(x)
    K, itemsize = model.config.lm_head_size, model.dtype.itemsize
    groups = row_groups(jobs, by_step=not batcher.per_row_sampler)
    for s, e in token_chunks(n, (R + G) * K * itemsize, batcher.engine.logits_budget):
        logits = model.lm_head(hidden[:, s:e])
        xs = x[:, s:e].contiguous()
        out = torch.empty_like(xs)
        for a, b, group in groups:
            sampler_step(batcher, group, logits, xs, out, a, b, R, s)
            preview_draws(batcher, group, logits, xs, a, R, s)
        x_next[:, s:e] = out
    return x_next


def sampler_step(batcher, group, logits, xs, out, a: int, b: int, R: int, s: int) -> None:
    """Rows [a, b): one scheduler, one filtering, all guided or none. With ``per_row_sampler``
    the per-row step (each row's k, scale, temperature and last flag); else the jobs of the
    group share all of them too and one scalar-k step runs them (fewer launches; the same
    tokens, §2.5: tests/test_serve_batcher.py)."""
    j0 = group[0]
    rq = j0.request
    guided = j0.guided[j0.k]
    seeds = torch.cat([j.seeds for j in group])
    common = dict(uncond_logits=logits[R + a : R + b] if guided else None, top_k=rq.top_k, top_p=rq.top_p,
                  argmax_last=rq.argmax_last, seed=seeds, token_offset=s, backend=batcher.backend,
                  validate=batcher.engine.validate_steps, out=out[a:b])
    if not batcher.per_row_sampler:
        j0.sched.step(logits[a:b], j0.k, xs[a:b], guidance_scale=rq.guidance_scale,
                      guidance_trunc=rq.guidance_trunc, temperature=rq.temperature, **common)
        return
    reps = [j.request.n for j in group]
    k = torch.tensor(rep([j.k for j in group], reps), dtype=torch.int64, device=xs.device)
    j0.sched.step(logits[a:b], k, xs[a:b], guided=[guided] * (b - a) if guided else None,
                  last=rep([j.k == j.steps - 1 for j in group], reps),
                  guidance_scale=rep([j.request.guidance_scale for j in group], reps),
                  temperature=rep([j.request.temperature for j in group], reps), **common)


def preview_draws(batcher, group, logits, xs, a: int, R: int, s: int) -> None:
    """x̂1 of tokens [s, s + xs.shape[1]) for the jobs of ``group`` (rows from ``a``) that preview
    this step, into ``job.preview``: :meth:`Scheduler.draw` at the job's own step ``k`` (a python int)
    with the step's arguments (its cond rows, the matching uncond rows ``R + r`` while guided, its seeds,
    ``token_offset=s``), so the same uniforms as the step's own draw (DESIGN §2.5)."""
    r, e = a, s + xs.shape[1]
    for j in group:
        n, rq = j.request.n, j.request
        if j.preview is not None:
            guided = j.guided[j.k]
            j.preview[:, s:e] = j.sched.draw(
                logits[r : r + n], j.k, xs[r : r + n], uncond_logits=logits[R + r : R + r + n] if guided else None,
                guidance_scale=rq.guidance_scale, guidance_trunc=rq.guidance_trunc, temperature=rq.temperature,
                top_k=rq.top_k, top_p=rq.top_p, argmax_last=rq.argmax_last, seed=j.seeds, token_offset=s,
                backend=batcher.backend, validate=batcher.engine.validate_steps)
        r += n


def rope_for(batcher, P: int, shape):
    """The rope tables of (prompt length, shape), the last :data:`ROPE_CACHE` kept (``batcher._rope``)."""
    cache: OrderedDict = batcher._rope
    key = (P, shape)
    if key in cache:
        cache.move_to_end(key)
    else:
        cache[key] = batcher.engine.model.rope_tables(latent_positions(P, shape, device=batcher.engine.device))
        while len(cache) > ROPE_CACHE:
            cache.popitem(last=False)
    return cache[key]


__all__ = ["ROPE_CACHE", "eager_step", "forward_and_step", "preview_draws", "rope_for", "sampler_step"]
