"""Rollout trajectories: every model call's state, draw and log-probabilities (DESIGN §9, issue 18).

``Engine.generate(..., return_trajectory=True)`` records, per model call ``s`` (grid step ``k_s``;
the metric path's step 0 makes no call), for every latent token:

* ``states`` — ``x_k``, what the model saw; ``next_states`` — ``x_{k+1}`` after the step (and after
  frozen tokens were written back);
* ``x1`` — the drawn x̂1; ``x1_logprobs`` — ``log p(x̂1 | x_k)`` under the distribution the sampler
  drew from (guidance, temperature, top-k / top-p renormalised; :func:`ursa_engine.reference.logprobs.x1_logprobs`);
* ``step_logprobs`` — ``log P(x_{k+1} | x_k, x̂1)``, the one-step law given x̂1
  (:mod:`ursa_engine.reference.logprobs`). θ enters only through x̂1: ``x1_logprobs`` carries the
  policy gradient, and ``x1_logprobs + step_logprobs`` is the log-probability of the action
  ``(x̂1, x_{k+1})``.

How a step is recorded (:func:`record_step`): the x̂1 draw and the rest of the step are split —
``Scheduler.draw`` (the backend's own lane-0 draw, so tokens equal an unrecorded run) or the fused
head with its ``logprobs=`` output, then ``Scheduler.step(x1=...)``. For logits-reading backends
``x1_logprobs`` is one more float64 pass over each token range's logits, which exist at that
moment anyway; the fused head hands out the log-sum-exp of its first pass (no extra pass over K).
Recording runs eagerly (no CUDA graphs) and costs one host-side copy of the tokens per call.

Frozen tokens (``freeze_cond``) are not the policy's actions: their ``step_logprobs`` are 0 and
``frozen`` marks them; :attr:`Trajectory.policy_mask` also leaves out the masked path's already
unmasked tokens (their x̂1 never acts). With ``argmax_last`` the last call chooses deterministically:
its ``x1_logprobs`` are 0. The model's norm / RoPE / SwiGLU run on their torch twins while recording
(the ops a replay differentiates). The confidence (MaskGIT) sampler couples a sample's tokens and has
no per-token law: recording it raises.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .paths import MaskPath, MetricPath, MixturePath
from .reference import logprobs as ref


@dataclass
class Trajectory:
    """One rollout of a batch of B samples over S model calls, token grid ``(T, h, w)``.

    states, next_states, x1 : (B, S, T, h, w) int64
    x1_logprobs, step_logprobs : (B, S, T, h, w) float32
    steps : (S,) int64 grid index k of each call; times : (S,) float64 ``t_k``; guided : (S,) bool (CFG on)
    seeds : (B,) int64 per-sample seeds
    prompt_ids : (B, P) the padded prompt ids the model saw; negative_prompt_ids : (B, P) or None
    frozen : (B, T, h, w) bool, tokens written back from given frames or ``known_tokens`` (not actions), or None
    options : guidance_scale, guidance_trunc, temperature, top_k, top_p, argmax_last
    scheduler : the :class:`~ursa_engine.Scheduler` that stepped (its path, grid and step values)
    """

    states: torch.Tensor
    next_states: torch.Tensor
    x1: torch.Tensor
    x1_logprobs: torch.Tensor
    step_logprobs: torch.Tensor
    steps: torch.Tensor
    times: torch.Tensor
    guided: torch.Tensor
    seeds: torch.Tensor
    prompt_ids: torch.Tensor
    negative_prompt_ids: torch.Tensor | None = None
    frozen: torch.Tensor | None = None
    options: dict = field(default_factory=dict)
    scheduler: object = None

    @property
    def num_calls(self) -> int:
        return int(self.steps.numel())

    @property
    def policy_mask(self) -> torch.Tensor:
        """(B, S, T, h, w) bool: the tokens whose x̂1 can move them — the terms a policy gradient needs.

        False for frozen tokens, and on the masked path for tokens already unmasked (their x̂1 is drawn
        but never used: including them adds variance, not signal).
        """
        mask = torch.ones_like(self.states, dtype=torch.bool)
        path = getattr(self.scheduler, "path", None)
        if isinstance(path, MaskPath):
            mask = self.states == path.mask_id
        if self.frozen is not None:
            mask = mask & ~self.frozen[:, None]
        return mask

    @property
    def action_logprobs(self) -> torch.Tensor:
        """``x1_logprobs + step_logprobs``: log-probability of the action (x̂1, x_{k+1}), (B, S, T, h, w)."""
        return self.x1_logprobs + self.step_logprobs


def step_logprobs(sched, k: int, x: torch.Tensor, x1: torch.Tensor, x_next: torch.Tensor) -> torch.Tensor:
    """``log P(x_next | x, x̂1)`` of :meth:`Scheduler.step` at step ``k`` (DESIGN §2.4, §9), float32 like ``x``.

    Euler steps of every path; the confidence sampler has no per-token law (raises).
    """
    if sched.mask_sampler == "confidence":
        raise ValueError("return_trajectory: the confidence sampler ranks a sample's tokens together; "
                         "its step has no per-token law")
    path, shape = sched.path, x.shape
    x, x1, x_next = x.reshape(-1), x1.reshape(-1), x_next.reshape(-1)
    params, last = sched._params64[k].to(x.device), k == sched.num_steps - 1
    if isinstance(path, MetricPath):
        lp = ref.metric_step_logprobs(x, x1, x_next, path.codebook.normalized_on(x.device), params,
                                      power=path.power, last=last)
    elif isinstance(path, MixturePath):
        lp = ref.mixture_step_logprobs(x, x1, x_next, params, last=last)
    else:
        lp = ref.mask_step_logprobs(x, x1, x_next, params, mask_id=path.mask_id, last=last)
    return lp.to(torch.float32).view(shape)


def logits_x1_logprobs(sched, cond: torch.Tensor, uncond: torch.Tensor | None, x1: torch.Tensor,
                       opts: dict) -> torch.Tensor:
    """``x1_logprobs`` (float32, shaped like ``x1``) from one token range's logits (S + (K,)); the
    sampler's own ``z`` (guidance as given: pass ``uncond=None`` past the truncation)."""
    K = cond.shape[-1]
    exclude = sched.path.mask_id if isinstance(sched.path, MaskPath) else None
    lp = ref.x1_logprobs(cond.reshape(-1, K), None if uncond is None else uncond.reshape(-1, K), x1.reshape(-1),
                         guidance_scale=opts["guidance_scale"], temperature=opts["temperature"],
                         top_k=opts["top_k"], top_p=opts["top_p"], exclude=exclude)
    return lp.to(torch.float32).view(x1.shape)


