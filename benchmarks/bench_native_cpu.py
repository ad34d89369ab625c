"""Native CPU metric step vs the dense reference step, same run (issue 4, item 5).

D = 1,024 tokens, K = 64,000 (FSQ, m = 6), CFG guidance 7, step k = 25 of 50 (t = 0.5). Both
backends are timed in the same process with the harness timer (``benchmarks.harness.measure``),
the dense reference on every token (no subset scaling), and their tokens for the same seed are
compared (the "same law" half of the target: equal up to float ties)::

    OMP_NUM_THREADS=2 python -m benchmarks.bench_native_cpu [--threads 2] [--dtype float32] [--out DIR]

The harness suite ``metric_step --mode cpu`` times the same case (dense on a token subset,
scaled); this script is the full-size, agreement-checking twin. Target: ≥ 20× on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .harness import fresh_generator, measure

NUM_STEPS, K_STEP = 50, 25
GUIDANCE = dict(guidance_scale=7.0, guidance_trunc=0.9)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--dense-reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="folder for a JSON record")
    args = p.parse_args(argv)

    import ursa_engine as ue
    from ursa_engine import _native

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    cb = ue.Codebook.fsq((8, 8, 8, 5, 5, 5))
    sched = ue.Scheduler(ue.MetricPath(cb, alpha=1.0, c=5.0), NUM_STEPS)
    D, K = args.tokens, cb.size
    gen, data_seed = fresh_generator(device)
    dtype = getattr(torch, args.dtype)
    cond = torch.randn(1, D, K, generator=gen).to(dtype)
    uncond = torch.randn(1, D, K, generator=gen).to(dtype)
    x = torch.randint(0, K, (1, D), generator=gen)

    def step(backend, seed):
        return sched.step(cond, K_STEP, x, uncond_logits=uncond, seed=seed, backend=backend, validate=False,
                          **GUIDANCE)

    native = measure(lambda i: step("native", i), device, warmup=2, reps=15, budget_s=4.0)
    dense = measure(lambda i: step("torch", i), device, warmup=1, reps=args.dense_reps, min_reps=1, budget_s=1.0)
    a, b = step("torch", 12345), step("native", 12345)
    agree = (a == b).double().mean().item()
    moved = (a != x).double().mean().item()
    speedup = dense.median_ms / native.median_ms
    record = {
        "bench": "native_cpu_metric_step", "tokens": D, "K": K, "m": cb.dim, "dtype": args.dtype,
        "threads": args.threads, "isa": _native.build_info()["isas"], "step": K_STEP, "num_steps": NUM_STEPS,
        **GUIDANCE, "data_seed": data_seed, "native_ms": native.median_ms, "native_min_ms": native.min_ms,
        "dense_ms": dense.median_ms, "speedup": speedup, "same_seed_agreement": agree, "moved_fraction": moved,
        "target_speedup": 20.0, "meets": speedup >= 20.0 and agree >= 0.99,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(f"D={D} K={K} {args.dtype} threads={args.threads}: native {native.median_ms:.1f} ms "
          f"(min {native.min_ms:.1f}), dense {dense.median_ms:.0f} ms -> {speedup:.1f}x; same-seed tokens "
          f"{agree:.4%} equal, {moved:.1%} moved")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"native_cpu-{args.dtype}-{record['when'].replace(':', '')}.json"
        path.write_text(json.dumps(record, indent=2))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
