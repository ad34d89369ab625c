"""Metric path sampling for training, FSQ codebooks (DESIGN §2.3): one kernel, one codebook pass.

``x_t ~ softmax_x(−β_i·d(x, x1_i))`` with a β (a time) per token. Since d(x1, x1) = 0 the
weights ``exp(−β d) ≤ 1`` need no max subtraction. Per program, ROWS tokens stream over the
implicit codebook (:mod:`ursa_engine.triton_kernels.fsq`) keeping only per-tile sums in registers, then
the crossing tile is recomputed: nothing of size D×K exists, the extra memory is zero.
``β = ∞`` returns x1; ``β = 0`` is uniform. RNG (§2.5): TAG_PATH, step 0, lane 0, index
``i % row_len + index_offset``.
Explicit tables go through :mod:`ursa_engine.triton_kernels.table` instead.

On the GPU: ROWS = 4 tokens a program, 4 warps capped at 128 registers (``maxnreg``,
:data:`triton_kernels.tiles.LAUNCH`): no spills, 4 blocks = 16 warps an SM (the claim
:mod:`ursa_engine.benchmarks.compile_report` checks for sm_90a). Uncapped at 8 warps it took
145 registers, 1 block an SM; capped at 8 warps it spilled 20 B (issue 12).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .fsq import fsq_destination, fsq_pass, fsq_token
from .philox import TAG_PATH, to_uniform, token_words


@triton.jit
def metric_sample_fsq_kernel(x1_ptr, beta_ptr, out_ptr, seeds_ptr, row_len, index_offset, D,
                             LEVELS: tl.constexpr, NLO: tl.constexpr, P_LO: tl.constexpr, LO_P2: tl.constexpr,
                             P_HI: tl.constexpr, CH_P2: tl.constexpr, FW: tl.constexpr, POWER: tl.constexpr,
                             ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    ok = rows < D
    x1 = tl.load(x1_ptr + rows, mask=ok, other=0)
    beta = tl.load(beta_ptr + rows, mask=ok, other=0.0).to(tl.float32)
    act = ok & (beta < float("inf"))
    new = x1
    if tl.max(act.to(tl.int32), 0) > 0:
        w0 = token_words(seeds_ptr, row_len, rows, ok, 0, TAG_PATH, index_offset)[0]
        y = tl.where(act, x1, 0).to(tl.int32)
        nb = tl.where(act, -beta, 0.0)
        rn_y, sq_y, d0 = fsq_token(y, y, LEVELS, NLO, P_LO, POWER)
        zsum, vt = fsq_pass(y, y, d0, rn_y, sq_y, nb, LEVELS, NLO, P_LO, P_HI, CH_P2, FW, ROWS, POWER, False)
        dest = fsq_destination(vt, to_uniform(w0) * zsum, y, y, d0, rn_y, sq_y, nb, LEVELS, NLO, P_LO, LO_P2,
                               CH_P2, POWER, False)
        new = tl.where(act, dest, x1)
    tl.store(out_ptr + rows, new, mask=ok)
