"""Serving under Poisson arrivals: continuous batching vs static batches vs one request at a time.

In process (no HTTP: the batch loop is what is compared), with the bundled digits model on the
CPU. One arrival trace per load (the same for every policy): ``--requests`` requests, Poisson at
``rate`` requests/s, prompts cycling through the ten digits, step counts drawn from ``--steps``
(mixed lengths, as a server sees), guidance 3 truncated at 0.9, one 4 × 8 latent image each.

* ``continuous``: requests join the running batch at the next step boundary, leave when done
  (:class:`ursa_engine.serve.Batcher`); rows past the guidance truncation run the conditional half
  only.
* ``static``: when nothing runs, everything queued (up to the row budget) starts as one batch and
  runs until its last request is done; arrivals meanwhile wait.
* ``sequential``: one request at a time.

Throughput: completed requests / (last completion − first arrival). Latency: arrival to tokens.
Each (load, policy) runs ``--reps`` times in rotating policy order; the medians are reported.
Loads are given as multiples of the sequential capacity (1 / one request's service time, measured
first), so the figures mean the same on a faster machine.

    python -m ursa_engine.benchmarks.bench_serve --out benchmarks/results

``--lora-mix`` (issue 19): adapters per request under the same arrival trace, continuous policy.
Traffic ``base`` (no adapter), ``merged`` (one adapter merged into the weights), ``single`` (every
request picks the same per-request adapter: applied unmerged to all rows), ``mixed`` (requests
cycle through ``--adapters`` per-request adapters and none: rows of several adapters in every
forward pass). Random rank-``--lora-rank`` adapters on all seven targets. The figure of merit is
throughput mixed / single (the price of serving several adapters at once instead of one).

    python -m ursa_engine.benchmarks.bench_serve --lora-mix --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from ursa_engine.benchmarks import provenance

from ursa_engine import digits
from ursa_engine.demo import DigitsModel
from ursa_engine.serve import Batcher, GenerationRequest

POLICIES = ("continuous", "static", "sequential")


def make_trace(n: int, rate: float, steps: list[int], seed: int) -> list[tuple[float, int, int, int]]:
    """(arrival time s, digit, steps, seed) of ``n`` Poisson arrivals at ``rate`` per second."""
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1.0 / rate, n))
    return [(float(t[i]), i % 10, int(rng.choice(steps)), 1000 + i) for i in range(n)]


def run_policy(engine, trace, policy: str, max_rows: int, *, loras: dict | None = None, pick=None) -> dict:
    """Replay ``trace`` against a fresh batcher; latencies and throughput. ``loras``: per-request
    adapters of the batcher; ``pick(i)``: the adapter name (or None) of request ``i``."""
    pad = engine.model.config.pad_token_id
    jobs = []
    with Batcher(engine, max_rows=max_rows, max_queue=len(trace) + 1, policy=policy, loras=loras) as b:
        t0 = time.perf_counter()
        for i, (at, label, steps, seed) in enumerate(trace):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            req = GenerationRequest(prompt_ids=digits.prompt_ids([label], pad)[0], latents_shape=(1, 4, 8),
                                    num_steps=steps, guidance_scale=3.0, guidance_trunc=0.9, seed=seed,
                                    lora=pick(i) if pick is not None else None)
            jobs.append(b.submit(req))
        for j in jobs:
            j.future.result(timeout=600)
        m = b.metrics
    lat = np.array([j.t_done - j.t_submit for j in jobs])
    span = max(j.t_done for j in jobs) - min(j.t_submit for j in jobs)
    return {"policy": policy, "requests": len(jobs), "throughput_rps": len(jobs) / span,
            "latency_p50_s": float(np.percentile(lat, 50)), "latency_p95_s": float(np.percentile(lat, 95)),
            "latency_mean_s": float(lat.mean()), "steps": m.steps, "rows_per_step": m.rows / max(m.steps, 1),
            "step_ms_mean": 1e3 * m.step_seconds / max(m.steps, 1), "wall_s": span}


def service_time(engine, steps: int, reps: int = 5) -> float:
    """Median seconds of one request alone (the sequential service time)."""
    pad = engine.model.config.pad_token_id
    times = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        engine.generate(digits.prompt_ids([i % 10], pad), latents_shape=(1, 4, 8), num_steps=steps,
                        guidance_scale=3.0, guidance_trunc=0.9, seed=i, decode=False)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=80)
    p.add_argument("--steps", type=int, nargs="+", default=[8, 12, 16, 25])
    p.add_argument("--loads", type=float, nargs="+", default=[1.0, 3.0, 6.0],
                   help="arrival rates as multiples of the sequential capacity")
    p.add_argument("--max-rows", type=int, nargs="+", default=[8, 16],
                   help="row budgets per step (cond + uncond rows of one forward pass)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=3, help="repetitions of each (load, policy); the median is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--lora-mix", action="store_true", help="adapters per request: mixed vs single-adapter traffic")
    p.add_argument("--adapters", type=int, default=4, help="--lora-mix: per-request adapters in the mixed traffic")
    p.add_argument("--lora-rank", type=int, default=16, help="--lora-mix: rank of the random adapters")
    provenance.add_argument(p)
    args = p.parse_args(argv)
    try:
        args.stamp = provenance.check(allow_dirty=args.allow_dirty)
    except provenance.DirtyTree as err:
        return provenance.refuse(err)
    torch.set_num_threads(args.threads)
    engine = DigitsModel.load().engine
    if args.lora_mix:
        return lora_mix(engine, args, argv)
    mean_steps = float(np.mean(args.steps))
    t1 = service_time(engine, int(round(mean_steps)))
    capacity = 1.0 / t1
    print(f"one request alone ({mean_steps:.0f} steps): {t1 * 1e3:.1f} ms -> sequential capacity {capacity:.1f} req/s")
    raw, runs = [], []
    for max_rows in args.max_rows:
        for load in args.loads:
            trace = make_trace(args.requests, load * capacity, args.steps, args.seed)
            for rep in range(args.reps):
                # rotate the order: a slow spell of a shared machine does not always hit the same policy
                for policy in POLICIES[rep % 3:] + POLICIES[: rep % 3]:
                    r = run_policy(engine, trace, policy, max_rows)
                    r.update(load=load, rate_rps=load * capacity, rep=rep, max_rows=max_rows)
                    raw.append(r)
                    print(f"max_rows {max_rows:>2} load {load:>4} x ({load * capacity:6.1f} req/s) {policy:>10} "
                          f"rep {rep}: "
                          f"{r['throughput_rps']:6.1f} req/s, p50 {r['latency_p50_s'] * 1e3:7.1f} ms, "
                          f"p95 {r['latency_p95_s'] * 1e3:7.1f} ms, {r['rows_per_step']:.1f} rows/step", flush=True)
            for policy in POLICIES:  # the median over repetitions of every figure
                rs = [r for r in raw if r["load"] == load and r["policy"] == policy and r["max_rows"] == max_rows]
                med = {k: float(np.median([r[k] for r in rs])) for k in rs[0] if isinstance(rs[0][k], float)}
                runs.append(dict(rs[0], **med, reps=len(rs)))
                del runs[-1]["rep"]
    for r in runs:
        print(f"median  max_rows {r['max_rows']:>2} load {r['load']:>4} x {r['policy']:>10}: "
              f"{r['throughput_rps']:6.1f} req/s, p50 {r['latency_p50_s'] * 1e3:7.1f} ms, "
              f"p95 {r['latency_p95_s'] * 1e3:7.1f} ms")
    stamp = _dt.datetime.now(_dt.timezone.utc)
    result = {"bench": "serve", "device": "cpu", "cpu": platform.processor() or platform.machine(),
              "torch_threads": args.threads, "created": stamp.isoformat(timespec="seconds"),
              "model": "bundled digits (ursa_engine/assets/digits)", "latents_shape": [1, 4, 8],
              "steps_mix": args.steps, "guidance": 3.0, "guidance_trunc": 0.9, "requests_per_run": args.requests,
              "max_rows": args.max_rows, "single_request_s": t1, "sequential_capacity_rps": capacity,
              "command": "python -m ursa_engine.benchmarks.bench_serve " + " ".join(sys.argv[1:] if argv is None
                                                                                  else argv), "runs": runs,
              "raw_runs": raw, "reps": args.reps}
    args.out.mkdir(parents=True, exist_ok=True)
    path = provenance.write_json(args.out / f"serve-cpu-{stamp:%Y%m%d}.json", result, args.stamp)
    print(f"wrote {path}")
    if not args.no_plot:
        print(f"wrote {plot(result, path.with_suffix('.png'))}")
    return 0


LORA_TRAFFIC = ("base", "merged", "single", "mixed")


def lora_mix(engine, args, argv) -> int:
    """Base / merged / single-adapter / mixed-adapter traffic on one arrival trace per load (continuous policy)."""
    from ursa_engine.adapters import LoRAWeights

    cfg = engine.model.config
    names = [f"a{i}" for i in range(args.adapters)]
    adapters = {n: LoRAWeights.random(cfg, r=args.lora_rank, alpha=2.0 * args.lora_rank, seed=i)
                for i, n in enumerate(names)}
    mean_steps = float(np.mean(args.steps))
    t1 = service_time(engine, int(round(mean_steps)))
    capacity = 1.0 / t1
    print(f"one request alone ({mean_steps:.0f} steps): {t1 * 1e3:.1f} ms -> sequential capacity {capacity:.1f} req/s")
    cycle = [*names, None]  # mixed: every adapter and the base model, in turn

    def traffic(kind: str):
        if kind == "base":
            return None, None
        if kind == "merged":
            return None, None  # the adapter is merged into the weights around the run
        if kind == "single":
            return {names[0]: adapters[names[0]]}, (lambda i: names[0])
        return dict(adapters), (lambda i: cycle[i % len(cycle)])

    raw, runs = [], []
    for max_rows in args.max_rows:
        for load in args.loads:
            trace = make_trace(args.requests, load * capacity, args.steps, args.seed)
            for rep in range(args.reps):
                for kind in LORA_TRAFFIC[rep % 4:] + LORA_TRAFFIC[: rep % 4]:
                    loras, pick = traffic(kind)
                    if kind == "merged":
                        engine.load_lora(adapters[names[0]], name="bench")
                    try:
                        r = run_policy(engine, trace, "continuous", max_rows, loras=loras, pick=pick)
                    finally:
                        engine.unload_lora()
                    r.update(traffic=kind, load=load, rate_rps=load * capacity, rep=rep, max_rows=max_rows)
                    raw.append(r)
                    print(f"max_rows {max_rows:>2} load {load:>4} x {kind:>7} rep {rep}: "
                          f"{r['throughput_rps']:6.1f} req/s, p50 {r['latency_p50_s'] * 1e3:7.1f} ms, "
                          f"step {r['step_ms_mean']:.2f} ms, {r['rows_per_step']:.1f} rows/step", flush=True)
            for kind in LORA_TRAFFIC:
                rs = [r for r in raw if r["load"] == load and r["traffic"] == kind and r["max_rows"] == max_rows]
                med = {k: float(np.median([r[k] for r in rs])) for k in rs[0] if isinstance(rs[0][k], float)}
                runs.append(dict(rs[0], **med, reps=len(rs)))
                del runs[-1]["rep"]
    ratios = []
    for max_rows in args.max_rows:
        for load in args.loads:
            by = {r["traffic"]: r for r in runs if r["load"] == load and r["max_rows"] == max_rows}
            ratio = {"max_rows": max_rows, "load": load,
                     "throughput_mixed_over_single": by["mixed"]["throughput_rps"] / by["single"]["throughput_rps"],
                     "throughput_single_over_base": by["single"]["throughput_rps"] / by["base"]["throughput_rps"],
                     "throughput_merged_over_base": by["merged"]["throughput_rps"] / by["base"]["throughput_rps"],
                     "step_ms_mixed_over_single": by["mixed"]["step_ms_mean"] / by["single"]["step_ms_mean"]}
            ratios.append(ratio)
            print("median " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in ratio.items()))
    stamp = _dt.datetime.now(_dt.timezone.utc)
    result = {"bench": "serve-lora", "device": "cpu", "cpu": platform.processor() or platform.machine(),
              "torch_threads": args.threads, "created": stamp.isoformat(timespec="seconds"),
              "model": "bundled digits (ursa_engine/assets/digits)", "latents_shape": [1, 4, 8],
              "steps_mix": args.steps, "guidance": 3.0, "guidance_trunc": 0.9, "requests_per_run": args.requests,
              "policy": "continuous", "adapters": args.adapters, "lora_rank": args.lora_rank,
              "lora_targets": "all seven (q, k, v, o, gate, up, down)", "max_rows": args.max_rows,
              "single_request_s": t1, "sequential_capacity_rps": capacity,
              "command": "python -m ursa_engine.benchmarks.bench_serve " + " ".join(sys.argv[1:] if argv is None
                                                                                  else argv),
              "ratios": ratios, "runs": runs, "raw_runs": raw, "reps": args.reps}
    args.out.mkdir(parents=True, exist_ok=True)
    path = provenance.write_json(args.out / f"serve-lora-cpu-{stamp:%Y%m%d}.json", result, args.stamp)
    print(f"wrote {path}")
    return 0


def plot(result: dict, path: Path) -> Path:
    """Throughput and p50 / p95 latency against the offered load, one line per policy, one row per budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = result["max_rows"]
    fig, axes = plt.subplots(len(budgets), 2, figsize=(10, 3.6 * len(budgets)), squeeze=False)
    colors = {"continuous": "tab:blue", "static": "tab:orange", "sequential": "tab:gray"}
    for (ax1, ax2), budget in zip(axes, budgets, strict=True):
        for policy in POLICIES:
            rs = [r for r in result["runs"] if r["policy"] == policy and r["max_rows"] == budget]
            load = [r["rate_rps"] for r in rs]
            ax1.plot(load, [r["throughput_rps"] for r in rs], "o-", color=colors[policy], label=policy)
            ax2.plot(load, [r["latency_p50_s"] * 1e3 for r in rs], "o-", color=colors[policy], label=f"{policy} p50")
            ax2.plot(load, [r["latency_p95_s"] * 1e3 for r in rs], "s--", color=colors[policy],
                     label=f"{policy} p95")
        ax1.set(xlabel="offered load (requests/s, Poisson)", ylabel="throughput (requests/s)",
                title=f"throughput, max_rows {budget}")
        ax2.set(xlabel="offered load (requests/s, Poisson)", ylabel="latency (ms)", yscale="log",
                title=f"latency, max_rows {budget}")
        ax1.legend(fontsize=8)
        ax2.legend(fontsize=7)
    fig.suptitle(f"ursa-engine serve, digits model on the CPU ({result['torch_threads']} thread), "
                 f"steps {result['steps_mix']}, medians of {result['reps']} runs", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())

