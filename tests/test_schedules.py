"""Schedules, training times and the MaskGIT confidence sampler (DESIGN §2.2–§2.4)."""

import math

import pytest
import torch

import ursa_engine as ue
from ursa_engine import schedules
from ursa_engine.reference import rng


def test_beta_and_its_derivative():
    assert schedules.beta(0.5, 1.0, 5.0) == pytest.approx(5.0)
    assert schedules.beta(1.0, 1.0, 5.0) == math.inf
    assert schedules.beta_dot(0.0, 0.5, 6.0) == 0.0  # β̇(0) = 0 even where α < 1 diverges
    t = torch.tensor([0.2, 0.5, 0.7], dtype=torch.float64, requires_grad=True)
    b = schedules.beta(t, 0.5, 6.0)
    (grad,) = torch.autograd.grad(b.sum(), t)
    torch.testing.assert_close(schedules.beta_dot(t.detach(), 0.5, 6.0), grad)


@pytest.mark.parametrize("name", ["linear", "cosine", "root", "arccos", "quadratic", "cubic"])
def test_kappa_schedules_run_from_0_to_1_with_their_derivatives(name):
    t = torch.tensor([0.1, 0.4, 0.9], dtype=torch.float64, requires_grad=True)
    k = schedules.kappa(t, name, a=0.5, b=1.5)
    (grad,) = torch.autograd.grad(k.sum(), t)
    torch.testing.assert_close(schedules.kappa_dot(t.detach(), name, a=0.5, b=1.5), grad)
    assert schedules.kappa(0.0, name, a=0.5, b=1.5) == pytest.approx(0.0, abs=1e-12)
    assert schedules.kappa(1.0, name, a=0.5, b=1.5) == pytest.approx(1.0)


def test_shift_time_adds_noise_for_shift_above_one():
    assert ue.shift_time(0.5, 3.0) == pytest.approx(0.25)
    assert ue.shift_time(0.0, 3.0) == 0.0 and ue.shift_time(1.0, 3.0) == 1.0


def test_sample_timesteps_follows_the_shifted_law():
    lam, n = 3.0, 20000
    t = ue.sample_timesteps((n,), shift=lam, seed=1).to(torch.float64)
    assert (t >= 0).all() and (t < 1).all()
    # t = 1 − λσ/(1 + (λ−1)σ) with σ = 1 − 0.999u is increasing in u: invert and test uniformity
    sigma = (1 - t) / (lam - (lam - 1) * (1 - t))
    u = (1 - sigma) / 0.999
    hist = torch.histc(u.float(), bins=10, min=0, max=1) / n
    assert (hist - 0.1).abs().max() < 0.01
    again = ue.sample_timesteps((n,), shift=lam, seed=1)
    assert torch.equal(again.to(torch.float64), t)


def test_per_frame_times_broadcast_over_their_tokens():
    t = ue.sample_timesteps((2, 3), seed=4)
    tok = ue.frame_times_to_tokens(t, (3, 4, 5))
    assert tok.shape == (2, 3, 4, 5)
    assert torch.equal(tok[:, :, 2, 3], t) and len(set(t.flatten().tolist())) == 6


