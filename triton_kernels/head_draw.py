"""lm_head GEMM with the guided x̂1 draw in its epilogue: the logits never exist in memory (issue 11).

DESIGN §2.4, §2.5, §3. For token ``i`` (a row of ``hidden``)::

    c = hidden[i]·Wᵀ, u = uncond_hidden[i]·Wᵀ        (fp32 accumulation, rounded to the input dtype)
    z = u + s·(c − u)  (z = c where c == u),  x̂1 = inverse-CDF draw of softmax(z / T) with lane 0

Oracle: :mod:`ursa_engine.reference.head_draw` (the same signature, row chunks of the dense sampler
reference). RNG (§2.5): Philox key ``seeds[i // row_len]``, counter ``(index, step, TAG_STEP)`` with
``index = (i % row_len) + index_offset``, lane 0 uniform (:mod:`ursa_engine.triton_kernels.philox`).

Three kernels and one sort, nothing of size D×K:

1. :func:`head_stats_kernel` — the GEMM. Program = BLOCK_M tokens × one chunk of CHUNK = TILES·BLOCK_K
   codes; a tile's logits come from ``tl.dot`` over H in BLOCK_H slices; the epilogue keeps an online
   (max, Σ exp) per token over the chunk and writes only those: 8 bytes per (token, chunk), D × NC
   with NC = ⌈K / CHUNK⌉ (at CHUNK = 128: 133 MB at D = 33,280, K = 64,000, against 4.3 GB for one
   bf16 logits tensor and 8.5 GB for cond + uncond).
2. :func:`head_select_kernel` — per token: the lane-0 uniform, the chunk masses on one scale, the
   crossing chunk (inverse CDF over chunks: :func:`triton_kernels.categorical.crossing`) and what is
   left of the target inside it (argmax: the first chunk holding the max).
3. ``torch.sort`` of the chosen chunk ids, then :func:`head_finish_kernel` — tiles of BLOCK_M2
   consecutive *sorted* tokens; for each distinct chunk of a tile, one ``tl.dot`` recomputes that
   chunk's logits for the tile's tokens (gathered hidden rows) and finishes the inverse-CDF draw
   inside it. Sorting makes the recomputation a GEMM again: at most (#tiles + NC) chunk tiles in
   all, each weight chunk read about once, instead of CHUNK × H weights per token (17 GB at video
   size for a per-token recomputation).

Log-probabilities (``logprobs=``, DESIGN §9 ``x1_logprobs``; LOGPROB constexpr of select and finish, so
the other variants compile as before): ``log softmax(z / T)[x̂1] = (z_x̂1 − lse) / T`` with
``lse = max z + T·ln Σ exp((z − max z) / T)``. Select already sums the chunk masses on the token's scale
for the draw; it writes ``lse`` (in z units: ``max(m) + log2(Σ masses) / zs``) into the caller's
``logprobs`` buffer (no scratch), and finish, whose recomputed tile holds z at x̂1, overwrites it with
``(z_x̂1 − lse)·zs·ln 2``: no extra pass over K. With ``argmax`` select computes the total only under
LOGPROB. Measured on the interpreter (64 tokens, H = 32, K = 97 / 1,000, several chunks, tests): within
7e-6 of float64 ``log_softmax`` of the fp32 logits (1.6e-5 at s = 7, T = 0.7, where torch's own fp32
logits are already 1e-5 off their float64 product); bf16 within 1.5e-6 (a logit whose fp32 sum rounds to
the other bf16 neighbour than ``lm_head``'s would move it by up to ``(|s| + |1 − s|)·ulp / T``: not seen).

Same law and same uniform as the unfused path (lm_head, then the sampler): ``c`` and ``u`` are
rounded to the input dtype exactly as ``lm_head`` returns them (round to nearest even) before
guidance, so tokens agree with the reference except where the target lands within rounding of a
CDF boundary (sums in float32, another order: the "rare ties" of §2.5). Measured on the
interpreter against the twin (4,096 tokens, H = 32, 4 seeds rows): 100% of tokens at K = 97 and
K = 1,000 with and without guidance in fp32 and bf16, except bf16 with s = 7 at K = 1,000: 99.976%
(one token).

Guidance computes both tiles, c and u (two ``tl.dot`` sharing one weight tile: 2·D·H·K FLOPs each).
The alternative, one dot on the guided hidden state ``h_g = u_h + s·(c_h − u_h)`` (``cfg``
``GUIDE_HIDDEN=True``), is the same z in exact arithmetic at half the FLOPs, but h_g is rounded to
bf16 for the tensor cores and the guided logits then move by ~2⁻⁹·|z|, where the reference rounds
c and u and then guides (DESIGN §2.4 guides on logits). Measured the same way, bf16, s = 7: the
one-dot variant agrees with the twin on 94.4% (K = 97) and 87.3% (K = 1,000) of tokens (fp16: 98%;
fp32: 100%), against ≥ 99.97% for two dots. It samples a slightly different law than the unfused
path, so two dots are the default; the option stays for a measured speed / fidelity trade.

Compile report, sm_90a (``python benchmarks/compile_head_draw.py``: Triton 3.6 lowering for
``GPUTarget("cuda", 90, 32)`` + the ptxas of its wheel, no GPU), bf16, H = 2,048, K = 64,000,
D = 33,280, the production tiles of :func:`head_config`:

==========================  ===================================  =========  ======  ==============
kernel                      tile                                 registers  spills  shared memory
==========================  ===================================  =========  ======  ==============
stats, guidance (2 dots)    128 tok × 128 codes × 64 h, 8 warps  188        0 B     147,456 B
stats, no guidance          same, 3 stages                       112        0 B     98,304 B
stats, GUIDE_HIDDEN         same                                 161        0 B     131,072 B
select                      8 tok × 512 chunks, 4 warps          128        0 B     512 B
select, argmax              same                                 48         0 B     256 B
select, logprob             same                                 127        0 B     512 B
select, argmax + logprob    same                                 96         0 B     256 B
finish, guidance            32 tok × 128 × 64, 8 warps, 3 st.    172        0 B     49,152 B
finish, no guidance         same                                 128        0 B     40,960 B
finish, argmax              same                                 128        0 B     49,152 B
finish, logprob             same, guidance                       172        0 B     49,152 B
finish, logprob, no guid.   same                                 176        0 B     40,960 B
finish, argmax + logprob    same, guidance                       172        0 B     49,152 B
==========================  ===================================  =========  ======  ==============

(LOGPROB rows: ``python benchmarks/compile_head_draw.py --argmax --logprob [--no-uncond]``, same tool.)

Pass one lowers to ``wgmma`` fed by a 3-stage ``cp.async`` pipeline, one 256-thread CTA per SM
(registers and shared memory both allow one); finish uses ``mma.sync`` (32-row tiles).
Occupancy claims (checked by :mod:`ursa_engine.benchmarks.compile_report`, LOGPROB variants included):
stats and finish 1 block an SM, select 4 (≤ 128 registers at 4 warps: select stores ``lse`` before the
Philox rounds so nothing more is alive across them; stored after them it took 163).
fp16 is identical to bf16; fp32 inputs (tests) use an exact "ieee" dot on CUDA cores with
BLOCK_M 64 × BLOCK_H 32: 220 registers, no spills.

Prediction, H100 SXM, 1.7B video step with CFG (D = 33,280 tokens, cond + uncond: 2 × 33,280 GEMM
rows, H = 2,048, K = 64,000): pass one is 2 dots × 2·33,280·2,048·64,000 = 17.4 TFLOP → 24.9 ms at
~700 TFLOP/s achievable bf16 (29 ms at the ~600 TFLOP/s Triton pointer-load GEMMs more often reach;
12.5 ms without guidance; DESIGN §6 counts it as "lm_head 17 TFLOP"); its weight traffic (262 MB
per group of 1,024 tokens: 8.6 GB, ~2.9 ms at 3 TB/s) hides under the math. Select reads 133 MB
(~0.05 ms); the sort of 33,280 ids ~0.05 ms; finish runs ≤ D/32 + NC = 1,540 chunk tiles:
1,540 × 2 dots × 2·32·128·2,048 = 52 GFLOP and ~0.8 GB of weight reads (~0.3–0.4 ms). Total
≈ 25.4 ms, against ≈ 24.9 ms (cuBLAS lm_head) + 2.8 ms writing and 2.8 ms reading 8.5 GB of
logits (§6) ≈ 30 ms unfused — and 8.5 GB less memory. A prediction: nothing here has run on a GPU.

64-bit offsets throughout (token × stride overflows int32 at real sizes). Under
``TRITON_INTERPRET=1`` bf16 dots are upcast to fp32 first (the interpreter multiplies bf16 bit
patterns: triton-lang/triton#11584); products of bf16 values are exact in fp32, so only the
summation order differs from a tensor-core dot.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .categorical import NEG_BIG, crossing
from .philox import TAG_STEP, to_uniform, token_words
from .sampler import LOG2E, _interp_rows, _pow2, unavailable
from .workspaces import head_draw_workspace

__all__ = ["head_draw", "head_config", "unavailable"]

_LOGIT_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_BIG = tl.constexpr(2147483647)  # past every chunk id


# ----------------------------------------------------------------------------- device helpers
@triton.jit
def _round(x, LOGIT_DTYPE: tl.constexpr):
    """fp32 -> the value of ``x`` rounded to the logits' dtype (nearest even), as fp32.

    bf16 by bit arithmetic so the GPU and the interpreter (whose bf16 cast truncates) agree.
    """
    if LOGIT_DTYPE == "bf16":
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    elif LOGIT_DTYPE == "fp16":
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _operand(x, LOGIT_DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """A loaded tile as a dot operand: fp32 under UPCAST (interpreter, fp32 inputs), else as loaded."""
    if UPCAST:
        return x.to(tl.float32)
    return x


@triton.jit
def tile_logits(h_ptr, hu_ptr, w_ptr, rows, rmask, cols, K, stride_h, stride_hu, stride_w, gs, H: tl.constexpr,
                HAS_UNCOND: tl.constexpr, GUIDE_HIDDEN: tl.constexpr, UPCAST: tl.constexpr,
                LOGIT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
    """Guided logits (BLOCK_M, BLOCK_K) fp32 of tokens ``rows`` (int64) × codes ``cols`` (int64).

    Temperature not applied; −inf at codes ≥ K; rows outside ``rmask`` read nothing (zeros).
    """
    cmask = cols < K
    acc_c = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    h_rows = h_ptr + rows[:, None] * stride_h
    hu_rows = hu_ptr + rows[:, None] * stride_hu
    w_cols = w_ptr + cols[:, None] * stride_w
    for h0 in range(0, H, BLOCK_H):  # scf.for: the pipeliner keeps BLOCK_H slices in flight
        hh = h0 + tl.arange(0, BLOCK_H)[None, :]
        w = tl.load(w_cols + hh, mask=cmask[:, None] & (hh < H), other=0.0)  # (BLOCK_K, BLOCK_H)
        wt = tl.trans(_operand(w, LOGIT_DTYPE, UPCAST))
        a = tl.load(h_rows + hh, mask=rmask[:, None] & (hh < H), other=0.0)  # (BLOCK_M, BLOCK_H)
        if HAS_UNCOND:
            b = tl.load(hu_rows + hh, mask=rmask[:, None] & (hh < H), other=0.0)
            if GUIDE_HIDDEN:
                af = a.to(tl.float32)
                bf = b.to(tl.float32)
                g = tl.where(af == bf, af, bf + gs * (af - bf))
                if UPCAST:
                    a = _round(g, LOGIT_DTYPE)
                else:
                    a = g.to(h_ptr.dtype.element_ty)
                acc_c = tl.dot(a, wt, acc_c, input_precision=DOT_PRECISION)
            else:
                acc_c = tl.dot(_operand(a, LOGIT_DTYPE, UPCAST), wt, acc_c, input_precision=DOT_PRECISION)
                acc_u = tl.dot(_operand(b, LOGIT_DTYPE, UPCAST), wt, acc_u, input_precision=DOT_PRECISION)
        else:
            acc_c = tl.dot(_operand(a, LOGIT_DTYPE, UPCAST), wt, acc_c, input_precision=DOT_PRECISION)
    if HAS_UNCOND and not GUIDE_HIDDEN:
        c = _round(acc_c, LOGIT_DTYPE)
        u = _round(acc_u, LOGIT_DTYPE)
        z = tl.where(c == u, c, u + gs * (c - u))  # the sampler's rule: c == u stays c
    elif HAS_UNCOND:
        z = acc_c
    else:
        z = _round(acc_c, LOGIT_DTYPE)
    return tl.where(cmask[None, :], z, float("-inf"))


# ----------------------------------------------------------------------------- kernels
@triton.jit
def head_stats_kernel(h_ptr, hu_ptr, w_ptr, m_ptr, s_ptr, D, K, NC, stride_h, stride_hu, stride_w, gs, zs,
                      H: tl.constexpr, HAS_UNCOND: tl.constexpr, GUIDE_HIDDEN: tl.constexpr, UPCAST: tl.constexpr,
                      LOGIT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, TILES: tl.constexpr, GROUP_M: tl.constexpr):
    """Pass one: per (token, chunk) the max of z and Σ exp2((z − max)·zs) over the chunk's codes.

    ``zs = log2(e) / T``. Writes ``m[row, chunk]`` (raw z) and ``s[row, chunk]``, (D, NC) fp32.
    Grid: ⌈D / BLOCK_M⌉ · NC programs, GROUP_M token tiles sweeping the codes together (L2 reuse).
    """
    pid = tl.program_id(0)
    n_m = tl.cdiv(D, BLOCK_M)
    in_group = GROUP_M * NC
    first = (pid // in_group) * GROUP_M
    size = tl.minimum(n_m - first, GROUP_M)
    pid_m = first + (pid % in_group) % size
    pid_c = (pid % in_group) // size
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < D
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    for t in range(0, TILES):
        cols = (pid_c * TILES + t).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
        z = tile_logits(h_ptr, hu_ptr, w_ptr, rows, rmask, cols, K, stride_h, stride_hu, stride_w, gs, H,
                        HAS_UNCOND, GUIDE_HIDDEN, UPCAST, LOGIT_DTYPE, DOT_PRECISION, BLOCK_M, BLOCK_K, BLOCK_H)
        mn = tl.maximum(m, tl.max(z, 1))
        ms = tl.maximum(mn * zs, NEG_BIG)  # finite: no inf − inf
        s = s * tl.exp2(m * zs - ms) + tl.sum(tl.exp2(z * zs - ms[:, None]), 1)
        m = mn
    tl.store(m_ptr + rows * NC + pid_c, m, mask=rmask)
    tl.store(s_ptr + rows * NC + pid_c, s, mask=rmask)


@triton.jit
def head_select_kernel(m_ptr, s_ptr, chunk_ptr, resid_ptr, mx_ptr, lse_ptr, seeds_ptr, step_ptr, row_len,
                       index_offset, D, NC, zs, ARGMAX: tl.constexpr, LOGPROB: tl.constexpr, ROWS: tl.constexpr,
                       NC_P2: tl.constexpr):
    """Per token: the chunk holding x̂1 and what is left of the target inside it.

    Draw: chunk masses ``s·exp2(m·zs − mx)`` on the token's scale ``mx = max(m)·zs``, target
    ``u0 · Σ masses``; writes the crossing chunk, ``target − (mass before it)`` and ``mx``.
    ARGMAX: the first chunk whose max is the token's max (so the first index of max z overall).
    LOGPROB: also the token's log-sum-exp in z units, ``lse = max(m) + log2(Σ masses) / zs`` (so
    ``log softmax(z / T)_j = (z_j − lse) · zs · ln 2``), into ``lse_ptr`` (D,) fp32: the logprobs
    buffer, which the finish kernel then overwrites with the log-probability.
    """
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    ok = rows < D
    cidx = tl.arange(0, NC_P2)[None, :]
    msk = ok[:, None] & (cidx < NC)
    m = tl.load(m_ptr + rows[:, None] * NC + cidx, mask=msk, other=float("-inf"))
    if LOGPROB:
        zmax = tl.max(m, 1)  # raw z: here, so that m dies before the cumsum (registers)
    if ARGMAX:
        chunk = tl.argmax(m, 1, tie_break_left=True)
        if LOGPROB:  # the total mass, only for the log-probability of the argmax code
            s = tl.load(s_ptr + rows[:, None] * NC + cidx, mask=msk, other=0.0)
            mz = m * zs
            mx = tl.maximum(tl.max(mz, 1), NEG_BIG)
            total = tl.sum(s * tl.exp2(mz - mx[:, None]), 1)
            tl.store(lse_ptr + rows, zmax + tl.log2(total) / zs, mask=ok)
    else:
        s = tl.load(s_ptr + rows[:, None] * NC + cidx, mask=msk, other=0.0)
        mz = m * zs
        mx = tl.maximum(tl.max(mz, 1), NEG_BIG)
        sc = s * tl.exp2(mz - mx[:, None])
        cs = tl.cumsum(sc, 1)
        total = tl.max(cs, 1)
        if LOGPROB:  # stored before the Philox rounds: nothing more is alive across them (registers)
            tl.store(lse_ptr + rows, zmax + tl.log2(total) / zs, mask=ok)
        u0 = to_uniform(token_words(seeds_ptr, row_len, rows, ok, tl.load(step_ptr), TAG_STEP, index_offset)[0])
        target = u0 * total
        chunk, prefix = crossing(cs, sc, target, cidx)
        tl.store(resid_ptr + rows, target - prefix, mask=ok)
        tl.store(mx_ptr + rows, mx, mask=ok)
    tl.store(chunk_ptr + rows, chunk.to(tl.int32), mask=ok)


@triton.jit
def head_finish_kernel(h_ptr, hu_ptr, w_ptr, order_ptr, sorted_ptr, resid_ptr, mx_ptr, out_ptr, lp_ptr, D, K,
                       stride_h, stride_hu, stride_w, gs, zs, H: tl.constexpr,
                       HAS_UNCOND: tl.constexpr, GUIDE_HIDDEN: tl.constexpr, UPCAST: tl.constexpr,
                       LOGIT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, ARGMAX: tl.constexpr,
                       LOGPROB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
                       TILES: tl.constexpr):
    """Pass two: x̂1 inside the chosen chunk, BLOCK_M tokens of the chunk-sorted order a program.

    ``order`` (D,) int64 token ids sorted by chunk, ``sorted`` (D,) int32 their chunk ids
    (ascending). One ``tl.dot`` pass over the chunk per distinct chunk of the tile.
    LOGPROB: ``lp`` (D,) fp32 holds the select kernel's ``lse``; overwritten with
    ``(z_x̂1 − lse) · zs · ln 2 = log softmax(z / T)[x̂1]``, z at x̂1 taken from the tile already in registers.
    """
    start = tl.program_id(0).to(tl.int64) * BLOCK_M
    pos = start + tl.arange(0, BLOCK_M)
    ok = pos < D
    rows = tl.load(order_ptr + pos, mask=ok, other=0)
    ck = tl.load(sorted_ptr + pos, mask=ok, other=0)
    if not ARGMAX:
        resid = tl.load(resid_ptr + rows, mask=ok, other=0.0)
        mx = tl.load(mx_ptr + rows, mask=ok, other=0.0)
    if LOGPROB:
        lse = tl.load(lp_ptr + rows, mask=ok, other=0.0)
        lp = tl.zeros([BLOCK_M], tl.float32)
    idx = tl.arange(0, BLOCK_K)[None, :]
    c = tl.min(tl.where(ok, ck, _BIG), 0)
    x1 = tl.zeros([BLOCK_M], tl.int64)
    while c < _BIG:  # once per distinct chunk of the tile, ascending
        sel = ok & (ck == c)
        best = tl.full([BLOCK_M], float("-inf"), tl.float32)
        j = tl.zeros([BLOCK_M], tl.int32)
        found = tl.zeros([BLOCK_M], tl.int1)
        last = tl.full([BLOCK_M], -1, tl.int32)
        carried = tl.zeros([BLOCK_M], tl.float32)
        if LOGPROB:  # z at the hit code and at the last code of positive weight (the rounding-edge fallback)
            z_hit = tl.full([BLOCK_M], float("-inf"), tl.float32)
            z_last = tl.full([BLOCK_M], float("-inf"), tl.float32)
        for t in range(0, TILES):
            cols = (c * TILES + t).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
            z = tile_logits(h_ptr, hu_ptr, w_ptr, rows, sel, cols, K, stride_h, stride_hu, stride_w, gs, H,
                            HAS_UNCOND, GUIDE_HIDDEN, UPCAST, LOGIT_DTYPE, DOT_PRECISION, BLOCK_M, BLOCK_K, BLOCK_H)
            if ARGMAX:
                bm = tl.max(z, 1)
                upd = bm > best  # strict: an earlier code keeps a tie (first index, like torch.argmax)
                j = tl.where(upd, tl.argmax(z, 1, tie_break_left=True).to(tl.int32) + t * BLOCK_K, j)
                best = tl.where(upd, bm, best)
            else:
                e = tl.exp2(z * zs - mx[:, None])
                cs = tl.cumsum(e, 1) + carried[:, None]
                p = tl.sum((cs <= resid[:, None]).to(tl.int32), 1)  # smallest position with cs > resid
                hit = (p < BLOCK_K) & (~found)
                j = tl.where(hit, p + t * BLOCK_K, j)
                found = found | hit
                if LOGPROB:
                    lt = tl.max(tl.where(e > 0, idx, -1), 1)
                    z_hit = tl.where(hit, tl.max(tl.where(idx == p[:, None], z, float("-inf")), 1), z_hit)
                    z_last = tl.where(lt >= 0, tl.max(tl.where(idx == lt[:, None], z, float("-inf")), 1), z_last)
                    last = tl.maximum(last, tl.where(lt >= 0, lt + t * BLOCK_K, -1))
                else:
                    last = tl.maximum(last, tl.max(tl.where(e > 0, idx + t * BLOCK_K, -1), 1))
                carried = tl.max(cs, 1)
        if LOGPROB:
            if ARGMAX:
                z_sel = best
            else:
                z_sel = tl.where(found & (j <= last), z_hit, z_last)
            lp = tl.where(sel, (z_sel - lse) * (zs * 0.6931471805599453), lp)
        if not ARGMAX:
            # a rounding edge can step past the chunk's last code with positive weight: take that code
            j = tl.maximum(tl.where(found, tl.minimum(j, last), last), 0)
        x1 = tl.where(sel, c.to(tl.int64) * (TILES * BLOCK_K) + j, x1)
        c = tl.min(tl.where(ok & (ck > c), ck, _BIG), 0)
    tl.store(out_ptr + rows, tl.minimum(x1, K - 1), mask=ok)  # in range whatever the input (NaN)
    if LOGPROB:
        tl.store(lp_ptr + rows, lp, mask=ok)


# ----------------------------------------------------------------------------- launcher
def head_config(D: int, K: int, H: int, device, dtype=torch.bfloat16, **over) -> dict:
    """Tiles of the three kernels; keyword overrides (tests force small tilings).

    GPU: BLOCK_M 128 × BLOCK_K 128 × BLOCK_H 64 (one CHUNK = one BLOCK_K tile), GROUP_M 8;
    finish BLOCK_M2 32; select ROWS 8. Interpreter: wide programs (a program costs Python time).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        # fp32 operands (tests, not production: an exact "ieee" dot on CUDA cores) need half the tile
        # (BLOCK_M 64: 220 registers, no spills) and twice the shared memory a stage (BLOCK_H 32)
        fp32 = dtype == torch.float32
        c = dict(BLOCK_M=64 if fp32 else 128, BLOCK_K=128, BLOCK_H=32 if fp32 else 64, TILES=1, GROUP_M=8,
                 BLOCK_M2=32, ROWS=8, stats_warps=8, stats_stages=3, finish_warps=8, finish_stages=3, select_warps=4)
    else:
        bk = min(128, max(16, _pow2(K)))
        c = dict(BLOCK_M=min(1024, max(16, _pow2(D))), BLOCK_K=bk, BLOCK_H=min(64, max(16, _pow2(H))), TILES=1,
                 GROUP_M=8, BLOCK_M2=min(512, max(16, _pow2(D))), ROWS=None)
    c.update({k: v for k, v in over.items() if v is not None})
    nc = math.ceil(K / (c["TILES"] * c["BLOCK_K"]))
    c["NC"], c["NC_P2"] = nc, _pow2(nc)
    if c.get("ROWS") is None:
        c["ROWS"] = _interp_rows(D, c["NC_P2"])
    c.setdefault("GUIDE_HIDDEN", False)
    c["UPCAST"] = dtype == torch.float32 or not cuda
    c["DOT_PRECISION"] = "ieee" if c["UPCAST"] else "tf32"  # bf16 / fp16 operands ignore it
    c["LOGIT_DTYPE"] = _LOGIT_DTYPE[dtype]
    return c


