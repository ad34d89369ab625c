"""Issue 20 item 2: API keys, request-id namespaces, limits, CORS and the bind warning of ``ursa-engine serve``.

Servers run on 127.0.0.1 (free ports) around the bundled digits model; requests are a few steps.
"""

from __future__ import annotations

import re
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from test_serve import Server as LoopbackServer  # noqa: E402

from ursa_engine.serve import (  # noqa: E402
    Batcher,
    GenerationRequest,
    security,  # noqa: E402
)
from ursa_engine.serve.models import ServedModel  # noqa: E402
from ursa_engine.serve.security import Limits, bind_warning, keys_from_env, new_id  # noqa: E402

KEY_A, KEY_B = "key-alpha-0123456789", "key-beta-9876543210"
A, B = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}
LONG = {"prompt": "4", "steps": 1000, "guidance": 1.0, "stream": True, "response_format": "tokens"}


def short(**kw):
    return {"prompt": "7", "steps": 2, "response_format": "tokens", **kw}


class Server(LoopbackServer):
    """The loopback server of test_serve with these limits (batch budget 8 rows, queue 16 by default)."""

    def __init__(self, served: ServedModel, limits: Limits, **batcher_options):
        super().__init__(served, limits, **{"max_rows": 8, "max_queue": 16, **batcher_options})


@pytest.fixture(scope="module")
def keyed(served):
    s = Server(served, Limits(api_keys=(KEY_A, KEY_B), max_body_bytes=4096, max_prompt_chars=64, max_n=2,
                              max_concurrent_per_key=1))
    yield s
    s.close()


def _wait_started(lines) -> None:
    for line in lines:
        if line.startswith("event: started"):
            return
    raise AssertionError("the stream ended before its job started")


