"""Adapters per request when serving (issue 19 item 4, DESIGN §9): rows of different adapters share one
forward pass, each request's tokens equal its solo run with that adapter merged (fp32 on the CPU:
equal here; merged and unmerged weights round differently, so in lower precision a token may differ
at a rare near-tie of §2.5), the HTTP field, graph bucket keys, the command-line spec."""

from __future__ import annotations

import pytest
import torch

from ursa_engine import adapters, digits
from ursa_engine.adapters import LoRAWeights, RowAdapters, fused_sites, parse_lora_spec
from ursa_engine.demo import DigitsModel
from ursa_engine.serve import Batcher, GenerationRequest


def random_adapter(cfg, seed: int, targets=adapters.TARGETS, r: int = 4, alpha: float = 8.0, std: float = 0.05):
    """A LoRA with random A and B on ``targets`` (B non-zero: it changes the model)."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for _, parts in fused_sites(cfg):
        for p in parts:
            if p.name in targets:
                n_in = adapters._in_features(cfg, p.name)
                A = torch.randn(r, n_in, generator=g) / n_in**0.5
                weights[p.path] = (A, torch.randn(p.rows, r, generator=g) * std)
    return LoRAWeights(r, alpha, weights=weights, source=f"random-{seed}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = DigitsModel.load().engine
    tmp = tmp_path_factory.mktemp("loras")
    folders = {"a": random_adapter(engine.model.config, 1).save_pretrained(tmp / "a"),
               "b": random_adapter(engine.model.config, 2, targets=("q_proj", "v_proj", "down_proj"), r=8,
                                   alpha=4.0, std=0.2).save_pretrained(tmp / "b")}
    yield engine, folders
    torch.set_num_threads(threads)


def request(engine, label, seed, *, steps=6, guidance=3.0, trunc=0.9, lora=None, n=1):
    pad = engine.model.config.pad_token_id
    return GenerationRequest(prompt_ids=digits.prompt_ids([label], pad)[0], latents_shape=(1, 4, 8), n=n,
                             num_steps=steps, guidance_scale=guidance, guidance_trunc=trunc, seed=seed, lora=lora)


CASES = [dict(label=3, seed=5, lora="a"), dict(label=7, seed=9, lora=None, n=2, steps=8),
         dict(label=1, seed=2, lora="b", trunc=0.5), dict(label=0, seed=4, lora="a", steps=7, guidance=1.0),
         dict(label=5, seed=6, lora="b", n=2), dict(label=9, seed=8, lora=None, steps=5)]


def solo(engine, folders, c) -> torch.Tensor:
    """The case alone through Engine.generate with its adapter merged."""
    c = dict(c)
    lora = c.pop("lora")
    if lora is not None:
        engine.load_lora(folders[lora], name="solo")
    try:
        pad = engine.model.config.pad_token_id
        return engine.generate(digits.prompt_ids([c["label"]] * c.get("n", 1), pad), latents_shape=(1, 4, 8),
                               num_steps=c.get("steps", 6), guidance_scale=c.get("guidance", 3.0),
                               guidance_trunc=c.get("trunc", 0.9), seed=c["seed"], decode=False).tokens
    finally:
        engine.unload_lora()


def test_mixed_adapter_rows_equal_their_solo_merged_runs(setup, monkeypatch):
    engine, folders = setup
    seen = []
    real_rows = RowAdapters.rows

    def spy(self, assignment):  # the adapters each forward pass carries, row by row
        seen.append(list(assignment))
        return real_rows(self, assignment)

    monkeypatch.setattr(RowAdapters, "rows", spy)
    base = {id(c): solo(engine, folders, dict(c, lora=None)) for c in CASES if c["lora"]}
    with Batcher(engine, max_rows=16, loras=folders) as b:
        jobs = [b.submit(request(engine, **c)) for c in CASES]  # queued together: they share steps
        out = [j.future.result(120) for j in jobs]
    mixed = [s for s in seen if len({a for a in s}) >= 3]  # a, b and base rows in one forward pass
    assert mixed, seen
    guided_mixed = [s for s in seen if len(s) > sum(c.get("n", 1) for c in CASES) - 2]
    assert guided_mixed  # uncond rows ride along with their request's adapter
    for c, tokens in zip(CASES, out, strict=True):
        assert torch.equal(tokens, solo(engine, folders, c)), c
        if c["lora"]:
            assert not torch.equal(tokens, base[id(c)]), c  # the adapter changed this request


def test_uncond_rows_take_their_requests_adapter(setup):
    """Row layout of a step: cond rows in job order, then the uncond rows of the guided jobs, each
    with its request's adapter; jobs of one adapter side by side."""
    engine, folders = setup
    with Batcher(engine, max_rows=16, loras=folders) as b:
        reqs = [request(engine, 1, 1, lora="b"), request(engine, 2, 2, lora=None, guidance=1.0),
                request(engine, 3, 3, lora="a"), request(engine, 4, 4, lora="b")]
        jobs = [b.prepare(r) for r in reqs]
        layouts = []
        real = b.loras.rows

        def record(assignment):
            layouts.append(list(assignment))
            return real(assignment)

        b.loras.rows = record
        b.step(jobs)
    (rows,) = layouts
    assert rows == ["a", "b", "b", None, "a", "b", "b"]  # guided first (adapters grouped), uncond of the 3 guided


