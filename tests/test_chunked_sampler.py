"""Row chunks, a given x̂1, error bits and memory of the sampler ops (issue 11; DESIGN §2.4, §2.5).

* Every draw is keyed by (seed, step, token index, lane): the tokens ``[s, e)`` of every sample run
  as one call (``row_len = e − s``, ``index_offset = s``) are exactly those of the whole call, on
  every op and path; and the reference's own row chunks (:data:`~ursa_engine.reference.sampler.CHUNK_BYTES`)
  never change a token.
* ``x1=``: the step given the x̂1 it would draw gives the tokens of the unfused step; its law given
  x̂1 mixes back into the step's law.
* ``error=`` bits of the ops, and :meth:`Scheduler.step` turning them into the torch checks' errors.

Peak memory of the reference at production size: tests/test_reference_memory.py.

Other backends run where their op accepts the new keywords and are skipped with the reason otherwise.
"""

import inspect
from types import SimpleNamespace

import pytest
import torch

import ursa_engine as ue
from ursa_engine import _dispatch, _validate
from ursa_engine.memory import LiveBytes
from ursa_engine.reference import rng
from ursa_engine.reference import sampler as ref

R, L = 3, 41  # samples (per-sample seeds) and tokens per sample
BOUNDS = ((0, 13), (13, 14), (14, 41))  # odd chunk sizes, one of a single token
SEEDS = (11, 12, 13)
K_TABLE, K_FSQ = 97, 60
STEP = 3


# ------------------------------------------------------------------ helpers
def backend_op(backend, op, *keywords, **options):
    """The backend's op, or a skip saying which keyword it does not accept yet."""
    try:
        fn = _dispatch.resolve(op, backend, torch.device("cpu") if backend == "torch" else _device(), **options)
    except RuntimeError as err:
        pytest.skip(str(err))
    if backend != "torch":
        mod, _ = _dispatch._module(backend)
        params = inspect.signature(getattr(mod, op)).parameters
        missing = [k for k in keywords if k not in params]
        if missing:
            pytest.skip(f"{backend} {op} does not accept {', '.join(missing)} yet")
    return fn


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cols(t, s, e):
    """Tokens [s, e) of every sample of a flat (R·L, ...) tensor, flat again."""
    return t.view(R, L, *t.shape[1:])[:, s:e].reshape(-1, *t.shape[1:]).contiguous()


def run_chunked(call, tokens: dict, bounds=BOUNDS):
    """``call(tokens, row_len=, index_offset=)`` on every chunk, reassembled into (R·L,)."""
    out = torch.empty(R, L, dtype=torch.int64, device=next(iter(tokens.values())).device)
    for s, e in bounds:
        part = call({k: None if v is None else cols(v, s, e) for k, v in tokens.items()}, row_len=e - s,
                    index_offset=s)
        out[:, s:e] = part.view(R, e - s)
    return out.view(-1)


def codebook(kind):
    if kind == "fsq":
        return ue.Codebook.fsq((3, 4, 5))
    return ue.Codebook(torch.randn(K_TABLE, 6, generator=torch.Generator().manual_seed(0)))


PATHS = ("metric_table", "metric_fsq", "mixture", "mask")


