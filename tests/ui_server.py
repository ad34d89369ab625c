"""A live web UI for the tests (tests/test_ui.py, tests/test_ui_browser.py): uvicorn in a thread on a free
loopback port, around :func:`ursa_engine.ui.create_ui_app` (or ``serve --ui``'s :func:`ursa_engine.ui.mount`)
and the bundled digits model's batcher."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from ursa_engine.serve import Batcher
from ursa_engine.serve.app import create_app
from ursa_engine.ui import create_ui_app, mount


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UIServer:
    """The page on ``url`` (``/`` alone, or ``/ui`` beside the HTTP API with ``with_api``).

    ``start_batcher=False`` leaves the batch loop stopped until :meth:`Batcher.start`: requests
    queue up, then join the first step together (a forward pass carries them all)."""

    def __init__(self, served, *, limits=None, with_api: bool = False, start_batcher: bool = True, **options):
        self.batcher = Batcher(served.engine, **{"max_rows": 16, "max_queue": 16, **options})
        if start_batcher:
            self.batcher.start()
        if with_api:
            self.app = mount(create_app(served, self.batcher, limits), served, self.batcher, limits)
            path = "/ui/"
        else:
            self.app = create_ui_app(served, self.batcher, limits)
            path = "/"
        self.studio = self.app.state.ui_studio
        port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{port}"
        self.url = self.base + path
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the UI test server did not start")
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(2)
        if self.thread.is_alive():  # open heartbeat streams (a page, or gradio_client: the page has an unload
            self.server.force_exit = True  # event) hold a graceful shutdown until they close: don't wait
            self.thread.join(10)
        self.batcher.stop()
