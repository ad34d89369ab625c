"""The HTTP API of ``ursa-engine serve`` (FastAPI + uvicorn; issue 14).

Endpoints
---------
``POST /v1/images/generations``
    Shaped like the OpenAI images API: ``prompt``, ``negative_prompt``, ``size`` ("WxH" pixels),
    ``frames``, ``n``, ``seed``, ``steps``, ``guidance``, ``guidance_trunc``, ``temperature``,
    ``top_k``, ``top_p``, ``response_format`` ("b64_json": PNG, or MP4 for frames > 1, base64 in
    JSON; "png" / "mp4": the bytes, n = 1; "tokens": the latent tokens as JSON), ``stream``
    (server-sent events: ``queued``, ``started``, ``step`` (in order), then ``result`` with the
    JSON body, or ``cancelled`` / ``failed``), ``request_id`` (else a random one is made, 128 bits;
    always in the ``X-Request-Id`` header; ids live in the caller's key's namespace: :mod:`.security`),
    ``lora`` (the name of an adapter the server was started with,
    ``--lora NAME=PATH``; applied to this request's rows only; default none; ``/health`` lists them).
``GET /v1/requests/{id}`` (status), ``GET /v1/requests/{id}/events`` (SSE progress),
``DELETE /v1/requests/{id}`` (cancel: its rows leave at the next step boundary; a client that
disconnects cancels its request too; a running one answers "cancelling" and GET tells its final
status), ``GET /health`` (503 when the batch worker is not running), ``GET /metrics`` (Prometheus text).

Security and limits (:mod:`.security`, issue 20): with API keys every route but ``/health`` needs
``Authorization: Bearer KEY`` (401 without detail); a request is visible and cancellable only with
the key that made it (404 for others); 413 over ``max_body_bytes``, 400 over ``max_prompt_chars``
or ``max_n`` (``param`` names the field), 429 + ``Retry-After`` over ``max_concurrent_per_key``;
CORS headers only for the configured origins.

Errors use the OpenAI shape ``{"error": {"message", "type", "param"}}``: 400 for a bad field
(named in ``param`` and the message), 404 for an unknown request, 409 for a cancelled one, 429
when the queue is full (checked before the prompt is tokenized), 500 when generation or rendering
failed (the server keeps serving; a stream ends with ``event: failed``). Requests over the server's
``max_tokens`` (n x latent tokens, x2 rows while guided) are refused with a 400 naming ``size``,
``frames``, ``latents_shape`` or ``n`` before anything is allocated. Responses carry ``X-Request-Id``
once the request id is known.

The model runs in the :class:`~ursa_engine.serve.batcher.Batcher` worker thread; handlers only
queue jobs, wait on futures and encode results in the thread pool.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import secrets
import time
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .batcher import DEFAULT_MAX_TOKENS, Batcher, Cancelled, Draining, GenerationRequest, Job, QueueFull
from .models import ServedModel
from .security import Guard, InFlight, Limits, bind_warning, external_id, internal_id, new_id

TERMINAL = ("done", "cancelled", "failed")


class ImageRequest(BaseModel):
    """The body of ``POST /v1/images/generations``."""

    model_config = ConfigDict(extra="forbid")
    prompt: str
    negative_prompt: str | None = None
    model: str | None = None  # accepted for OpenAI clients, ignored
    size: str | None = None
    frames: int = Field(1, ge=1, le=1024)
    latents_shape: list[int] | None = Field(None, min_length=2, max_length=3)
    n: int = Field(1, ge=1, le=64)
    seed: int | None = Field(None, ge=0, lt=2**62)
    steps: int | None = Field(None, ge=1, le=1000)
    guidance: float | None = Field(None, ge=-100, le=100)
    guidance_trunc: float = Field(0.9, ge=0, le=1)
    temperature: float = Field(1.0, gt=0, le=100)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    response_format: Literal["b64_json", "png", "mp4", "tokens"] = "b64_json"
    stream: bool = False
    request_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    lora: str | None = Field(None, pattern=r"^[A-Za-z0-9_.:-]{1,64}$")


def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
          headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param}}, status_code=status,
                        headers=headers)


def _param(message: str) -> str | None:
    """The field a ``"field: ..."`` error message names."""
    head = message.split(":", 1)[0]
    return head if head.isidentifier() else None


def create_app(served: ServedModel, batcher: Batcher, limits: Limits | None = None) -> FastAPI:
    """The FastAPI application over a started (or to be started) batcher.

    ``limits``: API keys, request-id namespaces, body / prompt / n / per-key limits and CORS
    (:mod:`.security`; default :class:`Limits`: no keys, loopback use, no CORS)."""
    limits = Limits() if limits is None else limits
    app = FastAPI(title="ursa-engine", version="0.1.0")
    app.state.served, app.state.batcher, app.state.limits = served, batcher, limits
    inflight = app.state.inflight = InFlight()
    app.add_middleware(Guard, limits=limits)  # every route, present and future (issue 23's too)
    if limits.cors_origins:  # outside the guard: a CORS preflight carries no key
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(limits.cors_origins), allow_methods=["GET", "POST",
                           "DELETE"], allow_headers=["authorization", "content-type"],
                           expose_headers=["x-request-id", "retry-after"])
    started = time.time()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(v) for v in first.get("loc", ()) if v != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        return error(400, f"{param}: {msg}" if param else msg, param)

    def size_field(body: ImageRequest, shape) -> str:
        """The field to blame for a request over ``max_tokens``: its grid when one sample is too big, else n."""
        if body.n > 1 and 2 * math.prod(shape) <= batcher.max_tokens:
            return "n"
        if body.latents_shape is not None:
            return "latents_shape"
        return "size" if body.size is not None or body.frames == 1 else "frames"

    def to_request(body: ImageRequest) -> GenerationRequest:
        """The request of a body (in the thread pool: tokenization is not cheap); sizes are checked first."""
        if body.latents_shape is not None:
            shape = tuple(body.latents_shape)
            if len(shape) == 2:
                shape = (1, *shape)
            if min(shape) < 1:
                raise ValueError(f"latents_shape: expected positive sizes, got {list(body.latents_shape)}")
        else:
            shape = served.latents_shape(body.size, body.frames)
        batcher.check_size(shape, body.n, field=size_field(body, shape))  # before any allocation
        if body.response_format in ("png", "mp4") and body.n != 1:
            raise ValueError(f"n: response_format {body.response_format!r} returns one file: n must be 1")
        if body.response_format == "png" and shape[0] != 1:
            raise ValueError("response_format: 'png' is one image: use 'mp4' or 'b64_json' for frames > 1")
        if body.response_format != "tokens" and served.engine.vae is None:
            raise ValueError("response_format: this checkpoint has no vae/: only 'tokens' can be returned")
        neg = body.negative_prompt if body.negative_prompt is not None else ""
        return GenerationRequest(
            prompt_ids=served.prompt_ids(body.prompt), negative_ids=served.prompt_ids(neg, field="negative_prompt"),
            latents_shape=shape, n=body.n, num_steps=body.steps,
            guidance_scale=served.default_guidance if body.guidance is None else body.guidance,
            guidance_trunc=body.guidance_trunc, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
            seed=secrets.randbelow(2**31) if body.seed is None else body.seed, lora=body.lora)

    def render(job: Job, tokens, fmt: str) -> dict | Response:
        if fmt == "tokens":
            data = [{"tokens": t.tolist(), "shape": list(t.shape)} for t in tokens.cpu()]
        else:
            frames = served.frames(tokens)
            if fmt == "png":
                return Response(served.png(frames[0, 0]), media_type="image/png",
                                headers={"X-Request-Id": external_id(job.id)})
            if fmt == "mp4":
                return Response(served.mp4(frames[0]), media_type="video/mp4",
                                headers={"X-Request-Id": external_id(job.id)})
            data = []
            for f in frames:
                blob, mime = (served.png(f[0]), "image/png") if f.shape[0] == 1 else (served.mp4(f), "video/mp4")
                data.append({"b64_json": base64.b64encode(blob).decode("ascii"), "mime_type": mime})
        return {"id": external_id(job.id), "created": int(time.time()), "data": data, "seed": job.request.seed,
                "steps": job.steps, "latents_shape": list(job.shape),
                "timing": {"queued_s": round(job.t_start - job.t_submit, 4),
                           "generate_s": round(job.t_done - job.t_start, 4)}}

    def prepare(body: ImageRequest, job_id: str) -> Job:
        req = to_request(body)
        try:
            return batcher.prepare(req, job_id)
        except ValueError as err:  # prepare's exact size check (guided rows) names the field the body gave
            msg = str(err)
            if msg.startswith("latents_shape:") and "(max_tokens)" in msg and body.latents_shape is None:
                msg = size_field(body, req.latents_shape) + msg[len("latents_shape"):]
                raise ValueError(msg) from None
            raise

    def over_limits(body: ImageRequest, rid: dict) -> JSONResponse | None:
        """400 for a prompt or ``n`` over this server's limits (before tokenizing anything)."""
        for name in ("prompt", "negative_prompt"):
            text = getattr(body, name)
            if text is not None and len(text) > limits.max_prompt_chars:
                return error(400, f"{name}: {len(text)} characters, over this server's limit of "
                                  f"{limits.max_prompt_chars} (max_prompt_chars)", name, headers=rid)
        if body.n > limits.max_n:
            return error(400, f"n: {body.n} samples, over this server's limit of {limits.max_n} (max_n)", "n",
                         headers=rid)
        return None

    async def start(body: ImageRequest, owner: str) -> Job | JSONResponse:
        ext = body.request_id or new_id()  # client ids live in the caller's namespace (security.py)
        rid = {"X-Request-Id": ext}
        refused = over_limits(body, rid)
        if refused is not None:
            return refused
        if not inflight.reserve(owner, limits.max_concurrent_per_key):
            return error(429, f"max_concurrent_per_key: this key has {limits.max_concurrent_per_key} requests queued "
                              "or running (the server's limit); retry when one ends", "max_concurrent_per_key",
                         "rate_limit_error", {"Retry-After": str(limits.retry_after_s), **rid})
        submitted = False
        try:
            batcher.check_queue()  # 429 before tokenizing and allocating
            job = await run_in_threadpool(prepare, body, internal_id(owner, ext))
            job = batcher.submit(job)
            submitted = True
            job.future.add_done_callback(lambda _f: inflight.release(owner))
            return job
        except Draining as err:  # SIGTERM / Ctrl-C: the accepted jobs drain, new ones go elsewhere
            return error(503, str(err), None, "server_shutting_down",
                         {"Retry-After": str(batcher.retry_after()), **(rid or {})})
        except QueueFull as err:
            return error(429, str(err), None, "rate_limit_error", {"Retry-After": "1", **(rid or {})})
        except ValueError as err:
            msg = str(err)
            if "already in use" in msg:  # the batcher's message names the namespaced id
                return error(409, f"request_id: {ext!r} is already in use", "request_id", headers=rid)
            return error(400, msg, _param(msg), headers=rid)
        finally:
            if not submitted:
                inflight.release(owner)

    def render_error(err: Exception) -> dict:
        return {"message": f"rendering the result failed: {err}", "type": "server_error", "param": None}

    @app.post("/v1/images/generations")
    async def generations(body: ImageRequest, request: Request):
        job = await start(body, request.state.owner)
        if isinstance(job, JSONResponse):
            return job
        if body.stream:
            return StreamingResponse(events(job, body.response_format, cancel_on_close=True),
                                     media_type="text/event-stream", headers={"X-Request-Id": external_id(job.id)})
        fut = asyncio.wrap_future(job.future)
        while not fut.done():
            await asyncio.wait([fut], timeout=0.25)
            if not fut.done() and await request.is_disconnected():
                batcher.cancel(job.id)  # the client went away: its rows leave at the next step
                break
        rid = {"X-Request-Id": external_id(job.id)}
        try:
            tokens = await fut
        except Cancelled as err:
            return error(409, str(err), None, "cancelled", rid)
        except Exception as err:  # the batch failed: report, keep serving
            return error(500, f"generation failed: {err}", None, "server_error", rid)
        try:
            out = await run_in_threadpool(render, job, tokens, body.response_format)
        except Exception as err:  # decode / encode failed: an OpenAI-shaped 500, the server keeps serving
            return error(500, render_error(err)["message"], None, "server_error", rid)
        return out if isinstance(out, Response) else JSONResponse(out, headers=rid)

    async def events(job: Job, fmt: str | None, *, cancel_on_close: bool):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def listener(ev):
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        ext = external_id(job.id)

        past = batcher.subscribe(job, listener)
        finished = False
        try:
            pending = list(past)
            while True:
                ev = pending.pop(0) if pending else await queue.get()
                ev = dict(ev, id=ext) if "id" in ev else ev  # the client's id, not the namespaced one
                name = ev["event"]
                if name == "done" and fmt is not None:
                    try:
                        out = await run_in_threadpool(render, job, job.future.result(),
                                                      "b64_json" if fmt in ("png", "mp4") else fmt)
                    except Exception as err:  # the stream still ends with a terminal event
                        failed = {"id": ext, "event": "failed", "error": render_error(err)}
                        yield f"event: failed\ndata: {json.dumps(failed)}\n\n"
                        finished = True
                        return
                    yield f"event: done\ndata: {json.dumps(ev)}\n\n"
                    yield f"event: result\ndata: {json.dumps(out)}\n\n"
                else:
                    yield f"event: {name}\ndata: {json.dumps(ev)}\n\n"
                if name in TERMINAL:
                    finished = True
                    return
        finally:
            batcher.unsubscribe(job, listener)
            if cancel_on_close and not finished:
                batcher.cancel(job.id)  # the client disconnected from its stream

    def not_found(request_id: str, what: str = "request") -> JSONResponse:
        return error(404, f"request_id: no {what} {request_id!r}", "request_id")

    # a job is found only in the caller's namespace: another key's job is a 404, as an unknown id
    @app.get("/v1/requests/{request_id}")
    async def status(request_id: str, request: Request):
        job = batcher.get(internal_id(request.state.owner, request_id))
        if job is None:
            return not_found(request_id)
        return {"id": request_id, "status": job.status, "step": job.k, "steps": job.steps}

    @app.get("/v1/requests/{request_id}/events")
    async def request_events(request_id: str, request: Request):
        job = batcher.get(internal_id(request.state.owner, request_id))
        if job is None:
            return not_found(request_id)
        return StreamingResponse(events(job, None, cancel_on_close=False), media_type="text/event-stream",
                                 headers={"X-Request-Id": request_id})

    @app.delete("/v1/requests/{request_id}")
    async def cancel(request_id: str, request: Request):
        # "cancelling" while it runs: GET tells its final status
        state = batcher.cancel(internal_id(request.state.owner, request_id))
        if state is None:
            return not_found(request_id, "queued or running request")
        return {"id": request_id, "status": state}

    @app.get("/health")
    async def health():
        alive = batcher.alive and not batcher.draining  # a draining server sends new clients elsewhere
        state = "ok" if alive else "draining" if batcher.draining else "error"
        body = {"status": state, "worker_alive": batcher.alive, "model": served.name,
                "device": str(served.engine.device), "policy": batcher.policy, "max_rows": batcher.max_rows,
                "max_queue": batcher.max_queue, "max_tokens": batcher.max_tokens,
                "uptime_s": round(time.time() - started, 1), "loras": batcher.loras.names,
                "merged_loras": served.engine.loras, **batcher.stats()}
        return body if alive else JSONResponse(body, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus(batcher, served.name), media_type="text/plain; version=0.0.4")

    return app