class Case:
    """Inputs of one step op on R·L flat tokens, and how to call it."""

    def __init__(self, path, device, dtype=torch.float32):
        self.path = path
        self.op = {"mixture": "mixture_step", "mask": "mask_step"}.get(path, "metric_step")
        cb = codebook("fsq" if path == "metric_fsq" else "table")
        self.K = cb.size
        self.table, self.levels = cb.normalized_on(device), cb.levels
        self.mask_id = self.K - 1
        g = torch.Generator().manual_seed(len(path))
        D = R * L
        self.cond = (torch.randn(D, self.K, generator=g) * 2).to(dtype).to(device)
        self.uncond = (torch.randn(D, self.K, generator=g) * 2).to(dtype).to(device)
        self.x = torch.randint(0, self.K, (D,), generator=g).to(device)
        if path == "mask":
            self.x[::2] = self.mask_id
        # h, β, β̇, κ̇/(1−κ): a step where many tokens move
        self.params = torch.tensor([0.3, 2.0, 6.0, 1.5], device=device)
        self.step = torch.tensor([STEP], device=device)
        self.seeds = torch.tensor(SEEDS, device=device)

    def tokens(self, guided=False):
        return dict(cond=self.cond, uncond=self.uncond if guided else None, x=self.x)

    def call(self, fn, tok, **kw):
        kw = dict(seeds=self.seeds, **kw)
        if self.op == "metric_step":
            return fn(tok["cond"], tok["uncond"], tok["x"], self.table, self.params, self.step, levels=self.levels,
                      **kw)
        if self.op == "mask_step":
            kw["mask_id"] = self.mask_id
        return fn(tok["cond"], tok["uncond"], tok["x"], self.params, self.step, **kw)

    def x1_hat(self, guided=False, **options):
        """The x̂1 the step draws (lane 0 of TAG_STEP at STEP), by the reference helpers."""
        words = rng.random_words(self.seeds, L, R * L, STEP, rng.TAG_STEP)
        z = ref.guided_logits(self.cond, self.uncond if guided else None, exclude=self.mask_id if self.op == "mask_step"
                              else None, **{"guidance_scale": 1.0, "temperature": 1.0, **options})
        return ref.draw_x1(z, rng.to_uniform(words[0]))


STEP_OPTIONS = {
    "plain": dict(),
    "guided": dict(guided=True, guidance_scale=3.0),
    "guided_topk": dict(guided=True, guidance_scale=2.0, top_k=5),
    "topp_temperature": dict(top_p=0.7, temperature=0.8),
    "last": dict(last=True, guided=True, guidance_scale=2.0),
    "last_argmax": dict(last=True, argmax_last=True),
}


def _split(opts):
    opts = dict(opts)
    return opts.pop("guided", False), opts


# ------------------------------------------------------------------ (a) chunks with index_offset
@pytest.mark.parametrize("name", list(STEP_OPTIONS))
@pytest.mark.parametrize("path", PATHS)
def test_step_chunks_with_index_offset_give_the_whole_call_tokens(backend, device, path, name):
    case = Case(path, device)
    guided, opts = _split(STEP_OPTIONS[name])
    fn = backend_op(backend, case.op, "index_offset", top_k=opts.get("top_k", 0), top_p=opts.get("top_p", 1.0))
    tok = case.tokens(guided)
    whole = case.call(fn, tok, row_len=L, **opts)
    parts = run_chunked(lambda t, **kw: case.call(fn, t, **kw, **opts), tok)
    assert torch.equal(parts, whole)
    if not opts.get("last"):
        assert (whole != case.x).float().mean() > 0.05, "too few tokens move: the test would be vacuous"


@pytest.mark.parametrize("kind", ["metric_table", "metric_fsq", "mixture", "mask"])
def test_path_sample_chunks_with_index_offset_give_the_whole_call_tokens(backend, device, kind):
    op = {"mixture": "mixture_sample", "mask": "mask_sample"}.get(kind, "metric_sample")
    fn = backend_op(backend, op, "index_offset")
    cb = codebook("fsq" if kind == "metric_fsq" else "table")
    g = torch.Generator().manual_seed(3)
    x1 = torch.randint(0, cb.size, (R * L,), generator=g).to(device)
    t = torch.rand(R * L, generator=g).to(device)
    seeds = torch.tensor(SEEDS, device=device)
    if op == "metric_sample":
        beta = ue.MetricPath(cb).beta(t.double()).to(device)

        def call(tok, **kw):
            return fn(tok["x1"], tok["beta"], cb.normalized_on(device), levels=cb.levels, seeds=seeds, **kw)
        tok = dict(x1=x1, beta=beta)
    else:
        extra = dict(K=cb.size) if op == "mixture_sample" else dict(mask_id=cb.size - 1)

        def call(tok, **kw):
            return fn(tok["x1"], tok["keep"], seeds=seeds, **extra, **kw)
        tok = dict(x1=x1, keep=t)
    whole = call(tok, row_len=L)
    assert torch.equal(run_chunked(call, tok), whole)
    assert (whole != x1).float().mean() > 0.05


