"""Triton backend of the sampler ops (``backend="triton"``), DESIGN §2.3–§2.5.

Every op has the signature of :mod:`ursa_engine.reference.sampler` (the dense oracle) and the
same RNG contract (Philox keyed by seed, step, token index, lane: :mod:`ursa_engine.triton_kernels.philox`),
so one seed gives the same tokens on both backends up to float ties. Kernels:

* ``metric_step``, FSQ codebook (``levels``): one fused kernel (:mod:`.metric_step`): streaming
  x̂1 draw, then one arithmetic pass over the implicit codebook for tokens with x̂1 ≠ x.
  Extra memory: none.
* ``metric_step``, explicit table (IBQ): x̂1 draw + list of moving tokens, tensor-core pass,
  finish (:mod:`.table`); G token groups pipelined on two streams so the draw of one group
  overlaps the pass of the previous one. Extra memory: one (⌈D/G⌉, K/BN) float32 tile-sum
  buffer reused by every group (BN = 64, G = 4: 136 MB at D = 66,560, K = 131,072; 8 MB for
  the IBQ image step) and ‖ê_c‖² (K,), computed once per table (:func:`_sq_norms`). A float32
  table runs the dot in bf16x3 (tf32x3 / tf32 on request: :func:`table_config`), a bfloat16 table in bf16.
* ``metric_sample``: FSQ: one kernel (:mod:`.metric_sample`), no extra memory; table: pass +
  finish.
* ``mixture_step``, ``mask_step``: one kernel; only tokens that change read their logits
  (:mod:`.mixture_mask`). ``mixture_sample``, ``mask_sample``: one elementwise kernel.

Keywords of issue 11, on every op / every step op (the reference's docstring has the contract):
``index_offset`` (token ``i`` has RNG index ``i % row_len + index_offset``: a call on the tokens
``[s, e)`` of every sample gives exactly their tokens of the whole call); ``x1`` (x̂1 drawn
elsewhere: no logits read, ``cond`` may be None); ``error`` (int32 (1,): kernels OR in the bits
of :mod:`.errors` for the values they read, at no cost in the draw's streaming loop for valid
logits; launchers never read it back: no host sync, CUDA-graph safe).

Not fused: top-k / top-p filtering (``unsupported`` says so; ``backend="auto"`` then falls back
to the reference). Runs on CUDA devices, or on the CPU under ``TRITON_INTERPRET=1`` (tests).
Argument checks live in :mod:`.checks`, tilings in :mod:`.tiles` (:func:`draw_config`,
:func:`fsq_config`, :func:`table_config`); the private ``_metric_step`` / ``_metric_sample`` /
``_uniform_step`` take a ``cfg`` dict overriding them (tests force small tilings;
``benchmarks/bench_triton_sampler.py`` sweeps them on a GPU).
"""

from __future__ import annotations

import contextlib
import math
import os
import weakref

import torch

from .checks import (  # noqa: F401 - re-exported (the backend's API, tests)
    LOG2E,
    LOGIT_DTYPES,
    NUM_PARAMS,
    P_BETA,
    P_BETA_DOT,
    P_H,
    P_RATE,
    _check_error,
    _check_logits,
    _check_offset,
    _check_rng,
    _check_step,
    _check_table,
    _check_tokens,
    _guidance,
    _logit_args,
    _out,
    _per_token,
    _strides,
    unsupported,
)
from .tiles import (  # noqa: F401 - re-exported (tests, benchmarks, head_draw)
    _INTERP_TILE,
    LAUNCH,
    _interp_rows,
    _launch_opts,
    _num_sms,
    _pow2,
    draw_config,
    fsq_config,
    fsq_sample_tiles,
    fsq_step_tiles,
    launch_options,
    path_block,
    table_config,
    table_groups,
)
from .workspaces import table_sample_workspace, table_step_workspace


# ----------------------------------------------------------------------------- availability
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable(device) -> str | None:
    """Why this backend cannot run on ``device`` (None: it can)."""
    device = torch.device(device)
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return f"triton is not installed ({err})"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        if _interpreting():
            return "TRITON_INTERPRET=1 is set: kernels would run on the host"
        return None
    if device.type == "cpu":
        if _interpreting():
            return None
        return "Triton runs on the CPU only under TRITON_INTERPRET=1 (tests)"
    return f"no Triton kernels for device type {device.type!r}"


