"""Replay a rollout with gradients: the x̂1 log-probabilities of chosen model calls (DESIGN §9, issue 18).

:func:`trajectory_logprobs` rebuilds, for each chosen call ``s`` of a
:class:`~ursa_engine.trajectory.Trajectory`, the model's input ``[prompt, BOV, x_k]`` (and the
negative prompt's rows when that call was guided), runs the model with autograd and returns
``log softmax(z)[x̂1]`` per token — ``z`` formed exactly as the sampler formed it (guidance, ``c``
where ``c == u``, temperature, top-k / top-p renormalised, the mask id excluded) — so that with
unchanged weights it equals the rollout's ``x1_logprobs`` up to float rounding (the train–inference
mismatch an RL stack must not have). Guided rows differentiate through both halves.

Memory: the (tokens, K) logits never exist in full. Each range of rows computes its logits, their
log-softmax and the picked value under :func:`torch.utils.checkpoint.checkpoint`, so only the
(rows) results are kept and the backward recomputes one range at a time. Unguided, unfiltered
calls go through :func:`~ursa_engine.training.losses.linear_logprobs` (the fused linear
log-probability with ``backend=``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..model import URSATransformer, latent_positions, sequence_ids
from ..paths import MaskPath
from ..reference.sampler import guided_logits
from ..trajectory import Trajectory, step_logprobs
from . import losses

# Byte budget of one range's float64 logits in the replay (several such buffers live during a range).
REPLAY_CHUNK_BYTES = 64 * 2**20


@dataclass
class Replay:
    """What :func:`trajectory_logprobs` returns for the chosen calls ``steps`` (indices into the trajectory).

    x1_logprobs : (B, len(steps), T, h, w) float32 (float64 for a float64 model), differentiable in the
        model's parameters
    step_logprobs : (B, len(steps), T, h, w) float32 (no θ in them; no gradient), or None
    steps : the call indices replayed
    """

    x1_logprobs: torch.Tensor
    step_logprobs: torch.Tensor | None
    steps: list[int]


def _range_logprobs(hc, hu, weight, x1, scale: float, temperature: float, top_k: int, top_p: float,
                    exclude: int | None) -> torch.Tensor:
    """``log softmax(z)[x̂1]`` (rows,) float64 for one range of rows: hc / hu (rows, H), x1 (rows,)."""
    c = F.linear(hc, weight)  # the rollout's lm_head, in the model's dtype (bf16 logits are rounded as sampled)
    u = None if hu is None else F.linear(hu, weight)
    kept = None
    if top_k or top_p < 1.0 or exclude is not None:
        with torch.no_grad():  # which codes the filtering keeps (no gradient through a choice)
            kept = guided_logits(c, u, guidance_scale=scale, temperature=temperature, top_k=top_k, top_p=top_p,
                                 exclude=exclude) != -torch.inf
    z = c.double()
    if u is not None:
        u = u.double()
        # u + s(c − u) everywhere (where c == u its value is u and its gradient splits s / 1 − s); the
        # sampler's "z = c where c == u" rule matters only for −inf codes, kept as such
        z = torch.where((z == u) & torch.isinf(u), u, u + scale * (z - u))
    z = z / temperature
    if kept is not None:
        z = z.masked_fill(~kept, -torch.inf)
    return torch.log_softmax(z, dim=-1).gather(-1, x1.unsqueeze(-1)).squeeze(-1)


def guided_logprobs(hidden: torch.Tensor, weight: torch.Tensor, x1: torch.Tensor, *,
                    uncond_hidden: torch.Tensor | None = None, guidance_scale: float = 1.0, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, exclude: int | None = None, backend: str = "auto",
                    chunk_rows: int | None = None) -> torch.Tensor:
    """``log softmax(z)[x̂1]`` of the logits ``hidden @ weight.T`` as the sampler forms ``z`` (§2.4), with autograd.

    Parameters
    ----------
    hidden, uncond_hidden : (D, H) final-normed hidden states (cond, and uncond while guided)
    weight : (K, H) ``lm_head.weight``
    x1 : (D,) int64 the drawn ids
    guidance_scale, temperature, top_k, top_p, exclude : the sampler's options (exclude: the mask id)
    backend : the fused linear log-probability's, for unguided unfiltered rows
    chunk_rows : rows a range (default: a float64 (rows, K) buffer within :data:`REPLAY_CHUNK_BYTES`)

    Returns
    -------
    (D,) float32 (float64 for float64 hidden states: gradient checks)
    """
    D, K = hidden.shape[0], weight.shape[0]
    # The fused linear log-prob works on fp32 logits: it equals the sampled law for fp32 / fp64 models. A
    # bf16 / fp16 rollout drew from logits rounded to that dtype (lm_head's output, the fused head's
    # rounding): those rows take the ranges below, which round the same way (no train–inference mismatch).
    plain = (uncond_hidden is None and not top_k and top_p >= 1.0 and exclude is None
             and hidden.dtype in (torch.float32, torch.float64))
    if plain:
        return losses.linear_logprobs(hidden, weight, x1, temperature=temperature, backend=backend,
                                      **({"chunk_size": chunk_rows} if chunk_rows else {}))
    rows = chunk_rows or max(1, REPLAY_CHUNK_BYTES // (8 * K))
    parts = []
    for s in range(0, D, rows):
        hu = None if uncond_hidden is None else uncond_hidden[s : s + rows]
        args = (hidden[s : s + rows], hu, weight, x1[s : s + rows], float(guidance_scale), float(temperature),
                int(top_k), float(top_p), exclude)
        if torch.is_grad_enabled():
            parts.append(checkpoint(_range_logprobs, *args, use_reentrant=False))
        else:
            parts.append(_range_logprobs(*args))
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    return torch.cat(parts).to(dtype) if parts else hidden.new_zeros(0, dtype=dtype)


def _call_indices(steps, S: int) -> list[int]:
    if steps is None:
        return list(range(S))
    if isinstance(steps, torch.Tensor):
        steps = steps.reshape(-1).tolist()
    elif isinstance(steps, int):
        steps = [steps]
    out = [int(s) for s in steps]
    bad = [s for s in out if not -S <= s < S]
    if bad:
        raise ValueError(f"steps: call indices must be in [-{S}, {S}) (the trajectory's {S} model calls; negative "
                         f"counts from the end), got {bad}")
    return [s % S for s in out]


def trajectory_logprobs(model: URSATransformer, prompt_ids: torch.Tensor | None, trajectory: Trajectory,
                        steps=None, *, negative_prompt_ids: torch.Tensor | None = None,
                        guidance_scale: float | None = None, temperature: float | None = None,
                        top_k: int | None = None, top_p: float | None = None, ops_backend: str = "torch",
                        backend: str = "auto", with_step_logprobs: bool = True,
                        chunk_rows: int | None = None) -> Replay:
    """Recompute a rollout's ``x1_logprobs`` for the chosen calls with autograd (DESIGN §9).

    Parameters
    ----------
    model : the URSATransformer to differentiate (the policy; its weights may have moved since the rollout)
    prompt_ids : (B, P) padded prompt ids, or None for the trajectory's own
    trajectory : from ``Engine.generate(..., return_trajectory=True)``
    steps : call indices ``s`` to replay (an int, a list, or None for all); a call is guided (2B rows:
        both halves differentiate) when the trajectory says so
    negative_prompt_ids : (B or 1, P) for guided calls, or None for the trajectory's own
    guidance_scale, temperature, top_k, top_p : None: the rollout's options
    ops_backend : the model's RMSNorm / RoPE / SwiGLU backend while replaying (``"torch"``: plain autograd;
        a recording generation runs them on ``"torch"`` too, so the two agree)
    backend : the fused linear log-probability's backend (unguided, unfiltered calls)
    with_step_logprobs : also recompute ``step_logprobs`` (no θ in them, no gradient)
    chunk_rows : rows of logits a range (default: within :data:`REPLAY_CHUNK_BYTES` of float64)

    Returns
    -------
    :class:`Replay`; with the rollout's weights its ``x1_logprobs`` equal the trajectory's
    ``x1_logprobs[:, steps]`` within float rounding (1e-5 in fp32) when the attention backend is the
    rollout's. A last call under ``argmax_last`` chose deterministically: its entries are 0 (no gradient).
    """
    if not isinstance(trajectory, Trajectory):
        raise TypeError(f"trajectory: expected a ursa_engine.trajectory.Trajectory, got {type(trajectory).__name__}")
    if not isinstance(model, URSATransformer):
        raise TypeError(f"model: expected an URSATransformer, got {type(model).__name__}")
    traj, opts = trajectory, trajectory.options
    B, S = traj.states.shape[:2]
    shape = tuple(traj.states.shape[2:])
    n = traj.states[0, 0].numel()
    calls = _call_indices(steps, S)
    device = model.lm_head.weight.device
    prompt = (traj.prompt_ids if prompt_ids is None else prompt_ids).to(device)
    if prompt.dim() != 2 or prompt.shape[0] != B:
        raise ValueError(f"prompt_ids: expected (B={B}, P) ids, got shape {tuple(prompt.shape)}")
    neg = traj.negative_prompt_ids if negative_prompt_ids is None else negative_prompt_ids
    scale = opts.get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale
    temperature = opts.get("temperature", 1.0) if temperature is None else temperature
    top_k = opts.get("top_k", 0) if top_k is None else top_k
    top_p = opts.get("top_p", 1.0) if top_p is None else top_p
    path = traj.scheduler.path if traj.scheduler is not None else None
    exclude = path.mask_id if isinstance(path, MaskPath) else None
    cfg, weight = model.config, model.lm_head.weight
    P = prompt.shape[1]
    rope = model.rope_tables(latent_positions(P, shape, device=device))
    argmax_call = (traj.scheduler.num_steps - 1 if opts.get("argmax_last") and traj.scheduler is not None
                   else None)
    out = []
    for s in calls:
        if int(traj.steps[s]) == argmax_call:  # a deterministic choice: log-probability 0, as recorded
            out.append(torch.zeros((B, *shape), dtype=torch.float32, device=device))
            continue
        x = traj.states[:, s].reshape(B, n).to(device)
        guided = bool(traj.guided[s]) and scale != 1.0
        rows = [prompt]
        if guided:
            if neg is None:
                raise ValueError(f"negative_prompt_ids: call {s} was guided but the trajectory holds no negative "
                                 "prompt ids; pass them")
            neg_ids = neg.to(device).expand(B, -1)
            if neg_ids.shape[1] != P:
                raise ValueError(f"negative_prompt_ids: expected length {P} (the prompt ids), got {neg_ids.shape[1]}")
            rows.append(neg_ids)
        ids = sequence_ids(torch.cat(rows), x.repeat(len(rows), 1), cfg)
        hidden = model.hidden_states(ids, rope=rope, latent_tokens=n, ops_backend=ops_backend)  # (rows, n, H)
        H = hidden.shape[-1]
        lp = guided_logprobs(hidden[:B].reshape(-1, H), weight, traj.x1[:, s].reshape(-1).to(device),
                             uncond_hidden=hidden[B:].reshape(-1, H) if guided else None, guidance_scale=scale,
                             temperature=temperature, top_k=top_k, top_p=top_p, exclude=exclude, backend=backend,
                             chunk_rows=chunk_rows)
        out.append(lp.view(B, *shape))
    x1_lp = torch.stack(out, 1) if out else weight.new_zeros((B, 0, *shape), dtype=torch.float32)
    step_lp = None
    if with_step_logprobs:
        if traj.scheduler is None:
            raise ValueError("with_step_logprobs: the trajectory holds no scheduler; pass with_step_logprobs=False")
        with torch.no_grad():
            parts = []
            for s in calls:
                lp = step_logprobs(traj.scheduler, int(traj.steps[s]), traj.states[:, s], traj.x1[:, s],
                                   traj.next_states[:, s])
                if traj.frozen is not None:
                    lp = lp.masked_fill(traj.frozen, 0.0)
                parts.append(lp)
            step_lp = torch.stack(parts, 1) if parts else torch.zeros_like(x1_lp)
    return Replay(x1_logprobs=x1_lp, step_logprobs=step_lp, steps=calls)
