"""Training on many processes: FSDP2 (``fully_shard``) and Ulysses sequence parallelism (issue 13).

FSDP2: :func:`shard_loss` shards every decoder layer and then the loss module as the root, so the
embedding, the final norm and the ``lm_head`` weight (which :class:`~ursa_engine.training.LatentLoss`
reads directly for its chunked cross-entropy) are gathered for the whole forward. Each rank feeds its
own samples; FSDP averages the gradients, which is the gradient of the mean loss over the global batch
when every rank has as many (non-ignored) tokens.

Sequence parallel: :class:`SequenceParallelLoss` gives each of the ``g`` ranks of a group the targets
``[a_r, b_r)`` of every sample (:func:`target_ranges`); the rank runs the positions that predict them
(position ``P + j`` predicts latent ``j``, DESIGN §3; rank 0 also holds the prompt and BOV, the last
rank the final latent, which is only read), with Ulysses attention. Its noised inputs come from
:func:`add_noise` with ``token_offset=a_r``: every draw is keyed by the global token index (§2.5),
so the noise equals the one-process draw. The one token a rank reads but does not own (``x_t[a_r − 1]``)
comes from its left neighbour. The returned loss is the global mean; each rank's gradient is its share,
summed over the group by :func:`sync_gradients`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .._dispatch import resolve
from ..model import latent_positions
from ..paths import MaskPath, MetricPath, MixturePath
from ..reference.rng import seeds_per_row
from ..training.losses import IGNORE_INDEX, LOSS_BACKENDS, _check_ids, _linear_cross_entropy
from ..training.noise import add_noise as _add_noise
from ..training.noise import expand_times
from .ulysses import Shard, even_bounds, sequence_parallel


def shard_loss(loss: nn.Module, mesh=None, **options) -> nn.Module:
    """FSDP2: ``fully_shard`` each decoder layer of ``loss.model``, then ``loss`` itself (the root).

    ``mesh``: a 1-D ``DeviceMesh`` (or None: the default world); ``options`` go to ``fully_shard``
    (``mp_policy``, ``reshard_after_forward``, ...). Returns ``loss``, sharded in place."""
    from torch.distributed.fsdp import fully_shard

    for layer in loss.model.model.layers:
        fully_shard(layer, mesh=mesh, **options)
    fully_shard(loss, mesh=mesh, **options)
    return loss


def sync_gradients(module: nn.Module, group=None) -> None:
    """Sum the gradients of ``module`` over ``group`` (after a sequence-parallel backward): one
    all-reduce per dtype and device of a flat bucket of them, not one per parameter."""
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for p in module.parameters():
        if p.grad is not None:
            buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(part.view_as(g))


def target_ranges(n: int, size: int) -> list[tuple[int, int]]:
    """The latent targets ``[a_r, b_r)`` of each of ``size`` sequence-parallel ranks (near-equal)."""
    if n < size:
        raise ValueError(f"latents_shape: {n} latent tokens cannot be split over {size} sequence-parallel ranks")
    return even_bounds(n, size)


def range_times(t, x1: torch.Tensor, token_offset: int, latents_shape):
    """Per-frame times ``t`` (B, T) of whole samples of ``latents_shape`` (T, H, W) as per-token times
    (B, m) of tokens ``[token_offset, token_offset + m)`` (row-major latent order); other ``t`` as given."""
    if latents_shape is None or not isinstance(t, torch.Tensor) or t.dim() != 2:
        return t
    T, H, W = (int(v) for v in latents_shape)
    B, m = x1.shape
    if tuple(t.shape) != (B, T):
        raise ValueError(f"t: per-frame times of latents_shape {(T, H, W)} must be (B, T) = ({B}, {T}), got "
                         f"{tuple(t.shape)}")
    if token_offset + m > T * H * W:
        raise ValueError(f"token_offset: tokens [{token_offset}, {token_offset + m}) outside the {T * H * W} "
                         f"latent tokens of latents_shape {(T, H, W)}")
    return t[:, :, None].expand(B, T, H * W).reshape(B, T * H * W)[:, token_offset : token_offset + m]


def add_noise(path, x1: torch.Tensor, t, *, seed=0, token_offset: int = 0, latents_shape=None,
              backend: str = "auto") -> torch.Tensor:
    """:func:`ursa_engine.training.add_noise` of tokens ``[s, s + m)`` of each sample: ``x1`` (B, m) is
    that range, ``token_offset`` = s; the draws are those of the whole samples (§2.5, global index).

    ``t``: a float, per-sample (B,), per-token (B, m), or per-frame (B, T) of the whole samples (the
    video training default, ``sample_frame_times(asynchronous=True)``) with ``latents_shape`` = (T, H, W).
    """
    if isinstance(x1, torch.Tensor) and x1.dim() == 2:
        t = range_times(t, x1, token_offset, latents_shape)
    if not token_offset:
        return _add_noise(path, x1, t, seed=seed, backend=backend)
    if not isinstance(path, (MetricPath, MixturePath, MaskPath)):
        raise TypeError(f"path: expected a MetricPath, MixturePath or MaskPath, got {type(path).__name__}")
    if isinstance(token_offset, bool) or not isinstance(token_offset, int) or token_offset < 0:
        raise ValueError(f"token_offset: expected an int >= 0, got {token_offset!r}")
    with torch.no_grad():
        x1, tt = path._prepare(x1, expand_times(t, tuple(x1.shape)))
        seeds, row_len = seeds_per_row(seed, tuple(x1.shape), x1.device)
        out = torch.empty(x1.numel(), dtype=torch.int64, device=x1.device)
        flat, common = x1.reshape(-1).contiguous(), dict(seeds=seeds, row_len=row_len, index_offset=token_offset)
        if isinstance(path, MetricPath):
            fn = resolve("metric_sample", backend, x1.device, shape=(x1.numel(), path.size))
            beta = path.beta(tt).to(torch.float32).reshape(-1).contiguous()
            fn(flat, beta, path.codebook.normalized_on(x1.device), power=path.power, levels=path.codebook.levels,
               out=out, **common)
        else:
            op, value = ("mixture_sample", {"K": path.K}) if isinstance(path, MixturePath) else \
                ("mask_sample", {"mask_id": path.mask_id})
            fn = resolve(op, backend, x1.device, shape=(x1.numel(), path.size))
            fn(flat, path._keep(tt).to(torch.float32).reshape(-1).contiguous(), out=out, **value, **common)
        return out.view(x1.shape)


class SequenceParallelLoss(nn.Module):
    """:class:`~ursa_engine.training.LatentLoss` of one rank of a sequence-parallel group.

    Parameters
    ----------
    model : URSATransformer (set trainable)
    group : the process group of the sequence-parallel ranks (None: the world)
    chunk_size, ops_backend, backend : as for LatentLoss (``backend``: the loss's, "auto" / "torch" / "triton")
    """

    def __init__(self, model, group=None, *, chunk_size: int = 2048, ops_backend: str = "torch",
                 backend: str = "auto"):
        super().__init__()
        if backend not in LOSS_BACKENDS:
            raise ValueError(f"backend: expected one of {LOSS_BACKENDS}, got {backend!r}")
        self.model = model.requires_grad_(True)
        self.group, self.chunk_size, self.ops_backend, self.backend = group, chunk_size, ops_backend, backend

    def forward(self, prompt_ids: torch.Tensor, x_t: torch.Tensor, x1: torch.Tensor, latents_shape, *,
                ignore: torch.Tensor | None = None) -> torch.Tensor:
        """
        Parameters
        ----------
        prompt_ids : (B, P) the whole prompts (every rank)
        x_t, x1 : (B, b − a) this rank's noised inputs and clean targets, tokens ``[a, b)`` of
            :func:`target_ranges` (row-major latent order)
        latents_shape : (T, H, W) of the whole latents
        ignore : optional bool (B, b − a): targets left out

        Returns
        -------
        0-dim float32: the global mean loss (every rank); its gradient is this rank's share
        """
        g, r = dist.get_world_size(self.group), dist.get_rank(self.group)
        T, H, W = (int(v) for v in latents_shape)
        n, P, B, cfg = T * H * W, prompt_ids.shape[1], prompt_ids.shape[0], self.model.config
        a, b = target_ranges(n, g)[r]
        if x_t.shape != (B, b - a) or x1.shape != x_t.shape:
            raise ValueError(f"x_t, x1: expected (B, {b - a}) tokens [{a}, {b}) of rank {r}, got {tuple(x_t.shape)}, "
                             f"{tuple(x1.shape)}")
        K = self.model.lm_head.weight.shape[0]
        _check_ids(("prompt_ids", prompt_ids, cfg.vocab_size, None), ("x_t", x_t, K, None), ("x1", x1, K, None))
        latent = x_t.long() + cfg.lm_vocab_size
        last = latent[:, -1:].contiguous()  # the token the right neighbour reads first
        halo = [torch.empty_like(last) for _ in range(g)]
        dist.all_gather(halo, last, group=self.group)
        head = [prompt_ids.long(), torch.full((B, 1), cfg.bov_token_id, dtype=torch.long, device=latent.device)] \
            if r == 0 else [halo[r - 1]]
        ids = torch.cat(head + [latent if r == g - 1 else latent[:, :-1]], 1)  # positions of this rank
        ends = [P + e for _, e in target_ranges(n, g)]
        ends[-1] += 1  # the last latent is read (a key / value), never a query that predicts
        shard = Shard(list(zip([0] + ends[:-1], ends, strict=True)), r, self.group)
        cos, sin = self.model.rope_tables(latent_positions(P, (T, H, W), device=ids.device))
        rope = (shard.take(cos, 0.0, dim=0), shard.take(sin, 0.0, dim=0))
        with sequence_parallel(self.model, shard):
            h = self.model.hidden_states(shard.pad(ids, cfg.pad_token_id),
                                         rope=rope, ops_backend=self.ops_backend)
        h = h[:, P + a - shard.start : P + b - shard.start]  # (B, b − a, hidden)
        targets = x1.long() if ignore is None else x1.long().masked_fill(ignore, IGNORE_INDEX)
        count = (targets != IGNORE_INDEX).sum().to(torch.float32)
        local = _linear_cross_entropy(h, self.model.lm_head.weight, targets, self.chunk_size, IGNORE_INDEX,
                                      reduction="sum", backend=self.backend)
        stats = torch.stack([local.detach(), count])
        dist.all_reduce(stats, group=self.group)
        total = stats[1].clamp_min(1)
        share = local / total
        return share + (stats[0] / total - share).detach()
