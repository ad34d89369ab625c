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

Training steps (issue 18, :func:`ursa_engine.memory.plan_training_step`, provider ``plan-training``):
one step of ``LatentLoss`` forward + backward + a mixed-precision AdamW update (bf16 parameters and
gradients, fp32 master weights and moments) at 13 × 40 × 64, 1.7B and 0.6B, with and without
activation checkpointing; ``peak_mem_bytes`` includes the resident weights and optimizer state,
``peak_extra_bytes`` is the step's own peak above them; target: no (n, K) buffer. In gpu mode
``measured-training`` runs the checkpointed 1.7B step for real (random weights and ids, two steps)
and reports ``torch.cuda.max_memory_allocated`` of the second beside the plan. Not in smoke mode
(``tests/test_training_plan.py`` plans the 1.7B step).
"""

from __future__ import annotations

import gc
import time
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
             "activation_budget": plan.activation_budget, "attention": plan.attention,
             "attention_backend": plan.attention_backend, "kv_expansion_bytes": plan.kv_expansion_bytes,
             "dk_tensors": plan.dk_tensors, "unphased_bytes": plan.unphased_bytes, "granularity": plan.granularity,
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


@dataclass
class TrainingCase:
    preset: str
    latents: tuple[int, int, int]
    checkpointing: bool
    what: str
    measured: bool = False  # gpu mode: also run the step for real
    targets: dict = field(default_factory=lambda: {"max_nk_buffers": 0})
    provider: str = "plan-training"

    @property
    def name(self) -> str:
        return (f"{self.preset}-{'x'.join(map(str, self.latents))}-fsq-train-bf16-"
                f"{'ckpt' if self.checkpointing else 'no-ckpt'}")


def training_cases(mode: str) -> list[TrainingCase]:
    """In priority order (a deadline cuts from the end)."""
    if mode == "smoke":  # tests/test_training_plan.py plans the 1.7B step; the smoke run's budget stays as it was
        return []
    video = (13, 40, 64)
    return [TrainingCase("ursa-1.7b", video, True, "one training step, 49 x 320 x 512 video (issue 18 target)",
                         measured=True),
            TrainingCase("ursa-1.7b", video, False, "one training step, no activation checkpointing"),
            TrainingCase("ursa-0.6b", video, True, "one training step, 49 x 320 x 512 video"),
            TrainingCase("ursa-0.6b", video, False, "one training step, no activation checkpointing")]


def _training_record(ctx: BenchContext, case: TrainingCase, plan) -> dict:
    shape = {"preset": case.preset, "latents": list(case.latents), "codebook": "fsq",
             "codebook_size": plan.codebook_size, "what": case.what, "batch": plan.batch, "seq_len": plan.seq_len,
             "latent_tokens": plan.latent_tokens, "dtype": plan.dtype, "prompt_len": plan.prompt_length,
             "checkpointing": plan.checkpointing, "optimizer": plan.optimizer, "master_weights": plan.master_weights}
    extra = {"planned_peak_bytes": plan.peak_bytes, "planned_peak_above_resident_bytes": plan.peak_above_resident_bytes,
             "planned_peak_phase": plan.peak_phase, "planned_peak_at": plan.peak_at,
             "phase_peak_bytes": {k: v["peak_bytes"] for k, v in plan.phases.items()},
             "phase_largest_tensor": {k: v["largest"] for k, v in plan.phases.items()},
             "peak_tensors": plan.peak_tensors[:6], "resident_bytes": plan.resident_bytes,
             "weight_bytes": plan.weight_bytes, "gradient_bytes": plan.gradient_bytes,
             "optimizer_state_bytes": plan.optimizer_state_bytes, "saved_bytes": plan.saved_bytes,
             "nk_elements": plan.nk_elements, "nk_buffers": len(plan.nk_buffers), "nk_buffer_list": plan.nk_buffers,
             "loss": plan.loss, "custom_ops": plan.custom_ops, "attention": plan.attention,
             "attention_backend": plan.attention_backend, "kv_expansion_bytes": plan.kv_expansion_bytes,
             "flops_counted": plan.flops, "forward_flops": plan.forward_flops, "granularity": plan.granularity,
             "notes": plan.notes,
             "peak_source": "plan: FakeTensorMode on the CPU + LiveBytes, backend choices as on a GPU (peak_mem = "
                            "everything live; peak_extra = above the resident weights and optimizer state); "
                            "undeclared kernel workspaces not included",
             "timing_note": "median_ms is the CPU time taken to compute the plan"}
    return ctx.record(case=case.name, provider=case.provider, shape=shape, work=Work(),
                      timing=timing_of([plan.seconds * 1e3], warmup=0), peak=plan.peak_bytes,
                      peak_extra=plan.peak_above_resident_bytes, extra=extra, targets=case.targets)


def _plan_training(case: TrainingCase):
    from ursa_engine.memory import plan_training_step

    return plan_training_step(case.preset, case.latents, dtype=torch.bfloat16, prompt_length=PROMPT_LEN,
                              checkpointing=case.checkpointing)


def _measure_training(ctx: BenchContext, case: TrainingCase, plan) -> dict:
    """gpu mode: two real steps (random weights and ids); the peak of the second above what was live before it."""
    import ursa_engine as ue
    from ursa_engine.memory.training import adamw_state, adamw_step

    def run():
        cfg = ue.ModelConfig.preset(case.preset)
        torch.cuda.empty_cache()
        model = ue.URSATransformer(cfg, dtype=torch.bfloat16, device=ctx.device)
        model.gradient_checkpointing = case.checkpointing
        net = ue.training.LatentLoss(model)
        params = [p for p in model.parameters() if p.requires_grad]
        states = adamw_state(params, master_weights=True)
        gen = ctx.generator()
        prompt = torch.randint(0, cfg.lm_vocab_size, (1, PROMPT_LEN), generator=gen, device=ctx.device)
        x_t, x1 = (torch.randint(0, cfg.lm_head_size, (1, *case.latents), generator=gen, device=ctx.device)
                   for _ in range(2))
        times = []
        for step in (1, 2):
            torch.cuda.synchronize(ctx.device)
            resident = torch.cuda.memory_allocated(ctx.device)
            torch.cuda.reset_peak_memory_stats(ctx.device)
            t0 = time.perf_counter()
            net(prompt, x_t, x1).backward()
            adamw_step(params, states, step=step)
            for p in params:
                p.grad = None
            torch.cuda.synchronize(ctx.device)
            times.append(1e3 * (time.perf_counter() - t0))
        peak = torch.cuda.max_memory_allocated(ctx.device)
        del model, net, params, states
        gc.collect()
        return {"timing": timing_of(times[1:], warmup=0), "peak": peak, "peak_extra": peak - resident,
                "extra": {"planned_peak_bytes": plan.peak_bytes,
                          "planned_peak_above_resident_bytes": plan.peak_above_resident_bytes,
                          "measured_over_planned": (peak - resident) / plan.peak_above_resident_bytes,
                          "loss": plan.loss,
                          "peak_source": "torch.cuda.max_memory_allocated over the second step (forward, backward, "
                                         "adamw_step, grads dropped); peak_extra = that minus memory_allocated "
                                         "before it (weights, optimizer state, inputs)",
                          "timing_note": "median_ms is the second step's time (eager)"}}

    return ctx.attempt(run, case=case.name, provider="measured-training", work=Work(),
                       shape={"preset": case.preset, "latents": list(case.latents),
                              "checkpointing": case.checkpointing}, targets={}, margin_s=60.0)


def run(ctx: BenchContext, *, only: tuple[str, ...] | None = None) -> None:
    for case in [*cases(ctx.mode), *training_cases(ctx.mode)]:
        if only and case.name not in only:
            continue
        if ctx.deadline.expired(margin=30.0):
            ctx.skip(case=case.name, provider=case.provider, shape={"preset": case.preset}, work=Work(),
                     reason="global time budget exhausted")
            continue
        training = isinstance(case, TrainingCase)
        try:
            plan = _plan_training(case) if training else _plan(case)
        except Exception as err:  # noqa: BLE001 - every failure is a record
            ctx.skip(case=case.name, provider=case.provider, shape={"preset": case.preset}, work=Work(),
                     status="error", reason=f"{type(err).__name__}: {err}")
            continue
        (_training_record if training else _plan_record)(ctx, case, plan)
        if case.measured and ctx.mode == "gpu" and ctx.device.type == "cuda":
            if training:
                _measure_training(ctx, case, plan)
            else:
                _measure(ctx, case)
