"""Latency, memory and roofline benchmarks of ursa-engine (DESIGN §6).

Every performance figure of the project is produced here, by one harness
(:mod:`ursa_engine.benchmarks.harness`), and reproduced with one command::

    ursa-engine bench run --mode smoke            # CPU, small shapes, seconds (CI)
    ursa-engine bench run --mode cpu              # native CPU vs the dense reference
    ursa-engine bench run --mode gpu              # real shapes on a CUDA device
    python -m ursa_engine.benchmarks.gpu_suite --out "$OUT"   # GPU tests + every benchmark, < 10 min

Each ``bench_<op>.py`` module exposes ``NAME`` and ``run(ctx)``; :mod:`ursa_engine.benchmarks.run` runs
them and writes one JSON per run; :mod:`ursa_engine.benchmarks.report` turns JSON into a markdown table,
a PNG plot and the comparison with the paper's latencies.
"""

import argparse
from pathlib import Path

BENCHES = ("metric_step", "mixture_step", "metric_sample", "model_step", "generate", "vae", "memory_plan",
           "linear_ce")
MODES = ("smoke", "cpu", "gpu")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``ursa-engine bench run`` / ``python -m ursa_engine.benchmarks.run`` (no torch import)."""
    p.add_argument("names", nargs="*", metavar="SUITE", help=f"suites to run (default: all of {BENCHES})")
    p.add_argument("--mode", choices=MODES, default="smoke",
                   help="smoke: CPU, small shapes, seconds; cpu: native vs dense at D=1,024, K=64,000; "
                        "gpu: docs/design.md §6 real shapes")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the JSON results")
    p.add_argument("--budget", type=float, default=None, help="global time budget in seconds")
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)  # epoch seconds
    p.add_argument("--device", default=None, help="torch device (default: cuda for gpu, else cpu)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--report", action="store_true", help="also write summary.md and a plot in --out")
    p.add_argument("--allow-dirty", action="store_true",
                   help="write results from a tree with uncommitted changes (stamped so; refused otherwise, "
                        "except --mode smoke: benchmarks/provenance.py)")
