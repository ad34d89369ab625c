"""Dense torch sampler ops: the oracle every backend is tested against (DESIGN §2.3, §2.4).

These are the *kernel-level* ops. Every backend (``ursa_engine.triton_kernels.sampler``,
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
* ``seeds`` (R,) int64, ``row_len`` and ``index_offset``: the RNG rows of
  :mod:`ursa_engine.reference.rng` (token ``i`` uses ``seeds[i // row_len]`` and Philox index
  ``(i % row_len) + index_offset``). Running the tokens ``[s, e)`` of every sample as one call
  (``row_len = e − s``, ``index_offset = s``) gives exactly the tokens of the whole call.
* Guidance (§2.4): ``z = u + s·(c − u)`` when ``uncond`` is given (the caller applies the
  truncation by passing ``uncond=None``), and ``z = c`` where ``c == u`` (so a code at −inf in
  both stays −inf instead of NaN); then ``z / temperature``, then top-k / top-p.
* ``last=True`` is the final step: the result is x̂1 (or ``argmax z`` with ``argmax_last``).
* ``x1`` (step ops): x̂1 already drawn elsewhere (the fused lm_head + draw). The op then reads
  no logits (``cond`` / ``uncond`` may be None; guidance, temperature and filtering are
  ignored), RNG lane 0 is unused, and the rest of the step is unchanged.
* ``error`` (step ops): an int32 tensor (1,) on the tokens' device. The op ORs the ``ERR_*``
  bits below for bad values it reads, never reads out of bounds because of them (ids are
  clamped for addressing) and still writes a result (meaningless where a bit is set). The
  reference checks every logit it is given (it reads them all), ``x`` and a given ``x1``
  against K (from ``cond``, the table, or the ``K=`` keyword of the mixture / mask steps, which
  bounds the id checks when ``cond`` is None; with neither, no id is checked).
* Memory: every op works on row chunks of tokens (:func:`row_chunks`, at most
  :data:`CHUNK_BYTES` per float64 (rows, K) temporary; a few are live at once), so its extra
  memory is O(chunk·K) whatever D is. Rows are independent: chunking never changes a token.
* The reference computes in float64; kernels may use float32 (the "rare ties" of §2.5).
"""

from __future__ import annotations

import torch

from .rng import TAG_PATH, TAG_STEP, categorical, random_words, to_below, to_uniform

P_H, P_BETA, P_BETA_DOT, P_RATE = 0, 1, 2, 3
NUM_PARAMS = 4

# Error bits of the ``error=`` buffer, defined here once (Triton and csrc/include/ursa/errors.h mirror them).
ERR_X_RANGE = 1  # an id of x outside [0, K)
ERR_COND_NAN = 2
ERR_COND_POSINF = 4
ERR_COND_ALL_NEGINF = 8  # a token whose cond logits are all −inf
ERR_UNCOND_NAN = 16
ERR_UNCOND_POSINF = 32
ERR_UNCOND_ALL_NEGINF = 64
ERR_X1_RANGE = 128  # an id of a given x1 outside [0, K)

# Byte budget of one (rows, K) float64 temporary. 256 MiB is 524 rows at K = 64,000: the peak of an
# op is a few such buffers (~1 GiB) where one (D, K) float64 buffer is 34 GB at D = 66,560.
CHUNK_BYTES = 256 * 2**20


