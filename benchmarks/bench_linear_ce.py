"""Fused / chunked linear cross-entropy against the dense formula: time and peak bytes (issue 18, item 3).

Providers, each timed forward + backward (mean loss, gradients of hidden and weight):

* ``dense``: ``F.cross_entropy(hidden @ weight.T / T, targets)`` — the (n, K) logits materialized;
* ``torch``: :func:`ursa_engine.training.linear_cross_entropy` with ``backend="torch"`` (the chunked
  twin, one (chunk, K) fp32 block at a time), at each ``--chunk``;
* ``triton``: the same with ``backend="triton"`` (CUDA only: the interpreter is not a timing).

Peak bytes: on the CPU the live bytes of tensors created during one call
(:class:`ursa_engine.memory.LiveBytes`, inputs excluded); on a GPU the caching allocator's peak
above what was allocated before the call. Each row carries its ratios to ``dense`` from the same run.
Standalone (not one of the CI suites)::

    python -m ursa_engine.benchmarks.bench_linear_ce [--n 4096 --hidden 256 --K 8192] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch
import torch.nn.functional as F

from ursa_engine.memory import LiveBytes
from ursa_engine.training import linear_cross_entropy

from .harness import measure, peak_memory


def _inputs(n: int, H: int, K: int, dtype, device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(n, H, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(K, H, generator=g) * (2.0 / H**0.5)).to(device, dtype).requires_grad_()
    y = torch.randint(0, K, (n,), generator=g).to(device)
    return h, w, y


def _step(provider: str, h, w, y, chunk: int, temperature: float):
    def run(_i: int = 0):
        h.grad = w.grad = None
        if provider == "dense":
            loss = F.cross_entropy((h @ w.T) / temperature, y)
        else:
            loss = linear_cross_entropy(h, w, y, temperature=temperature, chunk_size=chunk, backend=provider)
        loss.backward()
        return loss

    return run


def _peak_bytes(fn, device) -> int:
    if device.type == "cuda":
        return peak_memory(fn, device)[1]
    with LiveBytes() as live:
        fn(0)
    return live.peak


def run(n: int, H: int, K: int, *, chunks=(2048, 512), dtype=torch.float32, device=None, temperature=1.0,
        reps: int = 5, budget_s: float = 10.0) -> dict:
    """Rows ``{provider, chunk, median_ms, min_ms, peak_bytes, time_vs_dense, bytes_vs_dense}`` and the setup."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    h, w, y = _inputs(n, H, K, dtype, device)
    jobs = [("dense", None)] + [("torch", c) for c in chunks]
    if device.type == "cuda":
        jobs.append(("triton", None))
    rows = []
    for provider, chunk in jobs:
        fn = _step(provider, h, w, y, chunk or 2048, temperature)
        t = measure(fn, device, warmup=1, reps=reps, min_reps=3, budget_s=budget_s)
        rows.append(dict(provider=provider, chunk=chunk, median_ms=round(t.median_ms, 3), min_ms=round(t.min_ms, 3),
                         reps=t.reps, peak_bytes=_peak_bytes(fn, device)))
    dense = rows[0]
    for r in rows:
        r["time_vs_dense"] = round(r["median_ms"] / dense["median_ms"], 3)
        r["bytes_vs_dense"] = round(r["peak_bytes"] / dense["peak_bytes"], 4) if dense["peak_bytes"] else None
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
    a = ap.parse_args(argv)
    out = run(a.n, a.hidden, a.K, chunks=tuple(a.chunk), dtype=getattr(torch, a.dtype), reps=a.reps)
    print(f"n={out['n']} H={out['hidden']} K={out['K']} {out['dtype']} on {out['device']} "
          f"({out['threads']} threads); fp32 logits would be {out['logits_bytes_fp32'] / 2**20:.0f} MiB")
    for r in out["rows"]:
        name = r["provider"] + (f" (chunk {r['chunk']})" if r["chunk"] else "")
        print(f"{name:20s} {r['median_ms']:9.1f} ms (min {r['min_ms']:.1f}, {r['reps']} reps)  "
              f"peak {r['peak_bytes'] / 2**20:8.1f} MiB   time ×{r['time_vs_dense']:.2f}  bytes ×{r['bytes_vs_dense']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
