"""Step-level continuous batching over an :class:`~ursa_engine.engine.Engine` (issue 14, DESIGN §8).

The URSA transformer has no timestep input: a token sequence is a token sequence at any step, so
requests at *different* steps share one forward pass. One worker thread owns the loop; every
iteration is one step of the running batch of one latent shape:

1. **Join / leave at step boundaries**: queued requests of that shape join while the rows fit the
   budget (``max_rows``: rows of one forward pass, cond + uncond); finished or cancelled ones leave.
2. **One forward pass**: the conditional rows of every request, plus the unconditional rows of the
   requests still guided at their own step (``guidance_scale != 1`` and ``t_k < guidance_trunc``,
   as :meth:`Engine.generate`): rows past ``guidance_trunc`` stop paying for the unconditional half.
3. **Per-row sampler step**: :func:`ursa_engine.rowwise.step_rows` with each row's own ``k``,
   guidance scale, temperature, last-step flag and seeds (``seed + b``, as the engine's).

A request's tokens do not depend on its neighbours (DESIGN §2.5): every draw is keyed by (sample
seed, its step, token index, lane), and the transformer treats rows independently; they equal
:meth:`Engine.generate`'s for the same prompt, seed and options (up to the float ties of §2.5
where a batched matmul rounds differently from another batch size).

Policies (for the benchmark): ``"continuous"`` (above), ``"static"`` (a batch is admitted only
when nothing runs, and runs to its end) and ``"sequential"`` (one request at a time).

CUDA graphs (``graphs=True`` on a CUDA engine): see :mod:`ursa_engine.serve.graphs`. The step itself
(rows, forward pass, sampler calls) is :mod:`ursa_engine.serve.step`; checking a request and building
its job is :mod:`ursa_engine.serve.prepare`.

Conditioning (issues 20 / 23, DESIGN §2.4): a request may carry known frames (``cond_latents``, image
to video, video extension) and known tokens (``known_tokens`` / ``known_mask``, inpainting), already
encoded. They are written into the job's initial tokens and, when frozen, written back over its rows
after every step, as :meth:`Engine.generate` does: conditioned and plain jobs share forward passes.
Previews: for each step of ``preview_steps`` the ``"step"`` event carries ``"tokens"``, a CPU int64
(n, T, h, w) copy of the model's prediction of the clean tokens at that step (x̂1, drawn with the
step's own uniforms beside the step: :mod:`ursa_engine.serve.step`; frozen tokens written in), not
the noisy state. Decoding is the caller's, off this thread. On the metric path step 1 is the identity
(no model call, no x̂1, no ``"step"`` event): a preview asked there is dropped. At the last step x̂1
is the last call's draw; on the metric path that step lands on x̂1, so it equals the result.
A finished job keeps its preview tokens in its stored events while it is one of the last
:data:`PREVIEW_JOBS` finished (for a subscriber that comes late), then only the events.

Adapters per request (issue 19, DESIGN §9): :meth:`Batcher.add_lora` registers LoRA adapters by
name; a request's ``lora`` picks one (or none). Rows of different adapters share the forward pass:
each adapter's low-rank delta is applied unmerged to its own rows (cond and uncond rows of a
request alike; :class:`ursa_engine.adapters.RowAdapters`, a segmented matmul per contiguous run of
rows: jobs are ordered so that the rows of one adapter sit side by side). Adapters merged into the
engine (:meth:`Engine.load_lora`) are part of the served model: per-request deltas add to them.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import OrderedDict, deque

import torch

from .jobs import Cancelled, Draining, GenerationRequest, Job, Metrics, QueueFull
from .prepare import prepare_job
from .step import forward_and_step

POLICIES = ("continuous", "static", "sequential")
URSA_VIDEO_TOKENS = 13 * 40 * 64  # the latent grid of an URSA 49-frame 320x512 video
DEFAULT_MAX_TOKENS = 4 * URSA_VIDEO_TOKENS  # a guided pair of such videos: 4 rows (cond + uncond) of one pass
RECENT_JOBS = 128  # finished jobs GET can still report
PREVIEW_JOBS = 8  # finished jobs whose stored events keep their preview tokens (a late subscriber's)

__all__ = ["POLICIES", "Batcher", "Cancelled", "Draining", "GenerationRequest", "Job", "QueueFull"]


class Batcher:
    """The continuous batch loop of one engine, in one worker thread.

    Parameters
    ----------
    engine : Engine (eager steps; ``graphs=True`` uses CUDA graphs per (rows, shape) bucket)
    max_rows : rows of one forward pass (cond + uncond), the per-step budget
    max_queue : requests waiting to start; more raise :class:`QueueFull`
    max_tokens : latent tokens x rows of one forward pass (the activations scale with it): a request
        over it is refused before anything is allocated, and joins never take a step over it
        (default: 4 x 13x40x64, a guided pair of URSA 49-frame videos)
    policy : "continuous", "static" or "sequential"
    backend : the sampler backend (default: the engine's)
    graphs : CUDA graphs per (rows, shape) bucket (:mod:`.graphs`; CUDA engines only)
    per_row_sampler : every sampler call through :func:`ursa_engine.rowwise.step_rows` (each row its
        own k); default: jobs at the same step and options share one scalar-k call (same tokens)
    loras : per-request adapters, ``{name: folder}`` or ``{name: (folder, scale)}`` (see :meth:`add_lora`)
    """

    def __init__(self, engine, *, max_rows: int = 16, max_queue: int = 64, max_tokens: int = DEFAULT_MAX_TOKENS,
                 policy: str = "continuous", backend: str | None = None, graphs: bool = False,
                 per_row_sampler: bool = False, loras: dict | None = None):
        if policy not in POLICIES:
            raise ValueError(f"policy: expected one of {POLICIES}, got {policy!r}")
        for name, v in (("max_rows", max_rows), ("max_queue", max_queue), ("max_tokens", max_tokens)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        self.engine, self.max_rows, self.max_queue, self.policy = engine, max_rows, max_queue, policy
        self.max_tokens = max_tokens
        self.backend = backend or engine.sampler_backend
        self.per_row_sampler = per_row_sampler
        self.metrics = Metrics()
        self._queue: deque[Job] = deque()
        self._running: list[Job] = []
        self._jobs: dict[str, Job] = {}
        self._recent: OrderedDict[str, Job] = OrderedDict()  # finished jobs, for GET
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._draining: float | None = None  # the drain's deadline (time.monotonic()) once drain() began
        self._rope: OrderedDict = OrderedDict()
        self._turn = itertools.count()
        from ..adapters import RowAdapters

        self.loras = RowAdapters(engine.model)
        for name, spec in (loras or {}).items():
            path, scale = spec if isinstance(spec, tuple) else (spec, 1.0)
            self.add_lora(name, path, scale)
        self.graphs = None
        if graphs:
            from .graphs import GraphCache

            self.graphs = GraphCache(self)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Batcher:
        if self._thread is None or not self._thread.is_alive():
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="ursa-batcher", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        thread = self._thread  # one read: a concurrent stop() (a second SIGTERM) may clear it meanwhile
        if thread is not None:
            thread.join(timeout)
            with self._lock:  # else keep it: a later start() must not run a second worker
                if self._thread is thread and not thread.is_alive():
                    self._thread = None

    @property
    def draining(self) -> bool:
        """Whether :meth:`drain` began: new requests are refused with :class:`Draining`."""
        return self._draining is not None

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the drain's time left (at least 1)."""
        left = 0.0 if self._draining is None else self._draining - time.monotonic()
        return max(1, math.ceil(left))

    def drain(self, grace: float = 30.0, *, settle: float = 10.0) -> dict:
        """Stop admitting, let the accepted jobs (queued and running) finish within ``grace`` seconds,
        then cancel the rest with a notice (their rows leave at the next step boundary; ``settle``
        seconds more for that step to end, after which :meth:`stop` ends what is left, with the same
        kind of notice). Returns ``{"done", "failed", "cancelled"}``: how the jobs pending at the
        start of the drain ended (a job ends exactly once: :meth:`_finish`)."""
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not grace >= 0:
            raise ValueError(f"grace: expected seconds >= 0, got {grace!r}")
        with self._lock:
            self._draining = time.monotonic() + grace
            pending = list(self._queue) + list(self._running)
            self._lock.notify_all()

            def busy() -> bool:
                return bool(self._queue or self._running) and self.alive

            self._lock.wait_for(lambda: not busy(), timeout=grace)
            if busy():
                notice = (f"the server is shutting down: not finished within its {grace:g} s drain "
                          "(--drain-seconds); resubmit it")
                for job in list(self._queue):
                    self._queue.remove(job)
                    self._finish(job, "cancelled", Cancelled(notice))
                for job in self._running:
                    job.cancel_requested, job.cancel_reason = True, notice
                self._lock.notify_all()
                self._lock.wait_for(lambda: not busy(), timeout=settle)
        if self._queue or self._running:
            self.stop()
        counts = {"done": 0, "failed": 0, "cancelled": 0}
        for job in pending:
            if job.status in counts:
                counts[job.status] += 1
        return counts

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs (``/health`` answers 503 when not)."""
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------ adapters
    def add_lora(self, name: str, path, scale: float = 1.0) -> None:
        """Register a PEFT LoRA folder (or :class:`~ursa_engine.adapters.LoRAWeights`) that requests pick
        by ``lora=name``; applied unmerged to their rows only, times ``scale``."""
        with self._lock:
            self.loras.add(name, path, scale)

    def remove_lora(self, name: str) -> None:
        """Forget an adapter; refused while a queued or running request uses it."""
        with self._lock:
            users = [j.id for j in list(self._queue) + self._running if j.request.lora == name]
            if users:
                raise ValueError(f"name: adapter {name!r} is used by {len(users)} pending request(s)")
            self.loras.remove(name)

    # ------------------------------------------------------------------ requests
    def check_size(self, shape, n: int, rows: int | None = None, *, field: str = "latents_shape") -> None:
        """Refuse a request over ``max_tokens`` (``n`` samples of ``shape``; ``rows`` forward rows at its
        peak, default ``n``) before anything is allocated; the ValueError names ``field``."""
        tokens = math.prod(shape)
        rows = n if rows is None else rows
        if rows * tokens > self.max_tokens:
            grid = "x".join(str(v) for v in shape)
            raise ValueError(f"{field}: {n} sample(s) of {grid} = {tokens} latent tokens need {rows} rows x {tokens} "
                             f"= {rows * tokens} token-rows per step, over this server's limit of {self.max_tokens} "
                             "(max_tokens): ask for a smaller size, fewer frames or a smaller n")

    def check_queue(self) -> None:
        """Raise :class:`QueueFull` now when the queue is full (cheap, before preparing a request;
        :meth:`submit` checks again)."""
        with self._lock:
            if self._draining is not None:
                raise Draining(f"the server is shutting down: it takes no new request; retry in {self.retry_after()} s "
                               "(on a restarted server)")
            if len(self._queue) >= self.max_queue:
                self.metrics.rejected += 1
                raise QueueFull(f"queue full: {len(self._queue)} requests waiting (limit {self.max_queue}); "
                                "retry later")

    def prepare(self, request: GenerationRequest, job_id: str | None = None) -> Job:
        """Check a request and build its job (initial tokens with the conditioning written in, frozen
        tokens, seeds, ids, previews: :func:`ursa_engine.serve.prepare.prepare_job`); raises ValueError
        naming the field."""
        return prepare_job(self, request, job_id)

    def submit(self, request: GenerationRequest | Job, job_id: str | None = None) -> Job:
        """Queue a request (or a prepared job); raises :class:`QueueFull` over ``max_queue``."""
        job = request if isinstance(request, Job) else self.prepare(request, job_id)
        with self._lock:
            self.check_queue()
            if job.id in self._jobs:
                raise ValueError(f"request_id: {job.id!r} is already in use")
            self._recent.pop(job.id, None)
            self._jobs[job.id] = job
            self._queue.append(job)
            self._lock.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        """A queued or running job, or one of the last finished ones (its final status)."""
        with self._lock:
            return self._jobs.get(job_id) or self._recent.get(job_id)

    def cancel(self, job_id: str) -> str | None:
        """Cancel a queued or running request: its rows leave at the next step boundary.

        Returns "cancelled" (it was queued: cancelled now), "cancelling" (it runs: it leaves at the
        next step boundary, unless the current step finishes it; :meth:`get` tells the final
        status) or None (no queued or running request ``job_id``)."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.status in ("done", "failed", "cancelled"):
                return None
            job.cancel_requested = True
            self._lock.notify_all()
            if job in self._queue:
                self._queue.remove(job)
                self._finish(job, "cancelled")
                return "cancelled"
            return "cancelling"

    def subscribe(self, job: Job, listener) -> list[dict]:
        """Add ``listener(event)`` (called from the worker thread) to a job; return the events so far."""
        with self._lock:
            job.listeners.append(listener)
            return list(job.events)

    def unsubscribe(self, job: Job, listener) -> None:
        """Remove a listener (under the lock; one the loop already dropped is fine)."""
        with self._lock:
            if listener in job.listeners:
                job.listeners.remove(listener)

    def stats(self) -> dict:
        with self._lock:
            return {"queued": len(self._queue), "running": len(self._running),
                    "active_rows": sum(j.request.n for j in self._running)}

    # ------------------------------------------------------------------ loop
    def _loop(self) -> None:
        while True:
            jobs: list[Job] = []
            try:
                with self._lock:
                    while not self._stop and not self._queue and not self._running:
                        self._lock.wait()
                    if self._stop:
                        for job in list(self._queue) + self._running:
                            self._finish(job, "cancelled", Cancelled("the server is shutting down"))
                        self._queue.clear()
                        self._running.clear()
                        return
                    self._drop_cancelled()
                    jobs = self._admit()
                if jobs:
                    self.step(jobs)
            except Exception as err:  # the worker never dies: the jobs involved fail, the loop goes on
                self._loop_failed(jobs, err)

    def _loop_failed(self, jobs: list[Job], err: Exception) -> None:
        """Fail the jobs of an iteration that raised outside a step (all pending ones when unknown)."""
        with self._lock:
            self.metrics.loop_errors += 1
            victims = jobs or list(self._running) + list(self._queue)
            for job in victims:
                if job in self._running:
                    self._running.remove(job)
                if job in self._queue:
                    self._queue.remove(job)
                if job.status not in ("done", "failed", "cancelled"):
                    try:
                        self._finish(job, "failed", RuntimeError(f"the batch loop failed: {err!r}"))
                    except Exception:
                        job.resolve(error=RuntimeError(f"the batch loop failed: {err!r}"))
                        self._jobs.pop(job.id, None)

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._running if j.cancel_requested]:
            self._running.remove(job)
            self._finish(job, "cancelled", Cancelled(job.cancel_reason) if job.cancel_reason else None)

    def _admit(self) -> list[Job]:
        """Move queued jobs into the running set (policy, budgets); return the jobs of this step's shape.

        First come, first served within a latent shape (nobody overtakes a request of its shape that
        does not fit yet); a request of another shape does not wait behind it (its own step).
        ``max_rows`` bounds the rows in flight across *all* shapes (issue 20: a budget per shape let
        every new shape in, so the work in flight had no bound)."""
        if self.policy == "continuous" or not self._running:
            limit = 1 if self.policy == "sequential" else None
            used: dict = {}
            for j in self._running:
                used[j.shape] = used.get(j.shape, 0) + j.rows_now()
            blocked, total = set(), sum(used.values())
            for job in list(self._queue):
                if limit is not None and len(self._running) >= limit:
                    break
                if self.policy != "continuous" and self._running and job.shape != self._running[0].shape:
                    continue  # a static batch has one shape
                rows = used.get(job.shape, 0) + job.rows_now()
                if (job.shape in blocked or total + job.rows_now() > self.max_rows
                        or rows * math.prod(job.shape) > self.max_tokens):
                    blocked.add(job.shape)
                    continue
                used[job.shape], total = rows, total + job.rows_now()
                self._queue.remove(job)
                self._running.append(job)
                job.status, job.t_start = "running", time.perf_counter()
                job._event({"event": "started", "steps": job.steps})  # the metric path's step 1: no call, no x̂1
        if not self._running:
            return []
        shapes = list(dict.fromkeys(j.shape for j in self._running))  # round robin over latent shapes
        shape = shapes[next(self._turn) % len(shapes)]
        return [j for j in self._running if j.shape == shape]

    def _finish(self, job: Job, status: str, error: BaseException | None = None) -> None:
        """End a job (under the lock): its future, its last event, the counters; a job ends once."""
        if job.status in ("done", "failed", "cancelled"):
            self.metrics.ended_twice += 1  # never expected: counted so that tests can see it
            return
        self._lock.notify_all()  # drain() waits for the pending jobs to end
        job.status, job.t_done = status, time.perf_counter()
        if status == "done":
            self.metrics.served += 1
            job.resolve(job.x.view(job.request.n, *job.shape).clone())
            job._event({"event": "done"})
        else:
            if status == "cancelled":
                self.metrics.cancelled += 1
            else:
                self.metrics.failed += 1
            job._event({"event": status, "message": str(error) if error else status})
            job.resolve(error=error or Cancelled(f"request {job.id} was cancelled"))
        self._jobs.pop(job.id, None)
        self._recent[job.id] = job
        while len(self._recent) > RECENT_JOBS:
            self._recent.popitem(last=False)
        if len(self._recent) > PREVIEW_JOBS:  # older finished jobs keep their events, not their preview tokens
            list(self._recent.values())[-PREVIEW_JOBS - 1].drop_previews()

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def step(self, jobs: list[Job]) -> None:
        """One step of ``jobs`` (one latent shape): one forward pass, per-row sampler steps."""
        t0 = time.perf_counter()
        try:
            rows = self._forward_and_step(jobs)
        except Exception as err:  # a failing step fails its requests, never the server
            for job in jobs:
                job.preview = None  # a half-drawn x̂1 is never shown
            if len(jobs) > 1:  # nothing was written back: find the culprits by stepping each alone
                for job in jobs:
                    self.step([job])
                return
            with self._lock:
                if jobs[0] in self._running:
                    self._running.remove(jobs[0])
                self._finish(jobs[0], "failed", err)
            return
        dt = time.perf_counter() - t0
        m = self.metrics
        m.steps, m.rows, m.last_rows, m.last_step_seconds = m.steps + 1, m.rows + rows, rows, dt
        m.step_seconds += dt
        m.max_rows_seen = max(m.max_rows_seen, rows)
        previews = {job.id: job.take_preview() for job in jobs}  # x̂1 copied outside the lock
        with self._lock:
            for job in jobs:
                job.k += 1
                event = {"event": "step", "step": job.k, "steps": job.steps}
                if previews[job.id] is not None:
                    event["tokens"] = previews[job.id]
                job._event(event)
                if job.k == job.steps:
                    self._running.remove(job)
                    self._finish(job, "done")

    def _forward_and_step(self, jobs: list[Job]) -> int:
        """The forward pass and sampler steps of ``jobs`` (:func:`ursa_engine.serve.step.forward_and_step`)."""
        return forward_and_step(self, jobs)