def test_unknown_adapter_and_scale(setup):
    engine, folders = setup
    with Batcher(engine, loras={"a": (folders["a"], 0.5)}) as b:
        with pytest.raises(ValueError, match=r"lora: no adapter 'zz' on this server \(it has: a\)"):
            b.prepare(request(engine, 1, 1, lora="zz"))
        assert b.loras.adapters["a"][1] == 0.5
        with pytest.raises(ValueError, match="name: an adapter 'a' is already registered"):
            b.add_lora("a", folders["b"])
        t = b.submit(request(engine, 2, 3, lora="a")).future.result(60)
    engine.load_lora(folders["a"], scale=0.5)
    try:
        pad = engine.model.config.pad_token_id
        want = engine.generate(digits.prompt_ids([2], pad), latents_shape=(1, 4, 8), num_steps=6, guidance_scale=3.0,
                               seed=3, decode=False).tokens
    finally:
        engine.unload_lora()
    assert torch.equal(t, want)


def test_graph_buckets_key_on_adapter_rows(setup, monkeypatch):
    """The bucket step (capture replaced by calling the body, as tests/test_serve_batcher.py) applies each
    row's adapter; buckets differ by adapter layout and tokens equal the eager batcher's."""
    from ursa_engine.serve import graphs

    engine, folders = setup
    monkeypatch.setattr(graphs, "cuda_graph_capture", lambda fn, pool, device=None: fn)
    monkeypatch.setattr(graphs.GraphCache, "usable", lambda self, jobs: True)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    cases = CASES[:3]
    with Batcher(engine, max_rows=8, loras=folders) as b:
        eager = [b.submit(request(engine, **c)) for c in cases]
        eager = [j.future.result(120) for j in eager]
    with Batcher(engine, max_rows=8, loras=folders, graphs=True) as b:
        graphed = [b.submit(request(engine, **c)) for c in cases]
        graphed = [j.future.result(120) for j in graphed]
        keys = list(b.graphs.buckets)
    assert any(k[-1] for k in keys)  # adapter runs are part of the key
    for c, a, g in zip(cases, eager, graphed, strict=True):
        assert torch.equal(a, g), c


def test_http_lora_field(setup):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from test_serve import Server

    from ursa_engine.serve.models import ServedModel

    engine, folders = setup
    srv = Server(ServedModel(engine, digits=True, name="digits"), max_rows=8, loras=folders)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            assert c.get("/health").json()["loras"] == ["a", "b"]
            body = {"prompt": "3", "steps": 6, "seed": 5, "response_format": "tokens"}
            r = c.post("/v1/images/generations", json=dict(body, lora="nope"))
            assert r.status_code == 400 and r.json()["error"]["param"] == "lora", r.text
            r = c.post("/v1/images/generations", json=dict(body, lora="a"))
            assert r.status_code == 200, r.text
            got = torch.tensor(r.json()["data"][0]["tokens"])
    finally:
        srv.close()
    want = solo(engine, folders, dict(label=3, seed=5, lora="a"))[0]
    assert torch.equal(got, want)


def test_lora_spec_parsing(tmp_path):
    folder = random_adapter(DigitsModel.load().engine.model.config, 3, targets=("o_proj",)).save_pretrained(
        tmp_path / "style")
    assert parse_lora_spec(str(folder)) == (None, str(folder), 1.0)
    assert parse_lora_spec(f"{folder}:0.25") == (None, str(folder), 0.25)
    assert parse_lora_spec(f"anime={folder}:-1", named=True) == ("anime", str(folder), -1.0)
    with pytest.raises(ValueError, match="is not an adapter folder"):  # generate takes no NAME=
        parse_lora_spec(f"anime={folder}")
    with pytest.raises(ValueError, match="--lora: .*nowhere is not an adapter folder"):
        parse_lora_spec(str(tmp_path / "nowhere") + ":2")


