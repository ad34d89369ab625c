"""The one timing harness: timer, ceilings and floors, result records, JSON writer.

Method (``/work/.library/device/METHOD.md``, DESIGN §6):

* warm-up first (compilation, handle creation and autotuning stay out of the numbers);
* CUDA events around every repetition on a GPU, ``perf_counter`` on the CPU; median, min, max;
* rotating input sets when one set would sit in L2, so repeated calls do not time the cache;
* fresh random data every run (never zeros); the run's seed is recorded;
* the two ceilings (device copy bandwidth, bf16 matmul rate) measured in the same process;
  every figure carries its floor ``max(bytes / copy_bw, flops / matmul_rate, exps / exp_rate)``,
  its ratio to that floor and, when the case has one, its ratio to the dense reference.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch

from . import MODES, telemetry  # noqa: F401 - MODES re-exported

SCHEMA = "ursa-bench/1"

# Peak dense bf16 rates from the vendors' datasheets, for MFU (DESIGN §6: H100 SXM ~989).
DATASHEET_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "B200": 2250e12, "A100": 312e12}
# exp throughput assumed by DESIGN §6 ("~2.1 G exp -> ~1 ms" on an H100). Not measured: the
# floor it gives is labelled "modelled" in each record that uses it.
DESIGN_EXP_PER_S = 2.1e12


# ----------------------------------------------------------------------------- time budget
class Deadline:
    """A wall-clock deadline shared by every case of a run (the GPU suite has 10 minutes)."""

    def __init__(self, seconds: float | None = None, *, at: float | None = None):
        self.at = at if at is not None else (time.time() + seconds if seconds else math.inf)

    def left(self) -> float:
        return self.at - time.time()

    def expired(self, margin: float = 0.0) -> bool:
        return self.left() <= margin


# ----------------------------------------------------------------------------- timing
@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    mean_ms: float
    reps: int
    warmup: int
    samples_ms: list[float] = field(repr=False)


def timing_of(samples_ms: list[float], warmup: int) -> Timing:
    """Statistics of latencies measured elsewhere (e.g. the engine's own per-step events)."""
    if not samples_ms:
        raise ValueError("no timed samples")
    return Timing(median_ms=statistics.median(samples_ms), min_ms=min(samples_ms), max_ms=max(samples_ms),
                  mean_ms=statistics.fmean(samples_ms), reps=len(samples_ms), warmup=warmup,
                  samples_ms=list(samples_ms))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[int], object], device: torch.device, *, warmup: int = 2, reps: int = 25,
            min_reps: int = 3, budget_s: float = 2.0) -> Timing:
    """Time ``fn(i)`` (``i`` = call number, for rotating inputs) after ``warmup`` calls.

    The number of timed calls is ``reps``, cut so that the timed part fits ``budget_s``
    (never under ``min_reps``). GPU calls are timed one by one with CUDA events.
    """
    t0 = time.perf_counter()
    for i in range(max(warmup, 1)):
        fn(i)
    synchronize(device)
    estimate = (time.perf_counter() - t0) / max(warmup, 1)
    n = int(max(min_reps, min(reps, budget_s / max(estimate, 1e-6))))
    samples: list[float] = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            starts[i].record()
            fn(warmup + i)
            ends[i].record()
        torch.cuda.synchronize(device)
        samples = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for i in range(n):
            t = time.perf_counter()
            fn(warmup + i)
            samples.append((time.perf_counter() - t) * 1e3)
    return timing_of(samples, max(warmup, 1))


def peak_memory(fn: Callable[[int], object], device: torch.device) -> tuple[int | None, int | None]:
    """(peak bytes allocated during one call, peak minus what was allocated before it).

    CUDA caching-allocator figures; ``(None, None)`` on the CPU (no allocator statistics).
    """
    if device.type != "cuda":
        return None, None
    synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn(0)
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak, peak - base


