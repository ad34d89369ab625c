"""No job lost (issue 20 item 3): SIGTERM drains ``ursa-engine serve``, disconnects cancel, a chaos run.

* ``ursa-engine serve`` as a subprocess on a free loopback port (the bundled digits model): after
  SIGTERM new requests get 503 + ``Retry-After``, every accepted request ends as done or cancelled
  with the drain's notice, and the process exits 0.
* A client that disconnects (plain or streaming request) cancels its job and frees its rows.
* A bounded chaos run (loopback, a few client threads): random sizes, DELETEs, disconnects,
  malformed and over-limit bodies. Every accepted job ends exactly once (done, cancelled or failed
  with a reason), the server's ledger and the clients' view agree, RSS after the run is at most
  1.2x RSS after warm-up, and sampled completed outputs equal their solo runs.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_serve import Server, _free_port  # noqa: E402

SEED0 = 10**6  # chaos request i has seed SEED0 + i
CHAOS_REQUESTS = int(os.environ.get("URSA_CHAOS_REQUESTS", "300"))
TERMINAL = ("done", "cancelled", "failed")


def _rss() -> int:
    """This process's resident set size in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _body(prompt="7", **kw):
    return {"prompt": prompt, "steps": 4, "response_format": "tokens", **kw}


# ---------------------------------------------------------------------------------------- SIGTERM
def test_sigterm_drains_and_exits_zero(tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "ursa_engine", "serve", "--port", str(port), "--drain-seconds", "2",
                             "--log-level", "info"], stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            deadline = time.time() + 90
            while True:
                try:
                    if c.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None and time.time() < deadline, "the server did not start"
                time.sleep(0.2)
            results: dict[str, httpx.Response] = {}

            def post(rid, steps, stream=False):
                with httpx.Client(base_url=url, timeout=60) as cc:
                    body = _body(steps=steps, request_id=rid, seed=1, stream=stream)
                    if not stream:
                        results[rid] = cc.post("/v1/images/generations", json=body)
                        return
                    with cc.stream("POST", "/v1/images/generations", json=body) as r:
                        lines = [ln for ln in r.iter_lines() if ln.startswith("event:")]
                        results[rid] = (r.status_code, lines)

            # short jobs finish within the grace; very long ones are cancelled with the drain's notice
            # long jobs (1000 steps: seconds) outlive the 2 s grace and are cancelled with the drain's notice;
            # short ones, sent just before the signal, finish
            plan = [("long0", 1000, False), ("long1", 1000, True), ("short0", 8, False), ("short1", 8, True)]
            threads = [threading.Thread(target=post, args=p) for p in plan]
            for t in threads[:2]:
                t.start()
            deadline = time.time() + 30
            while (h := c.get("/health").json())["running"] < 2:
                assert time.time() < deadline and not results, (h, results)
                time.sleep(0.02)
            for t in threads[2:]:
                t.start()
            deadline = time.time() + 30
            while (h := c.get("/health").json())["running"] + h["queued"] + len(results) < 4:  # the short ones in
                assert time.time() < deadline
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            deadline = time.time() + 10
            while (h := c.get("/health")).status_code != 503:
                assert time.time() < deadline, "no drain after SIGTERM"
                time.sleep(0.02)
            assert h.json()["status"] == "draining"
            r = c.post("/v1/images/generations", json=_body())
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
            assert "shutting down" in r.json()["error"]["message"]
            for t in threads:
                t.join(60)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log.seek(0)
    text = log.read()
    for rid in ("short0",):
        assert results[rid].status_code == 200 and results[rid].json()["id"] == rid
    assert results["short1"][0] == 200 and results["short1"][1][-2:] == ["event: done", "event: result"]
    r = results["long0"]
    assert r.status_code == 409 and "drain" in r.json()["error"]["message"], r.text
    assert results["long1"][1][-1] == "event: cancelled"
    assert "drained: " in text and " 0 failed, 2 cancelled" in text, text  # the long pair; the short ones done


