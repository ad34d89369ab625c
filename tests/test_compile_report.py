"""Compile report for sm_90a in CI, no GPU (issue 12): every Triton kernel of triton_kernels/ at the
launchers' configurations for the DESIGN §6 cases, every CUDA kernel of csrc/cuda with nvcc -Xptxas -v.

Asserts, per kernel (every one, hot or not: issue 20): no spills, a stack frame of zero bytes (or
within ``STACK_FRAME_BYTES_MAX``), the occupancy its docstring claims (``CLAIMED_BLOCKS_PER_SM`` of
:mod:`ursa_engine.benchmarks.compile_report`), shared memory within an H100 SM. One report a module
(a subprocess without TRITON_INTERPRET: the kernels must be JIT functions, not interpreted ones),
~1.5-2.5 min on 2 cores; skipped with the reason when Triton's NVIDIA backend / ptxas or nvcc is
absent, except that ``URSA_REQUIRE_NVCC=1`` (``.ci/run`` sets it where ``nvcc`` exists) turns the
CUDA skip into a failure.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from ursa_engine.benchmarks.compile_cuda import parse_ptxas
from ursa_engine.benchmarks.compile_report import CLAIMED_BLOCKS_PER_SM, H100, STACK_FRAME_BYTES_MAX, blocks_per_sm

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("triton")
    tmp = tmp_path_factory.mktemp("compile_report")
    out = tmp / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")
    run = subprocess.run([sys.executable, "-m", "ursa_engine.benchmarks.compile_report", "--json", str(out),
                          "--allow-dirty"], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    print("\n" + run.stdout)
    return json.loads(out.read_text())


def nvcc_required() -> bool:
    """``URSA_REQUIRE_NVCC=1``: the CUDA half must run (``.ci/run`` sets it where ``nvcc`` exists)."""
    return os.environ.get("URSA_REQUIRE_NVCC", "") not in ("", "0")


def _rows(report, cuda: bool):
    key = "cuda" if cuda else "triton"
    if key in report["skipped"]:
        if cuda and nvcc_required():
            pytest.fail(f"URSA_REQUIRE_NVCC=1 but the CUDA half did not run: {report['skipped'][key]}")
        pytest.skip(report["skipped"][key])
    rows = [r for r in report["rows"] if r["kernel"].startswith("cuda:") == cuda]
    assert rows, f"no {key} kernels in the report"
    return rows


def _name(r):
    return f"{r['kernel']}[{r['variant']}] ({r['case']})"


def local_memory_problems(rows) -> list[str]:
    """Spills (any kernel, hot or not) and stack frames over STACK_FRAME_BYTES_MAX (0 unless listed)."""
    bad = [f"{_name(r)}: {r['spill_store_bytes']} B spill stores, {r['spill_load_bytes']} B spill loads"
           for r in rows if r["spill_store_bytes"] + r["spill_load_bytes"] > 0]
    for r in rows:
        stack, bound = r.get("stack_frame_bytes"), STACK_FRAME_BYTES_MAX.get(r["kernel"], 0)
        if stack is None:
            bad.append(f"{_name(r)}: no stack frame figure in the ptxas log")
        elif stack > bound:
            bad.append(f"{_name(r)}: {stack} B stack frame > {bound}")
    return bad


@pytest.mark.parametrize("cuda", [False, True], ids=["triton", "cuda"])
def test_no_kernel_spills_or_uses_a_stack_frame(report, cuda):
    """Every kernel, hot or not: zero spill bytes, and a stack frame of zero bytes (local memory:
    spills or local arrays) unless STACK_FRAME_BYTES_MAX states a bound for it."""
    bad = local_memory_problems(_rows(report, cuda))
    assert not bad, "\n".join(bad)


def test_local_memory_check_catches_cold_spills_and_stack_frames():
    """The check fails on a kernel that is not hot, on a stack frame, and on a missing figure."""
    row = dict(kernel="table_finish_kernel", variant="step", case="ibq-1024", hot=False, spill_store_bytes=0,
               spill_load_bytes=0, stack_frame_bytes=0)
    assert local_memory_problems([row]) == []
    assert local_memory_problems([dict(row, spill_load_bytes=8)])
    assert local_memory_problems([dict(row, stack_frame_bytes=16)]) == [
        "table_finish_kernel[step] (ibq-1024): 16 B stack frame > 0"]
    assert local_memory_problems([dict(row, stack_frame_bytes=None)])


def test_the_nvcc_requirement(monkeypatch):
    """Without nvcc the CUDA half is skipped, with the reason; URSA_REQUIRE_NVCC=1 makes that a failure."""
    doc = dict(skipped={"cuda": "nvcc not found"}, rows=[])
    monkeypatch.delenv("URSA_REQUIRE_NVCC", raising=False)
    with pytest.raises(pytest.skip.Exception, match="nvcc not found"):
        _rows(doc, True)
    monkeypatch.setenv("URSA_REQUIRE_NVCC", "1")
    with pytest.raises(pytest.fail.Exception, match="URSA_REQUIRE_NVCC=1"):
        _rows(doc, True)
    with pytest.raises(pytest.skip.Exception):  # the Triton half is not concerned
        _rows(dict(skipped={"triton": "no ptxas"}, rows=[]), False)


def test_ptxas_log_parsing():
    """The per-entry figures of an nvcc -Xptxas -v log, the stack frame included."""
    log = ("ptxas info    : Compiling entry function '_ZN4ursa4cuda12_GLOBAL__N_118metric_step_kernelILi2ELi1EEEvv' "
           "for 'sm_90a'\nptxas info    : Function properties for _ZN4ursa4cuda12_GLOBAL__N_118metric_step_kernel"
           "ILi2ELi1EEEvv\n    24 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 93 registers, 16 bytes smem, 400 bytes cmem[0]\n")
    (r,) = parse_ptxas(log)
    assert (r["kernel"], r["variant"], r["registers"]) == ("metric_step_kernel", "bf16,fsq", 93)
    assert (r["stack_frame_bytes"], r["spill_store_bytes"], r["spill_load_bytes"], r["static_smem_bytes"]) == (
        24, 8, 4, 16)


@pytest.mark.parametrize("cuda", [False, True], ids=["triton", "cuda"])
def test_occupancy_claims_and_shared_memory(report, cuda):
    bad = []
    for r in _rows(report, cuda):
        claimed = CLAIMED_BLOCKS_PER_SM.get(r["kernel"])
        if claimed is None:
            bad.append(f"{_name(r)}: no claimed occupancy in CLAIMED_BLOCKS_PER_SM")
        elif r["blocks_per_sm"] < claimed:
            bad.append(f"{_name(r)}: {r['blocks_per_sm']} blocks/SM ({r['registers']} registers, {r['num_warps']} "
                       f"warps, {r['shared_bytes']} B shared; bound by {r['limit']}) < claimed {claimed}")
        if r["shared_bytes"] > H100["smem_block_max"]:
            bad.append(f"{_name(r)}: {r['shared_bytes']} B shared > 227 KB")
        if r["registers"] is None or r["registers"] > H100["max_regs"]:
            bad.append(f"{_name(r)}: registers {r['registers']}")
    assert not bad, "\n".join(bad)


def test_every_kernel_is_in_the_report(report):
    """A new @triton.jit ``*_kernel`` in triton_kernels/ (or __global__ kernel in csrc/cuda) must be
    added to the report and to the claims table."""
    triton_names = set()
    for path in (ROOT / "triton_kernels").glob("*.py"):
        triton_names |= set(re.findall(r"@triton\.jit\s*\ndef (\w+_kernel)\(", path.read_text()))
    cuda_names = set()
    for path in (ROOT / "csrc" / "cuda").glob("*.cu"):
        cuda_names |= {"cuda:" + n for n in re.findall(r"__global__ void(?: __launch_bounds__\([^)]*\))? (\w+)\(",
                                                       path.read_text())}
    assert triton_names and cuda_names
    assert triton_names | cuda_names <= set(CLAIMED_BLOCKS_PER_SM)
    got = {r["kernel"] for r in report["rows"]}
    expected = (triton_names if "triton" not in report["skipped"] else set()) | (
        cuda_names if "cuda" not in report["skipped"] else set())
    assert expected <= got, f"not compiled: {sorted(expected - got)}"


def test_the_capped_kernels_are_compiled_at_their_cap(report):
    """metric_step / metric_sample FSQ run at maxnreg 128 (issue 12, finding 1): 2 blocks of 8 warps."""
    rows = [r for r in _rows(report, False) if r["kernel"] in ("metric_step_fsq_kernel", "metric_sample_fsq_kernel")]
    assert {r["variant"] for r in rows if r["kernel"] == "metric_step_fsq_kernel"} >= {"guided", "unguided"}
    for r in rows:
        assert r["maxnreg"] == 128 and r["registers"] <= 128, _name(r)


def test_blocks_per_sm_model():
    """The H100 occupancy arithmetic: registers (per warp, units of 256), shared memory (+1 KB a block), warps."""
    assert blocks_per_sm(128, 8, 32 * 1024) == (2, "regs")
    assert blocks_per_sm(175, 8, 32 * 1024) == (1, "regs")  # the uncapped guided FSQ step
    assert blocks_per_sm(40, 8, 32 * 1024) == (6, "regs")  # 40·32 = 1,280 a warp: 51 warps
    assert blocks_per_sm(32, 8, 100 * 1024) == (2, "smem")
    assert blocks_per_sm(16, 4, 0) == (16, "warps")
    assert blocks_per_sm(32, 8, 228 * 1024)[0] == 0  # over the 227 KB a block


def test_maxnreg_is_a_launch_option():
    """``maxnreg`` (LAUNCH) is an option of Triton's NVIDIA backend, so ``kernel[grid](..., maxnreg=128)``
    compiles with it (JITFunction.run passes launch kwargs to parse_options); the interpreter (CPU tests)
    accepts and ignores it."""
    pytest.importorskip("triton")
    import torch
    import triton
    import triton.language as tl
    from ursa_engine.triton_kernels.tiles import LAUNCH, launch_options

    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError as err:
        pytest.skip(f"no NVIDIA backend in this Triton: {err}")
    assert "maxnreg" in CUDAOptions.__dataclass_fields__
    assert launch_options("metric_step_fsq")["maxnreg"] == 128
    assert "maxnreg" not in launch_options("metric_step_fsq", {"step": {"maxnreg": None}})
    assert all(key in ("step", "sample", "draw", "pass", "finish", "path") for key, _ in LAUNCH.values())

    @triton.jit
    def _twice(x_ptr, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) * 2, mask=i < n)

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("the interpreter half needs TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    x = torch.arange(4, dtype=torch.float32)
    _twice[(1,)](x, 4, BLOCK=4, maxnreg=128, num_warps=8)
    assert x.tolist() == [0.0, 2.0, 4.0, 6.0]