def rotations(set_bytes: int, device: torch.device, *, limit_bytes: int = 8 << 30, most: int = 8) -> int:
    """How many input sets to rotate so that a set is evicted before it is read again.

    Enough sets to cover 4× the last-level cache (L2 on a GPU; 64 MiB assumed on a CPU), at
    most ``most`` and never more than ``limit_bytes`` together.
    """
    cache = 64 << 20
    if device.type == "cuda":
        cache = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20) or (50 << 20)
    n = math.ceil(4 * cache / max(set_bytes, 1))
    return int(max(1, min(n, most, limit_bytes // max(set_bytes, 1))))


def fresh_generator(device: torch.device, seed: int | None = None) -> tuple[torch.Generator, int]:
    """A generator with a fresh random seed (returned, to be recorded)."""
    seed = secrets.randbits(48) if seed is None else seed
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen, seed


# ----------------------------------------------------------------------------- ceilings
@dataclass
class Ceilings:
    """Measured in the same process as the figures they bound."""

    copy_bytes_per_s: float  # bytes read + bytes written, device to device
    matmul_flops_per_s: float
    matmul_dtype: str
    copy_bytes: int
    matmul_n: int
    exp_per_s: float | None  # modelled (DESIGN §6), GPU only
    datasheet_bf16_flops: float | None


def _datasheet_peak(name: str) -> float | None:
    for key, value in DATASHEET_BF16_FLOPS.items():
        if key in name:
            return value
    return None


def _copy(src: torch.Tensor, dst: torch.Tensor, i: int) -> None:
    dst.copy_(src)


def _matmul(a: torch.Tensor, b: torch.Tensor, i: int) -> torch.Tensor:
    return a @ b


def measure_ceilings(device: torch.device, mode: str) -> Ceilings:
    """A big device copy and a big matmul on random data (METHOD.md: "two numbers first")."""
    gen, _ = fresh_generator(device)
    if device.type == "cuda":
        copy_elems, n, dtype = 1 << 30, 8192, torch.bfloat16  # 2 GiB bf16; 8192^3 matmul
    elif mode == "smoke":
        copy_elems, n, dtype = 1 << 22, 256, torch.float32
    else:
        copy_elems, n, dtype = 1 << 25, 1024, torch.float32
    budget = 0.2 if mode == "smoke" else 1.0
    src = torch.randn(copy_elems, generator=gen, device=device, dtype=dtype)
    moved = 2 * src.numel() * src.element_size()
    t_copy = measure(partial(_copy, src, torch.empty_like(src)), device, warmup=2, reps=20, budget_s=budget)
    src = None  # free the copy buffers before the matmul operands
    mats = [torch.randn(n, n, generator=gen, device=device, dtype=dtype) for _ in range(2)]
    t_mm = measure(partial(_matmul, *mats), device, warmup=3, reps=20, budget_s=budget)
    mats = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return Ceilings(
        copy_bytes_per_s=moved / (t_copy.median_ms * 1e-3),
        matmul_flops_per_s=2 * n**3 / (t_mm.median_ms * 1e-3),
        matmul_dtype=str(dtype).replace("torch.", ""),
        copy_bytes=moved,
        matmul_n=n,
        exp_per_s=DESIGN_EXP_PER_S if device.type == "cuda" else None,
        datasheet_bf16_flops=_datasheet_peak(name) if name else None,
    )


# ----------------------------------------------------------------------------- work and floors
@dataclass
class Work:
    """The least work a case must do: bytes through memory, FLOPs, exponentials, tokens."""

    bytes: float = 0.0
    flops: float = 0.0
    exps: float = 0.0
    tokens: float = 0.0

    def floor(self, ceil: Ceilings | None) -> tuple[float | None, str | None]:
        """(floor in ms, which term binds) = max of the roofline terms that can be evaluated."""
        if ceil is None:
            return None, None
        terms = {}
        if self.bytes:
            terms["memory"] = self.bytes / ceil.copy_bytes_per_s
        if self.flops:
            terms["matmul"] = self.flops / ceil.matmul_flops_per_s
        if self.exps and ceil.exp_per_s:
            terms["exp (modelled, DESIGN §6)"] = self.exps / ceil.exp_per_s
        if not terms:
            return None, None
        bound = max(terms, key=terms.get)
        return terms[bound] * 1e3, bound

    def throughput(self, ms: float, bound: str | None) -> tuple[float | None, str | None]:
        """The rate of the binding floor term: GB/s (memory), TFLOP/s (matmul), G exp/s;
        tokens/s when no term applies."""
        s = ms * 1e-3
        if bound == "matmul" or (bound is None and self.flops and not self.bytes):
            return self.flops / s / 1e12, "TFLOP/s"
        if bound and bound.startswith("exp"):
            return self.exps / s / 1e9, "Gexp/s"
        if self.bytes:
            return self.bytes / s / 1e9, "GB/s"
        if self.tokens:
            return self.tokens / s, "tokens/s"
        return None, None


# ----------------------------------------------------------------------------- results
def classify_failure(err: BaseException) -> tuple[str, str]:
    """("skipped", why) for a backend that is not there, else ("error", what happened)."""
    text = f"{type(err).__name__}: {err}".strip()
    low = text.lower()
    absent = ("cannot run", "not available", "unavailable", "not importable", "not built",
              "not installed", "no module named", "requires cuda", "no cuda")
    if isinstance(err, (ImportError, NotImplementedError)) or any(s in low for s in absent):
        return "skipped", text[:500]
    return "error", text[:2000]


class ResultWriter:
    """One JSON file per run; rewritten atomically after every record (nothing lost on a kill)."""

    def __init__(self, path: Path, header: dict, ceilings: Ceilings | None):
        self.path = Path(path)
        self.header = header
        self.ceilings = ceilings
        self.records: list[dict] = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.flush()

    def add(self, record: dict) -> None:
        self.records.append(record)
        self.flush()

    def flush(self) -> None:
        doc = {"schema": SCHEMA, **self.header,
               "ceilings": asdict(self.ceilings) if self.ceilings else None,
               "records": self.records}
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        os.replace(tmp, self.path)


def result_path(out_dir: Path, suite: str, header: dict) -> Path:
    """``<suite>-<mode>-<device>-<commit7>-<UTC time>.json``: named by op, device and commit."""
    stamp = header["created"].replace("-", "").replace(":", "")
    commit = str(header.get("commit", "unknown"))[:7]
    device = telemetry.device_slug(header["device"])
    return Path(out_dir) / f"{suite}-{header['mode']}-{device}-{commit}-{stamp}.json"


@dataclass
class BenchContext:
    """What a ``bench_<op>.run(ctx)`` needs: device, mode, deadline, ceilings, the writer."""

    suite: str
    mode: str
    device: torch.device
    deadline: Deadline
    ceilings: Ceilings | None
    header: dict
    writer: ResultWriter | None
    case_budget_s: float = 2.0
    quiet: bool = False
    data_seed: int = field(default_factory=lambda: secrets.randbits(48))

    def generator(self) -> torch.Generator:
        """A generator for this run's fresh random data (seed recorded in every record)."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.data_seed)
        return gen

    # ------------------------------------------------------------------ one measured case
    def bench(self, *, case: str, provider: str, setup: Callable[[], Callable[[int], object]],
              work: Work, shape: dict, dense_ms: float | None = None, scale: float = 1.0,
              scale_note: str | None = None, targets: dict | None = None,
              warmup: int = 2, reps: int = 25, extra: dict | None = None, mfu: bool = False,
              baselines: dict[str, float] | None = None) -> dict:
        """Set up, warm up, time and record one (case, provider); failures become records.

        ``setup()`` builds inputs and returns ``fn(i)``; ``scale`` multiplies the times (the
        dense reference timed on a subset of tokens and scaled linearly, said in ``scale_note``).
        ``mfu``: report ``work.flops`` as model FLOPs utilisation. ``baselines``: name -> ms of
        other figures of the same run, reported as ``speedup_vs_<name>``.
        """

        def run() -> dict:
            fn = setup()
            budget = max(0.05, min(self.case_budget_s, self.deadline.left() / 4))
            timing = measure(fn, self.device, warmup=warmup, reps=reps, budget_s=budget)
            peak, peak_extra = peak_memory(fn, self.device)
            return {"timing": timing, "peak": peak, "peak_extra": peak_extra}

        return self.attempt(run, case=case, provider=provider, work=work, shape=shape, dense_ms=dense_ms,
                            scale=scale, scale_note=scale_note, targets=targets, extra=extra, mfu=mfu,
                            baselines=baselines)

    def attempt(self, run: Callable[[], dict], *, case: str, provider: str, work: Work, shape: dict,
                margin_s: float = 5.0, **fields) -> dict:
        """Record what ``run()`` measured (a dict of :meth:`record` arguments: ``timing``, ``peak``,
        ``extra``...), or why it could not: out of time, a backend that is not there, an error.
        """
        extra = dict(fields.pop("extra", None) or {})
        if self.deadline.expired(margin=margin_s):
            return self.skip(case=case, provider=provider, shape=shape, work=work,
                             reason="global time budget exhausted", extra=extra)
        try:
            got = run()
            sample = telemetry.nvml_sample(self.device)
        except Exception as err:  # noqa: BLE001 - every failure is a result, the run goes on
            status, reason = classify_failure(err)
            if status == "error" and not self.quiet:
                traceback.print_exc(file=sys.stderr)
            return self.skip(case=case, provider=provider, shape=shape, work=work, reason=reason,
                             status=status, extra=extra)
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        extra.update(got.pop("extra", None) or {})
        return self.record(case=case, provider=provider, shape=shape, work=work, sample=sample, extra=extra,
                           **fields, **got)

    def mfu(self, flops: float, ms: float) -> dict:
        """Model FLOPs utilisation against the datasheet bf16 peak (the usual MFU) and against
        the matmul rate measured in this run."""
        rate = flops / (ms * 1e-3)
        c = self.ceilings
        peak = c.datasheet_bf16_flops if c and c.datasheet_bf16_flops else None
        out = {"tflops": rate / 1e12,
               "mfu": rate / peak if peak else (rate / c.matmul_flops_per_s if c else None),
               "mfu_peak_source": "datasheet bf16" if peak else "measured matmul (no datasheet)",
               "mfu_vs_measured_matmul": rate / c.matmul_flops_per_s if c else None}
        return out

    def skip(self, *, case: str, provider: str, shape: dict, work: Work, reason: str,
             status: str = "skipped", extra: dict | None = None) -> dict:
        return self.record(case=case, provider=provider, shape=shape, work=work, status=status,
                           reason=reason, extra=extra)

    def record(self, *, case: str, provider: str, shape: dict, work: Work, timing: Timing | None = None,
               status: str = "ok", reason: str | None = None, scale: float = 1.0,
               scale_note: str | None = None, dense_ms: float | None = None,
               targets: dict | None = None, peak: int | None = None, peak_extra: int | None = None,
               sample: dict | None = None, extra: dict | None = None, mfu: bool = False,
               baselines: dict[str, float] | None = None) -> dict:
        dev = self.header["device"]
        soft = self.header["software"]
        rec = {
            "suite": self.suite, "case": case, "provider": provider, "status": status,
            "reason": reason, "mode": self.mode,
            "device_name": dev.get("name"), "driver": dev.get("driver"),
            "commit": self.header.get("commit"), "dirty": self.header.get("dirty"),
            "torch": soft.get("torch"), "triton": soft.get("triton"), "cuda": soft.get("torch_cuda"),
            "threads": soft.get("torch_threads"), "data_seed": self.data_seed,
            "shape": shape, "work": asdict(work),
            "median_ms": None, "min_ms": None, "max_ms": None, "mean_ms": None, "reps": None,
            "throughput": None, "throughput_unit": None,
            "floor_ms": None, "floor_bound": None, "ratio_to_floor": None,
            "dense_ms": dense_ms, "ratio_to_dense": None, "speedup_vs_dense": None,
            "scaled": scale != 1.0, "scale_note": scale_note,
            "peak_mem_bytes": peak, "peak_extra_bytes": peak_extra,
            "telemetry": sample or {}, "targets": targets or {}, "meets": {},
        }
        if extra:
            rec.update(extra)
        if timing is not None:
            rec.update(median_ms=timing.median_ms * scale, min_ms=timing.min_ms * scale,
                       max_ms=timing.max_ms * scale, mean_ms=timing.mean_ms * scale, reps=timing.reps)
            rec["floor_ms"], rec["floor_bound"] = work.floor(self.ceilings)
            rec["throughput"], rec["throughput_unit"] = work.throughput(rec["median_ms"], rec["floor_bound"])
            if rec["floor_ms"]:
                rec["ratio_to_floor"] = rec["median_ms"] / rec["floor_ms"]
            if dense_ms:
                rec["ratio_to_dense"] = rec["median_ms"] / dense_ms
                rec["speedup_vs_dense"] = dense_ms / rec["median_ms"]
            for name, ms in (baselines or {}).items():
                rec[f"speedup_vs_{name}"] = ms / rec["median_ms"] if ms else None
            if mfu and work.flops:
                rec.update(self.mfu(work.flops, rec["median_ms"]))
            rec["meets"] = check_targets(rec)
        if self.writer is not None:
            self.writer.add(rec)
        if not self.quiet:
            print(format_line(rec), flush=True)
        return rec


def check_targets(rec: dict) -> dict:
    """Targets against the record's own figures: ``"max_<field>"`` / ``"min_<field>"`` -> bool.

    E.g. ``max_ratio_to_floor``, ``min_speedup_vs_dense``, ``min_mfu``, ``max_peak_mem_bytes``,
    ``max_peak_extra_bytes``, ``min_speedup_vs_eager``. Figures that are absent are not judged.
    """
    out = {}
    for target, bound in (rec.get("targets") or {}).items():
        kind, _, key = target.partition("_")
        value = rec.get(key)
        if kind in ("min", "max") and isinstance(value, (int, float)):
            out[target] = bool(value >= bound if kind == "min" else value <= bound)
    return out


def format_line(rec: dict) -> str:
    """One human line per record for the log."""
    head = f"[{rec['suite']}] {rec['case']:<34} {rec['provider']:<14}"
    if rec["status"] != "ok":
        return f"{head} {rec['status'].upper()}: {rec['reason']}"
    parts = [f"{rec['median_ms']:10.3f} ms"]
    if rec["throughput"] is not None:
        parts.append(f"{rec['throughput']:9.1f} {rec['throughput_unit']}")
    if rec["ratio_to_floor"] is not None:
        parts.append(f"{rec['ratio_to_floor']:6.2f}x floor")
    if rec["speedup_vs_dense"] is not None:
        parts.append(f"{rec['speedup_vs_dense']:7.1f}x vs dense")
    if rec.get("mfu") is not None:
        parts.append(f"MFU {100 * rec['mfu']:.1f}%")
    if rec["peak_mem_bytes"] is not None:
        parts.append(f"peak {rec['peak_mem_bytes'] / 2**30:.2f} GiB")
    if rec["scaled"]:
        parts.append("(scaled)")
    return f"{head} " + "  ".join(parts)
