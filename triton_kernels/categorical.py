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
def load_z(cond_ptr, uncond_ptr, stride_c, stride_u, rows, mask, cols, gs, exclude,
           HAS_UNCOND: tl.constexpr, HAS_EXCLUDE: tl.constexpr):
    """Guided logits ``u + s·(c − u)`` (temperature not applied); -inf where masked.

    rows: int64 offsets broadcastable against cols (code indices) and mask.
    """
    c = tl.load(cond_ptr + rows * stride_c + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_UNCOND:
        u = tl.load(uncond_ptr + rows * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        c = tl.where(c == u, c, u + gs * (c - u))  # c == u (e.g. both -inf) stays: no NaN
    valid = mask
    if HAS_EXCLUDE:
        valid = valid & (cols != exclude)
    return tl.where(valid, c, float("-inf"))


@triton.jit
def draw_rows(cond_ptr, uncond_ptr, stride_c, stride_u, rows, active, K, u0, gs, zs, exclude,
              HAS_UNCOND: tl.constexpr, HAS_EXCLUDE: tl.constexpr, ARGMAX: tl.constexpr,
              ROWS: tl.constexpr, CHUNKS: tl.constexpr, W: tl.constexpr, NW: tl.constexpr,
              CW_P2: tl.constexpr, STAGES: tl.constexpr):
    """x̂1 (int64, (ROWS,)) for the ``active`` rows; inactive rows read nothing.

    ARGMAX: the first index of the largest z (torch.argmax), else the inverse-CDF draw with u0.
    ``zs = log2(e)/T`` (T > 0, so it commutes with the max). CHUNKS·NW·W ≥ K, CW_P2 ≥ NW·W.
    """
    CW: tl.constexpr = NW * W
    r3 = rows[:, None, None]
    a3 = active[:, None, None]
    start = tl.arange(0, CHUNKS)[None, :, None] * CW
    wo = tl.arange(0, W)[None, None, :]
    if ARGMAX:
        best = tl.full([ROWS, CHUNKS], float("-inf"), tl.float32)
        arg = tl.zeros([ROWS, CHUNKS], tl.int32)
        for j in tl.range(0, NW, num_stages=STAGES):
            cols = start + j * W + wo
            z = load_z(cond_ptr, uncond_ptr, stride_c, stride_u, r3, a3 & (cols < K), cols, gs, exclude,
                       HAS_UNCOND, HAS_EXCLUDE)
            bm = tl.max(z, 2)
            bi = tl.argmax(z, 2).to(tl.int32) + j * W
            upd = bm > best  # strict: an earlier code keeps a tie (first index, like torch)
            best = tl.where(upd, bm, best)
            arg = tl.where(upd, bi, arg)
        top = tl.max(best, 1)
        idx = tl.arange(0, CHUNKS)[None, :] * CW + arg
        return tl.min(tl.where(best == top[:, None], idx, 2147483647), 1).to(tl.int64)

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
    mx = tl.maximum(tl.max(m, 1) * zs, NEG_BIG)
    sc = s * tl.exp2(m * zs - mx[:, None])  # chunk masses on one scale
    cs = tl.cumsum(sc, 1)
    target = u0 * tl.max(cs, 1)
    chunk, prefix = crossing(cs, sc, target, tl.arange(0, CHUNKS)[None, :])
    # read the crossing chunk again and place the draw inside it
    off = tl.arange(0, CW_P2)[None, :]
    cols = chunk[:, None] * CW + off
    z = load_z(cond_ptr, uncond_ptr, stride_c, stride_u, rows[:, None], active[:, None] & (cols < K) & (off < CW),
               cols, gs, exclude, HAS_UNCOND, HAS_EXCLUDE)
    e = tl.exp2(z * zs - mx[:, None])
    j = crossing(tl.cumsum(e, 1), e, target - prefix, off)[0]
    return (chunk * CW + j).to(tl.int64)


@triton.jit
def draw_rows_split(cond_ptr, uncond_ptr, stride_c, stride_u, rows, active, K, u0, gs, zs, exclude,
                    HAS_UNCOND: tl.constexpr, HAS_EXCLUDE: tl.constexpr, ARGMAX: tl.constexpr,
                    ROWS: tl.constexpr, DRAW_ROWS: tl.constexpr, CHUNKS: tl.constexpr, W: tl.constexpr,
                    NW: tl.constexpr, CW_P2: tl.constexpr, STAGES: tl.constexpr):
    """:func:`draw_rows` over ROWS tokens, DRAW_ROWS (ROWS or 1) at a time.

    One row at a time keeps the streaming loop's registers low (more programs per SM, more
    bytes in flight) while the kernel's later phase still works on all ROWS tokens at once.
    """
    if DRAW_ROWS == ROWS:
        x1 = draw_rows(cond_ptr, uncond_ptr, stride_c, stride_u, rows, active, K, u0, gs, zs, exclude,
                       HAS_UNCOND, HAS_EXCLUDE, ARGMAX, ROWS, CHUNKS, W, NW, CW_P2, STAGES)
    else:
        ridx = tl.arange(0, ROWS)
        shape1 = tl.arange(0, 1)  # (1,) zeros: scalars back to 1-row tensors
        x1 = tl.zeros([ROWS], tl.int64)
        for i in range(0, ROWS):
            pick = ridx == i
            row_i = tl.sum(tl.where(pick, rows, 0), 0) + shape1
            act_i = tl.sum(tl.where(pick, active.to(tl.int32), 0), 0) + shape1 > 0
            u_i = tl.sum(tl.where(pick, u0, 0.0), 0) + shape1.to(tl.float32)
            if tl.sum(act_i.to(tl.int32), 0) > 0:
                xi = draw_rows(cond_ptr, uncond_ptr, stride_c, stride_u, row_i, act_i, K, u_i, gs, zs, exclude,
                               HAS_UNCOND, HAS_EXCLUDE, ARGMAX, 1, CHUNKS, W, NW, CW_P2, STAGES)
                x1 = tl.where(pick, tl.sum(xi, 0), x1)
    return x1


@triton.jit
def draw_kernel(cond_ptr, uncond_ptr, x_ptr, out_ptr, x1_ptr, list_ptr, count_ptr, step_ptr, seeds_ptr,
                row_len, row0, D, K, stride_c, stride_u, gs, zs,
                HAS_UNCOND: tl.constexpr, LAST: tl.constexpr, ARGMAX: tl.constexpr,
                ROWS: tl.constexpr, DRAW_ROWS: tl.constexpr, CHUNKS: tl.constexpr, W: tl.constexpr,
                NW: tl.constexpr, CW_P2: tl.constexpr, STAGES: tl.constexpr):
    """Phase 1 of the table metric step: x̂1 for every token (RNG: TAG_STEP, lane 0).

    LAST: ``out = x̂1``. Otherwise ``out = x``, ``x1 = x̂1`` and the tokens with ``x̂1 ≠ x``
    are appended to ``list`` (``count`` += their number; order across programs is arbitrary
    and harmless: every later result depends only on the token, never on its slot).
    Tokens ``row0 .. D−1`` (a group of the launcher's pipeline; ids in ``list`` are global).
    """
    rows = row0 + tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    ok = rows < D
    w0 = token_words(seeds_ptr, row_len, rows, ok, tl.load(step_ptr), TAG_STEP)[0]
    x1 = draw_rows_split(cond_ptr, uncond_ptr, stride_c, stride_u, rows, ok, K, to_uniform(w0), gs, zs, 0,
                         HAS_UNCOND, False, ARGMAX, ROWS, DRAW_ROWS, CHUNKS, W, NW, CW_P2, STAGES)
    if LAST:
        tl.store(out_ptr + rows, x1, mask=ok)
    else:
        x = tl.load(x_ptr + rows, mask=ok, other=0)
        tl.store(out_ptr + rows, x, mask=ok)
        tl.store(x1_ptr + rows, x1, mask=ok)
        moving = ok & (x1 != x)
        mv = moving.to(tl.int32)
        n = tl.sum(mv, 0)
        if n > 0:
            base = tl.atomic_add(count_ptr, n)
            slot = base + tl.cumsum(mv, 0) - 1
            tl.store(list_ptr + slot, rows, mask=moving)

