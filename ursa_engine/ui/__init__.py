"""The web UI (issue 21): ``ursa-engine ui [ROOT]`` and ``ursa-engine serve --ui``, on Gradio.

Layers: :mod:`.handlers` (no Gradio: inputs -> :class:`~ursa_engine.serve.batcher.GenerationRequest`,
queue on the server's batcher, per-step progress, decoding; readable refusals) and :mod:`.blocks`
(the page and its named API endpoints). This package depends on :mod:`ursa_engine.serve`, never the
reverse (``serve --ui`` imports :func:`mount` lazily). Gradio is the ``ui`` extra
(``pip install 'ursa-engine[ui]'``).

API keys: with keys (``--api-key`` / ``URSA_API_KEY``) the page opens on Gradio's login form whose
password is an API key (any user name; a name stays bound to the key it first used), and every
Gradio route (page config, queue, uploads, files) needs that login. Without keys the page is open,
like the HTTP API without keys (bind 127.0.0.1 or pass a key).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from .handlers import Studio, UIError, conditioning_available

__all__ = ["Studio", "UIError", "conditioning_available", "create_ui_app", "launch", "mount"]

UI_PATH = "/ui"


def create_ui_app(served, batcher, limits=None, *, app=None, path: str = "/", inflight=None,
                  out_dir: str | Path | None = None):
    """A FastAPI app serving the page at ``path`` (Gradio's ``mount_gradio_app``), or ``app`` with it added.

    Parameters
    ----------
    served : :class:`~ursa_engine.serve.models.ServedModel`
    batcher : the started :class:`~ursa_engine.serve.batcher.Batcher` shared with the HTTP API
    limits : :class:`~ursa_engine.serve.security.Limits` (keys -> login page; prompt / per-key limits;
        uploads are capped at ``max_upload_bytes``, decoded under its pixel / frame limits)
    inflight : the HTTP app's per-key job counts (shared ``max_concurrent_per_key``)
    out_dir : where result videos are written (default: a temporary folder)
    """
    import gradio as gr
    from fastapi import FastAPI

    from ..serve.security import Limits
    from .blocks import CSS, KeyLogin, build_blocks

    limits = Limits() if limits is None else limits
    studio = Studio(served, batcher, limits, inflight=inflight, out_dir=out_dir)
    login = KeyLogin(studio)
    blocks = build_blocks(studio, login)
    if app is None:
        app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
        body_limit(app, limits, prefix="")
    app = gr.mount_gradio_app(app, blocks, path, auth=login if limits.api_keys else None,
                              auth_message="This server needs an API key: enter it as the password (any user name).",
                              allowed_paths=[str(studio.out_dir)], max_file_size=limits.max_upload_bytes,
                              ssr_mode=False, show_error=True, css=CSS, footer_links=["api"])
    app.state.ui_studio = studio
    return app


def mount(app, served, batcher, limits=None, *, path: str = UI_PATH):
    """``ursa-engine serve --ui``: the HTTP API ``app`` and the page at ``path`` in one ASGI app.

    Returns a new app: the page at ``path`` + ``/`` (``path`` itself redirects there; behind Gradio's
    login when ``limits`` has keys: a browser cannot send the API's ``Authorization: Bearer`` header)
    and everything else routed to ``app`` unchanged (its key check, body limits, routes). UI jobs share
    the API's batcher and per-key counts (``app.state.inflight``). At startup the page's path is
    logged (uvicorn's logger, level info)."""
    from fastapi import FastAPI
    from fastapi.responses import RedirectResponse

    path = "/" + path.strip("/")

    @contextlib.asynccontextmanager
    async def announce(_app):
        logging.getLogger("uvicorn.error").info("ursa-engine serve --ui: the web page is at %s/ on this address "
                                                "(beside the API)", path)
        yield

    outer = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, lifespan=announce)
    body_limit(outer, limits, prefix=path)

    def to_the_page(request):  # "/ui" is the page, not an API path: Gradio serves it at "/ui/"
        query = request.url.query
        return RedirectResponse(path + "/" + (f"?{query}" if query else ""), status_code=307)

    outer.router.add_route(path, to_the_page, methods=["GET", "HEAD"], include_in_schema=False)
    create_ui_app(served, batcher, limits, app=outer, path=path, inflight=getattr(app.state, "inflight", None))
    outer.mount("/", app)  # after the page's routes: every other path is the API's
    outer.state.api = app
    return outer


class _PageGuard:
    """ASGI middleware: requests under ``prefix`` (the page's paths; ``""``: all) go through ``guard``,
    every other request straight to ``app`` (the API, which has its own Guard)."""

    def __init__(self, app, *, limits, prefix: str):
        from ..serve.security import Guard

        self.app, self.prefix = app, prefix
        self.guard = Guard(app, limits=limits)

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "") if scope["type"] == "http" else None
        if path is not None and (not self.prefix or path == self.prefix or path.startswith(self.prefix + "/")):
            return await self.guard(scope, receive, send)
        return await self.app(scope, receive, send)


def body_limit(app, limits, *, prefix: str = "") -> None:
    """Bound every request body of the page (queue calls, uploads: the paths under ``prefix``) by
    ``max_upload_bytes`` before it is parsed: the API's :class:`~ursa_engine.serve.security.Guard` with
    no keys (Gradio's login checks those), so the page is no way around the server's body limits.
    Other paths (the API's, under ``serve --ui``) are not touched here: their own guard (keys,
    ``max_body_bytes``) reads them once."""
    from ..serve.security import Limits

    limits = Limits() if limits is None else limits
    app.add_middleware(_PageGuard, limits=Limits(max_body_bytes=limits.max_upload_bytes,
                                                 max_upload_bytes=limits.max_upload_bytes), prefix=prefix)


def launch(root=None, *, host: str = "127.0.0.1", port: int = 7860, max_rows: int = 16, max_queue: int = 64,
           max_tokens: int | None = None, limits=None, device=None, log_level: str = "warning") -> None:
    """``ursa-engine ui``: load ``root`` (default: the bundled digits model), start the batcher and serve
    the page until interrupted. ``max_tokens``: the batcher's token-rows a step (default: ``serve``'s)."""
    import sys

    import uvicorn

    from ..serve.batcher import Batcher
    from ..serve.models import ServedModel
    from ..serve.security import Limits, bind_warning

    limits = Limits() if limits is None else limits
    warning = bind_warning(host, limits)
    if warning is not None:
        print(warning.replace("generate, read and cancel requests", "use the page"), file=sys.stderr, flush=True)
    served = ServedModel.load(root, device=device)
    sizes = {} if max_tokens is None else {"max_tokens": max_tokens}
    batcher = Batcher(served.engine, max_rows=max_rows, max_queue=max_queue, **sizes).start()
    try:
        app = create_ui_app(served, batcher, limits)
        print(f"ursa-engine ui: http://{host}:{port}/ ({served.name} on {served.engine.device})", flush=True)
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        batcher.stop()
