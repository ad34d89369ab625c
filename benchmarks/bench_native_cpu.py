"""Native CPU metric step vs the dense reference step, and the cost of validation, same run.

D = 1,024 tokens, K = 64,000 (FSQ, m = 6), CFG guidance 7, step k = 25 of 50 (t = 0.5).
Providers (``--providers``, all by default):

* ``native`` / ``dense`` (issue 4, item 5): both backends timed in the same process with the
  harness timer (``benchmarks.harness.measure``), the dense reference on every token (no subset
  scaling), and their tokens for the same seed compared (equal up to float ties). Target: ≥ 20×
  on 2 cores.
* ``validate`` (issue 11, item 4): the native kernel called directly without and with ``error=``
  (the in-kernel checks: ids, NaN / +inf / all −inf logits), interleaved round by round; the
  ratio is the cost of ``validate=True`` on the fused backends. Target: ≤ 1.05. Beside it, the
  torch checks that ``validate=True`` ran before (NaN, +inf, all −inf over cond and uncond, the
  id range) and, when the Scheduler has the fused check, ``Scheduler.step`` with validate on / off.

::

    OMP_NUM_THREADS=2 python -m ursa_engine.benchmarks.bench_native_cpu [--threads 2] [--dtype bfloat16] \
        [--providers native,dense,validate] [--rounds 9] [--out DIR]

The harness suite ``metric_step --mode cpu`` times the same case (dense on a token subset,
scaled); this script is the full-size, agreement-checking twin.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from . import provenance
from .harness import fresh_generator, measure

NUM_STEPS, K_STEP = 50, 25
GUIDANCE = dict(guidance_scale=7.0, guidance_trunc=0.9)
PROVIDERS = ("native", "dense", "validate")
VALIDATE_TARGET = 1.05  # validate=True may cost at most 5% of the step (issue 11)


def _torch_checks(cond: torch.Tensor, uncond: torch.Tensor, x: torch.Tensor, K: int) -> bool:
    """The value checks validate=True ran before issue 11 (several full torch passes over the logits)."""
    bad = False
    for z in (cond, uncond):
        bad |= bool(torch.isnan(z).any()) or bool(torch.isposinf(z).any()) or bool((z == -torch.inf).all(-1).any())
    return bad or int(x.min()) < 0 or int(x.max()) >= K


def _timed(fn, reps: int) -> list[float]:
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    return samples


def validation_cost(sched, cond, uncond, x, *, rounds: int = 9, reps: int = 3) -> dict:
    """Kernel alone vs kernel with ``error=``, interleaved (the machine's noise hits both alike)."""
    from ursa_engine import _native

    cb = sched.path.codebook
    params, steps = sched.step_values("cpu")
    D, K = x.numel(), cb.size
    c, u, xf = cond.reshape(D, K), uncond.reshape(D, K), x.reshape(D)
    error = torch.zeros(1, dtype=torch.int32)
    kw = dict(seeds=torch.tensor([7]), row_len=D, guidance_scale=GUIDANCE["guidance_scale"], levels=cb.levels)
    table = cb.normalized

    def kernel(err=None):
        error.zero_()
        _native.metric_step(c, u, xf, table, params[K_STEP], steps[K_STEP:K_STEP + 1], error=err, **kw)

    for _ in range(2):  # warm-up (first-touch pages, FSQ table check)
        kernel(), kernel(error)
    plain, checked, ratios, noise = [], [], [], []
    for _ in range(rounds):  # A B A: the ratio to the mean of both A's cancels drift; A/A is the noise
        t1, b, t2 = _timed(kernel, reps), _timed(lambda: kernel(error), reps), _timed(kernel, reps)
        a1, a2 = statistics.median(t1), statistics.median(t2)
        plain += t1 + t2
        checked += b
        ratios.append(statistics.median(b) / ((a1 + a2) / 2))
        noise.append(abs(a2 / a1 - 1))
    assert int(error) == 0, "clean inputs raised an error bit"
    torch_ms = statistics.median(_timed(lambda: _torch_checks(c, u, xf, K), max(3, reps)))
    out = {"kernel_ms": statistics.median(plain), "kernel_min_ms": min(plain),
           "kernel_error_ms": statistics.median(checked), "kernel_error_min_ms": min(checked),
           "error_ratio": statistics.median(ratios), "error_ratio_of_mins": min(checked) / min(plain),
           "noise_a_over_a": statistics.median(noise),
           "torch_checks_ms": torch_ms, "target_ratio": VALIDATE_TARGET}
    out["meets"] = out["error_ratio"] <= VALIDATE_TARGET
    try:  # end to end, where the Scheduler passes error= to the fused backends (issue 11 item 4)
        def step(validate):
            return sched.step(cond, K_STEP, x, uncond_logits=uncond, seed=7, backend="native", validate=validate,
                              **GUIDANCE)

        on, off = [], []
        for _ in range(rounds):
            on += _timed(lambda: step(True), 1)
            off += _timed(lambda: step(False), 1)
        out.update(step_validate_ms=statistics.median(on), step_no_validate_ms=statistics.median(off))
    except (TypeError, ValueError) as err:  # an older Scheduler: report the kernel figures only
        out["step_note"] = f"Scheduler.step not timed: {err}"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma-separated subset of {PROVIDERS}")
    p.add_argument("--dense-reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=9, help="validate: interleaved rounds of kernel / kernel + error=")
    p.add_argument("--out", type=Path, default=None, help="folder for a JSON record")
    provenance.add_argument(p)
    args = p.parse_args(argv)
    try:
        stamp = provenance.check(allow_dirty=args.allow_dirty) if args.out is not None else None
    except provenance.DirtyTree as err:
        return provenance.refuse(err)
    providers = [v for v in args.providers.split(",") if v]
    if not providers or set(providers) - set(PROVIDERS):
        p.error(f"--providers: expected a subset of {PROVIDERS}, got {args.providers!r}")

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

    record = {
        "bench": "native_cpu_metric_step", "tokens": D, "K": K, "m": cb.dim, "dtype": args.dtype,
        "threads": args.threads, "isa": _native.build_info()["isas"], "step": K_STEP, "num_steps": NUM_STEPS,
        **GUIDANCE, "data_seed": data_seed, "providers": providers,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    head = f"D={D} K={K} {args.dtype} threads={args.threads}:"
    if "native" in providers:
        native = measure(lambda i: step("native", i), device, warmup=2, reps=15, budget_s=4.0)
        record.update(native_ms=native.median_ms, native_min_ms=native.min_ms)
        print(f"{head} native {native.median_ms:.1f} ms (min {native.min_ms:.1f})")
    if "dense" in providers:
        dense = measure(lambda i: step("torch", i), device, warmup=1, reps=args.dense_reps, min_reps=1,
                        budget_s=1.0)
        record.update(dense_ms=dense.median_ms)
        print(f"{head} dense {dense.median_ms:.0f} ms")
    if "native" in providers and "dense" in providers:
        a, b = step("torch", 12345), step("native", 12345)
        agree = (a == b).double().mean().item()
        speedup = dense.median_ms / native.median_ms
        record.update(speedup=speedup, same_seed_agreement=agree, moved_fraction=(a != x).double().mean().item(),
                      target_speedup=20.0, meets=speedup >= 20.0 and agree >= 0.99)
        print(f"{head} native vs dense {speedup:.1f}x; same-seed tokens {agree:.4%} equal, "
              f"{record['moved_fraction']:.1%} moved")
    if "validate" in providers:
        v = validation_cost(sched, cond, uncond, x, rounds=args.rounds)
        record["validate"] = v
        print(f"{head} kernel {v['kernel_ms']:.1f} ms, with error= {v['kernel_error_ms']:.1f} ms -> ratio "
              f"{v['error_ratio']:.3f} (of mins {v['error_ratio_of_mins']:.3f}, A/A noise ±{v['noise_a_over_a']:.1%}, "
              f"target <= {VALIDATE_TARGET}); "
              f"the torch checks it replaces {v['torch_checks_ms']:.1f} ms")
        if "step_validate_ms" in v:
            print(f"{head} Scheduler.step native: validate=True {v['step_validate_ms']:.1f} ms, "
                  f"validate=False {v['step_no_validate_ms']:.1f} ms")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = provenance.write_json(args.out / f"native_cpu-{args.dtype}-{record['when'].replace(':', '')}.json",
                                     record, stamp, indent=2)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
