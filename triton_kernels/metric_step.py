"""Fused metric-path Euler step for FSQ codebooks (DESIGN §2.4), one kernel.

Per program, ROWS tokens:

1. x̂1 ~ softmax(z), ``z = (u + s·(c − u))/T``: one streaming pass over the logits
   (:func:`triton_kernels.categorical.draw_rows`), cond and uncond read once.
2. Tokens with x̂1 ≠ x (the only ones that can move) make one pass over the implicit FSQ
   codebook (:mod:`ursa_engine.triton_kernels.fsq`): ``Z = Σ exp(−β d)``, per-chunk ``Σ w`` with
   ``w = exp(−β d)·max(d0 − d, 0)``; ``λ = β̇·Σw/Z``; jump iff ``u1 < 1 − exp(−h λ)``.
   A program whose tokens all have x̂1 = x skips the pass.
3. Jumping tokens: the crossing chunk from the chunk sums, then the code inside that chunk.

On the GPU, ROWS = 4 tokens (2 without guidance) share the codebook pass (its rsqrt per code)
while the logits stream one row at a time (DRAW_ROWS = 1: fewer registers, more programs per
SM); programs in their memory-bound phase overlap with programs in their arithmetic phase.
Occupancy (the claim :mod:`ursa_engine.benchmarks.compile_report` checks for sm_90a): 8 warps
capped at 128 registers (``maxnreg``, :data:`triton_kernels.tiles.LAUNCH`), no spills, so
2 blocks = 16 warps an SM. Uncapped, the guided kernel took 175 registers (1 block an SM: no
overlap) and the unguided one spilled at ROWS = 4 (issue 12).

The new token is written to ``out`` (may be ``x``). Reads ``params`` (h, β, β̇) and the RNG
step from device memory, so a captured CUDA graph replays every step.
RNG (§2.5): TAG_STEP, step = ``step[0]``, index ``i % row_len + index_offset``; lane 0 x̂1,
lane 1 jump, lane 2 destination.

HAS_X1: x̂1 is read from ``x1`` (drawn elsewhere, e.g. by a fused lm_head + draw): no logits
are read, lane 0 is unused, the rest of the step is unchanged (ids clamped to [0, K) for the
arithmetic). HAS_ERROR: ORs into ``error`` the bits of :mod:`ursa_engine.triton_kernels.errors` for what
it reads: the logits of every token (the draw reads them all; checked as
:func:`triton_kernels.categorical.draw_rows_checked` says), x and the given x1.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .categorical import draw_rows_split_checked, neg_expm1
from .errors import ERR_X1_RANGE, ERR_X_RANGE, id_bits, report
from .fsq import fsq_destination, fsq_pass, fsq_token
from .philox import TAG_STEP, to_uniform, token_words


@triton.jit
def metric_step_fsq_kernel(cond_ptr, uncond_ptr, x_ptr, x1_ptr, out_ptr, params_ptr, step_ptr, seeds_ptr, error_ptr,
                           row_len, index_offset, D, K, stride_c, stride_u, gs, zs,
                           LEVELS: tl.constexpr, NLO: tl.constexpr, P_LO: tl.constexpr, LO_P2: tl.constexpr,
                           P_HI: tl.constexpr, CH_P2: tl.constexpr, FW: tl.constexpr, POWER: tl.constexpr,
                           HAS_UNCOND: tl.constexpr, HAS_X1: tl.constexpr, HAS_ERROR: tl.constexpr,
                           LAST: tl.constexpr, ARGMAX: tl.constexpr,
                           ROWS: tl.constexpr, DRAW_ROWS: tl.constexpr, CHUNKS: tl.constexpr, W: tl.constexpr,
                           NW: tl.constexpr, CW_P2: tl.constexpr, STAGES: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    ok = rows < D
    w0, w1, w2, w3 = token_words(seeds_ptr, row_len, rows, ok, tl.load(step_ptr), TAG_STEP, index_offset)
    bits = tl.zeros([ROWS], tl.int32)
    if HAS_X1:
        x1 = tl.load(x1_ptr + rows, mask=ok, other=0)
        if HAS_ERROR:
            bits = id_bits(x1, ok, K, ERR_X1_RANGE)
    else:
        x1, bits = draw_rows_split_checked(cond_ptr, uncond_ptr, stride_c, stride_u, rows, ok, K, to_uniform(w0), gs,
                                           zs, 0, HAS_UNCOND, False, ARGMAX, ROWS, DRAW_ROWS, CHUNKS, W, NW, CW_P2,
                                           STAGES, HAS_ERROR)
    if HAS_ERROR:
        report(error_ptr, bits | id_bits(tl.load(x_ptr + rows, mask=ok, other=0), ok, K, ERR_X_RANGE))
    if LAST:
        tl.store(out_ptr + rows, x1, mask=ok)
    else:
        x = tl.load(x_ptr + rows, mask=ok, other=0)
        moving = ok & (x1 != x)
        new = x
        if tl.max(moving.to(tl.int32), 0) > 0:
            h = tl.load(params_ptr + 0)
            beta = tl.load(params_ptr + 1)
            beta_dot = tl.load(params_ptr + 2)
            y = x1
            if HAS_X1:  # a given x1 may hold ids outside [0, K) (reported, never trusted)
                y = tl.minimum(tl.maximum(y, 0), K - 1)
            y = tl.where(moving, y, 0).to(tl.int32)
            z0 = tl.where(moving, x, 0).to(tl.int32)
            nb = tl.zeros([ROWS], tl.float32) - beta
            rn_y, sq_y, d0 = fsq_token(y, z0, LEVELS, NLO, P_LO, POWER)
            z, vt = fsq_pass(y, z0, d0, rn_y, sq_y, nb, LEVELS, NLO, P_LO, P_HI, CH_P2, FW, ROWS, POWER, True)
            total = tl.sum(vt, 1)
            lam = beta_dot * total / z
            jump = moving & (to_uniform(w1) < neg_expm1(h * lam)) & (lam > 0)
            if tl.max(jump.to(tl.int32), 0) > 0:
                dest = fsq_destination(vt, to_uniform(w2) * total, y, z0, d0, rn_y, sq_y, nb, LEVELS, NLO, P_LO,
                                       LO_P2, CH_P2, POWER, True)
                new = tl.where(jump, dest, x)
        tl.store(out_ptr + rows, new, mask=ok)