@pytest.mark.gpu
def test_cuda_graph_buckets_with_adapters_equal_eager(setup):
    """Captured buckets apply each row's adapter: graph replays give the eager batcher's tokens (GPU)."""
    _, folders = setup
    engine = DigitsModel.load().engine.to("cuda")
    with Batcher(engine, max_rows=8, loras=folders) as b:
        eager = [j.future.result(120) for j in [b.submit(request(engine, **c)) for c in CASES]]
    with Batcher(engine, max_rows=8, loras=folders, graphs=True) as b:
        graphed = [j.future.result(120) for j in [b.submit(request(engine, **c)) for c in CASES]]
        assert b.graphs.captures >= 1
    for c, a, g in zip(CASES, eager, graphed, strict=True):
        assert torch.equal(a.cpu(), g.cpu()), c


@pytest.mark.gpu
def test_engine_graphs_do_not_go_stale_when_adapters_merge(setup):
    """A graph captured before load_lora replays the merged weights (merging writes in place) (GPU)."""
    _, folders = setup
    engine = DigitsModel.load().engine.to("cuda")
    pad = engine.model.config.pad_token_id
    kw = dict(latents_shape=(1, 4, 8), num_steps=6, guidance_scale=3.0, seed=3, decode=False, keep_graphs=True)
    ids = digits.prompt_ids([2, 5], pad)
    base = engine.generate(ids, mode="graph", **kw).tokens  # captures
    engine.load_lora(folders["a"])
    graphed = engine.generate(ids, mode="graph", **kw).tokens  # the cached graph, merged weights
    eager = engine.generate(ids, mode="eager", **kw).tokens
    engine.unload_lora()
    assert torch.equal(graphed, eager) and not torch.equal(graphed, base)
    assert torch.equal(engine.generate(ids, mode="graph", **kw).tokens, base)


def test_serve_command_lora_flags(setup, monkeypatch, capsys):
    """``ursa-engine serve --lora NAME=PATH --lora PATH:SCALE``: per-request and merged adapters (the HTTP server
    stubbed)."""
    pytest.importorskip("uvicorn")
    from types import SimpleNamespace

    from ursa_engine.cli import main
    from ursa_engine.serve import app as app_module

    _, folders = setup
    seen = {}

    def fake_server(config, batcher, drain_seconds):
        seen["loras"] = config.app.state.batcher.loras.names
        seen["merged"] = config.app.state.served.engine.loras
        return SimpleNamespace(run=lambda: None)

    monkeypatch.setattr(app_module, "draining_server", fake_server)
    assert main(["serve", "--lora", f"anime={folders['a']}", "--lora", f"{folders['b']}:0.5"]) == 0
    assert seen == {"loras": ["anime"], "merged": {"b": 0.5}}
    assert main(["serve", "--lora", f"x={folders['a']}", "--lora", f"x={folders['b']}"]) == 2
    assert "--lora: the name 'x' is given twice" in capsys.readouterr().err


def test_per_request_adapters_compose_with_merged_ones(setup):
    """A server with adapter a merged and b per request: a request of b gets both (its solo run with a and b
    merged), one of no adapter gets a."""
    engine, folders = setup
    pad = engine.model.config.pad_token_id
    kw = dict(latents_shape=(1, 4, 8), num_steps=6, guidance_scale=3.0, decode=False)
    engine.load_lora(folders["a"])
    try:
        with Batcher(engine, loras={"b": folders["b"]}) as bt:
            with_b = bt.submit(request(engine, 4, 7, lora="b")).future.result(60)
            plain = bt.submit(request(engine, 4, 7)).future.result(60)
        only_a = engine.generate(digits.prompt_ids([4], pad), seed=7, **kw).tokens
        engine.load_lora(folders["b"])
        both = engine.generate(digits.prompt_ids([4], pad), seed=7, **kw).tokens
    finally:
        engine.unload_lora()
    assert torch.equal(plain, only_a) and torch.equal(with_b, both) and not torch.equal(both, only_a)


def test_lora_mix_benchmark_smoke(tmp_path):
    import json

    from ursa_engine.benchmarks import bench_serve

    assert bench_serve.main(["--lora-mix", "--requests", "3", "--loads", "2", "--max-rows", "4", "--reps", "1",
                             "--steps", "2", "--adapters", "2", "--lora-rank", "2", "--out", str(tmp_path),
                             "--allow-dirty"]) == 0  # a tmp output, not a result: from any tree
    (path,) = tmp_path.glob("serve-lora-cpu-*.json")
    result = json.loads(path.read_text())
    assert {r["traffic"] for r in result["runs"]} == {"base", "merged", "single", "mixed"}
    assert result["ratios"][0]["throughput_mixed_over_single"] > 0 and all(r["requests"] == 3 for r in result["runs"])
