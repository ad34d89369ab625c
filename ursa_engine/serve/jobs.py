"""The requests of the continuous batcher (issue 14): what a request asks, its job, the counters, and
how jobs sort and group into rows of one sampler call (:mod:`ursa_engine.serve.batcher`)."""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch


class QueueFull(RuntimeError):
    """The bounded queue is full (HTTP 429)."""


class Cancelled(RuntimeError):
    """The request was cancelled (DELETE, client disconnect or shutdown)."""


class Draining(RuntimeError):
    """The server is shutting down: it admits no new request (HTTP 503 + ``Retry-After``)."""


@dataclass
class GenerationRequest:
    """What one request asks for: ``n`` samples of one prompt (prompt ids already encoded).

    ``prompt_ids`` (P,) int64 and ``negative_ids`` (P,) (the empty prompt when None); sample ``b``
    uses seed ``seed + b`` (as :meth:`Engine.generate`). ``lora`` names an adapter registered with
    :meth:`Batcher.add_lora`: its cond and uncond rows get that adapter's delta (DESIGN §9).

    Conditioning (DESIGN §2.4), as :meth:`Engine.generate` takes it, already encoded to codes:

    - ``cond_latents`` (1 or n, Tc, h, w) int codes of known frames, ``cond_indices`` the frames they
      go to (default 0 .. Tc − 1), ``cond_noise_scale`` (resampled from the path at ``t = 1 − scale``)
      and ``freeze_cond`` (hold them at every step): image-to-video, video extension;
    - ``known_tokens`` (1 or n, T, h, w) codes and ``known_mask`` bool (T, h, w) (or 0/1 ints):
      inpainting, the tokens under the mask start at and hold ``known_tokens`` at every step.

    ``preview_steps``: 1-based step counts whose ``"step"`` event carries the model's current prediction
    of the clean tokens, x̂1 of that step's model call (``"tokens"``, a CPU int64 (n, T, h, w) copy, frozen
    tokens written in; decoded by the caller, never in the worker thread: :mod:`ursa_engine.serve.step`).
    A step without a model call (step 1 of the metric path, the identity) has no x̂1: it is not previewed.
    """

    prompt_ids: torch.Tensor
    latents_shape: tuple[int, int, int]
    negative_ids: torch.Tensor | None = None
    n: int = 1
    num_steps: int | None = None
    shift: float | None = None
    guidance_scale: float = 7.0
    guidance_trunc: float = 0.9
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    argmax_last: bool = False
    seed: int = 0
    lora: str | None = None  # a per-request adapter of the batcher (Batcher.add_lora), or the model as loaded
    cond_latents: torch.Tensor | None = None  # (1 or n, Tc, h, w) codes of known frames
    cond_indices: tuple[int, ...] | None = None  # the frames they go to (default 0 .. Tc - 1)
    cond_noise_scale: float = 0.0  # given frames resampled at t = 1 - scale
    freeze_cond: bool = False  # hold the given frames at every step
    known_tokens: torch.Tensor | None = None  # (1 or n, T, h, w) codes held under known_mask
    known_mask: torch.Tensor | None = None  # bool (T, h, w)
    preview_steps: tuple[int, ...] = ()  # 1-based steps whose "step" event carries x̂1 (the prediction)