# ‖ê_c‖² per table: id(table) -> (weak reference, version, data pointer, norms). An entry dies with its table.
_SQ_NORMS: dict[int, tuple] = {}
_SQ_ROWS = 8192  # rows a chunk: the float32 temporary stays (8192, m), never (K, m)


def _version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:  # an inference tensor has no version counter: only identity and address key it
        return None


def _sq_norms(table: torch.Tensor) -> torch.Tensor:
    """‖ê_c‖² of every code, float32 (K,), computed once per table.

    Cached on the table tensor's identity, version counter (an in-place change recomputes it) and
    data pointer: a step reads the (K,) norms and allocates nothing for them (the IBQ table, K =
    131,072, m = 256, made a 128 MiB temporary every step before). Host-side lookups only: no sync.
    """
    key = id(table)
    hit = _SQ_NORMS.get(key)
    version, ptr = _version(table), table.data_ptr()
    if hit is not None and hit[0]() is table and hit[1] == version and hit[2] == ptr:
        return hit[3]
    sq = torch.empty(table.shape[0], dtype=torch.float32, device=table.device)
    for i in range(0, table.shape[0], _SQ_ROWS):
        sq[i:i + _SQ_ROWS] = table[i:i + _SQ_ROWS].float().pow(2).sum(-1)
    _SQ_NORMS[key] = (weakref.ref(table, lambda _ref, key=key: _SQ_NORMS.pop(key, None)), version, ptr, sq)
    return sq


# ----------------------------------------------------------------------------- path sampling
def metric_sample(x1, beta, table, *, power=2, levels=None, seeds, row_len, out=None, index_offset=0):
    """x_t ~ softmax(−β_i·d(·, x1_i)) per token (§2.3); β = ∞ returns x1. RNG: TAG_PATH, lane 0."""
    return _metric_sample(x1, beta, table, power=power, levels=levels, seeds=seeds, row_len=row_len, out=out,
                          index_offset=index_offset)


def _metric_sample(x1, beta, table, *, power, levels, seeds, row_len, out, index_offset=0, cfg=None):
    from . import metric_sample as kern
    from .table import table_finish_kernel, table_pass_kernel

    device = x1.device
    _check_tokens("x1", x1, None, device)
    D, K = x1.shape[0], table.shape[0] if isinstance(table, torch.Tensor) else 0
    levels = _check_table(table, K, levels, power, device)
    beta = _per_token("beta", beta, D, device)
    _check_rng(seeds, row_len, D, device)
    index_offset = _check_offset(index_offset, row_len)
    out = _out(out, x1)
    if D == 0:
        return out
    cfg = dict(cfg or {})
    if levels is not None:
        c = fsq_sample_tiles(levels, D, device, cfg)
        kern.metric_sample_fsq_kernel[(math.ceil(D / c["ROWS"]),)](
            x1, beta, out, seeds, row_len, index_offset, D, POWER=power, **c,
            **_launch_opts(device, cfg, "metric_sample_fsq"))
        return out
    m = table.shape[1]
    table = table.contiguous()
    ws = table_sample_workspace(D, K, m, device, table.dtype, cfg=cfg)  # the plans' declaration too
    c, ts = ws.config, ws.allocate(device)["tile_sums"]
    table_pass_kernel[(math.ceil(D / c["BM"]), c["SPLITS"])](
        table, _sq_norms(table), x1, x1, x1, x1, beta, beta, ts, ts, D, K, m, c["NT"], c["SPLITS"], TPS=c["TPS"],
        RATES=False, POWER=power, BM=c["BM"], BN=c["BN"], M_P2=c["M_P2"], BKM=c["BKM"],
        DOT_PRECISION=c["DOT_PRECISION"], **_launch_opts(device, cfg, "table_pass"))
    table_finish_kernel[(math.ceil(D / c["R"]),)](
        table, x1, x1, out, x1, x1, beta, beta, x1, seeds, ts, ts, row_len, index_offset, D, K, m, c["NT"],
        c["SPLITS"], RATES=False, POWER=power, R=c["R"], NT_P2=_pow2(c["NT"]), SP_P2=_pow2(c["SPLITS"]), BN=c["BN"],
        M_P2=c["M_P2"], BKM=c["BKM"], **_launch_opts(device, cfg, "table_finish"))
    return out


