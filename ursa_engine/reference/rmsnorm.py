"""RMSNorm (+ residual add), the dense oracle of ``triton_kernels/rmsnorm.py`` (DESIGN §3).

Rounding follows Qwen3 (HF ``Qwen3RMSNorm``): statistics in fp32, the normalized value cast back
to the input dtype, then multiplied by the weight in that dtype. The residual sum is rounded to
the input dtype before it is normalized, as an unfused ``h = x + r`` would be.
"""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``weight * (x / sqrt(mean(x²) + eps))`` over the last dim.

    Parameters
    ----------
    x : (..., N) float tensor
    weight : (N,) tensor, the same dtype as ``x``
    eps : added to the mean square (Qwen3: 1e-6)

    Returns
    -------
    (..., N) tensor of ``x``'s dtype
    """
    h = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 math (fp64 stays fp64: gradcheck)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual`` and ``rms_norm(h)``; returns ``(h, normed)``, both (..., N)."""
    h = x + residual
    return h, rms_norm(h, weight, eps)
