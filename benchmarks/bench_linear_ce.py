"""Fused / chunked linear cross-entropy against the dense formula: time, TFLOP/s, peak bytes (issue 18).

A suite of the harness (``ursa-engine bench run linear_ce --mode smoke|cpu|gpu``; one stage of
``python -m ursa_engine.benchmarks.gpu_suite``). Each provider is timed forward + backward (mean
loss, gradients of hidden and weight), DESIGN §9 "Fused linear cross-entropy":

* ``dense``: ``F.cross_entropy(hidden @ weight.T / T, targets)`` — the (n, K) logits materialised
  (at the real size 4.3 GB of bf16 logits: it fits an 80 GB GPU; an out-of-memory is recorded as a
  skipped row, not an error);
* ``torch``: :func:`ursa_engine.training.linear_cross_entropy` with ``backend="torch"`` (the chunked
  twin: one (chunk, K) fp32 block at a time; "mean" computes both gradients in its forward pass);
* ``triton``: ``backend="triton"`` (the three kernels of :mod:`ursa_engine.triton_kernels.linear_ce`;
  CUDA only, the interpreter is not a timing), and ``triton-forward``, its forward alone (the two
  halves of the kernel docstring's prediction).

Cases (:func:`cases`): smoke — tiny fp32 shapes, seconds (CI); cpu — n = 4,096, H = 256, K = 8,192
fp32; gpu — the 1.7B training step of DESIGN §6, n = 33,280, H = 2,048, K = 64,000 bf16.

Work and floors. Each record's ``work.flops`` is the provider's own FLOPs (its ``throughput`` is
then TFLOP/s, and the harness floor uses the matmul rate measured in the same run): dense and the
twin 6·nHK (forward 2nHK, backward 4nHK); the fused kernels 10·nHK (the backward's dh and dW
kernels each recompute the logits: + 2·2nHK); ``triton-forward`` 2nHK. Every row also carries the
**FLOP floor** of the fused computation, ``flop_floor_ms`` = 10·nHK at 989 TFLOP/s dense bf16
(DESIGN §6), and ``ratio_to_flop_floor``; dense and the twin recompute nothing, so theirs may fall
below 1 (``min_flop_floor_ms``: 6·nHK at the same rate, the least work of any provider).

Peak bytes: on a GPU the caching allocator's peak above what was allocated before the call
(``peak_extra_bytes``; gradients of the previous call freed first); on the CPU the live bytes of
tensors created during one call (:class:`ursa_engine.memory.LiveBytes`, inputs excluded). Rows
carry ``bytes_vs_dense`` and (harness) ``ratio_to_dense`` / ``speedup_vs_dense`` from the same run.

Standalone (the figure of DESIGN §6, "0.66× the time and 0.20× the peak memory")::

    python -m ursa_engine.benchmarks.bench_linear_ce [--n 4096 --hidden 256 --K 8192] [--json out.json]
"""

from __future__ import annotations

import argparse
import platform
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ursa_engine.memory import LiveBytes
from ursa_engine.training import linear_cross_entropy

from . import provenance
from .harness import Work, measure, peak_memory, synchronize
from .records import BenchContext

NAME = "linear_ce"
DESIGN_BF16_FLOPS = 989e12  # DESIGN §6, H100 SXM dense bf16
GIB = 1 << 30
# the provider's own FLOPs in units of n·H·K (module docstring)
FLOPS_PER_NHK = {"dense": 6, "torch": 6, "triton": 10, "triton-forward": 2}
FUSED_FLOPS_PER_NHK = 10


@dataclass(frozen=True)
class Case:
    name: str
    n: int  # rows (tokens)
    H: int  # hidden size
    K: int  # codes
    dtype: torch.dtype
    providers: tuple[str, ...]  # timed in this order; dense first (the ratios' reference)
    chunk: int = 2048  # the torch twin's rows a block
    targets: dict = field(default_factory=dict)  # provider -> targets (records.check_targets)


def cases(mode: str) -> list[Case]:
    """smoke: tiny CPU shapes; cpu: dense vs the chunked twin; gpu: the DESIGN §6 training step."""
    if mode == "gpu":
        return [Case("train-1.7b-33280", 33_280, 2_048, 64_000, torch.bfloat16,
                     ("dense", "torch", "triton", "triton-forward"), chunk=2048,
                     # kernel docstring: no (n, K) tensor — the fp32 gradients (0.8 GB), their bf16 casts, little else
                     targets={"triton": {"max_peak_extra_bytes": 2 * GIB}})]
    if mode == "cpu":
        return [Case("n4096-h256-k8192", 4_096, 256, 8_192, torch.float32, ("dense", "torch"), chunk=2048,
                     targets={"torch": {"max_bytes_vs_dense": 0.5}})]
    return [Case("smoke-n256-h32-k1024", 256, 32, 1_024, torch.float32, ("dense", "torch"), chunk=64)]


