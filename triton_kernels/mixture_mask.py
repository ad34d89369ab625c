"""Uniform-mixture and masked paths (DESIGN §2.3, §2.4): path sampling and fused Euler steps.

Steps decide first who changes (lane 1), then read logits only for those tokens:

* mixture: a token jumps to x̂1 with probability ``1 − exp(−h·κ̇/(1−κ))`` (every token on the
  last step);
* mask: a masked token unmasks to x̂1 with probability ``min(1, h·κ̇/(1−κ))`` (every masked
  token on the last step); x̂1 never is the mask id; unmasked tokens stay.

A program none of whose tokens changes reads no logits at all. Occupancy claims (compile
report, sm_90a): steps ≥ 2 blocks of 8 warps an SM; path sample ≥ 4 blocks. RNG (§2.5): steps TAG_STEP
(lane 0 x̂1, lane 1 jump / unmask); path sampling TAG_PATH, step 0 (lane 1 keep, lane 2 the
uniform code of the mixture path); token ``i`` has index ``i % row_len + index_offset``.

Steps: HAS_X1 reads x̂1 from ``x1`` (drawn elsewhere) and no logits at all. HAS_ERROR ORs the
bits of :mod:`ursa_engine.triton_kernels.errors` into ``error`` for what the kernel reads: the logits of
the tokens that change only (the others are never read, so never checked), x and a given x1
(every token; ids outside [0, K) are only compared, never used as addresses).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .categorical import draw_rows_split_checked, neg_expm1
from .errors import ERR_X1_RANGE, ERR_X_RANGE, id_bits, report
from .philox import TAG_PATH, TAG_STEP, to_below, to_uniform, token_words


@triton.jit
def uniform_path_sample_kernel(x1_ptr, keep_ptr, out_ptr, seeds_ptr, row_len, index_offset, D, K, mask_id,
                               MASK: tl.constexpr, BLOCK: tl.constexpr):
    """x_t = x1 with probability κ_i (lane 1), else uniform over [0, K) (lane 2) or the mask id."""
    tok = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = tok < D
    w0, w1, w2, w3 = token_words(seeds_ptr, row_len, tok, ok, 0, TAG_PATH, index_offset)
    x1 = tl.load(x1_ptr + tok, mask=ok, other=0)
    keep = tl.load(keep_ptr + tok, mask=ok, other=1.0).to(tl.float32)
    if MASK:
        noise = tl.zeros([BLOCK], tl.int64) + mask_id
    else:
        noise = to_below(w2, K)
    tl.store(out_ptr + tok, tl.where(to_uniform(w1) < keep, x1, noise), mask=ok)


@triton.jit
def uniform_step_kernel(cond_ptr, uncond_ptr, x_ptr, x1_ptr, out_ptr, params_ptr, step_ptr, seeds_ptr, error_ptr,
                        row_len, index_offset, D, K, stride_c, stride_u, gs, zs, mask_id,
                        MASK: tl.constexpr, HAS_UNCOND: tl.constexpr, HAS_X1: tl.constexpr,
                        HAS_ERROR: tl.constexpr, LAST: tl.constexpr, ARGMAX: tl.constexpr, ROWS: tl.constexpr,
                        DRAW_ROWS: tl.constexpr, CHUNKS: tl.constexpr, W: tl.constexpr, NW: tl.constexpr,
                        CW_P2: tl.constexpr, STAGES: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    ok = rows < D
    w0, w1, w2, w3 = token_words(seeds_ptr, row_len, rows, ok, tl.load(step_ptr), TAG_STEP, index_offset)
    x = tl.load(x_ptr + rows, mask=ok, other=0)
    if MASK:
        act = ok & (x == mask_id)
    else:
        act = ok
    if not LAST:
        hr = tl.load(params_ptr + 0) * tl.load(params_ptr + 3)  # h·κ̇/(1−κ)
        if MASK:
            act = act & (to_uniform(w1) < hr)  # u < min(1, hr) since u < 1; NaN never unmasks
        else:
            act = act & (to_uniform(w1) < neg_expm1(hr))
    new = x
    bits = tl.zeros([ROWS], tl.int32)
    if HAS_ERROR:
        bits = id_bits(x, ok, K, ERR_X_RANGE)
    if HAS_X1:
        x1 = tl.load(x1_ptr + rows, mask=ok, other=0)
        if HAS_ERROR:
            bits = bits | id_bits(x1, ok, K, ERR_X1_RANGE)
        new = tl.where(act, x1, x)
    elif tl.max(act.to(tl.int32), 0) > 0:
        x1, draw_bits = draw_rows_split_checked(cond_ptr, uncond_ptr, stride_c, stride_u, rows, act, K,
                                                to_uniform(w0), gs, zs, mask_id, HAS_UNCOND, MASK, ARGMAX, ROWS,
                                                DRAW_ROWS, CHUNKS, W, NW, CW_P2, STAGES, HAS_ERROR)
        new = tl.where(act, x1, x)
        bits = bits | draw_bits
    if HAS_ERROR:
        report(error_ptr, bits)
    tl.store(out_ptr + rows, new, mask=ok)
