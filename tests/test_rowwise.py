"""Per-row sampler steps (issue 14, :mod:`ursa_engine.rowwise`): every sample at its own step.

* Exact laws (DESIGN §7): rows at different steps in one call (the first, a middle, the last; guided
  and truncated rows; per-row guidance scale and temperature) each follow their own step's law.
* Keys (§2.5): a row's tokens equal those of the same row stepped alone with a python ``k``, on every
  backend; device-side decisions (``guided`` / ``last`` None) equal host-side ones.
"""

import pytest
import torch
from law_stats import assert_follows

import ursa_engine as ue

N_REP = 4000  # tokens of a row: one state replicated (small enough for the Triton interpreter)


def random_codebook(K, m, seed):
    g = torch.Generator().manual_seed(seed)
    return ue.Codebook(torch.randn(K, m, generator=g))


def logits_for(S, K, seed, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(S, K, generator=g) * scale


def make_sched(kind, K=7, N=6):
    if kind == "metric":
        return ue.Scheduler(ue.MetricPath(random_codebook(K, 3, 2), alpha=1.0, c=3.0), N, shift=1.5)
    if kind == "mixture":
        return ue.Scheduler(ue.MixturePath(K), N)
    return ue.Scheduler(ue.MaskPath(K, K - 1), N)


def run(fn):
    try:
        return fn()
    except RuntimeError as err:
        if "cannot run" in str(err):
            pytest.skip(str(err))
        raise


# rows: (k, guidance scale, temperature): the first step, a truncated row, a middle one, the last
ROWS = [(0, 2.0, 1.0), (4, 3.0, 1.0), (2, 1.5, 0.7), (5, 2.0, 1.0)]


@pytest.mark.parametrize("kind", ["metric", "mixture", "mask"])
def test_mixed_steps_follow_exact_laws(backend, device, kind):
    K = 7
    sched = make_sched(kind, K)
    S = len(ROWS)
    cond, uncond = logits_for(S, K, 1), logits_for(S, K, 2)
    x = torch.tensor([0, 2, 5, 6]) if kind != "mask" else torch.full((S,), K - 1)
    cr = cond[:, None].expand(S, N_REP, K).contiguous().to(device)
    ur = uncond[:, None].expand(S, N_REP, K).contiguous().to(device)
    xr = x[:, None].expand(S, N_REP).contiguous().to(device)
    k = torch.tensor([r[0] for r in ROWS], device=device)
    opts = dict(guidance_scale=[r[1] for r in ROWS], temperature=[r[2] for r in ROWS], guidance_trunc=0.5)
    new = run(lambda: sched.step(cr, k, xr, uncond_logits=ur, seed=torch.arange(S, device=device) + 7,
                                 backend=backend, **opts))
    assert float(sched.times[4]) >= 0.5 > float(sched.times[2])  # row 1 truncated, rows 0, 2, 3 guided
    laws = torch.stack([sched.step_probs(cond[s:s + 1], kk, x[s:s + 1], uncond_logits=uncond[s:s + 1],
                                         guidance_scale=g, temperature=t, guidance_trunc=0.5)[0]
                        for s, (kk, g, t) in enumerate(ROWS)])
    assert_follows(new, laws)
    assert (new[-1] != K - 1).all() if kind == "mask" else True  # the last step unmasks everything
    assert (new != xr).any()


@pytest.mark.parametrize("kind", ["metric", "mixture", "mask"])
@pytest.mark.parametrize("argmax_last", [False, True])
def test_rows_equal_alone_every_backend(backend, device, kind, argmax_last):
    K, n = 7, 24
    sched = make_sched(kind, K)
    S = len(ROWS)
    g = torch.Generator().manual_seed(3)
    cond = torch.randn(S, n, K, generator=g).to(device)
    uncond = torch.randn(S, n, K, generator=g).to(device)
    hi = K - 1 if kind == "mask" else K
    x = torch.randint(0, hi, (S, n), generator=g).to(device)
    if kind == "mask":
        x[:, ::2] = K - 1
    k = torch.tensor([r[0] for r in ROWS], device=device)
    seeds = torch.tensor([5, 11, 2**40 + 1, 99], device=device)
    scales, temps = [r[1] for r in ROWS], [r[2] for r in ROWS]
    common = dict(guidance_trunc=0.5, argmax_last=argmax_last, backend=backend, token_offset=3)
    host = run(lambda: sched.step(cond, k, x, uncond_logits=uncond, seed=seeds, guidance_scale=scales,
                                  temperature=temps, guided=[float(sched.times[r[0]]) < 0.5 for r in ROWS],
                                  last=[r[0] == 5 for r in ROWS], **common))
    device_side = sched.step(cond, k, x, uncond_logits=uncond, seed=seeds, guidance_scale=scales, temperature=temps,
                             validate=False, **common)  # guided / last decided on the device (graph-safe)
    assert torch.equal(host, device_side)
    for s, (kk, gs, t) in enumerate(ROWS):
        alone = sched.step(cond[s:s + 1], kk, x[s:s + 1], uncond_logits=uncond[s:s + 1], seed=seeds[s:s + 1],
                           guidance_scale=gs, temperature=t, **common)
        assert torch.equal(alone, host[s:s + 1]), f"row {s} (k={kk})"
    # a batch of rows at one step: per-row equals the scalar path
    k1 = torch.full((S,), 2, device=device)
    rows = sched.step(cond, k1, x, uncond_logits=uncond, seed=seeds, guidance_scale=2.0, **common)
    assert torch.equal(rows, sched.step(cond, 2, x, uncond_logits=uncond, seed=seeds, guidance_scale=2.0, **common))


def test_per_row_with_x1_and_in_place(device):
    K, n = 7, 10
    sched = make_sched("metric", K)
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, K, (3, n), generator=g).to(device)
    x1 = torch.randint(0, K, (3, n), generator=g).to(device)
    k = torch.tensor([1, 5, 3], device=device)
    seeds = torch.tensor([1, 2, 3], device=device)
    out = sched.step(None, k, x, x1=x1, seed=seeds)
    assert torch.equal(out[1], x1[1])  # the last step returns x̂1
    for s in range(3):
        assert torch.equal(out[s:s + 1], sched.step(None, int(k[s]), x[s:s + 1], x1=x1[s:s + 1], seed=seeds[s:s + 1]))
    y = x.clone()
    sched.step(None, k, y, x1=x1, seed=seeds, out=y)
    assert torch.equal(y, out)


