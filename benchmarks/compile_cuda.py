"""``nvcc -Xptxas -v -arch=sm_90a`` over ``csrc/cuda``: registers, spills and shared memory per kernel.

Part of :mod:`.compile_report` (issue 12). Every ``.cu`` file is compiled to an object (no GPU, no
link) with the flags of CMakeLists.txt; ptxas's per-entry lines are parsed and the mangled names
decoded into ``kernel[template args]`` (``metric_step_kernel[bf16,table]``). Shared memory is the
static part ptxas reports plus the dynamic part the launcher asks for at the DESIGN §6 case
(:func:`dynamic_smem`, mirroring ``shared_bytes`` of ``csrc/cuda/block.cuh``).
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THREADS = 256  # kThreads, csrc/cuda/block.cuh
FLAGS = ["-O3", "--expt-relaxed-constexpr", "-arch=sm_90a", "-Xptxas", "-v"]  # CMakeLists.txt + ptxas -v

_DTYPES = {0: "fp32", 1: "fp16", 2: "bf16"}  # DType, csrc/include/ursa/ops.h
_CODES = {0: "table", 1: "fsq", 2: "fsq-split"}  # CodesMode, csrc/cuda/codes.cuh
_HOT = {"metric_step_kernel", "token_step_kernel", "metric_sample_kernel"}


def _label(mangled: str) -> tuple[str, str]:
    """(kernel, template args) of an Itanium-mangled ``ursa::cuda::(anon)::name<int...>`` entry."""
    m = re.search(r"\d([a-z][a-z_]*_kernel)I((?:Li\d+E)+)E", mangled)  # <len><name>I<template args>E
    if not m:
        return mangled, ""
    name, targs = m.group(1), [int(v) for v in re.findall(r"Li(\d+)E", m.group(2))]
    if name == "metric_step_kernel":
        parts = [_DTYPES.get(targs[0], str(targs[0])), _CODES.get(targs[1], str(targs[1]))]
    elif name == "token_step_kernel":
        parts = [_DTYPES.get(targs[0], str(targs[0])), ("mixture", "mask")[targs[1]]]
    elif name == "metric_sample_kernel":
        parts = [_CODES.get(targs[0], str(targs[0]))]
    elif name == "kappa_sample_kernel":
        parts = [("mixture", "mask")[targs[0]]]
    else:
        parts = [str(v) for v in targs]
    return name, ",".join(parts)


def parse_ptxas(log: str) -> list[dict]:
    """One dict per ``Compiling entry function`` block of a ptxas ``-v`` log."""
    rows = []
    for block in re.split(r"ptxas info\s*: Compiling entry function ", log)[1:]:
        mangled = block.split("'")[1]
        kernel, targs = _label(mangled)
        regs = re.search(r"Used (\d+) registers", block)
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", block)
        smem = re.search(r"(\d+) bytes smem", block)
        stack = re.search(r"(\d+) bytes stack frame", block)
        rows.append(dict(kernel=kernel, variant=targs, mangled=mangled, registers=int(regs.group(1)) if regs else None,
                         spill_store_bytes=int(spill.group(1)) if spill else 0,
                         spill_load_bytes=int(spill.group(2)) if spill else 0,
                         stack_frame_bytes=int(stack.group(1)) if stack else None,
                         static_smem_bytes=int(smem.group(1)) if smem else 0))
    return rows


def dynamic_smem(kernel: str, variant: str, K: int, m: int, levels: tuple[int, ...] | None) -> int:
    """Dynamic shared memory the launcher requests: ``shared_bytes`` of block.cuh (2 floats a tile of
    256 codes, padded to an even count ≥ 16; max(m, 16) floats of ê; the FSQ split's 2·(inner+outer))."""
    if kernel == "kappa_sample_kernel":
        return 0
    tiles = max(math.ceil(K / 256), 16)
    tiles = (tiles + 1) // 2 * 2
    dims = max(m, 16)  # kMaxLevels = 16
    split = 0
    if "fsq-split" in variant and levels:  # inner: the first levels until >= 32 codes (codes_mode, codes.cuh)
        inner, i = 1, 0
        while i < len(levels) and inner < 32:
            inner *= levels[i]
            i += 1
        split = 2 * (inner + K // inner)
    return (2 * tiles + dims + split) * 4


def start() -> tuple[list, str | None]:
    """Start nvcc on every ``csrc/cuda/*.cu`` in the background (it runs while Triton compiles);
    returns the handles for :func:`cuda_rows`, or ([], why) without nvcc."""
    nvcc = shutil.which("nvcc") or shutil.which("nvcc", path="/usr/local/cuda/bin")
    if nvcc is None:
        return [], "nvcc not found on PATH or in /usr/local/cuda/bin"
    tmp = tempfile.mkdtemp(prefix="ursa-nvcc-")
    jobs = []
    for src in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        cmd = [nvcc, "-c", *FLAGS, f"-I{ROOT / 'csrc' / 'include'}", str(src), "-o", str(Path(tmp) / f"{src.stem}.o")]
        jobs.append((src.name, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    return jobs, None


def cuda_rows(jobs: list | None = None) -> tuple[list[dict], str | None]:
    """(rows, None), or ([], why) when nvcc is absent or fails. Each row has ``case`` and ``hot``.
    ``jobs``: from :func:`start` (default: start them now)."""
    if jobs is None:
        jobs, why = start()
        if why:
            return [], why
    rows = []
    for name, proc in jobs:
        log = proc.communicate()[0]
        if proc.returncode != 0:
            return [], f"nvcc failed on {name}: {log[-2000:]}"
        rows += parse_ptxas(log)
    out = []
    for r in rows:
        table = "table" in r["variant"] and "fsq" not in r["variant"]
        case = "ibq-1024" if table else "fsq-video"
        K, m, levels = (131_072, 256, None) if table else (64_000, 0, (8, 8, 8, 5, 5, 5))
        smem = r["static_smem_bytes"] + dynamic_smem(r["kernel"], r["variant"], K, m, levels)
        out.append(dict(r, kernel="cuda:" + r["kernel"], num_warps=THREADS // 32, num_stages=None,
                        shared_bytes=smem, config=dict(threads=THREADS, K=K, m=m), case=case,
                        hot=r["kernel"] in _HOT))
    return out, None
