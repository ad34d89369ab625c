"""The whole GPU suite in one command: build, GPU tests, every benchmark, report.

Made for one 10-minute call of the device tool (it runs in the repository root and brings back
what is under ``$OUT``: at most 8 files, so results are packed)::

    URSA_COMMIT=<sha> PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_suite --out "$OUT"

Stages, each with its own time limit inside one global budget (default 540 s):

1. ``pip install --no-build-isolation --no-deps --no-index -e .`` (builds the native extension);
2. ``pytest -m gpu`` (junit XML + log);
3. each benchmark suite in its own process (a CUDA fault in one cannot poison the next), with a
   deadline from a share of the time left; results are flushed after every record, so a killed
   suite keeps what it measured;
4. ``summary.md`` + ``latency.png`` from the JSON, ``results.tar.gz`` with every JSON, and
   ``suite.json`` with what each stage did.

Output folder: ``suite.log``, ``suite.json``, ``summary.md``, ``latency.png``, ``pytest.xml``,
``results.tar.gz`` (unpack into ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from . import BENCHES

ROOT = Path(__file__).resolve().parent.parent
# share of the benchmark time left when a suite starts (unused time flows to the next ones)
WEIGHTS = {"metric_step": 3, "mixture_step": 2, "metric_sample": 2, "model_step": 9, "generate": 6, "vae": 3,
           "memory_plan": 2}


class Suite:
    def __init__(self, out: Path, budget: float):
        self.t0 = time.time()
        self.deadline = self.t0 + budget
        self.out = out
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = out / "results"
        self.work.mkdir(exist_ok=True)
        self.log_file = open(out / "suite.log", "a", buffering=1)  # noqa: SIM115 - closed by finish()
        self.stages: list[dict] = []
        self.brief = ""

    def left(self) -> float:
        return self.deadline - time.time()

    def log(self, text: str) -> None:
        line = f"[suite {time.time() - self.t0:6.1f}s] {text}"
        print(line, flush=True)
        self.log_file.write(line + "\n")

    def sh(self, name: str, cmd: list[str], timeout: float, env: dict | None = None) -> dict:
        """Run a stage in its own process group; its output goes to the log; kill it on timeout."""
        timeout = max(1.0, timeout)
        self.log(f"{name}: {' '.join(cmd)} (limit {timeout:.0f} s)")
        start = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                start_new_session=True)
        killed = threading.Event()

        def kill():  # a silent hang must end too: a timer, not a check between output lines
            killed.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:  # streamed, so a kill keeps everything printed so far
                self.log_file.write(line)
            proc.wait()
        finally:
            timer.cancel()
        timed_out = killed.is_set()
        stage = {"stage": name, "rc": proc.returncode, "timed_out": timed_out,
                 "seconds": round(time.time() - start, 1)}
        self.stages.append(stage)
        self.log(f"{name}: rc={proc.returncode}{' TIMED OUT' if timed_out else ''} in {stage['seconds']} s")
        return stage

    # ------------------------------------------------------------------ stages
    def environment(self) -> None:
        """nvidia-smi as found (versions and telemetry are in every result file too)."""
        self.log(f"python {sys.version.split()[0]} at {sys.executable}")
        try:
            text = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30, check=False).stdout
        except (OSError, subprocess.SubprocessError) as err:
            text = f"nvidia-smi: {err}"
        self.log_file.write(text + "\n")

    def install(self, limit: float) -> dict:
        # CMAKE_CUDA_ARCHITECTURES (forwarded by setup.py): CUDAARCHS would be read too late by
        # CMakeLists.txt, which sets its own default before enable_language(CUDA)
        env = {"CMAKE_CUDA_ARCHITECTURES": os.environ.get("CMAKE_CUDA_ARCHITECTURES", "90"),
               "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 8),
               "MAX_JOBS": str(os.cpu_count() or 8)}
        return self.sh("install", [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
                                   "--no-index", "-e", "."], min(limit, self.left() - 60), env)

    def tests(self, limit: float, marker: str) -> dict:
        cmd = [sys.executable, "-m", "pytest", "-m", marker, "-q", "-rs", "-p", "no:cacheprovider",
               f"--junitxml={self.out / 'pytest.xml'}"]
        if importlib.util.find_spec("pytest_timeout") is not None:
            cmd.append("--timeout=120")
        stage = self.sh("tests", cmd, min(limit, self.left() - 60))
        stage.update(junit_summary(self.out / "pytest.xml"))
        return stage

    def benches(self, names: list[str], mode: str) -> None:
        for i, name in enumerate(names):
            rest = sum(WEIGHTS.get(n, 1) for n in names[i:])
            reserve = 30  # report, packing
            share = (self.left() - reserve) * WEIGHTS.get(name, 1) / rest
            if share < 15:
                self.log(f"bench {name}: skipped, {self.left():.0f} s left")
                self.stages.append({"stage": f"bench {name}", "rc": None, "skipped": "time budget"})
                continue
            soft = time.time() + share
            self.sh(f"bench {name}", [sys.executable, "-m", "ursa_engine.benchmarks.run", name, "--mode", mode,
                                      "--out", str(self.work), "--deadline", f"{soft:.0f}"],
                    timeout=share + 45)

    def finish(self) -> None:
        from . import report

        files = sorted(self.work.glob("*.json"))
        try:
            self.brief = report.brief(report.load(files))
            md, _ = report.write_report(files, self.out)
            with open(md, "a") as f:
                f.write(suite_markdown(self.stages))
        except Exception as err:  # noqa: BLE001 - the JSON still comes back
            self.log(f"report failed: {type(err).__name__}: {err}")
        with tarfile.open(self.out / "results.tar.gz", "w:gz") as tar:
            for f in files:
                tar.add(f, arcname=f.name)
        (self.out / "suite.json").write_text(json.dumps(
            {"stages": self.stages, "results": [f.name for f in files],
             "elapsed_s": round(time.time() - self.t0, 1)}, indent=1))
        # only 8 files come back from the device: the JSON travels inside the tarball
        for f in files:
            f.unlink()
        try:
            self.work.rmdir()
        except OSError:
            pass
        self.log(f"done in {time.time() - self.t0:.0f} s; files in {self.out}")
        self.log_file.close()


def junit_summary(path: Path) -> dict:
    try:
        root = ET.parse(path).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    except (OSError, ET.ParseError, AttributeError, ValueError):
        return {}


def suite_markdown(stages: list[dict]) -> str:
    lines = ["", "## Suite stages", "", "| stage | rc | seconds | notes |", "|---|---|---|---|"]
    for s in stages:
        notes = ", ".join(f"{k}={v}" for k, v in s.items() if k not in ("stage", "rc", "seconds"))
        lines.append(f"| {s['stage']} | {s.get('rc')} | {s.get('seconds', '–')} | {notes} |")
    return "\n".join(lines) + "\n"


def tail_summary(out: Path, limit: int = 5000) -> str:
    """The paper comparison, targets and stages of summary.md (the device reply shows the end)."""
    try:
        text = (out / "summary.md").read_text()
    except OSError:
        return "(no summary.md)"
    keep = []
    for title in ("## Comparison with the paper", "## Targets", "## Suite stages"):
        if title in text:
            part = text[text.index(title):]
            nxt = part.find("\n## ", 3)
            keep.append(part if nxt < 0 else part[:nxt])
    short = "\n".join(keep)
    return short[-limit:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ursa_engine.benchmarks.gpu_suite", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_suite_out")))
    p.add_argument("--budget", type=float, default=540.0, help="seconds for everything (device limit: 600)")
    p.add_argument("--mode", default="gpu", choices=("gpu", "smoke"), help="smoke: rehearse on a CPU")
    p.add_argument("--skip-install", action="store_true")
    p.add_argument("--tests", default="gpu", help="pytest -m marker expression; 'none' skips the tests")
    p.add_argument("--install-limit", type=float, default=200.0)
    p.add_argument("--tests-limit", type=float, default=150.0)
    p.add_argument("benches", nargs="*", default=list(BENCHES), help=f"default: {' '.join(BENCHES)}")
    args = p.parse_args(argv)
    suite = Suite(args.out, args.budget)
    suite.log(f"ursa-engine GPU suite, budget {args.budget:.0f} s, out {args.out}")
    try:
        suite.environment()
        if not args.skip_install:
            suite.install(args.install_limit)
        if args.tests != "none":
            suite.tests(args.tests_limit, args.tests)
        suite.benches([b for b in args.benches if b in BENCHES], args.mode)
    finally:
        suite.finish()
    print(suite.brief[-6000:], flush=True)
    print(tail_summary(args.out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