def row_chunks(rows: int, K: int, itemsize: int = 8) -> list[slice]:
    """Slices of ``rows`` such that one (chunk, K) buffer of ``itemsize`` bytes fits :data:`CHUNK_BYTES`."""
    n = max(1, CHUNK_BYTES // max(1, K * itemsize))
    return [slice(s, min(rows, s + n)) for s in range(0, rows, n)]


# ----------------------------------------------------------------------------- helpers
def _lanes(seeds: torch.Tensor, row_len: int, numel: int, step, tag: int, index_offset: int = 0):
    return random_words(seeds, row_len, numel, step, tag, index_offset=index_offset)


def _step_value(step: torch.Tensor) -> torch.Tensor:
    return step.reshape(-1)[0]


def _flag(error: torch.Tensor, bad: torch.Tensor, bit: int) -> None:
    error.bitwise_or_(bad.to(torch.int32) * bit)  # on the device: no host sync


def check_logits(error: torch.Tensor | None, z: torch.Tensor, *, uncond: bool = False) -> None:
    """OR the NaN / +inf / all −inf bits of ``z`` (rows, K) into ``error`` (cond or uncond bits)."""
    if error is None:
        return
    nan, posinf, neginf = ((ERR_UNCOND_NAN, ERR_UNCOND_POSINF, ERR_UNCOND_ALL_NEGINF) if uncond
                           else (ERR_COND_NAN, ERR_COND_POSINF, ERR_COND_ALL_NEGINF))
    _flag(error, torch.isnan(z).any(), nan)
    _flag(error, torch.isposinf(z).any(), posinf)
    _flag(error, (z == -torch.inf).all(-1).any(), neginf)


def check_ids(error: torch.Tensor | None, ids: torch.Tensor, K: int | None, bit: int) -> torch.Tensor:
    """With an error buffer and a known K: OR ``bit`` if an id is outside [0, K) and return the ids
    clamped for addressing; otherwise ``ids`` unchanged."""
    if error is None or K is None:
        return ids
    _flag(error, ((ids < 0) | (ids >= K)).any(), bit)
    return ids.clamp(0, K - 1)


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor | None, *, guidance_scale: float,
                  temperature: float, top_k: int = 0, top_p: float = 1.0,
                  exclude: int | None = None) -> torch.Tensor:
    """DESIGN §2.4 guidance, temperature and filtering; float64 (…, K). Call it on row chunks.

    ``exclude`` is a code that can never be drawn (the mask id of the masked path). In-place
    arithmetic on one fresh buffer keeps the temporaries few; the values are those of
    ``where(c == u, c, u + s·(c − u)) / T`` evaluated in that order.
    """
    z = cond.to(torch.float64, copy=True)
    if uncond is not None:
        u = uncond.to(torch.float64)
        # where both are equal (e.g. a code banned with −inf in both passes) z is that value:
        # u + s·(c − u) would give NaN for −inf. Every backend applies the same rule.
        same = z == u
        z.sub_(u).mul_(guidance_scale).add_(u)
        torch.where(same, u, z, out=z)
        del u, same
    z.div_(temperature)
    if exclude is not None:
        z[..., exclude] = -torch.inf
    if top_k and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z.masked_fill_(z < kth, -torch.inf)
    if top_p < 1.0:
        sorted_p, order = torch.sort(torch.softmax(z, dim=-1), dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the crossing token included)
        before = torch.cumsum(sorted_p, dim=-1).sub_(sorted_p)
        del sorted_p
        drop_sorted = before >= top_p
        del before
        z.masked_fill_(torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted), -torch.inf)
    return z


def draw_x1(z: torch.Tensor, u: torch.Tensor, *, argmax: bool = False) -> torch.Tensor:
    """x̂1 ~ softmax(z) by the inverse CDF of §2.5 (or argmax z)."""
    if argmax:
        return z.argmax(dim=-1)
    return categorical(torch.softmax(z, dim=-1), u)


