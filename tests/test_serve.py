"""``ursa-engine serve`` over real loopback HTTP (issue 14): a uvicorn server started by the test on
127.0.0.1 (a free port) around the bundled digits model, and an httpx client.

Outputs of concurrent requests equal each request alone (and :meth:`Engine.generate`); SSE progress
arrives in order; cancellation (DELETE and client disconnect) frees the rows; 429 and 4xx; a bounded
load run loses no request; a spy on the transformer's forward shows that one pass carried the rows
of two requests at different steps.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from serve_spy import ForwardSpy  # noqa: E402

from ursa_engine import digits  # noqa: E402
from ursa_engine.serve import Batcher  # noqa: E402
from ursa_engine.serve.app import create_app  # noqa: E402
from ursa_engine.serve.models import ServedModel  # noqa: E402

STEPS = 6  # few steps: the whole file stays well under a minute on 2 cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A uvicorn server in a thread around a batcher; ``url`` on 127.0.0.1."""

    def __init__(self, served: ServedModel, limits=None, **batcher_options):
        self.batcher = Batcher(served.engine, **batcher_options).start()
        port = _free_port()
        config = uvicorn.Config(create_app(served, self.batcher, limits), host="127.0.0.1", port=port,
                                log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.batcher.stop()


@pytest.fixture(scope="module")
def server(served):
    s = Server(served, max_rows=16, max_queue=256)
    yield s
    s.close()


def body(prompt="7", **kw):
    return {"prompt": prompt, "steps": STEPS, "response_format": "tokens", **kw}


def tokens_of(resp) -> list:
    assert resp.status_code == 200, resp.text
    return [d["tokens"] for d in resp.json()["data"]]


def test_health_metrics_and_png(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        h = c.get("/health").json()
        assert h["status"] == "ok" and h["worker_alive"] and h["policy"] == "continuous"
        r = c.post("/v1/images/generations", json=body("3", seed=1, response_format="png"))
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        from PIL import Image

        img = np.asarray(Image.open(io.BytesIO(r.content)))
        assert img.shape == (8, 16, 3) and img.std() > 0  # the patch decoder's real pixels
        r = c.post("/v1/images/generations", json=body("3", seed=1, response_format="b64_json", n=2))
        data = r.json()["data"]
        assert len(data) == 2 and data[0]["mime_type"] == "image/png"
        assert base64.b64decode(data[0]["b64_json"]) == c.post(
            "/v1/images/generations", json=body("3", seed=1, response_format="png")).content
        r = c.post("/v1/images/generations", json=body("6", seed=2, frames=4, response_format="mp4"))
        assert r.status_code == 200 and r.headers["content-type"] == "video/mp4" and r.content[4:8] == b"ftyp"
        text = c.get("/metrics").text
        for name in ("ursa_queue_depth", "ursa_step_rows_mean", "ursa_step_seconds_total",
                     "ursa_requests_served_total"):
            assert name in text
        served = float(text.split('ursa_requests_served_total{model="digits"} ')[1].split()[0])
        assert served >= 3


def test_concurrent_requests_equal_alone_and_engine(server, served, monkeypatch):
    cases = [dict(prompt=str(i % 10), seed=100 + i, n=1 + i % 2, steps=STEPS + i % 3) for i in range(8)]
    with httpx.Client(base_url=server.url, timeout=120) as c:
        alone = [tokens_of(c.post("/v1/images/generations", json=body(**cs))) for cs in cases]
        spy = ForwardSpy(server.batcher, served.engine.model, monkeypatch)
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda cs: tokens_of(c.post("/v1/images/generations", json=body(**cs))), cases))
    assert together == alone
    shared = spy.shared()
    assert shared, f"no forward pass carried the rows of two requests: {[p['rows'] for p in spy.passes]}"
    for p in shared:  # the forward's batch is every job's cond rows plus the guided ones' uncond rows
        assert p["rows"] == sum(n * (1 + g) for _, _, n, g in p["jobs"])
    e = served.engine
    for cs, toks in zip(cases[:3], alone[:3], strict=True):
        ref = e.generate(digits.prompt_ids([int(cs["prompt"])] * cs["n"], e.model.config.pad_token_id),
                         latents_shape=(1, 4, 8), num_steps=cs["steps"], guidance_scale=3.0, seed=cs["seed"],
                         decode=False).tokens
        assert torch.equal(ref, torch.tensor(toks))


