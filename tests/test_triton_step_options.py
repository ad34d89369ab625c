"""Triton sampler ops, issue 11: row chunks by ``index_offset``, a given x̂1 (``x1=``), error bits
(``error=``) and the scratch memory of a step. DESIGN §2.4, §2.5.

On the CPU under ``TRITON_INTERPRET=1`` at small sizes (K = 97 / 120), with tilings forced small
and fixed (so a chunked call runs exactly the arithmetic of the whole call). Checks:

* the tokens ``[s, e)`` of every sample as one call (``row_len = e − s``, ``index_offset = s``)
  give exactly the tokens of the unchunked call, for every op, and the reference's tokens;
* ``x1=``: the reference's result; and exactly the op's own result on the logits whose x̂1 it is;
* ``error=``: the bits of ``ursa_engine.reference.sampler`` for NaN / +inf / all −inf logits
  (cond and uncond), ids of x and x1 outside [0, K); none for clean input, none for logits
  never read;
* memory: the IBQ table step allocates one tile-sum buffer whatever the number of token groups,
  and ‖ê_c‖² once per table (a step allocates nothing of size K or K × m for it).
"""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first @triton.jit decoration
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402
from ursa_engine.triton_kernels import errors  # noqa: E402
from ursa_engine.triton_kernels import sampler as tks  # noqa: E402

from ursa_engine.codebook import Codebook  # noqa: E402
from ursa_engine.reference import rng  # noqa: E402
from ursa_engine.reference import sampler as ref  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = [
    pytest.mark.skipif(tks.unavailable(DEVICE) is not None, reason=str(tks.unavailable(DEVICE))),
    # the interpreter's numpy notes the NaN / inf arithmetic of the bad-input tests
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning"),
]

MASK_ID = 96
BOOKS = {
    "fsq": lambda: Codebook.fsq((4, 3, 5, 2)),  # K = 120
    "table": lambda: Codebook(torch.randn(97, 6, generator=torch.Generator().manual_seed(1))),
}
# fixed small tiles: several chunks and tiles, padded tails, split K range, two token groups
CFG = {
    "fsq": {"CHUNKS": 4, "W": 4, "CH_MAX": 10, "FW": 4, "ROWS": 8},
    "table": {"CHUNKS": 4, "W": 4, "ROWS": 8, "BN": 16, "SPLITS": 2, "BM": 16, "R": 16, "GROUPS": 2},
    "uniform": {"CHUNKS": 4, "W": 4, "ROWS": 8},
}


# ------------------------------------------------------------------ helpers
def params(h=0.2, beta=3.0, beta_dot=6.0, rate=2.0):
    return torch.tensor([h, beta, beta_dot, rate], dtype=torch.float32, device=DEVICE)


def step_t(k=3):
    return torch.tensor([k], dtype=torch.int64, device=DEVICE)


def logits(D, K, seed, dtype=torch.float32):
    return (torch.randn(D, K, generator=torch.Generator().manual_seed(seed)) * 2).to(dtype).to(DEVICE)