def _table64(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ê in float64 (K, m) and its squared norms (K,): once per op, shared by its chunks."""
    e = table.to(torch.float64)
    return e, (e * e).sum(-1)


def _distances(e: torch.Tensor, sq: torch.Tensor, x: torch.Tensor, power: int) -> torch.Tensor:
    """d(x_i, ·) (rows, K) float64 from :func:`_table64`: ``|ê_x|² + |ê|² − 2 ê_x·ê``."""
    ex = e[x]
    d = (ex * ex).sum(-1, keepdim=True) + sq
    d.sub_(2 * ex @ e.T)
    d.clamp_min_(0).scatter_(-1, x.unsqueeze(-1), 0.0)  # d(x, x) = 0 exactly
    return d.mul_(d) if power == 4 else d


def code_distances(table: torch.Tensor, x: torch.Tensor, *, power: int = 2) -> torch.Tensor:
    """d(x_i, ·) for every token against every code: float64 (D, K). ``table`` is ê (K, m)."""
    e, sq = _table64(table)
    return _distances(e, sq, x, power)


def metric_rates(d_all: torch.Tensor, d0: torch.Tensor, beta: torch.Tensor, beta_dot: torch.Tensor):
    """Kinetic-optimal rates (§2.4): ``u(x) = β̇·p(x)·max(d0 − d(x), 0)``, ``p ∝ exp(−β d)``.

    d_all (D, K) distances to x̂1, d0 (D,) = d(z0, x̂1). Returns (weights (D, K), λ (D,)):
    ``weights`` ∝ u (the destination law), ``λ = Σ u``. ``u(z0) = 0`` since d(z0) = d0.
    """
    g = (-beta * d_all).exp_()
    w = (d0.unsqueeze(-1) - d_all).clamp_min_(0).mul_(g)
    lam = beta_dot * w.sum(-1) / g.sum(-1)
    return w, lam


# ----------------------------------------------------------------------------- path sampling
def _path_chunk(e, sq, x1, b, u, power: int) -> torch.Tensor:
    b = b.unsqueeze(-1)
    finite = torch.isfinite(b)
    logits = _distances(e, sq, x1, power).mul_(-b).masked_fill_(~finite, 0.0)  # −β·d; 0 where β = ∞
    xt = categorical(logits.sub_(logits.amax(-1, keepdim=True)).exp_(), u)
    return torch.where(finite.squeeze(-1), xt, x1)


def metric_sample(x1: torch.Tensor, beta: torch.Tensor, table: torch.Tensor, *, power: int = 2,
                  levels=None, seeds: torch.Tensor, row_len: int, index_offset: int = 0,
                  out: torch.Tensor | None = None):
    """x_t ~ softmax(−β_i·d(·, x1_i)) per token (§2.3); β = ∞ returns x1. RNG: TAG_PATH, lane 0."""
    D = x1.numel()
    u = to_uniform(_lanes(seeds, row_len, D, 0, TAG_PATH, index_offset)[0])
    e, sq = _table64(table)
    b = beta.to(torch.float64)
    xt = torch.empty(D, dtype=torch.int64, device=x1.device)
    for sl in row_chunks(D, e.shape[0]):
        xt[sl] = _path_chunk(e, sq, x1[sl], b[sl], u[sl], power)
    return _write(out, xt)


def mixture_sample(x1: torch.Tensor, keep: torch.Tensor, *, K: int, seeds: torch.Tensor,
                   row_len: int, index_offset: int = 0, out: torch.Tensor | None = None):
    """x_t = x1 with probability κ_i (lane 1), else uniform over [0, K) (lane 2)."""
    words = _lanes(seeds, row_len, x1.numel(), 0, TAG_PATH, index_offset)
    noise = to_below(words[2], K)
    return _write(out, torch.where(to_uniform(words[1]) < keep.to(torch.float32), x1, noise))


def mask_sample(x1: torch.Tensor, keep: torch.Tensor, *, mask_id: int, seeds: torch.Tensor,
                row_len: int, index_offset: int = 0, out: torch.Tensor | None = None):
    """x_t = x1 with probability κ_i (lane 1), else the mask id."""
    words = _lanes(seeds, row_len, x1.numel(), 0, TAG_PATH, index_offset)
    keep_it = to_uniform(words[1]) < keep.to(torch.float32)
    return _write(out, torch.where(keep_it, x1, torch.full_like(x1, mask_id)))


# ----------------------------------------------------------------------------- sampler steps
def _draw_chunk(cond, uncond, u, argmax: bool, error, options: dict) -> torch.Tensor:
    check_logits(error, cond)
    if uncond is not None:
        check_logits(error, uncond, uncond=True)
    return draw_x1(guided_logits(cond, uncond, **options), u, argmax=argmax)


def _prediction(cond, uncond, x1, words, K, *, argmax: bool, error, **options) -> torch.Tensor:
    """x̂1 (D,): the given ``x1`` (logits unread), or drawn from the logits by row chunks (lane 0)."""
    if x1 is not None:
        return check_ids(error, x1, K, ERR_X1_RANGE)
    D, Kc = cond.shape
    u = to_uniform(words[0])
    out = torch.empty(D, dtype=torch.int64, device=cond.device)
    for sl in row_chunks(D, Kc):
        out[sl] = _draw_chunk(cond[sl], None if uncond is None else uncond[sl], u[sl], argmax, error, options)
    return out


def _metric_chunk(e, sq, x1, x, u1, u2, p, power: int) -> torch.Tensor:
    d_all = _distances(e, sq, x1, power)
    d0 = d_all.gather(-1, x.unsqueeze(-1)).squeeze(-1)
    w, lam = metric_rates(d_all, d0, p[P_BETA], p[P_BETA_DOT])
    del d_all
    jump = (u1 < -torch.expm1(-p[P_H] * lam)) & (lam > 0)
    # every row draws a destination (rows with λ = 0 are discarded): no host sync, graph-safe
    return torch.where(jump, categorical(w, u2), x)


def metric_step(cond, uncond, x, table, params, step, *, seeds, row_len, index_offset=0, guidance_scale=1.0,
                temperature=1.0, top_k=0, top_p=1.0, power=2, levels=None, last=False, argmax_last=False,
                x1=None, error=None, out=None):
    """One metric-path Euler step (§2.4). RNG: TAG_STEP; lanes 0 x̂1, 1 jump, 2 destination.

    Reads every logit of ``cond`` / ``uncond`` (unless ``x1`` is given), ``x`` and ``x1``; checks
    them all into ``error`` (K = the table's size).
    """
    K = table.shape[0]
    D = x.numel()
    words = _lanes(seeds, row_len, D, _step_value(step), TAG_STEP, index_offset)
    x1 = _prediction(cond, uncond, x1, words, K, argmax=last and argmax_last, error=error,
                     guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p)
    x = check_ids(error, x, K, ERR_X_RANGE)
    if last:
        return _write(out, x1)
    p = params.to(torch.float64)
    e, sq = _table64(table)
    u1, u2 = to_uniform(words[1]).to(torch.float64), to_uniform(words[2])
    res = torch.empty(D, dtype=torch.int64, device=x.device)
    for sl in row_chunks(D, K):
        res[sl] = _metric_chunk(e, sq, x1[sl], x[sl], u1[sl], u2[sl], p, power)
    return _write(out, res)


def mixture_step(cond, uncond, x, params, step, *, seeds, row_len, index_offset=0, guidance_scale=1.0,
                 temperature=1.0, top_k=0, top_p=1.0, last=False, argmax_last=False, x1=None, error=None, K=None,
                 out=None):
    """Mixture-path step (§2.4): jump to x̂1 ≠ z0 with probability 1 − exp(−h·κ̇/(1−κ)).

    Reads every logit (unless ``x1`` is given) and ``x``. ``K`` (default: the logits' last dim)
    bounds the id checks when ``cond`` is None; with neither, no id is checked.
    """
    K = cond.shape[-1] if cond is not None else K
    words = _lanes(seeds, row_len, x.numel(), _step_value(step), TAG_STEP, index_offset)
    x1 = _prediction(cond, uncond, x1, words, K, argmax=last and argmax_last, error=error,
                     guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p)
    check_ids(error, x, K, ERR_X_RANGE)
    if last:
        return _write(out, x1)
    p = params.to(torch.float64)
    jump_prob = -torch.expm1(-p[P_H] * p[P_RATE])
    jump = to_uniform(words[1]).to(torch.float64) < jump_prob
    return _write(out, torch.where(jump, x1, x))


def mask_step(cond, uncond, x, params, step, *, mask_id, seeds, row_len, index_offset=0, guidance_scale=1.0,
              temperature=1.0, top_k=0, top_p=1.0, last=False, argmax_last=False, x1=None, error=None, K=None,
              out=None):
    """Masked-path step (§2.4): a masked token becomes x̂1 with probability min(1, h·κ̇/(1−κ));
    on the last step every masked token does. Unmasked tokens stay. x̂1 never is the mask.

    Reads every logit (unless ``x1`` is given) and ``x``; ``K`` as for :func:`mixture_step`.
    """
    K = cond.shape[-1] if cond is not None else K
    words = _lanes(seeds, row_len, x.numel(), _step_value(step), TAG_STEP, index_offset)
    x1 = _prediction(cond, uncond, x1, words, K, argmax=last and argmax_last, error=error,
                     guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                     exclude=mask_id)
    check_ids(error, x, K, ERR_X_RANGE)
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


def _confidence_chunk(cond, uncond, u, argmax: bool, options: dict) -> tuple[torch.Tensor, torch.Tensor]:
    z = guided_logits(cond, uncond, **options)
    x1 = draw_x1(z, u, argmax=argmax)
    return x1, torch.log_softmax(z, dim=-1).gather(-1, x1.unsqueeze(-1)).squeeze(-1)


def mask_confidence_step(cond, uncond, x, *, mask_id, n_unmasked, noise_scale, seeds, row_len, step,
                         index_offset=0, guidance_scale=1.0, temperature=1.0, top_k=0, top_p=1.0, argmax=False):
    """MaskGIT-style masked step (§2.4): keep the ``n_unmasked`` most confident tokens per row.

    x (R, L) tokens of R rows; cond/uncond (R, L, K). Confidence of a masked token is
    ``log p(x̂1) + noise_scale·g`` with Gumbel noise ``g`` from lane 3 (MaskGIT's annealed
    temperature is ``noise_scale``); already unmasked tokens rank first and stay. Ties break
    towards the lower index. x̂1 and log p(x̂1) come from row chunks of tokens; only the (R, L)
    confidences are ranked, per row. Returns (R, L).
    """
    R, L = x.shape
    D, K = R * L, cond.shape[-1]
    words = _lanes(seeds, row_len, D, step, TAG_STEP, index_offset)
    u = to_uniform(words[0])
    c = cond.reshape(D, K)
    un = None if uncond is None else uncond.reshape(D, K)
    options = dict(guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p, exclude=mask_id)
    x1 = torch.empty(D, dtype=torch.int64, device=x.device)
    logp = torch.empty(D, dtype=torch.float64, device=x.device)
    for sl in row_chunks(D, K):
        x1[sl], logp[sl] = _confidence_chunk(c[sl], None if un is None else un[sl], u[sl], argmax, options)
    x1, logp = x1.view(R, L), logp.view(R, L)
    gumbel = -torch.log(-torch.log(to_uniform(words[3]).to(torch.float64))).view(R, L)
    masked = x == mask_id
    conf = torch.where(masked, logp + noise_scale * gumbel, torch.full_like(logp, torch.inf))
    order = torch.sort(conf, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(L, device=x.device).expand(R, L))
    keep = rank < n_unmasked.view(R, 1)
    return torch.where(keep, torch.where(masked, x1, x), torch.full_like(x, mask_id))