def prometheus(batcher: Batcher, model: str) -> str:
    """The batch loop's counters in the Prometheus text format."""
    m, s = batcher.metrics, batcher.stats()
    label = f'{{model="{model}"}}'
    rows = [
        ("ursa_queue_depth", "gauge", "requests waiting to start", s["queued"]),
        ("ursa_running_requests", "gauge", "requests in the running batch", s["running"]),
        ("ursa_active_rows", "gauge", "samples in the running batch", s["active_rows"]),
        ("ursa_steps_total", "counter", "batch steps run", m.steps),
        ("ursa_step_rows_total", "counter", "forward rows summed over steps (cond + uncond)", m.rows),
        ("ursa_step_rows_last", "gauge", "forward rows of the last step", m.last_rows),
        ("ursa_step_rows_mean", "gauge", "forward rows per step, mean", m.rows / m.steps if m.steps else 0.0),
        ("ursa_step_seconds_total", "counter", "time in batch steps", m.step_seconds),
        ("ursa_step_seconds_last", "gauge", "time of the last step", m.last_step_seconds),
        ("ursa_requests_served_total", "counter", "requests completed", m.served),
        ("ursa_requests_failed_total", "counter", "requests that failed", m.failed),
        ("ursa_requests_cancelled_total", "counter", "requests cancelled", m.cancelled),
        ("ursa_requests_rejected_total", "counter", "requests refused with 429 (queue full)", m.rejected),
        ("ursa_max_rows", "gauge", "rows per step budget", batcher.max_rows),
    ]
    out = []
    for name, kind, help_, value in rows:
        out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name}{label} {value}"]
    return "\n".join(out) + "\n"


