"""The continuous batcher without HTTP (issue 14): tokens independent of the batch, joins at step
boundaries, the row budget, uncond rows only for guided rows, policies, and (GPU) CUDA graph buckets.
Spies on the model's forward and the scheduler's step show that batching happened: one forward pass
carried the rows of two requests at different steps, and the per-row sampler mixed steps in one call."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from serve_spy import ForwardSpy, SamplerSpy

from ursa_engine import digits, rowwise
from ursa_engine.demo import DigitsModel
from ursa_engine.serve import Batcher, Cancelled, GenerationRequest, QueueFull


@pytest.fixture(scope="module")
def engine():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield DigitsModel.load().engine
    torch.set_num_threads(threads)


def request(engine, label, seed, *, n=1, steps=6, guidance=3.0, trunc=0.9, **kw):
    pad = engine.model.config.pad_token_id
    return GenerationRequest(prompt_ids=digits.prompt_ids([label], pad)[0], latents_shape=kw.pop("shape", (1, 4, 8)),
                             n=n, num_steps=steps, guidance_scale=guidance, guidance_trunc=trunc, seed=seed, **kw)


CASES = [dict(label=3, seed=5, steps=6), dict(label=7, seed=9, n=2, steps=9, trunc=0.5),
         dict(label=1, seed=2, steps=7, guidance=1.0), dict(label=0, seed=4, steps=8, temperature=0.8),
         dict(label=5, seed=6, steps=6, shape=(2, 4, 8)), dict(label=9, seed=8, n=3, steps=5, guidance=2.0)]


def run_all(batcher, engine, cases, stagger=0.0):
    jobs = []
    for c in cases:
        c = dict(c)
        jobs.append(batcher.submit(request(engine, c.pop("label"), c.pop("seed"), **c)))
        time.sleep(stagger)
    return [j.future.result(120) for j in jobs]


def test_tokens_do_not_depend_on_the_batch(engine, monkeypatch):
    alone = []
    with Batcher(engine, max_rows=8, policy="sequential") as b:
        alone = run_all(b, engine, CASES)
    with Batcher(engine, max_rows=8) as b:
        spy = ForwardSpy(b, engine.model, monkeypatch)
        together = run_all(b, engine, CASES, stagger=0.003)  # joins at varied steps
        assert spy.shared(), "no forward pass carried the rows of two requests"
        monkeypatch.undo()
    with Batcher(engine, max_rows=8, per_row_sampler=True) as b:  # rowwise.step_rows: each row its own k
        per_row = run_all(b, engine, CASES)
    with Batcher(engine, max_rows=16, policy="static") as b:
        static = run_all(b, engine, CASES)
    pad = engine.model.config.pad_token_id
    for c, a, t, p, s in zip(CASES, alone, together, per_row, static, strict=True):
        assert torch.equal(a, t) and torch.equal(a, p) and torch.equal(a, s), c
        ref = engine.generate(digits.prompt_ids([c["label"]] * c.get("n", 1), pad),
                              latents_shape=c.get("shape", (1, 4, 8)), num_steps=c["steps"],
                              guidance_scale=c.get("guidance", 3.0), guidance_trunc=c.get("trunc", 0.9),
                              temperature=c.get("temperature", 1.0), seed=c["seed"], decode=False).tokens
        assert torch.equal(ref, a), c


@pytest.mark.parametrize("per_row", [False, True], ids=["scalar-k", "per-row"])
def test_batching_happened_spied_on_forward_and_sampler(engine, monkeypatch, per_row):
    """B is queued while A's first forward pass is held; after it joins, one forward pass carries the
    rows of A and B (two prompts in the forward's input) at different step indices. The default
    sampler path (``per_row_sampler=False``) then makes one scalar-k call per step index of that
    pass (never mixing steps in one call, by design: :func:`~ursa_engine.serve.jobs.row_groups`);
    ``per_row_sampler=True`` makes one call whose rows carry both step indices. Tokens equal alone."""
    cases = [dict(label=2, seed=41, steps=8), dict(label=5, seed=42, steps=8)]  # one scheduler: one row group
    with Batcher(engine, max_rows=8, policy="sequential") as b:
        alone = run_all(b, engine, cases)
    with Batcher(engine, max_rows=8, per_row_sampler=per_row) as b:
        fwd = ForwardSpy(b, engine.model, monkeypatch, hold=True)
        calls = SamplerSpy(monkeypatch, fwd)
        ja = b.submit(request(engine, **cases[0]))
        assert fwd.entered.wait(30), "request A never reached the model"
        jb = b.submit(request(engine, **cases[1]))  # queued: the worker is held inside A's first forward
        fwd.go.set()
        together = [ja.future.result(120), jb.future.result(120)]
        monkeypatch.undo()
    assert all(torch.equal(x, y) for x, y in zip(alone, together, strict=True))
    mixed = [i for i, p in enumerate(fwd.passes) if p in fwd.shared() and len({j[1] for j in p["jobs"]}) >= 2]
    assert mixed, f"no forward pass mixed two requests' steps: {[p['jobs'] for p in fwd.passes]}"
    for i in mixed:
        p = fwd.passes[i]
        assert p["rows"] == sum(n * (1 + g) for _, _, n, g in p["jobs"])
        steps = sorted({j[1] for j in p["jobs"]})
        its = [c for c in calls.calls if c["forward"] == i]
        assert sorted({k for c in its for k in c["ks"]}) == steps, (steps, its)  # every row was stepped
        if per_row:  # one call carries the rows of both steps
            assert any(c["ks"] == steps for c in its), its
        else:  # one scalar-k call per step index
            assert all(len(c["ks"]) == 1 for c in its), its
    if not per_row:
        assert all(len(c["ks"]) == 1 for c in calls.calls)


def test_budget_join_and_uncond_rows(engine):
    """Rows of each step: cond rows + uncond rows of the guided ones only; never over the budget."""
    seen = []
    with Batcher(engine, max_rows=5) as b:
        orig = b._forward_and_step

        def spy(jobs):
            rows = orig(jobs)
            seen.append((rows, sum(j.request.n for j in jobs), sum(j.request.n for j in jobs if j.guided[j.k]),
                         tuple(sorted((j.id, j.k) for j in jobs))))
            return rows

        b._forward_and_step = spy
        # guided for t < 0.5: 2 rows early, 1 row late; two of them fit the budget of 5 rows at first
        jobs = [b.submit(request(engine, i, i, steps=10, trunc=0.5), job_id=f"j{i}") for i in range(4)]
        for j in jobs:
            j.future.result(120)
    for rows, cond, guided, _ in seen:
        assert rows == cond + guided <= 5
    first = {jid for _, _, _, members in seen[:1] for jid, _ in members}
    assert first <= {"j0", "j1"}
    # a later job joined while others were mid-run: some step mixes different k
    assert any(len({k for _, k in members}) > 1 for *_, members in seen)
    assert any(rows < 2 * cond for rows, cond, _, _ in seen)  # truncated rows paid no uncond row
    with pytest.raises(ValueError, match="n: 4 samples need 8 rows"):
        Batcher(engine, max_rows=5).prepare(request(engine, 1, 1, n=4))


def test_queue_bound_cancel_and_failure(engine):
    b = Batcher(engine, max_rows=2, max_queue=2)  # not started: nothing leaves the queue
    j1 = b.submit(request(engine, 1, 1))
    b.submit(request(engine, 2, 2))
    with pytest.raises(QueueFull, match="queue full: 2 requests waiting"):
        b.submit(request(engine, 3, 3))
    assert b.cancel(j1.id) and not b.cancel(j1.id)
    with pytest.raises(Cancelled):
        j1.future.result(1)
    b.start()
    # a request whose step fails fails alone: its batch neighbours and the loop go on
    job = b.prepare(request(engine, 4, 4, steps=30, guidance=1.0))  # 1 row: both fit
    job.cond_ids = torch.tensor([[10**6, 1]])  # past the embedding table: the forward raises
    neighbour = b.submit(request(engine, 6, 6, steps=30, guidance=1.0))
    b.submit(job)
    with pytest.raises(IndexError):  # the embedding's error, on this request only
        job.future.result(60)
    ok = b.submit(request(engine, 5, 5))
    assert ok.future.result(60).shape == (1, 1, 4, 8)
    alone = Batcher(engine, max_rows=2).start()
    try:
        ref = alone.submit(request(engine, 6, 6, steps=30, guidance=1.0)).future.result(60)
        assert torch.equal(neighbour.future.result(60), ref)
    finally:
        alone.stop()
    assert b.metrics.failed == 1
    b.stop()


def drive(b, schedule: dict[int, list]) -> list:
    """Run a not-started batcher's loop by hand (deterministic joins): before iteration ``i`` submit
    ``schedule[i]``; run until nothing is left; the jobs' tokens in submission order."""
    jobs, i = [], 0
    while True:
        for rq in schedule.get(i, []):
            jobs.append(b.submit(rq))
        with b._lock:
            b._drop_cancelled()
            batch = b._admit()
        if not batch and i > max(schedule):
            return [j.future.result(0) for j in jobs]
        if batch:
            b.step(batch)
        i += 1


def test_one_sampler_call_mixes_steps(engine, monkeypatch):
    """Requests of one shape and one step count joining at different steps share rowwise.step_rows
    calls with different k; each one's tokens equal its tokens alone (and Engine.generate's)."""
    cases = [dict(label=2, seed=11), dict(label=4, seed=12, n=2), dict(label=8, seed=13, temperature=0.7),
             dict(label=6, seed=14, guidance=1.0)]
    calls = []
    orig = rowwise.step_rows

    def spy(sched, logits, k, x, **kw):
        calls.append(k.tolist())
        return orig(sched, logits, k, x, **kw)

    monkeypatch.setattr(rowwise, "step_rows", spy)
    reqs = [request(engine, c.pop("label"), c.pop("seed"), steps=8, **c) for c in [dict(c) for c in cases]]
    b = Batcher(engine, max_rows=16, per_row_sampler=True)  # not started: driven by hand
    together = drive(b, {0: reqs[:1], 2: reqs[1:2], 3: reqs[2:3], 5: reqs[3:]})
    assert any(len(set(k)) > 1 for k in calls), calls  # one sampler call, rows at different steps
    for rq, toks in zip(reqs, together, strict=True):
        alone = drive(Batcher(engine, max_rows=16), {0: [rq]})[0]
        assert torch.equal(toks, alone)
        ref = engine.generate(rq.prompt_ids[None].expand(rq.n, -1), latents_shape=rq.latents_shape, num_steps=8,
                              guidance_scale=rq.guidance_scale, temperature=rq.temperature, seed=rq.seed,
                              decode=False).tokens
        assert torch.equal(ref, toks)


def test_cancelled_future_or_loop_error_keeps_the_worker(engine):
    """A client's cancelled future (asyncio.wrap_future cancels it with its handler) and an iteration
    that raises outside a step fail only their requests: the worker keeps serving."""
    with Batcher(engine, max_rows=4) as b:
        gone = b.submit(request(engine, 1, 1, steps=4))
        assert gone.future.cancel()  # what a cancelled HTTP handler does to the concurrent future
        ok = b.submit(request(engine, 2, 2, steps=4))
        assert ok.future.result(30).shape == (1, 1, 4, 8) and b.alive
        orig, fired = b._admit, []

        def admit_once_broken():
            if not fired:
                fired.append(1)
                raise RuntimeError("boom")
            return orig()

        b._admit = admit_once_broken
        victim = b.submit(request(engine, 3, 3, steps=4))
        with pytest.raises(RuntimeError, match="the batch loop failed.*boom"):
            victim.future.result(30)
        assert b.submit(request(engine, 4, 4, steps=4)).future.result(30).shape == (1, 1, 4, 8)
        assert b.alive and b.metrics.loop_errors == 1


def test_size_limit_before_allocation(engine, monkeypatch):
    """max_tokens (rows x latent tokens of one pass) refuses a request before anything is allocated,
    and joins never take a step over it."""
    b = Batcher(engine, max_rows=8, max_tokens=64)

    def no_alloc(*a, **k):
        raise AssertionError("allocated before the size check")

    with monkeypatch.context() as m:
        m.setattr(engine, "initial_tokens", no_alloc)
        m.setattr(engine, "encode_prompts", no_alloc)
        with pytest.raises(ValueError, match=r"latents_shape: 3 sample.*over this server's limit of 64 \(max_tokens\)"):
            b.prepare(request(engine, 1, 1, n=3, guidance=1.0))  # 3 x 32 tokens
        with pytest.raises(ValueError, match=r"latents_shape: 2 sample.*128 token-rows"):
            b.prepare(request(engine, 1, 1, n=2))  # guided: 4 rows x 32
        with pytest.raises(ValueError, match="max_tokens: expected an int >= 1"):
            Batcher(engine, max_tokens=0)
    seen = []
    with b:
        orig = b._forward_and_step
        b._forward_and_step = lambda jobs: seen.append(orig(jobs)) or seen[-1]
        jobs = [b.submit(request(engine, i, i, steps=5)) for i in range(3)]  # 2 rows x 32 each: one at a time
        for j in jobs:
            j.future.result(60)
    assert seen and max(seen) * 32 <= 64


def test_admission_per_shape_and_lifecycle(engine):
    """FCFS within a shape, no head-of-line blocking across shapes; a running cancel answers
    'cancelling'; shutdown cancels with Cancelled; a stop that times out keeps the worker."""
    b = Batcher(engine, max_rows=3, max_queue=8)  # not started
    a = b.submit(request(engine, 1, 1))  # 2 rows
    blocked = b.submit(request(engine, 2, 2))  # 2 rows: does not fit next to a
    small = b.submit(request(engine, 3, 3, guidance=1.0))  # 1 row: would fit, but must not overtake
    # another shape: its own step, admitted within the rows left (max_rows spans all shapes, issue 20)
    other = b.submit(request(engine, 4, 4, shape=(2, 4, 8), guidance=1.0))
    with b._lock:
        b._admit()
    assert b._running == [a, other] and list(b._queue) == [blocked, small]
    assert b.cancel(a.id) == "cancelling" and b.cancel(small.id) == "cancelled" and b.cancel("nope") is None
    with pytest.raises(Cancelled):
        small.future.result(0)
    assert b.get(small.id).status == "cancelled"  # finished jobs keep their final status for GET
    b.start()
    with pytest.raises(Cancelled):
        a.future.result(30)
    b.stop()
    for j in (blocked, other):  # finished or cancelled by the shutdown: never a bare RuntimeError
        if j.future.exception(0) is not None:
            assert isinstance(j.future.exception(0), Cancelled)
    b = Batcher(engine, max_rows=2).start()
    long = b.submit(request(engine, 5, 5, steps=1000, guidance=1.0))
    while long.k < 1:
        time.sleep(0.01)
    with pytest.raises(Cancelled, match="shutting down"):
        b.stop()
        long.future.result(30)
    assert not b.alive
    gate = threading.Event()
    b = Batcher(engine, max_rows=2)
    b._loop = gate.wait  # a worker stuck in a long step
    b.start()
    first = b._thread
    b.stop(timeout=0.05)
    assert b._thread is first and b.start()._thread is first  # no second worker
    gate.set()
    first.join(5)
    listener = object()
    b.unsubscribe(a, listener)  # a listener already gone is fine


@pytest.mark.gpu
def test_cuda_graph_buckets_equal_eager():
    """Graph replays per (rows, uncond rows, shape) bucket, padded rows masked, give the eager tokens."""
    dm = DigitsModel.load()
    engine = dm.engine.to("cuda")
    with Batcher(engine, max_rows=8) as b:
        eager = run_all(b, engine, CASES, stagger=0.002)
    with Batcher(engine, max_rows=8, graphs=True) as b:
        graphed = run_all(b, engine, CASES, stagger=0.002)
        assert b.graphs.captures >= 1
    for c, a, g in zip(CASES, eager, graphed, strict=True):
        assert torch.equal(a.cpu(), g.cpu()), c


def test_graph_bucket_logic_on_the_cpu(engine, monkeypatch):
    """The bucket step of :mod:`ursa_engine.serve.graphs` (padded rows and uncond rows, device-side
    guidance and last-step decisions, replays of a cached bucket with new inputs) run eagerly on the
    CPU: capture replaced by calling the body. The capture itself is the GPU test above."""
    from ursa_engine.serve import graphs

    monkeypatch.setattr(graphs, "cuda_graph_capture", lambda fn, pool, device=None: fn)
    monkeypatch.setattr(graphs.GraphCache, "usable", lambda self, jobs: True)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    with Batcher(engine, max_rows=8) as b:
        eager = run_all(b, engine, CASES, stagger=0.002)
    with Batcher(engine, max_rows=8, graphs=True) as b:
        bucketed = run_all(b, engine, CASES, stagger=0.002)
        assert b.graphs.captures >= 2 and b.metrics.steps > b.graphs.captures  # buckets were reused
    for c, a, g in zip(CASES, eager, bucketed, strict=True):
        assert torch.equal(a, g), c


def test_failed_capture_is_not_cached(engine, monkeypatch):
    """A capture that raises fails its request and caches no bucket; the next capture of the same
    bucket succeeds and gives the eager tokens."""
    from ursa_engine.serve import graphs

    fails = [1]

    def capture(fn, pool, device=None):
        if fails:
            fails.pop()
            raise RuntimeError("capture failed")
        return fn

    monkeypatch.setattr(graphs, "cuda_graph_capture", capture)
    monkeypatch.setattr(graphs.GraphCache, "usable", lambda self, jobs: True)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    with Batcher(engine, max_rows=4, graphs=True) as b:
        with pytest.raises(RuntimeError, match="capture failed"):
            b.submit(request(engine, 3, 5, steps=4)).future.result(60)
        assert not b.graphs.buckets
        again = b.submit(request(engine, 3, 5, steps=4)).future.result(60)
        assert b.graphs.captures == 1 and all(bk.replay is not None for bk in b.graphs.buckets.values())
    with Batcher(engine, max_rows=4) as b:
        assert torch.equal(again, b.submit(request(engine, 3, 5, steps=4)).future.result(60))


def test_concurrent_stops_do_not_race(engine):
    """Two stop() calls at once (a second SIGTERM while serve() stops in its finally) both return cleanly."""
    import threading

    for _ in range(60):  # the old code failed ~1 in 10 iterations
        b = Batcher(engine).start()
        errors = []

        def stop():
            try:
                b.stop()
            except Exception as err:  # AttributeError: 'NoneType' object has no attribute 'is_alive' (before)
                errors.append(err)

        threads = [threading.Thread(target=stop) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert not errors and not b.alive
