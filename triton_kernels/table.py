"""Explicit codebook tables (IBQ: K = 131,072, m = 256): metric weights with ``tl.dot`` (DESIGN §2.1).

Two kernels after the x̂1 draw, shared by the metric step and metric path sampling (occupancy
claims the compile report checks for sm_90a: pass 1 block of 8 warps an SM, finish ≥ 2):

* :func:`table_pass_kernel` — a GEMM ``ŷ (tokens × m) @ Êᵀ (m × codes)`` on tensor cores with
  the metric weights fused in its epilogue. Grid = (token blocks, K splits): when D is small
  the K range is split across programs so every SM has work, and one code tile (BN × m) is
  reused by the BM tokens of a block. It writes, per token, the Σ w of every code tile
  (scratch (D, NT), NT = K / BN: 1/BN of a D×K tensor) and per split Σ g (the normalizer).
* :func:`table_finish_kernel` — per token: λ and the jump (step) or nothing (path sample),
  the crossing tile from the tile sums, then the destination inside that one tile, recomputed
  in float32 on CUDA cores (BN × m multiply-adds per moving token).

Distances ``max(‖ê_c‖² + ‖ŷ‖² − 2 ê_c·ŷ, 0)``, ``d(y, y) = 0`` exactly in the finish. In the
pass (tile sums, Z, hence λ and the tile drawn) the dot's precision decides the error
(issue 12, finding 4; ``tests/test_table_precision.py`` emulates each mode and checks its bound):

* ``"bf16x3"`` (CUDA default for float32 tables): each operand split into a bf16 high part and a
  bf16 low part, three bf16 dots (high·high + high·low + low·high): |Δd| ≤
  :data:`BF16X3_DIST_ERROR`·‖ê_c‖·‖ŷ‖ (8.6e-6 measured on unit rows), jump-rate error ~1e-5.
  12 wgmma a code tile against tf32's 8 (1.5× its tensor-core time at twice the rate per op),
  248 registers, 112 KB shared, 1 block an SM (``benchmarks/compile_report.py``).
* ``"tf32x3"`` (the interpreter's default; on request on CUDA): |Δd| ≤
  :data:`TF32X3_DIST_ERROR`·‖ê_c‖·‖ŷ‖ (1.2e-6 measured), 24 wgmma a code tile (3× tf32), 247 registers.
* ``"tf32"`` (opt-in, ``cfg={"DOT_PRECISION": "tf32"}``): wgmma reads float32 shared memory as
  tf32 by truncation (10 mantissa bits), while ‖ê_c‖², ‖ŷ‖² are float32: |Δd| ≤
  :data:`TF32_DIST_ERROR`·‖ê_c‖·‖ŷ‖; d(y, y) ≈ 1.4e-3 instead of 0, and jump rates off by up to
  2.3% at β = 5 (the audit's measurement; 0.3% on random unit rows in the test).
* a bfloat16 table: bf16 products are exact in float32 and ‖ê_c‖² is taken of the bf16 values, so
  d is the exact distance of the stored (rounded) rows up to float32 accumulation.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .categorical import LOG2E, crossing, neg_expm1
from .philox import TAG_PATH, TAG_STEP, to_uniform, token_words

# Bounds on |Δd| / (‖ê_c‖·‖ŷ‖) in the table pass (module docstring): tf32 truncates each operand by
# < 2^-10 relatively, so |Δ(ê_c·ŷ)| < 2·2^-10·Σ|ê_c,i·ŷ_i| and |Δd| = 2|Δ(ê_c·ŷ)| < 2^-8·‖ê_c‖‖ŷ‖;
# tf32x3 leaves O(2^-20) terms plus float32 accumulation over m ≤ 256 (≤ 256·2^-24 = 2^-16);
# bf16x3 (bf16 rounding: 2^-9 a part) leaves ~3·2^-18 relative terms plus the same accumulation.
TF32_DIST_ERROR = 2.0 ** -8
TF32X3_DIST_ERROR = 2.0 ** -15
BF16X3_DIST_ERROR = 2.0 ** -14


@triton.jit
def _row_dot(table_ptr, a, b, m, ok, M_P2: tl.constexpr, BKM: tl.constexpr):
    """(ê_a·ê_b, ‖ê_a‖², ‖ê_b‖²) for rows a, b (R,) in float32."""
    dot = tl.zeros(a.shape, tl.float32)
    sa = tl.zeros(a.shape, tl.float32)
    sb = tl.zeros(a.shape, tl.float32)
    for k0 in tl.static_range(0, M_P2, BKM):
        dk = k0 + tl.arange(0, BKM)[None, :]
        msk = ok[:, None] & (dk < m)
        ea = tl.load(table_ptr + a[:, None] * m + dk, mask=msk, other=0.0).to(tl.float32)
        eb = tl.load(table_ptr + b[:, None] * m + dk, mask=msk, other=0.0).to(tl.float32)
        dot += tl.sum(ea * eb, 1)
        sa += tl.sum(ea * ea, 1)
        sb += tl.sum(eb * eb, 1)
    return dot, sa, sb


@triton.jit
def _token_state(table_ptr, y, z0, m, ok, POWER: tl.constexpr, RATES: tl.constexpr,
                 M_P2: tl.constexpr, BKM: tl.constexpr):
    """‖ŷ‖² and d0 = d(z0, y) (power applied) for R tokens."""
    dot0, sq0, sq_y = _row_dot(table_ptr, z0, y, m, ok, M_P2, BKM)
    d0 = tl.zeros(sq_y.shape, tl.float32)
    if RATES:
        d0 = tl.maximum(sq0 + sq_y - 2.0 * dot0, 0.0)
        d0 = tl.where(z0 == y, 0.0, d0)
        if POWER == 4:
            d0 = d0 * d0
    return sq_y, d0


@triton.jit
def _weights(d, codes, y, z0, d0, nb, cok, POWER: tl.constexpr, RATES: tl.constexpr):
    """(g, w) from clamped distances d (R, N) to codes (1 or R, N), with the exact rules
    d(y, y) = 0 and w(z0) = 0 (used where one code tile decides the draw)."""
    d = tl.where(codes == y[:, None], 0.0, d)
    if POWER == 4:
        d = d * d
    g = tl.where(cok, tl.exp2(d * (nb * LOG2E)[:, None]), 0.0)
    if RATES:
        w = g * tl.maximum(d0[:, None] - d, 0.0)
        w = tl.where(codes == z0[:, None], 0.0, w)
    else:
        w = g
    return g, w


@triton.jit
def table_pass_kernel(table_ptr, sqc_ptr, y_ptr, z0_ptr, list_ptr, count_ptr, beta_ptr, params_ptr, ts_ptr,
                      zp_ptr, D, K, m, NT, SPLITS,
                      TPS: tl.constexpr, RATES: tl.constexpr, POWER: tl.constexpr, BM: tl.constexpr,
                      BN: tl.constexpr, M_P2: tl.constexpr, BKM: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Per-tile Σ w and per-split Σ g for a block of BM tokens over TPS code tiles.

    RATES (step): tokens are ``list[0 : count]``, y = x̂1, z0 = x, β from params.
    Else (path sample): tokens 0..D−1, y = x1, β per token (∞ rows are skipped later).
    ``sqc`` holds ‖ê_c‖² (K,). The tile sums only choose a tile: d(y, y) and w(z0) are left to
    the arithmetic here (a few ulp from 0) and made exact by the finish, inside the chosen tile.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    if RATES:
        n = tl.load(count_ptr)
    else:
        n = D
    if pid_m * BM < n:
        slots = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
        sok = slots < n
        if RATES:
            tok = tl.load(list_ptr + slots, mask=sok, other=0)
            z0 = tl.load(z0_ptr + tok, mask=sok, other=0)
            nb = tl.zeros([BM], tl.float32) - tl.load(params_ptr + 1)
        else:
            tok = slots
            beta = tl.load(beta_ptr + tok, mask=sok, other=0.0).to(tl.float32)
            nb = tl.where(beta < float("inf"), -beta, 0.0)
        # ids outside [0, K) (unvalidated input) must not address outside the table
        y = tl.minimum(tl.maximum(tl.load(y_ptr + tok, mask=sok, other=0), 0), K - 1)
        if RATES:
            z0 = tl.minimum(tl.maximum(z0, 0), K - 1)
        else:
            z0 = y
        sq_y, d0 = _token_state(table_ptr, y, z0, m, sok, POWER, RATES, M_P2, BKM)
        nb2 = (nb * LOG2E)[:, None]
        acc_z = tl.zeros([BM], tl.float32)
        t0 = pid_s * TPS
        for i in range(0, TPS):
            t = t0 + i
            codes = t * BN + tl.arange(0, BN)
            cok = codes < K
            dot = tl.zeros([BM, BN], tl.float32)
            for k0 in range(0, M_P2, BKM):  # scf.for: the pipeliner keeps BKM-slices in flight
                dk = k0 + tl.arange(0, BKM)
                a = tl.load(table_ptr + y[:, None] * m + dk[None, :], mask=sok[:, None] & (dk < m)[None, :],
                            other=0.0)
                b = tl.load(table_ptr + codes[:, None].to(tl.int64) * m + dk[None, :],
                            mask=cok[:, None] & (dk < m)[None, :], other=0.0)
                dot = tl.dot(a, tl.trans(b), dot, input_precision=DOT_PRECISION)
            sq_c = tl.load(sqc_ptr + codes, mask=cok, other=0.0)
            d = tl.maximum((sq_c[None, :] + sq_y[:, None]) - 2.0 * dot, 0.0)
            if POWER == 4:
                d = d * d
            g = tl.exp2(d * nb2 + tl.where(cok, 0.0, float("-inf"))[None, :])
            acc_z += tl.sum(g, 1)
            if RATES:
                w = g * tl.maximum(d0[:, None] - d, 0.0)
            else:
                w = g
            tl.store(ts_ptr + slots * NT + t, tl.sum(w, 1), mask=sok & (t < NT))
        if RATES:
            tl.store(zp_ptr + slots * SPLITS + pid_s, acc_z, mask=sok)


@triton.jit
def table_finish_kernel(table_ptr, x_ptr, y_ptr, out_ptr, list_ptr, count_ptr, beta_ptr, params_ptr,
                        step_ptr, seeds_ptr, ts_ptr, zp_ptr, row_len, index_offset, D, K, m, NT, SPLITS,
                        RATES: tl.constexpr, POWER: tl.constexpr, R: tl.constexpr, NT_P2: tl.constexpr,
                        SP_P2: tl.constexpr, BN: tl.constexpr, M_P2: tl.constexpr, BKM: tl.constexpr):
    """Jump decision (RATES) and the destination / path sample from the tile sums.

    RNG (§2.5): step: TAG_STEP, lane 1 jump, lane 2 destination; path: TAG_PATH, lane 0; token
    ``i`` has index ``i % row_len + index_offset``.
    Step: writes only the tokens that jump (``out`` already holds x). Path: writes every token.
    """
    if RATES:
        n = tl.load(count_ptr)
    else:
        n = D
    if tl.program_id(0) * R < n:
        slots = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
        sok = slots < n
        tix = tl.arange(0, NT_P2)[None, :]
        ts = tl.load(ts_ptr + slots[:, None] * NT + tix, mask=sok[:, None] & (tix < NT), other=0.0)
        cs = tl.cumsum(ts, 1)
        total = tl.max(cs, 1)
        if RATES:
            tok = tl.load(list_ptr + slots, mask=sok, other=0)
            wd = token_words(seeds_ptr, row_len, tok, sok, tl.load(step_ptr), TAG_STEP, index_offset)
            w1 = wd[1]
            w2 = wd[2]
            six = tl.arange(0, SP_P2)[None, :]
            z = tl.sum(tl.load(zp_ptr + slots[:, None] * SPLITS + six, mask=sok[:, None] & (six < SPLITS),
                               other=0.0), 1)
            h = tl.load(params_ptr + 0)
            beta_dot = tl.load(params_ptr + 2)
            lam = beta_dot * total / tl.where(sok, z, 1.0)
            act = sok & (to_uniform(w1) < neg_expm1(h * lam)) & (lam > 0)
            target = to_uniform(w2) * total
            nb = tl.zeros([R], tl.float32) - tl.load(params_ptr + 1)
        else:
            tok = slots
            w0 = token_words(seeds_ptr, row_len, tok, sok, 0, TAG_PATH, index_offset)[0]
            beta = tl.load(beta_ptr + tok, mask=sok, other=0.0).to(tl.float32)
            act = sok & (beta < float("inf"))
            target = to_uniform(w0) * total
            nb = tl.where(act, -beta, 0.0)
        y = tl.load(y_ptr + tok, mask=sok, other=0)
        new = y
        if RATES:
            new = tl.load(x_ptr + tok, mask=sok, other=0)
        if tl.max(act.to(tl.int32), 0) > 0:
            y = tl.minimum(tl.maximum(y, 0), K - 1)  # unvalidated ids never address outside the table
            z0 = y
            if RATES:
                z0 = tl.minimum(tl.maximum(new, 0), K - 1)
            sq_y, d0 = _token_state(table_ptr, y, z0, m, act, POWER, RATES, M_P2, BKM)
            tile, prefix = crossing(cs, ts, target, tix)
            codes = tile[:, None] * BN + tl.arange(0, BN)[None, :]
            cok = act[:, None] & (codes < K)
            dot = tl.zeros([R, BN], tl.float32)
            sq_c = tl.zeros([R, BN], tl.float32)
            for k0 in tl.static_range(0, M_P2, BKM):
                dk = k0 + tl.arange(0, BKM)[None, None, :]
                e = tl.load(table_ptr + codes[:, :, None].to(tl.int64) * m + dk,
                            mask=cok[:, :, None] & (dk < m), other=0.0).to(tl.float32)
                ey = tl.load(table_ptr + y[:, None, None] * m + dk, mask=act[:, None, None] & (dk < m),
                             other=0.0).to(tl.float32)
                dot += tl.sum(e * ey, 2)
                sq_c += tl.sum(e * e, 2)
            d = tl.maximum((sq_c + sq_y[:, None]) - 2.0 * dot, 0.0)
            w = _weights(d, codes, y, z0, d0, nb, cok, POWER, RATES)[1]
            j = crossing(tl.cumsum(w, 1), w, target - prefix, tl.arange(0, BN)[None, :])[0]
            new = tl.where(act, tile.to(tl.int64) * BN + j, new)
        if RATES:
            tl.store(out_ptr + tok, new, mask=act)
        else:
            tl.store(out_ptr + tok, new, mask=sok)
