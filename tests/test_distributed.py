"""Many processes on torch.distributed (issue 13): the same tokens as one process, on the CPU with gloo.

Workers are spawned from the tests (``torch.multiprocessing``, a free port on 127.0.0.1, torchrun's
environment variables), run a tiny fp32 checkpoint root (tests/roots.py) and save what rank 0
saw; the one-process reference runs here. One spawn of 2 processes covers dp, cfg, sp, FSDP2 and
sequence-parallel training; one of 4 the combinations; the CLI runs under
``python -m torch.distributed.run``. Every rank saves what it saw and every rank's tokens are checked.
"""

from __future__ import annotations

import contextlib
import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from roots import tiny_model_config, write_tiny_root

import ursa_engine as ue
from ursa_engine import distributed as udist
from ursa_engine.checkpoint import save_transformer
from ursa_engine.distributed import generate as pgen
from ursa_engine.distributed import training as ptrain
from ursa_engine.inputs import prepare_inputs

PROMPT_LEN = 6
SHAPE = (2, 3, 4)  # 24 latent tokens: L = 6 + 1 + 24 = 31 does not divide by 2 or 4
PROMPTS = [[3, 4], [5, 6, 7], [8]]  # B = 3: uneven over dp = 2
# shift 1: t_k = k / 6; guided while t_k < 0.6 (steps 1..3; step 0 is skipped), then unguided
# frame 0 given and kept (image-to-video as tokens): the frozen frame must survive every layout's gather
GEN = dict(latents_shape=SHAPE, guidance_scale=3.0, guidance_trunc=0.6, num_steps=6, seed=7,
           cond_latents=[[[[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]]], freeze_cond=True)
LAYOUTS_2 = ("dp=2", "cfg=2", "sp=2")
LAYOUTS_4 = ("cfg=2,sp=2", "dp=2,cfg=2", "dp=2,sp=2")
# (key, layout, root, prompts): fewer prompts than dp ranks (a dp slice without samples), and a model of
# 4 kv heads, where cfg=2,sp=2 shards the conditional rows over all 4 ranks past guidance_trunc
EXTRA_2 = (("dp=2/1 prompt", "dp=2", "tiny", 1),)
EXTRA_4 = (("dp=2,cfg=2/1 prompt", "dp=2,cfg=2", "tiny", 1), ("cfg=2,sp=2/4 kv heads", "cfg=2,sp=2", "kv4", 3))
ERROR_LAYOUTS = ("sp=2", "dp=2")  # a bad step on rank 1 only: caught per step (sp) / at the end (dp)
GRAPH_2 = ("cfg=2", "sp=2")  # graph mode: the captured step body, collectives included
GRAPH_4 = ("cfg=2,sp=2", "dp=2,cfg=2")
GRAPH_CALLS = ({"seed": 7}, {"seed": 8, "argmax_last": True})  # the second reuses the graphs, new inputs
TRAIN_B = 2
# inpainting (issue 23): known tokens over both frames, frame 0's given codes overridden at two of them
_KNOWN_MASK = torch.zeros(SHAPE, dtype=torch.bool)
_KNOWN_MASK[0, 0, :2] = _KNOWN_MASK[1, 1:, 1:3] = True
INPAINT = dict(known_tokens=torch.arange(24).reshape(1, *SHAPE) * 2 + 13, known_mask=_KNOWN_MASK)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, name: str, args: tuple, gpu: bool) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if not gpu:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:  # on GPUs the engine initializes NCCL itself from the environment, as under torchrun
        globals()[name](rank, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn(world: int, name: str, *args, gpu: bool = False) -> None:
    mp.start_processes(_entry, args=(world, _free_port(), name, args, gpu), nprocs=world, start_method="spawn")


def _engine(root, device="cpu", **options) -> ue.Engine:
    return ue.Engine.from_pretrained(root, device=device, dtype=torch.float32, prompt_length=PROMPT_LEN,
                                     load_vae=False, **options)


def _layouts_worker(rank: int, roots: dict, out: str, layouts: tuple, device: str = "cpu", train: bool = False,
                    graph_layouts: tuple = (), extra: tuple = (), errors: tuple = (), inpaint: bool = False) -> None:
    saved = _training(rank) if train else {}
    root = roots["tiny"]
    for key, layout, name, count in [(lay, lay, "tiny", len(PROMPTS)) for lay in layouts] + list(extra):
        engine = _engine(roots[name], device, mesh=layout, mode="eager")
        prompts = PROMPTS[:count]
        tokens = engine.generate(prompts, decode=False, **GEN).tokens
        saved[key] = {"tokens": tokens.cpu()}
        if inpaint and key == layout:
            saved[key]["inpaint"] = engine.generate(prompts, decode=False, **GEN, **INPAINT).tokens.cpu()
        if count < len(PROMPTS):  # a dp slice without samples: tokens only
            continue
        prep = prepare_inputs(engine, prompts, **GEN)
        loop = pgen.ParallelLoop(engine, engine.parallel, prep, argmax_last=False)
        logits = {}
        for guided in (True, False):
            c, u = loop.logits(guided)
            logits[guided] = [pgen.gather_samples(engine.parallel, t, prep.B).cpu() for t in (c, u) if t is not None]
        saved[key].update(logits=logits, wide=loop.wide_shard is not None)
    if graph_layouts:
        saved["graph"] = _graph_runs(root, graph_layouts, device)
    if errors:
        saved["errors"] = _error_runs(rank, root, errors, device)
    torch.save(saved, f"{out}.{rank}")


def _error_runs(rank: int, root: str, layouts: tuple, device: str) -> dict:
    """Validated steps with NaN logits on rank 1 only: every rank must raise (none left in a collective)."""
    runs = {}
    for layout in layouts:
        engine = _engine(root, device, mesh=layout, mode="eager", validate_steps=True)
        if rank == 1:
            head = engine.model.lm_head
            head.forward = lambda h, head=head: torch.full((*h.shape[:-1], head.out_features), float("nan"))
        try:
            engine.generate(PROMPTS, decode=False, **GEN)
            runs[layout] = None
        except Exception as err:  # noqa: BLE001 - what each rank raised is the result
            runs[layout] = (type(err).__name__, str(err))
    return runs


@contextlib.contextmanager
def _no_host_sync():
    """A host sync inside a captured step breaks a real CUDA graph capture: make it fail on the CPU too."""
    def refuse(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"host sync in the captured step: Tensor.{name}")
        return fail

    names = ("item", "__bool__", "tolist", "cpu")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    for n in names:
        setattr(torch.Tensor, n, refuse(n))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def _graph_runs(root: str, layouts: tuple, device: str) -> dict:
    """Graph mode on each layout, one call per options of GRAPH_CALLS. On the CPU the capture is faked
    as in tests/test_engine.py (the warm-up steps run the body, a "replay" calls it: tensor step
    index, static buffers, state restored after warm-up, cached runner reloaded); on GPUs it is real
    (NCCL collectives captured). Records what ran: captures, steps with a tensor / python index."""
    import ursa_engine.graphs as graphs

    captures, steps = [], []
    real_capture, real_step = graphs.cuda_graph_capture, pgen.ParallelLoop.step

    def capture(fn, pool):
        captures.append(1)
        if device != "cpu":
            return real_capture(fn, pool)

        def body():
            with _no_host_sync():
                fn()

        body()  # the warm-up runs mutate the state, as on the GPU
        body()
        return body

    def step(self, k, guided):
        steps.append(isinstance(k, torch.Tensor))
        return real_step(self, k, guided)

    graphs.cuda_graph_capture, pgen.ParallelLoop.step = capture, step
    runs = {}
    try:
        for layout in layouts:
            engine = _engine(root, device, mesh=layout, mode="graph")
            if device == "cpu":
                engine._resolve_mode = lambda mode, sched: "graph"  # CUDA graphs need CUDA: capture faked
            runs[layout] = []
            for call in GRAPH_CALLS:
                captures.clear()
                steps.clear()
                result = engine.generate(PROMPTS, decode=False, **{**GEN, **call})
                (runner,) = engine._graphs.values()
                runs[layout].append({"tokens": result.tokens.cpu(), "mode": result.mode, "captures": len(captures),
                                     "tensor_steps": sum(steps), "int_steps": len(steps) - sum(steps),
                                     "layouts": sorted(runner.graphs), "runner": id(runner)})
            engine.release_graphs()  # graphs with captured NCCL operations hold their communicators
    finally:
        graphs.cuda_graph_capture, pgen.ParallelLoop.step = real_capture, real_step
    return runs


def _train_data():
    gen = torch.Generator().manual_seed(3)
    K = 64
    x1 = torch.randint(0, K, (TRAIN_B, *SHAPE), generator=gen)
    prompts = torch.randint(0, 512, (TRAIN_B, PROMPT_LEN), generator=gen)
    path = ue.MetricPath(ue.Codebook.fsq([4, 4, 4]), alpha=1.0, c=3.0)
    return path, prompts, x1, torch.tensor([0.3, 0.7]), torch.tensor([11, 12])


def _tiny_model():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        return ue.URSATransformer(tiny_model_config(64), init_std=0.2)


def _grads(module) -> dict:
    out = {}
    for name, p in module.named_parameters():
        g = p.grad
        out[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out


def _training(rank: int) -> dict:
    path, prompts, x1, t, seeds = _train_data()
    x_t = ue.training.add_noise(path, x1, t, seed=seeds)
    # FSDP2: rank r trains on sample r
    loss = ptrain.shard_loss(ue.training.LatentLoss(_tiny_model()))
    value = loss(prompts[rank : rank + 1], x_t[rank : rank + 1], x1[rank : rank + 1])
    value.backward()
    mean = value.detach().clone()
    dist.all_reduce(mean)
    fsdp = {"loss": mean / dist.get_world_size(), "grads": _grads(loss)}
    # sequence parallel: rank r owns targets [a, b) of every sample, noise drawn by global index
    n = x1[0].numel()
    a, b = ptrain.target_ranges(n, dist.get_world_size())[rank]
    flat1 = x1.reshape(TRAIN_B, n)
    local_t = ptrain.add_noise(path, flat1[:, a:b].contiguous(), t, seed=seeds, token_offset=a)
    spl = ptrain.SequenceParallelLoss(_tiny_model())
    value = spl(prompts, local_t, flat1[:, a:b].contiguous(), SHAPE)
    value.backward()
    ptrain.sync_gradients(spl)
    same_noise = torch.equal(local_t, x_t.reshape(TRAIN_B, n)[:, a:b])
    sp = {"loss": value.detach(), "grads": _grads(spl), "noise_equal": same_noise}
    return {"fsdp": fsdp, "sp": sp}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(write_tiny_root(tmp_path_factory.mktemp("dist") / "root", with_vae=False))


@pytest.fixture(scope="module")
def roots(root, tmp_path_factory):
    """The tiny root (2 kv heads) and the same with a transformer of 4 kv heads (kv4)."""
    kv4 = write_tiny_root(tmp_path_factory.mktemp("dist") / "kv4", with_vae=False)
    config = tiny_model_config(64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(6)
        model = ue.URSATransformer(ue.ModelConfig.preset("tiny", lm_head_size=64, vocab_size=config.vocab_size,
                                                         num_key_value_heads=4), init_std=0.2)
    save_transformer(model, kv4 / "transformer")
    return {"tiny": root, "kv4": str(kv4)}


def _reference(root, device="cpu", prompts=PROMPTS):
    engine = _engine(root, device)
    tokens = engine.generate(prompts, decode=False, **GEN).tokens
    prep = prepare_inputs(engine, prompts, **GEN)
    model = engine.model
    rope = model.rope_tables(ue.latent_positions(PROMPT_LEN, SHAPE))
    ids = [ue.model.sequence_ids(p, prep.x, model.config) for p in (prep.cond, prep.neg)]
    with torch.no_grad():
        logits = [model(i, rope=rope, latent_tokens=prep.n).cpu() for i in ids]
    return {"tokens": tokens.cpu(), "logits": {True: logits, False: logits[:1]}}


@pytest.fixture(scope="module")
def reference(roots):
    """One process: tokens and (cond, uncond) latent logits of the first guided / unguided step, for
    each root and number of prompts of the layouts."""
    refs = {("tiny", len(PROMPTS)): _reference(roots["tiny"])}
    for _, _, name, count in EXTRA_2 + EXTRA_4:
        if (name, count) not in refs:
            refs[name, count] = _reference(roots[name], prompts=PROMPTS[:count])
    return refs


def _load_ranks(out, world: int) -> list:
    return [torch.load(f"{out}.{r}", map_location="cpu") for r in range(world)]


@pytest.fixture(scope="module")
def graph_reference(root):
    """One process, eager: the tokens of each call of GRAPH_CALLS."""
    engine = _engine(root)
    return [engine.generate(PROMPTS, decode=False, **{**GEN, **call}).tokens for call in GRAPH_CALLS]


@pytest.fixture(scope="module")
def two(roots, tmp_path_factory):
    """What each of the 2 ranks saw (a list, by rank)."""
    out = tmp_path_factory.mktemp("two") / "two.pt"
    _spawn(2, "_layouts_worker", roots, str(out), LAYOUTS_2, "cpu", True, GRAPH_2, EXTRA_2, ERROR_LAYOUTS, True)
    return _load_ranks(out, 2)


@pytest.fixture(scope="module")
def four(roots, tmp_path_factory):
    out = tmp_path_factory.mktemp("four") / "gen.pt"
    _spawn(4, "_layouts_worker", roots, str(out), LAYOUTS_4, "cpu", False, GRAPH_4, EXTRA_4)
    return _load_ranks(out, 4)


def _check_layout(ranks, key, reference):
    """Every rank's tokens equal one process's; its logits (gathered, when recorded) within 1e-5."""
    for got in ranks:
        assert torch.equal(got[key]["tokens"].cpu(), reference["tokens"])
        if "logits" not in got[key]:
            continue
        for guided in (True, False):
            assert len(got[key]["logits"][guided]) == len(reference["logits"][guided])
            for a, b in zip(got[key]["logits"][guided], reference["logits"][guided], strict=True):
                torch.testing.assert_close(a.cpu(), b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS_2)
def test_two_processes_same_tokens_as_one(two, reference, layout):
    _check_layout(two, layout, reference["tiny", len(PROMPTS)])


@pytest.mark.parametrize("layout", LAYOUTS_2)
def test_two_processes_inpaint_as_one(two, root, layout):
    """Known tokens (issue 23) held on every layout (their values sliced per dp rank, written after the
    gather), with the frozen conditioning frame: the one-process tokens."""
    ref = _engine(root).generate(PROMPTS, decode=False, **GEN, **INPAINT).tokens
    mask = INPAINT["known_mask"]
    assert torch.equal(ref[:, mask], INPAINT["known_tokens"][:, mask].expand(len(PROMPTS), -1))
    for rank in two:
        assert torch.equal(rank[layout]["inpaint"], ref)


@pytest.mark.parametrize("layout", LAYOUTS_4)
def test_four_processes_same_tokens_as_one(four, reference, layout):
    _check_layout(four, layout, reference["tiny", len(PROMPTS)])


@pytest.mark.parametrize("world, key, name, count", [(2, *e[:1], *e[2:]) for e in EXTRA_2] +
                         [(4, *e[:1], *e[2:]) for e in EXTRA_4])
def test_fewer_prompts_than_dp_ranks_and_the_wide_shard(two, four, reference, world, key, name, count):
    """A dp slice without samples takes part in every collective and returns the batch; with 4 kv heads
    cfg=2,sp=2 shards the conditional rows over all 4 ranks past guidance_trunc (the wide shard)."""
    ranks = two if world == 2 else four
    _check_layout(ranks, key, reference[name, count])
    if name == "kv4":
        assert all(r[key]["wide"] for r in ranks)


@pytest.mark.parametrize("layout", ERROR_LAYOUTS)
def test_an_error_on_one_rank_raises_on_every_rank(two, layout):
    """NaN logits on rank 1 only (validate_steps): rank 1 names the logits, rank 0 raises too (naming
    rank 1) instead of waiting forever in the next collective; the spawn finished, so nobody hung."""
    (kind1, msg1), (kind0, msg0) = two[1]["errors"][layout], two[0]["errors"][layout]
    assert kind1 == "ValueError" and "logits: contains NaN" in msg1
    assert kind0 == "ValueError" and "mesh: rank 1 raised an error" in msg0


def test_a_cuda_device_other_than_the_local_rank_is_refused(monkeypatch):
    """Under torchrun an explicit cuda:0 would put every rank on GPU 0 (pure check: no CUDA needed)."""
    with pytest.raises(ValueError, match=r"device: cuda:0 on a mesh, but this is local rank 1"):
        udist.check_rank_device("cuda:0", 1)
    udist.check_rank_device("cuda:1", 1)
    udist.check_rank_device("cuda", 1)
    udist.check_rank_device("cpu", 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(ValueError, match=r"device: cuda:0 on a mesh, but this is local rank 3"):
        udist.check_rank_device(torch.device("cuda", 0))
    udist.check_rank_device("cuda:3")


def _check_graph_runs(runs, graph_reference, gpu=False):
    """Two calls per layout: the eager one-process tokens; graphs captured once per layout (guided,
    unguided) in the first call and reused by the second (new seed, argmax on the eager last step).
    Steps 1-4 of 6 are captured (step 0 is skipped, the last runs eagerly); on the CPU each capture
    runs 2 warm-up steps and each replay the body, with a tensor step index."""
    first, second = runs
    for run, expected in zip(runs, graph_reference, strict=True):
        assert run["mode"] == "graph" and run["layouts"] == [False, True]
        assert torch.equal(run["tokens"], expected)
        assert run["int_steps"] == 1  # the last step, eager
    assert first["captures"] == 2 and second["captures"] == 0 and second["runner"] == first["runner"]
    if not gpu:
        assert first["tensor_steps"] == 2 * 2 + 4 and second["tensor_steps"] == 4


@pytest.mark.parametrize("layout", GRAPH_2)
def test_two_processes_graph_step_body_same_tokens_as_one(two, graph_reference, layout):
    for rank in two:
        _check_graph_runs(rank["graph"][layout], graph_reference)


@pytest.mark.parametrize("layout", GRAPH_4)
def test_four_processes_graph_step_body_same_tokens_as_one(four, graph_reference, layout):
    for rank in four:
        _check_graph_runs(rank["graph"][layout], graph_reference)


def test_graph_mode_on_a_mesh_keeps_the_one_process_errors(root, monkeypatch):
    """Graph mode needs CUDA and a tensor-step sampler, as in one process; the confidence sampler
    also needs its samples' tokens on one rank (a layout error, named first)."""
    engine = _engine(root, mode="graph")
    groups = SimpleNamespace(wide_size=1, layout=udist.Layout(dp=2))
    prep = prepare_inputs(engine, PROMPTS, **GEN)
    with pytest.raises(RuntimeError, match="mode='graph' needs a CUDA device"):
        pgen._checks(engine, groups, prep, None)
    assert pgen._checks(engine, groups, prep, "eager") == "eager"
    conf = SimpleNamespace(mask_sampler="confidence")
    with pytest.raises(RuntimeError, match="mode='graph' needs"):
        pgen._checks(engine, groups, SimpleNamespace(sched=conf), None)
    with pytest.raises(ValueError, match="mesh: the confidence sampler .* dp=1,cfg=1,sp=2 splits them"):
        pgen._checks(engine, SimpleNamespace(wide_size=2, layout=udist.Layout(sp=2)), SimpleNamespace(sched=conf),
                     None)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL)")
def test_nccl_layouts_same_tokens_as_one_gpu(root, tmp_path):
    """NCCL on 2 GPUs (fp32): eager, then CUDA graphs with the collectives captured (cfg=2, sp=2),
    the tokens of one GPU (eager); the GPU suite runs it where it has them."""
    out = tmp_path / "gen.pt"
    _spawn(2, "_layouts_worker", {"tiny": root}, str(out), LAYOUTS_2, "cuda", False, GRAPH_2, gpu=True)
    ranks, ref = _load_ranks(out, 2), _reference(root, "cuda:0")
    for layout in LAYOUTS_2:
        _check_layout(ranks, layout, ref)
    got = ranks[0]
    engine = _engine(root, "cuda:0", mode="eager")
    eager = [engine.generate(PROMPTS, decode=False, **{**GEN, **call}).tokens.cpu() for call in GRAPH_CALLS]
    for layout in GRAPH_2:
        _check_graph_runs(got["graph"][layout], eager, gpu=True)


def _one_process_training():
    path, prompts, x1, t, seeds = _train_data()
    x_t = ue.training.add_noise(path, x1, t, seed=seeds)
    loss = ue.training.LatentLoss(_tiny_model())
    value = loss(prompts, x_t, x1)
    value.backward()
    return value.detach(), _grads(loss)


@pytest.mark.parametrize("kind", ["fsdp", "sp"])
def test_training_loss_and_grads_equal_one_process(two, kind):
    loss, grads = _one_process_training()
    got = two[0][kind]
    torch.testing.assert_close(got["loss"], loss, rtol=0, atol=1e-5)
    assert set(got["grads"]) == set(grads)
    for name, g in grads.items():
        torch.testing.assert_close(got["grads"][name], g, rtol=0, atol=1e-5, msg=name)
    if kind == "sp":
        assert got["noise_equal"]


def test_sequence_parallel_noise_is_the_global_draw():
    path, _, x1, t, seeds = _train_data()
    flat = x1.reshape(TRAIN_B, -1)
    whole = ue.training.add_noise(path, flat, t, seed=seeds)
    part = ptrain.add_noise(path, flat[:, 5:17].contiguous(), t, seed=seeds, token_offset=5)
    assert torch.equal(part, whole[:, 5:17])
    mix = ue.MixturePath(64)
    whole = ue.training.add_noise(mix, flat, t, seed=seeds)
    assert torch.equal(ptrain.add_noise(mix, flat[:, 7:].contiguous(), t, seed=seeds, token_offset=7), whole[:, 7:])
    # per-frame times (B, T): the video training default (sample_frame_times(asynchronous=True))
    frames = ue.training.sample_frame_times(TRAIN_B, SHAPE[0], seed=seeds)
    whole = ue.training.add_noise(path, x1, frames, seed=seeds).reshape(TRAIN_B, -1)
    for a, b in ((5, 17), (0, 10), (13, 24)):
        part = ptrain.add_noise(path, flat[:, a:b].contiguous(), frames, seed=seeds, token_offset=a,
                                latents_shape=SHAPE)
        assert torch.equal(part, whole[:, a:b])
    with pytest.raises(ValueError, match=r"t: per-frame times of latents_shape \(2, 3, 4\) must be \(B, T\)"):
        ptrain.add_noise(path, flat[:, 5:17].contiguous(), frames[:, :1], seed=seeds, token_offset=5,
                         latents_shape=SHAPE)
