"""The one timing harness: timer, ceilings and floors.

Method (``/work/.library/device/METHOD.md``, DESIGN §6):

* warm-up first (compilation, handle creation and autotuning stay out of the numbers);
* CUDA events around every repetition on a GPU, ``perf_counter`` on the CPU; median, min, max;
* rotating input sets when one set would sit in L2, so repeated calls do not time the cache;
* fresh random data every run (never zeros); the run's seed is recorded;
* the two ceilings (device copy bandwidth, bf16 matmul rate) measured in the same process;
  every figure carries its floor ``max(bytes / copy_bw, flops / matmul_rate, exps / exp_rate)``,
  its ratio to that floor and, when the case has one, its ratio to the dense reference
  (records: :mod:`ursa_engine.benchmarks.records`).
"""

from __future__ import annotations

import math
import secrets
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

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
    for i in range(max(warmup, 1)):  # the last warm-up call, past compilation, sizes the run
        t0 = time.perf_counter()
        fn(i)
        synchronize(device)
        estimate = time.perf_counter() - t0
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
        samples = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=False)]
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
            terms["exp (modelled, docs/design.md §6)"] = self.exps / ceil.exp_per_s
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
