"""Every backend's draws follow the exact laws (DESIGN §2.3, §2.4, §7).

Each test replicates a few token states many times, draws once per replica with a fixed seed,
and bounds the total-variation distance between the empirical frequencies and the dense law.
The bound is fixed in advance: 3× the expected TV of an exact sampler,
``0.5·Σ_y sqrt(2/π)·sqrt(p_y(1 − p_y)/n)``, plus 0.005.
"""


import pytest
import torch
from law_stats import assert_follows

import ursa_engine as ue

N_REP = 4000  # replicas per state: small enough for the Triton interpreter


def replicate(states_logits: torch.Tensor, states_x: torch.Tensor, n=N_REP):
    """(S, K) logits and (S,) tokens -> (S, n, K) and (S, n)."""
    S, K = states_logits.shape
    return states_logits[:, None].expand(S, n, K).contiguous(), states_x[:, None].expand(S, n).contiguous()


def random_codebook(K, m, seed):
    g = torch.Generator().manual_seed(seed)
    return ue.Codebook(torch.randn(K, m, generator=g))


def logits_for(S, K, seed, scale=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(S, K, generator=g) * scale).to(dtype)


# ------------------------------------------------------------------ paths
@pytest.mark.parametrize("power", [2, 4])
def test_metric_path_sample_follows_probs(backend, device, power):
    K = 7
    path = ue.MetricPath(random_codebook(K, 3, 0), alpha=1.0, c=5.0, power=power)
    x1 = torch.tensor([0, 3, 6, 2], device=device)
    t = torch.tensor([0.0, 0.2, 0.5, 0.9], device=device)
    x1r, tr = x1[:, None].expand(4, N_REP).contiguous(), t[:, None].expand(4, N_REP)
    xt = path.sample(x1r, tr, seed=11, backend=backend)
    assert_follows(xt, path.probs(x1, t))


def test_metric_path_sample_at_t1_is_x1_and_fsq_works(backend, device):
    path = ue.MetricPath(ue.Codebook.fsq((3, 4, 5)), alpha=0.5, c=6.0)
    x1 = torch.randint(0, 60, (3, 50), generator=torch.Generator().manual_seed(1)).to(device)
    assert torch.equal(path.sample(x1, 1.0, seed=3, backend=backend), x1)
    law = path.probs(x1[:, 0], 0.3)
    xt = path.sample(x1[:, :1].expand(3, N_REP).contiguous(), 0.3, seed=4, backend=backend)
    assert_follows(xt, law)


@pytest.mark.parametrize("kind", ["mixture", "mask"])
def test_mixture_and_mask_path_sample_follow_probs(backend, device, kind):
    K = 9
    path = ue.MixturePath(K, "cosine") if kind == "mixture" else ue.MaskPath(K, 8, "cosine")
    x1 = torch.tensor([1, 4, 7], device=device)
    t = torch.tensor([0.1, 0.5, 0.95], device=device)
    xt = path.sample(x1[:, None].expand(3, N_REP).contiguous(), t[:, None].expand(3, N_REP), seed=5,
                     backend=backend)
    assert_follows(xt, path.probs(x1, t))


# ------------------------------------------------------------------ steps
METRIC_STEP_OPTIONS = [
    dict(),
    dict(temperature=0.5),
    dict(guidance_scale=2.0, with_uncond=True),
    dict(guidance_scale=2.0, guidance_trunc=0.3, with_uncond=True),  # truncated: cond only
    dict(top_k=3),
    dict(top_p=0.7),
]


