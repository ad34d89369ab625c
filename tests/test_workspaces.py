"""Kernel scratch from one source of truth (issue 20, item 1).

The launchers size their scratch with ``ursa_engine.triton_kernels.workspaces`` and the memory
plans declare it through :func:`ursa_engine.ops_library.workspace_buffers`, fed with the custom
op's own arguments. Here the real launchers run at small sizes (Triton interpreter, native CPU)
under :class:`~ursa_engine.memory.LiveBytes` on real tensors, and what they allocate (each tensor,
and the peak) must equal the declaration; at GPU sizes the declaration follows the CUDA tiling
(token groups: the tile sums of ⌈D/4⌉ tokens, not D; no x̂1 buffer when ``x1`` is given). Also:
declared workspace tensors update the phase records and the (n, K) watch of the tracker.
"""

import gc
import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first @triton.jit decoration
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from ursa_engine import ops_library  # noqa: E402
from ursa_engine.memory import LiveBytes  # noqa: E402

triton = pytest.importorskip("triton")
from ursa_engine.triton_kernels import head_draw as thd  # noqa: E402
from ursa_engine.triton_kernels import sampler as tks  # noqa: E402
from ursa_engine.triton_kernels import workspaces as ws  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _Allocations(LiveBytes):
    """LiveBytes (exact bytes) that also lists every storage created: (shape, dtype)."""

    def __init__(self):
        super().__init__(granularity=1)
        self.made = []

    def _track(self, st, key, tensor, func):
        super()._track(st, key, tensor, func)
        if st.nbytes():  # the interpreter wraps every argument in an empty tensor set_ to its storage
            self.made.append((tuple(tensor.shape), str(tensor.dtype).replace("torch.", "")))


@pytest.fixture(autouse=True)
def _prompt_frees(monkeypatch):
    """The Triton interpreter keeps a launch's arguments in reference cycles until the next garbage
    collection; a GPU frees a buffer when its last name goes. Collect after each launch so that the
    interpreter frees when a GPU would (a freed buffer then leaves the live bytes in time)."""
    if DEVICE.type == "cuda":
        return
    from triton.runtime import interpreter

    call = interpreter.GridExecutor.__call__

    def collected(self, *args, **kwargs):
        try:
            return call(self, *args, **kwargs)
        finally:
            gc.collect()

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", collected)


def _declared(func, args):
    """(shape, dtype) of every declared buffer at the op's peak stage, and their bytes."""
    found = ops_library.workspace_buffers(func, args, {})
    if found is None:
        return [], 0
    bufs = [(tuple(s), str(d).replace("torch.", "")) for s, d in found[0]]
    return bufs, sum(torch.Size(s).numel() * getattr(torch, d).itemsize for s, d in bufs)


def _run(fn):
    gc.collect()
    with _Allocations() as mem:
        fn()
    gc.collect()
    return mem


