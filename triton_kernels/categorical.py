"""Streaming inverse-CDF draws over logits rows: the x̂1 draw of every sampler step (DESIGN §2.4).

``x̂1 ~ softmax(z)`` with ``z = (u + s·(c − u)) / T`` (guidance, then temperature), drawn by the
inverse CDF of §2.5 with the lane-0 uniform ``u0``: the smallest ``j`` with
``Σ_{i≤j} exp(z_i − M) > u0·W``.

One pass reads the conditional and unconditional logits once. A row is cut into CHUNKS
contiguous chunks of CW = NW·W codes; iteration ``j`` reads codes ``[j·W, (j+1)·W)`` of every
chunk (W = 16 bf16 = one 32-byte sector per chunk), and each chunk keeps an online
(max, Σ exp) pair in registers. The threads of a chunk own it for the whole pass, so the loop
needs no cross-thread reduction at all; nothing of size D×K is written. After the pass the
CHUNKS pairs give the crossing chunk (one scan), and only that chunk (CW codes, typically
from L2) is read again to place the draw inside it.

All math is float32, exponentials in base 2. Sums are taken in a different order than the
float64 reference, so a draw can differ when ``u0·W`` lies within rounding of a CDF boundary:
the "rare ties" of §2.5.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .errors import ERR_X1_RANGE, ERR_X_RANGE, F_UNCOND, id_bits, logit_bits, report, value_codes
from .philox import TAG_STEP, to_uniform, token_words

LOG2E = tl.constexpr(1.4426950408889634)
NEG_BIG = tl.constexpr(-3.0e38)  # finite stand-in for -inf in max subtraction (no inf - inf)


@triton.jit
def neg_expm1(x):
    """``1 − exp(−x)`` for x ≥ 0, accurate for small x (series below 0.01); NaN stays NaN."""
    series = x * (1.0 - x * (0.5 - x * (1.0 / 6.0)))
    return tl.where(x < 0.01, series, 1.0 - tl.exp(-x))


@triton.jit
def crossing(cs, w, target, idx):
    """Inverse-CDF position along axis 1 of a (R, N) tile.

    cs = cumsum(w) (non-decreasing), target (R,), idx (1, N) positions. Returns the smallest
    position with ``cs > target`` (clamped to the last position with positive weight, which a
    rounding edge could step past) and the cumulative weight before it.
    """
    pos = tl.sum((cs <= target[:, None]).to(tl.int32), 1)
    last = tl.max(tl.where(w > 0, idx, -1), 1)
    pos = tl.maximum(tl.minimum(pos, last), 0)
    prefix = tl.max(tl.where(idx < pos[:, None], cs, 0.0), 1)
    return pos, prefix


@triton.jit
def load_z_codes(cond_ptr, uncond_ptr, stride_c, stride_u, rows, mask, cols, gs, exclude,
                 HAS_UNCOND: tl.constexpr, HAS_EXCLUDE: tl.constexpr, CHECK: tl.constexpr):
    """Guided logits ``u + s·(c − u)`` (temperature not applied), -inf where masked, and (CHECK)
    the error field codes of the raw values read (:func:`triton_kernels.errors.value_codes`; else 0).

    rows: int64 offsets broadcastable against cols (code indices) and mask.
    """
    c = tl.load(cond_ptr + rows * stride_c + cols, mask=mask, other=0.0).to(tl.float32)
    codes = 0
    if CHECK:
        codes = value_codes(c, mask, 0)
    if HAS_UNCOND:
        u = tl.load(uncond_ptr + rows * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        if CHECK:
            codes = codes + value_codes(u, mask, F_UNCOND)
        c = tl.where(c == u, c, u + gs * (c - u))  # c == u (e.g. both -inf) stays: no NaN
    valid = mask
    if HAS_EXCLUDE:
        valid = valid & (cols != exclude)
    return tl.where(valid, c, float("-inf")), codes


@triton.jit
def load_z(cond_ptr, uncond_ptr, stride_c, stride_u, rows, mask, cols, gs, exclude,
           HAS_UNCOND: tl.constexpr, HAS_EXCLUDE: tl.constexpr):
    """Guided logits ``u + s·(c − u)`` (temperature not applied); -inf where masked.

    rows: int64 offsets broadcastable against cols (code indices) and mask.
    """
    return load_z_codes(cond_ptr, uncond_ptr, stride_c, stride_u, rows, mask, cols, gs, exclude, HAS_UNCOND,
                        HAS_EXCLUDE, False)[0]


@triton.jit
def check_rows(cond_ptr, uncond_ptr, stride_c, stride_u, rows, active, K,
               HAS_UNCOND: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, SPAN: tl.constexpr):
    """Error bits (int32 (ROWS,)) of the raw logits of the ``active`` rows: NaN, +inf, a row all
    −inf, cond and uncond apart (:mod:`ursa_engine.triton_kernels.errors`). Reads those rows once, BLOCK
    codes at a time (a narrow tile: this path is rare and must not raise the kernel's registers),
    over SPAN ≥ K codes (a constexpr bound: the interpreter's loops need one)."""
    cols = tl.arange(0, BLOCK)[None, :]
    r2 = rows[:, None]
    a2 = active[:, None]
    acc = tl.zeros([ROWS, BLOCK], tl.int32)  # elementwise OR of the field codes
    c_row = cond_ptr + r2 * stride_c
    u_row = uncond_ptr + r2 * stride_u
    for k0 in tl.range(0, SPAN, BLOCK, num_stages=1):
        ok = a2 & (k0 + cols < K)
        acc = acc | value_codes(tl.load(c_row + k0 + cols, mask=ok, other=0.0).to(tl.float32), ok, 0)
        if HAS_UNCOND:
            acc = acc | value_codes(tl.load(u_row + k0 + cols, mask=ok, other=0.0).to(tl.float32), ok, F_UNCOND)
    return logit_bits(acc, active, HAS_UNCOND)


@triton.jit
def draw_rows_checked(cond_ptr, uncond_ptr, stride_c, stride_u, rows, active, K, u0, gs, zs, exclude,
                      HAS_UNCOND: tl.constexpr, HAS_EXCLUDE: tl.constexpr, ARGMAX: tl.constexpr,
                      ROWS: tl.constexpr, CHUNKS: tl.constexpr, W: tl.constexpr, NW: tl.constexpr,
                      CW_P2: tl.constexpr, STAGES: tl.constexpr, CHECK: tl.constexpr):
    """x̂1 (int64, (ROWS,)) for the ``active`` rows, and their error bits (int32, (ROWS,)).

    Inactive rows read nothing. ARGMAX: the first index of the largest z (torch.argmax), else
    the inverse-CDF draw with u0. ``zs = log2(e)/T`` (T > 0, so it commutes with the max).
    CHUNKS·NW·W ≥ K, CW_P2 ≥ NW·W.

    CHECK (bits are 0 without it): every logit of an active row is checked (NaN, +inf, a row all
    −inf; cond and uncond apart), at no cost in the streaming loop for valid logits. A bad raw
    value always leaves a trace in the draw's own statistics: a NaN chunk sum, a +inf chunk
    max, or a row max of −inf (guidance with s ≥ 0 maps NaN / +inf / all −inf of c or u to one
    of those; s < 0 can hide a +inf of c as z = −inf, so it suspects every row; the masked
    path's excluded code never enters z and is loaded apart). Only suspect
    rows are read again, by :func:`check_rows`, for the exact bits; false suspects (z·log2e/T
    overflowing, every drawable code −inf but the masked path's excluded one) just cost that
    read. ARGMAX (whose max hides NaN) checks inside its loop.
    """
    CW: tl.constexpr = NW * W
    r3 = rows[:, None, None]
    a3 = active[:, None, None]
    start = tl.arange(0, CHUNKS)[None, :, None] * CW
    wo = tl.arange(0, W)[None, None, :]
    bits = tl.zeros([ROWS], tl.int32)
    if ARGMAX:
        tl.static_assert(W < 32, "error field codes count at most 31 elements of a slice")
        acc = tl.zeros([ROWS, CHUNKS], tl.int32)  # OR of the slices' field-code sums (CHECK)
        best = tl.full([ROWS, CHUNKS], float("-inf"), tl.float32)
        arg = tl.zeros([ROWS, CHUNKS], tl.int32)
        for j in tl.range(0, NW, num_stages=STAGES):
            cols = start + j * W + wo
            z, codes = load_z_codes(cond_ptr, uncond_ptr, stride_c, stride_u, r3, a3 & (cols < K), cols, gs,
                                    exclude, HAS_UNCOND, HAS_EXCLUDE, CHECK)
            if CHECK:
                acc = acc | tl.sum(codes, 2)
            bm = tl.max(z, 2)
            bi = tl.argmax(z, 2).to(tl.int32) + j * W
            upd = bm > best  # strict: an earlier code keeps a tie (first index, like torch)
            best = tl.where(upd, bm, best)
            arg = tl.where(upd, bi, arg)
        top = tl.max(best, 1)
        idx = tl.arange(0, CHUNKS)[None, :] * CW + arg
        x1 = tl.min(tl.where(best == top[:, None], idx, 2147483647), 1).to(tl.int64)
        if CHECK:
            bits = logit_bits(acc, active, HAS_UNCOND)
    else:
        m = tl.full([ROWS, CHUNKS], float("-inf"), tl.float32)  # running max of the raw z per chunk
        s = tl.zeros([ROWS, CHUNKS], tl.float32)  # Σ exp2((z − m)·zs) per chunk
        for j in tl.range(0, NW, num_stages=STAGES):  # cp.async pipelining: W-slices in flight
            cols = start + j * W + wo
            z = load_z(cond_ptr, uncond_ptr, stride_c, stride_u, r3, a3 & (cols < K), cols, gs, exclude,
                       HAS_UNCOND, HAS_EXCLUDE)
            mn = tl.maximum(m, tl.max(z, 2))
            ms = tl.maximum(mn * zs, NEG_BIG)  # finite: no inf − inf
            s = s * tl.exp2(m * zs - ms) + tl.sum(tl.exp2(z * zs - ms[:, :, None]), 2)
            m = mn
        if CHECK:
            s_row = tl.sum(s, 1)  # NaN iff a chunk sum is NaN (a NaN z; or a NaN running max)
            m_row = tl.max(m, 1)
            sus = active & ((s_row != s_row) | (m_row == float("inf")) | (m_row == float("-inf")))
            if HAS_UNCOND:
                sus = sus | (active & (gs < 0))
            if HAS_EXCLUDE:  # the excluded code never enters z: look at its raw values
                ce = tl.load(cond_ptr + rows * stride_c + exclude, mask=active, other=0.0).to(tl.float32)
                sus = sus | (active & ((ce != ce) | (ce == float("inf"))))
                if HAS_UNCOND:
                    ue = tl.load(uncond_ptr + rows * stride_u + exclude, mask=active, other=0.0).to(tl.float32)
                    sus = sus | (active & ((ue != ue) | (ue == float("inf"))))
        mx = tl.maximum(tl.max(m, 1) * zs, NEG_BIG)
        sc = s * tl.exp2(m * zs - mx[:, None])  # chunk masses on one scale
        cs = tl.cumsum(sc, 1)
        target = u0 * tl.max(cs, 1)
        chunk, prefix = crossing(cs, sc, target, tl.arange(0, CHUNKS)[None, :])
        # read the crossing chunk again and place the draw inside it (chunk ≤ CHUNKS − 1: in bounds
        # whatever the weights, NaN included)
        off = tl.arange(0, CW_P2)[None, :]
        cols = chunk[:, None] * CW + off
        z = load_z(cond_ptr, uncond_ptr, stride_c, stride_u, rows[:, None], active[:, None] & (cols < K) & (off < CW),
                   cols, gs, exclude, HAS_UNCOND, HAS_EXCLUDE)
        e = tl.exp2(z * zs - mx[:, None])
        j = crossing(tl.cumsum(e, 1), e, target - prefix, off)[0]
        x1 = (chunk * CW + j).to(tl.int64)
        if CHECK:
            if tl.max(sus.to(tl.int32), 0) > 0:
                bits = check_rows(cond_ptr, uncond_ptr, stride_c, stride_u, rows, sus, K, HAS_UNCOND, ROWS, CHUNKS,
                                  CHUNKS * CW)
    return x1, bits


@triton.jit
def draw_rows(cond_ptr, uncond_ptr, stride_c, stride_u, rows, active, K, u0, gs, zs, exclude,
              HAS_UNCOND: tl.constexpr, HAS_EXCLUDE: tl.constexpr, ARGMAX: tl.constexpr,
              ROWS: tl.constexpr, CHUNKS: tl.constexpr, W: tl.constexpr, NW: tl.constexpr,
              CW_P2: tl.constexpr, STAGES: tl.constexpr):
    """x̂1 (int64, (ROWS,)) for the ``active`` rows: :func:`draw_rows_checked` without checks."""
    return draw_rows_checked(cond_ptr, uncond_ptr, stride_c, stride_u, rows, active, K, u0, gs, zs, exclude,
                             HAS_UNCOND, HAS_EXCLUDE, ARGMAX, ROWS, CHUNKS, W, NW, CW_P2, STAGES, False)[0]


@triton.jit
def draw_rows_split_checked(cond_ptr, uncond_ptr, stride_c, stride_u, rows, active, K, u0, gs, zs, exclude,
                            HAS_UNCOND: tl.constexpr, HAS_EXCLUDE: tl.constexpr, ARGMAX: tl.constexpr,
                            ROWS: tl.constexpr, DRAW_ROWS: tl.constexpr, CHUNKS: tl.constexpr, W: tl.constexpr,
                            NW: tl.constexpr, CW_P2: tl.constexpr, STAGES: tl.constexpr, CHECK: tl.constexpr):
    """:func:`draw_rows_checked` over ROWS tokens, DRAW_ROWS (ROWS or 1) at a time: (x̂1, bits).

    One row at a time keeps the streaming loop's registers low (more programs per SM, more
    bytes in flight) while the kernel's later phase still works on all ROWS tokens at once.
    """
    if DRAW_ROWS == ROWS:
        x1, bits = draw_rows_checked(cond_ptr, uncond_ptr, stride_c, stride_u, rows, active, K, u0, gs, zs, exclude,
                                     HAS_UNCOND, HAS_EXCLUDE, ARGMAX, ROWS, CHUNKS, W, NW, CW_P2, STAGES, CHECK)
    else:
        ridx = tl.arange(0, ROWS)
        shape1 = tl.arange(0, 1)  # (1,) zeros: scalars back to 1-row tensors
        x1 = tl.zeros([ROWS], tl.int64)
        bits = tl.zeros([ROWS], tl.int32)
        for i in range(0, ROWS):
            pick = ridx == i
            row_i = tl.sum(tl.where(pick, rows, 0), 0) + shape1
            act_i = tl.sum(tl.where(pick, active.to(tl.int32), 0), 0) + shape1 > 0
            u_i = tl.sum(tl.where(pick, u0, 0.0), 0) + shape1.to(tl.float32)
            if tl.sum(act_i.to(tl.int32), 0) > 0:
                xi, bi = draw_rows_checked(cond_ptr, uncond_ptr, stride_c, stride_u, row_i, act_i, K, u_i, gs, zs,
                                           exclude, HAS_UNCOND, HAS_EXCLUDE, ARGMAX, 1, CHUNKS, W, NW, CW_P2, STAGES,
                                           CHECK)
                x1 = tl.where(pick, tl.sum(xi, 0), x1)
                if CHECK:
                    bits = tl.where(pick, tl.sum(bi, 0), bits)
    return x1, bits


@triton.jit
def draw_rows_split(cond_ptr, uncond_ptr, stride_c, stride_u, rows, active, K, u0, gs, zs, exclude,
                    HAS_UNCOND: tl.constexpr, HAS_EXCLUDE: tl.constexpr, ARGMAX: tl.constexpr,
                    ROWS: tl.constexpr, DRAW_ROWS: tl.constexpr, CHUNKS: tl.constexpr, W: tl.constexpr,
                    NW: tl.constexpr, CW_P2: tl.constexpr, STAGES: tl.constexpr):
    """:func:`draw_rows_split_checked` without checks: x̂1 only."""
    return draw_rows_split_checked(cond_ptr, uncond_ptr, stride_c, stride_u, rows, active, K, u0, gs, zs, exclude,
                                   HAS_UNCOND, HAS_EXCLUDE, ARGMAX, ROWS, DRAW_ROWS, CHUNKS, W, NW, CW_P2, STAGES,
                                   False)[0]


@triton.jit
def draw_kernel(cond_ptr, uncond_ptr, x_ptr, out_ptr, x1_ptr, list_ptr, count_ptr, step_ptr, seeds_ptr,
                error_ptr, row_len, index_offset, row0, D, K, stride_c, stride_u, gs, zs,
                HAS_UNCOND: tl.constexpr, HAS_X1: tl.constexpr, HAS_ERROR: tl.constexpr, LAST: tl.constexpr,
                ARGMAX: tl.constexpr, ROWS: tl.constexpr, DRAW_ROWS: tl.constexpr, CHUNKS: tl.constexpr,
                W: tl.constexpr, NW: tl.constexpr, CW_P2: tl.constexpr, STAGES: tl.constexpr):
    """Phase 1 of the table metric step: x̂1 for every token (RNG: TAG_STEP, lane 0).

    LAST: ``out = x̂1``. Otherwise ``out = x``, ``x1 = x̂1`` and the tokens with ``x̂1 ≠ x``
    are appended to ``list`` (``count`` += their number; order across programs is arbitrary
    and harmless: every later result depends only on the token, never on its slot).
    Tokens ``row0 .. D−1`` (a group of the launcher's pipeline; ids in ``list`` are global).
    Occupancy claim (compile report): ≥ 2 blocks of 8 warps an SM (a pure logits stream).
    HAS_X1: x̂1 is read from ``x1`` (drawn elsewhere): no logits are read and ``x1`` is not
    written. Reads the logits of every token (without HAS_X1); HAS_ERROR checks them, x and x1.
    """
    rows = row0 + tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    ok = rows < D
    bits = tl.zeros([ROWS], tl.int32)
    if HAS_X1:
        x1 = tl.load(x1_ptr + rows, mask=ok, other=0)
        if HAS_ERROR:
            bits = id_bits(x1, ok, K, ERR_X1_RANGE)
    else:
        w0 = token_words(seeds_ptr, row_len, rows, ok, tl.load(step_ptr), TAG_STEP, index_offset)[0]
        x1, bits = draw_rows_split_checked(cond_ptr, uncond_ptr, stride_c, stride_u, rows, ok, K, to_uniform(w0), gs,
                                           zs, 0, HAS_UNCOND, False, ARGMAX, ROWS, DRAW_ROWS, CHUNKS, W, NW, CW_P2,
                                           STAGES, HAS_ERROR)
    if HAS_ERROR:
        x = tl.load(x_ptr + rows, mask=ok, other=0)
        report(error_ptr, bits | id_bits(x, ok, K, ERR_X_RANGE))
    if LAST:
        tl.store(out_ptr + rows, x1, mask=ok)
    else:
        x = tl.load(x_ptr + rows, mask=ok, other=0)
        tl.store(out_ptr + rows, x, mask=ok)
        if not HAS_X1:
            tl.store(x1_ptr + rows, x1, mask=ok)
        moving = ok & (x1 != x)
        mv = moving.to(tl.int32)
        n = tl.sum(mv, 0)
        if n > 0:
            base = tl.atomic_add(count_ptr, n)
            slot = base + tl.cumsum(mv, 0) - 1
            tl.store(list_ptr + slot, rows, mask=moving)