def flops(provider: str, n: int, H: int, K: int) -> float:
    """FLOPs of one forward + backward call of ``provider`` (forward only for ``triton-forward``)."""
    return float(FLOPS_PER_NHK[provider]) * n * H * K


def inputs(n: int, H: int, K: int, dtype, device, seed: int = 0):
    """hidden (n, H) ~ N(0, 1), weight (K, H) with logits of scale ~2, targets (n,); leaves with grad."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(n, H, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(K, H, generator=g) * (2.0 / H**0.5)).to(device, dtype).requires_grad_()
    y = torch.randint(0, K, (n,), generator=g).to(device)
    return h, w, y


def step_fn(provider: str, h, w, y, chunk: int, temperature: float = 1.0):
    """``fn(i)``: one forward + backward of ``provider`` (gradients of the previous call dropped first)."""
    def run(_i: int = 0):
        h.grad = w.grad = None
        if provider == "dense":
            logits = h @ w.T
            loss = F.cross_entropy(logits if temperature == 1.0 else logits / temperature, y)
            logits = None
        elif provider == "triton-forward":
            with torch.no_grad():
                return linear_cross_entropy(h, w, y, temperature=temperature, backend="triton")
        else:
            loss = linear_cross_entropy(h, w, y, temperature=temperature, chunk_size=chunk, backend=provider)
        loss.backward()
        return loss

    return run


def peak_bytes(fn, device: torch.device) -> tuple[int | None, int]:
    """(peak allocated, peak above the allocation before the call) on CUDA; (None, LiveBytes peak) on the CPU."""
    if device.type == "cuda":
        synchronize(device)  # the caller dropped the previous call's gradients: they are not in the baseline
        return peak_memory(fn, device)
    with LiveBytes() as live:
        fn(0)
    return None, live.peak


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def run(ctx, *args, **kwargs):
    """The suite: every case of ``ctx.mode``, one record a provider (module docstring).

    Legacy form kept for callers of the standalone function: ``run(n, H, K, **options)`` is
    :func:`standalone`.
    """
    if not isinstance(ctx, BenchContext):
        return standalone(ctx, *args, **kwargs)
    for case in cases(ctx.mode):
        _run_case(ctx, case)


def _run_case(ctx: BenchContext, case: Case) -> None:
    device = ctx.device
    n, H, K = case.n, case.H, case.K
    fused_flops = float(FUSED_FLOPS_PER_NHK) * n * H * K
    state = {"inputs": None}
    dense = {"ms": None, "bytes": None}
    for provider in case.providers:
        if provider.startswith("triton") and device.type != "cuda":
            continue  # the interpreter is not a timing
        shape = {"n": n, "hidden": H, "K": K, "dtype": str(case.dtype).removeprefix("torch."),
                 "chunk": case.chunk if provider == "torch" else None, "reduction": "mean",
                 "pass": "forward" if provider == "triton-forward" else "forward+backward",
                 "logits_bytes": n * K * torch.tensor([], dtype=case.dtype).element_size()}
        work = Work(flops=flops(provider, n, H, K), tokens=n)
        fwd = provider == "triton-forward"
        extra = {"flop_floor_ms": (2 * n * H * K if fwd else fused_flops) / DESIGN_BF16_FLOPS * 1e3,
                 "min_flop_floor_ms": (2 if fwd else 6) * n * H * K / DESIGN_BF16_FLOPS * 1e3,
                 "flop_floor_rate": "989 TFLOP/s dense bf16 (docs/design.md §6)",
                 "peak_source": "CUDA caching allocator" if device.type == "cuda" else
                 "LiveBytes: tensors created during one call"}

        def measured(provider=provider, extra=extra, work=work):
            if state["inputs"] is None:
                state["inputs"] = inputs(n, H, K, case.dtype, device, seed=ctx.data_seed % (2**63))
            h, w, y = state["inputs"]
            fn = step_fn(provider, h, w, y, case.chunk)
            try:
                budget = max(0.05, min(ctx.case_budget_s, ctx.deadline.left() / 4))
                timing = measure(fn, device, warmup=2, reps=25, min_reps=3, budget_s=budget)
                h.grad = w.grad = None
                peak, peak_extra = peak_bytes(fn, device)
            except Exception as err:  # noqa: BLE001 - an OOM is a result (dense at the real size)
                if not _is_oom(err):
                    raise
                h.grad = w.grad = None
                return {"status": "skipped", "reason": f"out of memory: {str(err).splitlines()[0][:300]}",
                        "extra": {**extra, "oom": True}}
            finally:
                h.grad = w.grad = None
            ms = timing.median_ms
            got = dict(extra)
            got["ratio_to_flop_floor"] = ms / got["flop_floor_ms"]
            got["tflops"] = work.flops / (ms * 1e-3) / 1e12
            if dense["bytes"] and peak_extra is not None:
                got["bytes_vs_dense"] = peak_extra / dense["bytes"]
            return {"timing": timing, "peak": peak, "peak_extra": peak_extra, "extra": got}

        rec = ctx.attempt(measured, case=case.name, provider=provider, work=work, shape=shape,
                          dense_ms=dense["ms"] if provider not in ("dense", "triton-forward") else None,
                          targets=case.targets.get(provider))
        if provider == "dense" and rec["status"] == "ok":
            dense["ms"], dense["bytes"] = rec["median_ms"], rec["peak_extra_bytes"]


# ----------------------------------------------------------------------------- standalone
def standalone(n: int, H: int, K: int, *, chunks=(2048, 512), dtype=torch.float32, device=None, temperature=1.0,
               reps: int = 5, budget_s: float = 10.0) -> dict:
    """Rows ``{provider, chunk, median_ms, min_ms, peak_bytes, time_vs_dense, bytes_vs_dense}`` and the setup."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    h, w, y = inputs(n, H, K, dtype, device)
    jobs = [("dense", None)] + [("torch", c) for c in chunks]
    if device.type == "cuda":
        jobs.append(("triton", None))
    rows = []
    for provider, chunk in jobs:
        fn = step_fn(provider, h, w, y, chunk or 2048, temperature)
        t = measure(fn, device, warmup=1, reps=reps, min_reps=3, budget_s=budget_s)
        h.grad = w.grad = None
        peak = peak_bytes(fn, device)[1]
        rows.append(dict(provider=provider, chunk=chunk, median_ms=round(t.median_ms, 3), min_ms=round(t.min_ms, 3),
                         reps=t.reps, peak_bytes=peak,
                         tflops=round(flops(provider, n, H, K) / (t.median_ms * 1e-3) / 1e12, 4)))
    base = rows[0]
    for r in rows:
        r["time_vs_dense"] = round(r["median_ms"] / base["median_ms"], 3)
        r["bytes_vs_dense"] = round(r["peak_bytes"] / base["peak_bytes"], 4) if base["peak_bytes"] else None
    return dict(op="linear_ce", n=n, hidden=H, K=K, dtype=str(dtype).removeprefix("torch."), device=str(device),
                threads=torch.get_num_threads(), machine=platform.processor() or platform.machine(),
                logits_bytes_fp32=n * K * 4, rows=rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--K", type=int, default=8192)
    ap.add_argument("--chunk", type=int, nargs="+", default=[2048, 512])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", help="write the result here")
    provenance.add_argument(ap)
    a = ap.parse_args(argv)
    try:
        stamp = provenance.check(allow_dirty=a.allow_dirty) if a.json else None
    except provenance.DirtyTree as err:
        return provenance.refuse(err)
    out = standalone(a.n, a.hidden, a.K, chunks=tuple(a.chunk), dtype=getattr(torch, a.dtype), reps=a.reps)
    print(f"n={out['n']} H={out['hidden']} K={out['K']} {out['dtype']} on {out['device']} "
          f"({out['threads']} threads); fp32 logits would be {out['logits_bytes_fp32'] / 2**20:.0f} MiB")
    for r in out["rows"]:
        name = r["provider"] + (f" (chunk {r['chunk']})" if r["chunk"] else "")
        print(f"{name:20s} {r['median_ms']:9.1f} ms (min {r['min_ms']:.1f}, {r['reps']} reps)  "
              f"{r['tflops']:7.3f} TFLOP/s  peak {r['peak_bytes'] / 2**20:8.1f} MiB   "
              f"time ×{r['time_vs_dense']:.2f}  bytes ×{r['bytes_vs_dense']}")
    if a.json:
        provenance.write_json(a.json, out, stamp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