def test_one_forward_pass_carries_two_requests_at_different_steps(server, served, monkeypatch):
    """The default path (continuous policy, scalar-k sampler calls): request B, queued while A's first
    step runs, joins at the next step boundary; from then on one forward pass carries the rows of
    both, at different step indices (the forward's input holds both prompts), and both outputs equal
    their runs alone."""
    a, b = body("2", seed=41, steps=STEPS + 2), body("5", seed=42, steps=STEPS)
    with httpx.Client(base_url=server.url, timeout=120) as c:
        alone = [tokens_of(c.post("/v1/images/generations", json=x)) for x in (a, b)]
        spy = ForwardSpy(server.batcher, served.engine.model, monkeypatch, hold=True)
        with ThreadPoolExecutor(2) as pool:
            fa = pool.submit(lambda: tokens_of(c.post("/v1/images/generations", json=a)))
            assert spy.entered.wait(30), "request A never reached the model"
            fb = pool.submit(lambda: tokens_of(c.post("/v1/images/generations", json=b)))
            deadline = time.time() + 30
            while server.batcher.stats()["queued"] < 1 and time.time() < deadline:
                time.sleep(0.01)  # B waits in the queue while A's step 0 is held
            spy.go.set()
            together = [fa.result(120), fb.result(120)]
    assert together == alone
    mixed = [p for p in spy.shared() if len({k for _, k, _, _ in p["jobs"]}) >= 2]
    assert mixed, f"no forward pass mixed the step indices of two requests: {[p['jobs'] for p in spy.passes]}"
    assert len(mixed[0]["prompts"]) == 2 and len(mixed[0]["jobs"]) == 2


def _sse(lines) -> list[tuple[str, dict]]:
    out, name = [], None
    for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            out.append((name, json.loads(line[6:])))
    return out


