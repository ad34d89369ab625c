"""SwiGLU ``silu(gate) · up`` in one pass (DESIGN §3, §4).

``gate`` and ``up`` may be two halves of one fused ``gate_up`` projection output (row-strided
views): the kernel reads both and writes the product once. Rounding mirrors the unfused torch
code (``silu`` rounded to the dtype, then the product). Oracle: :mod:`ursa_engine.reference.swiglu`.
Occupancy claim (compile report, sm_90a): ≥ 4 blocks an SM, no spills.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _swiglu_kernel(g_ptr, u_ptr, o_ptr, n_cols, stride_g, stride_u, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    gf = g.to(tl.float32)
    s = (gf * tl.sigmoid(gf)).to(g.dtype).to(tl.float32)
    tl.store(o_ptr + row * stride_o + cols, (s * u).to(o_ptr.dtype.element_ty), mask=mask)


def swiglu_config(n_cols: int) -> dict:
    """Launch configuration: BLOCK columns a program (grid: rows × ⌈n_cols / BLOCK⌉) and num_warps."""
    return dict(BLOCK=min(1024, triton.next_power_of_2(n_cols)), num_warps=4)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up`` for (..., I) tensors whose last dim is contiguous; returns (..., I)."""
    if gate.shape != up.shape:
        raise ValueError(f"gate / up: shapes differ, {tuple(gate.shape)} vs {tuple(up.shape)}")
    if gate.stride(-1) != 1 or up.stride(-1) != 1:
        raise ValueError("gate / up: last dim must be contiguous")
    n = gate.shape[-1]
    g2, u2 = gate.reshape(-1, n), up.reshape(-1, n)
    o = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device) if out is None else out
    o2 = o.view(-1, n)
    c = swiglu_config(n)
    grid = (g2.shape[0], triton.cdiv(n, c["BLOCK"]))
    _swiglu_kernel[grid](g_ptr=g2, u_ptr=u2, o_ptr=o2, n_cols=n, stride_g=g2.stride(0),
                         stride_u=u2.stride(0), stride_o=o2.stride(0), **c)
    return o