def test_rng_uniforms_are_exact_and_in_the_open_interval():
    n = 200_000
    words = rng.philox4x32((torch.arange(n),) + (torch.zeros(n, dtype=torch.int64),) * 3,
                           (torch.tensor(7), torch.tensor(0)))
    u = rng.to_uniform(words[0])
    assert u.dtype == torch.float32 and (u > 0).all() and (u < 1).all()
    assert torch.equal(((u * 2**24).to(torch.int64) - 1) // 2, words[0] >> 9)  # exact representation
    assert abs(u.double().mean().item() - 0.5) < 5 * (1 / 12) ** 0.5 / n**0.5  # 5 standard errors
    n = rng.to_below(words[1], 10)
    assert n.min() == 0 and n.max() == 9


def test_rng_philox_known_answers():
    """Random123 known-answer vectors for Philox-4x32-10."""
    z = torch.tensor(0)
    assert [int(w) for w in rng.philox4x32((z, z, z, z), (z, z))] == \
        [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    f = torch.tensor(0xFFFFFFFF)
    assert [int(w) for w in rng.philox4x32((f, f, f, f), (f, f))] == \
        [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    ctr = [torch.tensor(v) for v in (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)]
    key = (torch.tensor(0xA4093822), torch.tensor(0x299F31D0))
    assert [int(w) for w in rng.philox4x32(ctr, key)] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_confidence_sampler_unmasks_on_schedule_and_keeps_unmasked_tokens():
    K, mask, N, L = 12, 11, 5, 40
    sched = ue.Scheduler(ue.MaskPath(K, mask, "cosine"), N, mask_sampler="confidence")
    x = torch.full((3, L), mask)
    g = torch.Generator().manual_seed(0)
    for k in range(N):
        before = x.clone()
        x = sched.step(torch.randn(3, L, K, generator=g), k, x, seed=5)
        want = math.ceil(float(ue.MaskPath(K, mask, "cosine").kappa(float(sched.times[k + 1]))) * L - 1e-9)
        n_unmasked = (x != mask).sum(-1)
        assert (n_unmasked == torch.clamp(torch.maximum((before != mask).sum(-1) + 1,
                                                        torch.tensor(want)), max=L)).all()
        kept = before != mask
        assert torch.equal(x[kept], before[kept])
    assert (x != mask).all()


def test_confidence_sampler_prefers_confident_tokens():
    """With no Gumbel noise, the tokens whose drawn code is most probable unmask first."""
    K, mask, L = 6, 5, 10
    sched = ue.Scheduler(ue.MaskPath(K, mask), 10, mask_sampler="confidence", confidence_temperature=0.0)
    z = torch.zeros(1, L, K)
    z[0, :3, 0] = 20.0  # three near-certain tokens
    out = sched.step(z, 1, torch.full((1, L), mask), seed=0)  # κ(t_2) = 0.2 → 2 tokens
    assert (out[0, :3] != mask).sum() == 2 and (out[0, 3:] == mask).all()


def test_per_sample_times_align_with_the_leading_axis_even_when_the_last_axis_matches():
    """(B,) times are per sample and (B, T) per frame, as in URSA's add_noise (DESIGN §8)."""
    path = ue.MixturePath(50)
    x1 = torch.arange(16).view(4, 4)
    probs = path.probs(x1, torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert torch.allclose(probs[2:].amax(-1), torch.ones(2, 4, dtype=torch.float64))
    assert torch.allclose(probs[:2], torch.full((2, 4, 50), 1 / 50, dtype=torch.float64))
    t_frames = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    frames = path.probs(torch.zeros(2, 2, 2, 2, dtype=torch.long), t_frames)[..., 0]
    assert torch.equal(frames[:, :, 0, 0], t_frames.double() + (1 - t_frames.double()) / 50)


def test_guidance_keeps_codes_banned_in_both_passes_banned(backend, device):
    K = 7
    sched = ue.Scheduler(ue.MetricPath(ue.Codebook(torch.randn(K, 3, generator=torch.Generator().manual_seed(0)))), 4)
    z = torch.randn(200, K, generator=torch.Generator().manual_seed(1))
    u = torch.randn(200, K, generator=torch.Generator().manual_seed(2))
    z[:, 3] = u[:, 3] = -torch.inf
    law = sched.step_probs(z, 3, torch.zeros(200, dtype=torch.long), uncond_logits=u, guidance_scale=3.0)
    assert torch.isfinite(law).all() and (law[:, 3] == 0).all()
    out = sched.step(z.to(device), 3, torch.zeros(200, dtype=torch.long, device=device), uncond_logits=u.to(device),
                     guidance_scale=3.0, seed=0, backend=backend)
    assert (out != 3).all()