def _metric_inputs(D, K, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    table = torch.nn.functional.normalize(torch.randn(K, m, generator=g), dim=-1).to(DEVICE)
    cond = (torch.randn(D, K, generator=g) * 2).to(DEVICE)
    x = torch.randint(0, K, (D,), generator=g).to(DEVICE)
    params = torch.tensor([0.4, 1.0, 0.5, 0.2], device=DEVICE)
    return cond, x, table, params, torch.tensor([3], device=DEVICE), torch.tensor([7], device=DEVICE)


def _metric_args(cond, x, table, params, step, seeds, *, x1=None, out=None, last=False):
    """The ``ursa::metric_step`` argument tuple (what the plans' workspace callable receives)."""
    return ("triton", cond, None, x, table, params, step, seeds, x.numel(), 1.0, 1.0, 0, 1.0, 2, None, last, False,
            0, x1, out, None)


# ----------------------------------------------------------------------------- Triton table metric step
@pytest.mark.parametrize("x1_given", [False, True], ids=["draw", "x1-given"])
@pytest.mark.parametrize("cfg", [None, {"GROUPS": 3, "BN": 16, "SPLITS": 2}], ids=["default", "3-groups"])
def test_table_metric_step_allocates_its_declared_workspace(x1_given, cfg):
    D, K, m = 50, 97, 6
    cond, x, table, params, step, seeds = _metric_inputs(D, K, m)
    out = torch.empty_like(x)
    x1 = torch.randint(0, K, (D,), generator=torch.Generator().manual_seed(1)).to(DEVICE) if x1_given else None
    tks._sq_norms(table)  # the (K,) code norms: cached per table on the first call, not scratch

    mem = _run(lambda: tks._metric_step(
        None if x1_given else cond, None, x, table, params, step, seeds=seeds, row_len=D, guidance_scale=1.0,
        temperature=1.0, top_k=0, top_p=1.0, power=2, levels=None, last=False, argmax_last=False, out=out, x1=x1,
        cfg=cfg))
    want = ws.table_step_workspace(D, K, m, DEVICE, table.dtype, x1_given=x1_given, cfg=cfg)
    assert sorted(mem.made) == sorted((b.shape, str(b.dtype).replace("torch.", "")) for b in want.buffers)
    assert mem.peak == want.peak_bytes() and mem.current == 0
    assert ("x1" in {b.name for b in want.buffers}) is not x1_given  # no x̂1 buffer when x1 is given
    if cfg is None:  # the plans' declaration, fed with the custom op's arguments, is the same
        args = _metric_args(None if x1_given else cond, x, table, params, step, seeds, x1=x1, out=out)
        bufs, nbytes = _declared(torch.ops.ursa.metric_step.default, args)
        assert sorted(bufs) == sorted(mem.made) and nbytes == mem.peak


def test_table_metric_step_last_step_and_fsq_declare_nothing():
    D, K, m = 20, 97, 6
    cond, x, table, params, step, seeds = _metric_inputs(D, K, m)
    out = torch.empty_like(x)
    mem = _run(lambda: tks._metric_step(cond, None, x, table, params, step, seeds=seeds, row_len=D,
                                        guidance_scale=1.0, temperature=1.0, top_k=0, top_p=1.0, power=2,
                                        levels=None, last=True, argmax_last=False, out=out))
    assert mem.made == [] and _declared(torch.ops.ursa.metric_step.default,
                                        _metric_args(cond, x, table, params, step, seeds, out=out, last=True))[1] == 0


def test_table_path_sample_allocates_its_declared_workspace():
    D, K, m = 40, 97, 6
    _, x1, table, _, _, seeds = _metric_inputs(D, K, m)
    beta = torch.full((D,), 3.0, device=DEVICE)
    out = torch.empty_like(x1)
    tks._sq_norms(table)
    mem = _run(lambda: tks.metric_sample(x1, beta, table, seeds=seeds, row_len=D, out=out))
    args = ("triton", x1, beta, table, 2, None, seeds, D, 0, out)
    bufs, nbytes = _declared(torch.ops.ursa.metric_sample.default, args)
    assert mem.made == bufs and mem.peak == nbytes > 0


def test_gpu_declaration_follows_the_cuda_tiling():
    """At the IBQ video size on an H100 (G = 4 token groups): tile sums of ⌈D/4⌉ tokens, split sums,
    one count per group; the retired formula (D × K/64 fp32 and an x̂1 list) said 4× the tile sums."""
    D, K, m = 66_560, 131_072, 256
    with FakeTensorMode(), ops_library.as_gpu():
        x, table, x1 = torch.zeros(D, dtype=torch.long), torch.empty(K, m), torch.zeros(D, dtype=torch.long)
        args = _metric_args(None, x, table, torch.empty(4), torch.zeros(1, dtype=torch.long),
                            torch.zeros(1, dtype=torch.long), x1=x1, out=torch.empty_like(x))
        bufs, nbytes = _declared(torch.ops.ursa.metric_step.default, args)
    shapes = dict(zip(("list", "count", "tile_sums", "split_z"), bufs, strict=True))
    assert shapes["tile_sums"] == ((D // 4, K // 64), "float32") and shapes["count"] == ((4,), "int32")
    old = 2 * D * 8 + D * (K // 64) * 4
    tile_sums = D // 4 * (K // 64) * 4
    assert nbytes == D * 8 + 16 + tile_sums + D // 4 * shapes["split_z"][0][1] * 4 and old > 3.9 * nbytes


# ----------------------------------------------------------------------------- fused head + draw
@pytest.mark.parametrize("guided,logprobs", [(False, False), (True, True)], ids=["plain", "guided-logprobs"])
def test_head_draw_allocates_its_declared_workspace(guided, logprobs):
    D, K, H = 48, 300, 16
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(D, H, generator=g).to(DEVICE), (torch.randn(K, H, generator=g) * 0.5).to(DEVICE)
    hu = (h + 0.3 * torch.randn(D, H, generator=g).to(DEVICE)) if guided else None
    seeds, step = torch.tensor([5], device=DEVICE), torch.tensor([2], device=DEVICE)
    out = torch.empty(D, dtype=torch.int64, device=DEVICE)
    lp = torch.empty(D, dtype=torch.float32, device=DEVICE) if logprobs else None
    cfg = {"BLOCK_K": 32}  # several chunks (NC = 10)

    mem = _run(lambda: thd._head_draw(h, w, uncond_hidden=hu, guidance_scale=2.0, temperature=1.0, seeds=seeds,
                                      row_len=D, step=step, index_offset=0, argmax=False, out=out, logprobs=lp,
                                      cfg=cfg))
    nc = thd.head_config(D, K, H, DEVICE, h.dtype, **cfg)["NC"]
    want = ws.head_draw_workspace(D, nc)
    assert nc == 10 and sorted(mem.made) == sorted((b.shape, str(b.dtype).replace("torch.", "")) for b in want.buffers)
    assert mem.peak == want.peak_bytes() and mem.current == 0
    # the custom op's declaration (default tiling) equals the launcher's allocation at that tiling
    mem = _run(lambda: thd.head_draw(h, w, uncond_hidden=hu, guidance_scale=2.0, seeds=seeds, row_len=D, step=step,
                                     out=out, logprobs=lp))
    args = (h, w, hu, 2.0, 1.0, seeds, D, step, 0, False, out, lp)
    bufs, nbytes = _declared(torch.ops.ursa.head_draw.default, args)
    assert mem.peak == nbytes and set(bufs) <= set(mem.made)


def test_head_draw_scratch_is_the_gpu_declaration():
    D, K = 33_280, 64_000
    nc = -(-K // 128)  # CUDA: one chunk = one BLOCK_K = 128 tile
    want = max(8 * D * nc + 12 * D, 24 * D)
    assert ops_library.head_draw_scratch(D, K) == want
    with FakeTensorMode(), ops_library.as_gpu():
        h, w = torch.empty(D, 2048, dtype=torch.bfloat16), torch.empty(K, 2048, dtype=torch.bfloat16)
        out, st, seeds = torch.empty(D, dtype=torch.long), torch.zeros(1, dtype=torch.long), torch.zeros(1).long()
        assert _declared(torch.ops.ursa.head_draw.default, (h, w, h, 7.0, 1.0, seeds, D, st, 0, False, out,
                                                             None))[1] == want


# ----------------------------------------------------------------------------- native CPU
def test_native_step_allocates_nothing_but_what_it_returns():
    nat = pytest.importorskip("ursa_engine._native_cpu")  # noqa: F841
    from ursa_engine import _native

    D, K, m = 64, 97, 6
    cond, x, table, params, step, seeds = _metric_inputs(D, K, m)
    cond, x, table, params, step, seeds = (t.cpu() for t in (cond, x, table, params, step, seeds))
    out = torch.empty_like(x)
    _native.metric_step(cond, None, x, table, params, step, seeds=seeds, row_len=D, out=out)  # verifies once
    mem = _run(lambda: _native.metric_step(cond, None, x, table, params, step, seeds=seeds, row_len=D, out=out))
    assert mem.made == [] and mem.peak == 0  # the kernels' scratch is per-thread host memory, outside torch
    mem = _run(lambda: _native.metric_step(cond, None, x, table, params, step, seeds=seeds, row_len=D))
    assert mem.made == [((D,), "int64")]  # only the returned tokens
    args = ("native", cond, None, x, table, params, step, seeds, D, 1.0, 1.0, 0, 1.0, 2, None, False, False, 0,
            None, out, None)
    assert _declared(torch.ops.ursa.metric_step.default, args) == ([], 0)


# ----------------------------------------------------------------------------- the tracker
def test_declared_workspace_tensors_update_phase_records_and_the_watch():
    def spec(func, args, kwargs):
        return ([((1000, 64), torch.float32), ((8,), torch.int64)], "demo") if func is torch.ops.aten.mm.default \
            else None

    a, b = torch.randn(4, 5), torch.randn(5, 6)
    with LiveBytes(workspace=spec, watch=50_000) as mem, mem.phase("p"):
        mem.watching = True
        torch.mm(a, b)
    p = mem.phases["p"]
    assert p.largest["shape"] == [1000, 64] and p.most_elements["numel"] == 64_000
    assert p.peak == 1000 * 64 * 4 + 64 + 4 * 6 * 4 and mem.unphased == 0
    assert [t["shape"] for t in mem.big] == [[1000, 64]] and "workspace: demo" in mem.big[0]["op"]
