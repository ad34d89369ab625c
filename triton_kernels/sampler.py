"""Triton backend of the sampler ops (``backend="triton"``), DESIGN §2.3–§2.5.

Every op has the signature of :mod:`ursa_engine.reference.sampler` (the dense oracle) and the
same RNG contract (Philox keyed by seed, step, token index, lane: :mod:`triton_kernels.philox`),
so one seed gives the same tokens on both backends up to float ties. Kernels:

* ``metric_step``, FSQ codebook (``levels``): one fused kernel (:mod:`.metric_step`): streaming
  x̂1 draw, then one arithmetic pass over the implicit codebook for tokens with x̂1 ≠ x.
  Extra memory: none.
* ``metric_step``, explicit table (IBQ): x̂1 draw + list of moving tokens, tensor-core pass,
  finish (:mod:`.table`); token groups pipelined on two streams so the draw of one group
  overlaps the pass of the previous one. Extra memory O(D·K/BN) float32 (BN = 64: 32 MiB for
  the IBQ image step). A float32 table runs the dot in tf32, a bfloat16 table in bf16.
* ``metric_sample``: FSQ: one kernel (:mod:`.metric_sample`), no extra memory; table: pass +
  finish.
* ``mixture_step``, ``mask_step``: one kernel; only tokens that change read their logits
  (:mod:`.mixture_mask`). ``mixture_sample``, ``mask_sample``: one elementwise kernel.

Not fused: top-k / top-p filtering (``unsupported`` says so; ``backend="auto"`` then falls back
to the reference). Runs on CUDA devices, or on the CPU under ``TRITON_INTERPRET=1`` (tests).
Tilings come from :func:`draw_config`, :func:`fsq_config`, :func:`table_config`; the private
``_metric_step`` / ``_metric_sample`` / ``_uniform_step`` take a ``cfg`` dict overriding them
(tests force small tilings; ``benchmarks/bench_triton_sampler.py`` sweeps them on a GPU).
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

P_H, P_BETA, P_BETA_DOT, P_RATE = 0, 1, 2, 3
NUM_PARAMS = 4
LOG2E = 1.4426950408889634
LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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


def unsupported(op: str, **options) -> str | None:
    """Why ``op`` cannot run with ``options`` on this backend (None: it can)."""
    if options.get("top_k", 0):
        return "top-k filtering is not fused in the Triton sampler (the reference applies it)"
    if options.get("top_p", 1.0) < 1.0:
        return "top-p filtering is not fused in the Triton sampler (the reference applies it)"
    return None


# ----------------------------------------------------------------------------- configuration
def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


# Under the interpreter a program costs ~0.3 s of Python whatever its size: run few, wide
# programs (at most ~2^21 elements per tile so numpy stays within memory).
_INTERP_TILE = 1 << 21


def _interp_rows(D: int, per_row: int) -> int:
    return max(1, min(_pow2(D), _pow2(_INTERP_TILE // max(per_row, 1) + 1) // 2))


def draw_config(K: int, D: int, device: torch.device, rows: int | None = None, chunks: int | None = None,
                w: int | None = None, per_row: int = 0, draw_rows: int | None = None,
                stages: int | None = None) -> dict:
    """Tile of the streaming x̂1 draw (:func:`triton_kernels.categorical.draw_rows`).

    ROWS tokens a program, DRAW_ROWS (ROWS or 1) streamed at a time; a row is CHUNKS chunks
    of NW·W codes, W codes of every chunk per iteration. ``per_row``: elements a token also
    holds in a later phase of the same kernel (FSQ tile), to size interpreter programs.
    """
    if device.type == "cuda":
        chunks = chunks or min(256, _pow2(math.ceil(K / 16)))
        w = w or 16
    else:
        chunks = chunks or min(16, _pow2(math.ceil(K / 8)))
        w = w or 8
    nw = math.ceil(math.ceil(K / chunks) / w)
    cw_p2 = _pow2(nw * w)
    if rows is None:
        rows = (4 if per_row else 1) if device.type == "cuda" else _interp_rows(D, max(chunks * w, cw_p2, per_row))
    if draw_rows is None:
        draw_rows = 1 if device.type == "cuda" else rows
    if draw_rows not in (1, rows):
        raise ValueError(f"DRAW_ROWS: expected 1 or ROWS={rows}, got {draw_rows}")
    if stages is None:
        stages = 3 if device.type == "cuda" else 1
    return dict(ROWS=rows, DRAW_ROWS=draw_rows, CHUNKS=chunks, W=w, NW=nw, CW_P2=cw_p2, STAGES=stages)


def fsq_config(levels, device: torch.device, ch_max: int | None = None, w: int | None = None) -> dict:
    """Split of the FSQ levels: the high group (at most ``ch_max`` codes) indexes the chunks,
    the low group (P_LO codes) is walked in slices of FW (:mod:`triton_kernels.fsq`)."""
    levels = tuple(int(v) for v in levels)
    # GPU: ~1000 chunks × one low code per iteration keeps the per-iteration work (the low
    # code's features) small against the ROWS × chunks elements it serves (Cosmos: 1000 × 64).
    ch_max = ch_max or (1024 if device.type == "cuda" else 256)
    nlo = 0
    while math.prod(levels[nlo:]) > ch_max:
        nlo += 1
    p_lo, p_hi = math.prod(levels[:nlo]), math.prod(levels[nlo:])
    fw = min(w or (1 if device.type == "cuda" else 64), _pow2(p_lo))
    return dict(LEVELS=levels, NLO=nlo, P_LO=p_lo, LO_P2=_pow2(p_lo), P_HI=p_hi, CH_P2=_pow2(p_hi), FW=fw)


def table_config(D: int, K: int, m: int, device: torch.device, table_dtype, bm=None, bn=None, r=None,
                 splits=None) -> dict:
    """Tiles of the table pass (BM tokens × BN codes, m in BKM chunks) and of the finish (R tokens)."""
    m_p2 = max(16, _pow2(m))
    bkm = min(64, m_p2)
    if device.type == "cuda":
        bm, bn, r = bm or 128, bn or 64, r or 1
    else:
        bn = bn or 16
        bm = bm or max(16, min(_pow2(D), 4096))
        r = r or _interp_rows(D, bn * bkm + _pow2(math.ceil(K / bn)))
    bn = max(bn, _pow2(math.ceil(K / 8192)))  # the finish keeps all tile sums of a token in registers
    nt = math.ceil(K / bn)
    blocks = math.ceil(max(D, 1) / bm)
    want = 2 * _num_sms(device) if device.type == "cuda" else 1
    splits = max(1, min(nt, splits or math.ceil(want / blocks)))
    tps = math.ceil(nt / splits)
    splits = math.ceil(nt / tps)
    precision = "tf32" if table_dtype == torch.float32 else "ieee"
    return dict(BM=bm, BN=bn, R=r, M_P2=m_p2, BKM=bkm, NT=nt, TPS=tps, SPLITS=splits, DOT_PRECISION=precision)


def _launch_opts(device: torch.device, cfg: dict, kernel: str, num_warps: int, num_stages: int | None = None):
    """num_warps / num_stages of one kernel launch; ``cfg`` may override them per kernel
    (``{"draw": {"num_warps": 4}}``). Ignored by the interpreter."""
    if device.type != "cuda":
        return {}
    over = cfg.get(kernel, {})
    opts = {"num_warps": over.get("num_warps", num_warps)}
    stages = over.get("num_stages", num_stages)
    if stages is not None:
        opts["num_stages"] = stages
    return opts


# ----------------------------------------------------------------------------- validation
def _check_tokens(name: str, x: torch.Tensor, D: int | None, device) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.int64 or x.dim() != 1 or not x.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous 1-D int64 tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} of shape {tuple(getattr(x, 'shape', ()))}")
    if D is not None and x.shape[0] != D:
        raise ValueError(f"{name}: expected {D} tokens, got {x.shape[0]}")
    if x.device != device:
        raise ValueError(f"{name}: on {x.device}, expected {device}")


def _check_logits(name: str, z: torch.Tensor, D: int, K: int | None, device) -> None:
    if not isinstance(z, torch.Tensor) or z.dim() != 2:
        raise ValueError(f"{name}: expected a (D, K) tensor, got shape {tuple(getattr(z, 'shape', ()))}")
    if z.dtype not in LOGIT_DTYPES:
        raise ValueError(f"{name}: expected bfloat16 / float16 / float32, got {z.dtype}")
    if z.shape[0] != D or (K is not None and z.shape[1] != K):
        raise ValueError(f"{name}: expected shape ({D}, {K if K is not None else 'K'}), got {tuple(z.shape)}")
    if z.shape[1] > 1 and z.stride(1) != 1:
        raise ValueError(f"{name}: the code axis must be contiguous (stride 1), got stride {z.stride(1)}")
    if z.device != device:
        raise ValueError(f"{name}: on {z.device}, expected {device}")


def _check_rng(seeds, row_len, D, device, params=None, step=None) -> None:
    if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64 or seeds.dim() != 1:
        raise ValueError("seeds: expected a 1-D int64 tensor")
    if seeds.device != device:
        raise ValueError(f"seeds: on {seeds.device}, expected {device}")
    if not isinstance(row_len, int) or row_len < 1:
        raise ValueError(f"row_len: expected an int >= 1, got {row_len!r}")
    if D and seeds.shape[0] * row_len < D:
        raise ValueError(f"seeds: {seeds.shape[0]} rows of {row_len} tokens do not cover {D} tokens")
    if params is not None:
        if params.dtype != torch.float32 or params.numel() < NUM_PARAMS or params.device != device:
            raise ValueError(f"params: expected a float32 tensor of {NUM_PARAMS} values on {device}")
    if step is not None:
        if step.dtype != torch.int64 or step.numel() < 1 or step.device != device:
            raise ValueError(f"step: expected an int64 tensor (1,) on {device}")


def _per_token(name, v, D, device) -> torch.Tensor:
    """A float vector of one value per token, as contiguous float32 on ``device``."""
    if not isinstance(v, torch.Tensor) or v.shape != (D,) or not v.is_floating_point():
        raise ValueError(f"{name}: expected a float tensor of shape ({D},)")
    return v.to(device=device, dtype=torch.float32).contiguous()


def _check_step(op, cond, uncond, x, params, step, seeds, row_len, top_k, top_p):
    """Checks shared by the step launchers; returns (device, D, K)."""
    reason = unsupported(op, top_k=top_k, top_p=top_p)
    if reason:
        raise ValueError(reason)
    device = x.device
    _check_tokens("x", x, None, device)
    D = x.shape[0]
    _check_logits("cond", cond, D, None, device)
    K = cond.shape[1]
    if uncond is not None:
        _check_logits("uncond", uncond, D, K, device)
    _check_rng(seeds, row_len, D, device, params, step)
    return device, D, K


def _out(out, x: torch.Tensor, name="out") -> torch.Tensor:
    if out is None:
        return torch.empty_like(x)
    if (not isinstance(out, torch.Tensor) or out.dtype != torch.int64 or out.shape != x.shape
            or out.device != x.device or not out.is_contiguous()):
        raise ValueError(f"{name}: expected a contiguous int64 tensor of shape {tuple(x.shape)} on {x.device}")
    return out


def _check_table(table, K, levels, power, device):
    if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[0] != K:
        raise ValueError(f"table: expected ({K}, m), got shape {tuple(getattr(table, 'shape', ()))}")
    if table.dtype not in LOGIT_DTYPES:
        raise ValueError(f"table: expected a float tensor, got {table.dtype}")
    if table.device != device:
        raise ValueError(f"table: on {table.device}, expected {device}")
    if power not in (2, 4):
        raise ValueError(f"power: expected 2 or 4, got {power!r}")
    if levels is not None:
        levels = tuple(int(v) for v in levels)
        if not levels or min(levels) < 2 or math.prod(levels) != K:
            raise ValueError(f"levels: expected levels >= 2 whose product is K={K}, got {levels}")
    return levels


def _guidance(uncond, guidance_scale, temperature):
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature: expected a positive finite number, got {temperature!r}")
    if not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale: expected a finite number, got {guidance_scale!r}")
    return float(guidance_scale), LOG2E / float(temperature)


def _sq_norms(table: torch.Tensor) -> torch.Tensor:
    """‖ê_c‖² of every code, float32 (K,): one read of the table per call."""
    return table.float().pow(2).sum(-1)


def _strides(cond, uncond):
    return cond.stride(0), (uncond.stride(0) if uncond is not None else 0)


# ----------------------------------------------------------------------------- path sampling
def metric_sample(x1, beta, table, *, power=2, levels=None, seeds, row_len, out=None):
    """x_t ~ softmax(−β_i·d(·, x1_i)) per token (§2.3); β = ∞ returns x1. RNG: TAG_PATH, lane 0."""
    return _metric_sample(x1, beta, table, power=power, levels=levels, seeds=seeds, row_len=row_len, out=out)


def _metric_sample(x1, beta, table, *, power, levels, seeds, row_len, out, cfg=None):
    from . import metric_sample as kern
    from .table import table_finish_kernel, table_pass_kernel

    device = x1.device
    _check_tokens("x1", x1, None, device)
    D, K = x1.shape[0], table.shape[0] if isinstance(table, torch.Tensor) else 0
    levels = _check_table(table, K, levels, power, device)
    beta = _per_token("beta", beta, D, device)
    _check_rng(seeds, row_len, D, device)
    out = _out(out, x1)
    if D == 0:
        return out
    cfg = dict(cfg or {})
    if levels is not None:
        c = fsq_config(levels, device, ch_max=cfg.get("CH_MAX"), w=cfg.get("FW"))
        rows = cfg.get("ROWS") or (4 if device.type == "cuda" else
                                   _interp_rows(D, c["CH_P2"] * c["FW"] + c["LO_P2"]))
        kern.metric_sample_fsq_kernel[(math.ceil(D / rows),)](
            x1, beta, out, seeds, row_len, D, POWER=power, ROWS=rows, **c, **_launch_opts(device, cfg, "sample", 8))
        return out
    m = table.shape[1]
    table = table.contiguous()
    c = table_config(D, K, m, device, table.dtype, bm=cfg.get("BM"), bn=cfg.get("BN"), r=cfg.get("R"),
                     splits=cfg.get("SPLITS"))
    ts = torch.empty((D, c["NT"]), dtype=torch.float32, device=device)
    table_pass_kernel[(math.ceil(D / c["BM"]), c["SPLITS"])](
        table, _sq_norms(table), x1, x1, x1, x1, beta, beta, ts, ts, D, K, m, c["NT"], c["SPLITS"], TPS=c["TPS"],
        RATES=False, POWER=power, BM=c["BM"], BN=c["BN"], M_P2=c["M_P2"], BKM=c["BKM"],
        DOT_PRECISION=c["DOT_PRECISION"], **_launch_opts(device, cfg, "pass", 8, 3))
    table_finish_kernel[(math.ceil(D / c["R"]),)](
        table, x1, x1, out, x1, x1, beta, beta, x1, seeds, ts, ts, row_len, D, K, m, c["NT"], c["SPLITS"],
        RATES=False, POWER=power, R=c["R"], NT_P2=_pow2(c["NT"]), SP_P2=_pow2(c["SPLITS"]), BN=c["BN"],
        M_P2=c["M_P2"], BKM=c["BKM"], **_launch_opts(device, cfg, "finish", 4))
    return out


def _uniform_sample(x1, keep, *, K, mask_id, seeds, row_len, out, mask):
    from .mixture_mask import uniform_path_sample_kernel

    device = x1.device
    _check_tokens("x1", x1, None, device)
    D = x1.shape[0]
    keep = _per_token("keep", keep, D, device)
    _check_rng(seeds, row_len, D, device)
    out = _out(out, x1)
    if D == 0:
        return out
    block = 1024 if device.type == "cuda" else _interp_rows(D, 1)
    uniform_path_sample_kernel[(math.ceil(D / block),)](x1, keep, out, seeds, row_len, D, K, mask_id,
                                                          MASK=mask, BLOCK=block, **_launch_opts(device, {}, "", 4))
    return out


def mixture_sample(x1, keep, *, K, seeds, row_len, out=None):
    """x_t = x1 with probability κ_i (lane 1), else uniform over [0, K) (lane 2)."""
    if not isinstance(K, int) or not 2 <= K < 2**31:
        raise ValueError(f"K: expected an int in [2, 2^31), got {K!r}")
    return _uniform_sample(x1, keep, K=K, mask_id=0, seeds=seeds, row_len=row_len, out=out, mask=False)


def mask_sample(x1, keep, *, mask_id, seeds, row_len, out=None):
    """x_t = x1 with probability κ_i (lane 1), else the mask id."""
    return _uniform_sample(x1, keep, K=2, mask_id=int(mask_id), seeds=seeds, row_len=row_len, out=out,
                           mask=True)


# ----------------------------------------------------------------------------- sampler steps
def metric_step(cond, uncond, x, table, params, step, *, seeds, row_len, guidance_scale=1.0, temperature=1.0,
                top_k=0, top_p=1.0, power=2, levels=None, last=False, argmax_last=False, out=None):
    """One metric-path Euler step (§2.4). RNG: TAG_STEP; lanes 0 x̂1, 1 jump, 2 destination."""
    return _metric_step(cond, uncond, x, table, params, step, seeds=seeds, row_len=row_len,
                        guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                        power=power, levels=levels, last=last, argmax_last=argmax_last, out=out)


def _metric_step(cond, uncond, x, table, params, step, *, seeds, row_len, guidance_scale, temperature, top_k,
                 top_p, power, levels, last, argmax_last, out, cfg=None):
    from .metric_step import metric_step_fsq_kernel

    device, D, K = _check_step("metric_step", cond, uncond, x, params, step, seeds, row_len, top_k, top_p)
    levels = _check_table(table, K, levels, power, device)
    gs, zs = _guidance(uncond, guidance_scale, temperature)
    out = _out(out, x)
    if D == 0:
        return out
    cfg = dict(cfg or {})
    sc, su = _strides(cond, uncond)
    uptr = uncond if uncond is not None else cond
    argmax = bool(last and argmax_last)
    if levels is not None:
        c = fsq_config(levels, device, ch_max=cfg.get("CH_MAX"), w=cfg.get("FW"))
        dc = draw_config(K, D, device, rows=cfg.get("ROWS"), chunks=cfg.get("CHUNKS"), w=cfg.get("W"),
                         per_row=c["CH_P2"] * c["FW"] + c["LO_P2"], draw_rows=cfg.get("DRAW_ROWS"),
                         stages=cfg.get("STAGES"))
        metric_step_fsq_kernel[(math.ceil(D / dc["ROWS"]),)](
            cond, uptr, x, out, params, step, seeds, row_len, D, K, sc, su, gs, zs,
            POWER=power, HAS_UNCOND=uncond is not None, LAST=bool(last), ARGMAX=argmax, **dc, **c,
            **_launch_opts(device, cfg, "step", 8))
        return out
    # explicit table: x̂1 draw (and the list of tokens with x̂1 ≠ x), tensor-core pass, finish
    dc = draw_config(K, D, device, rows=cfg.get("ROWS"), chunks=cfg.get("CHUNKS"), w=cfg.get("W"),
                     draw_rows=cfg.get("DRAW_ROWS"), stages=cfg.get("STAGES"))
    table = table.contiguous()
    common = dict(cond=cond, uncond=uptr, has_uncond=uncond is not None, x=x, out=out, table=table,
                  params=params, step=step, seeds=seeds, row_len=row_len, strides=(sc, su), gs=gs, zs=zs,
                  power=power, last=bool(last), argmax=argmax, dc=dc, cfg=cfg)
    if last:
        _table_group(0, D, None, None, None, None, None, **common)
        return out
    # Token groups: the draw of group g+1 (memory-bound) runs while the tensor-core pass of
    # group g (compute-bound) runs on a side stream. A captured CUDA graph keeps the fork/join.
    groups = cfg.get("GROUPS") or (4 if device.type == "cuda" and D >= 4096 else 1)
    bounds = [D * g // groups for g in range(groups + 1)]
    scratch = dict(x1=torch.empty_like(x), lst=torch.empty_like(x),
                   count=torch.zeros(groups, dtype=torch.int32, device=device), sqc=_sq_norms(table))
    side = torch.cuda.Stream(device) if device.type == "cuda" and groups > 1 else None
    main = torch.cuda.current_stream(device) if side is not None else None
    for g in range(groups):
        a, b = bounds[g], bounds[g + 1]
        if a == b:
            continue
        _table_group(a, b, g, side, main, scratch, "draw", **common)
        _table_group(a, b, g, side, main, scratch, "rates", **common)
    if side is not None:
        main.wait_stream(side)
    return out


def _table_group(a, b, g, side, main, scratch, phase, *, cond, uncond, has_uncond, x, out, table, params, step,
                 seeds, row_len, strides, gs, zs, power, last, argmax, dc, cfg):
    """Tokens [a, b) of the table metric step: the draw (main stream), then the rates (side stream)."""
    from .categorical import draw_kernel
    from .table import table_finish_kernel, table_pass_kernel

    device, K, m = x.device, table.shape[0], table.shape[1]
    n = b - a
    if last or phase == "draw":
        x1 = x if last else scratch["x1"]
        lst = x if last else scratch["lst"][a:b]
        count = scratch["count"][g:g + 1] if not last else torch.zeros(1, dtype=torch.int32, device=device)
        draw_kernel[(math.ceil(n / dc["ROWS"]),)](
            cond, uncond, x, out, x1, lst, count, step, seeds, row_len, a, b, K, *strides, gs, zs,
            HAS_UNCOND=has_uncond, LAST=last, ARGMAX=argmax, **dc, **_launch_opts(device, cfg, "draw", 8))
        return
    c = table_config(n, K, m, device, table.dtype, bm=cfg.get("BM"), bn=cfg.get("BN"), r=cfg.get("R"),
                     splits=cfg.get("SPLITS"))
    ts = torch.empty((n, c["NT"]), dtype=torch.float32, device=device)
    zp = torch.empty((n, c["SPLITS"]), dtype=torch.float32, device=device)
    lst, count = scratch["lst"][a:b], scratch["count"][g:g + 1]
    if side is not None:
        side.wait_stream(main)  # this group's draw is done
        ctx = torch.cuda.stream(side)
        for t in (ts, zp):
            t.record_stream(side)
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        table_pass_kernel[(math.ceil(n / c["BM"]), c["SPLITS"])](
            table, scratch["sqc"], scratch["x1"], x, lst, count, params, params, ts, zp, n, K, m, c["NT"],
            c["SPLITS"], TPS=c["TPS"], RATES=True, POWER=power, BM=c["BM"], BN=c["BN"], M_P2=c["M_P2"],
            BKM=c["BKM"], DOT_PRECISION=c["DOT_PRECISION"], **_launch_opts(device, cfg, "pass", 8, 3))
        table_finish_kernel[(math.ceil(n / c["R"]),)](
            table, x, scratch["x1"], out, lst, count, params, params, step, seeds, ts, zp, row_len, n, K, m,
            c["NT"], c["SPLITS"], RATES=True, POWER=power, R=c["R"], NT_P2=_pow2(c["NT"]),
            SP_P2=_pow2(c["SPLITS"]), BN=c["BN"], M_P2=c["M_P2"], BKM=c["BKM"],
            **_launch_opts(device, cfg, "finish", 4))


def _uniform_step(cond, uncond, x, params, step, *, mask_id, seeds, row_len, guidance_scale, temperature, top_k,
                  top_p, last, argmax_last, out, mask, op, cfg=None):
    from .mixture_mask import uniform_step_kernel

    device, D, K = _check_step(op, cond, uncond, x, params, step, seeds, row_len, top_k, top_p)
    if mask and not 0 <= int(mask_id) < K:
        raise ValueError(f"mask_id: expected an id in [0, {K}), got {mask_id!r}")
    gs, zs = _guidance(uncond, guidance_scale, temperature)
    out = _out(out, x)
    if D == 0:
        return out
    cfg = dict(cfg or {})
    sc, su = _strides(cond, uncond)
    dc = draw_config(K, D, device, rows=cfg.get("ROWS"), chunks=cfg.get("CHUNKS"), w=cfg.get("W"),
                     draw_rows=cfg.get("DRAW_ROWS"), stages=cfg.get("STAGES"))
    uniform_step_kernel[(math.ceil(D / dc["ROWS"]),)](
        cond, uncond if uncond is not None else cond, x, out, params, step, seeds, row_len, D, K, sc, su, gs, zs,
        int(mask_id), MASK=mask, HAS_UNCOND=uncond is not None, LAST=bool(last),
        ARGMAX=bool(last and argmax_last), **dc, **_launch_opts(device, cfg, "step", 8))
    return out


def mixture_step(cond, uncond, x, params, step, *, seeds, row_len, guidance_scale=1.0, temperature=1.0, top_k=0,
                 top_p=1.0, last=False, argmax_last=False, out=None):
    """Mixture-path step (§2.4): jump to x̂1 with probability 1 − exp(−h·κ̇/(1−κ))."""
    return _uniform_step(cond, uncond, x, params, step, mask_id=0, seeds=seeds, row_len=row_len,
                         guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                         last=last, argmax_last=argmax_last, out=out, mask=False, op="mixture_step")


def mask_step(cond, uncond, x, params, step, *, mask_id, seeds, row_len, guidance_scale=1.0, temperature=1.0,
              top_k=0, top_p=1.0, last=False, argmax_last=False, out=None):
    """Masked-path step (§2.4): a masked token becomes x̂1 (never the mask) w.p. min(1, h·κ̇/(1−κ))."""
    return _uniform_step(cond, uncond, x, params, step, mask_id=mask_id, seeds=seeds, row_len=row_len,
                         guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                         last=last, argmax_last=argmax_last, out=out, mask=True, op="mask_step")
