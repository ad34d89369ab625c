"""Metric-path sampler step (DESIGN §2.4), every backend against the dense reference.

Work counted (DESIGN §6): the guided logits read once (cond + uncond, the "2 ×" of the table),
x read and written; for an explicit table (IBQ, m = 256) also the distance product
``2·D·K·m`` FLOPs of x̂1 against every code. FSQ codes are implicit (computed from the index),
so its floor is the logits read alone: "FSQ video ≤ 1.3× its logits-read floor".
"""

from __future__ import annotations

from dataclasses import dataclass

from .common import (
    FSQ,
    FSQ_SMOKE,
    GUIDANCE,
    IBQ,
    LOGITS_NOTE,
    NUM_STEPS,
    TABLE_SMOKE,
    CodebookCase,
    dense_tokens,
    logits_dtype,
    providers,
    scale_note,
    step_bytes,
    step_inputs,
)
from .harness import Work
from .records import BenchContext

NAME = "metric_step"
MIB = 1 << 20


@dataclass(frozen=True)
class Case:
    name: str
    codebook: CodebookCase
    tokens: int  # per sequence; guidance doubles the logits read
    targets: dict  # provider -> targets (DESIGN §6 and the kernel issues)


def cases(mode: str) -> list[Case]:
    """The real sizes of DESIGN §6 first, then smaller ones."""
    if mode == "gpu":
        def o_d(d):
            return {"max_peak_extra_bytes": 256 * d + 64 * MIB}
        return [
            Case("fsq-video-33280", FSQ, 33_280,
                 {"triton": {"max_ratio_to_floor": 1.3, "min_speedup_vs_dense": 30, **o_d(33_280)}}),
            Case("ibq-image-4096", IBQ, 4_096, {"triton": {"max_ratio_to_floor": 1.5, **o_d(4_096)}}),
            Case("fsq-image-4096", FSQ, 4_096, {}),
            Case("fsq-1024", FSQ, 1_024, {}),
        ]
    if mode == "cpu":
        return [Case("fsq-1024", FSQ, 1_024, {"native": {"min_speedup_vs_dense": 20}})]
    return [Case("fsq-small-256", FSQ_SMOKE, 256, {}), Case("table-small-64", TABLE_SMOKE, 64, {})]


def run(ctx: BenchContext) -> None:
    import ursa_engine as ue

    for case in cases(ctx.mode):
        cb = case.codebook.build(ue, ctx.data_seed)
        path = ue.MetricPath(cb, alpha=case.codebook.alpha, c=case.codebook.c)
        sched = ue.Scheduler(path, NUM_STEPS, shift=1.0)
        k = NUM_STEPS // 2
        K, m = case.codebook.size, case.codebook.dim
        dtype = logits_dtype(ctx)
        dense_ms = None
        for provider in providers(ctx):
            tokens = dense_tokens(ctx, case.tokens, K) if provider == "torch" else case.tokens
            work = Work(bytes=step_bytes(case.tokens, K, dtype, guided=True),
                        flops=0.0 if case.codebook.levels else 2.0 * case.tokens * K * m,
                        tokens=case.tokens)
            shape = {"tokens": case.tokens, "batch": 1, "cfg_pair": True, "K": K, "m": m,
                     "codebook": case.codebook.name, "dtype": str(dtype).replace("torch.", ""),
                     "step": k, "num_steps": NUM_STEPS, **GUIDANCE, "logits": LOGITS_NOTE, "validate": False,
                     "timed_tokens": tokens}

            def setup(tokens=tokens, provider=provider, K=K, sched=sched, k=k):
                sets = step_inputs(ctx, tokens, K, guided=True)

                def fn(i):
                    cond, uncond, x = sets[i % len(sets)]
                    return sched.step(cond, k, x, uncond_logits=uncond, seed=i, backend=provider, validate=False,
                                      **GUIDANCE)
                return fn

            rec = ctx.bench(case=case.name, provider=provider, setup=setup, work=work, shape=shape,
                            dense_ms=None if provider == "torch" else dense_ms,
                            scale=case.tokens / tokens, scale_note=scale_note(case.tokens, tokens),
                            targets=case.targets.get(provider))
            if provider == "torch" and rec["status"] == "ok":
                dense_ms = rec["median_ms"]