def _check(hidden, weight, uncond_hidden, guidance_scale, temperature, seeds, row_len, step, index_offset, out,
           logprobs=None):
    """The twin's argument checks (:func:`ursa_engine.reference.head_draw.check_inputs`), plus what
    the kernel needs: the hidden axis contiguous, K < 2^31."""
    from ursa_engine.reference.head_draw import check_inputs

    D, K, H = check_inputs(hidden, weight, uncond_hidden, guidance_scale, temperature, seeds, row_len, step,
                           index_offset, out, logprobs)
    for name, t in (("hidden", hidden), ("weight", weight), ("uncond_hidden", uncond_hidden)):
        if t is not None and H > 1 and t.stride(1) != 1:
            raise ValueError(f"{name}: the hidden axis must be contiguous (stride 1), got stride {t.stride(1)}")
    if K >= 2**31:
        raise ValueError(f"weight: K = {K} codes, at most 2^31 − 1")
    return D, K, H


def head_draw(hidden: torch.Tensor, weight: torch.Tensor, *, uncond_hidden: torch.Tensor | None = None,
              guidance_scale: float = 1.0, temperature: float = 1.0, seeds: torch.Tensor, row_len: int,
              step: torch.Tensor, index_offset: int = 0, argmax: bool = False,
              out: torch.Tensor | None = None, logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """x̂1 ~ softmax(guided(hidden·Wᵀ, uncond_hidden·Wᵀ) / T) per token, logits never stored (§2.4).

    Parameters
    ----------
    hidden : (D, H) final-normed hidden states of the latent positions (bf16 / fp16 / fp32),
        hidden axis contiguous
    weight : (K, H) ``lm_head.weight``, same dtype and device
    uncond_hidden : (D, H) the unconditional pass's hidden states, or None (no guidance)
    guidance_scale, temperature : s and T of §2.4 (T > 0)
    seeds : (R,) int64 RNG row seeds; token i uses ``seeds[i // row_len]``
    row_len : tokens a RNG row
    step : (1,) int64 device tensor, the RNG step (read inside the kernel: CUDA graphs)
    index_offset : added to the Philox index ``i % row_len`` (row-chunked callers)
    argmax : argmax z (first index) instead of a draw
    out : optional int64 (D,) output buffer (fixed address for CUDA graphs)
    logprobs : optional float32 (D,) buffer, written with ``log softmax(z / T)[x̂1]`` (DESIGN §9
        ``x1_logprobs``; with ``argmax``: the argmax code's log-probability under softmax(z / T)), from
        the log-sum-exp pass one and select already hold and z at x̂1 in the finish tile: no extra pass
        over K, no extra scratch (the buffer carries the log-sum-exp from select to finish).
        −inf for a token whose chosen chunk has no positive weight (only with NaN / inf inputs).

    Returns
    -------
    (D,) int64 x̂1. Scratch: 2·D·NC + 4·D floats / ints (NC = ⌈K / CHUNK⌉) and the sort.
    """
    return _head_draw(hidden, weight, uncond_hidden=uncond_hidden, guidance_scale=guidance_scale,
                      temperature=temperature, seeds=seeds, row_len=row_len, step=step, index_offset=index_offset,
                      argmax=argmax, out=out, logprobs=logprobs)


def _head_draw(hidden, weight, *, uncond_hidden, guidance_scale, temperature, seeds, row_len, step, index_offset,
               argmax, out, logprobs=None, cfg=None):
    """:func:`head_draw` with ``cfg`` overriding :func:`head_config` (tests, benchmarks)."""
    D, K, H = _check(hidden, weight, uncond_hidden, guidance_scale, temperature, seeds, row_len, step,
                     index_offset, out, logprobs)
    device = hidden.device
    out = out if out is not None else torch.empty(D, dtype=torch.int64, device=device)
    if D == 0:
        return out
    c = head_config(D, K, H, device, hidden.dtype, **dict(cfg or {}))
    has_uncond = uncond_hidden is not None
    hu = uncond_hidden if has_uncond else hidden
    gs, zs = float(guidance_scale), LOG2E / float(temperature)
    nc = c["NC"]
    flags = dict(HAS_UNCOND=has_uncond, GUIDE_HIDDEN=bool(c["GUIDE_HIDDEN"]) and has_uncond, UPCAST=c["UPCAST"],
                 LOGIT_DTYPE=c["LOGIT_DTYPE"], DOT_PRECISION=c["DOT_PRECISION"], BLOCK_K=c["BLOCK_K"],
                 BLOCK_H=c["BLOCK_H"], TILES=c["TILES"])
    strides = dict(stride_h=hidden.stride(0), stride_hu=hu.stride(0), stride_w=weight.stride(0))
    cuda = device.type == "cuda"

    # scratch from the one declaration of its sizes (.workspaces.head_draw_workspace: the plans read it too)
    ws = head_draw_workspace(D, nc).allocate(device)
    mstat, sstat, chunk, resid, mx = (ws.pop(k) for k in ("chunk_max", "chunk_sum", "chunk", "resid", "max"))
    opts = dict(num_warps=c["stats_warps"], num_stages=c["stats_stages"]) if cuda else {}
    head_stats_kernel[(math.ceil(D / c["BLOCK_M"]) * nc,)](
        hidden, hu, weight, mstat, sstat, D, K, nc, **strides, gs=gs, zs=zs, H=H, **flags, BLOCK_M=c["BLOCK_M"],
        GROUP_M=c["GROUP_M"], **opts)

    want_lp = logprobs is not None
    lp = logprobs if want_lp else mx  # never touched without LOGPROB
    head_select_kernel[(math.ceil(D / c["ROWS"]),)](
        mstat, sstat, chunk, resid, mx, lp, seeds, step, row_len, index_offset, D, nc, zs, ARGMAX=bool(argmax),
        LOGPROB=want_lp, ROWS=c["ROWS"], NC_P2=c["NC_P2"], **({"num_warps": c["select_warps"]} if cuda else {}))
    del mstat, sstat

    # tokens grouped by chunk: a finish tile then recomputes few chunks for many tokens (a GEMM again)
    sorted_chunk, order = torch.sort(chunk)
    opts = dict(num_warps=c["finish_warps"], num_stages=c["finish_stages"]) if cuda else {}
    head_finish_kernel[(math.ceil(D / c["BLOCK_M2"]),)](
        hidden, hu, weight, order, sorted_chunk, resid, mx, out, lp, D, K, **strides, gs=gs, zs=zs, H=H, **flags,
        ARGMAX=bool(argmax), LOGPROB=want_lp, BLOCK_M=c["BLOCK_M2"], **opts)
    return out
