"""The statistical check every sampler test uses: empirical frequencies vs an exact law (DESIGN §7)."""

import math

import torch


def tv_bound(law: torch.Tensor, n: int) -> torch.Tensor:
    """3× the expected total-variation distance of an exact sampler with n draws, plus 0.005 (fixed in advance)."""
    sd = (law * (1 - law) / n).sqrt()
    return 3 * 0.5 * math.sqrt(2 / math.pi) * sd.sum(-1) + 0.005


def assert_follows(samples: torch.Tensor, law: torch.Tensor) -> torch.Tensor:
    """samples: ids of S states replicated n times, (S, n) or state-major (S·n,); law (S, K).
    Every state's empirical law must lie within its TV bound; returns the TV per state."""
    S, K = law.shape
    samples = samples.reshape(S, -1).cpu()
    n = samples.shape[1]
    freq = torch.zeros(S, K, dtype=torch.float64).scatter_add_(1, samples, torch.ones(S, n, dtype=torch.float64))
    tv = 0.5 * (freq / n - law.cpu()).abs().sum(-1)
    bound = tv_bound(law.cpu(), n)
    assert (tv <= bound).all(), f"TV {tv.tolist()} above bound {bound.tolist()}"
    return tv