@dataclass(eq=False)  # identity semantics: jobs are compared (queue.remove, `in`) as objects, never by tensors
class Job:
    """A request inside the batcher: its rows (tokens, seeds, ids), its step, its events."""

    id: str
    request: GenerationRequest
    sched: object
    guided: list
    x: torch.Tensor  # (n, tokens)
    seeds: torch.Tensor  # (n,)
    cond_ids: torch.Tensor  # (n, P)
    neg_ids: torch.Tensor  # (n, P)
    k: int = 0
    status: str = "queued"  # queued, running, done, cancelled, failed
    future: Future = field(default_factory=Future)
    events: list = field(default_factory=list)
    listeners: list = field(default_factory=list)
    t_submit: float = field(default_factory=time.perf_counter)
    t_start: float | None = None
    t_done: float | None = None
    cancel_requested: bool = False
    cancel_reason: str | None = None  # the notice of a cancel by the server (drain), else a plain cancel
    freeze: tuple | None = None  # (mask (1, tokens) bool, values (n, tokens)): written back after every step
    previews: frozenset = frozenset()  # steps whose "step" event carries x̂1
    preview: torch.Tensor | None = None  # (n, tokens) x̂1 of the step that runs now, when it previews

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.request.latents_shape

    @property
    def steps(self) -> int:
        return self.sched.num_steps

    def _event(self, event: dict) -> None:
        """Record an event and tell the listeners (called under the batcher's lock)."""
        event = dict(event, id=self.id)
        self.events.append(event)
        for fn in list(self.listeners):
            try:
                fn(event)
            except Exception:  # a listener (a closed HTTP stream) never breaks the loop
                if fn in self.listeners:
                    self.listeners.remove(fn)

    def take_preview(self) -> torch.Tensor | None:
        """A CPU int64 copy of the x̂1 of the step just run, (n, T, h, w), or None when it did not
        preview (``preview_steps``); the buffer is released."""
        x1, self.preview = self.preview, None
        return None if x1 is None else x1.view(self.request.n, *self.shape).to("cpu", torch.int64, copy=True)

    def drop_previews(self) -> None:
        """Forget the preview tokens of the stored events (the dicts listeners got stay as they were)."""
        self.events = [{k: v for k, v in e.items() if k != "tokens"} if "tokens" in e else e for e in self.events]

    def rows_now(self) -> int:
        """Forward rows this job costs at its current step (cond, plus uncond while guided)."""
        return self.request.n * (2 if self.guided[self.k] else 1)

    def resolve(self, result=None, error: BaseException | None = None) -> None:
        """Set the future's result (or exception) unless it is already done: a client may have
        cancelled it (``asyncio.wrap_future`` cancels the concurrent future with its handler)."""
        if self.future.done():
            return
        try:
            if error is None:
                self.future.set_result(result)
            else:
                self.future.set_exception(error)
        except Exception:  # cancelled between the check and the set (InvalidStateError)
            pass


class Metrics:
    """Counters of the batch loop (read by ``/metrics``)."""

    def __init__(self):
        self.steps = 0
        self.rows = 0  # summed over steps
        self.last_rows = 0
        self.step_seconds = 0.0
        self.last_step_seconds = 0.0
        self.served = 0
        self.failed = 0
        self.cancelled = 0
        self.rejected = 0
        self.max_rows_seen = 0
        self.loop_errors = 0  # iterations of the loop that raised outside a step (their jobs failed)
        self.ended_twice = 0  # _finish calls on a job that had already ended (a bug if ever non-zero)


def rep(values: list, reps: list[int]) -> list:
    return [v for v, r in zip(values, reps, strict=True) for _ in range(r)]


def options_key(job: Job) -> tuple:
    """What rows of one per-row sampler call share: guidance now, scheduler and filtering options."""
    rq = job.request
    return (not job.guided[job.k], id(job.sched), rq.top_k, rq.top_p, rq.argmax_last)


def step_key(job: Job) -> tuple:
    """What rows of one scalar-k sampler call share: :func:`options_key`, plus the step, guidance and
    temperature. Sorting by it puts guided jobs first and jobs of one call side by side."""
    rq = job.request
    return (*options_key(job), job.k, rq.guidance_scale, rq.guidance_trunc, rq.temperature)


def row_groups(jobs: list[Job], *, by_step: bool):
    """(start, end, jobs) runs of consecutive jobs sharing :func:`options_key` (``by_step``:
    :func:`step_key`, one scalar-k sampler call)."""
    out, r = [], 0
    key_of = step_key if by_step else options_key
    for job in jobs:
        key = key_of(job)
        if out and out[-1][3] == key:
            out[-1][1] += job.request.n
            out[-1][2].append(job)
        else:
            out.append([r, r + job.request.n, [job], key])
        r += job.request.n
    return [(a, b, g) for a, b, g, _ in out]
