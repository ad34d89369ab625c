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


# ----------------------------------------------------------------------------- native step slow paths
# Logits the native kernels read as they are (``ursa_engine._native._DTYPES``), contiguous in K.
NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Stages of one filtered chunk (``reference.sampler.guided_logits``, then float32, then the kernel).
(S_CHECK, S_GUIDE, S_TOPK, S_TOPK_MASK, S_SORT, S_CUMSUM, S_DROP, S_SCATTER, S_F32, S_LAUNCH) = range(10)
_NATIVE_LABELS = {"filter": "native step: top-k / top-p filter of a row chunk (guided_logits, sort)",
                  "convert": "native step: float32 row chunks of the logits"}


def native_chunk_rows(K: int, *, filtering: bool, budget: int | None = None) -> int:
    """Rows of one slow-path chunk of the native step (``ursa_engine._native``, the launcher's own count).

    A (rows, K) buffer fits ``budget`` bytes (default: ``reference.sampler.CHUNK_BYTES``, read at call
    time): float64 when ``filtering`` (the reference filter's working copy z), float32 otherwise (the
    converted logits).
    """
    if budget is None:
        from ursa_engine.reference import sampler as ref  # torch only

        budget = ref.CHUNK_BYTES
    return max(1, int(budget) // max(int(K) * (8 if filtering else 4), 1))


def native_largest_piece(D: int, row_len: int, rows: int) -> int:
    """Tokens of the largest piece ``ursa_engine._native._row_chunks`` cuts [0, D) into: whole RNG rows
    of ``row_len`` tokens up to ``rows`` tokens, or parts of one row of at most ``rows``."""
    if D <= 0:
        return 0
    L = max(int(row_len), 1)
    return min(D, rows // L * L) if L <= rows else min(D, rows)


def _rows_stride(z: torch.Tensor, D: int, K: int) -> int | None:
    """Stride in K of the launcher's (D, K) rows of ``z`` (``_native._logits``: a view when one
    exists), or None where it copies ``z`` (not viewable as rows)."""
    if z.dim() == 2:
        return z.stride(1)
    try:
        return z.view(D, K).stride(1)
    except RuntimeError:
        return None


def native_step_path(cond: torch.Tensor | None, uncond: torch.Tensor | None, *, top_k: int, top_p: float,
                     D: int | None = None) -> str | None:
    """The native step's path on these logits: ``"filter"`` (top-k / top-p: the reference's filter per
    row chunk), ``"convert"`` (logits the kernels cannot read as they are: a dtype outside
    :data:`NATIVE_DTYPES`, strided in K, or cond and uncond of different dtypes: float32 row chunks),
    or None (the kernel reads the logits; also when they are not read, ``cond`` None).

    ``cond`` / ``uncond``: the launcher's (D, K) rows, or the op's logits of any shape with ``D`` rows.
    """
    if cond is None:
        return None
    if top_k or top_p < 1.0:
        return "filter"
    K = cond.shape[-1]
    rows = D if D is not None else cond.shape[0]

    def readable(z, dtype):
        s = _rows_stride(z, rows, K)
        return z.dtype == dtype and (s is None or s == 1)  # a copy is contiguous

    if cond.dtype not in NATIVE_DTYPES or not readable(cond, cond.dtype):
        return "convert"
    return None if uncond is None or readable(uncond, cond.dtype) else "convert"


def native_convert_copies(z: torch.Tensor, D: int, K: int) -> bool:
    """Whether the convert path copies these logits into a float32 chunk buffer (another dtype, or
    strided in K); float32 rows contiguous in K are read in place (any row stride)."""
    s = _rows_stride(z, D, K)
    return z.dtype != torch.float32 or (s is not None and s != 1)


def native_step_workspace(cond: torch.Tensor | None, uncond: torch.Tensor | None, D: int, K: int, *, row_len: int,
                          top_k: int = 0, top_p: float = 1.0, error: bool = False,
                          budget: int | None = None) -> Workspace:
    """Scratch of the native sampler step's torch side (``ursa_engine._native._step_call``); the C++ /
    CUDA kernels keep only per-thread scratch outside torch.

    Parameters
    ----------
    cond, uncond : the logits as the op gets them (D·K elements, last dim K; only dtype, shape and
        strides are read), or None (``x1`` given: nothing is read, no scratch)
    D, K : tokens and codes
    row_len : tokens per RNG row (chunks are whole rows or parts of one: :func:`native_largest_piece`)
    top_k, top_p : the filter (either set: the filter path)
    error : an ``error=`` word is given (the filter path checks the raw chunk with torch first)
    budget : bytes of one chunk buffer (:func:`native_chunk_rows`)

    Buffers (R = the largest piece of :func:`native_chunk_rows` rows, k = ``top_k`` when 0 < k < K):

    * any path: ``cond_rows`` / ``uncond_rows``, a contiguous copy of the logits (their shape and
      dtype, D·K elements) where they are not viewable as (D, K) rows (``reshape``, alive the whole call);
    * convert (stage 0): ``cond_f32`` / ``uncond_f32`` (R, K) fp32 for each that is not float32
      contiguous in K, allocated once by the launcher (:meth:`Workspace.allocate`) and reused by
      every chunk;
    * filter, per chunk (DESIGN §2.4 guidance, temperature, top-k / top-p in
      ``reference.sampler.guided_logits``), by stage: ``S_CHECK`` (with ``error``) the NaN / +inf /
      −inf masks (R, K) bool one at a time and the all −inf rows (R,) bool; from ``S_GUIDE`` to
      ``S_F32`` z (R, K) fp64; ``S_GUIDE`` (uncond) uncond in fp64 (unless it is fp64) and the c == u
      mask (R, K) bool; ``S_TOPK`` ``torch.topk``'s values (R, k) fp64, kept as the k-th value
      until the filter returns, and indices (R, k) int64; ``S_TOPK_MASK`` z < kth (R, K) bool;
      ``S_SORT`` softmax (R, K) fp64 and ``torch.sort``'s sorted probabilities (R, K) fp64 and order
      (R, K) int64; ``S_CUMSUM`` the softmax freed, the exclusive cumsum (R, K) fp64; ``S_DROP`` the
      sorted probabilities freed, the drop mask (R, K) bool; ``S_SCATTER`` the cumsum freed, the
      scattered mask (R, K) bool; ``S_F32`` z in fp32 (R, K), which ``S_LAUNCH`` keeps alone.
      The peak with top-p: 32·R·K + 8·R·k bytes (``S_SORT`` and ``S_CUMSUM`` tie), ~1 GiB at the
      256 MiB budget.

    ``config``: ``path`` (:func:`native_step_path`), ``rows`` (chunk rows), ``piece`` (R), ``label``.
    """
    if cond is None or D <= 0 or cond.dim() == 0 or cond.shape[-1] != K or cond.numel() != D * K:
        return Workspace([], {"path": None})  # nothing read (or the launcher refuses the shape)
    path = native_step_path(cond, uncond, top_k=top_k, top_p=top_p, D=D)
    f32, f64, b8, i64 = torch.float32, torch.float64, torch.bool, torch.int64
    every = tuple(range(S_LAUNCH + 1))
    bufs = [Buffer(f"{name}_rows", tuple(z.shape), z.dtype, every, made_by="reshape")
            for name, z in (("cond", cond), ("uncond", uncond)) if z is not None and _rows_stride(z, D, K) is None]
    if path is None:
        return Workspace(bufs, {"path": None, "label": "native step: logits copied into rows"})
    rows = native_chunk_rows(K, filtering=path == "filter", budget=budget)
    R = native_largest_piece(D, row_len, rows)
    config = {"path": path, "rows": rows, "piece": R, "label": _NATIVE_LABELS[path]}
    if path == "convert":
        bufs += [Buffer(f"{name}_f32", (R, K), f32) for name, z in (("cond", cond), ("uncond", uncond))
                 if z is not None and native_convert_copies(z, D, K)]
        return Workspace(bufs, config)
    k = int(top_k) if top_k and top_k < K else 0
    p = top_p < 1.0
    if error:
        bufs += [Buffer("bad", (R, K), b8, (S_CHECK,), made_by="torch.isnan / isposinf / eq"),
                 Buffer("all_neginf", (R,), b8, (S_CHECK,), made_by="torch.all")]
    bufs.append(Buffer("z", (R, K), f64, tuple(range(S_GUIDE, S_F32 + 1)), made_by="Tensor.to"))
    if uncond is not None:
        if uncond.dtype != f64:
            bufs.append(Buffer("uncond_f64", (R, K), f64, (S_GUIDE,), made_by="Tensor.to"))
        bufs.append(Buffer("same", (R, K), b8, (S_GUIDE,), made_by="torch.eq"))
    if k:
        kept = (S_TOPK, S_TOPK_MASK) + ((S_SORT, S_CUMSUM, S_DROP, S_SCATTER) if p else ())
        bufs += [Buffer("topk_values", (R, k), f64, kept, made_by="torch.topk"),
                 Buffer("topk_indices", (R, k), i64, (S_TOPK,), made_by="torch.topk"),
                 Buffer("below_kth", (R, K), b8, (S_TOPK_MASK,), made_by="torch.lt")]
    if p:
        bufs += [Buffer("probs", (R, K), f64, (S_SORT,), made_by="torch.softmax"),
                 Buffer("sorted_probs", (R, K), f64, (S_SORT, S_CUMSUM), made_by="torch.sort"),
                 Buffer("order", (R, K), i64, (S_SORT, S_CUMSUM, S_DROP, S_SCATTER), made_by="torch.sort"),
                 Buffer("before", (R, K), f64, (S_CUMSUM, S_DROP), made_by="torch.cumsum"),
                 Buffer("drop_sorted", (R, K), b8, (S_DROP, S_SCATTER), made_by="torch.ge"),
                 Buffer("drop", (R, K), b8, (S_SCATTER,), made_by="torch.zeros_like")]
    bufs.append(Buffer("z_f32", (R, K), f32, (S_F32, S_LAUNCH), made_by="Tensor.to"))
    return Workspace(bufs, config)
