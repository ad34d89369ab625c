"""The whole GPU suite in one command: build, GPU tests, devices, every benchmark, report.

Made for one 10-minute call of the device tool (it runs in the repository root and brings back
what is under ``$OUT``: at most 8 files, so results are packed)::

    URSA_COMMIT=<sha> PYTHONUNBUFFERED=1 python3 -m ursa_engine.benchmarks.gpu_suite --out "$OUT"

Stages, each with its own time limit inside one global budget (default 540 s):

1. ``pip install --no-build-isolation --no-deps --no-index -e .`` (builds the native extension);
2. ``pytest -m gpu`` (junit XML + log);
3. ``devices`` (its own process): the native CUDA module's loading report
   (:func:`ursa_engine._native.cuda_report`) and, with two GPUs, the engine on ``cuda:1`` while
   ``cuda:0`` is current, whose tokens must equal those on ``cuda:0`` (eager and graph mode, each
   fused sampler backend): the device discipline of issue 12 (:func:`device_check`);
4. each benchmark suite in its own process (a CUDA fault in one cannot poison the next), with a
   deadline from a share of the time left; results are flushed after every record, so a killed
   suite keeps what it measured;
5. ``summary.md`` + ``latency.png`` from the JSON, the measured kernel times next to their
   predictions (``ursa_engine.benchmarks.predicted.compare``), ``results.tar.gz`` with every JSON,
   and ``suite.json`` with what each stage did.

What to fix comes first: the first lines of ``summary.md``, of ``suite.log`` and of the final
report on stdout are an ``ACTION:`` list, one line per failure (stage, its first error line, the
file to look at), or ``ACTION: none``. Progress goes to stderr while the suite runs.

Output folder: ``suite.log``, ``suite.json``, ``summary.md``, ``latency.png``, ``pytest.xml``,
``results.tar.gz`` (unpack into ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from . import BENCHES
from .provenance import write_text

ROOT = Path(__file__).resolve().parent.parent
# share of the benchmark time left when a suite starts (unused time flows to the next ones)
WEIGHTS = {"metric_step": 3, "mixture_step": 2, "metric_sample": 2, "model_step": 9, "generate": 6, "vae": 3,
           "memory_plan": 2, "linear_ce": 3}


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
        self.outputs: dict[str, list[str]] = {}  # stage -> its output lines (for the ACTION list)
        self.brief = ""
        self.actions: list[str] = []

    def left(self) -> float:
        return self.deadline - time.time()

    def log(self, text: str) -> None:
        line = f"[suite {time.time() - self.t0:6.1f}s] {text}"
        print(line, file=sys.stderr, flush=True)  # stdout starts with the ACTION list at the end
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
        lines = self.outputs[name] = []
        try:
            assert proc.stdout is not None
            for line in proc.stdout:  # streamed, so a kill keeps everything printed so far
                self.log_file.write(line)
                if len(lines) < 20_000:
                    lines.append(line.rstrip("\n"))
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
        cmd = [sys.executable, "-m", "pytest", "-m", marker, "-q", "-rfEs", "-p", "no:cacheprovider",
               f"--junitxml={self.out / 'pytest.xml'}"]
        if importlib.util.find_spec("pytest_timeout") is not None:
            cmd.append("--timeout=120")
        stage = self.sh("tests", cmd, min(limit, self.left() - 60))
        stage.update(junit_summary(self.out / "pytest.xml"))
        return stage

    def devices(self, limit: float, mode: str) -> dict:
        """The ``devices`` stage in its own process (a CUDA fault there cannot end the suite)."""
        if mode == "smoke":
            stage = {"stage": "devices", "rc": None, "skipped": "smoke mode: a CPU rehearsal has no CUDA device"}
            self.stages.append(stage)
            return stage
        path = self.out / "devices.json"
        stage = self.sh("devices", [sys.executable, "-m", "ursa_engine.benchmarks.gpu_suite", "--device-check",
                                    str(path)], min(limit, self.left() - 60))
        try:
            stage["devices"] = json.loads(path.read_text())
            path.unlink()
        except (OSError, ValueError) as err:
            stage["devices"] = {"status": "error", "reason": f"no report ({type(err).__name__}: {err})"}
        if stage["devices"].get("status") == "skipped":
            stage["skipped"] = stage["devices"]["reason"]
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
        docs, predicted, md = [], {}, None
        try:
            docs = report.load(files)
            self.brief = report.brief(docs)
            predicted = predicted_rows([r for d in docs for r in d["records"]])
            md, _ = report.write_report(files, self.out)
            with open(md, "a") as f:
                f.write(predicted_markdown(predicted) + suite_markdown(self.stages))
        except Exception as err:  # noqa: BLE001 - the JSON still comes back
            self.log(f"report failed: {type(err).__name__}: {err}")
            self.stages.append({"stage": "report", "rc": 1, "error": f"{type(err).__name__}: {err}"})
            self.outputs["report"] = [f"{type(err).__name__}: {err}"]
        self.actions = actions(self.stages, self.outputs, docs, predicted)
        block = action_block(self.actions)
        self.log_file.close()
        md = md if md is not None and md.exists() else self.out / "summary.md"
        if not md.exists():  # the report failed: summary.md holds the ACTION list alone
            md.write_text("")
        for path in (self.out / "suite.log", md):  # the ACTION list first
            path.write_text(block + "\n\n" + path.read_text())
        self.log_file = open(self.out / "suite.log", "a", buffering=1)  # noqa: SIM115 - closed below
        with tarfile.open(self.out / "results.tar.gz", "w:gz") as tar:
            for f in files:
                tar.add(f, arcname=f.name)
        write_text(self.out / "suite.json", json.dumps(
            {"actions": self.actions, "stages": self.stages, "results": [f.name for f in files],
             "predicted": predicted, "elapsed_s": round(time.time() - self.t0, 1)}, indent=1))
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


# ----------------------------------------------------------------------------- what to fix
_PYTEST_FAILURE = re.compile(r"^(FAILED|ERROR) (\S+?)(::\S+)?( - .*)?$")
_EXCEPTION = re.compile(r"^\s*([A-Za-z_][\w.]*(Error|Exception|Interrupt)|CMake Error|.*\berror\b:|.*\bFATAL\b"
                        r"|Segmentation fault|Killed|.*CUDA error)")
_FRAME = re.compile(r'File "([^"]+)", line (\d+)')
_SOURCE = re.compile(r"((?:csrc|ursa_engine|triton_kernels|benchmarks|tests)/[\w/.-]+\.(?:py|cu|cuh|cpp|h)"
                     r"|CMakeLists\.txt|setup\.py)(:\d+)?")
_DEFAULT_FILE = {"install": "CMakeLists.txt / setup.py", "tests": "pytest.xml", "devices":
                 "ursa_engine/ops_library.py (on_device) / ursa_engine/graphs.py", "report": "benchmarks/report.py"}


def first_error(lines: list[str]) -> str:
    """The line that says what went wrong: a pytest ``FAILED`` / ``ERROR`` summary line, else the
    first exception / compiler error line, else the last non-empty line."""
    for line in lines:
        if _PYTEST_FAILURE.match(line):
            return line.strip()
    for line in lines:
        if _EXCEPTION.match(line) and not line.lstrip().startswith("Traceback"):
            return line.strip()
    rest = [line.strip() for line in lines if line.strip()]
    return rest[-1] if rest else "(no output)"


def _in_repo(path: str) -> str | None:
    """``path`` relative to the repository for a source file of ours (not "<string>", not the venv)."""
    p = Path(path)
    if not p.is_absolute() or not p.is_file():
        return None
    try:
        rel = p.resolve().relative_to(ROOT)
    except ValueError:
        return None
    return None if rel.parts and rel.parts[0] in (".venv", "build") else str(rel)


def file_to_look_at(lines: list[str], stage: str) -> str:
    """Where to look: a failing test's file, else the innermost traceback frame inside the
    repository, else a source file an error line names, else the stage's usual suspect."""
    for line in lines:
        m = _PYTEST_FAILURE.match(line)
        if m:
            return m.group(2) + (m.group(3) or "")
    frames = [(_in_repo(m.group(1)), m.group(2)) for line in lines for m in _FRAME.finditer(line)]
    frames = [f"{path}:{n}" for path, n in frames if path]
    if frames:
        return frames[-1]
    for line in lines:
        if _EXCEPTION.match(line) or "error" in line.lower():
            m = _SOURCE.search(line)
            if m:
                return m.group(0)
    if stage.startswith("bench "):
        return f"benchmarks/bench_{stage.split(' ', 1)[1]}.py"
    return _DEFAULT_FILE.get(stage, "suite.log")


