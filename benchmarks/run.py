"""Run benchmark suites and write one JSON per suite run (``python -m ursa_engine.benchmarks.run``).

Modes: ``smoke`` (CPU, small shapes, seconds: CI), ``cpu`` (the native CPU backend against the
dense reference at D = 1,024, K = 64,000), ``gpu`` (docs/design.md §6 real shapes and smaller ones).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

import torch

from . import BENCHES, DEFAULT_OUT, add_arguments, provenance, telemetry  # noqa: F401
from .harness import Ceilings, Deadline, measure_ceilings
from .records import BenchContext, ResultWriter, result_path

CASE_BUDGET_S = {"smoke": 0.05, "cpu": 3.0, "gpu": 1.5}

_CEILINGS: dict[tuple[str, str], Ceilings] = {}


def default_device(mode: str) -> torch.device:
    if mode == "gpu":
        if not torch.cuda.is_available():
            raise SystemExit("--mode gpu needs a CUDA device (torch.cuda.is_available() is False)")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def ceilings_for(device: torch.device, mode: str) -> Ceilings:
    """Measured once per process and device (the "same run" of every figure it bounds)."""
    key = (str(device), mode)
    if key not in _CEILINGS:
        _CEILINGS[key] = measure_ceilings(device, mode)
    return _CEILINGS[key]


def run_suite(name: str, *, mode: str, out_dir: Path, device: torch.device | None = None,
              deadline: Deadline | None = None, quiet: bool = False, options: dict | None = None,
              allow_dirty: bool = False) -> Path:
    """Run ``benchmarks/bench_<name>.py`` and return the path of the JSON it wrote.

    Failures never escape: a suite that breaks leaves an ``error`` record with the traceback. The
    provenance rule (:mod:`.provenance`) is checked first: outside ``smoke`` mode a dirty tree raises
    :class:`~.provenance.DirtyTree` unless ``allow_dirty``; the header carries the stamp.
    """
    stamp = provenance.check(allow_dirty=allow_dirty, result=mode != "smoke")
    device = device or default_device(mode)
    deadline = deadline or Deadline(None)
    header = telemetry.run_header(device, mode)
    header["provenance"] = stamp
    header["suite"] = name
    header["options"] = options or {}
    try:
        ceilings = ceilings_for(device, mode)
    except Exception as err:  # noqa: BLE001 - figures without floors are still figures
        ceilings = None
        header["ceilings_error"] = f"{type(err).__name__}: {err}"
    path = result_path(out_dir, name, header)
    writer = ResultWriter(path, header, ceilings)
    ctx = BenchContext(suite=name, mode=mode, device=device, deadline=deadline, ceilings=ceilings,
                       header=header, writer=writer, case_budget_s=CASE_BUDGET_S[mode], quiet=quiet)
    if ceilings and not quiet:
        print(f"[{name}] ceilings on {header['device'].get('name')}: copy "
              f"{ceilings.copy_bytes_per_s / 1e9:.0f} GB/s, {ceilings.matmul_dtype} matmul "
              f"{ceilings.matmul_flops_per_s / 1e12:.3g} TFLOP/s", flush=True)
    t0 = time.time()
    try:
        module = importlib.import_module(f"ursa_engine.benchmarks.bench_{name}")
        module.run(ctx, **(options or {}))
    except Exception as err:  # noqa: BLE001 - recorded, and the caller goes on
        if not quiet:
            traceback.print_exc()
        ctx.record(case="<suite>", provider="-", shape={}, work=_no_work(), status="error",
                   reason=f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=6)}")
    header["elapsed_s"] = round(time.time() - t0, 2)
    writer.flush()
    return path


def _no_work():
    from .harness import Work

    return Work()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ursa-engine bench run", description=__doc__)
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


def run_from_args(args: argparse.Namespace) -> int:
    names = args.names or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        print(f"unknown suite(s) {unknown}; choose from {BENCHES}", file=sys.stderr)
        return 2
    device = torch.device(args.device) if args.device else default_device(args.mode)
    deadline = Deadline(at=args.deadline) if args.deadline else Deadline(args.budget)
    try:
        provenance.check(allow_dirty=args.allow_dirty, result=args.mode != "smoke")
    except provenance.DirtyTree as err:
        return provenance.refuse(err)
    paths = []
    for name in names:
        paths.append(run_suite(name, mode=args.mode, out_dir=args.out, device=device, deadline=deadline,
                               quiet=args.quiet, allow_dirty=args.allow_dirty))
        print(f"wrote {paths[-1]}", flush=True)
    if args.report:
        from . import report

        report.write_report(paths, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
