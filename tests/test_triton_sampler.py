"""Triton sampler kernels (issue 3) against the dense reference, DESIGN §2.3–§2.5, §7.

On the CPU the kernels run under ``TRITON_INTERPRET=1`` at small sizes; configurations are
forced small (several chunks, tiles, splits, padded tails) so every code path of the GPU
tiling runs here too. Checks:

* Philox words bit-for-bit against :mod:`ursa_engine.reference.rng`;
* same seed, same tokens as the reference for every op and option (≥ 99%; in practice all:
  disagreements need ``u·W`` within float rounding of a CDF boundary, §2.5);
* empirical laws against the exact dense laws (:mod:`ursa_engine.reference.laws`) with the
  TV bound of ``test_sampler_laws`` fixed in advance;
* edges (D = 0, β = 0 / ∞, h = 0, converged tokens, in place, strided rows) and bad input.

Real sizes (K = 64,000 / 131,072) run only on a GPU (``gpu`` marker).
"""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first @triton.jit decoration
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from law_stats import assert_follows
from ursa_engine.triton_kernels import philox  # noqa: E402
from ursa_engine.triton_kernels import sampler as tks  # noqa: E402

from ursa_engine import _dispatch  # noqa: E402
from ursa_engine.codebook import Codebook  # noqa: E402
from ursa_engine.ops_library import sampler_op  # noqa: E402
from ursa_engine.reference import laws, rng  # noqa: E402
from ursa_engine.reference import sampler as ref  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(tks.unavailable(DEVICE) is not None, reason=str(tks.unavailable(DEVICE)))

N_REP = 3000  # replicas per state in the law tests


# ------------------------------------------------------------------ helpers
def params(h=0.1, beta=3.0, beta_dot=6.0, rate=2.0):
    return torch.tensor([h, beta, beta_dot, rate], dtype=torch.float32, device=DEVICE)


def step_t(k=3):
    return torch.tensor([k], dtype=torch.int64, device=DEVICE)


