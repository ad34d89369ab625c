"""Probability paths p_t(· | x1) (DESIGN §2.3): metric, uniform mixture and masked.

Each path offers ``probs`` (the exact law, dense) and ``sample`` (a draw under the RNG contract
of §2.5, on any backend). Times are per token: a float, or a tensor broadcastable to the tokens'
shape S (one per token, per frame or per sample — a (B,) tensor is one time per sample).
"""

from __future__ import annotations

import torch

from . import _validate, schedules
from ._dispatch import resolve
from .codebook import Codebook
from .reference import laws
from .reference.rng import seeds_per_row


class _Path:
    size: int

    def _prepare(self, x1, t):
        x1 = _validate.tokens("x1", x1, self.size)
        tt = _validate.times("t", t, tuple(x1.shape), x1.device)
        return x1, tt

    def _out(self, out, x1):
        if out is None:
            return torch.empty(x1.numel(), dtype=torch.int64, device=x1.device)
        if out.shape != x1.shape or out.dtype != torch.int64 or out.device != x1.device:
            raise ValueError(f"out: expected an int64 tensor of shape {tuple(x1.shape)} on {x1.device}")
        if not out.is_contiguous():
            raise ValueError("out: must be contiguous")
        return out.view(-1)


class MetricPath(_Path):
    """``p_t(x | x1) = softmax_x(−β(t)·d(x, x1))``, ``β(t) = c·(t/(1−t))^α`` (§2.2, §2.3).

    Parameters
    ----------
    codebook : Codebook
    alpha, c : float
        Paper settings: (1.0, 5) for Cosmos FSQ, (0.5, 6) for IBQ.
    power : {2, 4}
        2 is URSA's squared distance; 4 its square (FUDOKI).
    """

    def __init__(self, codebook: Codebook, alpha: float = 1.0, c: float = 5.0, *, power: int = 2):
        if not isinstance(codebook, Codebook):
            raise TypeError(f"codebook: expected a ue.Codebook, got {type(codebook).__name__}")
        self.codebook = codebook
        self.alpha = _validate.positive("alpha", alpha)
        self.c = _validate.positive("c", c)
        if power not in (2, 4):
            raise ValueError(f"power: must be 2 or 4, got {power!r}")
        self.power = power

    @property
    def size(self) -> int:
        return self.codebook.size

    def beta(self, t):
        return schedules.beta(t, self.alpha, self.c)

    def beta_dot(self, t):
        return schedules.beta_dot(t, self.alpha, self.c)

    def probs(self, x1: torch.Tensor, t) -> torch.Tensor:
        """Exact p_t(· | x1): float64 of shape S + (K,)."""
        x1, tt = self._prepare(x1, t)
        table = self.codebook.normalized_on(x1.device)
        p = laws.metric_path_probs(x1.reshape(-1), self.beta(tt).reshape(-1), table, power=self.power)
        return p.view(*x1.shape, self.size)

    def sample(self, x1: torch.Tensor, t, seed=0, backend: str = "auto", *, out=None) -> torch.Tensor:
        """x_t ~ p_t(· | x1) per token (RNG: TAG_PATH, lane 0). Returns int64 of shape S."""
        x1, tt = self._prepare(x1, t)
        seeds, row_len = seeds_per_row(seed, tuple(x1.shape), x1.device)
        flat_out = self._out(out, x1)
        fn = resolve("metric_sample", backend, x1.device, shape=(x1.numel(), self.size))
        beta = self.beta(tt).to(torch.float32).reshape(-1).contiguous()
        fn(x1.reshape(-1).contiguous(), beta, self.codebook.normalized_on(x1.device), power=self.power,
           levels=self.codebook.levels, seeds=seeds, row_len=row_len, out=flat_out)
        return flat_out.view(x1.shape)

    def __repr__(self):
        return f"MetricPath({self.codebook!r}, alpha={self.alpha}, c={self.c}, power={self.power})"


