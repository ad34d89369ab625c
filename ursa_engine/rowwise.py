"""Per-row sampler steps: every sample of a batch at its own step (issue 14; DESIGN §2.4, §2.5).

Continuous batching (:mod:`ursa_engine.serve`) puts requests at different steps into one forward
pass: the URSA transformer has no timestep input, so only the sampler needs each row's own
``t_k, h, β, β̇``, guidance decision and RNG step counter.

Design: one backend op call per row. :func:`step_rows` gathers each row's entry of the step table
on the device (``index_select`` by its ``k``) and runs the scheduler's op on that row's slices of
the logits, tokens and output, with that row's seed and its ``k`` as the RNG step counter. Every
draw is keyed by (seed, step, token index, lane) (§2.5), so a row's tokens are bit-identical to
stepping it alone, on every backend, and no kernel changed. The price is B launches instead of
one; a kernel reading a (B, NUM_PARAMS) table and a (B,) step vector would make it one launch
(not done).

Graph safety (``validate=False``): nothing reads a device value on the host.

* Guidance: ``guided`` a host list (the caller knows its rows' steps: unguided rows get
  ``uncond=None``), or a (B,) bool device tensor, or None with ``uncond_logits`` given: then
  ``guided = t[k] < guidance_trunc`` on the device. Device decisions give unguided rows
  ``uncond = cond``, which the §2.4 guidance rule ``z = where(c == u, c, u + s·(c − u))``
  (every backend applies it) turns into exactly the unguided ``z = c``: same tokens as None.
* The last step (``k = N − 1``: the result is x̂1, or ``argmax z`` with ``argmax_last``):
  ``last`` a host list, or a (B,) bool device tensor, or None: ``k == N − 1`` on the device; a
  device decision runs each row's op twice (not last, last: the same keys, so the same x̂1) and
  keeps the one its ``k`` asks for.
* Per-row ``guidance_scale`` / ``temperature`` are host floats (the ops take python scalars): a
  CUDA graph captures them, so a graph is valid for one assignment of requests to rows.
"""

from __future__ import annotations

import torch

from . import _validate
from .reference.rng import seeds_per_row


def is_per_row(k: torch.Tensor, x, seed) -> bool:
    """Whether a tensor ``k`` asks for per-row steps: a (B,) tensor with B > 1, or B = 1 with a
    seed tensor (a (1,) k with an int seed keeps its old meaning: one step index)."""
    if k.dim() != 1:
        return False
    return k.numel() > 1 or isinstance(seed, torch.Tensor)


def _per_row(name: str, value, B: int, check) -> list[float]:
    """A float for every row: one float for all, or a sequence / 1-D tensor of B values (host)."""
    if isinstance(value, torch.Tensor):
        value = value.tolist() if value.dim() == 1 else value.item()
    if isinstance(value, (list, tuple)):
        if len(value) != B:
            raise ValueError(f"{name}: expected one value or {B} (one per row), got {len(value)}")
        return [check(name, v) for v in value]
    return [check(name, value)] * B


def _flags(name: str, value, B: int, device) -> list[bool] | torch.Tensor:
    """A (B,) bool device tensor, or a host list of B bools."""
    if isinstance(value, torch.Tensor):
        if value.dtype != torch.bool or tuple(value.shape) != (B,) or value.device != device:
            raise ValueError(f"{name}: expected a ({B},) bool tensor on {device}, got {value.dtype} "
                             f"{tuple(value.shape)} on {value.device}")
        return value
    if not isinstance(value, (list, tuple)) or len(value) != B:
        raise ValueError(f"{name}: expected {B} bools (one per row) or a ({B},) bool tensor, got {value!r}")
    return [bool(v) for v in value]