def rng_rows(seed, D, rows=None):
    if rows is None:
        return rng.seeds_per_row(seed, (D,), DEVICE)
    seeds = torch.arange(rows, dtype=torch.int64, device=DEVICE) * 7919 + seed
    return rng.seeds_per_row(seeds, (rows, D // rows), DEVICE)


def logits(D, K, seed, dtype=torch.float32, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(D, K, generator=g) * scale).to(dtype).to(DEVICE)


def tokens(D, K, seed):
    return torch.randint(0, K, (D,), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def table_codebook(K, m, seed):
    return Codebook(torch.randn(K, m, generator=torch.Generator().manual_seed(seed)))


def rep(t, n=N_REP):
    """(S, ...) -> (S·n, ...) state-major replicas."""
    return t.repeat_interleave(n, dim=0).contiguous()


def agree(a, b, floor=0.99):
    frac = (a == b).double().mean().item()
    assert frac >= floor, f"only {frac:.4%} of tokens agree with the reference"
    return frac


# Forced small tilings: several chunks and tiles, padded tails, a K range split in two.
DRAW_SMALL = {"CHUNKS": 4, "W": 4}
FSQ_SMALL = {**DRAW_SMALL, "CH_MAX": 10, "FW": 4}  # (4, 3, 5, 2): 10 chunks of 12 codes
TABLE_SMALL = {**DRAW_SMALL, "BN": 16, "SPLITS": 2}
CODEBOOKS = {
    "fsq": (lambda: Codebook.fsq((4, 3, 5, 2)), FSQ_SMALL),
    "table-m6": (lambda: table_codebook(97, 6, 1), {**TABLE_SMALL, "BM": 32, "R": 64, "GROUPS": 3}),  # many programs
    "table-m100": (lambda: table_codebook(97, 100, 2), TABLE_SMALL),  # two BKM chunks of m
}


def wide(cfg):
    """The same tiling with interpreter-wide programs (law tests draw ~10^4 tokens)."""
    return {k: v for k, v in cfg.items() if k not in ("BM", "R")}


def run_metric_step(cb, cfg, cond, uncond, x, p, st, seeds, row_len, out=None, **kw):
    opts = dict(guidance_scale=1.0, temperature=1.0, top_k=0, top_p=1.0, power=2, last=False,
                argmax_last=False)
    opts.update(kw)
    return tks._metric_step(cond, uncond, x, cb.normalized_on(DEVICE), p, st, seeds=seeds, row_len=row_len,
                            levels=cb.levels, out=out, cfg=cfg, **opts)


# ------------------------------------------------------------------ RNG
@triton.jit
def _words_kernel(seeds_ptr, row_len, index_offset, step_ptr, out_ptr, D, n, TAG: tl.constexpr, B: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64) * B + tl.arange(0, B)
    ok = tok < D
    w0, w1, w2, w3 = philox.token_words(seeds_ptr, row_len, tok, ok, tl.load(step_ptr), TAG, index_offset)
    tl.store(out_ptr + tok * 6 + 0, w0.to(tl.int64), mask=ok)
    tl.store(out_ptr + tok * 6 + 1, w1.to(tl.int64), mask=ok)
    tl.store(out_ptr + tok * 6 + 2, w2.to(tl.int64), mask=ok)
    tl.store(out_ptr + tok * 6 + 3, w3.to(tl.int64), mask=ok)
    tl.store(out_ptr + tok * 6 + 4, philox.to_uniform(w0).to(tl.int32, bitcast=True).to(tl.int64), mask=ok)
    tl.store(out_ptr + tok * 6 + 5, philox.to_below(w2, n), mask=ok)


@pytest.mark.parametrize("seed,row_len,step,tag,offset", [
    (2**40 + 12345, 1000, 7, rng.TAG_STEP, 0),
    (torch.tensor([3, 2**62 + 5, 0, 99]), 250, 2**33 + 3, rng.TAG_PATH, 0),  # step ≥ 2³²: low word
    (0, 1000, 0, rng.TAG_TIMESTEP, 0),
    (torch.tensor([3, 2**62 + 5, 0, 99]), 250, 4, rng.TAG_STEP, 2**32 - 100),  # rows cross into the high word
])
def test_philox_words_match_reference_bit_for_bit(seed, row_len, step, tag, offset):
    D = 1000
    seeds = seed.to(DEVICE) if isinstance(seed, torch.Tensor) else torch.tensor([seed], device=DEVICE)
    out = torch.zeros(D, 6, dtype=torch.int64, device=DEVICE)
    _words_kernel[(triton.cdiv(D, 256),)](seeds, row_len, offset, torch.tensor([step], device=DEVICE), out, D, 97,
                                          TAG=tag, B=256)
    words = rng.random_words(seeds, row_len, D, step, tag, index_offset=offset)
    for lane in range(4):
        assert torch.equal(out[:, lane], words[lane]), f"lane {lane}"
    u = out[:, 4].to(torch.int32).view(torch.float32)
    assert torch.equal(u, rng.to_uniform(words[0]))
    assert torch.equal(out[:, 5], rng.to_below(words[2], 97))


def test_rng_tags_match_reference():
    assert (philox.TAG_STEP.value, philox.TAG_PATH.value, philox.TAG_TIMESTEP.value) == (
        rng.TAG_STEP, rng.TAG_PATH, rng.TAG_TIMESTEP)


# ------------------------------------------------------------------ same seed, same tokens
METRIC_OPTIONS = {
    "plain": {},
    "guided-bf16": dict(guided=True, guidance_scale=3.0, temperature=0.8, dtype=torch.bfloat16),
    "fp16-power4": dict(dtype=torch.float16, power=4),
    "row-seeds": dict(rows=3),
    "last": dict(last=True, guided=True, guidance_scale=2.0),
    "last-argmax": dict(last=True, argmax_last=True),
}


@pytest.mark.parametrize("opt", list(METRIC_OPTIONS), ids=str)
@pytest.mark.parametrize("book", list(CODEBOOKS), ids=str)
def test_metric_step_same_seed_same_tokens(book, opt):
    make, cfg = CODEBOOKS[book]
    cb = make()
    o = dict(METRIC_OPTIONS[opt])
    dtype, guided, rows = o.pop("dtype", torch.float32), o.pop("guided", False), o.pop("rows", None)
    D, K = 600, cb.size
    cond, x = logits(D, K, 1, dtype), tokens(D, K, 2)
    uncond = logits(D, K, 3, dtype) if guided else None
    seeds, row_len = rng_rows(11, D, rows)
    p, st = params(h=0.2), step_t(5)
    got = run_metric_step(cb, cfg, cond, uncond, x, p, st, seeds, row_len, **o)
    want = ref.metric_step(cond, uncond, x, cb.normalized_on(DEVICE), p, st, seeds=seeds, row_len=row_len,
                           levels=cb.levels, **{"power": 2, **o})
    agree(got, want)
    if not o.get("last"):
        assert (want != x).float().mean() > 0.1, "too few moves: the comparison would be vacuous"


@pytest.mark.parametrize("book", ["fsq", "table-m6"])
@pytest.mark.parametrize("power", [2, 4])
def test_metric_sample_same_seed_same_tokens(book, power):
    make, cfg = CODEBOOKS[book]
    cb = make()
    D, K = 1500, cb.size
    x1 = tokens(D, K, 4)
    beta = torch.tensor([0.0, 0.5, 2.0, 8.0, math.inf], device=DEVICE).repeat(D // 5)
    seeds, row_len = rng_rows(5, D)
    got = tks._metric_sample(x1, beta, cb.normalized_on(DEVICE), power=power, levels=cb.levels, seeds=seeds,
                             row_len=row_len, out=None, cfg=wide(cfg))
    want = ref.metric_sample(x1, beta, cb.normalized_on(DEVICE), power=power, levels=cb.levels, seeds=seeds,
                             row_len=row_len)
    agree(got, want)
    assert torch.equal(got[4::5], x1[4::5]), "β = ∞ must return x1"


@pytest.mark.parametrize("kind", ["mixture", "mask"])
@pytest.mark.parametrize("opt", ["plain", "guided-bf16", "last", "last-argmax"])
def test_uniform_steps_same_seed_same_tokens(kind, opt):
    o = dict(METRIC_OPTIONS[opt])
    dtype, guided = o.pop("dtype", torch.float32), o.pop("guided", False)
    o.pop("power", None)
    D, K, mask_id = 1500, 97, 96
    cond, x = logits(D, K, 6, dtype), tokens(D, K, 7)
    if kind == "mask":
        x = torch.where(torch.arange(D, device=DEVICE) % 3 == 0, x, torch.full_like(x, mask_id))
        cond[:, mask_id] = 50.0  # the mask id must never be drawn, however likely
    uncond = logits(D, K, 8, dtype) if guided else None
    seeds, row_len = rng_rows(13, D)
    p, st = params(h=0.15, rate=3.0), step_t(2)
    kw = dict(seeds=seeds, row_len=row_len, **o)
    extra = dict(mask_id=mask_id) if kind == "mask" else {}
    got = tks._uniform_step(cond, uncond, x, p, st, guidance_scale=o.get("guidance_scale", 1.0),
                            temperature=o.get("temperature", 1.0),
                            top_k=0, top_p=1.0, last=o.get("last", False), argmax_last=o.get("argmax_last", False),
                            out=None, mask=kind == "mask", op=f"{kind}_step", cfg=DRAW_SMALL, seeds=seeds,
                            row_len=row_len, mask_id=mask_id if kind == "mask" else 0)
    want = getattr(ref, f"{kind}_step")(cond, uncond, x, p, st, **kw, **extra)
    agree(got, want)
    if kind == "mask":
        assert not (got[x == mask_id] == mask_id).all() and (got[x != mask_id] == x[x != mask_id]).all()
        if o.get("last"):
            assert (got != mask_id).all()


@pytest.mark.parametrize("kind", ["mixture", "mask"])
def test_uniform_path_sample_equals_reference(kind):
    D, K = 5000, 11
    x1 = tokens(D, K, 9)
    keep = torch.rand(D, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    seeds, row_len = rng_rows(21, D, rows=5)
    if kind == "mixture":
        got = tks.mixture_sample(x1, keep, K=K, seeds=seeds, row_len=row_len)
        want = ref.mixture_sample(x1, keep, K=K, seeds=seeds, row_len=row_len)
    else:
        got = tks.mask_sample(x1, keep, mask_id=K - 1, seeds=seeds, row_len=row_len)
        want = ref.mask_sample(x1, keep, mask_id=K - 1, seeds=seeds, row_len=row_len)
    assert torch.equal(got, want)  # threshold comparisons on identical floats: no ties possible


# ------------------------------------------------------------------ exact laws
LAW_CASES = {
    "fsq-guided": ("fsq", dict(guided=True, guidance_scale=2.5, temperature=0.9)),
    "fsq-power4-bf16": ("fsq", dict(power=4, dtype=torch.bfloat16)),
    "table-m6": ("table-m6", {}),
    "table-m100-guided": ("table-m100", dict(guided=True, guidance_scale=2.0)),
}


@pytest.mark.parametrize("case", list(LAW_CASES), ids=str)
def test_metric_step_matches_exact_law(case):
    book, o = LAW_CASES[case]
    make, cfg = CODEBOOKS[book]
    cb = make()
    o = dict(o)
    dtype, guided, power = o.pop("dtype", torch.float32), o.pop("guided", False), o.pop("power", 2)
    K, S = cb.size, 3
    cond = logits(S, K, 31, dtype, scale=1.5)
    uncond = logits(S, K, 32, dtype, scale=1.5) if guided else None
    x = tokens(S, K, 33)
    h, beta, beta_dot = 0.25, 4.0, 6.0
    p = params(h=h, beta=beta, beta_dot=beta_dot)
    seeds, row_len = rng_rows(17, S * N_REP)
    o = {"guidance_scale": 1.0, "temperature": 1.0, **o}
    new = run_metric_step(cb, wide(cfg), rep(cond), None if uncond is None else rep(uncond), rep(x), p,
                          step_t(4), seeds, row_len, power=power, **o)
    law = laws.metric_step_probs(cond, uncond, x, cb.normalized_on(DEVICE), h=h, beta=beta, beta_dot=beta_dot,
                                 power=power, **o)
    assert_follows(new, law)
    assert (new != rep(x)).any()


@pytest.mark.parametrize("book", ["fsq", "table-m100"])
@pytest.mark.parametrize("power", [2, 4])
def test_metric_sample_matches_exact_law(book, power):
    make, cfg = CODEBOOKS[book]
    cb = make()
    K = cb.size
    x1 = tokens(4, K, 41)
    beta = torch.tensor([0.0, 1.0, 4.0, 16.0], device=DEVICE)
    seeds, row_len = rng_rows(3, 4 * N_REP)
    xt = tks._metric_sample(rep(x1), rep(beta), cb.normalized_on(DEVICE), power=power, levels=cb.levels,
                            seeds=seeds, row_len=row_len, out=None, cfg=wide(cfg))
    assert_follows(xt, laws.metric_path_probs(x1, beta, cb.normalized_on(DEVICE), power=power))


@pytest.mark.parametrize("kind", ["mixture", "mask"])
@pytest.mark.parametrize("last", [False, True])
def test_uniform_steps_match_exact_law(kind, last):
    K, S, mask_id = 9, 3, 8
    cond, uncond = logits(S, K, 51), logits(S, K, 52)
    x = torch.tensor([mask_id, mask_id, 2], device=DEVICE)
    h, rate = 0.2, 2.5
    seeds, row_len = rng_rows(23, S * N_REP)
    got = tks._uniform_step(rep(cond), rep(uncond), rep(x), params(h=h, rate=rate), step_t(1), mask_id=mask_id,
                            seeds=seeds, row_len=row_len, guidance_scale=2.0, temperature=1.0, top_k=0, top_p=1.0,
                            last=last, argmax_last=False, out=None, mask=kind == "mask", op=f"{kind}_step",
                            cfg=DRAW_SMALL)
    if kind == "mask":
        law = laws.mask_step_probs(cond, uncond, x, mask_id=mask_id, h=h, rate=rate, last=last, guidance_scale=2.0,
                                   temperature=1.0)
    else:
        law = laws.mixture_step_probs(cond, uncond, x, h=h, rate=rate, last=last, guidance_scale=2.0,
                                      temperature=1.0)
    assert_follows(got, law)


# ------------------------------------------------------------------ edges
@pytest.mark.parametrize("book", ["fsq", "table-m6"])
def test_metric_step_edges_never_move(book):
    """h = 0, β̇ = 0 and converged tokens (x̂1 = x) keep every token."""
    make, cfg = CODEBOOKS[book]
    cb, cfg = make(), wide(cfg)
    D, K = 400, cb.size
    cond, x = logits(D, K, 61), tokens(D, K, 62)
    seeds, row_len = rng_rows(1, D)
    for p in (params(h=0.0), params(beta_dot=0.0)):
        assert torch.equal(run_metric_step(cb, cfg, cond, None, x, p, step_t(), seeds, row_len), x)
    peaked = torch.full((D, K), -1e4, device=DEVICE)
    peaked[torch.arange(D), x] = 10.0
    assert torch.equal(run_metric_step(cb, cfg, peaked, None, x, params(h=1.0), step_t(), seeds, row_len), x)


@pytest.mark.parametrize("book", ["fsq", "table-m6"])
def test_metric_step_in_place_and_strided_rows(book):
    make, cfg = CODEBOOKS[book]
    cb = make()
    D, K = 300, cb.size
    wide = logits(D, K + 5, 71)
    cond = wide[:, 2:K + 2]  # rows strided by K + 5
    x = tokens(D, K, 72)
    seeds, row_len = rng_rows(9, D)
    want = run_metric_step(cb, cfg, cond.contiguous(), None, x, params(), step_t(), seeds, row_len)
    got = run_metric_step(cb, cfg, cond, None, x, params(), step_t(), seeds, row_len)
    assert torch.equal(got, want)
    x2 = x.clone()
    assert run_metric_step(cb, cfg, cond, None, x2, params(), step_t(), seeds, row_len, out=x2) is x2
    assert torch.equal(x2, want)


def test_argmax_takes_the_first_maximum_and_skips_neg_inf():
    D, K = 64, 97
    cond = logits(D, K, 81)
    cond[:, 10] = 9.0
    cond[:, 50] = 9.0  # tie: torch.argmax takes 10
    cond[:, :5] = -math.inf
    x, seeds = tokens(D, K, 82), rng_rows(0, D)
    cb, cfg = CODEBOOKS["table-m6"][0](), CODEBOOKS["table-m6"][1]
    got = run_metric_step(cb, cfg, cond, None, x, params(), step_t(), *seeds, last=True, argmax_last=True)
    assert (got == 10).all()
    drawn = run_metric_step(cb, cfg, cond, None, x, params(), step_t(), *seeds, last=True)
    assert (drawn >= 5).all()


def test_one_row_at_a_time_draw_matches_reference():
    """DRAW_ROWS = 1 (the GPU layout: ROWS tokens share the codebook pass, the logits stream one
    row at a time) gives the same tokens."""
    cb = Codebook.fsq((4, 3, 5, 2))
    D, K = 24, cb.size
    cond, uncond, x = logits(D, K, 1), logits(D, K, 2), tokens(D, K, 3)
    seeds, row_len = rng_rows(4, D)
    cfg = {**FSQ_SMALL, "ROWS": 8, "DRAW_ROWS": 1}
    got = run_metric_step(cb, cfg, cond, uncond, x, params(h=0.3), step_t(), seeds, row_len, guidance_scale=2.0)
    want = ref.metric_step(cond, uncond, x, cb.normalized_on(DEVICE), params(h=0.3), step_t(), seeds=seeds,
                           row_len=row_len, levels=cb.levels, guidance_scale=2.0)
    assert torch.equal(got, want)


def test_empty_and_single_token():
    cb = Codebook.fsq((4, 3, 5, 2))
    seeds, row_len = rng_rows(0, 1)
    empty = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    out = tks.metric_step(torch.zeros(0, cb.size, device=DEVICE), None, empty, cb.normalized_on(DEVICE), params(),
                          step_t(), seeds=seeds, row_len=row_len, levels=cb.levels)
    assert out.shape == (0,)
    one = tks.metric_step(logits(1, cb.size, 1), None, tokens(1, cb.size, 1), cb.normalized_on(DEVICE), params(),
                          step_t(), seeds=seeds, row_len=row_len, levels=cb.levels)
    want = ref.metric_step(logits(1, cb.size, 1), None, tokens(1, cb.size, 1), cb.normalized_on(DEVICE), params(),
                           step_t(), seeds=seeds, row_len=row_len, levels=cb.levels)
    assert torch.equal(one, want)


# ------------------------------------------------------------------ bad input and dispatch
def _good(D=8, K=60):
    cb = Codebook.fsq((3, 4, 5))
    seeds, row_len = rng_rows(0, D)
    return dict(cond=logits(D, K, 0), uncond=None, x=tokens(D, K, 0), table=cb.normalized_on(DEVICE),
                params=params(), step=step_t(), seeds=seeds, row_len=row_len, levels=cb.levels)


@pytest.mark.parametrize("change,argument", [
    (dict(cond=torch.zeros(8, 60, dtype=torch.int32)), "cond"),
    (dict(uncond=torch.zeros(8, 59)), "uncond"),
    (dict(x=torch.zeros(8, dtype=torch.int32)), "x"),
    (dict(params=torch.zeros(4, dtype=torch.float64)), "params"),
    (dict(step=torch.zeros(1, dtype=torch.int32)), "step"),
    (dict(levels=(3, 4, 4)), "levels"),
    (dict(table=torch.zeros(59, 3)), "table"),
    (dict(power=3), "power"),
    (dict(temperature=0.0), "temperature"),
    (dict(out=torch.zeros(7, dtype=torch.int64)), "out"),
    (dict(row_len=0), "row_len"),
])
def test_metric_step_rejects_bad_input_naming_the_argument(change, argument):
    kw = _good()
    kw.update({k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in change.items()})
    with pytest.raises(ValueError, match=argument):  # raised before any launch: nothing written
        tks.metric_step(kw.pop("cond"), kw.pop("uncond"), kw.pop("x"), kw.pop("table"), kw.pop("params"),
                        kw.pop("step"), **kw)


def test_filters_are_reported_unsupported_and_auto_falls_back():
    assert tks.unsupported("metric_step", top_k=3) and tks.unsupported("mask_step", top_p=0.9)
    assert tks.unsupported("metric_step", top_k=0, top_p=1.0) is None
    assert _dispatch.why_not("triton", "metric_step", DEVICE, {"top_k": 3}) is not None
    triton_op = sampler_op("metric_step", "triton")  # the torch.library op over tks.metric_step
    assert _dispatch.resolve("metric_step", "triton", DEVICE) is triton_op
    if DEVICE.type == "cpu":  # the interpreter is never chosen by "auto"
        assert _dispatch.resolve("metric_step", "auto", DEVICE) is not triton_op
    else:
        assert _dispatch.resolve("metric_step", "auto", DEVICE) is triton_op


def test_availability_reasons():
    assert tks.unavailable(torch.device("meta")) is not None
    if not torch.cuda.is_available():
        assert "CUDA" in tks.unavailable(torch.device("cuda"))


# ------------------------------------------------------------------ real sizes (GPU)
@pytest.mark.gpu
@pytest.mark.parametrize("case", ["fsq", "ibq"])
def test_real_size_step_agrees_with_reference_and_stays_o_d(case):
    """K = 64,000 (FSQ, bf16 logits) / 131,072 (IBQ, m = 256) on a slice of tokens the dense
    reference can hold; extra memory of the full-size call O(D), never O(D·K)."""
    if case == "fsq":
        cb, D, D_ref = Codebook.fsq((8, 8, 8, 5, 5, 5)), 33_280, 2048
    else:
        cb, D, D_ref = table_codebook(131_072, 256, 5), 4_096, 512
    K = cb.size
    cond, uncond = logits(D, K, 91, torch.bfloat16), logits(D, K, 92, torch.bfloat16)
    x = tokens(D, K, 93)
    p, st = params(h=0.02, beta=5.0, beta_dot=20.0), step_t(25)
    seeds, row_len = rng_rows(7, D)
    kw = dict(seeds=seeds, row_len=row_len, guidance_scale=7.0, levels=cb.levels)
    table = cb.normalized_on(DEVICE)
    tks.metric_step(cond, uncond, x, table, p, st, **kw)  # compile
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    got = tks.metric_step(cond, uncond, x, table, p, st, **kw)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= 256 * D + 64 * 2**20, f"extra memory {extra / 2**20:.1f} MiB"
    # the reference on the first D_ref tokens: same RNG rows since the seed is one row of D tokens
    want = ref.metric_step(cond[:D_ref], uncond[:D_ref], x[:D_ref], table, p, st, seeds=seeds, row_len=row_len,
                           guidance_scale=7.0, levels=cb.levels)
    frac = agree(got[:D_ref], want)
    moved_got, moved_ref = (got[:D_ref] != x[:D_ref]).double().mean(), (want != x[:D_ref]).double().mean()
    assert abs(moved_got - moved_ref) < 0.03, (frac, moved_got, moved_ref)


@pytest.mark.gpu
def test_real_size_training_sampler_matches_reference_marginals():
    cb = Codebook.fsq((8, 8, 8, 5, 5, 5))
    D, D_ref = 33_280, 1024
    x1 = tokens(D, cb.size, 94)
    beta = torch.rand(D, generator=torch.Generator().manual_seed(3)).to(DEVICE) * 30
    seeds, row_len = rng_rows(2, D)
    table = cb.normalized_on(DEVICE)
    got = tks.metric_sample(x1, beta, table, levels=cb.levels, seeds=seeds, row_len=row_len)
    want = ref.metric_sample(x1[:D_ref], beta[:D_ref], table, levels=cb.levels, seeds=seeds, row_len=row_len)
    agree(got[:D_ref], want)
    d_got = cb.distance(got, x1).mean()
    d_ref = cb.distance(ref.metric_sample(x1[:D_ref], beta[:D_ref], table, levels=cb.levels, seeds=seeds,
                                          row_len=row_len), x1[:D_ref]).mean()
    assert abs(d_got - d_ref) < 0.05