# -------------------------------------------------------------------------------------- disconnects
def test_disconnect_cancels_and_frees_rows(served):
    s = Server(served, max_rows=16, max_queue=64)
    try:
        long = _body(steps=1000, seed=3)
        with httpx.Client(base_url=s.url, timeout=60) as c:
            # plain request: the client gives up (read timeout closes the connection)
            with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=s.url, timeout=1.0) as impatient:
                impatient.post("/v1/images/generations", json=dict(long, request_id="plain"))
            # streaming request: the client closes after the first step
            with c.stream("POST", "/v1/images/generations", json=dict(long, request_id="streamed", stream=True)) as r:
                for line in r.iter_lines():
                    if line.startswith("event: step"):
                        break
            deadline = time.time() + 20
            while s.batcher.stats()["running"] and time.time() < deadline:
                time.sleep(0.05)
            assert s.batcher.stats() == {"queued": 0, "running": 0, "active_rows": 0}
            for rid in ("plain", "streamed"):
                assert c.get(f"/v1/requests/{rid}").json()["status"] == "cancelled", rid
            assert s.batcher.metrics.cancelled == 2 and s.batcher.metrics.ended_twice == 0
            r = c.post("/v1/images/generations", json=_body(seed=1))  # the rows are free
            assert r.status_code == 200
    finally:
        s.close()


