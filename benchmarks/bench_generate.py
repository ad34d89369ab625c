"""Full generation with random weights: measured end to end, or projected from step latencies.

Every record says which it is (``shape["method"]``):

* ``measured``: ``ue.Engine(model, sched).generate(...)`` timed end to end (host clock around
  synchronized calls), after one cold generation at the same shape (compilation, autotuning,
  graph capture: recorded as ``cold_ms``, excluded from the median).
* ``projected``: ``Σ_k step(k)`` from the engine's step latencies measured in this run
  (:func:`~benchmarks.model_common.steady_steps`, CUDA graph): N = 50 steps, step 0 needs no
  model evaluation (β̇(0) = 0, DESIGN §4), steps with ``t_k < 0.9`` run the CFG batch (2 rows),
  the rest the conditional row alone. Shift 1 (a larger shift guides more steps). Decoding the
  tokens to pixels and text encoding are not included.

The paper's latencies (appendix J: 1.7B, 70 s for 19K tokens, 180 s for 34K tokens per video,
hardware unstated) are compared in :mod:`ursa_engine.benchmarks.report`.
"""

from __future__ import annotations

import time

from .harness import Work, synchronize, timing_of
from .model_common import (
    GUIDANCE_SCALE,
    GUIDANCE_TRUNC,
    LATENTS,
    NUM_STEPS,
    PRESETS,
    ModelHolder,
    make_engine,
    random_prompts,
    seq_len,
    steady_steps,
    step_flops,
)
from .records import BenchContext

NAME = "generate"
PAPER = {19_041: 70.0, 33_601: 180.0}  # seconds per video, UDM-1.7B, paper appendix J, Table 6


def cases(mode: str) -> list[tuple[str, tuple[int, int, int], str, int]]:
    """(preset, latents, method, num_steps) in priority order."""
    if mode != "gpu":
        return [("tiny", (1, 4, 4), "measured", 4), ("tiny", (1, 4, 4), "projected", 4)]
    lat = LATENTS
    out = [("1.7b", lat[19_041], "projected", NUM_STEPS), ("1.7b", lat[33_601], "projected", NUM_STEPS),
           ("0.6b", lat[1_345], "measured", NUM_STEPS), ("0.6b", lat[4_417], "measured", NUM_STEPS),
           ("1.7b", lat[1_345], "measured", NUM_STEPS), ("1.7b", lat[19_041], "measured", NUM_STEPS)]
    for preset in ("0.6b", "1.7b", "4b"):
        out += [(preset, lat[t], "projected", NUM_STEPS) for t in (1_345, 4_417, 19_521, 33_601)]
    out.append(("1.7b", lat[33_601], "measured", NUM_STEPS))
    seen, unique = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            unique.append(c)
    return unique


def step_plan(num_steps: int, trunc: float = GUIDANCE_TRUNC) -> tuple[int, int]:
    """(guided model evaluations, conditional-only ones) of one generation, shift 1."""
    ts = [k / num_steps for k in range(1, num_steps)]  # k = 0 needs no model evaluation
    guided = sum(1 for t in ts if t < trunc)
    return guided, len(ts) - guided


def _step_mode(ctx: BenchContext) -> str:
    return "graph" if ctx.device.type == "cuda" else "eager"


def _project(ctx: BenchContext, holder: ModelHolder, preset: str, latents, num_steps: int) -> dict:
    """Σ_k step(k) from the engine's step latencies measured now, CFG batch and conditional row."""
    model = holder.get(preset)
    medians = {}
    for rows in (2, 1):
        samples, _ = steady_steps(model, latents, mode=_step_mode(ctx), guided=rows == 2, reps=3,
                                  seed=ctx.data_seed & 0xFFFFFFFF)
        medians[rows] = timing_of(samples, warmup=2).median_ms
    guided, cond_only = step_plan(num_steps)
    return {"step_ms_cfg": medians[2], "step_ms_cond": medians[1], "step_mode": _step_mode(ctx),
            "total_ms": guided * medians[2] + cond_only * medians[1]}


