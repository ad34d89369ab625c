"""Training-time path sampling ``x_t ~ p_t(.|x1)`` with per-token times (DESIGN §2.3).

The metric path draws from a softmax over all K codes for every token: its floor is the
``D·K`` exponentials (DESIGN §6: "33,280 tokens × 64,000 codes, ~2.1 G exp → ~1 ms"; the exp
rate is the design's model, not a measurement, and the record says so). The mixture and
masked paths only read x1 and t and write x_t: bytes-bound, and at these sizes mostly launch
overhead. Target: the fused training sampler ≥ 20× faster than the dense reference.
"""

from __future__ import annotations

import torch

from .common import FSQ, FSQ_SMOKE, dense_tokens, providers, scale_note
from .harness import Work, rotations
from .records import BenchContext

NAME = "metric_sample"


def cases(mode: str):
    """(name, codebook, tokens, targets by provider)."""
    if mode == "gpu":
        return [("fsq-train-33280", FSQ, 33_280, {"triton": {"min_speedup_vs_dense": 20}}),
                ("fsq-train-4096", FSQ, 4_096, {})]
    if mode == "cpu":
        return [("fsq-train-1024", FSQ, 1_024, {})]
    return [("fsq-small-256", FSQ_SMOKE, 256, {})]


def _inputs(ctx: BenchContext, tokens: int, K: int, *, per_token_bytes: int):
    gen = ctx.generator()
    sets = []
    for _ in range(rotations(tokens * per_token_bytes, ctx.device)):
        x1 = torch.randint(0, K, (1, tokens), generator=gen, device=ctx.device)
        # per-token times of the training law (DESIGN §2.3, shift 1): never exactly 1
        t = 1 - 0.999 * torch.rand((1, tokens), generator=gen, device=ctx.device)
        sets.append((x1, t))
    return sets


def _run_path(ctx, case, path_name, path, tokens_full, K, work, targets, exps_per_token):
    dense_ms = None
    for provider in providers(ctx):
        tokens = dense_tokens(ctx, tokens_full, K) if provider == "torch" and exps_per_token else tokens_full
        shape = {"path": path_name, "tokens": tokens_full, "K": K, "times": "per token, U(0.001, 1]",
                 "timed_tokens": tokens}

        def setup(tokens=tokens, provider=provider, path=path):
            sets = _inputs(ctx, tokens, K, per_token_bytes=8 + 4)

            def fn(i):
                x1, t = sets[i % len(sets)]
                return path.sample(x1, t, seed=i, backend=provider)
            return fn

        rec = ctx.bench(case=case, provider=provider, setup=setup, work=work, shape=shape,
                        dense_ms=None if provider == "torch" else dense_ms,
                        scale=tokens_full / tokens, scale_note=scale_note(tokens_full, tokens),
                        targets=targets.get(provider))
        if provider == "torch" and rec["status"] == "ok":
            dense_ms = rec["median_ms"]


def run(ctx: BenchContext) -> None:
    import ursa_engine as ue

    for case, cbcase, tokens, targets in cases(ctx.mode):
        K = cbcase.size
        cb = cbcase.build(ue, ctx.data_seed)
        io = Work(bytes=tokens * (8 + 4 + 8), tokens=tokens)  # x1 int64, t float32, x_t int64
        _run_path(ctx, case, "metric", ue.MetricPath(cb, alpha=cbcase.alpha, c=cbcase.c),
                  tokens, K, Work(bytes=io.bytes, exps=float(tokens) * K, tokens=tokens), targets, 1)
        # a training batch of 8 sequences for the cheap paths, so the kernels are not all launch
        batch = 8 if ctx.mode == "gpu" else 1
        _run_path(ctx, f"{case}-x{batch}".replace("fsq-", "mixture-"), "mixture",
                  ue.MixturePath(K), tokens * batch, K,
                  Work(bytes=io.bytes * batch, tokens=tokens * batch), {}, 0)
        _run_path(ctx, f"{case}-x{batch}".replace("fsq-", "mask-"), "mask",
                  ue.MaskPath(K + 1, K), tokens * batch, K,
                  Work(bytes=io.bytes * batch, tokens=tokens * batch), {}, 0)