class _KappaPath(_Path):
    def __init__(self, K: int, schedule: str = "linear", *, a: float = 0.0, b: float = 0.0):
        if not isinstance(K, int) or isinstance(K, bool) or K < 2:
            raise ValueError(f"K: must be an int >= 2, got {K!r}")
        if schedule not in schedules.KAPPA_SCHEDULES:
            raise ValueError(f"schedule: expected one of {schedules.KAPPA_SCHEDULES}, got {schedule!r}")
        self.K, self.schedule, self.a, self.b = K, schedule, float(a), float(b)
        if schedule == "cubic":  # a, b must keep κ a non-decreasing map of [0, 1] onto [0, 1]
            grid = torch.linspace(0, 1, 1001, dtype=torch.float64)
            k, kd = self.kappa(grid), self.kappa_dot(grid)
            if (k < -1e-12).any() or (k > 1 + 1e-12).any() or (kd < -1e-12).any():
                raise ValueError(f"a, b: the cubic schedule with a={a}, b={b} leaves [0, 1] or decreases")

    @property
    def size(self) -> int:
        return self.K

    def kappa(self, t):
        return schedules.kappa(t, self.schedule, a=self.a, b=self.b)

    def kappa_dot(self, t):
        return schedules.kappa_dot(t, self.schedule, a=self.a, b=self.b)

    def rate(self, t: float) -> float:
        """κ̇/(1−κ): the jump (unmask) intensity at t < 1."""
        return self.kappa_dot(t) / (1 - self.kappa(t))

    def _keep(self, tt):
        return self.kappa(tt).clamp(0, 1)


class MixturePath(_KappaPath):
    """``x_t = x1`` with probability κ(t), else uniform over [0, K) (§2.3)."""

    def probs(self, x1, t):
        x1, tt = self._prepare(x1, t)
        p = laws.mixture_path_probs(x1.reshape(-1), self._keep(tt).reshape(-1), self.K)
        return p.view(*x1.shape, self.K)

    def sample(self, x1, t, seed=0, backend: str = "auto", *, out=None):
        """Lane 1 keeps x1 (u < κ), lane 2 draws the uniform code (TAG_PATH)."""
        x1, tt = self._prepare(x1, t)
        seeds, row_len = seeds_per_row(seed, tuple(x1.shape), x1.device)
        flat_out = self._out(out, x1)
        fn = resolve("mixture_sample", backend, x1.device, shape=(x1.numel(), self.size))
        keep = self._keep(tt).to(torch.float32).reshape(-1).contiguous()
        fn(x1.reshape(-1).contiguous(), keep, K=self.K, seeds=seeds, row_len=row_len, out=flat_out)
        return flat_out.view(x1.shape)

    def __repr__(self):
        return f"MixturePath(K={self.K}, schedule={self.schedule!r})"


class MaskPath(_KappaPath):
    """``x_t = x1`` with probability κ(t), else ``mask_id`` (Discrete Interpolants).

    ``K`` counts every state, the mask included: ``mask_id`` lies in [0, K) and is never drawn
    as a prediction x̂1. A model with 1,024 codes and an extra mask token uses K = 1025,
    mask_id = 1024.
    """

    def __init__(self, K: int, mask_id: int | None = None, schedule: str = "linear", *,
                 a: float = 0.0, b: float = 0.0):
        super().__init__(K, schedule, a=a, b=b)
        mask_id = K - 1 if mask_id is None else mask_id
        if not isinstance(mask_id, int) or not 0 <= mask_id < K:
            raise ValueError(f"mask_id: must be an int in [0, {K}), got {mask_id!r}")
        self.mask_id = mask_id

    def probs(self, x1, t):
        x1, tt = self._prepare(x1, t)
        p = laws.mask_path_probs(x1.reshape(-1), self._keep(tt).reshape(-1), self.K, self.mask_id)
        return p.view(*x1.shape, self.K)

    def sample(self, x1, t, seed=0, backend: str = "auto", *, out=None):
        """Lane 1 keeps x1 (u < κ), else the mask id (TAG_PATH)."""
        x1, tt = self._prepare(x1, t)
        seeds, row_len = seeds_per_row(seed, tuple(x1.shape), x1.device)
        flat_out = self._out(out, x1)
        fn = resolve("mask_sample", backend, x1.device, shape=(x1.numel(), self.size))
        keep = self._keep(tt).to(torch.float32).reshape(-1).contiguous()
        fn(x1.reshape(-1).contiguous(), keep, mask_id=self.mask_id, seeds=seeds, row_len=row_len,
           out=flat_out)
        return flat_out.view(x1.shape)

    def __repr__(self):
        return f"MaskPath(K={self.K}, mask_id={self.mask_id}, schedule={self.schedule!r})"
