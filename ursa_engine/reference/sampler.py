"""Dense torch sampler ops: the oracle every backend is tested against (DESIGN §2.3, §2.4).

These are the *kernel-level* ops. Every backend (``triton_kernels.sampler``,
``ursa_engine._native``) implements the same functions with the same arguments; the public
API (:class:`ursa_engine.Scheduler`, the paths) validates and flattens inputs, then calls one.

Shared conventions
------------------
* Tokens are flat: ``x``, ``x1`` are int64 of shape (D,); logits are (D, K) in bf16 / fp16 /
  fp32, contiguous in K.
* ``params`` is a float32 device tensor of :data:`NUM_PARAMS` step values, read inside the
  op so that one captured CUDA graph serves every step (DESIGN §4); ``step`` is an int64
  tensor (1,) with the RNG step counter. Indices: :data:`P_H` = ``h = t_{k+1} − t_k``,
  :data:`P_BETA` = β(t_k), :data:`P_BETA_DOT` = β̇(t_k), :data:`P_RATE` = κ̇/(1−κ) at t_k.
* ``seeds`` (R,) int64 and ``row_len``: the RNG rows of :mod:`ursa_engine.reference.rng`
  (token ``i`` uses ``seeds[i // row_len]`` and index ``i % row_len``).
* Guidance (§2.4): ``z = u + s·(c − u)`` when ``uncond`` is given (the caller applies the
  truncation by passing ``uncond=None``), and ``z = c`` where ``c == u`` (so a code at −inf in
  both stays −inf instead of NaN); then ``z / temperature``, then top-k / top-p.
* ``last=True`` is the final step: the result is x̂1 (or ``argmax z`` with ``argmax_last``).
* The reference computes in float64; kernels may use float32 (the "rare ties" of §2.5).
"""

from __future__ import annotations

import torch

from .rng import TAG_PATH, TAG_STEP, categorical, random_words, to_below, to_uniform

P_H, P_BETA, P_BETA_DOT, P_RATE = 0, 1, 2, 3
NUM_PARAMS = 4


# ----------------------------------------------------------------------------- helpers
def _lanes(seeds: torch.Tensor, row_len: int, numel: int, step, tag: int):
    return random_words(seeds, row_len, numel, step, tag)


def _step_value(step: torch.Tensor) -> torch.Tensor:
    return step.reshape(-1)[0]


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor | None, *, guidance_scale: float,
                  temperature: float, top_k: int = 0, top_p: float = 1.0,
                  exclude: int | None = None) -> torch.Tensor:
    """DESIGN §2.4 guidance, temperature and filtering; float64 (…, K).

    ``exclude`` is a code that can never be drawn (the mask id of the masked path).
    """
    z = cond.to(torch.float64)
    if uncond is not None:
        u = uncond.to(torch.float64)
        # where both are equal (e.g. a code banned with −inf in both passes) z is that value:
        # u + s·(c − u) would give NaN for −inf. Every backend applies the same rule.
        z = torch.where(z == u, z, u + guidance_scale * (z - u))
    z = z / temperature
    if exclude is not None:
        z = z.clone()
        z[..., exclude] = -torch.inf
    if top_k and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, -torch.inf)
    if top_p < 1.0:
        probs = torch.softmax(z, dim=-1)
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the crossing token included)
        drop_sorted = (torch.cumsum(sorted_p, dim=-1) - sorted_p) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, -torch.inf)
    return z


def draw_x1(z: torch.Tensor, u: torch.Tensor, *, argmax: bool = False) -> torch.Tensor:
    """x̂1 ~ softmax(z) by the inverse CDF of §2.5 (or argmax z)."""
    if argmax:
        return z.argmax(dim=-1)
    return categorical(torch.softmax(z, dim=-1), u)


def code_distances(table: torch.Tensor, x: torch.Tensor, *, power: int = 2) -> torch.Tensor:
    """d(x_i, ·) for every token against every code: float64 (D, K). ``table`` is ê (K, m)."""
    e = table.to(torch.float64)
    ex = e[x]
    d = (ex * ex).sum(-1, keepdim=True) + (e * e).sum(-1) - 2 * ex @ e.T
    same = x.unsqueeze(-1) == torch.arange(e.shape[0], device=x.device)
    d = d.clamp_min(0).masked_fill(same, 0.0)
    return d * d if power == 4 else d