def test_sse_progress_in_order_with_result(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        with c.stream("POST", "/v1/images/generations", json=body("5", seed=3, stream=True)) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = _sse(r.iter_lines())
        plain = tokens_of(c.post("/v1/images/generations", json=body("5", seed=3)))
    names = [n for n, _ in events]
    assert names[0] == "queued" and names[1] == "started" and names[-2:] == ["done", "result"]
    steps = [d["step"] for n, d in events if n == "step"]
    assert steps == list(range(2, STEPS + 1))  # the metric path skips its identity step 0
    assert [d["tokens"] for d in events[-1][1]["data"]] == plain


def test_cancel_frees_rows(served):
    s = Server(served, max_rows=4, max_queue=8)
    try:
        with httpx.Client(base_url=s.url, timeout=60) as c:
            long = body("1", seed=1, steps=400, stream=True)
            # DELETE a running request
            with c.stream("POST", "/v1/images/generations", json=dict(long, request_id="victim")) as r:
                lines = r.iter_lines()
                seen = []
                for line in lines:
                    if line.startswith("event: step"):
                        break
                    seen.append(line)
                assert c.get("/v1/requests/victim").json()["status"] == "running"
                assert s.batcher.stats()["active_rows"] == 1
                # running: it leaves at the next step boundary (or finishes in the current step)
                assert c.delete("/v1/requests/victim").json()["status"] == "cancelling"
                rest = [n for n, _ in _sse(lines)]
                assert rest[-1] == "cancelled"
            assert c.get("/v1/requests/victim").json()["status"] == "cancelled"  # its final status
            assert c.delete("/v1/requests/victim").status_code == 404
            # a client that disconnects cancels its request
            with c.stream("POST", "/v1/images/generations", json=dict(long, request_id="leaver")) as r:
                for line in r.iter_lines():
                    if line.startswith("event: step"):
                        break
            deadline = time.time() + 20
            while s.batcher.stats()["active_rows"] and time.time() < deadline:
                time.sleep(0.05)
            assert s.batcher.stats() == {"queued": 0, "running": 0, "active_rows": 0}
            assert s.batcher.metrics.cancelled == 2
            # the rows are free: a new request runs
            assert len(tokens_of(c.post("/v1/images/generations", json=body("2", seed=2)))) == 1
            s.batcher.stop()  # no worker: /health says so
            h = c.get("/health")
            assert h.status_code == 503 and h.json()["status"] == "error" and not h.json()["worker_alive"]
    finally:
        s.close()


def test_render_failure_is_a_terminal_error(server, served, monkeypatch):
    """A decode / encode failure answers an OpenAI-shaped 500 (plain) or ends the stream with
    ``event: failed`` (SSE); the server keeps serving."""

    def broken(frame):
        raise OSError("encoder exploded")

    monkeypatch.setattr(served, "png", broken)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/images/generations", json=body("3", seed=1, response_format="png", request_id="r1"))
        assert r.status_code == 500 and r.headers["x-request-id"] == "r1", r.text
        err = r.json()["error"]
        assert err["type"] == "server_error" and "encoder exploded" in err["message"]
        with c.stream("POST", "/v1/images/generations", json=body("3", seed=1, response_format="b64_json",
                                                                   stream=True)) as r:
            events = _sse(r.iter_lines())  # OpenAI's stream: it ends with an error event
        assert events[-1][0] == "error" and events[-1][1]["error"]["type"] == "server_error", events[-2:]
        assert "encoder exploded" in events[-1][1]["error"]["message"]
        monkeypatch.setattr(served, "frames", lambda tokens: (_ for _ in ()).throw(OSError("decoder exploded")))
        with c.stream("POST", "/v1/images/generations", json=body("3", seed=1, stream=True)) as r:
            assert [n for n, _ in _sse(r.iter_lines())][-2:] == ["done", "result"]  # tokens need no decoding
        monkeypatch.undo()
        assert c.get("/health").json()["status"] == "ok"
        assert c.post("/v1/images/generations", json=body("3", seed=1, response_format="png")).status_code == 200


def test_bad_requests_name_the_field(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        cases = [({"steps": 3}, "prompt"), (body(n=0), "n"), (body(size="big"), "size"), (body(size="15x8"), "size"),
                 (body(response_format="gif"), "response_format"), (body(prompt="12"), "prompt"),
                 (body(temperature=0), "temperature"), (body(bogus=1), "bogus"), (body(n=20), "n"),
                 (body(response_format="png", n=2), "n"), (body(seed=-1), "seed"),
                 (body(size="4096x4096", n=8), "size"), (body(latents_shape=[13, 400, 640]), "latents_shape")]
        for payload, field in cases:
            r = c.post("/v1/images/generations", json=payload)
            assert 400 <= r.status_code < 500, (payload, r.text)
            err = r.json()["error"]
            assert field in err["message"] and err["param"] == field, (payload, err)
        r = c.post("/v1/images/generations", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400
        assert c.get("/v1/requests/nope").status_code == 404
        assert c.get("/health").status_code == 200  # still serving


def test_queue_full_is_429(served):
    s = Server(served, max_rows=1, max_queue=2)
    try:
        with httpx.Client(base_url=s.url, timeout=60) as c:
            # the first runs (guidance 1: one row), two wait, the fourth is refused
            ids = [f"q{i}" for i in range(4)]
            opts = dict(steps=1000, guidance=1.0, stream=True)
            streams = []
            for rid in ids[:3]:
                cm = c.stream("POST", "/v1/images/generations", json=body("4", request_id=rid, **opts))
                streams.append((cm, cm.__enter__()))
                if rid == ids[0]:  # running before the others queue
                    lines = streams[0][1].iter_lines()  # kept: a closed iterator closes the stream (a cancel)
                    for line in lines:
                        if line.startswith("event: started"):
                            break
            assert [r.status_code for _, r in streams] == [200] * 3
            assert s.batcher.stats() == {"queued": 2, "running": 1, "active_rows": 1}
            r = c.post("/v1/images/generations", json=body("4", request_id=ids[3], **opts))
            assert r.status_code == 429 and "queue full" in r.json()["error"]["message"], r.text[:300]
            assert r.headers["retry-after"] == "1"
            assert "ursa_requests_rejected_total{model=\"digits\"} 1" in c.get("/metrics").text
            for rid in ids[:3]:
                c.delete(f"/v1/requests/{rid}")
            for cm, _ in streams:
                cm.__exit__(None, None, None)
    finally:
        s.close()


def test_load_run_loses_nothing(server):
    """200 requests from 8 clients, 3 steps each: every one answered; latency percentiles reported."""
    latencies, errors = [], []

    def client(i):
        with httpx.Client(base_url=server.url, timeout=120) as c:
            for j in range(25):
                t0 = time.perf_counter()
                r = c.post("/v1/images/generations", json=body(str((i + j) % 10), seed=i * 100 + j, steps=3))
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200 or len(r.json()["data"]) != 1:
                    errors.append(r.text)

    before = server.batcher.metrics.served
    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(client, range(8)))
    wall = time.perf_counter() - t0
    assert not errors and len(latencies) == 200
    assert server.batcher.metrics.served - before == 200
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    print(f"\nload: 200 requests, 8 clients, {wall:.1f}s, {200 / wall:.1f} req/s, latency p50 {p50 * 1e3:.0f} ms "
          f"p95 {p95 * 1e3:.0f} ms p99 {p99 * 1e3:.0f} ms, mean rows/step "
          f"{server.batcher.metrics.rows / server.batcher.metrics.steps:.1f}")


def test_cli_serve_subprocess(tmp_path):
    """``ursa-engine serve`` as a process: it comes up on a free port, answers a curl-like POST with a
    PNG, and exits on SIGTERM; bad options are one-line usage errors."""
    import subprocess
    import sys

    from ursa_engine.cli import main

    assert main(["serve", "--port", "70000"]) == 2
    assert main(["serve", "--max-rows", "0"]) == 2
    assert main(["serve", "--max-tokens", "0"]) == 2
    if not torch.cuda.is_available():
        assert main(["serve", "--graphs"]) == 2  # CUDA graphs need a CUDA engine: a usage error
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ursa_engine.cli", "serve", "--port", str(port), "--log-level",
                             "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 90
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()[-2000:]
            time.sleep(0.2)
        r = httpx.post(url + "/v1/images/generations", json={"prompt": "8", "steps": 4, "response_format": "png"},
                       timeout=60)
        assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        proc.terminate()
        proc.wait(30)
