"""Drop-in replacement for URSA's ``KineticOptimalScheduler`` (DESIGN §8).

Same constructor arguments, method names and call semantics as the authors' scheduler, backed
by :class:`ursa_engine.Scheduler` and the paths, so every backend and the exact laws apply.
Randomness: a ``torch.Generator`` (or torch's global RNG when none is given) is consumed to
draw one 62-bit seed per call, which then keys the counter-based RNG of §2.5.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from .codebook import Codebook
from .paths import MetricPath, MixturePath
from .scheduler import Scheduler
from .schedules import sample_timesteps as _sample_timesteps


@dataclasses.dataclass
class KineticOptimalSchedulerOutput:
    """Result of :meth:`KineticOptimalScheduler.step`."""

    prev_sample: torch.LongTensor


def _seed_from(generator: torch.Generator | None, device=None) -> int:
    if generator is not None:
        return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    return int(torch.randint(0, 2**62, (1,)))


class KineticOptimalScheduler:
    """URSA's scheduler interface: metric path when ``alpha`` is set, else the mixture path.

    Parameters
    ----------
    alpha, c : float, optional
        Metric-path schedule β(t) = c·(t/(1−t))^α; ``alpha=None`` selects the uniform mixture
        path with κ(t) = t.
    shift : float
        Time shift λ. Arguments given here override ``scheduler_config.json`` on loading.
    backend : str
        Sampler backend ("auto", "torch", "triton", "native").
    """

    def __init__(self, alpha=None, c=None, shift=1.0, eps=1e-5, *, backend: str = "auto", **kwargs):
        self.alpha, self.c, self.shift, self.eps = alpha, c, float(shift), eps
        self.backend = backend
        self._overrides = {"shift": float(shift)} if shift != 1.0 else {}
        if alpha is not None:
            self._overrides["alpha"] = alpha
        if c is not None:
            self._overrides["c"] = c
        self.path, self.codebook_size = None, 0
        self.num_inference_steps, self.timesteps, self._sched = None, None, None

    def __repr__(self) -> str:
        name = type(self).__name__
        if self.alpha is None:
            return f"{name}(shift={self.shift})"
        return f"{name}(alpha={self.alpha}, c={self.c}, shift={self.shift})"

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_path, device=None, dtype=None, **kwargs) -> "KineticOptimalScheduler":
        """Load ``scheduler_config.json`` and the codebook from a scheduler folder."""
        return cls(**kwargs).load_pretrained(pretrained_path, device, dtype)

    def load_pretrained(self, pretrained_path, device=None, dtype=None, **kwargs) -> "KineticOptimalScheduler":
        path = os.fspath(pretrained_path)
        cfg_file = os.path.join(path, "scheduler_config.json")
        if not os.path.isfile(cfg_file):
            raise FileNotFoundError(f"pretrained_path: {path!r} has no scheduler_config.json")
        with open(cfg_file) as f:
            try:
                cfg = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"pretrained_path: {cfg_file!r} is not valid JSON ({err})") from err
        cfg.update(self._overrides)
        cfg.update({k: v for k, v in kwargs.items() if k in ("alpha", "c", "shift")})
        self.alpha, self.c = cfg.get("alpha"), cfg.get("c")
        self.shift = float(cfg.get("shift", 1.0) or 1.0)
        codebook = Codebook.from_pretrained(path)
        if self.alpha is None:
            self.path = MixturePath(codebook.size)
        else:
            if self.c is None:
                raise ValueError(f"pretrained_path: {cfg_file!r} sets alpha but not c")
            self.path = MetricPath(codebook, alpha=float(self.alpha), c=float(self.c))
        self.codebook_size = codebook.size
        return self

    def to(self, device=None, dtype=None) -> "KineticOptimalScheduler":
        """Kept for interface parity: tables move to the inputs' device on first use."""
        return self

    # ------------------------------------------------------------------ training
    def sample_timesteps(self, size, device=None, generator=None) -> torch.Tensor:
        """Training times ``t = 1 − λσ/(1 + (λ−1)σ)``, ``σ = 1 − 0.999u`` (§2.3)."""
        return _sample_timesteps(size, shift=self.shift, seed=_seed_from(generator), device=device)

    def add_noise(self, original_samples, timesteps, generator=None) -> torch.Tensor:
        """x_t ~ p_t(· | x1); ``timesteps`` is a float or one time per sample (bsz,) or per token."""
        self._require_path()
        return self.path.sample(original_samples, timesteps, seed=_seed_from(generator), backend=self.backend)

    # ------------------------------------------------------------------ sampling
    def set_timesteps(self, num_inference_steps, *args, **kwargs):
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps = list(range(self.num_inference_steps))
        self._require_path()
        self._sched = Scheduler(self.path, self.num_inference_steps, shift=self.shift)

    def timestep_to_t(self, timestep) -> float:
        """t_k = shift(k / N)."""
        self._require_steps()
        return float(self._sched.times[self.timesteps[timestep]])

    def sample(self, model_output, generator=None) -> torch.Tensor:
        """x̂1 ~ softmax(model_output) (the last-step draw)."""
        self._require_path()
        sched = Scheduler(self.path, 1)
        x = torch.zeros(model_output.shape[:-1], dtype=torch.int64, device=model_output.device)
        return sched.step(model_output, 0, x, seed=_seed_from(generator), backend=self.backend)

    def step(self, model_output, timestep, sample, prev_sample=None, generator=None, return_dict=True):
        """One Euler step from ``sample`` = x_{t_k} (§2.4); the last step returns x̂1.

        ``prev_sample``, if given, is used as x̂1 instead of a draw from ``model_output``.
        """
        self._require_steps()
        k = int(timestep)
        logits = model_output
        if prev_sample is not None:  # a fixed x̂1: a one-hot law makes the draw deterministic
            logits = torch.full_like(model_output, -torch.inf, dtype=torch.float32)
            logits.scatter_(-1, prev_sample.unsqueeze(-1).to(torch.int64), 0.0)
        x = self._sched.step(logits, k, sample, seed=_seed_from(generator), backend=self.backend)
        return KineticOptimalSchedulerOutput(prev_sample=x) if return_dict else (x,)

    def _require_path(self):
        if self.path is None:
            raise RuntimeError("KineticOptimalScheduler: load a codebook first (from_pretrained)")

    def _require_steps(self):
        if self._sched is None:
            raise RuntimeError("KineticOptimalScheduler: call set_timesteps(n) first")
