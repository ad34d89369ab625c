"""The statistical checks of the sampler tests: empirical frequencies vs an exact law (DESIGN §7).

:func:`assert_follows`: a total-variation bound fixed in advance (every sampler test; weak at a few
thousand draws: a 10 % temperature error passes it). :func:`chi2_rejects`: Pearson's χ² at a level
fixed in advance, for the law tests that must detect a small error (tests/test_head_draw.py: a 5 %
temperature error fails it).
"""

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


def chi2_statistic(samples: torch.Tensor, law: torch.Tensor, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson's χ² of S states' draws against their exact laws, summed over the states.

    samples: ids of S states replicated n times, (S, n) or state-major (S·n,); law (S, K). In each
    state the codes with an expected count under ``min_expected`` are pooled into one bin (the χ²
    approximation needs ~5 a bin). Returns (statistic, degrees of freedom = Σ_states (bins − 1)).
    """
    S, K = law.shape
    samples = samples.reshape(S, -1).cpu()
    n = samples.shape[1]
    counts = torch.zeros(S, K, dtype=torch.float64).scatter_add_(1, samples, torch.ones(S, n, dtype=torch.float64))
    expected = law.cpu().double() * n
    stat, df = 0.0, 0
    for c, e in zip(counts, expected, strict=True):
        small = e < min_expected
        obs = torch.cat([c[~small], c[small].sum().reshape(1)]) if small.any() else c
        exp = torch.cat([e[~small], e[small].sum().reshape(1)]) if small.any() else e
        keep = exp > 0
        if (obs[~keep] > 0).any():  # a draw of probability zero: no law explains it
            return math.inf, max(int(keep.sum()) - 1, 1)
        stat += float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
        df += int(keep.sum()) - 1
    return stat, df


def chi2_rejects(samples: torch.Tensor, law: torch.Tensor, alpha: float = 1e-6) -> tuple[bool, float, float]:
    """(rejected, statistic, critical value): the χ² test of :func:`chi2_statistic` at level ``alpha``
    (fixed in advance: an exact sampler fails it with probability ``alpha``)."""
    from scipy.stats import chi2

    stat, df = chi2_statistic(samples, law)
    crit = float(chi2.isf(alpha, df))
    return stat > crit, stat, crit


def assert_follows_chi2(samples: torch.Tensor, law: torch.Tensor, alpha: float = 1e-6) -> float:
    """:func:`chi2_rejects` as an assertion; returns the statistic."""
    rejected, stat, crit = chi2_rejects(samples, law, alpha)
    assert not rejected, f"χ² {stat:.1f} above the critical value {crit:.1f} (alpha {alpha:g})"
    return stat