def _uniform_sample(x1, keep, *, K, mask_id, seeds, row_len, out, mask, index_offset):
    from .mixture_mask import uniform_path_sample_kernel

    device = x1.device
    _check_tokens("x1", x1, None, device)
    D = x1.shape[0]
    keep = _per_token("keep", keep, D, device)
    _check_rng(seeds, row_len, D, device)
    index_offset = _check_offset(index_offset, row_len)
    out = _out(out, x1)
    if D == 0:
        return out
    block = path_block(D, device)
    uniform_path_sample_kernel[(math.ceil(D / block),)](x1, keep, out, seeds, row_len, index_offset, D, K, mask_id,
                                                          MASK=mask, BLOCK=block,
                                                          **_launch_opts(device, {}, "uniform_path_sample"))
    return out


def mixture_sample(x1, keep, *, K, seeds, row_len, out=None, index_offset=0):
    """x_t = x1 with probability κ_i (lane 1), else uniform over [0, K) (lane 2)."""
    if not isinstance(K, int) or not 2 <= K < 2**31:
        raise ValueError(f"K: expected an int in [2, 2^31), got {K!r}")
    return _uniform_sample(x1, keep, K=K, mask_id=0, seeds=seeds, row_len=row_len, out=out, mask=False,
                           index_offset=index_offset)


def mask_sample(x1, keep, *, mask_id, seeds, row_len, out=None, index_offset=0):
    """x_t = x1 with probability κ_i (lane 1), else the mask id."""
    return _uniform_sample(x1, keep, K=2, mask_id=int(mask_id), seeds=seeds, row_len=row_len, out=out,
                           mask=True, index_offset=index_offset)


# ----------------------------------------------------------------------------- sampler steps
def metric_step(cond, uncond, x, table, params, step, *, seeds, row_len, guidance_scale=1.0, temperature=1.0,
                top_k=0, top_p=1.0, power=2, levels=None, last=False, argmax_last=False, out=None, index_offset=0,
                x1=None, error=None):
    """One metric-path Euler step (§2.4). RNG: TAG_STEP; lanes 0 x̂1, 1 jump, 2 destination.

    ``x1`` (D,) int64: x̂1 drawn elsewhere (no logits read; ``cond`` may be None). ``error``
    int32 (1,): the kernels OR in the bits of :mod:`ursa_engine.triton_kernels.errors` for the logits, x and
    x1 they read (every token's logits: the draw reads them all). ``index_offset``: RNG index of
    token ``i`` is ``i % row_len + index_offset``.
    """
    return _metric_step(cond, uncond, x, table, params, step, seeds=seeds, row_len=row_len,
                        guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                        power=power, levels=levels, last=last, argmax_last=argmax_last, out=out,
                        index_offset=index_offset, x1=x1, error=error)


