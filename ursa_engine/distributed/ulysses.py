"""Ulysses sequence parallelism: the sequence sharded over a group, heads all-to-all around attention.

Every rank of a group of ``g`` runs the transformer on its own positions (a :class:`Shard`); all
per-token work (projections, QK-norm, RoPE, MLP, norms, ``lm_head``) is local. Attention needs the
whole sequence, so around it (:class:`UlyssesAttention`, installed on the model by
:func:`sequence_parallel`):

* before: an all-to-all turns q (B, W, Hq, D) of W local positions into q (B, g·W, Hq/g, D): every
  position, ``Hq/g`` heads (k, v likewise with ``Hkv/g`` heads); GQA stays local because query
  heads ``[r·Hq/g, (r+1)·Hq/g)`` read exactly kv heads ``[r·Hkv/g, (r+1)·Hkv/g)``;
* attention over the whole sequence for those heads (any backend of :mod:`ursa_engine.attention`);
* after: the inverse all-to-all gives (B, W, Hq, D) back.

Shards may be uneven (the prompt, BOV and latents rarely divide by g): each is padded to the widest
``W``; padded positions are dropped from k / v after the all-to-all, so they are never attended to
(their own queries compute values nobody reads). Per layer and rank: 4 all-to-alls' worth of
``(g − 1)/g`` of the local q, k, v, o (the benchmark counts them, ``cost.py``).

Both directions use ``torch.distributed.nn.functional.all_to_all_single`` when autograd records
(training), plain ``torch.distributed.all_to_all_single`` otherwise.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


def even_bounds(length: int, size: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` of ``size`` near-equal ranges covering ``range(length)`` (the first ones one longer):
    the positions of sequence shards, the samples of dp ranks, the tokens each rank draws."""
    q, r = divmod(length, size)
    edges = [i * q + min(i, r) for i in range(size + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


class Shard:
    """Positions ``[bounds[r][0], bounds[r][1])`` of rank ``r`` of ``group`` (ascending, covering the
    sequence), each padded to ``width`` = the widest."""

    def __init__(self, bounds: list[tuple[int, int]], rank: int, group):
        self.bounds, self.rank, self.group, self.size = bounds, rank, group, len(bounds)
        if bounds[0][0] != 0 or any(a[1] != b[0] for a, b in zip(bounds, bounds[1:], strict=False)):
            raise ValueError(f"bounds: expected contiguous ascending ranges from 0, got {bounds}")
        self.length = bounds[-1][1]
        self.width = max(1, max(e - s for s, e in bounds))
        self.start, self.stop = bounds[rank]
        self._valid: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def even(cls, length: int, rank: int, size: int, group) -> Shard:
        """``length`` positions split into ``size`` near-equal ranges (:func:`even_bounds`)."""
        return cls(even_bounds(length, size), rank, group)

    def valid(self, device) -> torch.Tensor:
        """Indices of the real positions in the (g·W) gathered sequence, in sequence order."""
        device = torch.device(device)
        if device not in self._valid:
            w = self.width
            self._valid[device] = torch.cat([torch.arange(r * w, r * w + e - s, device=device)
                                             for r, (s, e) in enumerate(self.bounds)])
        return self._valid[device]

    def take(self, x: torch.Tensor, fill=0, dim: int = 1) -> torch.Tensor:
        """This rank's positions (along ``dim``) of a full-sequence tensor, padded with ``fill`` to ``width``."""
        return self.pad(x.narrow(dim, self.start, self.stop - self.start), fill, dim)

    def pad(self, part: torch.Tensor, fill=0, dim: int = 1) -> torch.Tensor:
        """This rank's positions ``part`` (along ``dim``) padded with ``fill`` to ``width``."""
        pad = self.width - part.shape[dim]
        if pad == 0:
            return part
        shape = list(part.shape)
        shape[dim] = pad
        return torch.cat([part, part.new_full(shape, fill)], dim)


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """all_to_all_single over dim 0 of x (g, ...), differentiable while autograd records."""
    x = x.contiguous()
    if torch.is_grad_enabled() and x.requires_grad:
        from torch.distributed.nn.functional import all_to_all_single

        return all_to_all_single(torch.empty_like(x), x, group=group)
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def seq_to_heads(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """(B, W, H, D) local positions, all heads -> (B, g·W, H/g, D) every position, this rank's heads."""
    B, W, H, D = x.shape
    parts = x.reshape(B, W, size, H // size, D).permute(2, 0, 1, 3, 4)  # (g, B, W, H/g, D)
    return _all_to_all(parts, group).permute(1, 0, 2, 3, 4).reshape(B, size * W, H // size, D)


def heads_to_seq(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """Inverse of :func:`seq_to_heads`: (B, g·W, h, D) -> (B, W, g·h, D)."""
    B, GW, h, D = x.shape
    parts = x.reshape(B, size, GW // size, h, D).permute(1, 0, 2, 3, 4)  # (g, B, W, h, D)
    return _all_to_all(parts, group).permute(1, 2, 0, 3, 4).reshape(B, GW // size, size * h, D)


class UlyssesAttention:
    """``attention(q, k, v)`` of a sharded sequence (the optional ``Attention.attend`` hook)."""

    def __init__(self, shard: Shard):
        self.shard = shard

    def __call__(self, q, k, v, *, backend: str = "auto"):
        from ..attention import attention

        s = self.shard
        g, group = s.size, s.group
        if q.shape[1] != s.width:
            raise ValueError(f"q: {q.shape[1]} positions on this rank, but its shard is {s.width} wide")
        for name, t in (("q", q), ("k", k)):
            if t.shape[2] % g:
                raise ValueError(f"{name}: {t.shape[2]} heads do not split over {g} sequence-parallel ranks")
        q = seq_to_heads(q, group, g)
        valid = s.valid(q.device)
        k = seq_to_heads(k, group, g).index_select(1, valid)  # padded positions are never attended to
        v = seq_to_heads(v, group, g).index_select(1, valid)
        return heads_to_seq(attention(q, k, v, backend=backend), group, g)


@contextlib.contextmanager
def sequence_parallel(model, shard: Shard | None):
    """Run ``model``'s attention layers as :class:`UlyssesAttention` over ``shard`` inside the block
    (a shard of one rank, or None, changes nothing)."""
    if shard is None or shard.size == 1:
        yield
        return
    layers = [layer.self_attn for layer in model.model.layers]
    previous = [a.attend for a in layers]
    hook = UlyssesAttention(shard)
    for a in layers:
        a.attend = hook
    try:
        yield
    finally:  # whatever hook was there before (None, or a caller's own) comes back
        for a, p in zip(layers, previous, strict=True):
            a.attend = p


def local_hidden(model, ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, shard: Shard | None,
                 *, pad_id: int, ops_backend: str | None = None) -> torch.Tensor:
    """Final-normed hidden states (rows, W, hidden) of this rank's positions of ``ids`` (rows, L)
    with rope tables (L, D/2) of the whole sequence; the whole sequence without a shard."""
    if shard is None or shard.size == 1:
        return model.hidden_states(ids, rope=(cos, sin), ops_backend=ops_backend)
    local = shard.take(ids, pad_id)
    rope = (shard.take(cos, 0.0, dim=0), shard.take(sin, 0.0, dim=0))
    with sequence_parallel(model, shard):
        return model.hidden_states(local, rope=rope, ops_backend=ops_backend)
