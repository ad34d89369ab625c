"""`probs` and `step_probs` against an independent NumPy transcription of DESIGN §2.

Nothing here imports the reference's math: distances, schedules, guidance, filtering and the
one-step law are rewritten from the DESIGN text, in float64, token by token.
"""

import math

import numpy as np
import pytest
import torch

import ursa_engine as ue

TOL = 1e-6


# ------------------------------------------------------------------ independent DESIGN §2
def np_distances(E, power):
    norm = np.maximum(np.linalg.norm(E, axis=1, keepdims=True), 1e-5)
    e = E / norm
    K = len(e)
    D = np.zeros((K, K))
    for x in range(K):
        for y in range(K):
            if x != y:
                D[x, y] = max(e[x] @ e[x] + e[y] @ e[y] - 2 * e[x] @ e[y], 0.0)
    return D**2 if power == 4 else D


def np_beta(t, alpha, c):
    return math.inf if t >= 1 else c * (t / (1 - t)) ** alpha


def np_beta_dot(t, alpha, c):
    return 0.0 if t <= 0 else c * alpha * t ** (alpha - 1) / (1 - t) ** (alpha + 1)


def np_shift(t, lam):
    return t / (t + lam * (1 - t))


def np_kappa(t, name):
    return {"linear": t, "cosine": 1 - math.cos(math.pi * t / 2), "root": math.sqrt(t),
            "arccos": 1 - 2 * math.acos(t) / math.pi, "quadratic": t * t}[name]


def np_kappa_dot(t, name):
    return {"linear": 1.0, "cosine": math.pi / 2 * math.sin(math.pi * t / 2),
            "root": 0.5 / math.sqrt(t) if t > 0 else math.inf,
            "arccos": 2 / (math.pi * math.sqrt(1 - t * t)), "quadratic": 2 * t}[name]


def np_softmax(z):
    z = z - z[np.isfinite(z)].max()
    e = np.where(np.isfinite(z), np.exp(z), 0.0)
    return e / e.sum()


def np_x1_law(c, u, t_k, s, trunc, T, top_k=0, top_p=1.0, exclude=None):
    z = (u + s * (c - u)) if (u is not None and t_k < trunc) else c.copy()
    z = z / T
    if exclude is not None:
        z[exclude] = -np.inf
    if top_k:
        kth = np.sort(z)[::-1][top_k - 1]
        z = np.where(z >= kth, z, -np.inf)
    if top_p < 1:
        p = np_softmax(z)
        order = np.argsort(-p, kind="stable")
        mass, keep = 0.0, np.zeros(len(z), bool)
        for j in order:
            if mass >= top_p:
                break
            keep[j] = True
            mass += p[j]
        z = np.where(keep, z, -np.inf)
    return np_softmax(z)


def np_metric_step_law(p1, x, D, t_k, t_next, alpha, c):
    beta, bdot, h = np_beta(t_k, alpha, c), np_beta_dot(t_k, alpha, c), t_next - t_k
    K = len(p1)
    law = np.zeros(K)
    for j in range(K):
        g = np.exp(-beta * D[j])  # over y, distance to the candidate x̂1 = j
        rate = bdot * g / g.sum() * np.maximum(D[x, j] - D[j], 0.0)
        rate[x] = 0.0
        lam = rate.sum()
        jump = 1 - math.exp(-h * lam)
        law[x] += p1[j] * (1 - jump)
        if lam > 0:
            law += p1[j] * jump * rate / lam
    return law


# ------------------------------------------------------------------ tests
def _case(seed, K, m, n_tok):
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(K, m, generator=g, dtype=torch.float64)
    E[0] = 0.0  # a zero code: its normalized embedding is 0 (norm clamped at eps)
    x = torch.randint(0, K, (n_tok,), generator=g)
    c = torch.randn(n_tok, K, generator=g, dtype=torch.float64) * 2
    u = torch.randn(n_tok, K, generator=g, dtype=torch.float64) * 2
    return E, x, c, u


