"""Time schedules (DESIGN §2.2) and training-time sampling (DESIGN §2.3).

Scalar functions accept a float or a tensor and return the same kind.
"""

from __future__ import annotations

import math

import torch

KAPPA_SCHEDULES = ("linear", "cosine", "root", "arccos", "quadratic", "cubic")


def _is_tensor(t) -> bool:
    return isinstance(t, torch.Tensor)


def beta(t, alpha: float, c: float):
    """Metric path β(t) = c·(t/(1−t))^α; β(1) = ∞."""
    if _is_tensor(t):
        t64 = t.to(torch.float64)
        out = c * (t64 / (1 - t64)).pow(alpha)
        return torch.where(t64 >= 1, torch.full_like(t64, math.inf), out)
    if t >= 1:
        return math.inf
    return c * (t / (1 - t)) ** alpha


def beta_dot(t, alpha: float, c: float):
    """β̇(t) = c·α·t^(α−1)/(1−t)^(α+1) for t > 0, and β̇(0) = 0 (the reference's convention)."""
    if _is_tensor(t):
        t64 = t.to(torch.float64)
        pos = t64 > 0
        safe = torch.where(pos, t64, torch.ones_like(t64))
        out = c * alpha * safe.pow(alpha - 1) / (1 - safe).pow(alpha + 1)
        return torch.where(pos, out, torch.zeros_like(t64))
    if t <= 0:
        return 0.0
    return c * alpha * t ** (alpha - 1) / (1 - t) ** (alpha + 1)


def shift_time(t, shift: float):
    """Resolution shift ``t / (t + λ(1 − t))`` (λ > 1: more noise)."""
    if shift <= 0:
        raise ValueError(f"shift: must be > 0, got {shift}")
    if _is_tensor(t):
        t64 = t.to(torch.float64)
        return t64 / (t64 + shift * (1 - t64))
    denom = t + shift * (1 - t)
    return t / denom if denom > 0 else 0.0


def kappa(t, schedule: str = "linear", *, a: float = 0.0, b: float = 0.0):
    """κ(t) of the mixture / masked paths."""
    lib = torch if _is_tensor(t) else math
    t = t.to(torch.float64) if _is_tensor(t) else float(t)
    if schedule == "linear":
        return t
    if schedule == "cosine":
        return 1 - lib.cos(math.pi * t / 2)
    if schedule == "root":
        return lib.sqrt(t) if lib is math else t.sqrt()
    if schedule == "arccos":
        return 1 - 2 * (lib.acos(t) if lib is math else t.arccos()) / math.pi
    if schedule == "quadratic":
        return t * t
    if schedule == "cubic":
        return -2 * t**3 + 3 * t**2 + b * (t**3 - t**2) + a * (t**3 - 2 * t**2 + t)
    raise ValueError(f"schedule: expected one of {KAPPA_SCHEDULES}, got {schedule!r}")


def kappa_dot(t, schedule: str = "linear", *, a: float = 0.0, b: float = 0.0):
    """dκ/dt. At the end points where it diverges (root at 0, arccos at 1) it returns ∞."""
    is_t = _is_tensor(t)
    t = t.to(torch.float64) if is_t else float(t)
    if schedule == "linear":
        return torch.ones_like(t) if is_t else 1.0
    if schedule == "cosine":
        return (math.pi / 2) * (t * math.pi / 2).sin() if is_t else (math.pi / 2) * math.sin(math.pi * t / 2)
    if schedule == "root":
        if is_t:
            return torch.where(t > 0, 0.5 / t.clamp_min(1e-300).sqrt(), torch.full_like(t, math.inf))
        return 0.5 / math.sqrt(t) if t > 0 else math.inf
    if schedule == "arccos":
        if is_t:
            return torch.where(t < 1, 2 / (math.pi * (1 - t * t).clamp_min(1e-300).sqrt()),
                               torch.full_like(t, math.inf))
        return 2 / (math.pi * math.sqrt(1 - t * t)) if t < 1 else math.inf
    if schedule == "quadratic":
        return 2 * t
    if schedule == "cubic":
        return -6 * t**2 + 6 * t + b * (3 * t**2 - 2 * t) + a * (3 * t**2 - 4 * t + 1)
    raise ValueError(f"schedule: expected one of {KAPPA_SCHEDULES}, got {schedule!r}")


def sample_timesteps(shape, shift: float = 1.0, seed=0, *, device=None) -> torch.Tensor:
    """Training times (DESIGN §2.3): ``u ~ U(0,1)``, ``σ = 1 − 0.999u``,
    ``t = 1 − λσ / (1 + (λ−1)σ)``. Never reaches 1.

    shape : int or tuple — e.g. ``(B,)`` one time per sample or ``(B, T)`` one per latent frame
    (asynchronous scheduling; broadcast with :func:`frame_times_to_tokens`).
    seed : int or int64 tensor of shape (shape[0],) (DESIGN §2.5, tag TAG_TIMESTEP, lane 0).
    Returns float32 of ``shape``.
    """
    from .reference.rng import TAG_TIMESTEP, uniforms

    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if shift <= 0:
        raise ValueError(f"shift: must be > 0, got {shift}")
    u = uniforms(seed, shape, device or "cpu", tag=TAG_TIMESTEP)[0].to(torch.float64)
    sigma = 1 - 0.999 * u
    return (1 - shift * sigma / (1 + (shift - 1) * sigma)).to(torch.float32)


def frame_times_to_tokens(t_frames: torch.Tensor, latents_shape) -> torch.Tensor:
    """Broadcast per-frame times (B, T) to per-token times (B, T, H, W) (asynchronous mode)."""
    T, H, W = latents_shape
    if t_frames.dim() != 2 or t_frames.shape[1] != T:
        raise ValueError(f"t_frames: expected shape (B, {T}), got {tuple(t_frames.shape)}")
    return t_frames[:, :, None, None].expand(-1, T, H, W)
