"""Uniform-mixture and masked path sampler steps (DESIGN §2.4), every backend vs dense.

Cases: mixture (Euler), mask (Euler), mask-confidence (MaskGIT ranking). All are pure logits-read ops:
draw x̂1 from the guided logits, then a per-token jump / unmask
decision. Floor: the guided logits read once plus x read and written (DESIGN §6).
"""

from __future__ import annotations

from .common import (
    GUIDANCE,
    LOGITS_NOTE,
    NUM_STEPS,
    dense_tokens,
    logits_dtype,
    providers,
    scale_note,
    step_bytes,
    step_inputs,
)
from .harness import Work
from .records import BenchContext

NAME = "mixture_step"


def cases(mode: str) -> list[tuple[str, int, int]]:
    """(name, tokens, K)."""
    if mode == "gpu":
        return [("video-33280", 33_280, 64_000), ("image-4096", 4_096, 64_000)]
    if mode == "cpu":
        return [("video-1024", 1_024, 64_000)]
    return [("small-256", 256, 97)]


def run(ctx: BenchContext) -> None:
    import ursa_engine as ue

    dtype = logits_dtype(ctx)
    for case, tokens_full, K in cases(ctx.mode):
        for kind in ("mixture", "mask", "mask-confidence"):
            # the masked path's K counts the mask state too (mask_id = K here)
            n_logits = K if kind == "mixture" else K + 1
            path = ue.MixturePath(K) if kind == "mixture" else ue.MaskPath(K + 1, K)
            sampler = "confidence" if kind == "mask-confidence" else "euler"
            sched = ue.Scheduler(path, NUM_STEPS, shift=1.0, mask_sampler=sampler)
            k = NUM_STEPS // 2
            dense_ms = None
            # the confidence ranking has a single (torch-op) implementation: no backend to compare
            for provider in providers(ctx) if kind != "mask-confidence" else ("torch",):
                tokens = dense_tokens(ctx, tokens_full, n_logits) if provider == "torch" else tokens_full
                shape = {"path": kind, "tokens": tokens_full, "batch": 1, "cfg_pair": True,
                         "K": n_logits, "dtype": str(dtype).replace("torch.", ""), "step": k,
                         "num_steps": NUM_STEPS, **GUIDANCE, "logits": LOGITS_NOTE, "validate": False,
                         "timed_tokens": tokens}

                def setup(tokens=tokens, provider=provider, sched=sched, kind=kind, n_logits=n_logits, K=K, k=k):
                    sets = step_inputs(ctx, tokens, n_logits, guided=True)
                    if kind != "mixture":  # half the tokens still masked, mid-generation
                        for _, _, x in sets:
                            x[:, ::2] = K

                    def fn(i):
                        cond, uncond, x = sets[i % len(sets)]
                        return sched.step(cond, k, x, uncond_logits=uncond, seed=i, backend=provider, validate=False,
                                          **GUIDANCE)
                    return fn

                rec = ctx.bench(case=f"{kind}-{case}", provider=provider, setup=setup,
                                work=Work(bytes=step_bytes(tokens_full, n_logits, dtype, guided=True),
                                          tokens=tokens_full),
                                shape=shape, dense_ms=None if provider == "torch" else dense_ms,
                                scale=tokens_full / tokens, scale_note=scale_note(tokens_full, tokens))
                if provider == "torch" and rec["status"] == "ok":
                    dense_ms = rec["median_ms"]