def tokens(D, K, seed):
    return torch.randint(0, K, (D,), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def error_buf():
    return torch.zeros(1, dtype=torch.int32, device=DEVICE)


def size(kind):
    return BOOKS[kind.split("-")[1]]().size if kind.startswith("metric") else 97


def step(backend, kind, cond, uncond, x, *, seeds, row_len, p=None, **kw):
    """One step op of ``backend`` ("triton": forced tiles, or "torch"): kind metric-fsq / metric-table /
    mixture / mask."""
    p = params() if p is None else p
    if kind.startswith("metric"):
        book = kind.split("-")[1]
        cb = BOOKS[book]()
        args = (cond, uncond, x, cb.normalized_on(DEVICE), p, step_t())
        kw = dict(seeds=seeds, row_len=row_len, levels=cb.levels, **kw)
        if backend == "torch":
            return ref.metric_step(*args, **kw)
        opts = dict(guidance_scale=1.0, temperature=1.0, top_k=0, top_p=1.0, power=2, last=False, argmax_last=False,
                    out=None)
        return tks._metric_step(*args, **{**opts, **kw}, cfg=CFG[book])
    extra = dict(mask_id=MASK_ID) if kind == "mask" else {}
    if backend == "torch":
        return getattr(ref, f"{kind}_step")(cond, uncond, x, p, step_t(), seeds=seeds, row_len=row_len, **extra,
                                            **kw)
    opts = dict(guidance_scale=1.0, temperature=1.0, top_k=0, top_p=1.0, last=False, argmax_last=False, out=None,
                mask_id=0)
    opts.update(extra)
    return tks._uniform_step(cond, uncond, x, p, step_t(), seeds=seeds, row_len=row_len, mask=kind == "mask",
                             op=f"{kind}_step", cfg=CFG["uniform"], **{**opts, **kw})


def sample(backend, kind, x1, keep, *, seeds, row_len, **kw):
    """One path-sampling op: metric-fsq / metric-table / mixture / mask."""
    if kind.startswith("metric"):
        book = kind.split("-")[1]
        cb = BOOKS[book]()
        args = (x1, keep * 8.0, cb.normalized_on(DEVICE))  # keep ∈ [0, 1) → β ∈ [0, 8)
        kw = dict(power=2, levels=cb.levels, seeds=seeds, row_len=row_len, **kw)
        if backend == "torch":
            return ref.metric_sample(*args, **kw)
        return tks._metric_sample(*args, out=None, cfg=CFG[book], **kw)
    mod = ref if backend == "torch" else tks
    if kind == "mixture":
        return mod.mixture_sample(x1, keep, K=97, seeds=seeds, row_len=row_len, **kw)
    return mod.mask_sample(x1, keep, mask_id=MASK_ID, seeds=seeds, row_len=row_len, **kw)


def agree(a, b, floor=0.99):
    frac = (a == b).double().mean().item()
    assert frac >= floor, f"only {frac:.4%} of tokens agree"


# ------------------------------------------------------------------ index_offset: row chunks
B, L = 2, 30
BOUNDS = (0, 7, 19, 30)
CHUNKS = list(zip(BOUNDS[:-1], BOUNDS[1:], strict=True))  # [s, e) of every sample
SEEDS = torch.tensor([11, 2**40 + 3], dtype=torch.int64, device=DEVICE)  # one RNG row per sample


def chunk(t, s, e):
    """Tokens [s, e) of every sample of a flat (B·L, ...) tensor, flat again (contiguous)."""
    return None if t is None else t.view(B, L, *t.shape[1:])[:, s:e].reshape(-1, *t.shape[1:])


def unchunk(parts):
    return torch.cat([p.view(B, -1) for p in parts], dim=1).reshape(-1)


STEP_CASES = {
    "metric-fsq-guided": ("metric-fsq", dict(guided=True, guidance_scale=2.5)),
    "metric-table-guided": ("metric-table", dict(guided=True, guidance_scale=2.0)),
    "metric-fsq-last": ("metric-fsq", dict(last=True)),
    "mixture": ("mixture", dict(guided=True, guidance_scale=2.0)),
    "mask": ("mask", {}),
}


def _step_inputs(kind, o):
    K, D = size(kind), B * L
    cond = logits(D, K, 1)
    uncond = logits(D, K, 2) if o.pop("guided", False) else None
    x = tokens(D, K, 3)
    if kind == "mask":
        x = torch.where(torch.arange(D, device=DEVICE) % 3 == 0, x, torch.full_like(x, MASK_ID))
    return cond, uncond, x


@pytest.mark.parametrize("case", list(STEP_CASES), ids=str)
def test_step_row_chunks_give_the_unchunked_tokens(case):
    kind, o = STEP_CASES[case]
    o = dict(o)
    cond, uncond, x = _step_inputs(kind, o)
    p = params(h=0.3, rate=3.0)
    whole = step("triton", kind, cond, uncond, x, seeds=SEEDS, row_len=L, p=p, **o)
    parts = [step("triton", kind, chunk(cond, s, e), chunk(uncond, s, e), chunk(x, s, e), seeds=SEEDS,
                  row_len=e - s, index_offset=s, p=p, **o) for s, e in CHUNKS]
    assert torch.equal(unchunk(parts), whole)
    want = step("torch", kind, cond, uncond, x, seeds=SEEDS, row_len=L, p=p, **o)
    agree(whole, want)
    if not o.get("last"):
        assert (whole != x).any(), "no token moved: the comparison would be vacuous"


@pytest.mark.parametrize("kind", ["metric-fsq", "metric-table", "mixture", "mask"])
def test_path_sample_row_chunks_give_the_unchunked_tokens(kind):
    D, K = B * L, size(kind)
    x1 = tokens(D, K, 4)
    keep = torch.rand(D, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    whole = sample("triton", kind, x1, keep, seeds=SEEDS, row_len=L)
    parts = [sample("triton", kind, chunk(x1, s, e), chunk(keep, s, e), seeds=SEEDS, row_len=e - s, index_offset=s)
             for s, e in CHUNKS]
    assert torch.equal(unchunk(parts), whole)
    agree(whole, sample("torch", kind, x1, keep, seeds=SEEDS, row_len=L))
    assert (whole != x1).any()


def test_index_offset_past_two_to_the_32_uses_the_high_counter_word():
    D, off = 40, 2**33 + 5
    x1, keep = tokens(D, 97, 6), torch.full((D,), 0.5, device=DEVICE)
    seeds = torch.tensor([7], device=DEVICE)
    got = tks.mixture_sample(x1, keep, K=97, seeds=seeds, row_len=D, index_offset=off)
    assert torch.equal(got, ref.mixture_sample(x1, keep, K=97, seeds=seeds, row_len=D, index_offset=off))
    assert not torch.equal(got, tks.mixture_sample(x1, keep, K=97, seeds=seeds, row_len=D, index_offset=off - 2**33))
    cond, x = logits(D, 97, 7), tokens(D, 97, 8)
    agree(step("triton", "metric-table", cond, None, x, seeds=seeds, row_len=D, index_offset=off),
          step("torch", "metric-table", cond, None, x, seeds=seeds, row_len=D, index_offset=off))


# ------------------------------------------------------------------ x1=
@pytest.mark.parametrize("last", [False, True])
@pytest.mark.parametrize("kind", ["metric-fsq", "metric-table", "mixture", "mask"])
def test_given_x1_equals_the_reference_and_the_drawn_step(kind, last):
    K = size(kind)
    cond, uncond, x = _step_inputs(kind, dict(guided=True))
    D = x.shape[0]
    seeds = rng.seeds_per_row(3, (D,), DEVICE)[0]
    p = params(h=0.4, rate=3.0)
    x1 = tokens(D, K, 9)
    if kind == "mask":
        x1 = torch.where(x1 == MASK_ID, torch.zeros_like(x1), x1)
    got = step("triton", kind, None, None, x, seeds=seeds, row_len=D, p=p, x1=x1, last=last)
    want = step("torch", kind, None, None, x, seeds=seeds, row_len=D, p=p, x1=x1, last=last)
    if kind.startswith("metric") and not last:
        agree(got, want)  # the destination draw sums in another order: rare ties (§2.5)
    else:
        assert torch.equal(got, want)
    if last:
        assert torch.equal(got, torch.where(x == MASK_ID, x1, x) if kind == "mask" else x1)
        return
    assert (got != x).any()
    # x̂1 as the op itself draws it (lane 0, the last-step result): the step with x1= is the step
    drawn = step("triton", kind, cond, uncond, x, seeds=seeds, row_len=D, p=p, guidance_scale=2.0, last=True)
    assert torch.equal(step("triton", kind, None, None, x, seeds=seeds, row_len=D, p=p, x1=drawn),
                       step("triton", kind, cond, uncond, x, seeds=seeds, row_len=D, p=p, guidance_scale=2.0))


# ------------------------------------------------------------------ error=
def test_error_bits_mirror_the_reference():
    names = [n for n in dir(ref) if n.startswith("ERR_")]
    assert len(names) == 8
    for n in names:
        assert getattr(errors, n).value == getattr(ref, n), n


ERROR_CASES = {  # name: (what to break, expected bits)
    "clean": ([], 0),
    "cond-nan": ([("cond", 3, 50, math.nan)], ref.ERR_COND_NAN),
    "cond-posinf": ([("cond", 3, 5, math.inf)], ref.ERR_COND_POSINF),
    "cond-all-neginf": ([("cond", 3, None, -math.inf)], ref.ERR_COND_ALL_NEGINF),
    "uncond-nan": ([("uncond", 6, 90, math.nan)], ref.ERR_UNCOND_NAN),
    "uncond-posinf": ([("uncond", 6, 0, math.inf)], ref.ERR_UNCOND_POSINF),
    "uncond-all-neginf": ([("uncond", 6, None, -math.inf)], ref.ERR_UNCOND_ALL_NEGINF),
    "x-range": ([("x", 4, None, 10**6), ("x", 9, None, -1)], ref.ERR_X_RANGE),
    "cond-nan-in-mask-column": ([("cond", 2, MASK_ID, math.nan)], ref.ERR_COND_NAN),  # the excluded code too
    "several": ([("cond", 0, 1, math.nan), ("uncond", 9, 2, math.inf), ("x", 3, None, -5)],
                ref.ERR_COND_NAN | ref.ERR_UNCOND_POSINF | ref.ERR_X_RANGE),
}
ERROR_MODES = {
    "plain": dict(guidance_scale=2.0),
    "negative-guidance": dict(guidance_scale=-1.0),  # a +inf of cond becomes z = −inf: still caught
    "last-argmax": dict(guidance_scale=2.0, last=True, argmax_last=True),
}


def _broken(kind, case):
    D, K = 12, size(kind)
    cond, uncond, x = logits(D, K, 21), logits(D, K, 22), tokens(D, K, 23)
    if kind == "mask":  # every token masked: every row's logits are read
        x = torch.full_like(x, MASK_ID)
    t = dict(cond=cond, uncond=uncond, x=x)
    for name, row, col, value in ERROR_CASES[case][0]:
        if name == "x":
            t["x"][row] = value
        elif col is None:
            t[name][row] = value
        else:
            t[name][row, col] = value
    return t["cond"], t["uncond"], t["x"]


# every case in plain mode; the other modes on the cases they can change
ERROR_PARAMS = [(case, mode) for case in ERROR_CASES for mode in ERROR_MODES
                if mode == "plain" or case in ("cond-nan", "cond-posinf", "uncond-all-neginf", "several")]


@pytest.mark.parametrize("case,mode", ERROR_PARAMS, ids=[f"{c}-{m}" for c, m in ERROR_PARAMS])
@pytest.mark.parametrize("kind", ["metric-fsq", "metric-table", "mixture", "mask"])
def test_step_error_bits_equal_the_reference(kind, case, mode):
    cond, uncond, x = _broken(kind, case)
    seeds, D = torch.tensor([5], device=DEVICE), x.shape[0]
    p = params(h=1.0, rate=50.0)  # every token jumps / unmasks: the uniform steps read every row
    got, want = error_buf(), error_buf()
    out = torch.empty_like(x)
    res = step("triton", kind, cond, uncond, x, seeds=seeds, row_len=D, p=p, error=got, out=out, **ERROR_MODES[mode])
    step("torch", kind, cond, uncond, x, seeds=seeds, row_len=D, p=p, error=want, **ERROR_MODES[mode])
    assert res is out
    assert int(want) == ERROR_CASES[case][1]
    assert int(got) == int(want), f"bits {int(got):#x}, reference {int(want):#x}"


@pytest.mark.parametrize("kind", ["metric-fsq", "metric-table", "mixture", "mask"])
def test_given_x1_reads_no_logits_and_checks_its_ids(kind):
    D, K = 12, size(kind)
    x, seeds = tokens(D, K, 31), torch.tensor([5], device=DEVICE)
    x1 = tokens(D, K, 32)
    nan = torch.full((D, K), math.nan, device=DEVICE)
    err = error_buf()
    step("triton", kind, nan, nan, x, seeds=seeds, row_len=D, x1=x1, error=err)
    assert int(err) == 0, "logits were read although x1 was given"
    x1[2], x1[7] = K, -2
    for cond in (nan, None):  # without logits the uniform steps do not know K: no id is checked
        err, want = error_buf(), error_buf()
        step("triton", kind, cond, cond, x, seeds=seeds, row_len=D, x1=x1, error=err)
        step("torch", kind, cond, cond, x, seeds=seeds, row_len=D, x1=x1, error=want)
        known_k = cond is not None or kind.startswith("metric")
        assert int(want) == (ref.ERR_X1_RANGE if known_k else 0)
        assert int(err) == int(want)


@pytest.mark.parametrize("kind", ["mixture", "mask"])
def test_uniform_steps_take_k_for_the_id_checks_without_logits(kind):
    """``K=`` (as the native backend): bounds the ids when no logits give K; must agree with them."""
    D, x, seeds = 12, tokens(12, 97, 33), torch.tensor([5], device=DEVICE)
    x1 = tokens(D, 97, 34)
    x1[4] = 97
    err = error_buf()
    step("triton", kind, None, None, x, seeds=seeds, row_len=D, x1=x1, error=err, K=97)
    assert int(err) == ref.ERR_X1_RANGE
    with pytest.raises(ValueError, match="K"):
        step("triton", kind, logits(D, 97, 0), None, x, seeds=seeds, row_len=D, x1=x1, K=96)


def test_the_dispatched_custom_ops_pass_the_new_keywords():
    """``_dispatch`` hands out the torch.library ops of :mod:`ursa_engine.ops_library`: same tokens, same bits."""
    from ursa_engine.ops_library import sampler_op

    D, cb = 20, BOOKS["table"]()
    cond, x, seeds = logits(D, 97, 61), tokens(D, 97, 62), torch.tensor([4], device=DEVICE)
    cond[3, 3] = math.inf
    kw = dict(seeds=seeds, row_len=D, index_offset=7, levels=cb.levels)
    got_err, want_err = error_buf(), error_buf()
    got = sampler_op("metric_step", "triton")(cond, None, x, cb.normalized_on(DEVICE), params(), step_t(),
                                              error=got_err, **kw)
    want = tks.metric_step(cond, None, x, cb.normalized_on(DEVICE), params(), step_t(), error=want_err, **kw)
    assert torch.equal(got, want) and int(got_err) == int(want_err) == ref.ERR_COND_POSINF
    x = torch.full_like(x, MASK_ID)
    x1 = tokens(D, 96, 63)
    x1[0] = -1
    err = error_buf()
    got = sampler_op("mask_step", "triton")(None, None, x, params(h=1, rate=50), step_t(), mask_id=MASK_ID, seeds=seeds,
                                            row_len=D, index_offset=7, x1=x1, error=err, K=97)
    assert torch.equal(got, x1) and int(err) == ref.ERR_X1_RANGE


def test_mask_step_checks_only_the_rows_it_reads():
    """Unmasked tokens never change, so the kernel never reads (nor checks) their logits."""
    D, K = 12, 97
    cond, x = logits(D, K, 41), torch.full((D,), MASK_ID, device=DEVICE)
    x[5] = 3  # unmasked
    cond[5, 7] = math.nan
    err = error_buf()
    step("triton", "mask", cond, None, x, seeds=torch.tensor([5], device=DEVICE), row_len=D, p=params(h=1, rate=50),
         error=err)
    assert int(err) == 0
    x[5] = MASK_ID
    step("triton", "mask", cond, None, x, seeds=torch.tensor([5], device=DEVICE), row_len=D, p=params(h=1, rate=50),
         error=err)
    assert int(err) == ref.ERR_COND_NAN


def test_one_row_at_a_time_draw_reports_errors():
    cb = BOOKS["fsq"]()
    D, K = 16, cb.size
    cond, uncond, x = logits(D, K, 51), logits(D, K, 52), tokens(D, K, 53)
    cond[9, 3], uncond[2] = math.inf, -math.inf
    err = error_buf()
    seeds = torch.tensor([1], device=DEVICE)
    tks._metric_step(cond, uncond, x, cb.normalized_on(DEVICE), params(), step_t(), seeds=seeds, row_len=D,
                     guidance_scale=2.0, temperature=1.0, top_k=0, top_p=1.0, power=2, levels=cb.levels,
                     last=False, argmax_last=False, out=None, error=err,
                     cfg={**CFG["fsq"], "ROWS": 8, "DRAW_ROWS": 1})
    assert int(err) == ref.ERR_COND_POSINF | ref.ERR_UNCOND_ALL_NEGINF


@pytest.mark.parametrize("change,argument", [
    (dict(index_offset=-1), "index_offset"),
    (dict(index_offset=True), "index_offset"),
    (dict(index_offset=2**63), "index_offset"),
    (dict(error=torch.zeros(1, dtype=torch.int64)), "error"),
    (dict(error=torch.zeros(2, dtype=torch.int32)), "error"),
    (dict(x1=torch.zeros(5, dtype=torch.int64)), "x1"),
    (dict(x1=torch.zeros(8, dtype=torch.int32)), "x1"),
    (dict(cond=None), "cond"),
])
def test_new_arguments_are_validated_naming_them(change, argument):
    cb = BOOKS["fsq"]()
    kw = dict(cond=logits(8, cb.size, 0), x=tokens(8, cb.size, 0), seeds=torch.tensor([0], device=DEVICE),
              row_len=8, levels=cb.levels)
    kw.update({k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in change.items()})
    with pytest.raises(ValueError, match=argument):
        tks.metric_step(kw.pop("cond"), None, kw.pop("x"), cb.normalized_on(DEVICE), params(), step_t(), **kw)


# ------------------------------------------------------------------ scratch memory
class Allocations(TorchDispatchMode):
    """(shape, dtype) of every non-empty tensor an aten op creates (an output whose storage no input holds)."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        held = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() not in held:
                self.made.append((tuple(t.shape), t.dtype))
        return out


def _table_inputs(table, D=48, seed=0):
    K = table.shape[0]
    return dict(cond=logits(D, K, seed), x=tokens(D, K, seed + 1), p=params(h=0.5), st=step_t(),
                seeds=torch.tensor([3], device=DEVICE))


def _table_step(table, groups, inp):
    return tks._metric_step(inp["cond"], None, inp["x"], table, inp["p"], inp["st"], seeds=inp["seeds"],
                            row_len=inp["x"].shape[0], guidance_scale=1.0, temperature=1.0, top_k=0, top_p=1.0,
                            power=2, levels=None, last=False, argmax_last=False, out=None,
                            cfg={**CFG["table"], "GROUPS": groups})


def test_table_step_scratch_does_not_grow_with_token_groups():
    """One (group, NT) tile-sum buffer and one (group, SPLITS) normalizer buffer a step, reused by
    every group (before: a pair per group, ~545 MB a step at D = 66,560, K = 131,072)."""
    table = BOOKS["table"]().normalized_on(DEVICE)
    inp = _table_inputs(table)
    D, K = inp["x"].shape[0], table.shape[0]
    nt, splits = math.ceil(K / CFG["table"]["BN"]), CFG["table"]["SPLITS"]
    want = _table_step(table, 1, inp)  # ‖ê‖² cached: not counted below
    seen = {}
    for groups in (1, 3):
        with Allocations() as mem:
            out = _table_step(table, groups, inp)
        seen[groups] = mem.made
        rows = math.ceil(D / groups)
        tile_sums = [s for s, dt in mem.made if dt == torch.float32 and len(s) == 2]
        assert sorted(tile_sums) == sorted([(rows, nt), (rows, splits)]), mem.made
        assert torch.equal(out, want), "groups change no token"
    assert len(seen[3]) == len(seen[1]), (seen[1], seen[3])
    nbytes = {g: sum(math.prod(s) * dt.itemsize for s, dt in made) for g, made in seen.items()}
    assert nbytes[3] < nbytes[1]


def test_sq_norms_are_computed_once_per_table():
    table = BOOKS["table"]().normalized_on(DEVICE).clone()
    K, m = table.shape
    inp = _table_inputs(table)

    def norm_buffers():
        with Allocations() as mem:
            _table_step(table, 1, inp)
        return [s for s, dt in mem.made if dt == torch.float32 and s in ((K,), (K, m))]

    assert (K,) in norm_buffers()  # first step: the norms
    assert norm_buffers() == []  # every later step: nothing of size K or K × m
    table.mul_(2.0).div_(2.0)  # changed in place (here to the same values): recomputed
    assert (K,) in norm_buffers()
    assert norm_buffers() == []
    assert torch.equal(tks._sq_norms(table), table.float().pow(2).sum(-1))