def _metric_step(cond, uncond, x, table, params, step, *, seeds, row_len, guidance_scale, temperature, top_k,
                 top_p, power, levels, last, argmax_last, out, index_offset=0, x1=None, error=None, cfg=None):
    from .metric_step import metric_step_fsq_kernel

    device, D, K = _check_step("metric_step", cond, uncond, x, params, step, seeds, row_len, top_k, top_p, x1,
                               error, index_offset)
    if K is None:
        K = table.shape[0] if isinstance(table, torch.Tensor) and table.dim() == 2 else 0
    levels = _check_table(table, K, levels, power, device)
    gs, zs = _guidance(uncond, guidance_scale, temperature) if x1 is None else (1.0, LOG2E)
    out = _out(out, x)
    if D == 0:
        return out
    cfg = dict(cfg or {})
    cptr, uptr, sc, su, has_uncond = _logit_args(cond, uncond, x1, x)
    flags = dict(HAS_UNCOND=has_uncond, HAS_X1=x1 is not None, HAS_ERROR=error is not None)
    x1_in = x1 if x1 is not None else x
    err = error if error is not None else x  # never dereferenced without HAS_ERROR
    argmax = bool(last and argmax_last)
    if levels is not None:
        tiles = fsq_step_tiles(levels, K, D, device, cfg, guided=has_uncond)
        metric_step_fsq_kernel[(math.ceil(D / tiles["ROWS"]),)](
            cptr, uptr, x, x1_in, out, params, step, seeds, err, row_len, index_offset, D, K, sc, su, gs, zs,
            POWER=power, LAST=bool(last), ARGMAX=argmax, **flags, **tiles,
            **_launch_opts(device, cfg, "metric_step_fsq"))
        return out
    # explicit table: x̂1 draw (and the list of tokens with x̂1 ≠ x), tensor-core pass, finish
    dc = draw_config(K, D, device, rows=cfg.get("ROWS"), chunks=cfg.get("CHUNKS"), w=cfg.get("W"),
                     draw_rows=cfg.get("DRAW_ROWS"), stages=cfg.get("STAGES"))
    draw = dict(cond=cptr, uncond=uptr, x=x, out=out, step=step, seeds=seeds, error=err, row_len=row_len,
                index_offset=index_offset, K=K, strides=(sc, su), gs=gs, zs=zs, flags=flags, argmax=argmax, dc=dc,
                cfg=cfg)
    if last:
        _table_draw(0, D, x1_in, x, x, last=True, **draw)  # no list, no count on the last step
        return out
    table = table.contiguous()
    m = table.shape[1]
    # Token groups: the draw of group g+1 (memory-bound) runs while the tensor-core pass of
    # group g (compute-bound) runs on a side stream. A captured CUDA graph keeps the fork/join.
    # Scratch of the whole step, allocated once from the one declaration of its sizes
    # (.workspaces.table_step_workspace, which the memory plans read too): the rates of one group at
    # a time run on one stream (side or main), so every group reuses the same tile sums (n_max, NT)
    # and split normalizers (n_max, SPLITS) (before: one pair per group, all alive in a graph's pool).
    ws = table_step_workspace(D, K, m, device, table.dtype, x1_given=x1 is not None, cfg=cfg)
    c, bounds = ws.config, ws.config["bounds"]
    groups = len(bounds) - 1
    side = torch.cuda.Stream(device) if device.type == "cuda" and groups > 1 else None
    main = torch.cuda.current_stream(device) if side is not None else None
    buf = ws.allocate(device)
    x1_buf = x1 if x1 is not None else buf["x1"]
    lst, count, ts, zp = buf["list"], buf["count"], buf["tile_sums"], buf["split_z"]
    if side is not None:
        for t in (x1_buf, lst, count, ts, zp):
            t.record_stream(side)
    rates = dict(table=table, sqc=_sq_norms(table), x=x, x1=x1_buf, out=out, params=params, step=step, seeds=seeds,
                 ts=ts, zp=zp, row_len=row_len, index_offset=index_offset, K=K, m=m, power=power, c=c, cfg=cfg)
    for g in range(groups):
        a, b = bounds[g], bounds[g + 1]
        if a == b:
            continue
        _table_draw(a, b, x1_buf, lst[a:b], count[g:g + 1], last=False, **draw)
        if side is not None:
            side.wait_stream(main)  # this group's draw is done
            ctx = torch.cuda.stream(side)
        else:
            ctx = contextlib.nullcontext()
        with ctx:
            _table_rates(b - a, lst[a:b], count[g:g + 1], **rates)
    if side is not None:
        main.wait_stream(side)
    return out


def _table_draw(a, b, x1, lst, count, *, last, cond, uncond, x, out, step, seeds, error, row_len, index_offset, K,
                strides, gs, zs, flags, argmax, dc, cfg):
    """Tokens [a, b) of the table metric step, phase 1 (current stream): x̂1 (drawn, or read from a
    given x1) into ``x1``; the moving tokens into ``lst``, their number into ``count``; ``out = x``
    (``out = x̂1`` when ``last``)."""
    from .categorical import draw_kernel

    draw_kernel[(math.ceil((b - a) / dc["ROWS"]),)](
        cond, uncond, x, out, x1, lst if not last else x, count, step, seeds, error, row_len, index_offset, a, b, K,
        *strides, gs, zs, LAST=last, ARGMAX=argmax, **flags, **dc, **_launch_opts(x.device, cfg, "draw"))


def _table_rates(n, lst, count, *, table, sqc, x, x1, out, params, step, seeds, ts, zp, row_len, index_offset, K, m,
                 power, c, cfg):
    """Phase 2 of a group of n tokens (``lst[:count]`` move): the tensor-core pass, then the finish."""
    from .table import table_finish_kernel, table_pass_kernel

    device = x.device
    table_pass_kernel[(math.ceil(n / c["BM"]), c["SPLITS"])](
        table, sqc, x1, x, lst, count, params, params, ts, zp, n, K, m, c["NT"], c["SPLITS"], TPS=c["TPS"],
        RATES=True, POWER=power, BM=c["BM"], BN=c["BN"], M_P2=c["M_P2"], BKM=c["BKM"],
        DOT_PRECISION=c["DOT_PRECISION"], **_launch_opts(device, cfg, "table_pass"))
    table_finish_kernel[(math.ceil(n / c["R"]),)](
        table, x, x1, out, lst, count, params, params, step, seeds, ts, zp, row_len, index_offset, n, K, m, c["NT"],
        c["SPLITS"], RATES=True, POWER=power, R=c["R"], NT_P2=_pow2(c["NT"]), SP_P2=_pow2(c["SPLITS"]), BN=c["BN"],
        M_P2=c["M_P2"], BKM=c["BKM"], **_launch_opts(device, cfg, "table_finish"))


