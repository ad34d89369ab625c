"""Kernel scratch from one source of truth (issue 20, item 1).

The launchers size their scratch with ``ursa_engine.triton_kernels.workspaces`` and the memory
plans declare it through :func:`ursa_engine.ops_library.workspace_buffers`, fed with the custom
op's own arguments. Here the real launchers run at small sizes (Triton interpreter, native CPU)
under :class:`~ursa_engine.memory.LiveBytes` on real tensors, and what they allocate (each tensor,
and the peak) must equal the declaration; at GPU sizes the declaration follows the CUDA tiling
(token groups: the tile sums of ⌈D/4⌉ tokens, not D; no x̂1 buffer when ``x1`` is given). The native
step's torch side (float32 chunks of logits its kernels cannot read, the reference's top-k / top-p
filter per chunk) runs under a small chunk budget and its peak must equal its declaration too. Also:
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


# ----------------------------------------------------------------------------- native slow paths
def _logits(kind, D, K, g):
    """(D, K) logits of ``kind``: a dtype, ``f32-strided`` (stride 2 in K) or ``f32-rows-copy`` (a
    (2, D/2, K) view that no (D, K) view exists of: the launcher reshapes it, one copy)."""
    if kind == "f32-strided":
        return (torch.randn(D, 2 * K, generator=g) * 2)[:, ::2]
    if kind == "f32-rows-copy":
        return (torch.randn(D // 2, K, 2, generator=g) * 2).permute(2, 0, 1)
    return (torch.randn(D, K, generator=g) * 2).to(getattr(torch, kind))


def _native_call(op, cond, uncond, x, table, params, step, seeds, *, row_len, out, top_k, top_p, error, mask_id):
    """The launcher call (``ursa_engine._native``) and the custom op's argument tuple for the same call."""
    from ursa_engine import _native

    common = dict(seeds=seeds, row_len=row_len, guidance_scale=2.5, temperature=0.8, top_k=top_k, top_p=top_p,
                  out=out, error=error)
    if op == "metric_step":
        call = lambda: _native.metric_step(cond, uncond, x, table, params, step, **common)  # noqa: E731
    elif op == "mixture_step":
        call = lambda: _native.mixture_step(cond, uncond, x, params, step, **common)  # noqa: E731
    else:
        call = lambda: _native.mask_step(cond, uncond, x, params, step, mask_id=mask_id, **common)  # noqa: E731
    named = dict(backend="native", cond=cond, uncond=uncond, x=x, table=table, params=params, step=step,
                 mask_id=mask_id, seeds=seeds, row_len=row_len, guidance_scale=2.5, temperature=0.8, top_k=top_k,
                 top_p=top_p, power=2, levels=None, last=False, argmax_last=False, index_offset=0, x1=None, K=None,
                 out=out, error=error)
    func = getattr(torch.ops.ursa, op).default
    return call, func, tuple(named[a.name] for a in func._schema.arguments)


NATIVE_CASES = {  # op, cond, uncond, top_k, top_p, error, row_len (None: D)
    "convert-f64": ("metric_step", "float64", None, 0, 1.0, False, None),
    "convert-uncond-f16": ("mixture_step", "float32", "float16", 0, 1.0, False, 8),
    "convert-strided-guided": ("mask_step", "f32-strided", "bfloat16", 0, 1.0, True, None),
    "rows-copy": ("metric_step", "f32-rows-copy", None, 0, 1.0, False, None),
    "topk": ("metric_step", "bfloat16", None, 5, 1.0, False, 8),
    "topp-guided-error": ("mixture_step", "bfloat16", "bfloat16", 0, 0.9, True, None),
    "topk-topp-guided-error": ("mask_step", "float32", "bfloat16", 5, 0.8, True, None),
    "topk-guided": ("mixture_step", "bfloat16", "float16", 5, 1.0, True, None),  # peak: guidance (z, u, c == u)
    "topk-guided-f64": ("metric_step", "float64", "float64", 7, 1.0, False, None),  # uncond read as it is
    "topk-all-codes": ("metric_step", "bfloat16", None, 97, 1.0, False, None),
}


