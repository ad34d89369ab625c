"""The Guard middleware alone (issue 20 item 2): bodies in flight, draining refusals, malformed JSON.

A stub ASGI app stands behind :class:`ursa_engine.serve.security.Guard`; requests are driven by hand
(scope, receive, send), so the order of events is exact and nothing waits on a real socket.
"""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("fastapi")

from ursa_engine.serve.security import Guard, Limits  # noqa: E402


def scope(path="/v1/images/generations", method="POST", length: int | None = None) -> dict:
    headers = [] if length is None else [(b"content-length", str(length).encode())]
    return {"type": "http", "path": path, "method": method, "headers": headers}


class Stub:
    """An app that reads the whole body, then waits until ``release`` is set, then answers 200."""

    def __init__(self):
        self.release = asyncio.Event()
        self.bodies = []

    async def __call__(self, scope, receive, send):
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        self.bodies.append(body)
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def call(guard, sc, chunks: list[bytes]):
    """(status, headers, body) of one request whose body arrives as ``chunks``."""
    queue = list(chunks)
    sent = []

    async def receive():
        if queue:
            chunk = queue.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(queue)}
        await asyncio.sleep(3600)  # no disconnect while the request runs

    async def send(msg):
        sent.append(msg)

    await guard(sc, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body


def test_bodies_in_flight_are_bounded_and_released():
    async def run():
        stub = Stub()
        guard = Guard(stub, Limits(max_upload_bytes=1000, max_body_bytes_in_flight=1500))
        first = asyncio.create_task(call(guard, scope("/v1/images/edits", length=1000), [b"x" * 1000]))
        await asyncio.sleep(0.05)
        assert guard.held == 1000  # held while its route runs
        status, headers, body = await call(guard, scope("/v1/images/edits", length=600), [b"y" * 600])
        assert status == 429 and headers[b"retry-after"] == b"1"
        assert json.loads(body)["error"]["param"] == "max_body_bytes_in_flight"
        # a chunked body (no Content-Length) is counted as it arrives
        status, _, _ = await call(guard, scope("/v1/images/edits"), [b"z" * 300, b"z" * 300])
        assert status == 429
        stub.release.set()
        assert (await first)[0] == 200
        assert guard.held == 0
        status, _, _ = await call(guard, scope("/v1/images/edits", length=600), [b"y" * 600])
        assert status == 200 and guard.held == 0 and stub.bodies[-1] == b"y" * 600

    asyncio.run(run())


def test_a_draining_server_refuses_new_jobs_before_reading_their_bodies():
    async def run():
        stub = Stub()
        stub.release.set()
        retry = {"now": None}
        guard = Guard(stub, Limits(), draining=lambda: retry["now"])
        assert (await call(guard, scope(length=2), [b"{}"]))[0] == 200
        retry["now"] = 7

        async def never():  # the body never comes: a 503 must not wait for it
            await asyncio.sleep(3600)

        sent = []

        async def send(msg):
            sent.append(msg)

        await asyncio.wait_for(guard(scope("/v1/videos", length=10_000), never, send), timeout=2)
        start = sent[0]
        assert start["status"] == 503 and dict(start["headers"])[b"retry-after"] == b"7"
        # reads and cancels still work while draining (only job-starting POSTs are refused)
        assert (await call(guard, scope("/v1/requests/x", method="GET"), [b""]))[0] == 200

    asyncio.run(run())


def test_malformed_json_names_the_body():
    from fastapi.testclient import TestClient

    from ursa_engine.serve.app import create_app
    from ursa_engine.serve.batcher import Batcher
    from ursa_engine.serve.models import ServedModel

    served = ServedModel.load()
    app = create_app(served, Batcher(served.engine))  # never started: the body is refused first
    r = TestClient(app).post("/v1/images/generations", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body", r.text