def actions(stages: list[dict], outputs: dict[str, list[str]], docs: list[dict], predicted: dict) -> list[str]:
    """One line per thing to fix: failed or timed-out stages (first error line, file to look at),
    the devices stage's findings, benchmark records in error, a failed prediction."""
    out = []
    for st in stages:
        name, lines = st["stage"], outputs.get(st["stage"], [])
        dev = st.get("devices") or {}
        if st.get("timed_out"):
            out.append(f"[{name}] timed out after {st.get('seconds')} s; last line: {first_error(lines[-5:])} "
                       f"-- look at: {file_to_look_at(lines, name)}")
        elif st.get("rc") not in (0, None) or st.get("failures") or st.get("errors"):
            out.append(f"[{name}] rc={st.get('rc')}: {first_error(lines)} -- look at: {file_to_look_at(lines, name)}")
        for problem in dev.get("problems", []):
            out.append(f"[{name}] {problem['what']} -- look at: {problem['file']}")
    for doc in docs:
        for r in doc.get("records", []):
            if r.get("status") == "error":
                out.append(f"[bench {r['suite']}] {r['case']} / {r['provider']}: {str(r.get('reason'))[:300]} "
                           f"-- look at: benchmarks/bench_{r['suite']}.py")
    if predicted.get("error") and not predicted.get("missing"):
        out.append(f"[predicted] {predicted['error']} -- look at: benchmarks/predicted.py")
    return out


