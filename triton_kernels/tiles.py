"""Tilings and CUDA launch options of the sampler kernels (:mod:`.sampler`), in one place.

The launchers take every configuration from here, and ``benchmarks/compile_report.py`` compiles
every kernel for sm_90a with exactly these (issue 12): :func:`draw_config`, :func:`fsq_config`,
:func:`table_config`, :func:`fsq_step_tiles`, :func:`fsq_sample_tiles`, :func:`table_groups`,
:func:`path_block` and :data:`LAUNCH` (num_warps / num_stages / maxnreg). Under the interpreter
(``TRITON_INTERPRET=1``) programs are few and wide (:func:`_interp_rows`).
"""

from __future__ import annotations

import math

import torch


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


# Under the interpreter a program costs ~0.3 s of Python whatever its size: run few, wide
# programs. Triton refuses tensors of more than 2^20 elements (its TRITON_MAX_TENSOR_NUMEL, the
# interpreter included), so a program's widest tile (ROWS × per_row, per_row rounded up to a
# power of two as every tile dimension is) stays within _INTERP_TILE (issue 12, finding 5: 2^21
# gave 512 rows × a 4,096-code draw chunk = 2^21 elements at K = 64,000, D >= 512).
_INTERP_TILE = 1 << 20


def _interp_rows(D: int, per_row: int) -> int:
    """Power-of-two ROWS of an interpreter program: ROWS × pow2(per_row) <= _INTERP_TILE (and ROWS <= pow2(D))."""
    return max(1, min(_pow2(D), _INTERP_TILE // _pow2(max(per_row, 1))))


def draw_config(K: int, D: int, device: torch.device, rows: int | None = None, chunks: int | None = None,
                w: int | None = None, per_row: int = 0, draw_rows: int | None = None,
                stages: int | None = None) -> dict:
    """Tile of the streaming x̂1 draw (:func:`triton_kernels.categorical.draw_rows`).

    ROWS tokens a program, DRAW_ROWS (ROWS or 1) streamed at a time; a row is CHUNKS chunks
    of NW·W codes, W codes of every chunk per iteration. ``per_row``: elements a token also
    holds in a later phase of the same kernel (its widest FSQ tile), to size interpreter programs.
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
    the low group (P_LO codes) is walked in slices of FW (:mod:`ursa_engine.triton_kernels.fsq`)."""
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
                 splits=None, num_sms: int | None = None, precision: str | None = None) -> dict:
    """Tiles of the table pass (BM tokens × BN codes, m in BKM chunks) and of the finish (R tokens).

    ``num_sms`` (default: the device's) sizes the K splits; the compile report passes an H100's 132.
    ``precision``: the pass's dot on a float32 table (:mod:`triton_kernels.table` has the bounds):
    "bf16x3" (CUDA default: 3 bf16 dots, 1.5× the tensor-core time of tf32, |Δd| within
    :data:`~triton_kernels.table.BF16X3_DIST_ERROR`), "tf32x3" (3 tf32 dots: 3×; the interpreter's
    default, which computes every dot in float32 anyway), "tf32" (errors up to
    :data:`~triton_kernels.table.TF32_DIST_ERROR`: issue 12, finding 4) or "ieee". A bfloat16
    table always runs in bf16 (its products are exact in float32).
    """
    m_p2 = max(16, _pow2(m))
    bkm = min(64, m_p2)
    if device.type == "cuda":
        bm, bn, r = bm or 128, bn or 64, r or 1
    else:
        bn = bn or 16
        bm = bm or max(16, min(_pow2(D), 4096))
        r = r or _interp_rows(D, max(bn * bkm, _pow2(math.ceil(K / bn))))
    bn = max(bn, _pow2(math.ceil(K / 8192)))  # the finish keeps all tile sums of a token in registers
    nt = math.ceil(K / bn)
    blocks = math.ceil(max(D, 1) / bm)
    want = 2 * (num_sms or _num_sms(device)) if device.type == "cuda" else 1
    splits = max(1, min(nt, splits or math.ceil(want / blocks)))
    tps = math.ceil(nt / splits)
    splits = math.ceil(nt / tps)
    if precision not in (None, "bf16x3", "tf32", "tf32x3", "ieee"):
        raise ValueError(f"precision: expected 'bf16x3', 'tf32', 'tf32x3' or 'ieee', got {precision!r}")
    if device.type != "cuda" and precision == "bf16x3":
        precision = "tf32x3"  # the interpreter knows no bf16x3 (and computes float32 dots in float32)
    default = "bf16x3" if device.type == "cuda" else "tf32x3"
    precision = (precision or default) if table_dtype == torch.float32 else "ieee"
    return dict(BM=bm, BN=bn, R=r, M_P2=m_p2, BKM=bkm, NT=nt, TPS=tps, SPLITS=splits, DOT_PRECISION=precision)


# CUDA launch options of every sampler kernel: name -> (the ``cfg`` key that overrides them, options).
# benchmarks/compile_report.py compiles each kernel with exactly these (its CLAIMED_BLOCKS_PER_SM
# table holds the occupancy each one is built for). maxnreg (issue 12, finding 1): at 8 warps,
# 128 registers a thread give 2 blocks an SM (65,536 registers); uncapped, the guided FSQ step
# took 175 (1 block an SM: no overlap of one block's logits stream with another's codebook
# arithmetic), the unguided one spilled 16 B (it now streams 2 tokens a program: 0 spills at the
# cap) and the FSQ path sample took 145 (now 4 warps at 128: 4 blocks, 16 warps an SM, no spills).
LAUNCH = {
    "metric_step_fsq": ("step", dict(num_warps=8, maxnreg=128)),
    "metric_sample_fsq": ("sample", dict(num_warps=4, maxnreg=128)),
    "uniform_step": ("step", dict(num_warps=8)),
    "draw": ("draw", dict(num_warps=8)),
    "table_pass": ("pass", dict(num_warps=8, num_stages=3)),
    "table_finish": ("finish", dict(num_warps=4)),
    "uniform_path_sample": ("path", dict(num_warps=4)),
}


def launch_options(name: str, cfg: dict | None = None) -> dict:
    """CUDA launch options (num_warps, num_stages, maxnreg) of kernel ``name`` of :data:`LAUNCH`;
    ``cfg[key]`` overrides them (``{"draw": {"num_warps": 4}}``; ``{"step": {"maxnreg": None}}``
    removes the cap)."""
    key, opts = LAUNCH[name]
    merged = {**opts, **(cfg or {}).get(key, {})}
    return {k: v for k, v in merged.items() if v is not None}


def _launch_opts(device: torch.device, cfg: dict, name: str) -> dict:
    """:func:`launch_options` on CUDA; nothing under the interpreter (it ignores them)."""
    if device.type != "cuda":
        return {}
    return launch_options(name, cfg)


def fsq_step_tiles(levels, K: int, D: int, device: torch.device, cfg: dict | None = None,
                   guided: bool = True) -> dict:
    """Constexprs of :func:`triton_kernels.metric_step.metric_step_fsq_kernel` (draw + FSQ tiles).

    CUDA: ROWS = 4 tokens a program with guidance, 2 without (at maxnreg 128 the unguided kernel
    spills 12 B with 4; with 2 it needs 116 registers: benchmarks/compile_report.py).
    """
    cfg = cfg or {}
    rows = cfg.get("ROWS") or ((4 if guided else 2) if device.type == "cuda" else None)
    c = fsq_config(levels, device, ch_max=cfg.get("CH_MAX"), w=cfg.get("FW"))
    dc = draw_config(K, D, device, rows=rows, chunks=cfg.get("CHUNKS"), w=cfg.get("W"),
                     per_row=max(c["CH_P2"] * c["FW"], c["LO_P2"]), draw_rows=cfg.get("DRAW_ROWS"),
                     stages=cfg.get("STAGES"))
    return {**dc, **c}


def fsq_sample_tiles(levels, D: int, device: torch.device, cfg: dict | None = None) -> dict:
    """Constexprs of :func:`triton_kernels.metric_sample.metric_sample_fsq_kernel`."""
    cfg = cfg or {}
    c = fsq_config(levels, device, ch_max=cfg.get("CH_MAX"), w=cfg.get("FW"))
    rows = cfg.get("ROWS") or (4 if device.type == "cuda" else _interp_rows(D, max(c["CH_P2"] * c["FW"], c["LO_P2"])))
    return dict(c, ROWS=rows)


def table_groups(D: int, device: torch.device, cfg: dict | None = None) -> list[int]:
    """Token bounds of the table step's pipelined groups (G = 4 on CUDA from D = 4,096)."""
    groups = max(1, min((cfg or {}).get("GROUPS") or (4 if device.type == "cuda" and D >= 4096 else 1), D))
    return [D * g // groups for g in range(groups + 1)]


def path_block(D: int, device: torch.device, num_sms: int | None = None) -> int:
    """Tokens a program of the uniform / mask path sample: on CUDA at least 4 programs an SM
    (issue 12, finding 7: 1024 gave 65 programs at D = 66,560 on 132 SMs), 128..1024 tokens."""
    if device.type != "cuda":
        return _interp_rows(D, 1)
    per = D // (4 * (num_sms or _num_sms(device)))
    return max(128, min(1024, _pow2(per + 1) // 2))