def draining_server(config, batcher: Batcher, drain_seconds: float = 30.0):
    """A ``uvicorn.Server`` whose SIGTERM / SIGINT drains the batcher before uvicorn shuts down.

    uvicorn's own handler would close the listening socket at once and re-raise the signal after
    shutdown (exit status -15 / 130). Here the first signal starts :meth:`Batcher.drain` in a thread:
    the socket stays open so that new requests get a clear 503 + ``Retry-After`` (``/health`` says
    "draining"), the accepted jobs finish or are cancelled with a notice within ``drain_seconds``,
    then uvicorn's graceful shutdown runs (open responses complete) and ``run`` returns: exit 0.
    A second signal skips the wait (the jobs are cancelled with a notice by :meth:`Batcher.stop`).
    """
    import logging
    import threading

    import uvicorn

    log = logging.getLogger("uvicorn.error")

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # the signal is not re-raised after shutdown: exit 0
            if self.should_exit or getattr(self, "drain_thread", None) is not None:
                log.warning("second signal: stopping now; unfinished requests are cancelled")
                threading.Thread(target=batcher.stop, daemon=True).start()
                self.should_exit = True
                return
            self.drain_thread = threading.Thread(target=self._drain, name="ursa-drain", daemon=True)
            self.drain_thread.start()

        def _drain(self) -> None:
            try:  # logging here, not in the signal handler (which may interrupt a thread holding a logging lock)
                s = batcher.stats()
                log.info("shutting down: draining %d queued and %d running request(s) for up to %g s (signal again "
                         "to stop now)", s["queued"], s["running"], drain_seconds)
                counts = batcher.drain(drain_seconds)
                log.info("drained: %s", ", ".join(f"{v} {k}" for k, v in counts.items()))
            finally:
                self.should_exit = True

    return _Server(config)