def run(ctx: BenchContext) -> None:
    import ursa_engine as ue

    holder = ModelHolder(ctx.device)
    for preset, latents, method, num_steps in cases(ctx.mode):
        tokens = seq_len(latents)
        case = f"{preset}-{tokens}"
        guided, cond_only = step_plan(num_steps)
        cfg = ue.ModelConfig.preset(PRESETS[preset])
        flops = guided * step_flops(cfg, latents, 2) + cond_only * step_flops(cfg, latents, 1)
        work = Work(flops=flops, tokens=tokens)
        shape = {"preset": preset, "tokens": tokens, "latents": list(latents), "num_steps": num_steps,
                 "guidance_scale": GUIDANCE_SCALE, "guidance_trunc": GUIDANCE_TRUNC, "shift": 1.0,
                 "method": method, "guided_steps": guided, "cond_only_steps": cond_only,
                 "paper_s": PAPER.get(tokens) if preset == "1.7b" else None}
        if method == "projected":

            def project(preset=preset, latents=latents, num_steps=num_steps):
                proj = _project(ctx, holder, preset, latents, num_steps)
                total = proj["total_ms"]
                return {"timing": timing_of([total], warmup=0), "extra": proj}

            ctx.attempt(project, case=case, provider=method, work=work, shape=shape, mfu=True, margin_s=15.0)
            continue
        estimate_s = flops / (0.4 * (ctx.ceilings.matmul_flops_per_s if ctx.ceilings else 1e11))
        if 2.2 * estimate_s > ctx.deadline.left() - 20:
            ctx.skip(case=case, provider=method, shape=shape, work=work,
                     reason=f"would not fit the time budget (estimate {estimate_s:.0f} s a generation)")
            continue

        def generate(preset=preset, latents=latents, num_steps=num_steps):
            return _measure_generation(ctx, holder, preset, latents, num_steps)

        ctx.attempt(generate, case=case, provider=method, work=work, shape=shape, mfu=True, margin_s=15.0)
    holder.release()


def _measure_generation(ctx: BenchContext, holder: ModelHolder, preset: str, latents, num_steps: int) -> dict:
    """One cold ``Engine.generate`` (compilation, autotuning, graph capture), then warm ones that fit."""
    model = holder.get(preset)
    engine = make_engine(model, num_steps, mode="auto")
    prompt = random_prompts(model, ctx.device, ctx.data_seed & 0xFFFFFFFF)
    negative = random_prompts(model, ctx.device, (ctx.data_seed & 0xFFFFFFFF) + 1)

    def generate(i: int):
        return engine.generate(prompt, negative_prompt_ids=negative, latents_shape=latents,
                               guidance_scale=GUIDANCE_SCALE, guidance_trunc=GUIDANCE_TRUNC, seed=i, progress=False)

    synchronize(ctx.device)
    t0 = time.perf_counter()
    cold = generate(0)
    synchronize(ctx.device)
    cold_ms = (time.perf_counter() - t0) * 1e3
    reps = int(max(1, min(3, (ctx.deadline.left() - 20) * 1e3 / max(cold_ms, 1.0) / 2)))
    samples, results = [], []
    for i in range(reps):
        synchronize(ctx.device)
        t = time.perf_counter()
        results.append(generate(1 + i))
        synchronize(ctx.device)
        samples.append((time.perf_counter() - t) * 1e3)
    last = results[-1]
    peaks = [r.peak_memory for r in results if r.peak_memory is not None]
    return {"timing": timing_of(samples, warmup=1), "peak": max(peaks) if peaks else None,
            "extra": {"cold_ms": cold_ms, "mode_ran": last.mode, "attention_ran": last.attention,
                      "model_calls": last.model_calls, "engine_guided_steps": last.guided_steps,
                      "cold_mode": cold.mode}}
