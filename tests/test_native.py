"""The native backend (csrc/, ursa_engine/_native.py): RNG contract, same-seed agreement with the
reference, exact laws, row chunking, given x̂1, build facts (error bits and memory:
test_native_checks.py) (DESIGN §2.5, §5, §7).

CPU tests run wherever the extension is built; ``gpu`` tests need a CUDA device (CUDA sources
are only compiled in CI, see ``test_cuda_sources_compiled_where_nvcc_exists``).
"""

import importlib.util
import inspect
import os
import shutil

import pytest
import torch

import ursa_engine as ue
from ursa_engine import _dispatch
from ursa_engine import _native as nat
from ursa_engine.reference import laws, rng
from ursa_engine.reference import sampler as ref

if nat.unavailable("cpu") is not None:
    pytest.skip(nat.unavailable("cpu"), allow_module_level=True)

from law_stats import assert_follows  # noqa: E402  (the suite's TV bounds, fixed in advance)
from native_cases import _C, AGREE, DEVICES, _codebook, _gen, _step_inputs  # noqa: E402


def _agree(a, b):
    return (a.cpu() == b.cpu()).double().mean().item()


# ----------------------------------------------------------------------------- RNG contract
def test_philox_known_answer_in_cpp_and_torch():
    """Random123's known answer for counter = key = 0."""
    expected = (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert tuple(_C.philox_raw(0, 0, 0, 0, 0, 0)) == expected
    zero = torch.zeros((), dtype=torch.int64)
    assert tuple(int(w) for w in rng.philox4x32((zero,) * 4, (zero, zero))) == expected


def test_philox_identical_draws_cpp_and_torch_random_counters():
    g = _gen(1)
    n = 4096
    words = torch.randint(0, 2**32, (n, 6), generator=g, dtype=torch.int64)
    ref_words = torch.stack(rng.philox4x32(tuple(words[:, :4].T), tuple(words[:, 4:].T)), dim=-1)
    cpp = torch.tensor([_C.philox_raw(*(int(v) for v in row)) for row in words.tolist()], dtype=torch.int64)
    assert torch.equal(cpp, ref_words)


@pytest.mark.parametrize("seed, row_len, numel", [(12345, 3000, 3000), ([7, 2**40 + 3, 0], 1000, 3000)])
@pytest.mark.parametrize("step, tag", [(0, rng.TAG_PATH), (17, rng.TAG_STEP), (2**32 + 5, rng.TAG_STEP)])
def test_token_words_identical_cpp_and_torch(seed, row_len, numel, step, tag):
    """Row lookup (one seed, per-sample seeds), index, step and tag words of the contract."""
    seeds = torch.tensor(seed if isinstance(seed, list) else [seed], dtype=torch.int64)
    out = torch.empty(numel, 4, dtype=torch.int64)
    _C.random_words(seeds=seeds.data_ptr(), n_seeds=seeds.numel(), row_len=row_len, numel=numel,
                    step=step & 0xFFFFFFFF, tag=tag, out=out.data_ptr())
    expected = torch.stack(rng.random_words(seeds, row_len, numel, step, tag), dim=-1)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("index_offset", [5, 2**32 - 3, 2**40 + 7])
def test_index_offset_words_identical_cpp_and_torch(index_offset):
    """index = (i % row_len) + index_offset in 64 bits: the offset carries into the counter's high word."""
    if "index_offset" not in inspect.signature(rng.random_words).parameters:
        pytest.skip("the reference rng has no index_offset yet")
    seeds = torch.tensor([7, 2**40 + 3], dtype=torch.int64)
    out = torch.empty(2000, 4, dtype=torch.int64)
    _C.random_words(seeds=seeds.data_ptr(), n_seeds=2, row_len=1000, numel=2000, step=9, tag=rng.TAG_STEP,
                    out=out.data_ptr(), index_offset=index_offset)
    expected = rng.random_words(seeds, 1000, 2000, 9, rng.TAG_STEP, index_offset=index_offset)
    assert torch.equal(out, torch.stack(expected, dim=-1))


# ----------------------------------------------------------------------------- same seed as the reference
STEP_OPTIONS = [
    dict(),
    dict(guidance_scale=3.0, temperature=0.7),
    dict(last=True),
    dict(last=True, argmax_last=True, guidance_scale=2.0),
    dict(top_k=5, guidance_scale=2.0),
    dict(top_p=0.8, temperature=1.3),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["table", "wide", "fsq"])
@pytest.mark.parametrize("power", [2, 4])
def test_metric_step_same_seed_same_tokens(device, dtype, kind, power):
    cb = _codebook(kind)
    K, D = cb.size, 3000
    cond, uncond, x = _step_inputs(D, K, dtype, 2, device)
    table = cb.normalized_on(device)
    params = torch.tensor([0.08, 2.5, 12.0, 0.0], device=device)
    step = torch.tensor([4], device=device)
    seeds = torch.tensor([99], device=device)
    for opts in STEP_OPTIONS:
        unc = uncond if "guidance_scale" in opts else None
        kw = dict(seeds=seeds, row_len=D, power=power, levels=cb.levels, **opts)
        a = ref.metric_step(cond, unc, x, table, params, step, **kw)
        b = nat.metric_step(cond, unc, x, table, params, step, **kw)
        assert _agree(a, b) >= AGREE, opts
        if not opts.get("last"):
            assert 0.2 < (a != x).double().mean().item() < 0.95  # the test exercises moves


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["mixture_step", "mask_step"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixture_and_mask_step_same_seed_same_tokens(device, op, dtype):
    K, D = 97, 3000
    cond, uncond, x = _step_inputs(D, K, dtype, 3, device)
    extra = {}
    if op == "mask_step":
        extra = dict(mask_id=K - 1)
        x = torch.where(torch.rand(D, generator=_gen(4)).to(device) < 0.6, K - 1, x)
    params = torch.tensor([0.1, 0.0, 0.0, 3.0], device=device)
    step = torch.tensor([2], device=device)
    for opts in STEP_OPTIONS:
        unc = uncond if "guidance_scale" in opts else None
        kw = dict(seeds=torch.tensor([5], device=device), row_len=D, **extra, **opts)
        a = getattr(ref, op)(cond, unc, x, params, step, **kw)
        b = getattr(nat, op)(cond, unc, x, params, step, **kw)
        assert _agree(a, b) >= AGREE, opts
        if op == "mask_step":
            assert not (b == K - 1).logical_and(x != K - 1).any()  # unmasked tokens stay


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["table", "wide", "fsq"])
def test_path_samples_same_seed_same_tokens(device, kind):
    cb = _codebook(kind, seed=1)
    K, D = cb.size, 4000
    g = _gen(6)
    x1 = torch.randint(0, K, (D,), generator=g).to(device)
    t = torch.rand(D, generator=g).to(device)
    t[:50] = 1.0  # β = ∞: x1 itself
    seeds = torch.tensor([1, 2, 3, 4], device=device)
    beta = ue.schedules.beta(t, 1.0, 5.0).float()
    a = ref.metric_sample(x1, beta, cb.normalized_on(device), power=2, seeds=seeds, row_len=D // 4)
    b = nat.metric_sample(x1, beta, cb.normalized_on(device), power=2, levels=cb.levels, seeds=seeds,
                          row_len=D // 4)
    assert _agree(a, b) >= AGREE and torch.equal(b[:50], x1[:50])
    keep = t.float()
    a = ref.mixture_sample(x1, keep, K=K, seeds=seeds, row_len=D // 4)
    assert torch.equal(a, nat.mixture_sample(x1, keep, K=K, seeds=seeds, row_len=D // 4))
    a = ref.mask_sample(x1, keep, mask_id=K, seeds=seeds, row_len=D // 4)
    assert torch.equal(a, nat.mask_sample(x1, keep, mask_id=K, seeds=seeds, row_len=D // 4))


def test_strided_logit_rows_and_a_strided_out_give_the_reference_tokens():
    cb = _codebook("table")
    K, D = cb.size, 1000
    big = torch.randn(D, K + 13, generator=_gen(18)) * 2
    cond = big[:, 5:5 + K]  # rows K + 13 apart
    x = torch.randint(0, K, (D,), generator=_gen(19))
    args = (cond, None, x, cb.normalized, torch.tensor([0.1, 2.0, 9.0, 0.0]), torch.tensor([3]))
    kw = dict(seeds=torch.tensor([4]), row_len=D)
    out = torch.zeros(D, 2, dtype=torch.int64)[:, 0]
    nat.metric_step(*args, out=out, **kw)
    assert _agree(ref.metric_step(*args, **kw), out) >= AGREE


def test_scheduler_auto_picks_native_on_cpu_and_matches_reference():
    path = ue.MetricPath(_codebook("fsq"), alpha=1.0, c=5.0)
    sched = ue.Scheduler(path, 10)
    cond, uncond, x = _step_inputs(2000, path.size, torch.bfloat16, 7, "cpu")
    kw = dict(uncond_logits=uncond, guidance_scale=4.0, seed=3)
    a = sched.step(cond, 3, x, backend="torch", **kw)
    assert _agree(a, sched.step(cond, 3, x, backend="auto", **kw)) >= AGREE
    assert _agree(a, sched.step(cond, 3, x, backend="native", **kw)) >= AGREE


# ----------------------------------------------------------------------------- exact laws
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind, power, opts", [
    ("table", 2, dict(guidance_scale=3.0, temperature=0.8)),
    ("fsq", 2, dict()),
    ("wide", 4, dict(guidance_scale=1.5)),
])
def test_metric_step_matches_exact_law(device, kind, power, opts):
    """K = 97 / 100: replicated token states, one draw each, TV against laws.metric_step_probs."""
    cb = _codebook(kind, seed=2)
    K, S, n = cb.size, 3, 4000
    g = _gen(8)
    cond = torch.randn(S, K, generator=g) * 2
    uncond = torch.randn(S, K, generator=g)
    x = torch.tensor([0, K // 2, K - 1])
    h, beta, beta_dot = 0.2, 2.0, 8.0
    table = cb.normalized
    law_opts = {"guidance_scale": 1.0, "temperature": 1.0, **opts}
    law = laws.metric_step_probs(cond, uncond if "guidance_scale" in opts else None, x, table, h=h, beta=beta,
                                 beta_dot=beta_dot, power=power, **law_opts)
    rep = lambda v: v[:, None].expand(S, n, *v.shape[1:]).reshape(S * n, *v.shape[1:]).contiguous().to(device)  # noqa: E731
    params = torch.tensor([h, beta, beta_dot, 0.0], device=device)
    out = nat.metric_step(rep(cond), rep(uncond) if "guidance_scale" in opts else None, rep(x),
                          cb.normalized_on(device), params, torch.tensor([1], device=device),
                          seeds=torch.tensor([2024], device=device), row_len=S * n, power=power, levels=cb.levels,
                          **opts)
    assert_follows(out.view(S, n), law)


@pytest.mark.parametrize("device", DEVICES)
def test_mask_step_matches_exact_law_and_never_draws_the_mask(device):
    K, S, n = 7, 2, 4000
    cond = torch.randn(S, K, generator=_gen(9)) * 2
    x = torch.tensor([K - 1, 2])
    law = laws.mask_step_probs(cond, None, x, mask_id=K - 1, h=0.1, rate=4.0, guidance_scale=1.0, temperature=1.0)
    rep = lambda v: v[:, None].expand(S, n, *v.shape[1:]).reshape(S * n, *v.shape[1:]).contiguous().to(device)  # noqa: E731
    out = nat.mask_step(rep(cond), None, rep(x), torch.tensor([0.1, 0.0, 0.0, 4.0], device=device),
                        torch.tensor([0], device=device), mask_id=K - 1, seeds=torch.tensor([1], device=device),
                        row_len=S * n)
    assert_follows(out.view(S, n), law)


# ----------------------------------------------------------------------------- invariances
def test_metric_step_batch_invariant_with_per_sample_seeds():
    cb = _codebook("fsq")
    K, L = cb.size, 500
    cond, uncond, x = _step_inputs(2 * L, K, torch.float32, 10, "cpu")
    params, step = torch.tensor([0.1, 2.0, 9.0, 0.0]), torch.tensor([3])
    kw = dict(power=2, levels=cb.levels, guidance_scale=2.0)
    both = nat.metric_step(cond, uncond, x, cb.normalized, params, step, seeds=torch.tensor([11, 12]), row_len=L,
                           **kw)
    second = nat.metric_step(cond[L:], uncond[L:], x[L:], cb.normalized, params, step, seeds=torch.tensor([12]),
                             row_len=L, **kw)
    assert torch.equal(both[L:], second)


def test_metric_step_in_place_and_any_thread_count_give_the_same_tokens():
    cb = _codebook("table")
    cond, uncond, x = _step_inputs(1500, cb.size, torch.float32, 11, "cpu")
    params, step, seeds = torch.tensor([0.1, 2.0, 9.0, 0.0]), torch.tensor([3]), torch.tensor([4])
    kw = dict(seeds=seeds, row_len=1500, guidance_scale=2.0)
    a = nat.metric_step(cond, uncond, x, cb.normalized, params, step, **kw)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        b = nat.metric_step(cond, uncond, x, cb.normalized, params, step, **kw)
    finally:
        torch.set_num_threads(threads)
    y = x.clone()
    nat.metric_step(cond, uncond, y, cb.normalized, params, step, out=y, **kw)
    assert torch.equal(a, b) and torch.equal(a, y)


@pytest.mark.parametrize("isa", ["base", "avx2"])
def test_every_instruction_set_gives_the_same_tokens(monkeypatch, isa):
    """The kernels are compiled per ISA and picked at run time; URSA_NATIVE_ISA caps the pick."""
    if isa not in nat.build_info()["isas"].split(","):
        pytest.skip(f"{isa} kernels not built on this architecture")
    cb = _codebook("fsq")
    cond, uncond, x = _step_inputs(2000, cb.size, torch.bfloat16, 12, "cpu")
    args = (cond, uncond, x, cb.normalized, torch.tensor([0.1, 2.0, 9.0, 0.0]), torch.tensor([3]))
    kw = dict(seeds=torch.tensor([4]), row_len=2000, guidance_scale=2.0, levels=cb.levels)
    best = nat.metric_step(*args, **kw)
    monkeypatch.setenv("URSA_NATIVE_ISA", isa)
    assert _C.isa() in (isa, "base")
    assert _agree(best, nat.metric_step(*args, **kw)) >= AGREE


def test_fsq_levels_are_ignored_for_a_table_that_is_not_the_fsq_one():
    cb = ue.Codebook(torch.randn(100, 3, generator=_gen(13)))
    cond, _, x = _step_inputs(1000, 100, torch.float32, 14, "cpu")
    args = (cond, None, x, cb.normalized, torch.tensor([0.1, 2.0, 9.0, 0.0]), torch.tensor([3]))
    kw = dict(seeds=torch.tensor([4]), row_len=1000)
    a = ref.metric_step(*args, **kw)
    assert _agree(a, nat.metric_step(*args, levels=(4, 5, 5), **kw)) >= AGREE


def test_mismatched_shapes_raise_before_any_kernel_runs():
    cond, _, x = _step_inputs(10, 97, torch.float32, 15, "cpu")
    params, step = torch.tensor([0.1, 2.0, 9.0, 0.0]), torch.tensor([3])
    with pytest.raises(ValueError, match="table"):
        nat.metric_step(cond, None, x, torch.randn(96, 5), params, step, seeds=torch.tensor([1]), row_len=10)
    with pytest.raises(ValueError, match="uncond"):
        nat.mixture_step(cond, cond[:5], x, params, step, seeds=torch.tensor([1]), row_len=10)
    with pytest.raises(ValueError, match="seeds"):
        nat.mixture_step(cond, None, x, params, step, seeds=torch.tensor([1, 2]), row_len=3)


def test_auto_order_follows_the_measured_gpu_choice_per_shape(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setitem(_dispatch._MEASURED, _dispatch._bucket("metric_step", cuda, (4000, 64000)), "native")
    assert _dispatch.auto_order(cuda, "metric_step", (3000, 64000))[0] == "native"  # same log2 bucket
    assert _dispatch.auto_order(cuda, "metric_step", (33280, 64000))[0] == "triton"  # not measured
    assert _dispatch.auto_order(cuda, "mixture_step", (3000, 64000))[0] == "triton"
    assert _dispatch.auto_order(torch.device("cpu"))[0] == "native"


# ----------------------------------------------------------------------------- row chunks (index_offset)
def _op_inputs(device, D, K=97):
    """One fixed input of every op: bf16 logits, tokens (masked ones for the mask ops), step values."""
    cond, uncond, x = _step_inputs(D, K, torch.bfloat16, 30, device)
    g = _gen(31)
    return dict(cond=cond, uncond=uncond, x=x, K=K, table=ue.Codebook.fsq((K,)).normalized_on(device),
                beta=(torch.rand(D, generator=g) * 4).to(device), keep=torch.rand(D, generator=g).to(device),
                masked=torch.where(torch.rand(D, generator=g).to(device) < 0.6, K - 1, x),
                params=torch.tensor([0.3, 2.5, 12.0, 2.0], device=device), step=torch.tensor([6], device=device))


def _op_calls(device, D, K=97):
    """Every op as ``call(sl, **rng) -> tokens`` on the tokens ``sl`` of :func:`_op_inputs`."""
    i = _op_inputs(device, D, K)
    cond, uncond, x, table, params, step = i["cond"], i["uncond"], i["x"], i["table"], i["params"], i["step"]
    guided = dict(guidance_scale=3.0, temperature=0.9)
    return {
        "metric_step": lambda sl, **kw: nat.metric_step(cond[sl], uncond[sl], x[sl], table, params, step, **guided,
                                                        **kw),
        "metric_step_top_k": lambda sl, **kw: nat.metric_step(cond[sl], uncond[sl], x[sl], table, params, step,
                                                              top_k=9, **guided, **kw),
        "mixture_step": lambda sl, **kw: nat.mixture_step(cond[sl], None, x[sl], params, step, **kw),
        "mask_step": lambda sl, **kw: nat.mask_step(cond[sl], uncond[sl], i["masked"][sl], params, step,
                                                    mask_id=K - 1, top_p=0.9, **guided, **kw),
        "metric_sample": lambda sl, **kw: nat.metric_sample(x[sl], i["beta"][sl], table, **kw),
        "mixture_sample": lambda sl, **kw: nat.mixture_sample(x[sl], i["keep"][sl], K=K, **kw),
        "mask_sample": lambda sl, **kw: nat.mask_sample(x[sl], i["keep"][sl], mask_id=K - 1, **kw),
    }


OPS = ["metric_step", "metric_step_top_k", "mixture_step", "mask_step", "metric_sample", "mixture_sample",
       "mask_sample"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_row_chunks_with_index_offset_give_the_unchunked_tokens(device, op):
    """Tokens [s, e) of both samples as one call (row_len = e − s, index_offset = s) equal the whole call."""
    L = 600
    call = _op_calls(device, 2 * L)[op]
    seeds = torch.tensor([21, 2**35 + 4], device=device)
    whole = call(slice(None), seeds=seeds, row_len=L).view(2, L)
    for s, e in [(0, 150), (150, 151), (151, 600)]:
        rows = torch.cat([torch.arange(s, e), torch.arange(L + s, L + e)]).to(device)
        piece = call(rows, seeds=seeds, row_len=e - s, index_offset=s).view(2, e - s)
        assert torch.equal(piece, whole[:, s:e]), (s, e)
    one = call(slice(L + 200, L + 260), seeds=seeds[1:], row_len=60, index_offset=200)  # part of one row
    assert torch.equal(one, whole[1, 200:260])


def test_row_chunks_of_the_launcher_cover_every_token_once_with_its_rng_row():
    for D, L, n_seeds, rows in [(1000, 1000, 1, 64), (1000, 250, 4, 600), (1000, 250, 4, 100), (999, 7, 1, 10)]:
        seen = []
        for s, e, lo, hi, row_len, offset in nat._row_chunks(D, L, n_seeds, rows):
            assert 0 < e - s <= rows
            i = torch.arange(s, e)
            rel = i - s
            row = rel // row_len
            assert torch.equal(lo + row, i // L) or n_seeds == 1  # the seed of each token
            assert hi - lo == -(-(e - s) // row_len) or n_seeds == 1
            assert torch.equal(rel % row_len + offset, i % L)  # its index in the whole call
            seen.append(i)
        assert torch.equal(torch.cat(seen), torch.arange(D))


# ----------------------------------------------------------------------------- given x̂1 (x1=)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["metric_step", "mixture_step", "mask_step"])
def test_step_with_given_x1_equals_the_step_that_drew_it_and_reads_no_logits(device, op):
    """x̂1 of the last step (lane 0 of the same step) passed as x1= gives the same tokens with cond=None."""
    D = 3000
    i = _op_inputs(device, D)
    K, params, step = i["K"], i["params"], i["step"]
    x = i["masked"] if op == "mask_step" else i["x"]
    call = _op_calls(device, D)[op]
    rng_kw = dict(seeds=torch.tensor([77], device=device), row_len=D)
    x1 = call(slice(None), last=True, **rng_kw)  # x̂1 where it is used (masked tokens for the mask step)
    drawn = call(slice(None), **rng_kw)

    def given(last=False, cond=None, **kw):
        head = (cond, cond, x, i["table"]) if op == "metric_step" else (cond, cond, x)
        extra = {"mask_id": K - 1} if op == "mask_step" else {}
        return getattr(nat, op)(*head, params, step, last=last, x1=x1, **extra, **rng_kw, **kw)

    assert torch.equal(given(), drawn)
    assert (drawn != x).double().mean().item() > 0.05
    assert torch.equal(given(last=True), x1)
    err = torch.zeros(1, dtype=torch.int32, device=device)
    nan = torch.full((D, K), torch.nan, device=device)  # logits given but ignored: not read, not checked
    assert torch.equal(given(cond=nan, guidance_scale=2.0, top_k=3, error=err), drawn) and int(err) == 0


@pytest.mark.parametrize("op", ["metric_step", "mixture_step", "mask_step"])
def test_step_with_given_x1_matches_the_reference(op):
    fn = getattr(ref, op)
    if "x1" not in inspect.signature(fn).parameters:
        pytest.skip(f"the reference {op} has no x1= yet")
    D, K = 3000, 97
    cb = ue.Codebook.fsq((97,))
    _, _, x = _step_inputs(D, K, torch.float32, 32, "cpu")
    x1 = torch.randint(0, K, (D,), generator=_gen(33))
    if op == "mask_step":
        x = torch.where(torch.rand(D, generator=_gen(34)) < 0.6, K - 1, x)
    params, step = torch.tensor([0.3, 2.5, 12.0, 2.0]), torch.tensor([6])
    args = (None, None, x, cb.normalized, params, step) if op == "metric_step" else (None, None, x, params, step)
    kw = dict(seeds=torch.tensor([5]), row_len=D, x1=x1, **({"mask_id": K - 1} if op == "mask_step" else {}))
    a, b = fn(*args, **kw), getattr(nat, op)(*args, **kw)
    assert _agree(a, b) >= AGREE and (a != x).any()


# ----------------------------------------------------------------------------- build
def test_cuda_sources_compiled_where_nvcc_exists():
    """CI has nvcc and no GPU: the CUDA module must have been built (it only loads on a GPU host)."""
    nvcc = os.environ.get("CUDACXX") or shutil.which("nvcc")
    info = nat.build_info()
    if nvcc is None:
        assert not info["cuda"] or importlib.util.find_spec("ursa_engine._native_cuda") is not None
        pytest.skip(f"no nvcc on this machine ({info['cuda_note']})")
    if info["cuda_note"] == "URSA_CUDA=OFF":
        pytest.skip("built with URSA_CUDA=OFF (a deliberate opt-out)")
    assert info["cuda"], f"nvcc at {nvcc} but the CUDA module was not built: {info['cuda_note']}"
    assert importlib.util.find_spec("ursa_engine._native_cuda") is not None


def test_native_cpu_module_does_not_link_torch():
    spec = importlib.util.find_spec("ursa_engine._native_cpu")
    with open(spec.origin, "rb") as f:
        binary = f.read()
    assert b"libtorch" not in binary and b"libc10" not in binary


# ----------------------------------------------------------------------------- GPU (lent device only)
@pytest.mark.gpu
def test_cuda_metric_step_agrees_with_triton_at_a_real_size():
    triton_sampler = pytest.importorskip("ursa_engine.triton_kernels.sampler")
    if nat.unavailable("cuda") is not None:
        pytest.skip(nat.unavailable("cuda"))
    cb = ue.Codebook.fsq((8, 8, 8, 5, 5, 5))
    D, K = 4096, cb.size
    cond, uncond, x = _step_inputs(D, K, torch.bfloat16, 16, "cuda")
    args = (cond, uncond, x, cb.normalized_on("cuda"), torch.tensor([0.04, 3.3, 14.0, 0.0], device="cuda"),
            torch.tensor([10], device="cuda"))
    kw = dict(seeds=torch.tensor([1], device="cuda"), row_len=D, guidance_scale=7.0, levels=cb.levels)
    a = nat.metric_step(*args, **kw)
    b = triton_sampler.metric_step(*args, **kw)
    assert _agree(a, b) >= AGREE


@pytest.mark.gpu
def test_tune_times_both_fused_backends_and_auto_follows():
    if nat.unavailable("cuda") is not None:
        pytest.skip(nat.unavailable("cuda"))
    cb = ue.Codebook.fsq((8, 8, 8, 5, 5, 5))
    D, K = 2048, cb.size
    cond, uncond, x = _step_inputs(D, K, torch.bfloat16, 17, "cuda")
    args = (cond, uncond, x, cb.normalized_on("cuda"), torch.tensor([0.04, 3.3, 14.0, 0.0], device="cuda"),
            torch.tensor([10], device="cuda"))
    kw = dict(seeds=torch.tensor([1], device="cuda"), row_len=D, guidance_scale=7.0, levels=cb.levels)
    calls = {name: (lambda name=name: _dispatch.resolve("metric_step", name, torch.device("cuda"))(*args, **kw))
             for name in ("triton", "native")}
    best = _dispatch.tune("metric_step", torch.device("cuda"), (D, K), calls)
    assert _dispatch.auto_order(torch.device("cuda"), "metric_step", (D, K))[0] == best