@pytest.mark.parametrize("case", list(NATIVE_CASES))
def test_native_slow_paths_allocate_their_declared_workspace(case, monkeypatch):
    """The native launcher's torch side (float32 chunks of logits it cannot read; the reference's
    top-k / top-p filter per chunk) under a small chunk budget: its peak bytes equal the declaration
    of ``native_step_workspace``, which the plans get from the op's arguments; leaving out any buffer
    of the peak stage would make the declaration fall short."""
    pytest.importorskip("ursa_engine._native_cpu")
    from ursa_engine.reference import sampler as ref

    op, ck, uk, top_k, top_p, with_error, row_len = NATIVE_CASES[case]
    D, K, m = 24, 97, 6
    monkeypatch.setattr(ref, "CHUNK_BYTES", 10 * K * 8)  # filter: 10 rows a chunk; convert: 20
    g = torch.Generator().manual_seed(3)
    cond, uncond = _logits(ck, D, K, g), None if uk is None else _logits(uk, D, K, g)
    _, x, table, params, step, seeds = (t.cpu() for t in _metric_inputs(D, K, m))
    out = torch.empty_like(x)
    error = torch.zeros(1, dtype=torch.int32) if with_error else None
    call, func, args = _native_call(op, cond, uncond, x, table, params, step, seeds, row_len=row_len or D, out=out,
                                    top_k=top_k, top_p=top_p, error=error, mask_id=K - 1)
    call()  # the codebook's verification, once
    mem = _run(call)

    want = ws.native_step_workspace(cond, uncond, D, K, row_len=row_len or D, top_k=top_k, top_p=top_p,
                                    error=with_error)
    path = "filter" if case.startswith("top") else "convert" if case.startswith("convert") else None
    assert want.config["path"] == path and mem.current == 0 and mem.peak > 0
    if path is not None:
        rows = 10 if path == "filter" else 20
        assert want.config["rows"] == rows and want.config["piece"] == (min(rows // 8 * 8, D) if row_len else rows)
    assert mem.peak == want.peak_bytes()
    bufs, nbytes = _declared(func, args)  # the plans' declaration: the same buffers at the same peak
    assert nbytes == mem.peak and sorted(bufs) == sorted(
        (b.shape, str(b.dtype).replace("torch.", "")) for b in want.peak_stage())
    if path == "filter":  # made by torch ops: each buffer of the peak stage was allocated
        assert set(bufs) <= set(mem.made)
    else:  # the launcher allocates exactly the declared buffers, and nothing else
        assert sorted(mem.made) == sorted((b.shape, str(b.dtype).replace("torch.", "")) for b in want.buffers)
    # the comparison above catches a missing buffer: any one alive in every stage at the peak (top-p's
    # sort and cumsum stages tie: the softmax alone, only in the first, does not move the peak)
    stages = {s for b in want.buffers for s in b.stages}
    at_peak = [s for s in stages if sum(b.nbytes for b in want.stage(s)) == mem.peak]
    essential = [b for b in want.peak_stage() if all(s in b.stages for s in at_peak)]
    assert essential
    for left_out in essential:
        rest = ws.Workspace([b for b in want.buffers if b is not left_out])
        assert rest.peak_bytes() < mem.peak, left_out.name


def test_native_filter_peak_is_the_sort_stage():
    """Top-p on a chunk: z, the probabilities, torch.sort's sorted probabilities and order (32 bytes a
    logit) and top-k's k-th values; at the default budget ~1 GiB, declared at real size on fake
    tensors (plans: the native backend runs top-k / top-p under ``auto``, Triton does not)."""
    from ursa_engine import _dispatch
    from ursa_engine.reference import sampler as ref

    D, K, k = 66_560, 64_000, 50
    rows = ref.CHUNK_BYTES // (8 * K)
    with FakeTensorMode(), ops_library.as_gpu():
        assert _dispatch.resolve("metric_step", "auto", torch.device("cuda"), top_k=k, top_p=0.9) is \
            ops_library.sampler_op("metric_step", "native")
        cond = torch.empty(D, K, dtype=torch.bfloat16)
        x, table = torch.zeros(D, dtype=torch.long), torch.empty(K, 8)
        _, func, args = _native_call("metric_step", cond, cond, x, table, torch.empty(4), torch.zeros(1).long(),
                                     torch.zeros(1).long(), row_len=D, out=torch.empty_like(x), top_k=k, top_p=0.9,
                                     error=None, mask_id=0)
        bufs, nbytes = _declared(func, args)
        triton = _declared(func, ("triton",) + args[1:])[0]  # the backend argument picks the declaration
        assert triton and "float64" not in {d for _, d in triton}
    assert rows == 524 and nbytes == 32 * rows * K + 8 * rows * k and 1.0e9 < nbytes < 1.1e9
    assert {"float64", "int64"} == {d for _, d in bufs}


def test_native_plain_step_declares_nothing_and_x1_skips_the_logits():
    """Logits the kernels read as they are (bf16 / fp16 / fp32, contiguous in K, one dtype): no torch
    scratch; ``x1`` given: the logits are not read, whatever the filter."""
    D, K = 40, 97
    with FakeTensorMode():
        cond, x = torch.empty(D, K, dtype=torch.bfloat16), torch.zeros(D, dtype=torch.long)
        _, func, args = _native_call("mixture_step", cond, cond, x, None, torch.empty(4), torch.zeros(1).long(),
                                     torch.zeros(1).long(), row_len=D, out=x, top_k=0, top_p=1.0, error=None,
                                     mask_id=0)
        assert _declared(func, args) == ([], 0)
        _, func, args = _native_call("mixture_step", cond.double(), None, x, None, torch.empty(4),
                                     torch.zeros(1).long(), torch.zeros(1).long(), row_len=D, out=x, top_k=3,
                                     top_p=1.0, error=None, mask_id=0)
        assert _declared(func, args)[1] > 0
        named = dict(zip((a.name for a in func._schema.arguments), args, strict=True), x1=x)
        assert _declared(func, tuple(named[a.name] for a in func._schema.arguments)) == ([], 0)


def test_native_largest_piece_is_the_launchers():
    from ursa_engine import _native

    assert set(_native._DTYPES) == set(ws.NATIVE_DTYPES)
    for D in (1, 7, 24, 100):
        for L in (1, 3, 8, 24, 200):
            for rows in (1, 5, 10, 64):
                pieces = [e - s for s, e, *_ in _native._row_chunks(D, L, 1, rows)]
                assert ws.native_largest_piece(D, L, rows) == max(pieces), (D, L, rows)
    assert ws.native_chunk_rows(1000, filtering=True, budget=80_000) == 10
    assert ws.native_chunk_rows(1000, filtering=False, budget=80_000) == 20


def test_native_filter_reads_transposed_logits_by_rows():
    """A filtered chunk is handed to the kernel contiguous in K whatever the logits' layout (it was
    float32 in the logits' layout: (D, K) logits transposed in memory drew wrong codes)."""
    pytest.importorskip("ursa_engine._native_cpu")
    from ursa_engine import _native
    from ursa_engine.reference import sampler as ref

    D, K = 6, 50
    cond = (torch.randn(K, D, generator=torch.Generator().manual_seed(0)) * 3).t()
    x, params = torch.zeros(D, dtype=torch.long), torch.tensor([0.4, 1.0, 0.5, 0.2])
    kw = dict(seeds=torch.tensor([7]), row_len=D, top_k=3, last=True, argmax_last=True)
    got = _native.mixture_step(cond, None, x, params, torch.tensor([3]), **kw)
    assert torch.equal(got, ref.mixture_step(cond, None, x, params, torch.tensor([3]), **kw))
    assert torch.equal(got, cond.argmax(-1))
