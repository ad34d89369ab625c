"""Planned peak memory of whole generations at real size (issue 11), computed on the CPU in every mode.

:func:`ursa_engine.memory.plan_generation` runs one guided denoising step of the engine's own step
body (as a GPU runs it: Triton model ops, fused attention, the fused head + x̂1 draw, the fused
sampler) and the tokenizer's decode on fake tensors, weights included; every figure is live
bytes including the resident weights (``peak_mem_bytes``; ``peak_extra_bytes`` is the part above
the weights of the transformer, the tokenizer and the codebook).

Cases (bf16, guidance on, batch 1, 320 prompt tokens):

* the two of issue 11's "done when": 1.7B at 13 × 40 × 64 FSQ video (K = 64,000; target ≤ 8 GB
  and no (D, K) buffer) and 1.7B at 1 × 64 × 64 IBQ (1024² image, K = 131,072, the IBQ1024
  tokenizer), and 0.6B at both;
* the authors' pipeline shapes (:data:`benchmarks.model_common.LATENTS`, FSQ grids) for 0.6B and
  1.7B, cpu / gpu modes;
* ``plan-chunked``: the 13 × 40 × 64 case with ``head="chunked"`` (lm_head per token range, the
  sampler reading that range's logits: a GPU without the fused head), cpu / gpu modes.

Providers: ``plan`` (and ``plan-chunked``); the row's time is the CPU time taken to plan. In gpu mode
``measured`` runs the same guided step for real (random weights, ``Engine.generate`` with two steps:
step 0 of the metric path evaluates nothing, step 1 is guided) and reports
``torch.cuda.max_memory_allocated`` beside the plan of that call without decode
(``measured_over_planned``). Smoke mode plans the two 1.7B cases without the decode.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field

import torch

from .harness import Work, timing_of
from .model_common import LATENTS, PROMPT_LEN
from .records import BenchContext

NAME = "memory_plan"
TARGET_BYTES = 8e9  # issue 11: 1.7B, 13 × 40 × 64, guidance, bf16, whole generation with weights


@dataclass
class Case:
    preset: str
    latents: tuple[int, int, int]
    codebook: str  # "fsq" | "ibq"
    what: str
    decode: bool = True
    head: str = "auto"
    measured: bool = False  # gpu mode: also run the step for real
    targets: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.preset}-{'x'.join(map(str, self.latents))}-{self.codebook}-cfg-bf16"

    @property
    def provider(self) -> str:
        return "plan" if self.head == "auto" else f"plan-{self.head}"


def _main_cases(decode: bool) -> list[Case]:
    video, image = (13, 40, 64), (1, 64, 64)
    goal = {"max_peak_mem_bytes": TARGET_BYTES, "max_dk_buffers": 0}
    return [Case("ursa-1.7b", video, "fsq", "49 x 320 x 512 video (issue 11 target)", decode, measured=True,
                 targets=goal),
            Case("ursa-1.7b", image, "ibq", "1024^2 image, IBQ1024", decode, measured=True,
                 targets={"max_dk_buffers": 0}),
            Case("ursa-0.6b", video, "fsq", "49 x 320 x 512 video", decode, measured=True),
            Case("ursa-0.6b", image, "ibq", "1024^2 image, IBQ1024", decode)]


def cases(mode: str) -> list[Case]:
    """In priority order (a deadline cuts from the end)."""
    if mode == "smoke":
        return _main_cases(decode=False)[:2]
    out = _main_cases(decode=True)
    out.append(Case("ursa-1.7b", (13, 40, 64), "fsq", "49 x 320 x 512 video, lm_head per token range",
                    head="chunked"))
    for preset in ("ursa-1.7b", "ursa-0.6b"):
        for tokens, shape in sorted(LATENTS.items()):
            if shape != (13, 40, 64):
                out.append(Case(preset, shape, "fsq", f"authors' pipeline shape ({tokens:,} tokens)"))
    return out


def _shape(case: Case, plan) -> dict:
    return {"preset": case.preset, "latents": list(case.latents), "codebook": case.codebook,
            "codebook_size": plan.codebook_size, "what": case.what, "batch": plan.batch, "cfg": plan.cfg,
            "rows": plan.rows, "seq_len": plan.seq_len, "latent_tokens": plan.latent_tokens, "dtype": plan.dtype,
            "prompt_len": PROMPT_LEN, "decode": case.decode, "tokenizer": plan.tokenizer}


def _plan(case: Case, *, decode: bool | None = None):
    from ursa_engine.memory import plan_generation

    return plan_generation(case.preset, case.latents, dtype=torch.bfloat16, cfg=True, codebook=case.codebook,
                           head=case.head, decode=case.decode if decode is None else decode)


def _plan_record(ctx: BenchContext, case: Case, plan) -> dict:
    resident = sum(plan.weight_bytes.values())
    phases = {k: v["peak_bytes"] for k, v in plan.phases.items()}
    largest = {k: v["largest"] for k, v in plan.phases.items()}
    extra = {"planned_peak_bytes": plan.peak_bytes, "planned_peak_phase": plan.peak_phase,
             "planned_peak_op": plan.peak_op, "phase_peak_bytes": phases, "phase_largest_tensor": largest,
             "peak_tensors": plan.peak_tensors[:6], "weight_bytes": plan.weight_bytes,
             "dk_elements": plan.dk_elements, "dk_buffers": len(plan.dk_buffers), "dk_buffer_phases": plan.dk_buffers,
             "head": plan.head, "head_chunks": plan.head_chunks, "sampler": plan.sampler,
             "mlp_chunks": plan.mlp_chunks, "qkv_chunks": plan.qkv_chunks, "logits_budget": plan.logits_budget,
             "activation_budget": plan.activation_budget, "attention": plan.attention, "granularity": plan.granularity,
             "notes": plan.notes,
             "peak_source": "plan: FakeTensorMode on the CPU + LiveBytes, weights included (peak_mem = everything "
                            "live; peak_extra = above the weights); undeclared kernel workspaces not included",
             "timing_note": "median_ms is the CPU time taken to compute the plan"}
    return ctx.record(case=case.name, provider=case.provider, shape=_shape(case, plan), work=Work(),
                      timing=timing_of([plan.seconds * 1e3], warmup=0), peak=plan.peak_bytes,
                      peak_extra=plan.peak_bytes - resident, extra=extra, targets=case.targets)


def _measure(ctx: BenchContext, case: Case) -> dict:
    """gpu mode: one guided step of a random-weight engine, peak from the CUDA allocator."""
    import ursa_engine as ue
    from ursa_engine.memory.generation import FSQ_LEVELS, IBQ_DIM, IBQ_K, PAPER_SCHEDULE

    def run():
        plan = _plan(case, decode=False)
        K = plan.codebook_size
        cfg = ue.ModelConfig.preset(case.preset, lm_head_size=K,
                                    vocab_size=ue.ModelConfig.preset(case.preset).lm_vocab_size + K)
        if case.codebook == "fsq":
            cb = ue.Codebook.fsq(FSQ_LEVELS)
        else:
            cb = ue.Codebook(torch.randn(IBQ_K, IBQ_DIM, generator=torch.Generator().manual_seed(0)))
        alpha, c = PAPER_SCHEDULE[case.codebook]
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)
        model = ue.URSATransformer(cfg, dtype=torch.bfloat16, device=ctx.device).eval()
        engine = ue.Engine(model, ue.Scheduler(ue.MetricPath(cb, alpha=alpha, c=c), 2), mode="eager")
        gen = ctx.generator()
        prompt = torch.randint(0, cfg.lm_vocab_size, (1, PROMPT_LEN), generator=gen, device=ctx.device)
        negative = torch.randint(0, cfg.lm_vocab_size, (1, PROMPT_LEN), generator=gen, device=ctx.device)
        result = engine.generate(prompt, negative, case.latents, guidance_scale=7.0, guidance_trunc=1.0,
                                 decode=False)
        peak = torch.cuda.max_memory_allocated(ctx.device)
        step_ms = [1e3 * t for t in result.step_times[1:]]
        del engine, model, result
        gc.collect()
        return {"timing": timing_of(step_ms, warmup=0), "peak": peak,
                "extra": {"planned_peak_bytes_no_decode": plan.peak_bytes,
                          "measured_over_planned": peak / plan.peak_bytes, "head": plan.head,
                          "peak_source": "torch.cuda.max_memory_allocated over building the model and one "
                                         "guided step (Engine.generate, 2 steps: step 0 evaluates nothing)",
                          "timing_note": "median_ms is the guided step's time (eager, first call: includes "
                                         "compilation)"}}

    return ctx.attempt(run, case=case.name, provider="measured", work=Work(), shape={"preset": case.preset,
                       "latents": list(case.latents), "codebook": case.codebook}, targets=case.targets,
                       margin_s=30.0)


def run(ctx: BenchContext, *, only: tuple[str, ...] | None = None) -> None:
    for case in cases(ctx.mode):
        if only and case.name not in only:
            continue
        if ctx.deadline.expired(margin=30.0):
            ctx.skip(case=case.name, provider=case.provider, shape={"preset": case.preset}, work=Work(),
                     reason="global time budget exhausted")
            continue
        try:
            plan = _plan(case)
        except Exception as err:  # noqa: BLE001 - every failure is a record
            ctx.skip(case=case.name, provider=case.provider, shape={"preset": case.preset}, work=Work(),
                     status="error", reason=f"{type(err).__name__}: {err}")
            continue
        _plan_record(ctx, case, plan)
        if case.measured and ctx.mode == "gpu" and ctx.device.type == "cuda":
            _measure(ctx, case)
