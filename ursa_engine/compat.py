"""Drop-in replacement for URSA's ``KineticOptimalScheduler`` (DESIGN §8).

Same constructor arguments, method names and call semantics as the authors' scheduler, backed
by :class:`ursa_engine.Scheduler` and the paths, so every backend and the exact laws apply.
Randomness: a ``torch.Generator`` (or torch's global RNG when none is given) is consumed to
draw one 62-bit seed per call, which then keys the counter-based RNG of §2.5.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os

import torch

from . import _validate
from .codebook import Codebook
from .paths import MetricPath, MixturePath
from .scheduler import Scheduler
from .schedules import sample_timesteps as _sample_timesteps
from .schedules import shift_time


@dataclasses.dataclass
class KineticOptimalSchedulerOutput:
    """Result of :meth:`KineticOptimalScheduler.step`; indexable like diffusers' ``BaseOutput``
    (URSA's pipeline reads ``step(...)[0]``)."""

    prev_sample: torch.LongTensor

    def __getitem__(self, i):
        return self.to_tuple()[i]

    def to_tuple(self) -> tuple:
        return (self.prev_sample,)


# The ops name their arguments as the native API does; compat callers know URSA's names.
_URSA_NAMES = {"x1": "original_samples", "t": "timesteps", "x": "sample", "logits": "model_output"}


@contextlib.contextmanager
def _ursa_argument_names():
    try:
        yield
    except (ValueError, TypeError) as err:
        name, sep, rest = str(err).partition(": ")
        if sep and name in _URSA_NAMES:
            raise type(err)(f"{_URSA_NAMES[name]}: {rest}") from err
        raise


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
    shift : float, optional
        Time shift λ (default 1). ``alpha``, ``c`` and ``shift`` given here (not None) override
        ``scheduler_config.json`` on loading. ``eps`` is accepted for parity; the norm clamp is
        DESIGN §2.1's 1e-5.
    backend : str
        Sampler backend ("auto", "torch", "triton", "native").
    """

    def __init__(self, alpha=None, c=None, shift=None, eps=1e-5, *, backend: str = "auto", **kwargs):
        # arguments given here (not None) override scheduler_config.json on loading (DESIGN §3)
        self._overrides = {k: v for k, v in (("alpha", alpha), ("c", c), ("shift", shift)) if v is not None}
        self.alpha, self.c, self.shift, self.eps = alpha, c, float(1.0 if shift is None else shift), eps
        self.backend = backend
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

    def set_shift(self, shift: float):
        """Change the time shift λ (URSA's pipeline sets it per resolution)."""
        self.shift = float(shift)
        self._overrides["shift"] = self.shift
        if self.num_inference_steps is not None:
            self.set_timesteps(self.num_inference_steps)

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
        with _ursa_argument_names():
            return self.path.sample(original_samples, timesteps, seed=_seed_from(generator), backend=self.backend)

    # ------------------------------------------------------------------ sampling
    def set_timesteps(self, num_inference_steps, *args, **kwargs):
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps = list(range(self.num_inference_steps))
        # the grid needs no codebook; the sampler is built once one is loaded
        self._sched = None if self.path is None else Scheduler(self.path, self.num_inference_steps, shift=self.shift)

    def timestep_to_t(self, timestep) -> float:
        """t_k = shift(k / N)."""
        if self.num_inference_steps is None:
            raise RuntimeError("KineticOptimalScheduler: call set_timesteps(n) first")
        return float(shift_time(self.timesteps[timestep] / self.num_inference_steps, self.shift))

    def sample(self, model_output, generator=None) -> torch.Tensor:
        """x̂1 ~ softmax(model_output) (the last-step draw)."""
        self._require_path()
        sched = Scheduler(self.path, 1)
        x = torch.zeros(model_output.shape[:-1], dtype=torch.int64, device=model_output.device)
        return sched.step(model_output, 0, x, seed=_seed_from(generator), backend=self.backend)

    def step(self, model_output, timestep, sample, generator=None, return_dict=True, *, prev_sample=None):
        """One Euler step from ``sample`` = x_{t_k} (§2.4); the last step returns x̂1.

        ``prev_sample``, if given, is used as x̂1 instead of a draw from ``model_output``.
        """
        self._require_steps()
        k = int(timestep)
        logits = model_output
        if prev_sample is not None:
            with _ursa_argument_names():
                prev_sample = _validate.tokens("prev_sample", prev_sample, self.codebook_size)
            if k == self.num_inference_steps - 1:  # the last step returns x̂1 itself
                return KineticOptimalSchedulerOutput(prev_sample) if return_dict else (prev_sample,)
            # a fixed x̂1 mid-path: a one-hot law makes the draw deterministic (dense, compat only)
            logits = torch.full(model_output.shape, -torch.inf, dtype=torch.float32, device=model_output.device)
            logits.scatter_(-1, prev_sample.unsqueeze(-1), 0.0)
        with _ursa_argument_names():
            x = self._sched.step(logits, k, sample, seed=_seed_from(generator), backend=self.backend)
        return KineticOptimalSchedulerOutput(prev_sample=x) if return_dict else (x,)

    def _require_path(self):
        if self.path is None:
            raise RuntimeError("KineticOptimalScheduler: load a codebook first (from_pretrained)")

    def _require_steps(self):
        if self.num_inference_steps is None:
            raise RuntimeError("KineticOptimalScheduler: call set_timesteps(n) first")
        self._require_path()
        if self._sched is None:
            self._sched = Scheduler(self.path, self.num_inference_steps, shift=self.shift)
