"""One denoising step of the URSA transformer with random weights (DESIGN §4, §6).

Step = the engine's own step (:class:`ursa_engine.Engine`, ``mode="eager"`` or ``"graph"``):
forward over the CFG batch (cond + uncond, 2 rows), lm_head on latent positions only, the fused
metric-path sampler step, tokens written back; timed by the engine's per-step CUDA events in a
short generation (steps 2 .. N−2: no compilation, no capture, no eager last step); per attention
backend. Reported: latency, peak memory (weights included), MFU, ratio to the FLOP floor
(measured matmul rate), and the graph's speedup over eager at the same shape. FLOP counting:
:mod:`ursa_engine.benchmarks.model_common`.

Targets (runtime issue): 1.7B at 33,601 × 2 ≥ 55% MFU with peak ≤ 16 GB; CUDA graphs make the
0.6B 1,345-token step ≥ 1.5× faster than eager.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .harness import Work, timing_of
from .model_common import LATENTS, PRESETS, ModelHolder, seq_len, steady_steps, step_flops
from .records import BenchContext

NAME = "model_step"
ATTENTION_SWEEP = ("sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "flash")


@dataclass(frozen=True)
class Config:
    preset: str
    latents: tuple[int, int, int]
    graph: bool
    attention: str = "auto"
    guided: bool = True
    targets: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def tokens(self) -> int:
        return seq_len(self.latents)


def configs(mode: str) -> list[Config]:
    """In priority order: the suite's deadline cuts from the end."""
    if mode != "gpu":
        small = (1, 4, 4) if mode == "smoke" else (1, 16, 16)
        return [Config("tiny", small, graph=False), Config("tiny", small, graph=False, attention="math")]
    lat = LATENTS
    out = [
        Config("1.7b", lat[33_601], graph=False),
        Config("1.7b", lat[33_601], graph=True, targets={"min_mfu": 0.55, "max_peak_mem_bytes": 16e9}),
        Config("0.6b", lat[1_345], graph=False),
        Config("0.6b", lat[1_345], graph=True, targets={"min_speedup_vs_eager": 1.5}),
    ]
    for preset in ("0.6b", "1.7b"):
        for tokens in (1_345, 4_417, 19_521, 33_601):
            out += [Config(preset, lat[tokens], graph=False), Config(preset, lat[tokens], graph=True)]
    for preset in ("1.7b", "0.6b"):
        for tokens in (33_601, 4_417, 19_521, 1_345):
            out += [Config(preset, lat[tokens], graph=False, attention=a) for a in ATTENTION_SWEEP]
    for tokens in (1_345, 4_417, 19_521, 33_601):
        out += [Config("4b", lat[tokens], graph=False), Config("4b", lat[tokens], graph=True)]
    unique, seen = [], set()
    for c in out:  # keep the first (prioritised) copy, with its targets
        if c not in seen:
            seen.add(c)
            unique.append(c)
    return unique


def _resolved_attention(name: str, model, tokens: int) -> dict:
    """Which kernel ``name`` means here (the attention module raises rather than fall back)."""
    try:
        from ursa_engine.attention import cudnn_attention_safe, resolve_attention

        cfg = model.config
        resolved = resolve_attention(name, model.device, model.dtype, cfg.head_dim)
        out = {"attention_resolved": resolved, "cudnn_attention_safe": cudnn_attention_safe(tokens)}
        if resolved == "sdpa-cudnn" and not out["cudnn_attention_safe"]:
            out["warning"] = (f"cuDNN {torch.backends.cudnn.version()} < 9.15.1 and {tokens} % 128 != 0: "
                              "cuDNN SDPA is known to give wrong results here (docs/design.md §4); timing only")
        return out
    except Exception as err:  # noqa: BLE001 - recorded; the timing itself will fail loudly
        return {"attention_resolved": None, "attention_error": str(err)}


def _reps(ctx: BenchContext, flops: float) -> int:
    """Timed steps that fit the per-case budget, from a guess at 40% of the measured matmul rate."""
    rate = ctx.ceilings.matmul_flops_per_s if ctx.ceilings else 1e11
    guess_s = flops / (0.4 * rate) + 2e-3
    return int(max(3, min(10, ctx.case_budget_s * 3 / guess_s)))


def run(ctx: BenchContext, *, presets: tuple[str, ...] | None = None) -> None:
    import ursa_engine as ue

    holder = ModelHolder(ctx.device)
    eager_ms: dict[tuple, float] = {}
    for cfg in configs(ctx.mode):
        if presets and cfg.preset not in presets:
            continue
        mode = "graph" if cfg.graph else "eager"
        case, provider = f"{cfg.preset}-{cfg.tokens}", f"{cfg.attention}/{mode}"
        rows = 2 if cfg.guided else 1
        model_cfg = ue.ModelConfig.preset(PRESETS[cfg.preset])
        flops = step_flops(model_cfg, cfg.latents, rows)
        work = Work(flops=flops, tokens=rows * cfg.tokens)
        reps = _reps(ctx, flops)
        shape = {"preset": cfg.preset, "tokens": cfg.tokens, "latents": list(cfg.latents), "rows": rows,
                 "guided": cfg.guided, "graph": cfg.graph, "attention": cfg.attention,
                 "sampler_backend": "auto", "dtype": "bfloat16" if ctx.device.type == "cuda" else "float32",
                 "reps": reps, "timing": "Engine.generate per-step times, steps 2..N-2"}
        if cfg.graph and ctx.device.type != "cuda":
            ctx.skip(case=case, provider=provider, shape=shape, work=work, reason="CUDA graphs need a GPU")
            continue
        key = (cfg.preset, cfg.tokens, cfg.attention, cfg.guided)

        def measure_step(cfg=cfg, mode=mode, reps=reps, flops=flops):
            model = holder.get(cfg.preset)
            samples, result = steady_steps(model, cfg.latents, mode=mode, guided=cfg.guided, reps=reps,
                                           attention=cfg.attention, seed=ctx.data_seed & 0xFFFFFFFF)
            extra = {**_resolved_attention(cfg.attention, model, cfg.tokens), "flops": flops,
                     "params": model.config.num_params(), "attention_ran": result.attention,
                     "mode_ran": result.mode}
            return {"timing": timing_of(samples, warmup=2), "peak": result.peak_memory, "extra": extra}

        rec = ctx.attempt(measure_step, case=case, provider=provider, work=work, shape=shape,
                          targets=cfg.targets, mfu=True, margin_s=10.0,
                          baselines={"eager": eager_ms[key]} if cfg.graph and key in eager_ms else None)
        if not cfg.graph and rec["status"] == "ok":
            eager_ms[key] = rec["median_ms"]
        if rec["status"] == "error" and "out of memory" in str(rec["reason"]).lower():
            holder.release()
    holder.release()