@pytest.mark.parametrize("power", [2, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_metric_path_probs_match_design(seed, power):
    E, x1, _, _ = _case(seed, K=40, m=5, n_tok=6)
    t = torch.tensor([0.0, 0.1, 0.37, 0.8, 0.99, 1.0], dtype=torch.float64)
    path = ue.MetricPath(ue.Codebook(E), alpha=0.7, c=4.0, power=power)
    got = path.probs(x1, t).numpy()
    D = np_distances(E.numpy(), power)
    for i in range(6):
        b = np_beta(float(t[i]), 0.7, 4.0)
        want = np.eye(40)[x1[i]] if math.isinf(b) else np_softmax(-b * D[x1[i]])
        np.testing.assert_allclose(got[i], want, atol=TOL, rtol=0)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "root", "arccos", "quadratic"])
def test_mixture_and_mask_path_probs_match_design(schedule):
    K, x1 = 17, torch.tensor([3, 0, 16, 5])
    t = torch.tensor([0.0, 0.25, 0.6, 1.0])
    mix = ue.MixturePath(K, schedule=schedule).probs(x1, t).numpy()
    mask = ue.MaskPath(K, 16, schedule=schedule).probs(x1, t).numpy()
    for i in range(4):
        kap = np_kappa(float(t[i]), schedule)
        np.testing.assert_allclose(mix[i], kap * np.eye(K)[x1[i]] + (1 - kap) / K, atol=TOL, rtol=0)
        np.testing.assert_allclose(mask[i], kap * np.eye(K)[x1[i]] + (1 - kap) * np.eye(K)[16], atol=TOL, rtol=0)


METRIC_CASES = [  # (alpha, c, shift, steps, k, guidance, trunc, temperature, top_k, top_p, power)
    (1.0, 5.0, 1.0, 10, 3, 1.0, 1.0, 1.0, 0, 1.0, 2),
    (0.5, 6.0, 3.0, 8, 2, 7.0, 0.9, 1.0, 0, 1.0, 2),
    (1.0, 5.0, 2.0, 12, 9, 4.0, 0.5, 0.7, 0, 1.0, 2),   # past truncation: conditional only
    (0.8, 3.0, 1.0, 6, 4, 2.5, 1.0, 1.3, 5, 1.0, 4),
    (1.0, 5.0, 1.5, 10, 5, 3.0, 1.0, 1.0, 0, 0.8, 2),
    (0.5, 6.0, 1.0, 10, 0, 3.0, 1.0, 1.0, 0, 1.0, 2),   # t = 0 with alpha < 1: nothing moves
]


@pytest.mark.parametrize("case", METRIC_CASES)
def test_metric_step_probs_match_design(case):
    alpha, c, lam, N, k, s, trunc, T, top_k, top_p, power = case
    K = 31
    E, x, cond, uncond = _case(k + N, K=K, m=4, n_tok=5)
    path = ue.MetricPath(ue.Codebook(E), alpha=alpha, c=c, power=power)
    sched = ue.Scheduler(path, N, shift=lam)
    got = sched.step_probs(cond, k, x, uncond_logits=uncond, guidance_scale=s, guidance_trunc=trunc,
                           temperature=T, top_k=top_k, top_p=top_p).numpy()
    D = np_distances(E.numpy(), power)
    t_k, t_next = np_shift(k / N, lam), np_shift((k + 1) / N, lam)
    for i in range(len(x)):
        p1 = np_x1_law(cond[i].numpy(), uncond[i].numpy(), t_k, s, trunc, T, top_k, top_p)
        want = np_metric_step_law(p1, int(x[i]), D, t_k, t_next, alpha, c)
        np.testing.assert_allclose(got[i], want, atol=TOL, rtol=0)
    if k == 0:
        np.testing.assert_allclose(got, np.eye(K)[x.numpy()], atol=TOL, rtol=0)


