"""RMSNorm with an optional fused residual add (DESIGN §3, §4 "fused kernels where they pay").

``h = x + r`` (rounded to x's dtype), ``y = w · round(h / sqrt(mean(h²) + eps))``: one read of
``x`` and ``r``, one write of ``h`` and ``y`` instead of the four passes of the unfused torch code.
Oracle: :mod:`ursa_engine.reference.rmsnorm` (same rounding points). No randomness.
Occupancy claim (compile report, sm_90a): ≥ 4 blocks an SM, no spills.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, h_ptr, w_ptr, y_ptr, n_cols, stride_x, stride_r, stride_h, stride_y,
                     eps, HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # 64-bit: rows × stride overflows int32 at video sizes
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
        h = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(h_ptr + row * stride_h + cols, h, mask=mask)
    else:
        h = x
    hf = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = (hf * rstd).to(x.dtype).to(tl.float32) * w
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm_config(n_cols: int) -> dict:
    """Launch configuration of a row of ``n_cols``: the whole row in one tile (BLOCK_N) and num_warps."""
    block = triton.next_power_of_2(n_cols)
    return dict(BLOCK_N=block, num_warps=4 if block <= 1024 else (8 if block <= 4096 else 16))


def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.stride(-1) != 1:
        raise ValueError(f"{name}: last dim must be contiguous, got strides {t.stride()}")
    return t.reshape(-1, t.shape[-1])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, residual: torch.Tensor | None = None,
             out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None):
    """Fused RMSNorm of ``x`` (..., N), or of ``h = x + residual`` when ``residual`` is given.

    Returns ``y`` (..., N), or ``(h, y)`` with a residual. ``out`` / ``residual_out`` are optional
    preallocated outputs (``residual_out`` may alias ``x`` or ``residual``: each element is read
    before it is written by the same program).
    """
    n = x.shape[-1]
    x2 = _rows(x, "x")
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    y2 = y.view(-1, n)  # outputs must be views: a reshape copy would lose the writes
    if residual is not None:
        r2 = _rows(residual, "residual")
        h = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual_out is None else residual_out
        h2 = h.view(-1, n)
    else:
        r2 = h2 = x2
    _rms_norm_kernel[(x2.shape[0],)](
        x_ptr=x2, r_ptr=r2, h_ptr=h2, w_ptr=weight, y_ptr=y2, n_cols=n,
        stride_x=x2.stride(0), stride_r=r2.stride(0), stride_h=h2.stride(0), stride_y=y2.stride(0),
        eps=eps, HAS_RESIDUAL=residual is not None, **rms_norm_config(n),
    )
    return y if residual is None else (h, y)