def serve(root=None, *, host: str = "127.0.0.1", port: int = 8000, max_rows: int = 16, max_queue: int = 64,
          max_tokens: int = DEFAULT_MAX_TOKENS, policy: str = "continuous", device=None, graphs: bool = False,
          log_level: str = "info", transformer_weights=None, revision: str | None = None,
          loras: list | None = None, drain_seconds: float = 30.0, limits: Limits | None = None) -> None:
    """Load ``root`` (default: the bundled digits model), start the batch loop and serve HTTP until interrupted.

    ``root`` may be a hub id ``org/name`` (``revision``; :func:`ursa_engine.hub.resolve_root`, served
    under that name); ``transformer_weights`` lays a transformer-only state dict over its transformer
    (:meth:`Engine.from_pretrained`). ``graphs``: CUDA graphs per (rows, shape) bucket (:mod:`.graphs`);
    a ValueError on a CPU engine. ``loras``: ``(name, path, scale)`` triples: name None merges the
    adapter into the served model (every request); a name registers it for the requests that ask
    ``"lora": name`` (applied unmerged to their rows, on top of the merged ones; DESIGN §9).

    SIGTERM or Ctrl-C drains (:func:`draining_server`): new requests get 503 + ``Retry-After``, the
    accepted ones run to their end for up to ``drain_seconds`` and are then cancelled with a notice
    (their streams end with ``event: cancelled``), and the process exits 0. A second signal stops at
    once (what still runs is cancelled with a notice).

    ``limits``: API keys and request limits (:class:`~ursa_engine.serve.security.Limits`); binding
    off loopback without a key prints a warning line to stderr first."""
    import sys
    from pathlib import Path

    limits = Limits() if limits is None else limits
    warning = bind_warning(host, limits)
    if warning is not None:
        print(warning, file=sys.stderr, flush=True)

    import uvicorn

    from ..engine import Engine
    from ..hub import is_hub_id, resolve_root

    label = root if isinstance(root, str) and is_hub_id(root) and not Path(root).exists() else None
    if root is not None:
        root = resolve_root(root, revision=revision, transformer_weights=transformer_weights is None)
    if transformer_weights is None:
        served = ServedModel.load(root, device=device)
    else:
        served = ServedModel(Engine.from_pretrained(root, device=device, transformer_weights=transformer_weights),
                             name=root.name)
    if label is not None:
        served.name = label
    if graphs and served.engine.device.type != "cuda":
        raise ValueError(f"graphs: CUDA graphs need a CUDA engine, this one runs on {served.engine.device} "
                         "(use --device cuda with an URSA checkpoint)")
    per_request = {}
    for name, path, scale in loras or ():
        if name is None:
            served.engine.load_lora(path, scale)
        elif name in per_request:
            raise ValueError(f"lora: the name {name!r} is given twice")
        else:
            per_request[name] = (path, scale)
    batcher = Batcher(served.engine, max_rows=max_rows, max_queue=max_queue, max_tokens=max_tokens, policy=policy,
                      graphs=graphs, loras=per_request).start()
    try:
        config = uvicorn.Config(create_app(served, batcher, limits), host=host, port=port, log_level=log_level)
        draining_server(config, batcher, drain_seconds).run()
    finally:
        batcher.stop()