def action_block(items: list[str]) -> str:
    """The first lines of every output: ``ACTION: none`` or the numbered list of what to fix."""
    if not items:
        return "ACTION: none (every stage passed)"
    return "\n".join([f"ACTION: {len(items)} thing(s) to fix"] + [f"  {i}. {a}" for i, a in enumerate(items, 1)])


# ----------------------------------------------------------------------------- predicted vs measured
def predicted_rows(records: list[dict]) -> dict:
    """``{"rows": compare(records)}`` from ``ursa_engine.benchmarks.predicted``, or why not
    (``missing``: the module is not there, not a failure of this run)."""
    try:
        from .predicted import compare
    except ImportError as err:
        return {"rows": [], "error": f"ursa_engine.benchmarks.predicted is not importable ({err})", "missing": True}
    try:
        return {"rows": list(compare(records))}
    except Exception as err:  # noqa: BLE001 - reported in the ACTION list, the rest of the report stands
        return {"rows": [], "error": f"compare() failed: {type(err).__name__}: {err}"}


def predicted_markdown(predicted: dict) -> str:
    lines = ["", "## Predicted vs measured", ""]
    if predicted.get("error"):
        lines.append(f"Not compared: {predicted['error']}.")
    if predicted.get("rows"):
        lines += ["| kernel | case | measured ms | predicted ms | measured / predicted |", "|---|---|---|---|---|"]
        for r in predicted["rows"]:
            ms = [f"{r[k] * 1e3:.3g}" if isinstance(r.get(k), (int, float)) else "–"
                  for k in ("measured_s", "predicted_s")]
            ratio = f"{r['ratio']:.2f}" if isinstance(r.get("ratio"), (int, float)) else "–"
            lines.append(f"| {r.get('kernel')} | {r.get('case')} | {ms[0]} | {ms[1]} | {ratio} |")
    elif not predicted.get("error"):
        lines.append("No measured kernel has a prediction.")
    return "\n".join(lines) + "\n"


def suite_markdown(stages: list[dict]) -> str:
    lines = ["", "## Suite stages", "", "| stage | rc | seconds | notes |", "|---|---|---|---|"]
    for s in stages:
        notes = ", ".join(f"{k}={v}" for k, v in s.items() if k not in ("stage", "rc", "seconds", "devices"))
        if s.get("devices"):
            dev = s["devices"]
            runs = "; ".join(f"{r['sampler']}/{r['mode']}: {'equal' if r.get('equal') else 'DIFFER'}"
                             for r in dev.get("runs", []))
            notes += f" second device: {dev.get('status')} {dev.get('reason') or ''} {runs}".rstrip()
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


# ----------------------------------------------------------------------------- devices
_DEVICE_FILES = "ursa_engine/ops_library.py (on_device) / ursa_engine/graphs.py / ursa_engine/engine.py"


