"""Exact laws, computed densely (DESIGN §2.3, §2.4): what every sampler is tested against.

All return float64 probabilities with the code axis last. Costs are O(D·K) for the paths and
O(D·K²) for a metric step (every candidate x̂1 needs its own rate vector): small K only.
"""

from __future__ import annotations

import torch

from .sampler import code_distances, guided_logits, metric_rates


def metric_path_probs(x1: torch.Tensor, beta: torch.Tensor, table: torch.Tensor, *, power: int = 2):
    """p_t(x | x1) = softmax_x(−β·d(x, x1)); β = ∞ gives δ(x1). x1 (D,), beta (D,) -> (D, K)."""
    b = beta.to(torch.float64).unsqueeze(-1)
    d = code_distances(table, x1, power=power)
    finite = torch.isfinite(b)
    probs = torch.softmax(torch.where(finite, -b * d, torch.zeros_like(d)), dim=-1)
    onehot = torch.nn.functional.one_hot(x1, d.shape[-1]).to(torch.float64)
    return torch.where(finite, probs, onehot)


def mixture_path_probs(x1: torch.Tensor, keep: torch.Tensor, K: int):
    """κ·δ(x1) + (1 − κ)/K. x1 (D,), keep = κ (D,) -> (D, K)."""
    k = keep.to(torch.float64).unsqueeze(-1)
    onehot = torch.nn.functional.one_hot(x1, K).to(torch.float64)
    return k * onehot + (1 - k) / K


def mask_path_probs(x1: torch.Tensor, keep: torch.Tensor, K: int, mask_id: int):
    """κ·δ(x1) + (1 − κ)·δ(mask)."""
    k = keep.to(torch.float64).unsqueeze(-1)
    onehot = torch.nn.functional.one_hot(x1, K).to(torch.float64)
    mask = torch.nn.functional.one_hot(torch.full_like(x1, mask_id), K).to(torch.float64)
    return k * onehot + (1 - k) * mask


def _x1_law(cond, uncond, options: dict, *, last: bool, argmax_last: bool, exclude=None, x1=None, K=None):
    """Law of x̂1 (D, K): softmax of the guided logits, their argmax, or δ(x1) for a given x̂1."""
    if x1 is not None:
        return torch.nn.functional.one_hot(x1, K if K is not None else cond.shape[-1]).to(torch.float64)
    z = guided_logits(cond, uncond, exclude=exclude, **options)
    if last and argmax_last:
        return torch.nn.functional.one_hot(z.argmax(-1), z.shape[-1]).to(torch.float64)
    return torch.softmax(z, dim=-1)


def metric_step_probs(cond, uncond, x, table, *, h: float, beta: float, beta_dot: float,
                      power: int = 2, last: bool = False, argmax_last: bool = False, x1=None, **options):
    """Law of one metric step: ``P(y) = Σ_j p_j[(1 − J_j)δ(y = z0) + J_j u_j(y)/λ_j]``.

    cond/uncond (D, K) logits, x (D,) current tokens -> (D, K). With ``x1`` (D,) the law given
    x̂1 = x1 (p = δ(x1); the logits are not read and may be None).
    """
    p1 = _x1_law(cond, uncond, options, last=last, argmax_last=argmax_last, x1=x1, K=table.shape[0])
    if last:
        return p1
    K = p1.shape[-1]
    codes = torch.arange(K, device=x.device)
    dist = code_distances(table, codes, power=power)  # (K, K): d(j, y)
    out = torch.empty_like(p1)
    for i in range(x.shape[0]):  # per token: candidate x̂1 = j along the first axis
        z0 = x[i]
        d0 = dist[z0]  # d(z0, j), indexed by j
        w, lam = metric_rates(dist, d0, torch.tensor(beta, dtype=torch.float64),
                              torch.tensor(beta_dot, dtype=torch.float64))
        jump = -torch.expm1(-h * lam)  # (K,) J_j
        total = w.sum(-1, keepdim=True)
        dest = torch.where(total > 0, w / torch.where(total > 0, total, 1.0), 0.0)
        law = (p1[i] * jump) @ dest
        law[z0] += (p1[i] * (1 - jump)).sum()
        out[i] = law
    return out


def mixture_step_probs(cond, uncond, x, *, h: float, rate: float, last: bool = False,
                       argmax_last: bool = False, x1=None, K: int | None = None, **options):
    """Law of one mixture step: jump to x̂1 ≠ z0 with probability 1 − exp(−h·rate).

    With ``x1`` (D,): the law given x̂1 = x1 (``K`` needed when the logits are None)."""
    p1 = _x1_law(cond, uncond, options, last=last, argmax_last=argmax_last, x1=x1, K=K)
    if last:
        return p1
    jump = -torch.expm1(torch.tensor(-h * rate, dtype=torch.float64))
    law = p1 * jump
    stay = torch.nn.functional.one_hot(x, p1.shape[-1]).to(torch.float64)
    return law + stay * (1 - jump)


def mask_step_probs(cond, uncond, x, *, mask_id: int, h: float, rate: float, last: bool = False,
                    argmax_last: bool = False, x1=None, K: int | None = None, **options):
    """Law of one masked step: masked tokens unmask to x̂1 w.p. min(1, h·rate); others stay.

    With ``x1`` (D,): the law given x̂1 = x1 (``K`` needed when the logits are None)."""
    p1 = _x1_law(cond, uncond, options, last=last, argmax_last=argmax_last, exclude=mask_id, x1=x1, K=K)
    q = 1.0 if last else min(1.0, h * rate)
    stay = torch.nn.functional.one_hot(x, p1.shape[-1]).to(torch.float64)
    masked = (x == mask_id).unsqueeze(-1)
    return torch.where(masked, q * p1 + (1 - q) * stay, stay)