@pytest.mark.parametrize("opts", METRIC_STEP_OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_metric_step_matches_exact_law(backend, device, opts, dtype):
    K, S = 7, 4
    opts = dict(opts)
    with_uncond = opts.pop("with_uncond", False)
    sched = ue.Scheduler(ue.MetricPath(random_codebook(K, 3, 2), alpha=1.0, c=3.0), 10, shift=1.5)
    cond = logits_for(S, K, 1, scale=1.0, dtype=dtype)
    uncond = logits_for(S, K, 2, scale=1.0, dtype=dtype) if with_uncond else None
    x = torch.tensor([0, 2, 5, 6])
    cr, xr = replicate(cond, x)
    ur = replicate(uncond, x)[0].to(device) if with_uncond else None
    k = 4
    try:
        new = sched.step(cr.to(device), k, xr.to(device), uncond_logits=ur, seed=7, backend=backend, **opts)
    except RuntimeError as err:
        if "cannot run" in str(err):
            pytest.skip(str(err))
        raise
    law = sched.step_probs(cond, k, x, uncond_logits=uncond, **opts)
    assert_follows(new, law)
    assert (new != xr.to(device)).any(), "nothing moved: the law test would be vacuous"


@pytest.mark.parametrize("argmax", [False, True])
def test_last_step_returns_prediction(backend, device, argmax):
    K = 7
    sched = ue.Scheduler(ue.MetricPath(random_codebook(K, 3, 3)), 6)
    cond, uncond = logits_for(3, K, 4), logits_for(3, K, 5)
    x = torch.tensor([1, 1, 1])
    cr, xr = replicate(cond, x)
    ur, _ = replicate(uncond, x)
    new = sched.step(cr.to(device), 5, xr.to(device), uncond_logits=ur.to(device), guidance_scale=2.0,
                     argmax_last=argmax, seed=1, backend=backend)
    law = sched.step_probs(cond, 5, x, uncond_logits=uncond, guidance_scale=2.0, argmax_last=argmax)
    assert_follows(new, law)


@pytest.mark.parametrize("kind", ["mixture", "mask"])
@pytest.mark.parametrize("k", [1, 2])
def test_mixture_and_mask_steps_match_exact_law(backend, device, kind, k):
    """N = 3 makes h·κ̇/(1−κ) = 0.5 at k = 1, where 1 − e^(−hr) and min(1, hr) differ clearly."""
    K = 8
    path = ue.MixturePath(K) if kind == "mixture" else ue.MaskPath(K, 7)
    sched = ue.Scheduler(path, 3)
    cond, uncond = logits_for(3, K, 6), logits_for(3, K, 7)
    x = torch.tensor([7, 7, 2])
    cr, xr = replicate(cond, x)
    ur, _ = replicate(uncond, x)
    new = sched.step(cr.to(device), k, xr.to(device), uncond_logits=ur.to(device), guidance_scale=2.0,
                     seed=9, backend=backend)
    law = sched.step_probs(cond, k, x, uncond_logits=uncond, guidance_scale=2.0)
    assert_follows(new, law)


@pytest.mark.parametrize("kind", ["metric", "mixture", "mask"])
def test_steps_given_x1_match_exact_law(backend, device, kind):
    """Given x̂1 (drawn by the fused lm_head + draw), the step follows the exact law conditioned on it."""
    K = 7
    if kind == "metric":
        sched, k = ue.Scheduler(ue.MetricPath(random_codebook(K, 3, 12), alpha=1.0, c=3.0), 10, shift=1.5), 4
        x = torch.tensor([0, 2, 5, 6])
    else:
        path = ue.MixturePath(K) if kind == "mixture" else ue.MaskPath(K, K - 1)
        sched, k = ue.Scheduler(path, 3), 1
        x = torch.tensor([6, 6, 2, 6])
    x1 = torch.tensor([3, 2, 1, 4])
    xr, x1r = (v[:, None].expand(4, N_REP).contiguous().to(device) for v in (x, x1))
    try:
        new = sched.step(None, k, xr, x1=x1r, seed=3, backend=backend)
    except RuntimeError as err:
        if "cannot run" in str(err):
            pytest.skip(str(err))
        raise
    assert_follows(new, sched.step_probs(None, k, x, x1=x1))
    assert (new != xr).any(), "nothing moved: the law test would be vacuous"


# ------------------------------------------------------------------ edges
def test_first_metric_step_never_moves(backend, device):
    """β̇(0) = 0 (also for α < 1): step 0 is a no-op whatever the logits."""
    K = 11
    sched = ue.Scheduler(ue.MetricPath(random_codebook(K, 4, 4), alpha=0.5, c=6.0), 8)
    x = torch.randint(0, K, (2, 300), generator=torch.Generator().manual_seed(0)).to(device)
    z = logits_for(600, K, 8).view(2, 300, K).to(device)
    assert torch.equal(sched.step(z, 0, x, seed=2, backend=backend), x)


def test_converged_tokens_never_move(backend, device):
    """When x̂1 = x_t the rate is zero: a one-hot prediction of the current token keeps it."""
    K = 9
    sched = ue.Scheduler(ue.MetricPath(random_codebook(K, 3, 5)), 10)
    x = torch.arange(K, device=device).repeat(30)
    z = torch.full((x.numel(), K), -1e4, device=device)
    z[torch.arange(x.numel()), x] = 10.0
    assert torch.equal(sched.step(z, 5, x, seed=4, backend=backend), x)


def test_guidance_past_truncation_ignores_uncond(backend, device):
    K = 7
    sched = ue.Scheduler(ue.MetricPath(random_codebook(K, 3, 6)), 10)
    z, u = logits_for(500, K, 9).to(device), logits_for(500, K, 10).to(device)
    x = torch.randint(0, K, (500,), generator=torch.Generator().manual_seed(3)).to(device)
    k = 8  # t_8 = 0.8 >= trunc
    a = sched.step(z, k, x, uncond_logits=u, guidance_scale=5.0, guidance_trunc=0.5, seed=1, backend=backend)
    b = sched.step(z, k, x, seed=1, backend=backend)
    assert torch.equal(a, b)
    c = sched.step(z, k, x, uncond_logits=u, guidance_scale=5.0, guidance_trunc=0.95, seed=1, backend=backend)
    assert not torch.equal(a, c)


def test_same_seed_same_tokens_and_new_seed_new_tokens(backend, device):
    K = 13
    sched = ue.Scheduler(ue.MetricPath(random_codebook(K, 3, 7)), 10)
    z = logits_for(400, K, 11).view(4, 100, K).to(device)
    x = torch.randint(0, K, (4, 100), generator=torch.Generator().manual_seed(5)).to(device)
    a = sched.step(z, 6, x, seed=123, backend=backend)
    assert torch.equal(a, sched.step(z, 6, x, seed=123, backend=backend))
    assert not torch.equal(a, sched.step(z, 6, x, seed=124, backend=backend))
    assert not torch.equal(a, sched.step(z, 7, x, seed=123, backend=backend))  # step is a key too


def test_metric_step_batch_invariant(backend, device):
    """A sample's tokens depend only on its own inputs and seed, not on its batch neighbours."""
    K = 13
    sched = ue.Scheduler(ue.MetricPath(random_codebook(K, 3, 8)), 10)
    z = logits_for(300, K, 12).view(3, 100, K).to(device)
    x = torch.randint(0, K, (3, 100), generator=torch.Generator().manual_seed(6)).to(device)
    seeds = torch.tensor([40, 41, 42], device=device)
    batch = sched.step(z, 5, x, seed=seeds, backend=backend)
    alone = sched.step(z[1:2].contiguous(), 5, x[1:2].contiguous(), seed=seeds[1:2], backend=backend)
    assert torch.equal(batch[1:2], alone)
    z2 = z.clone()
    z2[0] = -z2[0]  # change a neighbour with a single int seed: other rows unchanged
    a, b = sched.step(z, 5, x, seed=9, backend=backend), sched.step(z2, 5, x, seed=9, backend=backend)
    assert torch.equal(a[1:], b[1:])


AGREEMENT_CASES = {
    "metric_guided": dict(path="metric", k=6, uncond=True, guidance_scale=3.0),
    "metric_bf16_temp": dict(path="metric", k=3, dtype=torch.bfloat16, temperature=0.7),
    "metric_fsq_power4": dict(path="fsq", k=5, power=4),
    "metric_topk": dict(path="metric", k=4, top_k=5),
    "metric_topp": dict(path="metric", k=4, top_p=0.8),
    "metric_last_argmax": dict(path="metric", k=9, uncond=True, guidance_scale=2.0, argmax_last=True),
    "metric_tensor_k_per_sample_seeds": dict(path="metric", k="tensor", uncond=True, guidance_scale=2.0,
                                             per_sample=True),
    "mixture": dict(path="mixture", k=2, uncond=True, guidance_scale=2.0),
    "mask": dict(path="mask", k=2, uncond=True, guidance_scale=2.0),
    "mask_last": dict(path="mask", k=9),
}


@pytest.mark.parametrize("case", list(AGREEMENT_CASES))
def test_backends_agree_with_reference_tokens(backend, device, case):
    """Same seed, same tokens as the dense reference (up to rare float ties, §2.5)."""
    c = dict(AGREEMENT_CASES[case])
    K = 97 if c["path"] != "fsq" else 60
    power = c.pop("power", 2)
    path = {"metric": lambda: ue.MetricPath(random_codebook(K, 6, 9), power=power),
            "fsq": lambda: ue.MetricPath(ue.Codebook.fsq((3, 4, 5)), power=power),
            "mixture": lambda: ue.MixturePath(K), "mask": lambda: ue.MaskPath(K, K - 1)}[c.pop("path")]()
    sched = ue.Scheduler(path, 10)
    dtype = c.pop("dtype", torch.float32)
    z = logits_for(3000, K, 13, dtype=dtype).view(3, 1000, K).to(device)
    u = logits_for(3000, K, 14, dtype=dtype).view(3, 1000, K).to(device) if c.pop("uncond", False) else None
    x = torch.randint(0, K, (3, 1000), generator=torch.Generator().manual_seed(7)).to(device)
    if case.startswith("mask"):
        x[:, ::2] = K - 1
    seed = torch.tensor([5, 6, 7], device=device) if c.pop("per_sample", False) else 77
    k = c.pop("k")
    if k == "tensor":
        k = torch.tensor(4, device=device)
    kw = dict(uncond_logits=u, seed=seed, **c)
    try:
        got = sched.step(z, k, x, backend=backend, **kw)
    except RuntimeError as err:
        if "cannot run" in str(err):
            pytest.skip(str(err))
        raise
    ref = sched.step(z, k, x, backend="torch", **kw)
    assert (got == ref).float().mean() >= 0.99
    assert (ref != x).float().mean() > 0.05, "too few tokens change: agreement would be vacuous"


@pytest.mark.parametrize("kind", ["metric", "mixture", "mask"])
def test_path_samples_agree_with_reference_tokens(backend, device, kind):
    K = 97
    path = {"metric": lambda: ue.MetricPath(random_codebook(K, 6, 10)), "mixture": lambda: ue.MixturePath(K),
            "mask": lambda: ue.MaskPath(K, K - 1)}[kind]()
    x1 = torch.randint(0, K, (4, 500), generator=torch.Generator().manual_seed(8)).to(device)
    t = torch.rand(4, 500, generator=torch.Generator().manual_seed(9)).to(device)
    got = path.sample(x1, t, seed=torch.tensor([1, 2, 3, 4], device=device), backend=backend)
    ref = path.sample(x1, t, seed=torch.tensor([1, 2, 3, 4], device=device), backend="torch")
    assert (got == ref).float().mean() >= 0.99 and (ref != x1).float().mean() > 0.05


@pytest.mark.gpu
def test_tune_makes_auto_pick_the_measured_faster_backend():
    from ursa_engine import _dispatch

    K = 4096
    sched = ue.Scheduler(ue.MetricPath(random_codebook(K, 8, 11)), 10)
    z = logits_for(2048, K, 15).cuda()
    x = torch.randint(0, K, (2048,), device="cuda")
    best = sched.tune(z, x, seed=0)
    assert best in ("triton", "native")
    fn = _dispatch.resolve("metric_step", "auto", x.device, shape=(x.numel(), K))
    assert fn.__module__.startswith({"triton": "ursa_engine.triton_kernels", "native": "ursa_engine._native"}[best])


def test_tune_is_a_no_op_on_the_cpu():
    sched = ue.Scheduler(ue.MixturePath(5), 3)
    assert sched.tune(torch.randn(4, 5), torch.zeros(4, dtype=torch.long)) is None
