"""The HTTP API of ``ursa-engine serve`` (FastAPI + uvicorn; issues 14, 20, 23).

Routes
------
- Images (:mod:`.images`, :mod:`.image_edits`): ``POST /v1/images/generations``, ``POST /v1/images/edits``
  (OpenAI's request schema, :mod:`.image_schema`; uploads through :mod:`.uploads`).
- Jobs, any route's (our extension): ``GET /v1/requests/{id}`` (status), ``GET /v1/requests/{id}/events``
  (SSE progress: ``queued``, ``started``, ``step``, then ``done`` / ``cancelled`` / ``failed``),
  ``DELETE /v1/requests/{id}`` (cancel: its rows leave at the next step boundary; a running one
  answers "cancelling" and GET tells its final status). A client that disconnects cancels its job.
- ``GET /v1/models``: the served checkpoint and the LoRA adapters requests can name; ``GET /v1/models/{id}``.
- Videos (:mod:`.videos`): ``/v1/videos`` (create, list), ``/v1/videos/{id}`` (retrieve, delete),
  ``/v1/videos/{id}/content``, ``/v1/videos/extensions``.
- ``GET /health`` (503 when the batch worker is not running or the server drains), ``GET /metrics``
  (Prometheus text).

Every route sits behind :class:`~ursa_engine.serve.security.Guard` (API keys, body and upload bytes)
and starts its jobs through :class:`~ursa_engine.serve.gateway.Gateway` (per-key namespaces and
concurrency, queue, drain, size checks): one design for every route. With API keys every route but
``/health`` needs ``Authorization: Bearer KEY`` (401 without detail); a job is visible and
cancellable only with the key that made it (404 for others); 413 over the body / upload limits, 400
over ``max_prompt_chars`` or ``max_n`` (``param`` names the field), 429 + ``Retry-After`` over
``max_concurrent_per_key`` or a full queue, 503 + ``Retry-After`` while draining; CORS headers only
for the configured origins.

Errors use the OpenAI shape ``{"error": {"message", "type", "param"}}``: 400 for a bad field (named
in ``param`` and the message), 404 for an unknown request, 409 for a cancelled one, 500 when
generation or rendering failed (the server keeps serving). Responses carry ``X-Request-Id`` once
the request id is known.

The model runs in the :class:`~ursa_engine.serve.batcher.Batcher` worker thread; handlers only
queue jobs, wait on futures and encode results in the thread pool.
"""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from .batcher import DEFAULT_MAX_TOKENS, Batcher
from .gateway import Gateway, error, sse
from .image_edits import add_edit_route
from .images import add_image_routes
from .models import ServedModel
from .security import Guard, Limits, bind_warning, internal_id
from .videos import add_video_routes


def create_app(served: ServedModel, batcher: Batcher, limits: Limits | None = None) -> FastAPI:
    """The FastAPI application over a started (or to be started) batcher.

    ``limits``: API keys, request-id namespaces, body / upload / prompt / n / per-key limits and CORS
    (:mod:`.security`; default :class:`Limits`: no keys, loopback use, no CORS)."""
    limits = Limits() if limits is None else limits
    app = FastAPI(title="ursa-engine", version="0.1.0")
    gw = Gateway(served, batcher, limits)
    app.state.served, app.state.batcher, app.state.limits, app.state.gateway = served, batcher, limits, gw
    app.state.inflight = gw.inflight
    def draining() -> int | None:  # the Guard refuses new jobs unread while the batcher drains
        return batcher.retry_after() if batcher.draining else None

    app.add_middleware(Guard, limits=limits, draining=draining)  # every route, present and future
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
        param = "body" if first.get("type") == "json_invalid" else ".".join(loc) or None  # loc: a byte offset
        msg = first.get("msg", "invalid request")
        return error(400, f"{param}: {msg}" if param else msg, param)

    add_edit_route(app, add_image_routes(app, gw))
    add_video_routes(app, gw)

    def not_found(request_id: str, what: str = "request") -> JSONResponse:
        return error(404, f"request_id: no {what} {request_id!r}", "request_id")

    # a job is found only in the caller's namespace: another key's job is a 404, as an unknown id
    @app.get("/v1/requests/{request_id}")
    async def status(request_id: str, request: Request):
        job = gw.find(request.state.owner, request_id)
        if job is None:
            return not_found(request_id)
        return {"id": request_id, "status": job.status, "step": job.k, "steps": job.steps}

    @app.get("/v1/requests/{request_id}/events")
    async def request_events(request_id: str, request: Request):
        job = gw.find(request.state.owner, request_id)
        if job is None:
            return not_found(request_id)

        async def stream():
            async for name, ev in gw.events(job, cancel_on_close=False):
                yield sse(name, {k: v for k, v in ev.items() if k != "tokens"})  # previews are the routes' own

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"X-Request-Id": request_id})

    @app.delete("/v1/requests/{request_id}")
    async def cancel(request_id: str, request: Request):
        # "cancelling" while it runs: GET tells its final status
        state = batcher.cancel(internal_id(request.state.owner, request_id))
        if state is None:
            return not_found(request_id, "queued or running request")
        return {"id": request_id, "status": state}

    def model_list() -> list[dict]:
        created = int(started)
        data = [{"id": served.name, "object": "model", "created": created, "owned_by": "ursa-engine"}]
        data += [{"id": name, "object": "model", "created": created, "owned_by": "ursa-engine", "parent": served.name,
                  "kind": "lora"} for name in batcher.loras.names]
        return data

    @app.get("/v1/models")
    async def models():
        """The served checkpoint and the adapters a request may name (``"lora"``), OpenAI's list shape."""
        return {"object": "list", "data": model_list()}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        """One model of :func:`models` (``client.models.retrieve``); 404 naming ``model`` otherwise."""
        found = [m for m in model_list() if m["id"] == model_id]
        return found[0] if found else error(404, f"model: no model {model_id!r} on this server", "model")

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
        return PlainTextResponse(prometheus(batcher, served.name) + gw.keys.prometheus(),
                                 media_type="text/plain; version=0.0.4")

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
          loras: list | None = None, drain_seconds: float = 30.0, limits: Limits | None = None,
          ui: bool = False) -> None:
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
    off loopback without a key prints a warning line to stderr first.

    ``ui``: also the web page at ``/ui`` (:func:`ursa_engine.ui.mount`, Gradio; behind its login with
    the same keys when ``limits`` has keys), on the same batcher."""
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
        app = create_app(served, batcher, limits)
        if ui:  # the web page at /ui (issue 21); ursa_engine.ui depends on serve, not the reverse
            from ..ui import mount

            app = mount(app, served, batcher, limits)
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level)
        draining_server(config, batcher, drain_seconds).run()
    finally:
        batcher.stop()