class TrajectoryRecorder:
    """Buffers of a recording generation (B samples of n tokens): one entry per model call."""

    def __init__(self, B: int, n: int, device):
        self.B, self.n, self.device = B, n, device
        self.x1 = torch.empty(B, n, dtype=torch.int64, device=device)  # this call's x̂1, filled range by range
        self.x1_logprobs = torch.empty(B, n, dtype=torch.float32, device=device)
        self.calls: list[dict] = []

    def add(self, k: int, t: float, guided: bool, x: torch.Tensor, x_next: torch.Tensor,
            step_lp: torch.Tensor) -> None:
        self.calls.append(dict(k=k, t=t, guided=guided, x=x.clone(), x_next=x_next.clone(), x1=self.x1.clone(),
                               x1_lp=self.x1_logprobs.clone(), step_lp=step_lp))

    def finish(self, shape: tuple[int, ...], *, seeds, prompt_ids, negative_prompt_ids, frozen, options,
               scheduler) -> Trajectory:
        B, S = self.B, len(self.calls)

        def stack(key, dtype):
            if not S:
                return torch.empty(B, 0, *shape, dtype=dtype, device=self.device)
            return torch.stack([c[key] for c in self.calls], 1).view(B, S, *shape)

        return Trajectory(
            states=stack("x", torch.int64), next_states=stack("x_next", torch.int64), x1=stack("x1", torch.int64),
            x1_logprobs=stack("x1_lp", torch.float32), step_logprobs=stack("step_lp", torch.float32),
            steps=torch.tensor([c["k"] for c in self.calls], dtype=torch.int64),
            times=torch.tensor([c["t"] for c in self.calls], dtype=torch.float64),
            guided=torch.tensor([c["guided"] for c in self.calls], dtype=torch.bool),
            seeds=seeds.clone(), prompt_ids=prompt_ids.clone(),
            negative_prompt_ids=None if negative_prompt_ids is None else negative_prompt_ids.clone(),
            frozen=None if frozen is None else frozen.expand(B, -1).reshape(B, *shape).clone(),
            options=dict(options), scheduler=scheduler)