def test_per_row_errors_name_the_argument(device):
    K = 7
    sched = make_sched("metric", K)
    x = torch.zeros(3, 4, dtype=torch.long, device=device)
    z = torch.zeros(3, 4, K, device=device)
    seeds = torch.arange(3, device=device)
    with pytest.raises(ValueError, match="k: every step index"):
        sched.step(z, torch.tensor([0, 1, 6], device=device), x, seed=seeds)
    with pytest.raises(ValueError, match=r"k: per-row steps need a \(3,\)"):
        sched.step(z, torch.tensor([0, 1], device=device), x, seed=seeds)
    with pytest.raises(ValueError, match="seed: per-row steps need one seed per sample"):
        sched.step(z, torch.tensor([0, 1, 2], device=device), x, seed=3)
    with pytest.raises(ValueError, match="guidance_scale: expected one value or 3"):
        sched.step(z, torch.tensor([0, 1, 2], device=device), x, seed=seeds, guidance_scale=[1.0, 2.0])
    with pytest.raises(ValueError, match="guided: rows can get guidance only with uncond_logits"):
        sched.step(z, torch.tensor([0, 1, 2], device=device), x, seed=seeds, guided=[True, False, False])
    with pytest.raises(ValueError, match="guided / last: apply to per-row steps only"):
        sched.step(z, 1, x, seed=seeds, last=[False] * 3)
    bad = z.clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="logits"):
        sched.step(bad, torch.tensor([0, 1, 2], device=device), x, seed=seeds)
    # the 0-dim tensor and the (1,) tensor with an int seed keep their old meaning
    one = sched.step(z[:1], torch.tensor(2, device=device), x[:1], seed=3)
    assert torch.equal(one, sched.step(z[:1], torch.tensor([2], device=device), x[:1], seed=3))