# ---------------------------------------------------------------------------------------------- keys
def test_every_route_but_health_needs_a_key(keyed):
    with httpx.Client(base_url=keyed.url, timeout=60) as c:
        assert c.get("/health").status_code == 200
        refusals = [
            c.get("/metrics"), c.get("/openapi.json"), c.get("/v1/requests/x"), c.delete("/v1/requests/x"),
            c.get("/v1/requests/x/events"), c.post("/v1/images/generations", json=short()),
            c.post("/v1/images/generations", json=short(), headers={"Authorization": "Bearer wrong"}),
            c.post("/v1/images/generations", json=short(), headers={"Authorization": f"Basic {KEY_A}"}),
            c.post("/v1/images/generations", json=short(), headers={"Authorization": KEY_A}),
            c.post("/v1/images/generations", json=short(), headers={"Authorization": f"Bearer {KEY_A}x"}),
            c.post("/v1/images/generations", json=short(), headers={"Authorization": f"Bearer {KEY_A[:-1]}"}),
        ]
        for r in refusals:
            assert r.status_code == 401, (r.request.url, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            assert r.json() == {"error": {"message": "unauthorized", "type": "authentication_error", "param": None}}
        assert keyed.batcher.metrics.served == 0 and keyed.batcher.stats()["queued"] == 0  # nothing ran
        assert c.get("/metrics", headers=A).status_code == 200
        assert c.get("/v1/requests/x", headers=B).status_code == 404
        r = c.post("/v1/images/generations", json=short(), headers=A)
        assert r.status_code == 200 and len(r.json()["data"]) == 1, r.text


def test_metrics_public_and_no_keys(served):
    s = Server(served, Limits(api_keys=(KEY_A,), metrics_public=True))
    try:
        with httpx.Client(base_url=s.url, timeout=60) as c:
            assert c.get("/metrics").status_code == 200
            assert c.get("/v1/requests/x").status_code == 401
    finally:
        s.close()


def test_keys_compared_in_constant_time(monkeypatch):
    """Every configured key goes through hmac.compare_digest, a match included (no early exit)."""
    calls = []
    real = security.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", spy)
    limits = Limits(api_keys=("k1-aaaa", "k2-bbbb", "k3-cccc"))
    for header, owner in ((b"Bearer k1-aaaa", "k0"), (b"Bearer k3-cccc", "k2"), (b"Bearer nope", None),
                          (None, None), (b"Basic k1-aaaa", None)):
        calls.clear()
        assert limits.owner(header) == owner
        assert len(calls) == 3 and {b for _, b in calls} == {b"k1-aaaa", b"k2-bbbb", b"k3-cccc"}
    assert Limits().owner(None) == "anon"
    with pytest.raises(ValueError, match="api_key"):
        Limits(api_keys=("has space",))
    assert keys_from_env(" a1, b2,,") == ["a1", "b2"] and keys_from_env(None) == []


def test_keys_through_http_use_compare_digest(keyed, monkeypatch):
    calls = []
    real = security.hmac.compare_digest
    monkeypatch.setattr(security.hmac, "compare_digest", lambda a, b: calls.append(b) or real(a, b))
    with httpx.Client(base_url=keyed.url, timeout=60) as c:
        assert c.get("/v1/requests/x", headers={"Authorization": "Bearer guess"}).status_code == 401
    assert sorted(calls) == sorted([KEY_A.encode(), KEY_B.encode()])


# ----------------------------------------------------------------------------------------------- ids
def test_request_ids_are_random():
    ids = {new_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{22}", i) for i in ids)  # 22 x 6 = 132 bits >= 122
    chars = "".join(ids)
    assert len(set(chars)) == 64  # the whole urlsafe alphabet shows up: not a counter or a hex clock


def test_server_made_ids_and_cross_key_404(keyed):
    with httpx.Client(base_url=keyed.url, timeout=60) as c:
        r = c.post("/v1/images/generations", json=short(), headers=A)
        rid = r.json()["id"]
        assert r.status_code == 200 and re.fullmatch(r"[A-Za-z0-9_-]{22}", rid) and r.headers["x-request-id"] == rid
        assert c.get(f"/v1/requests/{rid}", headers=A).json()["status"] == "done"
        assert c.get(f"/v1/requests/{rid}", headers=B).status_code == 404
        # a client-chosen id is the caller's own: another key sees nothing and may use the same id
        with c.stream("POST", "/v1/images/generations", json=dict(LONG, request_id="job1"), headers=A) as r:
            assert r.status_code == 200 and r.headers["x-request-id"] == "job1"
            lines = r.iter_lines()
            _wait_started(lines)
            for method, path in (("GET", "/v1/requests/job1"), ("GET", "/v1/requests/job1/events"),
                                 ("DELETE", "/v1/requests/job1")):
                other = c.request(method, path, headers=B)
                assert other.status_code == 404, (method, path, other.text)
                assert "job1" in other.json()["error"]["message"] and other.json()["error"]["param"] == "request_id"
            st = c.get("/v1/requests/job1", headers=A).json()
            assert st == {"id": "job1", "status": "running", "step": st["step"], "steps": 1000}
            r2 = c.post("/v1/images/generations", json=short(request_id="job1"), headers=B)
            assert r2.status_code == 200 and r2.json()["id"] == "job1", r2.text
            assert c.delete("/v1/requests/job1", headers=A).json()["status"] == "cancelling"
            events = [line for line in lines if line.startswith("data:")]
            assert '"id": "job1"' in events[-1] and "k0:" not in "".join(events)  # the namespace stays inside
        assert c.get("/v1/requests/job1", headers=A).json()["status"] == "cancelled"
        assert c.get("/v1/requests/job1", headers=B).json()["status"] == "done"


# -------------------------------------------------------------------------------------------- limits
def test_limits_name_their_field(keyed, served, monkeypatch):
    tokenized = []
    real = served.prompt_ids
    monkeypatch.setattr(served, "prompt_ids", lambda *a, **k: tokenized.append(a) or real(*a, **k))
    with httpx.Client(base_url=keyed.url, timeout=60, headers=A) as c:
        for payload, field in ((short(prompt="7" * 65), "prompt"), (short(negative_prompt="x" * 65),
                                                                      "negative_prompt"), (short(n=3), "n")):
            r = c.post("/v1/images/generations", json=payload)
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == field and field in err["message"], r.text
            assert "max_" in err["message"]
        assert tokenized == []  # refused before tokenizing
        assert c.post("/v1/images/generations", json=short(prompt="a digit 7" + " " * 55)).status_code == 200
        # body bytes: announced (Content-Length) and streamed without a length (chunked)
        big = b'{"prompt": "7", "negative_prompt": "' + b" " * 5000 + b'"}'
        r = c.post("/v1/images/generations", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["param"] == "body" and "4096" in r.text, r.text

        def chunks():
            for i in range(0, len(big), 1000):
                yield big[i:i + 1000]

        r = c.post("/v1/images/generations", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["param"] == "body", r.text
        r = c.post("/v1/images/generations", content=iter([b'{"prompt": "7", ', b'"steps": 2, "response_format": '
                                                           b'"tokens"}']), headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text  # a chunked body under the limit is replayed whole
        assert c.get("/health").status_code == 200


def test_concurrency_per_key_is_429(keyed):
    with httpx.Client(base_url=keyed.url, timeout=60) as c:
        with c.stream("POST", "/v1/images/generations", json=dict(LONG, request_id="hog"), headers=A) as r:
            lines = r.iter_lines()
            _wait_started(lines)
            over = c.post("/v1/images/generations", json=short(), headers=A)
            assert over.status_code == 429 and over.headers["retry-after"] == "1", over.text
            assert over.json()["error"]["param"] == "max_concurrent_per_key"
            assert c.post("/v1/images/generations", json=short(), headers=B).status_code == 200  # B has its own
            c.delete("/v1/requests/hog", headers=A)
            assert [line for line in lines if line.startswith("event:")][-1] == "event: cancelled"
        deadline = time.time() + 10
        while keyed.batcher.stats()["running"] and time.time() < deadline:
            time.sleep(0.05)
        r = c.post("/v1/images/generations", json=short(), headers=A)  # the slot came back
        assert r.status_code == 200, r.text


def test_max_rows_bounds_rows_across_shapes(served):
    """Jobs of new latent shapes used to be admitted whatever ran (a budget per shape): now the rows
    in flight across all shapes stay within max_rows."""
    b = Batcher(served.engine, max_rows=2, max_queue=16)
    prompt = served.prompt_ids("3")
    shapes = [(1, 2, 4), (1, 4, 2), (1, 2, 2), (1, 4, 4)]
    jobs = [b.submit(GenerationRequest(prompt_ids=prompt, latents_shape=s, n=1, num_steps=2, guidance_scale=1.0,
                                       seed=i)) for i, s in enumerate(shapes)]
    with b._lock:
        b._admit()
        assert sum(j.rows_now() for j in b._running) == 2 and len(b._queue) == 2
    seen = []
    admit = b._admit

    def spy():
        out = admit()
        seen.append(sum(j.rows_now() for j in b._running))
        return out

    b._admit = spy
    with b:
        for j in jobs:
            j.future.result(timeout=60)
    assert max(seen) <= 2 and all(j.status == "done" for j in jobs)


# ------------------------------------------------------------------------------------------ CORS, bind
def test_cors_only_when_asked(served):
    origin = "https://app.example"
    plain = Server(served, Limits())
    cors = Server(served, Limits(api_keys=(KEY_A,), cors_origins=(origin,)))
    preflight = {"Origin": origin, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    try:
        with httpx.Client(timeout=60) as c:
            r = c.get(plain.url + "/health", headers={"Origin": origin})
            assert r.status_code == 200 and not any(h.startswith("access-control-") for h in r.headers)
            r = c.options(plain.url + "/v1/images/generations", headers=preflight)
            assert not any(h.startswith("access-control-") for h in r.headers)
            r = c.options(cors.url + "/v1/images/generations", headers=preflight)  # no key on a preflight
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
            r = c.get(cors.url + "/metrics", headers={"Origin": origin, **A})
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
            r = c.get(cors.url + "/health", headers={"Origin": "https://evil.example"})
            assert "access-control-allow-origin" not in r.headers
            assert c.get(cors.url + "/metrics", headers={"Origin": origin}).status_code == 401
    finally:
        plain.close()
        cors.close()


def test_bind_warning(monkeypatch, capsys):
    assert bind_warning("127.0.0.1", Limits()) is None and bind_warning("::1", Limits()) is None
    assert bind_warning("localhost", Limits()) is None
    assert bind_warning("0.0.0.0", Limits(api_keys=("k-1",))) is None
    assert "without an API key" in bind_warning("0.0.0.0", Limits())
    from ursa_engine.serve import app as app_module

    class Stop(Exception):
        pass

    def no_load(*a, **k):
        raise Stop

    monkeypatch.setattr(app_module.ServedModel, "load", no_load)
    for host, keys, warned in (("0.0.0.0", (), True), ("127.0.0.1", (), False), ("0.0.0.0", ("k-1",), False)):
        with pytest.raises(Stop):
            app_module.serve(host=host, limits=Limits(api_keys=keys))
        err = capsys.readouterr().err
        assert (f"WARNING: serving on {host} without an API key" in err) == warned, err


def test_cli_flags(monkeypatch):
    from ursa_engine.cli import main

    assert main(["serve", "--api-key", "two words"]) == 2
    assert main(["serve", "--max-body-bytes", "0"]) == 2
    assert main(["serve", "--max-concurrent-per-key", "0"]) == 2
    got = {}
    from ursa_engine.serve import app as app_module

    monkeypatch.setattr(app_module, "serve", lambda *a, **k: got.update(k))
    monkeypatch.setenv("URSA_API_KEY", "env-1,env-2")
    assert main(["serve", "--api-key", "flag-1", "--metrics-public", "--max-n", "3", "--cors-origin", "https://x.y",
                 "--max-concurrent-per-key", "2"]) == 0
    lim = got["limits"]
    assert lim.api_keys == ("flag-1", "env-1", "env-2") and lim.metrics_public and lim.max_n == 3
    assert lim.cors_origins == ("https://x.y",) and lim.max_concurrent_per_key == 2
