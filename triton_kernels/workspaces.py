"""Scratch buffers of our kernel launchers: one function per op, the single source of their sizes (issue 20).

Each ``*_workspace`` function returns the buffers a launcher allocates and frees inside one call
(beyond the outputs it returns or writes): the launcher allocates exactly these
(:meth:`Workspace.allocate`), and the memory plans declare them
(:func:`ursa_engine.ops_library.workspace_buffers`, counted as live by
:class:`ursa_engine.memory.LiveBytes` while the op runs). ``tests/test_workspaces.py`` runs the
real launchers (Triton interpreter, native CPU) and compares what they allocate with these lists.

Triton-free (torch and :mod:`.tiles` only): the plans import it on machines without Triton.
Buffers carry the *stages* of the call in which they are alive (the fused head draw frees its
per-chunk statistics before its sort); the declared peak is the largest stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .tiles import table_config, table_groups


@dataclass(frozen=True)
class Buffer:
    """One scratch tensor: ``name``, ``shape``, ``dtype``, the ``stages`` of the call it is alive in,
    ``zero`` (allocated zero-filled), ``made_by`` (None: the launcher allocates it from this record;
    else the op that returns it, e.g. ``torch.sort``, declared only)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    stages: tuple[int, ...] = (0,)
    zero: bool = False
    made_by: str | None = None

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n * self.dtype.itemsize


@dataclass
class Workspace:
    """The scratch of one launcher call (see the module docstring) and the tiling it was sized for."""

    buffers: list[Buffer] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def stage(self, i: int) -> list[Buffer]:
        return [b for b in self.buffers if i in b.stages]

    def peak_stage(self, granularity: int = 1) -> list[Buffer]:
        """The buffers alive together at the largest stage (each rounded up to ``granularity`` bytes)."""
        stages = sorted({s for b in self.buffers for s in b.stages})
        if not stages:
            return []
        return max((self.stage(s) for s in stages), key=lambda bs: sum(_round(b.nbytes, granularity) for b in bs))

    def peak_bytes(self, granularity: int = 1) -> int:
        return sum(_round(b.nbytes, granularity) for b in self.peak_stage(granularity))

    def allocate(self, device) -> dict[str, torch.Tensor]:
        """The launcher's allocation: every buffer it makes itself (``made_by`` None), by name."""
        make = {True: torch.zeros, False: torch.empty}
        return {b.name: make[b.zero](b.shape, dtype=b.dtype, device=device) for b in self.buffers
                if b.made_by is None}


def _round(n: int, g: int) -> int:
    return -(-int(n) // g) * g


# ----------------------------------------------------------------------------- sampler (Triton)
def table_step_workspace(D: int, K: int, m: int, device, table_dtype, *, x1_given: bool, last: bool = False,
                         cfg: dict | None = None, num_sms: int | None = None) -> Workspace:
    """Scratch of the Triton metric step on an explicit table (``triton_kernels.sampler._metric_step``).

    Not the last step: x̂1 (D,) int64 unless ``x1`` is given, the moving-token list (D,) int64, a
    count per token group (G,) int32 (zeroed), and for the largest group (n_max = ⌈D/G⌉ tokens) the
    tile sums (n_max, NT) fp32 and split normalizers (n_max, SPLITS) fp32, reused by every group
    (G = 4 on CUDA from D = 4,096: :func:`.tiles.table_groups`; NT = ⌈K/BN⌉). The last step keeps
    nothing. ``config``: the pass tiling (:func:`.tiles.table_config`) and ``bounds`` (group edges).
    ``num_sms``: the SM count that sizes the K splits (default: the device's; plans pass an H100's).
    """
    device = torch.device(device)
    cfg = dict(cfg or {})
    if last or D == 0:
        return Workspace([], {})
    bounds = table_groups(D, device, cfg)
    groups = len(bounds) - 1
    n_max = max(bounds[g + 1] - bounds[g] for g in range(groups))
    c = table_config(n_max, K, m, device, table_dtype, bm=cfg.get("BM"), bn=cfg.get("BN"), r=cfg.get("R"),
                     splits=cfg.get("SPLITS"), precision=cfg.get("DOT_PRECISION"), num_sms=num_sms)
    bufs = [] if x1_given else [Buffer("x1", (D,), torch.int64)]
    bufs += [Buffer("list", (D,), torch.int64), Buffer("count", (groups,), torch.int32, zero=True),
             Buffer("tile_sums", (n_max, c["NT"]), torch.float32),
             Buffer("split_z", (n_max, c["SPLITS"]), torch.float32)]
    return Workspace(bufs, {**c, "bounds": bounds})


def table_sample_workspace(D: int, K: int, m: int, device, table_dtype, *, cfg: dict | None = None,
                           num_sms: int | None = None) -> Workspace:
    """Scratch of the Triton metric path sample on an explicit table: tile sums (D, NT) fp32."""
    device = torch.device(device)
    cfg = dict(cfg or {})
    if D == 0:
        return Workspace([], {})
    c = table_config(D, K, m, device, table_dtype, bm=cfg.get("BM"), bn=cfg.get("BN"), r=cfg.get("R"),
                     splits=cfg.get("SPLITS"), precision=cfg.get("DOT_PRECISION"), num_sms=num_sms)
    return Workspace([Buffer("tile_sums", (D, c["NT"]), torch.float32)], c)


# ----------------------------------------------------------------------------- fused head + draw (Triton)
def head_draw_workspace(D: int, nc: int) -> Workspace:
    """Scratch of the fused ``lm_head`` + x̂1 draw on D tokens and NC code chunks
    (``triton_kernels.head_draw._head_draw``; NC = ⌈K / chunk⌉ of :func:`head_config`).

    Stage 0 (stats, select): per-(token, chunk) max and Σexp (D, NC) fp32 each, the chosen chunk
    (D,) int32, the remaining target and the max (D,) fp32. Stage 1 (sort, finish): the statistics
    freed; the chunk, target and max, and ``torch.sort``'s sorted chunks (D,) int32 and order (D,)
    int64. ``logprobs`` adds nothing (the caller's buffer carries the log-sum-exp).
    """
    if D == 0:
        return Workspace([], {"NC": nc})
    f32, i32 = torch.float32, torch.int32
    return Workspace([
        Buffer("chunk_max", (D, nc), f32, (0,)), Buffer("chunk_sum", (D, nc), f32, (0,)),
        Buffer("chunk", (D,), i32, (0, 1)), Buffer("resid", (D,), f32, (0, 1)), Buffer("max", (D,), f32, (0, 1)),
        Buffer("sorted_chunk", (D,), i32, (1,), made_by="sort"),
        Buffer("order", (D,), torch.int64, (1,), made_by="sort")], {"NC": nc})