@pytest.mark.parametrize("path", ["metric", "mixture", "mask"])
def test_scheduler_token_offset_steps_a_chunk_of_every_sample(backend, device, path):
    K = 97
    p = {"metric": lambda: ue.MetricPath(codebook("table")), "mixture": lambda: ue.MixturePath(K),
         "mask": lambda: ue.MaskPath(K, K - 1)}[path]()
    sched = ue.Scheduler(p, 10)
    g = torch.Generator().manual_seed(4)
    z, u = (torch.randn(R, L, K, generator=g).to(device) for _ in range(2))
    x = torch.randint(0, K, (R, L), generator=g).to(device)
    if path == "mask":
        x[:, ::2] = K - 1
    kw = dict(uncond_logits=u, guidance_scale=2.0, seed=torch.tensor(SEEDS, device=device), backend=backend)
    whole = sched.step(z, 4, x, **kw)
    for s, e in BOUNDS:
        try:
            part = sched.step(z[:, s:e], 4, x[:, s:e], token_offset=s, **dict(kw, uncond_logits=u[:, s:e]))
        except RuntimeError as err:
            if "cannot run" in str(err):
                pytest.skip(str(err))
            raise
        assert torch.equal(part, whole[:, s:e])


def test_confidence_step_index_offset_keys_the_draws(device):
    """With every token kept the confidence step is per token: chunks with index_offset agree."""
    K = 97
    g = torch.Generator().manual_seed(5)
    cond, uncond = (torch.randn(R * L, K, generator=g).to(device) for _ in range(2))
    x = torch.randint(0, K, (R * L,), generator=g).to(device)
    x[::3] = K - 1
    seeds = torch.tensor(SEEDS, device=device)

    def call(tok, row_len, index_offset=0):
        n = row_len
        kw = dict(mask_id=K - 1, n_unmasked=torch.full((R,), n, device=device), noise_scale=1.0, seeds=seeds,
                  row_len=row_len, step=torch.tensor(2, device=device), index_offset=index_offset, guidance_scale=2.0)
        return ref.mask_confidence_step(tok["cond"].view(R, n, K), tok["uncond"].view(R, n, K), tok["x"].view(R, n),
                                        **kw).view(-1)
    tok = dict(cond=cond, uncond=uncond, x=x)
    whole = call(tok, L)
    assert torch.equal(run_chunked(call, tok), whole)
    assert (whole != x).float().mean() > 0.2


