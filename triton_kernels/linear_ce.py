"""Fused linear cross-entropy / log-prob with its backward: the logits never exist in memory (issue 18).

DESIGN §9 "Fused linear cross-entropy". For row ``i`` of ``hidden`` (n, H) and ``weight`` (K, H)::

    z_i = h_i·Wᵀ / T,   lse_i = logsumexp_j z_ij,   loss_i = w_i·(lse_i − z_i[y_i] + z_loss·lse_i²)

(0 where ``y_i == ignore_index``), and with an incoming per-row coefficient ``c_i`` (the autograd
Function folds ``w_i``, the incoming gradient and the "mean" divisor into it)::

    dz_ij = c_i·((1 + 2·z_loss·lse_i)·softmax(z_i)_j − [j = y_i]) / T,   dh = dz·W,   dW = dzᵀ·h

Oracle: the chunked torch twin, :func:`ursa_engine.training.losses.linear_cross_entropy`
(``backend="torch"``), itself tested against autograd of the dense formula. No RNG.

Three kernels, nothing of size n × K (the twin's peak is one (chunk, K) fp32 block; here a logits
tile lives only in registers):

1. :func:`linear_ce_fwd_kernel` — program = BLOCK_M rows; loop over K in BLOCK_K tiles, each tile a
   ``tl.dot`` over H in BLOCK_H slices (fp32 accumulation); online log-sum-exp (running max and
   Σ exp2); the target logit taken from the tile that holds it. Writes ``lse`` and ``loss`` (n,) fp32.
2. :func:`linear_ce_dh_kernel` — program = BLOCK_M rows; per K tile: recompute z, form dz, and add
   ``dz·W_tile`` into the rows' fp32 d(hidden) (n, H) slice by slice (read-modify-write of rows only
   this program owns).
3. :func:`linear_ce_dw_kernel` — program = BLOCK_K codes; loop over the rows in BLOCK_M tiles:
   recompute z and dz, add ``dzᵀ·h_tile`` into the codes' fp32 d(weight) (K, H). Each program owns
   its codes: no atomics, deterministic (same bits run to run).

dz is rounded to the input dtype before its product (the tensor cores' operand type; the autograd
Function never sees it). It is formed relative to ``scale = max_i |c_i|`` so that its entries are
O(1) — with a "mean" over 33,280 rows ``c_i ≈ 3·10⁻⁵`` and fp16 would flush most of ``c_i·softmax``
to zero — and the launcher multiplies the fp32 sums by ``scale / T`` once at the end (``scale``
read on the device: no host sync). fp32 inputs use an exact ("ieee") dot.

Memory: forward 8 bytes a row; backward the fp32 gradients themselves (n·H + K·H floats; the
autograd Function casts them to the inputs' dtypes) and nothing else. Deterministic: each program
owns its output rows / codes and adds in a fixed order.

Compile report, sm_90a (``python -m ursa_engine.benchmarks.compile_report``, rows ``train-1.7b``: Triton 3.6
lowering for ``GPUTarget("cuda", 90, 32)`` + the ptxas of its wheel, no GPU), bf16, H = 2,048, K = 64,000,
n = 33,280, z-loss and weights on, the tiles of :func:`linear_ce_config`:

========  ======================================  =========  ======  =============  ==============
kernel    tile (rows × codes × H slice), warps    registers  spills  shared memory  blocks / SM
========  ======================================  =========  ======  =============  ==============
forward   128 × 128 × 64, 8 warps, 3 stages       156        0 B     98,304 B       1 (registers)
dh        64 × 256 × 64, 8 warps, 3 stages        242        0 B     147,456 B      1 (registers)
dW        256 × 64 × 64, 8 warps, 3 stages        247        0 B     147,456 B      1 (registers)
========  ======================================  =========  ======  =============  ==============

All three lower to ``wgmma`` fed by ``cp.async`` pipelines over the H slices (the outer K / row
loops are ``while`` loops: the interpreter needs constexpr ``range`` bounds). Occupancy claim
(checked by :mod:`ursa_engine.benchmarks.compile_report`): 1 block an SM each. dh / dW sit close
to the 255-register cap; 128-wide swept tiles compile to 186 / 190 registers at twice the
accumulator traffic (below). fp32 inputs (tests, not production) use smaller tiles; their dh
kernel spills 8 bytes.

Prediction, H100 SXM (989 TFLOP/s dense bf16 datasheet, ~600–700 achievable by Triton GEMMs;
3.35 TB/s HBM, 50 MB L2), the tiles above. **A prediction: nothing here has run on a GPU.**

* forward: 2·n·H·K = 8.72 TFLOP → ~12.5 ms at 700 TFLOP/s (14.5 ms at 600). 260 row programs on
  132 SMs (two waves, 98 % full); each streams the 262 MB weight, shared through L2 by the programs
  sweeping K together — operand traffic hides under the math.
* backward: two recomputations (the dh and dW kernels each rebuild the logits) + the two products
  = 4 × 8.72 = 34.9 TFLOP → ~50 ms at 700 TFLOP/s. The fp32 accumulators are read and written
  once per swept tile: 2·64·H·4 = 1 MB per 4·64·256·H = 134 MFLOP (128 FLOP a byte), 136 GB for dh
  plus 136 GB for dW. The accumulators in flight (132 × 512 KB = 67 MB) exceed the L2, so assume
  HBM: 272 GB / 3.35 TB/s ≈ 81 ms — the backward is predicted bandwidth-bound at ~80 ms
  (50 ms if the accumulators stayed in L2), plus ~0.5 ms zeroing and scaling the fp32 gradients.
* total ≈ 95 ms for the loss of one 33,280-token step, against ≈ 42 ms unfused (cuBLAS logits,
  softmax, two GEMMs: 3 × 8.72 TFLOP ≈ 37 ms at 700 plus ≥ 4 passes over 4.3 GB of bf16 logits
  ≈ 5 ms) which needs 4.3–8.5 GB more memory (17 GB with fp32 softmax temporaries). If measurement
  confirms the accumulator bound, the next design to try keeps the deterministic structure but
  moves the products to GEMMs: per K chunk of Kc codes, a kernel writes dz (n, Kc) in bf16 (0.5 GB
  at Kc = 8,192), then ``dh += dz·W_c`` and ``dW_c = dzᵀ·h`` by cuBLAS — 3 × 8.72 TFLOP with one
  recomputation and GEMM-grade intensity, at the price of that chunk buffer.

64-bit offsets throughout (row × stride overflows int32 at real sizes). Under ``TRITON_INTERPRET=1``
bf16 / fp16 dots are upcast to fp32 first (the interpreter multiplies bf16 bit patterns:
triton-lang/triton#11584; see :mod:`.head_draw`) and dz is rounded to the input dtype by bit
arithmetic, so the interpreter reproduces the GPU's operand rounding (products exact in fp32: only
the summation order differs from a tensor-core dot).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .categorical import LOG2E, NEG_BIG
from .head_draw import _round
from .sampler import _pow2, unavailable

__all__ = ["linear_ce_forward", "linear_ce_backward", "linear_ce_config", "unavailable"]

_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


# ----------------------------------------------------------------------------- device helpers
@triton.jit
def _operand(x, UPCAST: tl.constexpr):
    """A loaded tile as a dot operand: fp32 under UPCAST (interpreter, fp32 inputs), else as loaded."""
    if UPCAST:
        return x.to(tl.float32)
    return x


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, rmask, cols, K, stride_h, stride_w, inv_t, H: tl.constexpr,
                 UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_H: tl.constexpr):
    """z = h[rows]·W[cols]ᵀ / T, (BLOCK_M, BLOCK_K) fp32; −inf at codes ≥ K, 0 at rows outside ``rmask``."""
    cmask = cols < K
    acc = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    h_rows = h_ptr + rows[:, None] * stride_h
    w_cols = w_ptr + cols[:, None] * stride_w
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)[None, :]
        a = tl.load(h_rows + hh, mask=rmask[:, None] & (hh < H), other=0.0)  # (BLOCK_M, BLOCK_H)
        w = tl.load(w_cols + hh, mask=cmask[:, None] & (hh < H), other=0.0)  # (BLOCK_K, BLOCK_H)
        acc = tl.dot(_operand(a, UPCAST), tl.trans(_operand(w, UPCAST)), acc, input_precision=DOT_PRECISION)
    return tl.where(cmask[None, :], acc * inv_t, float("-inf"))


@triton.jit
def _dz_tile(z, cols, tgt, lse, rel, pf, dtype: tl.constexpr, UPCAST: tl.constexpr, LOGIT_DTYPE: tl.constexpr):
    """dz·T / scale = rel_i·(pf_i·softmax − onehot) as a dot operand (rounded to the input dtype).

    ``rel = c / scale`` (|rel| ≤ 1), ``pf = 1 + 2·z_loss·lse``; rows with rel = 0 give 0.
    """
    p = tl.exp2((z - lse[:, None]) * LOG2E)  # softmax (0 at codes ≥ K: z = −inf)
    onehot = (cols[None, :] == tgt[:, None]).to(tl.float32)
    dz = rel[:, None] * (pf[:, None] * p - onehot)
    if UPCAST:
        return _round(dz, LOGIT_DTYPE)  # fp32 valued; rounded as the GPU's cast would (identity for fp32)
    return dz.to(dtype)


@triton.jit
def _row_terms(t_ptr, lse_ptr, coef_ptr, scale_ptr, rows, rmask, z_loss, HAS_Z_LOSS: tl.constexpr):
    """Per row: target, lse, rel = c / scale, pf = 1 + 2·z_loss·lse (rows outside ``rmask``: rel 0)."""
    tgt = tl.load(t_ptr + rows, mask=rmask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    rel = tl.load(coef_ptr + rows, mask=rmask, other=0.0) / tl.load(scale_ptr)
    if HAS_Z_LOSS:
        pf = 1.0 + 2.0 * z_loss * lse
    else:
        pf = tl.zeros_like(lse) + 1.0
    return tgt, lse, rel, pf


# ----------------------------------------------------------------------------- kernels
@triton.jit
def linear_ce_fwd_kernel(h_ptr, w_ptr, t_ptr, wt_ptr, lse_ptr, loss_ptr, n, K, stride_h, stride_w, ignore_index,
                         inv_t, z_loss, H: tl.constexpr, HAS_WEIGHTS: tl.constexpr, HAS_Z_LOSS: tl.constexpr,
                         UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
    """Per row: ``lse`` and ``loss = w·(lse − z[y] + z_loss·lse²)`` (0 for ignored rows), (n,) fp32 each."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n
    tgt = tl.load(t_ptr + rows, mask=rmask, other=ignore_index)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    picked = tl.zeros([BLOCK_M], tl.float32)
    k0 = 0
    while k0 < K:  # scf.while (the interpreter needs constexpr bounds for a ``range``); the H loop pipelines
        cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k0 += BLOCK_K
        z = _logits_tile(h_ptr, w_ptr, rows, rmask, cols, K, stride_h, stride_w, inv_t, H, UPCAST, DOT_PRECISION,
                         BLOCK_M, BLOCK_K, BLOCK_H)
        mn = tl.maximum(tl.maximum(m, tl.max(z, 1)), NEG_BIG)  # finite: no inf − inf
        s = s * tl.exp2((m - mn) * LOG2E) + tl.sum(tl.exp2((z - mn[:, None]) * LOG2E), 1)
        m = mn
        picked += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), 1)  # nonzero in one tile only
    lse = m + tl.log2(s) / LOG2E
    loss = lse - picked
    if HAS_Z_LOSS:
        loss += z_loss * lse * lse
    if HAS_WEIGHTS:
        loss *= tl.load(wt_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    loss = tl.where(tgt != ignore_index, loss, 0.0)
    tl.store(lse_ptr + rows, lse, mask=rmask)
    tl.store(loss_ptr + rows, loss, mask=rmask)


@triton.jit
def linear_ce_dh_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, coef_ptr, scale_ptr, dh_ptr, n, K, stride_h, stride_w, inv_t,
                        z_loss, H: tl.constexpr, HAS_Z_LOSS: tl.constexpr, UPCAST: tl.constexpr,
                        LOGIT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
    """dh[rows] += Σ_tiles (dz·T/scale)·W_tile into the fp32 (n, H) ``dh`` (zeroed by the launcher)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n
    tgt, lse, rel, pf = _row_terms(t_ptr, lse_ptr, coef_ptr, scale_ptr, rows, rmask, z_loss, HAS_Z_LOSS)
    dh_rows = dh_ptr + rows[:, None] * H
    k0 = 0
    while k0 < K:
        cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k0 += BLOCK_K
        cmask = cols < K
        z = _logits_tile(h_ptr, w_ptr, rows, rmask, cols, K, stride_h, stride_w, inv_t, H, UPCAST, DOT_PRECISION,
                         BLOCK_M, BLOCK_K, BLOCK_H)
        dz = _dz_tile(z, cols, tgt, lse, rel, pf, h_ptr.dtype.element_ty, UPCAST, LOGIT_DTYPE)  # (BLOCK_M, BLOCK_K)
        for h0 in range(0, H, BLOCK_H):
            hh = h0 + tl.arange(0, BLOCK_H)[None, :]
            w = tl.load(w_ptr + cols[:, None] * stride_w + hh, mask=cmask[:, None] & (hh < H), other=0.0)
            acc = tl.load(dh_rows + hh, mask=rmask[:, None] & (hh < H), other=0.0)
            acc = tl.dot(dz, _operand(w, UPCAST), acc, input_precision=DOT_PRECISION)
            tl.store(dh_rows + hh, acc, mask=rmask[:, None] & (hh < H))
        tl.debug_barrier()  # this tile's stores before the next tile's loads (other threads may own them)


@triton.jit
def linear_ce_dw_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, coef_ptr, scale_ptr, dw_ptr, n, K, stride_h, stride_w, inv_t,
                        z_loss, H: tl.constexpr, HAS_Z_LOSS: tl.constexpr, UPCAST: tl.constexpr,
                        LOGIT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
    """dW[cols] += Σ_row tiles (dz·T/scale)ᵀ·h_tile into the fp32 (K, H) ``dw`` (zeroed by the launcher)."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    dw_cols = dw_ptr + cols[:, None] * H
    m0 = 0
    while m0 < n:
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        m0 += BLOCK_M
        rmask = rows < n
        tgt, lse, rel, pf = _row_terms(t_ptr, lse_ptr, coef_ptr, scale_ptr, rows, rmask, z_loss, HAS_Z_LOSS)
        z = _logits_tile(h_ptr, w_ptr, rows, rmask, cols, K, stride_h, stride_w, inv_t, H, UPCAST, DOT_PRECISION,
                         BLOCK_M, BLOCK_K, BLOCK_H)
        dzt = tl.trans(_dz_tile(z, cols, tgt, lse, rel, pf, h_ptr.dtype.element_ty, UPCAST, LOGIT_DTYPE))
        for h0 in range(0, H, BLOCK_H):
            hh = h0 + tl.arange(0, BLOCK_H)[None, :]
            a = tl.load(h_ptr + rows[:, None] * stride_h + hh, mask=rmask[:, None] & (hh < H), other=0.0)
            acc = tl.load(dw_cols + hh, mask=cmask[:, None] & (hh < H), other=0.0)
            acc = tl.dot(dzt, _operand(a, UPCAST), acc, input_precision=DOT_PRECISION)
            tl.store(dw_cols + hh, acc, mask=cmask[:, None] & (hh < H))
        tl.debug_barrier()  # this row tile's stores before the next one's loads


# ----------------------------------------------------------------------------- launchers
def linear_ce_config(n: int, K: int, H: int, device, dtype=torch.bfloat16, **over) -> dict:
    """Tiles of the three kernels; keyword overrides (tests force several K tiles and row tiles).

    GPU, bf16 / fp16: forward BLOCK_M 128 × BLOCK_K 128 × BLOCK_H 64; dh 64 rows × 256 codes; dW 64 codes
    × 256 rows; 8 warps, 3 stages each. fp32 inputs (tests; an exact dot on CUDA cores): smaller tiles,
    BLOCK_H 32. Interpreter: wide tiles (a program costs Python time), at least 16 (``tl.dot``).
    """
    device = torch.device(device)
    if device.type == "cuda":
        # dh / dW: the accumulator's read-modify-write per tile is 2·(owned rows or codes)·H·4 bytes for
        # 4·owned·swept·H FLOP, so the owned side is short (64) and the swept side long (256): 128 FLOP a byte
        if dtype == torch.float32:
            c = dict(BLOCK_M=64, BLOCK_K=64, BLOCK_H=32, fwd_warps=8, fwd_stages=2, dh_BLOCK_M=32, dh_BLOCK_K=64,
                     dh_warps=8, dh_stages=2, dw_BLOCK_M=64, dw_BLOCK_K=32, dw_warps=8, dw_stages=2)
        else:
            c = dict(BLOCK_M=128, BLOCK_K=128, BLOCK_H=64, fwd_warps=8, fwd_stages=3, dh_BLOCK_M=64, dh_BLOCK_K=256,
                     dh_warps=8, dh_stages=3, dw_BLOCK_M=256, dw_BLOCK_K=64, dw_warps=8, dw_stages=3)
    else:
        bm, bk = min(64, max(16, _pow2(n))), min(64, max(16, _pow2(K)))
        c = dict(BLOCK_M=bm, BLOCK_K=bk, BLOCK_H=min(64, max(16, _pow2(H))), dh_BLOCK_M=bm, dh_BLOCK_K=bk,
                 dw_BLOCK_M=bm, dw_BLOCK_K=bk)
    c.update({k: v for k, v in over.items() if v is not None})
    c["UPCAST"] = dtype == torch.float32 or device.type != "cuda"
    c["DOT_PRECISION"] = "ieee" if c["UPCAST"] else "tf32"  # bf16 / fp16 operands ignore it
    c["LOGIT_DTYPE"] = _DTYPE[dtype]
    return c


def _check(hidden, weight, targets):
    """What the kernels need beyond :func:`~ursa_engine.training.losses.linear_cross_entropy`'s checks."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden, weight: expected (n, H) and (K, H), got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}")
    if hidden.dtype not in _DTYPE or weight.dtype != hidden.dtype:
        raise ValueError(f"hidden, weight: one dtype of bf16 / fp16 / fp32, got {hidden.dtype}, {weight.dtype}")
    if targets.shape != (hidden.shape[0],) or targets.dtype != torch.int64:
        raise ValueError(f"targets: expected int64 ({hidden.shape[0]},), got {targets.dtype} {tuple(targets.shape)}")
    if weight.shape[0] >= 2**31 or hidden.shape[0] >= 2**31:
        raise ValueError(f"hidden, weight: at most 2^31 − 1 rows, got {hidden.shape[0]} and {weight.shape[0]}")
    return hidden.shape[0], weight.shape[0], hidden.shape[1]


def _unit_rows(t):
    """``t`` with its last axis contiguous (the kernels index ``row * stride + column``)."""
    return t if t.dim() < 2 or t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _opts(c, name, cuda):
    return dict(num_warps=c[f"{name}_warps"], num_stages=c[f"{name}_stages"]) if cuda else {}


def linear_ce_forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      weights: torch.Tensor | None = None, *, ignore_index: int = -100, temperature: float = 1.0,
                      z_loss: float = 0.0, cfg: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row log-sum-exp and weighted loss of ``hidden @ weight.T / temperature`` (DESIGN §9).

    Parameters
    ----------
    hidden : (n, H) bf16 / fp16 / fp32; weight : (K, H) same dtype and device
    targets : (n,) int64 ids in [0, K) or ``ignore_index``
    weights : optional (n,) float per-row weights (default 1)
    ignore_index, temperature, z_loss : as for ``linear_cross_entropy``
    cfg : overrides of :func:`linear_ce_config` (tests)

    Returns
    -------
    lse : (n,) fp32 ``logsumexp(z_i)``; loss : (n,) fp32 ``w_i·(lse_i − z_i[y_i] + z_loss·lse_i²)``, 0
    where ``targets == ignore_index``
    """
    n, K, H = _check(hidden, weight, targets)
    device = hidden.device
    lse = torch.empty(n, dtype=torch.float32, device=device)
    loss = torch.empty(n, dtype=torch.float32, device=device)
    if n == 0:
        return lse, loss
    hidden, weight, targets = _unit_rows(hidden), _unit_rows(weight), targets.contiguous()
    c = linear_ce_config(n, K, H, device, hidden.dtype, **dict(cfg or {}))
    has_w = weights is not None
    linear_ce_fwd_kernel[(math.ceil(n / c["BLOCK_M"]),)](
        hidden, weight, targets, weights.contiguous() if has_w else lse, lse, loss, n, K, stride_h=hidden.stride(0),
        stride_w=weight.stride(0), ignore_index=int(ignore_index), inv_t=1.0 / float(temperature),
        z_loss=float(z_loss), H=H, HAS_WEIGHTS=has_w, HAS_Z_LOSS=bool(z_loss), UPCAST=c["UPCAST"],
        DOT_PRECISION=c["DOT_PRECISION"], BLOCK_M=c["BLOCK_M"], BLOCK_K=c["BLOCK_K"], BLOCK_H=c["BLOCK_H"],
        **_opts(c, "fwd", device.type == "cuda"))
    return lse, loss


def linear_ce_backward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                       coef: torch.Tensor, *, temperature: float = 1.0, z_loss: float = 0.0, need_hidden: bool = True,
                       need_weight: bool = True, cfg: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``Σ_i c_i·(lse_i − z_i[y_i] + z_loss·lse_i²)`` by recomputing the logits (DESIGN §9).

    Parameters
    ----------
    hidden, weight, targets : as for :func:`linear_ce_forward` (ignored rows must have ``coef`` 0)
    lse : (n,) fp32 from :func:`linear_ce_forward`
    coef : (n,) fp32 per-row coefficients ``c_i`` (weight × incoming gradient [/ count]); 0 drops a row
    need_hidden, need_weight : which gradients to compute (the other comes back empty)
    cfg : overrides of :func:`linear_ce_config` (tests)

    Returns
    -------
    d_hidden : (n, H) fp32, or (0,) when not ``need_hidden``; d_weight : (K, H) fp32, or (0,)
    """
    n, K, H = _check(hidden, weight, targets)
    device = hidden.device
    dh = torch.zeros((n, H) if need_hidden else (0,), dtype=torch.float32, device=device)
    dw = torch.zeros((K, H) if need_weight else (0,), dtype=torch.float32, device=device)
    if n == 0 or not (need_hidden or need_weight):
        return dh, dw
    hidden, weight, targets = _unit_rows(hidden), _unit_rows(weight), targets.contiguous()
    lse, coef = lse.contiguous(), coef.to(torch.float32).contiguous()
    amax = coef.abs().amax().reshape(1)
    scale = torch.where(amax > 0, amax, torch.ones_like(amax))  # on the device: no host sync
    c = linear_ce_config(n, K, H, device, hidden.dtype, **dict(cfg or {}))
    cuda = device.type == "cuda"
    args = dict(n=n, K=K, stride_h=hidden.stride(0), stride_w=weight.stride(0), inv_t=1.0 / float(temperature),
                z_loss=float(z_loss), H=H, HAS_Z_LOSS=bool(z_loss), UPCAST=c["UPCAST"], LOGIT_DTYPE=c["LOGIT_DTYPE"],
                DOT_PRECISION=c["DOT_PRECISION"], BLOCK_H=c["BLOCK_H"])
    if need_hidden:
        linear_ce_dh_kernel[(math.ceil(n / c["dh_BLOCK_M"]),)](
            hidden, weight, targets, lse, coef, scale, dh, **args, BLOCK_M=c["dh_BLOCK_M"], BLOCK_K=c["dh_BLOCK_K"],
            **_opts(c, "dh", cuda))
        dh.mul_(scale / float(temperature))
    if need_weight:
        linear_ce_dw_kernel[(math.ceil(K / c["dw_BLOCK_K"]),)](
            hidden, weight, targets, lse, coef, scale, dw, **args, BLOCK_M=c["dw_BLOCK_M"], BLOCK_K=c["dw_BLOCK_K"],
            **_opts(c, "dw", cuda))
        dw.mul_(scale / float(temperature))
    return dh, dw