def device_check(steps: int = 6, shape=(2, 8, 8)) -> dict:
    """The ``devices`` stage: the native CUDA module's loading report, then (two or more GPUs) the
    engine on ``cuda:1`` while ``cuda:0`` stays current, tokens compared with ``cuda:0`` for each
    fused sampler backend, eager and graph mode (issue 12: a launch on the current device instead
    of the tensors' shows here as an illegal address or other tokens).

    Returns ``{"status": "ok" | "failed" | "skipped", "reason", "runs", "problems", "native_cuda",
    "cuda_devices"}``; ``problems`` (what, file) feed the ACTION list.
    """
    import copy

    import torch

    import ursa_engine as ue
    from ursa_engine import _dispatch, _native

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    result = {"status": "ok", "reason": None, "runs": [], "problems": [], "cuda_devices": n}
    native = result["native_cuda"] = _native.cuda_report()
    native["unavailable"] = _native.unavailable("cuda") if n else "no CUDA device"
    if n and native["unavailable"]:
        result["problems"].append({"what": f"native CUDA backend: {native['unavailable']}",
                                   "file": "ursa_engine/_cudart.py / CMakeLists.txt"})
    if n < 2:
        result.update(status="skipped", reason=f"{n} CUDA device(s): the second-device check needs 2")
        return result
    torch.manual_seed(0)
    base = ue.URSATransformer(ue.ModelConfig.preset("tiny"), init_std=0.2, dtype=torch.bfloat16)
    sched = ue.Scheduler(ue.MetricPath(ue.Codebook.fsq((4, 4, 4)), alpha=1.0, c=5.0), steps)
    kw = dict(guidance_scale=3.0, guidance_trunc=0.5, seed=4, decode=False)
    samplers = [b for b in ("triton", "native") if _dispatch.why_not(b, "metric_step", torch.device("cuda:1"), {})
                is None] or ["torch"]
    torch.cuda.set_device(0)  # the engine below runs on cuda:1 while cuda:0 is current
    for sampler in samplers:
        for mode in ("eager", "graph"):
            run, tokens = {"sampler": sampler, "mode": mode}, {}
            for dev in ("cuda:0", "cuda:1"):
                eng = ue.Engine(copy.deepcopy(base).to(dev), sched, prompt_length=8, mode=mode,
                                sampler_backend=sampler)
                try:
                    tokens[dev] = eng.generate([[11, 12, 13], [40, 41, 42, 43, 44]], [[7, 7]], shape, **kw).tokens
                    torch.cuda.synchronize(dev)
                    tokens[dev] = tokens[dev].cpu()
                except Exception as err:  # noqa: BLE001 - recorded; a CUDA fault poisons what follows
                    run["error"] = f"{dev}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                    break
                if torch.cuda.current_device() != 0:
                    result["problems"].append({"what": f"generate on {dev} left cuda:{torch.cuda.current_device()} "
                                                       "current", "file": "ursa_engine/ops_library.py"})
            run["equal"] = len(tokens) == 2 and torch.equal(tokens["cuda:0"], tokens["cuda:1"])
            result["runs"].append(run)
            if not run["equal"]:
                what = run.get("error") or "tokens differ from cuda:0's"
                result["problems"].append({"what": f"engine on cuda:1 ({sampler} sampler, {mode}): {what}",
                                           "file": _DEVICE_FILES})
    if any(not r["equal"] for r in result["runs"]):
        result.update(status="failed", reason="the engine on cuda:1 does not give cuda:0's tokens")
    return result


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
    p.add_argument("--devices-limit", type=float, default=90.0)
    p.add_argument("--device-check", type=Path, metavar="JSON",
                   help="run only the devices stage and write its report there (the suite calls this)")
    p.add_argument("benches", nargs="*", default=list(BENCHES), help=f"default: {' '.join(BENCHES)}")
    args = p.parse_args(argv)
    if args.device_check is not None:
        write_text(args.device_check, json.dumps(device_check(), indent=1, default=str))
        return 0
    suite = Suite(args.out, args.budget)
    suite.log(f"ursa-engine GPU suite, budget {args.budget:.0f} s, out {args.out}")
    try:
        suite.environment()
        if not args.skip_install:
            suite.install(args.install_limit)
        if args.tests != "none":
            suite.tests(args.tests_limit, args.tests)
        suite.devices(args.devices_limit, args.mode)
        suite.benches([b for b in args.benches if b in BENCHES], args.mode)
    finally:
        suite.finish()
    # stdout: what to fix first; the device tool shows the last 12,000 characters, so keep it short
    print(action_block(suite.actions), flush=True)
    print(suite.brief[-4000:], flush=True)
    print(tail_summary(args.out, limit=4000), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