@pytest.mark.parametrize("argmax", [False, True])
def test_last_step_probs_are_the_prediction(argmax):
    E, x, cond, uncond = _case(5, K=23, m=3, n_tok=4)
    sched = ue.Scheduler(ue.MetricPath(ue.Codebook(E)), 5)
    got = sched.step_probs(cond, 4, x, uncond_logits=uncond, guidance_scale=2.0, argmax_last=argmax).numpy()
    for i in range(4):
        p1 = np_x1_law(cond[i].numpy(), uncond[i].numpy(), 0.5, 2.0, 1.0, 1.0)
        want = np.eye(23)[p1.argmax()] if argmax else p1
        np.testing.assert_allclose(got[i], want, atol=TOL, rtol=0)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "quadratic"])
@pytest.mark.parametrize("k", [0, 3, 6])
def test_mixture_and_mask_step_probs_match_design(schedule, k):
    N, lam, K, s = 7, 2.0, 13, 3.0
    _, x, cond, uncond = _case(k, K=K, m=2, n_tok=6)
    x[:3] = K - 1  # masked tokens for the mask path
    t_k, t_next = np_shift(k / N, lam), np_shift((k + 1) / N, lam)
    h = t_next - t_k
    last = k == N - 1
    mix = ue.Scheduler(ue.MixturePath(K, schedule), N, shift=lam)
    mask = ue.Scheduler(ue.MaskPath(K, K - 1, schedule), N, shift=lam)
    got_mix = mix.step_probs(cond, k, x, uncond_logits=uncond, guidance_scale=s).numpy()
    got_mask = mask.step_probs(cond, k, x, uncond_logits=uncond, guidance_scale=s).numpy()
    rate = np_kappa_dot(t_k, schedule) / (1 - np_kappa(t_k, schedule))
    for i in range(6):
        xi = int(x[i])
        p1 = np_x1_law(cond[i].numpy(), uncond[i].numpy(), t_k, s, 1.0, 1.0)
        if last:
            want = p1
        else:
            jump = 1 - math.exp(-h * rate)
            want = np.zeros(K)
            for j in range(K):
                if j == xi:
                    want[xi] += p1[j]
                else:
                    want[j] += p1[j] * jump
                    want[xi] += p1[j] * (1 - jump)
        np.testing.assert_allclose(got_mix[i], want, atol=TOL, rtol=0)
        pm = np_x1_law(cond[i].numpy(), uncond[i].numpy(), t_k, s, 1.0, 1.0, exclude=K - 1)
        q = 1.0 if last else min(1.0, h * rate)
        want_m = q * pm + (1 - q) * np.eye(K)[xi] if xi == K - 1 else np.eye(K)[xi]
        np.testing.assert_allclose(got_mask[i], want_m, atol=TOL, rtol=0)


def test_scheduler_grid_is_shifted_and_ends_at_one():
    sched = ue.Scheduler(ue.MixturePath(5), 25, shift=3.0)
    want = [np_shift(k / 25, 3.0) for k in range(26)]
    np.testing.assert_allclose(sched.times.numpy(), want, atol=1e-12)
    assert sched.times[-1] == 1.0 and sched.times[0] == 0.0


def test_fsq_codebook_digits_follow_the_convention():
    cb = ue.Codebook.fsq((8, 8, 8, 5, 5, 5))
    assert cb.size == 64000 and cb.dim == 6
    i = 3 + 8 * (5 + 8 * (7 + 8 * (0 + 5 * (2 + 5 * 4))))  # digits (3, 5, 7, 0, 2, 4)
    want = [(3 - 4) / 4, (5 - 4) / 4, (7 - 4) / 4, (0 - 2) / 2, 0.0, (4 - 2) / 2]
    np.testing.assert_allclose(cb.emb[i].numpy(), want)