def metric_rates(d_all: torch.Tensor, d0: torch.Tensor, beta: torch.Tensor, beta_dot: torch.Tensor):
    """Kinetic-optimal rates (§2.4): ``u(x) = β̇·p(x)·max(d0 − d(x), 0)``, ``p ∝ exp(−β d)``.

    d_all (D, K) distances to x̂1, d0 (D,) = d(z0, x̂1). Returns (weights (D, K), λ (D,)):
    ``weights`` ∝ u (the destination law), ``λ = Σ u``. ``u(z0) = 0`` since d(z0) = d0.
    """
    g = torch.exp(-beta * d_all)
    w = g * (d0.unsqueeze(-1) - d_all).clamp_min(0)
    lam = beta_dot * w.sum(-1) / g.sum(-1)
    return w, lam


# ----------------------------------------------------------------------------- path sampling
def metric_sample(x1: torch.Tensor, beta: torch.Tensor, table: torch.Tensor, *, power: int = 2,
                  levels=None, seeds: torch.Tensor, row_len: int, out: torch.Tensor | None = None):
    """x_t ~ softmax(−β_i·d(·, x1_i)) per token (§2.3); β = ∞ returns x1. RNG: TAG_PATH, lane 0."""
    w0 = _lanes(seeds, row_len, x1.numel(), 0, TAG_PATH)[0]
    b = beta.to(torch.float64).unsqueeze(-1)
    finite = torch.isfinite(b)
    logits = torch.where(finite, -b * code_distances(table, x1, power=power),
                         torch.zeros((), dtype=torch.float64, device=x1.device))
    xt = categorical(torch.exp(logits - logits.amax(-1, keepdim=True)), to_uniform(w0))
    xt = torch.where(finite.squeeze(-1), xt, x1)
    return _write(out, xt)


def mixture_sample(x1: torch.Tensor, keep: torch.Tensor, *, K: int, seeds: torch.Tensor,
                   row_len: int, out: torch.Tensor | None = None):
    """x_t = x1 with probability κ_i (lane 1), else uniform over [0, K) (lane 2)."""
    words = _lanes(seeds, row_len, x1.numel(), 0, TAG_PATH)
    noise = to_below(words[2], K)
    return _write(out, torch.where(to_uniform(words[1]) < keep.to(torch.float32), x1, noise))


def mask_sample(x1: torch.Tensor, keep: torch.Tensor, *, mask_id: int, seeds: torch.Tensor,
                row_len: int, out: torch.Tensor | None = None):
    """x_t = x1 with probability κ_i (lane 1), else the mask id."""
    words = _lanes(seeds, row_len, x1.numel(), 0, TAG_PATH)
    keep_it = to_uniform(words[1]) < keep.to(torch.float32)
    return _write(out, torch.where(keep_it, x1, torch.full_like(x1, mask_id)))


# ----------------------------------------------------------------------------- sampler steps
def _predict(cond, uncond, x, step, seeds, row_len, argmax: bool, **guidance):
    """The step's random words (TAG_STEP, step k) and its x̂1 (lane 0), shared by every path."""
    words = _lanes(seeds, row_len, x.numel(), _step_value(step), TAG_STEP)
    z = guided_logits(cond, uncond, **guidance)
    return words, draw_x1(z, to_uniform(words[0]), argmax=argmax)


def metric_step(cond, uncond, x, table, params, step, *, seeds, row_len, guidance_scale=1.0,
                temperature=1.0, top_k=0, top_p=1.0, power=2, levels=None, last=False,
                argmax_last=False, out=None):
    """One metric-path Euler step (§2.4). RNG: TAG_STEP; lanes 0 x̂1, 1 jump, 2 destination."""
    words, x1 = _predict(cond, uncond, x, step, seeds, row_len, last and argmax_last, guidance_scale=guidance_scale,
                         temperature=temperature, top_k=top_k, top_p=top_p)
    if last:
        return _write(out, x1)
    p = params.to(torch.float64)
    d_all = code_distances(table, x1, power=power)
    d0 = d_all.gather(-1, x.unsqueeze(-1)).squeeze(-1)
    w, lam = metric_rates(d_all, d0, p[P_BETA], p[P_BETA_DOT])
    jump = (to_uniform(words[1]).to(torch.float64) < -torch.expm1(-p[P_H] * lam)) & (lam > 0)
    # every row draws a destination (rows with λ = 0 are discarded): no host sync, graph-safe
    return _write(out, torch.where(jump, categorical(w, to_uniform(words[2])), x))


