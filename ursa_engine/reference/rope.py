"""3D rotary position embedding and QK-norm + RoPE: the oracle of ``triton_kernels/qk_norm_rope.py``.

DESIGN §3: a head of dimension ``D`` has ``D/2`` rotary pairs ``(j, j + D/2)`` (rotate-half
layout) with frequency ``θ^(−2j/D)``. With ``n3 = 3·(D // 8)`` (48 for D = 128), pair ``j`` reads
position axis ``j mod 3`` for ``j < n3`` and axis ``1 + (j − n3) mod 2`` after (t/h/w axes, so
temporal frequencies are the high ones only). Text tokens have equal coordinates on all three
axes, so the 3D RoPE reduces to the 1D RoPE of Qwen3 there.

Angles are computed in fp32 as URSA does (``pos * (1 / θ^(2j/D))``); the rotation of a vector
is done in fp32 and rounded once to the input dtype.
"""

from __future__ import annotations

import torch

from .rmsnorm import rms_norm


def rope_axes(head_dim: int) -> torch.Tensor:
    """Position axis (0 = t, 1 = h, 2 = w) read by each of the ``head_dim // 2`` rotary pairs."""
    if head_dim % 2:
        raise ValueError(f"head_dim: must be even, got {head_dim}")
    half, n3 = head_dim // 2, 3 * (head_dim // 8)
    j = torch.arange(half)
    return torch.where(j < n3, j % 3, 1 + (j - n3) % 2)


def inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """(head_dim // 2,) fp32 frequencies ``1 / θ^(2j/D)``."""
    scale = torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim
    return torch.pow(theta, scale).reciprocal()


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin tables for integer 3D positions.

    Parameters
    ----------
    positions : (..., L, 3) integer tensor (t, h, w coordinates per token)
    head_dim, theta : head dimension ``D`` and RoPE base

    Returns
    -------
    cos, sin : (..., L, D // 2) fp32 tensors on ``positions``' device
    """
    if positions.shape[-1] != 3:
        raise ValueError(f"positions: last dim must be 3 (t, h, w), got shape {tuple(positions.shape)}")
    axes = rope_axes(head_dim).to(positions.device)
    pos = positions.index_select(-1, axes).float()  # (..., L, D/2): the coordinate each pair reads
    angle = pos * inv_freq(head_dim, theta, positions.device)
    return angle.cos(), angle.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(j, j + D/2)`` of ``x`` (B, L, H, D) by tables (L, D/2) or (B, L, D/2)."""
    half = x.shape[-1] // 2
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 math (fp64 stays fp64)
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q and k, then RoPE (DESIGN §3).

    Parameters
    ----------
    q : (B, L, Hq, D);  k : (B, L, Hkv, D)
    q_weight, k_weight : (D,) norm weights
    cos, sin : (L, D/2) or (B, L, D/2) fp32 tables from :func:`rope_tables`

    Returns
    -------
    q_out (B, L, Hq, D), k_out (B, L, Hkv, D), contiguous, the input dtype
    """
    return (apply_rope(rms_norm(q, q_weight, eps), cos, sin).contiguous(),
            apply_rope(rms_norm(k, k_weight, eps), cos, sin).contiguous())
