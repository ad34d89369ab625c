"""Log-probabilities of a sampler's choices: the rollout quantities of RL stacks (DESIGN §9, issue 18).

For one model call at grid step ``k`` and one token with current id ``z0 = x_k``:

* ``x1_logprobs``: ``log softmax(z)[x̂1]``, ``z`` the distribution the sampler drew x̂1 from — guidance
  ``u + s·(c − u)`` (``c`` where ``c == u``), temperature, top-k / top-p (renormalised over the kept
  codes) and, for the masked path, the mask id excluded (:func:`~.sampler.guided_logits`, float64).
  θ enters the law of a step only through this factor: it carries the policy gradient.
* ``step_logprobs``: ``log P(x_{k+1} | x_k, x̂1)``, the one-step law of §2.4 *given* x̂1 (no θ in it):

  - metric path: ``λ = β̇·Σ_x p(x)·max(d0 − d(x), 0)``, ``p ∝ exp(−β·d(·, x̂1))``, ``d0 = d(z0, x̂1)``,
    ``J = 1 − exp(−h·λ)``; stayed: ``log(1 − J) = −h·λ``; jumped to ``y``: ``log J + log(u(y) / λ)``;
  - mixture path: ``x̂1 = z0``: 0; else stayed ``−h·κ̇/(1−κ)``, jumped (to x̂1) ``log(1 − exp(−h·κ̇/(1−κ)))``;
  - masked path (Euler): a masked token unmasks (to x̂1) with ``q = min(1, h·κ̇/(1−κ))``: ``log q`` /
    ``log(1 − q)``; an unmasked token stays: 0;
  - the last step (``x_N = x̂1``, or x̂1 at the masked tokens): 0 (−inf for any other ``x_N``).

  The law marginal over x̂1 costs O(K²) per token at the stay event and is not computed here.
  A transition the law cannot produce gives ``−inf`` (a caller's inconsistent inputs, never a
  sampler's output up to float ties).

Row chunks as in :mod:`.sampler` (one float64 (rows, K) temporary at a time). Tokens are flat (D,).
"""

from __future__ import annotations

import torch

from .sampler import P_BETA, P_BETA_DOT, P_H, P_RATE, _distances, _table64, guided_logits, row_chunks


def x1_logprobs(cond: torch.Tensor, uncond: torch.Tensor | None, x1: torch.Tensor, *, guidance_scale: float = 1.0,
                temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                exclude: int | None = None) -> torch.Tensor:
    """``log softmax(z)[x̂1]`` per token, float64 (D,), ``z`` as the sampler forms it (module docstring).

    cond, uncond : (D, K) logits (uncond None: no guidance, e.g. past the truncation)
    x1 : (D,) int64 drawn ids
    exclude : a code never drawn (the masked path's mask id)
    """
    D, K = cond.shape
    out = torch.empty(D, dtype=torch.float64, device=cond.device)
    for sl in row_chunks(D, K):
        z = guided_logits(cond[sl], None if uncond is None else uncond[sl], guidance_scale=guidance_scale,
                          temperature=temperature, top_k=top_k, top_p=top_p, exclude=exclude)
        out[sl] = torch.log_softmax(z, dim=-1).gather(-1, x1[sl].unsqueeze(-1)).squeeze(-1)
    return out


def _certain(taken: torch.Tensor) -> torch.Tensor:
    """A deterministic transition: 0 where ``taken`` (the only outcome), −inf elsewhere; float64."""
    return torch.where(taken, 0.0, -torch.inf).to(torch.float64)


def _log_jump(rate_h: torch.Tensor) -> torch.Tensor:
    """``log(1 − exp(−rate_h))``, accurate for small and large ``rate_h`` (−inf at 0)."""
    return torch.log(-torch.expm1(-rate_h))


def metric_step_logprobs(x: torch.Tensor, x1: torch.Tensor, x_next: torch.Tensor, table: torch.Tensor,
                         params: torch.Tensor, *, power: int = 2, last: bool = False) -> torch.Tensor:
    """``log P(x_next | x, x̂1)`` of the metric-path Euler step (§2.4), float64 (D,).

    table : ê (K, m); params : the step's (NUM_PARAMS,) values (h, β, β̇)
    """
    D = x.numel()
    if last:
        return _certain(x_next == x1)
    p = params.to(torch.float64)
    h, beta, beta_dot = p[P_H], p[P_BETA], p[P_BETA_DOT]
    e, sq = _table64(table)
    out = torch.empty(D, dtype=torch.float64, device=x.device)
    for sl in row_chunks(D, e.shape[0]):
        d_all = _distances(e, sq, x1[sl], power)  # d(·, x̂1) (rows, K)
        d0 = d_all.gather(-1, x[sl].unsqueeze(-1))
        g = (-beta * d_all).exp_()
        w = (d0 - d_all).clamp_min_(0).mul_(g)  # ∝ u(·): the destination law
        wsum = w.sum(-1)
        lam = beta_dot * wsum / g.sum(-1)
        stayed = x_next[sl] == x[sl]
        w_y = w.gather(-1, x_next[sl].unsqueeze(-1)).squeeze(-1)
        jumped = _log_jump(h * lam) + torch.log(w_y) - torch.log(wsum)
        jumped = torch.where(lam > 0, jumped, torch.full_like(jumped, -torch.inf))  # λ = 0 never moves
        out[sl] = torch.where(stayed, -h * lam, jumped)
    return out


def mixture_step_logprobs(x: torch.Tensor, x1: torch.Tensor, x_next: torch.Tensor, params: torch.Tensor, *,
                          last: bool = False) -> torch.Tensor:
    """``log P(x_next | x, x̂1)`` of the mixture-path step (§2.4), float64 (D,)."""
    if last:
        return _certain(x_next == x1)
    zero = torch.zeros(x.numel(), dtype=torch.float64, device=x.device)
    p = params.to(torch.float64)
    rh = p[P_H] * p[P_RATE]
    impossible = torch.full_like(zero, -torch.inf)
    moved = torch.where(x_next == x1, _log_jump(rh).expand_as(zero), impossible)
    stay = torch.where(x_next == x, (-rh).expand_as(zero), moved)
    return torch.where(x1 == x, torch.where(x_next == x, zero, impossible), stay)


def mask_step_logprobs(x: torch.Tensor, x1: torch.Tensor, x_next: torch.Tensor, params: torch.Tensor, *,
                       mask_id: int, last: bool = False) -> torch.Tensor:
    """``log P(x_next | x, x̂1)`` of the masked-path Euler step (§2.4), float64 (D,)."""
    if last:  # every masked token becomes x̂1, the others stay
        return _certain(torch.where(x == mask_id, x_next == x1, x_next == x))
    zero = torch.zeros(x.numel(), dtype=torch.float64, device=x.device)
    p = params.to(torch.float64)
    q = torch.clamp(p[P_H] * p[P_RATE], max=1.0)
    impossible = torch.full_like(zero, -torch.inf)
    masked = x == mask_id
    unmasked_now = torch.where(x_next == x1, torch.log(q).expand_as(zero), impossible)
    from_mask = torch.where(x_next == mask_id, torch.log1p(-q).expand_as(zero), unmasked_now)
    return torch.where(masked, from_mask, torch.where(x_next == x, zero, impossible))
