"""What every HTTP route shares (issues 14, 20, 23): errors, limits, admission, waiting, event streams.

Every route that starts a job goes through :meth:`Gateway.submit`, so the API keys' namespaces, the
per-key concurrency limit, the queue bound, the drain and the batcher's size checks apply to the
images routes, the videos routes and any route added later alike (one server design). Routes build
their :class:`~ursa_engine.serve.batcher.GenerationRequest` from their own body; the gateway does not
know the body's schema.

Errors use the OpenAI shape ``{"error": {"message", "type", "param"}}``: a ``ValueError`` whose
message starts with ``"field: ..."`` becomes a 400 with ``param`` = field.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from .batcher import Batcher, Cancelled, Draining, Job, QueueFull
from .keymetrics import KeyMetrics
from .models import ServedModel
from .security import InFlight, Limits, external_id, internal_id, new_id

TERMINAL = ("done", "cancelled", "failed")


def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
          headers: dict | None = None) -> JSONResponse:
    """An OpenAI-shaped error response."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param}}, status_code=status,
                        headers=headers)


def param_of(message: str) -> str | None:
    """The field a ``"field: ..."`` error message names (None when it names none)."""
    head = message.split(":", 1)[0]
    return head if head.replace(".", "_").isidentifier() else None


def bad_request(err: Exception, headers: dict | None = None) -> JSONResponse:
    """The 400 of a ``ValueError("field: ...")``."""
    msg = str(err)
    return error(400, msg, param_of(msg), headers=headers)


class Gateway:
    """The served model, its batcher and the server's limits, as the routes use them.

    Parameters
    ----------
    served : ServedModel
    batcher : Batcher (started or to be started)
    limits : Limits (keys, request limits, upload limits, stores)
    """

    def __init__(self, served: ServedModel, batcher: Batcher, limits: Limits):
        self.served, self.batcher, self.limits = served, batcher, limits
        self.inflight = InFlight()
        self.keys = KeyMetrics()  # per-key counters (/metrics)

    # ------------------------------------------------------------------ checks
    def check_texts(self, texts: dict, headers: dict | None = None) -> JSONResponse | None:
        """400 for a text field (``{name: str or None}``) over ``max_prompt_chars``, before tokenizing."""
        for name, text in texts.items():
            if text is not None and len(text) > self.limits.max_prompt_chars:
                return error(400, f"{name}: {len(text)} characters, over this server's limit of "
                                  f"{self.limits.max_prompt_chars} (max_prompt_chars)", name, headers=headers)
        return None

    def check_n(self, n: int, headers: dict | None = None) -> JSONResponse | None:
        """400 for ``n`` over ``max_n``."""
        if n > self.limits.max_n:
            return error(400, f"n: {n} samples, over this server's limit of {self.limits.max_n} (max_n)", "n",
                         headers=headers)
        return None

    # ------------------------------------------------------------------ jobs
    async def submit(self, owner: str, build: Callable[[str], Job], *, request_id: str | None = None,
                     rename: Callable[[ValueError], ValueError] | None = None,
                     user: str | None = None) -> Job | JSONResponse:
        """Admit one job: per-key concurrency (429), the queue (429) and the drain (503) first, then
        ``build(job_id)`` in the thread pool (tokenizing, encoding uploads, :meth:`Batcher.prepare`;
        its ``ValueError("field: ...")`` is a 400, after ``rename`` when given), then the queue.

        ``request_id``: the client's id (else 128 random bits); the job's id is namespaced by
        ``owner`` (:mod:`.security`). The concurrency slot is released when the job's future resolves.
        ``user``: the end user's id the body gave (``user`` / ``safety_identifier``): counted per key."""
        self.keys.record(owner, user)
        ext = request_id or new_id()
        rid = {"X-Request-Id": ext}
        limits, batcher = self.limits, self.batcher
        if not self.inflight.reserve(owner, limits.max_concurrent_per_key):
            return error(429, f"max_concurrent_per_key: this key has {limits.max_concurrent_per_key} requests queued "
                              "or running (the server's limit); retry when one ends", "max_concurrent_per_key",
                         "rate_limit_error", {"Retry-After": str(limits.retry_after_s), **rid})
        submitted = False
        try:
            batcher.check_queue()  # 429 before tokenizing and allocating
            try:
                job = await run_in_threadpool(build, internal_id(owner, ext))
            except ValueError as err:
                raise (rename(err) if rename is not None else err) from None
            job = batcher.submit(job)
            submitted = True
            job.future.add_done_callback(lambda _f: self.inflight.release(owner))
            return job
        except Draining as err:  # SIGTERM / Ctrl-C: the accepted jobs drain, new ones go elsewhere
            return error(503, str(err), None, "server_shutting_down",
                         {"Retry-After": str(batcher.retry_after()), **rid})
        except QueueFull as err:
            return error(429, str(err), "max_queue", "rate_limit_error", {"Retry-After": "1", **rid})
        except ValueError as err:
            if "already in use" in str(err):  # the batcher's message names the namespaced id
                return error(409, f"request_id: {ext!r} is already in use", "request_id", headers=rid)
            return bad_request(err, rid)
        finally:
            if not submitted:
                self.inflight.release(owner)

    async def wait(self, job: Job, request: Request):
        """The job's tokens, or an error response: 409 cancelled, 500 failed. A client that disconnects
        while waiting cancels its job (its rows leave at the next step)."""
        fut = asyncio.wrap_future(job.future)
        while not fut.done():
            await asyncio.wait([fut], timeout=0.25)
            if not fut.done() and await request.is_disconnected():
                self.batcher.cancel(job.id)
                break
        rid = {"X-Request-Id": external_id(job.id)}
        try:
            return await fut
        except Cancelled as err:
            return error(409, str(err), None, "cancelled", rid)
        except Exception as err:  # the batch failed: report, keep serving
            return error(500, f"generation failed: {err}", None, "server_error", rid)

    def find(self, owner: str, request_id: str) -> Job | None:
        """A job of the caller's namespace (another key's job is not found: 404, never 403)."""
        return self.batcher.get(internal_id(owner, request_id))

    async def events(self, job: Job, *, cancel_on_close: bool):
        """The job's events as ``(name, event dict)`` pairs, past ones first, until a terminal one.
        ``cancel_on_close``: a consumer that stops early (a client that went away) cancels the job."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def listener(ev):
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        ext = external_id(job.id)
        pending = list(self.batcher.subscribe(job, listener))
        finished = False
        try:
            while True:
                ev = pending.pop(0) if pending else await queue.get()
                ev = dict(ev, id=ext) if "id" in ev else ev  # the client's id, not the namespaced one
                if ev["event"] in TERMINAL:
                    finished = True
                yield ev["event"], ev
                if finished:
                    return
        finally:
            self.batcher.unsubscribe(job, listener)
            if cancel_on_close and not finished:
                self.batcher.cancel(job.id)


def sse(name: str | None, data: dict) -> str:
    """One server-sent event (``event:`` line only when ``name`` is given)."""
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {json.dumps(data)}\n\n"
