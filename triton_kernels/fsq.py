"""Implicit FSQ codebook on chip: distances and metric weights by plain arithmetic (DESIGN §2.1).

The code of index ``c`` has mixed-radix digits ``q_l`` (first level fastest), each mapped to
``v_l = (q_l − L_l//2) / (L_l//2)``; ``ê_c = v / max(‖v‖, 1e-5)``. Nothing is read from memory.

The levels split into a *low* group (the first NLO levels, P_LO codes) and a *high* group (the
rest, P_HI codes): ``c = lo + P_LO·hi``. A *chunk* is one ``hi``: P_LO consecutive codes.
Every thread owns its chunks for the whole pass; the loop walks ``lo`` in slices of W, so a
tile is ``(ROWS, CH_P2, W)`` (tokens × chunks × low codes) and every per-code quantity is a
sum of a low part (per slice) and a high part (computed once):

    ‖v_c‖² = n_lo[lo] + n_hi[hi],   v_c·ŷ = a_lo[lo] + a_hi[hi]          (ŷ = ê of x̂1)
    d(c, x̂1) = ‖ê_c‖² + ‖ŷ‖² − 2·rsqrt(‖v_c‖²)·(v_c·ŷ), clamped at 0

A (code, token) pair costs about a dozen FLOPs and one ``exp2``; the ``rsqrt`` is shared by the
ROWS tokens. Accumulators are elementwise (no reduction inside the loop). Metric weights:
``g = exp(−β d)`` (path law / normalizer) and ``w = g·max(d0 − d, 0)`` (kinetic-optimal rates).

Exactness: inside the pass, ``d(x̂1, x̂1)`` and ``w(z0)`` are left to the arithmetic (a few ulp
from 0); the per-chunk sums only choose the chunk. The pick inside that chunk applies the exact
rules ``d(x̂1, x̂1) = 0`` and ``w(z0) = 0``, and ``d0 = d(z0, x̂1)`` is exact too.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .categorical import LOG2E, crossing

EPS2 = tl.constexpr(1e-10)  # (norm clamp 1e-5)², §2.1


@triton.jit
def fsq_group(part, yq, LEVELS: tl.constexpr, START: tl.constexpr, STOP: tl.constexpr):
    """``(Σ v_l(part)·v_l(yq), Σ v_l(part)²)`` over levels START..STOP−1.

    part, yq: int32 mixed-radix indices of that level group (broadcastable shapes).
    """
    dot = (part * 0 + yq * 0).to(tl.float32)
    nsq = (part * 0).to(tl.float32)
    for i in tl.static_range(START, STOP):
        vp = ((part % LEVELS[i]) - LEVELS[i] // 2).to(tl.float32) / (LEVELS[i] // 2)
        vy = ((yq % LEVELS[i]) - LEVELS[i] // 2).to(tl.float32) / (LEVELS[i] // 2)
        part = part // LEVELS[i]
        yq = yq // LEVELS[i]
        dot += vp * vy
        nsq += vp * vp
    return dot, nsq


@triton.jit
def fsq_dist(a, nsq, sq_y):
    """Clamped d from the (ŷ-scaled) dot ``a`` and the squared norm of v (broadcasting)."""
    rn = tl.math.rsqrt(tl.maximum(nsq, EPS2))
    return tl.maximum((nsq * rn * rn + sq_y) - 2.0 * (rn * a), 0.0)


@triton.jit
def fsq_token(y, z0, LEVELS: tl.constexpr, NLO: tl.constexpr, P_LO: tl.constexpr, POWER: tl.constexpr):
    """Per token: rn_y = 1/‖v_y‖, ‖ŷ‖², and the exact d0 = d(z0, y) (power applied), all (R,)."""
    NLEV: tl.constexpr = len(LEVELS)
    nsq_y = fsq_group(y, y, LEVELS, 0, NLEV)[1]
    rn_y = tl.math.rsqrt(tl.maximum(nsq_y, EPS2))
    sq_y = nsq_y * rn_y * rn_y
    b_lo, m_lo = fsq_group(z0 % P_LO, y % P_LO, LEVELS, 0, NLO)
    b_hi, m_hi = fsq_group(z0 // P_LO, y // P_LO, LEVELS, NLO, NLEV)
    d0 = fsq_dist((b_hi + b_lo) * rn_y, m_hi + m_lo, sq_y)
    d0 = tl.where(z0 == y, 0.0, d0)
    if POWER == 4:
        d0 = d0 * d0
    return rn_y, sq_y, d0


@triton.jit
def fsq_pass(y, z0, d0, rn_y, sq_y, nb, LEVELS: tl.constexpr, NLO: tl.constexpr, P_LO: tl.constexpr,
             P_HI: tl.constexpr, CH_P2: tl.constexpr, W: tl.constexpr, ROWS: tl.constexpr,
             POWER: tl.constexpr, RATES: tl.constexpr):
    """One pass over the whole codebook for ROWS tokens (y = x̂1 or x1, nb = −β per token).

    Returns Z = Σ_c g (R,) and the per-chunk Σ w (R, CH_P2) (w = g when not RATES).
    """
    NLEV: tl.constexpr = len(LEVELS)
    hi = tl.arange(0, CH_P2)[None, :, None]
    a_hi, n_hi = fsq_group(hi, (y // P_LO)[:, None, None], LEVELS, NLO, NLEV)
    a_hi = a_hi * rn_y[:, None, None]
    pen = tl.where(hi < P_HI, 0.0, float("-inf"))  # padded chunks weigh exp2(-inf) = 0
    ylo = (y % P_LO)[:, None, None]
    nb3 = (nb * LOG2E)[:, None, None]
    sq3 = sq_y[:, None, None]
    d03 = d0[:, None, None]
    acc_g = tl.zeros([ROWS, CH_P2, W], tl.float32)
    acc_w = tl.zeros([ROWS, CH_P2, W], tl.float32)
    for j in range(0, (P_LO + W - 1) // W):
        lo = j * W + tl.arange(0, W)[None, None, :]
        a_lo, n_lo = fsq_group(lo, ylo, LEVELS, 0, NLO)
        n = n_hi + n_lo  # (1, CH_P2, W): shared by the ROWS tokens
        rn = tl.math.rsqrt(tl.maximum(n, EPS2))
        sq = n * rn * rn
        if P_LO % W != 0:
            bias = pen + tl.where(lo < P_LO, 0.0, float("-inf"))
        else:
            bias = pen
        d = tl.maximum((sq + sq3) - 2.0 * (rn * (a_hi + a_lo * rn_y[:, None, None])), 0.0)
        if POWER == 4:
            d = d * d
        g = tl.exp2(d * nb3 + bias)
        acc_g += g
        if RATES:
            acc_w += g * tl.maximum(d03 - d, 0.0)
    z = tl.sum(tl.sum(acc_g, 2), 1)
    if RATES:
        vt = tl.sum(acc_w, 2)
    else:
        vt = tl.sum(acc_g, 2)
    return z, vt


@triton.jit
def fsq_pick(chunk, r, y, z0, d0, rn_y, sq_y, nb, LEVELS: tl.constexpr, NLO: tl.constexpr,
             P_LO: tl.constexpr, LO_P2: tl.constexpr, POWER: tl.constexpr, RATES: tl.constexpr):
    """Inverse CDF inside one chunk per token: the code where the cumulative w first exceeds r.

    Exact rules here: d(y, y) = 0, w(z0) = 0 (RATES), padded codes weigh 0.
    """
    NLEV: tl.constexpr = len(LEVELS)
    lo = tl.arange(0, LO_P2)[None, :]
    a_hi, n_hi = fsq_group(chunk[:, None], (y // P_LO)[:, None], LEVELS, NLO, NLEV)
    a_lo, n_lo = fsq_group(lo, (y % P_LO)[:, None], LEVELS, 0, NLO)
    d = fsq_dist((a_hi + a_lo) * rn_y[:, None], n_hi + n_lo, sq_y[:, None])
    code = chunk[:, None] * P_LO + lo
    d = tl.where(code == y[:, None], 0.0, d)
    if POWER == 4:
        d = d * d
    w = tl.where(lo < P_LO, tl.exp2(d * (nb * LOG2E)[:, None]), 0.0)
    if RATES:
        w = w * tl.maximum(d0[:, None] - d, 0.0)
        w = tl.where(code == z0[:, None], 0.0, w)
    j = crossing(tl.cumsum(w, 1), w, r, lo)[0]
    return (chunk * P_LO + j).to(tl.int64)


@triton.jit
def fsq_destination(vt, target, y, z0, d0, rn_y, sq_y, nb, LEVELS: tl.constexpr, NLO: tl.constexpr,
                    P_LO: tl.constexpr, LO_P2: tl.constexpr, CH_P2: tl.constexpr, POWER: tl.constexpr,
                    RATES: tl.constexpr):
    """Inverse CDF over the chunks (sums ``vt``), then inside the crossing chunk."""
    chunk, prefix = crossing(tl.cumsum(vt, 1), vt, target, tl.arange(0, CH_P2)[None, :])
    return fsq_pick(chunk, target - prefix, y, z0, d0, rn_y, sq_y, nb, LEVELS, NLO, P_LO, LO_P2, POWER, RATES)