# ------------------------------------------------------------------------------------------- chaos
def test_chaos_no_job_lost(served):
    s = Server(served, max_rows=8, max_queue=3)  # a short queue: some requests get 429
    ends: Counter = Counter()
    end_status: dict[str, str] = {}
    submitted: set[str] = set()
    by_seed: dict[int, str] = {}  # the server's job id of each chaos request (the server may namespace ids)
    finish, submit = s.batcher._finish, s.batcher.submit

    def spy_finish(job, status, error=None):
        if job.status not in TERMINAL:
            ends[job.id] += 1
            end_status[job.id] = status
            if status == "failed":
                assert error is not None and str(error)  # failed with a reason
        finish(job, status, error)

    def spy_submit(job, job_id=None):
        out = submit(job, job_id)
        submitted.add(out.id)
        by_seed[out.request.seed] = out.id
        return out

    s.batcher._finish, s.batcher.submit = spy_finish, spy_submit
    rng = random.Random(20)
    kinds = ["ok"] * 10 + ["stream"] * 3 + ["delete"] * 3 + ["disconnect"] * 2 + ["stream_disconnect"] * 2 + \
        ["malformed"] * 2 + ["over"] * 2
    plan = [(i, rng.choice(kinds), rng.randint(1, 2), rng.randint(2, 12), rng.randint(0, 9)) for i in
            range(CHAOS_REQUESTS)]
    client_view: dict[str, str] = {}  # request id -> what the client saw
    done_bodies: dict[str, tuple] = {}
    counts: Counter = Counter()
    lock = threading.Lock()

    def one(c, i, kind, n, steps, digit):
        rid = f"chaos{i}"
        body = _body(str(digit), n=n, steps=steps, seed=SEED0 + i, request_id=rid)
        if kind == "malformed":
            r = c.post("/v1/images/generations", content=b'{"prompt": "7", "n": ',
                       headers={"content-type": "application/json"})
            assert r.status_code in (400, 422), r.text
            return "rejected_400", None
        if kind == "over":
            r = c.post("/v1/images/generations", json=dict(body, n=10**6) if i % 2 else dict(body, steps=10**6))
            assert r.status_code == 400, r.text
            return "rejected_400", None
        if kind in ("stream", "stream_disconnect"):
            with c.stream("POST", "/v1/images/generations", json=dict(body, stream=True)) as r:
                if r.status_code != 200:
                    r.read()
                    return f"refused_{r.status_code}", None
                names = []
                for line in r.iter_lines():
                    if line.startswith("event:"):
                        names.append(line.split(": ", 1)[1])
                        if kind == "stream_disconnect" and names[-1] == "step":
                            return "disconnected", rid
                return ("done" if names[-2:] == ["done", "result"] else names[-1]), rid
        if kind == "disconnect":
            try:
                with httpx.Client(base_url=s.url, timeout=rng.uniform(0.01, 0.2)) as quick:
                    r = quick.post("/v1/images/generations", json=dict(body, steps=steps * 20))
            except httpx.TimeoutException:
                return "disconnected", rid  # accepted or not: the server's ledger decides
        else:
            if kind == "delete":
                def later():
                    time.sleep(rng.uniform(0, 0.05))
                    c.delete(f"/v1/requests/{rid}")
                threading.Thread(target=later).start()
            r = c.post("/v1/images/generations", json=body)
        if r.status_code == 200:
            with lock:
                done_bodies[rid] = (body, r.json()["data"])
            return "done", rid
        if r.status_code == 409:
            return "cancelled", rid
        if r.status_code in (429, 503):
            assert "retry-after" in r.headers
            return f"refused_{r.status_code}", None
        if r.status_code == 500:
            return "failed", rid
        raise AssertionError(f"{kind}: {r.status_code} {r.text}")

    def worker(part):
        with httpx.Client(base_url=s.url, timeout=60) as c:
            for item in part:
                seen, rid = one(c, *item)
                with lock:
                    counts[seen] += 1
                    if rid is not None:
                        client_view[rid] = seen

    try:
        with httpx.Client(base_url=s.url, timeout=60) as c:  # warm-up
            for i in range(20):
                assert c.post("/v1/images/generations", json=_body(str(i % 10), n=1 + i % 2, seed=i)).status_code == 200
        rss_warm = _rss()
        t0 = time.time()
        threads = [threading.Thread(target=worker, args=(plan[k::4],)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        wall = time.time() - t0
        deadline = time.time() + 20
        while (s.batcher.stats()["running"] or s.batcher.stats()["queued"]) and time.time() < deadline:
            time.sleep(0.05)
        assert s.batcher.stats() == {"queued": 0, "running": 0, "active_rows": 0}
        assert not s.batcher._jobs  # the server's job table holds nothing pending
        rss_after = _rss()
        # every accepted job ended exactly once; none missing; the clients agree with the ledger
        chaos_ids = {by_seed[SEED0 + i] for i in range(CHAOS_REQUESTS) if SEED0 + i in by_seed}
        assert all(ends[j] == 1 for j in submitted), [j for j in submitted if ends[j] != 1]
        assert s.batcher.metrics.ended_twice == 0
        for rid, seen in client_view.items():
            job = by_seed.get(SEED0 + int(rid[len("chaos"):]))
            if seen == "disconnected":
                assert job is None or end_status[job] in ("done", "cancelled")
            else:
                assert job is not None and end_status[job] == seen, (rid, seen, job and end_status.get(job))
        # completed outputs equal their solo runs (a sample)
        with httpx.Client(base_url=s.url, timeout=60) as c:
            for rid in sorted(done_bodies)[:: max(1, len(done_bodies) // 4)][:4]:
                body, data = done_bodies[rid]
                r = c.post("/v1/images/generations", json=dict(body, request_id=None))
                assert r.status_code == 200 and r.json()["data"] == data, rid
        by_status = Counter(end_status[j] for j in chaos_ids)
        report = {"requests": CHAOS_REQUESTS, "wall_s": round(wall, 1), "client_view": dict(counts),
                  "accepted": len(chaos_ids), "ended": dict(by_status), "rss_warm_mb": round(rss_warm / 2**20, 1),
                  "rss_after_mb": round(rss_after / 2**20, 1)}
        print("chaos:", json.dumps(report))
        assert len(chaos_ids) > CHAOS_REQUESTS // 3 and by_status["done"] and by_status["cancelled"]
        assert rss_after <= 1.2 * rss_warm, report
    finally:
        s.close()


# ------------------------------------------------------------------------------------- Batcher.drain
def test_batcher_drain_finishes_then_cancels_with_notice(served):
    from ursa_engine.serve.batcher import Batcher, Cancelled, Draining, GenerationRequest

    def req(steps, seed):
        return GenerationRequest(prompt_ids=served.prompt_ids("7"), negative_ids=served.prompt_ids(""),
                                 latents_shape=(1, 4, 8), num_steps=steps, seed=seed)

    with Batcher(served.engine, max_rows=16) as b:  # a long grace: every accepted job finishes
        jobs = [b.submit(req(8, s)) for s in range(3)]
        assert b.drain(30) == {"done": 3, "failed": 0, "cancelled": 0}
        assert all(j.status == "done" for j in jobs) and b.metrics.ended_twice == 0
        with pytest.raises(Draining, match="shutting down"):
            b.submit(req(8, 9))
    with Batcher(served.engine, max_rows=2) as b:  # no grace: running and queued jobs end with the notice
        jobs = [b.submit(req(1000, s)) for s in range(3)]  # 2 rows each (guided): one runs, two wait
        while jobs[0].status != "running":
            time.sleep(0.01)
        assert b.drain(0) == {"done": 0, "failed": 0, "cancelled": 3}
        for j in jobs:
            with pytest.raises(Cancelled, match="drain"):
                j.future.result(0)
            assert j.events[-1]["event"] == "cancelled" and "drain" in j.events[-1]["message"]
        assert b.stats() == {"queued": 0, "running": 0, "active_rows": 0} and b.alive