def mixture_step(cond, uncond, x, params, step, *, seeds, row_len, guidance_scale=1.0,
                 temperature=1.0, top_k=0, top_p=1.0, last=False, argmax_last=False, out=None):
    """Mixture-path step (§2.4): jump to x̂1 ≠ z0 with probability 1 − exp(−h·κ̇/(1−κ))."""
    words, x1 = _predict(cond, uncond, x, step, seeds, row_len, last and argmax_last, guidance_scale=guidance_scale,
                         temperature=temperature, top_k=top_k, top_p=top_p)
    if last:
        return _write(out, x1)
    p = params.to(torch.float64)
    jump_prob = -torch.expm1(-p[P_H] * p[P_RATE])
    jump = to_uniform(words[1]).to(torch.float64) < jump_prob
    return _write(out, torch.where(jump, x1, x))


def mask_step(cond, uncond, x, params, step, *, mask_id, seeds, row_len, guidance_scale=1.0,
              temperature=1.0, top_k=0, top_p=1.0, last=False, argmax_last=False, out=None):
    """Masked-path step (§2.4): a masked token becomes x̂1 with probability min(1, h·κ̇/(1−κ));
    on the last step every masked token does. Unmasked tokens stay. x̂1 never is the mask."""
    words, x1 = _predict(cond, uncond, x, step, seeds, row_len, last and argmax_last, guidance_scale=guidance_scale,
                         temperature=temperature, top_k=top_k, top_p=top_p, exclude=mask_id)
    masked = x == mask_id
    if last:
        return _write(out, torch.where(masked, x1, x))
    p = params.to(torch.float64)
    unmask_prob = torch.clamp(p[P_H] * p[P_RATE], max=1.0)
    unmask = masked & (to_uniform(words[1]).to(torch.float64) < unmask_prob)
    return _write(out, torch.where(unmask, x1, x))


def _write(out: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    if out is None:
        return value
    out.copy_(value)
    return out


def mask_confidence_step(cond, uncond, x, *, mask_id, n_unmasked, noise_scale, seeds, row_len, step,
                         guidance_scale=1.0, temperature=1.0, top_k=0, top_p=1.0, argmax=False):
    """MaskGIT-style masked step (§2.4): keep the ``n_unmasked`` most confident tokens per row.

    x (R, L) tokens of R rows; cond/uncond (R, L, K). Confidence of a masked token is
    ``log p(x̂1) + noise_scale·g`` with Gumbel noise ``g`` from lane 3 (MaskGIT's annealed
    temperature is ``noise_scale``); already unmasked tokens rank first and stay. Ties break
    towards the lower index. Returns (R, L).
    """
    R, L = x.shape
    words = _lanes(seeds, row_len, x.numel(), step, TAG_STEP)
    z = guided_logits(cond, uncond, guidance_scale=guidance_scale, temperature=temperature,
                      top_k=top_k, top_p=top_p, exclude=mask_id)
    x1 = draw_x1(z, to_uniform(words[0]).view(R, L), argmax=argmax)
    logp = torch.log_softmax(z, dim=-1).gather(-1, x1.unsqueeze(-1)).squeeze(-1)
    gumbel = -torch.log(-torch.log(to_uniform(words[3]).to(torch.float64))).view(R, L)
    masked = x == mask_id
    conf = torch.where(masked, logp + noise_scale * gumbel, torch.full_like(logp, torch.inf))
    order = torch.sort(conf, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(L, device=x.device).expand(R, L))
    keep = rank < n_unmasked.view(R, 1)
    return torch.where(keep, torch.where(masked, x1, x), torch.full_like(x, mask_id))