# ------------------------------------------------------------------ reference row chunks
def _small_chunks(monkeypatch, K, rows=3):
    monkeypatch.setattr(ref, "CHUNK_BYTES", rows * 8 * K)
    assert len(ref.row_chunks(R * L, K)) == -(-R * L // rows)


@pytest.mark.parametrize("name", ["guided", "guided_topk", "topp_temperature", "last"])
@pytest.mark.parametrize("path", PATHS)
def test_reference_row_chunks_never_change_a_token(monkeypatch, device, path, name):
    case = Case(path, device, dtype=torch.bfloat16)
    guided, opts = _split(STEP_OPTIONS[name])
    tok = case.tokens(guided)
    whole = case.call(getattr(ref, case.op), tok, row_len=L, **opts)
    _small_chunks(monkeypatch, case.K)
    assert torch.equal(case.call(getattr(ref, case.op), tok, row_len=L, **opts), whole)


@pytest.mark.parametrize("options", [dict(guidance_scale=2.0), dict(top_k=7, temperature=0.7), dict(top_p=0.8)])
def test_reference_row_chunks_keep_the_confidence_ranking(monkeypatch, device, options):
    K = 97
    g = torch.Generator().manual_seed(6)
    cond, uncond = (torch.randn(R, L, K, generator=g).to(device) for _ in range(2))
    x = torch.randint(0, K, (R, L), generator=g).to(device)
    x[:, ::2] = K - 1
    kw = dict(mask_id=K - 1, n_unmasked=torch.tensor([25, 30, 33], device=device), noise_scale=2.0,
              seeds=torch.tensor(SEEDS, device=device), row_len=L, step=torch.tensor(1, device=device), **options)
    whole = ref.mask_confidence_step(cond, uncond, x, **kw)
    _small_chunks(monkeypatch, K)
    assert torch.equal(ref.mask_confidence_step(cond, uncond, x, **kw), whole)


def test_reference_row_chunks_metric_sample(monkeypatch, device):
    cb = codebook("table")
    g = torch.Generator().manual_seed(7)
    x1 = torch.randint(0, cb.size, (R * L,), generator=g).to(device)
    beta = torch.rand(R * L, generator=g).to(device) * 4
    beta[::5] = torch.inf
    kw = dict(power=4, seeds=torch.tensor(SEEDS, device=device), row_len=L)
    whole = ref.metric_sample(x1, beta, cb.normalized_on(device), **kw)
    _small_chunks(monkeypatch, cb.size)
    assert torch.equal(ref.metric_sample(x1, beta, cb.normalized_on(device), **kw), whole)


# ------------------------------------------------------------------ (b) a given x̂1
@pytest.mark.parametrize("name", ["guided", "topp_temperature", "last"])
@pytest.mark.parametrize("path", PATHS)
def test_step_given_its_own_x1_gives_the_unfused_tokens(backend, device, path, name):
    case = Case(path, device)
    guided, opts = _split(STEP_OPTIONS[name])
    x1 = case.x1_hat(guided, **{k: v for k, v in opts.items() if k in ("guidance_scale", "temperature", "top_p")})
    unfused = case.call(getattr(ref, case.op), case.tokens(guided), row_len=L, **opts)
    fn = backend_op(backend, case.op, "x1")
    given = case.call(fn, dict(cond=None, uncond=None, x=case.x), row_len=L, x1=x1,
                      **{k: v for k, v in opts.items() if k == "last"})
    if backend == "torch":
        assert torch.equal(given, unfused)
    else:  # the same x̂1, then the backend's own float32 destination draw: rare ties only (§2.5)
        assert (given == unfused).float().mean() >= 0.99


def test_law_given_x1_mixes_back_into_the_step_law():
    """Σ_j softmax(z)_j · P(y | x̂1 = j) = P(y): the law given x̂1 is the step's jump law."""
    K = 7
    g = torch.Generator().manual_seed(8)
    scheds = [ue.Scheduler(ue.MetricPath(ue.Codebook(torch.randn(K, 3, generator=g)), c=3.0), 10, shift=1.5),
              ue.Scheduler(ue.MixturePath(K), 3), ue.Scheduler(ue.MaskPath(K, K - 1), 3)]
    z = torch.randn(4, K, generator=g)
    x = torch.tensor([0, 2, 6, 6])
    for sched in scheds:
        for k in (1, sched.num_steps - 1):
            law = sched.step_probs(z, k, x, temperature=0.8)
            zz = z.double() / 0.8
            if isinstance(sched.path, ue.MaskPath):
                zz[:, -1] = -torch.inf
            p1 = torch.softmax(zz, -1)
            mixed = sum(p1[:, j, None] * sched.step_probs(None, k, x, x1=torch.full_like(x, j))
                        for j in range(K) if not (isinstance(sched.path, ue.MaskPath) and j == K - 1))
            torch.testing.assert_close(mixed, law, rtol=0, atol=1e-12)


# ------------------------------------------------------------------ (c) validation and error bits
def _bad(case, what):
    """Inputs with one kind of bad value in every token (a backend that reads any row sees it)."""
    cond, uncond, x, x1 = case.cond.clone(), case.uncond.clone(), case.x.clone(), None
    if what == "x":
        x[:] = case.K + 3
    elif what == "x1":
        x1 = torch.full_like(x, -2)
    else:
        t = cond if what.startswith("cond") else uncond
        if what.endswith("nan"):
            t[:, 1] = float("nan")
        elif what.endswith("posinf"):
            t[:, 2] = float("inf")
        else:
            t[:] = -float("inf")
    return dict(cond=None if x1 is not None else cond, uncond=None if x1 is not None else uncond, x=x), x1


ERRORS = {"x": ref.ERR_X_RANGE, "x1": ref.ERR_X1_RANGE, "cond_nan": ref.ERR_COND_NAN,
          "cond_posinf": ref.ERR_COND_POSINF, "cond_neginf": ref.ERR_COND_ALL_NEGINF, "uncond_nan": ref.ERR_UNCOND_NAN,
          "uncond_posinf": ref.ERR_UNCOND_POSINF, "uncond_neginf": ref.ERR_UNCOND_ALL_NEGINF}


def test_error_bits_are_distinct_powers_of_two():
    assert sorted(ERRORS.values()) == [1 << i for i in range(8)]


@pytest.mark.parametrize("what", list(ERRORS))
@pytest.mark.parametrize("path", PATHS)
def test_step_ops_set_the_error_bit_of_a_bad_value(backend, device, path, what):
    case = Case(path, device)
    tok, x1 = _bad(case, what)
    fn = backend_op(backend, case.op, "error", *(("x1",) if x1 is not None else ()))
    error = torch.zeros(1, dtype=torch.int32, device=device)
    kw = dict(x1=x1) if x1 is not None else dict(guidance_scale=2.0)
    if x1 is not None and case.op != "metric_step":
        kw["K"] = case.K  # no logits: K bounds the id checks
    # bad logits: the last step, where every (masked) token's x̂1 is drawn; bad ids: a middle step
    out = case.call(fn, tok, row_len=L, last=what.endswith(("nan", "inf")), error=error, **kw)
    assert out.shape == case.x.shape
    assert int(error) == ERRORS[what]


@pytest.mark.parametrize("path", PATHS)
def test_reference_flags_a_bad_value_in_a_single_row_and_good_inputs_set_nothing(device, path):
    case = Case(path, device)
    fn = getattr(ref, case.op)
    error = torch.zeros(1, dtype=torch.int32, device=device)
    case.call(fn, case.tokens(True), row_len=L, guidance_scale=2.0, error=error)
    assert int(error) == 0
    cond = case.cond.clone()
    cond[17, 3] = float("nan")
    uncond = case.uncond.clone()
    uncond[40] = -float("inf")
    case.call(fn, dict(cond=cond, uncond=uncond, x=case.x), row_len=L, guidance_scale=2.0, error=error)
    assert int(error) == ref.ERR_COND_NAN | ref.ERR_UNCOND_ALL_NEGINF


BAD_STEP_INPUTS = [
    ("x", r"x: ids must be in \[0, 9\), found values in \[12, 12\]"),
    ("x1", r"x1: ids must be in \[0, 9\), found values in \[-2, -2\]"),
    ("cond_nan", "^logits: contains NaN"),
    ("cond_posinf", r"^logits: contains \+inf"),
    ("cond_neginf", "^logits: a token has every logit at -inf"),
    ("uncond_nan", "^uncond_logits: contains NaN"),
    ("uncond_posinf", r"^uncond_logits: contains \+inf"),
    ("uncond_neginf", "^uncond_logits: a token has every logit at -inf"),
]
SCHEDULERS = {"metric": lambda: ue.Scheduler(ue.MetricPath(ue.Codebook.fsq((3, 3))), 10),
              "mask": lambda: ue.Scheduler(ue.MaskPath(9, 8), 10)}


def _scheduler_inputs(what=None):
    g = torch.Generator().manual_seed(9)
    good = SimpleNamespace(K=9, cond=torch.randn(10, 9, generator=g), uncond=torch.randn(10, 9, generator=g),
                           x=torch.randint(0, 9, (10,), generator=g))
    good.x[::3] = 8
    return _bad(good, what) if what else (good.__dict__, None)


def _step(sched, tok, x1, out=None, **kw):
    out = torch.full((2, 5), -1, dtype=torch.int64) if out is None else out
    z = None if tok["cond"] is None else tok["cond"].view(2, 5, 9)
    u = None if tok["uncond"] is None else tok["uncond"].view(2, 5, 9)
    return sched.step(z, 3, tok["x"].view(2, 5), uncond_logits=u, guidance_scale=2.0, out=out,
                      x1=None if x1 is None else x1.view(2, 5), **kw)


@pytest.mark.parametrize("path", list(SCHEDULERS))
@pytest.mark.parametrize("what, match", BAD_STEP_INPUTS)
def test_scheduler_torch_validation_names_the_argument(what, match, path):
    tok, x1 = _scheduler_inputs(what)
    out = torch.full((2, 5), -1, dtype=torch.int64)
    with pytest.raises(ValueError, match=match):
        _step(SCHEDULERS[path](), tok, x1, out=out, backend="torch")
    assert (out == -1).all(), "nothing may be written on error"


def _fused_backend(monkeypatch) -> list:
    """Make every step run a 'fused' backend: the reference behind a wrapper, given ``error=``."""
    calls = []

    def fake_backend_op(op, backend, device, shape, opts, extra):
        def fused(*args, **kw):
            calls.append(sorted(kw))
            return getattr(ref, op)(*args, **kw)
        return "fused", fused

    def no_torch_check(name, z):
        raise AssertionError("the fused path must not run the torch logits check")

    monkeypatch.setattr(ue.Scheduler, "_backend_op", staticmethod(fake_backend_op))
    monkeypatch.setattr(_validate, "logit_values", no_torch_check)
    return calls


@pytest.mark.parametrize("path", ["metric", "mask"])
@pytest.mark.parametrize("what, match", BAD_STEP_INPUTS)
def test_scheduler_turns_a_fused_ops_error_bits_into_the_same_errors(monkeypatch, what, match, path):
    """A fused backend gets ``error=`` instead of the torch checks: the same messages, nothing written,
    no torch pass over the logits; the mask step given only x1 checks ids by ``K=``."""
    calls = _fused_backend(monkeypatch)
    tok, x1 = _scheduler_inputs(what)
    out = torch.full((2, 5), -1, dtype=torch.int64)
    with pytest.raises(ValueError, match=match):
        _step(SCHEDULERS[path](), tok, x1, out=out)
    assert (out == -1).all(), "nothing may be written on error"
    assert "error" in calls[0] and ("K" in calls[0]) == (x1 is not None and path == "mask")


@pytest.mark.parametrize("given_x1", [False, True])
@pytest.mark.parametrize("path", list(SCHEDULERS))
def test_scheduler_fused_check_gives_the_torch_tokens_on_good_values(monkeypatch, path, given_x1):
    sched = SCHEDULERS[path]()
    tok, _ = _scheduler_inputs()
    x1 = torch.arange(10) % 8 if given_x1 else None
    want = _step(sched, tok, x1, seed=5, backend="torch")
    calls = _fused_backend(monkeypatch)
    assert torch.equal(_step(sched, tok, x1, seed=5), want)
    assert "error" in calls[0]


def test_torch_logit_checks_run_in_row_chunks(monkeypatch):
    """The torch check of the logits allocates O(chunk·K), not a (D, K) bool buffer."""
    D, K = 4096, 1000
    z = torch.randn(D, K)
    z[3000, 5] = float("nan")
    monkeypatch.setattr(ref, "CHUNK_BYTES", 64 * 8 * K)
    with LiveBytes() as mem, pytest.raises(ValueError, match="logits: contains NaN"):
        _validate.logit_values("logits", z)
    assert mem.peak < D * K // 8