def step_rows(sched, logits, k: torch.Tensor, x: torch.Tensor, *, uncond_logits=None, guided=None, last=None,
              guidance_scale=1.0, guidance_trunc=1.0, temperature=1.0, top_k: int = 0, top_p: float = 1.0,
              argmax_last: bool = False, seed=None, token_offset: int = 0, x1=None, backend: str = "auto",
              validate: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
    """:meth:`Scheduler.step` with one step index per sample (see the module docstring).

    Parameters
    ----------
    sched : Scheduler
    logits, x, uncond_logits, x1, top_k, top_p, argmax_last, token_offset, backend, out :
        as in :meth:`Scheduler.step`; S[0] = B samples.
    k : (B,) int64 tensor on the tokens' device, every value in [0, N) (the last step included)
    guided : None, a (B,) bool device tensor, or B host bools: which rows get guidance this step
        (None: ``t[k] < guidance_trunc`` when ``uncond_logits`` is given, computed on the device)
    last : None, a (B,) bool device tensor, or B host bools: which rows take the last step
        (None: ``k == N − 1`` on the device, two op calls per row)
    guidance_scale, temperature : one float or B floats (host)
    guidance_trunc : one float or B floats; read only when ``guided`` is None (builds a small
        device tensor: give ``guided`` inside a CUDA graph capture)
    seed : int64 tensor (B,): one seed per sample (required)
    validate : check k's range, ids and logits first (host syncs); False inside CUDA graphs

    Returns
    -------
    LongTensor S: each row's ``x_{t_{k_b + 1}}``.
    """
    if sched.mask_sampler == "confidence":
        raise ValueError("k: the confidence sampler ranks a sample's tokens together: it takes a python int step "
                         "index, not per-row steps")
    N = sched.num_steps
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("x: per-row steps need tokens of shape (B, ...)")
    B, device = x.shape[0], x.device
    if k.dtype != torch.int64 or tuple(k.shape) != (B,):
        raise ValueError(f"k: per-row steps need a ({B},) int64 tensor (one step per sample), got {k.dtype} "
                         f"{tuple(k.shape)}")
    if k.device != device:
        raise ValueError(f"k: on {k.device}, but the tokens are on {device}")
    if not isinstance(seed, torch.Tensor):
        raise ValueError(f"seed: per-row steps need one seed per sample (an int64 tensor of shape ({B},)), "
                         f"got {type(seed).__name__}")
    scales = _per_row("guidance_scale", guidance_scale, B, _validate.finite)
    temps = _per_row("temperature", temperature, B, _validate.positive)
    token_offset = _validate.index_offset("token_offset", token_offset)
    # shapes, dtypes and filtering options (k a tensor: no truncation inside)
    logits, uncond, given_uncond, x, x1, opts = sched._options(logits, uncond_logits, k, x, x1, 1.0, 1.0, 1.0,
                                                               top_k, top_p)
    shape = tuple(x.shape)
    if out is None:
        out = torch.empty(shape, dtype=torch.int64, device=device)
    elif out.shape != x.shape or out.dtype != torch.int64 or out.device != device or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous int64 tensor of shape {shape} on {device}")
    seeds, row_len = seeds_per_row(seed, shape, device)
    if validate and B:
        lo, hi = int(k.min()), int(k.max())
        if lo < 0 or hi >= N:
            raise ValueError(f"k: every step index must be in [0, {N}), got [{lo}, {hi}]")
    if validate:
        sched._check_values(x, x1, logits, given_uncond)
    if x1 is not None:
        uncond = None  # x̂1 given: no logits read, guidance does not apply
    if uncond is None:
        if guided is not None and (isinstance(guided, torch.Tensor) or any(guided)):
            raise ValueError("guided: rows can get guidance only with uncond_logits")
        guided = [False] * B
    elif guided is None:
        trunc = torch.tensor(_per_row("guidance_trunc", guidance_trunc, B, _validate.finite), dtype=torch.float64,
                             device=device)
        guided = sched.time_values(device).index_select(0, k) < trunc
    else:
        guided = _flags("guided", guided, B, device)
    last = (k == N - 1) if last is None else _flags("last", last, B, device)
    params_all = sched.step_values(device)[0]
    for b in range(B):
        sl = slice(b, b + 1)
        kb = k[sl]
        params = params_all.index_select(0, kb).view(-1)
        row = None if logits is None else logits[sl]
        if isinstance(guided, torch.Tensor):  # unguided rows: u = c, z = c exactly (§2.4 rule)
            u = torch.where(guided[b], uncond[sl], row)
        else:
            u = uncond[sl] if guided[b] else None
        args = (row, u, None, x[sl], None if x1 is None else x1[sl],
                dict(opts, guidance_scale=scales[b], temperature=temps[b]), params, kb)
        tail = (argmax_last, seeds[sl], row_len, token_offset, backend, False)
        if isinstance(last, torch.Tensor):
            going = sched._apply(*args, False, *tail, torch.empty_like(out[sl]))
            final = sched._apply(*args, True, *tail, torch.empty_like(out[sl]))
            torch.where(last[b], final, going, out=out[sl])
        else:
            sched._apply(*args, last[b], *tail, out[sl])
    return out


def guided_steps(sched, guidance_scale: float, guidance_trunc: float, *, skip_first: bool) -> list[bool]:
    """Engine.generate's guidance decision for every step of ``sched`` (DESIGN §2.4): ``s != 1``
    and ``t_k < trunc``; never at a skipped first step (the metric path's identity step 0)."""
    out = [guidance_scale != 1.0 and float(sched.times[k]) < guidance_trunc for k in range(sched.num_steps)]
    if skip_first and out:
        out[0] = False
    return out


__all__ = ["guided_steps", "is_per_row", "step_rows"]
