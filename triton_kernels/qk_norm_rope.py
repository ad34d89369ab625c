"""Per-head RMSNorm of q and k followed by 3D RoPE, in one pass (DESIGN §3, §4).

For every token, one program normalizes all heads of q (``program_id(1) == 0``) or of k (``== 1``)
and rotates pairs ``(j, j + D/2)`` by the token's cos / sin table row:
``n = w · round(x / rms(x))``; ``o₁ = n₁ cos − n₂ sin``, ``o₂ = n₂ cos + n₁ sin`` (fp32, rounded once).
q and k may be strided views of one fused qkv projection; outputs are (B, L, H, D) contiguous.
Oracle: :func:`ursa_engine.reference.rope.qk_norm_rope`. No randomness.
Occupancy claim (compile report, sm_90a): ≥ 4 blocks an SM, no spills.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_rope_heads(x_ptr, o_ptr, w_ptr, cos, sin, n_heads, stride_h, stride_oh, eps,
                     HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < n_heads) & (dims < HALF)
    x1 = tl.load(x_ptr + heads * stride_h + dims, mask=mask, other=0.0)
    x2 = tl.load(x_ptr + heads * stride_h + HALF + dims, mask=mask, other=0.0)
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    rstd = 1.0 / tl.sqrt((tl.sum(f1 * f1, axis=1) + tl.sum(f2 * f2, axis=1)) / (2 * HALF) + eps)
    w1 = tl.load(w_ptr + dims, mask=dims < HALF, other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + HALF + dims, mask=dims < HALF, other=0.0).to(tl.float32)
    # the rounding points of the unfused code: normalized value, then weight product, in x's dtype
    n1 = ((f1 * rstd[:, None]).to(x1.dtype).to(tl.float32) * w1).to(x1.dtype).to(tl.float32)
    n2 = ((f2 * rstd[:, None]).to(x1.dtype).to(tl.float32) * w2).to(x1.dtype).to(tl.float32)
    o1 = n1 * cos - n2 * sin
    o2 = n2 * cos + n1 * sin
    tl.store(o_ptr + heads * stride_oh + dims, o1.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(o_ptr + heads * stride_oh + HALF + dims, o2.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr, seq_len,
                         n_q_heads, n_kv_heads, sq_b, sq_l, sq_h, sk_b, sk_l, sk_h,
                         sqo_b, sqo_l, sqo_h, sko_b, sko_l, sko_h, sc_b, sc_l, eps,
                         HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    b = token // seq_len
    pos = token % seq_len
    dims = tl.arange(0, BLOCK_D)[None, :]
    trig = b * sc_b + pos * sc_l + dims
    cos = tl.load(cos_ptr + trig, mask=dims < HALF, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + trig, mask=dims < HALF, other=0.0).to(tl.float32)
    if tl.program_id(1) == 0:
        _norm_rope_heads(q_ptr + b * sq_b + pos * sq_l, qo_ptr + b * sqo_b + pos * sqo_l, wq_ptr, cos, sin,
                         n_q_heads, sq_h, sqo_h, eps, HALF, BLOCK_HQ, BLOCK_D)
    else:
        _norm_rope_heads(k_ptr + b * sk_b + pos * sk_l, ko_ptr + b * sko_b + pos * sko_l, wk_ptr, cos, sin,
                         n_kv_heads, sk_h, sko_h, eps, HALF, BLOCK_HKV, BLOCK_D)


def qk_norm_rope_config(n_q_heads: int, n_kv_heads: int, head_dim: int) -> dict:
    """Constexprs and num_warps of a launch: all heads of one token in one tile."""
    half = head_dim // 2
    return dict(HALF=half, BLOCK_HQ=triton.next_power_of_2(n_q_heads), BLOCK_HKV=triton.next_power_of_2(n_kv_heads),
                BLOCK_D=triton.next_power_of_2(half), num_warps=4)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, eps: float = 1e-6, *,
                 q_out: torch.Tensor | None = None, k_out: torch.Tensor | None = None):
    """Fused QK-norm + RoPE.

    Parameters
    ----------
    q : (B, L, Hq, D), k : (B, L, Hkv, D), last dim contiguous (strided views are fine)
    q_weight, k_weight : (D,)
    cos, sin : (L, D/2) or (B, L, D/2) fp32 with a contiguous last dim
    q_out, k_out : optional preallocated (B, L, H, D) outputs

    Returns
    -------
    (q_out, k_out), the input dtype
    """
    B, L, Hq, D = q.shape
    Hkv = k.shape[2]
    if D % 2 or k.shape[-1] != D or k.shape[:2] != (B, L):
        raise ValueError(f"q / k: incompatible shapes {tuple(q.shape)} and {tuple(k.shape)}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("q / k / cos / sin: last dim must be contiguous")
    if cos.stride() != sin.stride():
        raise ValueError("cos / sin: must have the same strides")
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device) if q_out is None else q_out
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device) if k_out is None else k_out
    sc_b = cos.stride(0) if cos.dim() == 3 else 0
    _qk_norm_rope_kernel[(B * L, 2)](
        q_ptr=q, k_ptr=k, qo_ptr=qo, ko_ptr=ko, wq_ptr=q_weight, wk_ptr=k_weight, cos_ptr=cos, sin_ptr=sin,
        seq_len=L, n_q_heads=Hq, n_kv_heads=Hkv,
        sq_b=q.stride(0), sq_l=q.stride(1), sq_h=q.stride(2), sk_b=k.stride(0), sk_l=k.stride(1), sk_h=k.stride(2),
        sqo_b=qo.stride(0), sqo_l=qo.stride(1), sqo_h=qo.stride(2),
        sko_b=ko.stride(0), sko_l=ko.stride(1), sko_h=ko.stride(2),
        sc_b=sc_b, sc_l=cos.stride(-2), eps=eps, **qk_norm_rope_config(Hq, Hkv, D),
    )
    return qo, ko