def _uniform_step(cond, uncond, x, params, step, *, mask_id, seeds, row_len, guidance_scale, temperature, top_k,
                  top_p, last, argmax_last, out, mask, op, index_offset=0, x1=None, error=None, K=None, cfg=None):
    from .mixture_mask import uniform_step_kernel

    device, D, K_logits = _check_step(op, cond, uncond, x, params, step, seeds, row_len, top_k, top_p, x1, error,
                                      index_offset)
    if K is not None and (isinstance(K, bool) or not isinstance(K, int) or not 2 <= K < 2**31
                          or K_logits not in (None, K)):
        raise ValueError(f"K: expected an int in [2, 2^31) equal to the logits' last dim, got {K!r}")
    K = K_logits if K_logits is not None else K
    if mask and K is not None and not 0 <= int(mask_id) < K:
        raise ValueError(f"mask_id: expected an id in [0, {K}), got {mask_id!r}")
    gs, zs = _guidance(uncond, guidance_scale, temperature) if x1 is None else (1.0, LOG2E)
    out = _out(out, x)
    if D == 0:
        return out
    cfg = dict(cfg or {})
    cptr, uptr, sc, su, has_uncond = _logit_args(cond, uncond, x1, x)
    # Without logits (x1 given, cond None) and without ``K``, K is unknown: K = 0 checks no ids (as
    # the reference); these kernels never address memory with an id.
    k_ids = K if K is not None else 0
    dc = draw_config(K or 2, D, device, rows=cfg.get("ROWS"), chunks=cfg.get("CHUNKS"), w=cfg.get("W"),
                     draw_rows=cfg.get("DRAW_ROWS"), stages=cfg.get("STAGES"))
    uniform_step_kernel[(math.ceil(D / dc["ROWS"]),)](
        cptr, uptr, x, x1 if x1 is not None else x, out, params, step, seeds, error if error is not None else x,
        row_len, index_offset, D, k_ids, sc, su, gs, zs, int(mask_id), MASK=mask, HAS_UNCOND=has_uncond,
        HAS_X1=x1 is not None, HAS_ERROR=error is not None, LAST=bool(last), ARGMAX=bool(last and argmax_last),
        **dc, **_launch_opts(device, cfg, "uniform_step"))
    return out


def mixture_step(cond, uncond, x, params, step, *, seeds, row_len, guidance_scale=1.0, temperature=1.0, top_k=0,
                 top_p=1.0, last=False, argmax_last=False, out=None, index_offset=0, x1=None, error=None, K=None):
    """Mixture-path step (§2.4): jump to x̂1 with probability 1 − exp(−h·κ̇/(1−κ)).

    ``x1``, ``error``, ``index_offset``: as in :func:`metric_step`. Only the logits of the tokens
    that jump are read (every token on the last step), so only those are checked. ``K`` (default:
    the logits' last dim) bounds the id checks when ``cond`` is None; with neither, no id is checked.
    """
    return _uniform_step(cond, uncond, x, params, step, mask_id=0, seeds=seeds, row_len=row_len,
                         guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                         last=last, argmax_last=argmax_last, out=out, mask=False, op="mixture_step",
                         index_offset=index_offset, x1=x1, error=error, K=K)


def mask_step(cond, uncond, x, params, step, *, mask_id, seeds, row_len, guidance_scale=1.0, temperature=1.0,
              top_k=0, top_p=1.0, last=False, argmax_last=False, out=None, index_offset=0, x1=None, error=None,
              K=None):
    """Masked-path step (§2.4): a masked token becomes x̂1 (never the mask) w.p. min(1, h·κ̇/(1−κ)).

    ``x1``, ``error``, ``index_offset``, ``K``: as in :func:`mixture_step` (a given x1 replaces
    masked tokens only; the logits of unmasking tokens only are read, so checked).
    """
    return _uniform_step(cond, uncond, x, params, step, mask_id=mask_id, seeds=seeds, row_len=row_len,
                         guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                         last=last, argmax_last=argmax_last, out=out, mask=True, op="mask_step",
                         index_offset=index_offset, x1=x1, error=error, K=K)
