"""URSA's tokenizers: decode / encode time and peak memory, measured and planned (``ursa_engine.vae``).

Real sizes (DESIGN §3): the video tokenizer with the authors' architecture (``CosmosFSQTokenizer()``,
K = 64,000, strides 4 × 8 × 8, random weights) decoding 13 × 40 × 64 codes (49 × 320 × 512 pixels)
and encoding 49 × 320 × 512 pixels, at the class default ``sample_frames = 17`` (the authors'
temporal tiling: 13 latent frames decode to 33 frames, latent frames 10-12 are left out; 49 frames
encode to 3 overlapping tiles = 15 latent frames) and at ``sample_frames = 49`` (one tile: 13 ↔ 49);
the image tokenizer at IBQ1024 size (:data:`IBQ1024`, K = 131,072, m = 256, stride 16) decoding
64 × 64 codes to 1024² and encoding it back.

Providers, default first:

- ``chunked``: ``decode(ids)`` / ``encode(pixels)`` as users call them (the default memory budget);
- ``plain``: ``chunk_frames=0``, the whole clip per layer;
- ``plan-chunked`` / ``plan-plain``: the same calls run under ``FakeTensorMode`` on the CPU
  (:mod:`ursa_engine.memory`): planned peak bytes with no GPU (every mode; the row's time is the
  time taken to plan; fp16 reuses the bf16 plan: the same bytes). On a GPU the measured rows carry the
  plan side by side (``planned_peak_extra_bytes``, ``measured_over_planned``). Real sizes in cpu mode add
  ``plan-chunk1`` (one frame per chunk: the least chunking can reach) and, on ``plan-plain``,
  ``planned_peak_math_attention_bytes`` (SDPA's math fallback: fp32 score matrices).

Work: FLOPs of the call (convolutions, matmuls, attention; ``FlopCounterMode`` in the fake run) and
the least bytes (the weights the call uses, its input and output); floor = max(FLOPs / the measured
matmul rate, bytes / the measured copy rate). Peak memory: ``peak_extra_bytes`` is the CUDA
allocator's peak above what was allocated before the call (weights and input resident);
``tracked_peak_extra_bytes`` the live tensor bytes of the same call seen by ``LiveBytes`` on the
real tensors (every device; on the CPU the only figure) — equal to the plan when the fake run picks
the same kernels, which the smoke test checks.

Modes: ``gpu`` times the real sizes (bf16 first, then fp16) and plans them; ``cpu`` times the
authors' video architecture on one tile, 5 × 8 × 8 codes (17 × 64 × 64 pixels), and small configs; ``smoke``
times tiny configs (seconds). Every mode plans the real sizes in bf16 (cpu: decodes and encodes;
smoke: decodes), seconds each on a CPU.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field

import torch

from .harness import Work, measure, peak_memory, synchronize, timing_of
from .records import BenchContext

NAME = "vae"

# IBQ1024 (URSA's high-resolution image tokenizer). Known (DESIGN §2.1, §3; the paper): stride 16
# (5 levels), K = 131,072, m = 256. Assumed: latent_channels = 256 (= m); layers_per_block 2, no
# attention in the deepest down / first up block, no decoder_dtype: the authors' class defaults.
IBQ1024 = {"block_out_channels": [128, 128, 256, 256, 512], "num_vq_embeddings": 131072, "vq_embed_dim": 256,
           "latent_channels": 256}
IBQ1024_NOTE = ("block_out_channels / K / m from the paper and docs/design.md §2.1 (stride 16, K = 131,072, m = 256); "
                "latent_channels = 256 assumed; layers_per_block = 2, attn_down_block = attn_up_block = False, "
                "decoder_dtype = None are the authors' class defaults (the published vae/config.json was not "
                "available)")
COSMOS_NOTE = "the authors' class defaults (AutoencoderVQCosmos3D), random weights"
# tiny configs (tests/roots.py has the same): video K = 64, stride 4 x 8 x 8; image K = 100, stride 4
COSMOS_TINY = {"block_out_channels": [8, 16, 16], "layers_per_block": 1, "latent_channels": 4, "sample_frames": 9,
               "fsq_levels": [4, 4, 4], "num_vq_embeddings": 64, "vq_embed_dim": 3}
IBQ_TINY = {"block_out_channels": [32, 32, 64], "layers_per_block": 1, "latent_channels": 4,
            "num_vq_embeddings": 100, "vq_embed_dim": 8, "spatial_stride": 4}
COSMOS_SMALL = {**COSMOS_TINY, "block_out_channels": [32, 64, 64], "layers_per_block": 2}

MEASURED = ("chunked", "plain")  # the default (what users call) first
# planned only: one frame per chunk, the least memory chunking can reach (real sizes, cpu mode)
CHUNK_ONE = "chunk1"


@dataclass
class Case:
    """One call: ``family`` ("cosmos" / "ibq") ``op`` ("decode" / "encode") on ``shape``: ids (B, T, h, w)
    for a decode, pixels (B, 3, F, H, W) for an encode."""

    label: str  # config label in the case name
    family: str
    config: dict
    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    timed: bool  # measured here (else planned only)
    note: str = ""
    real: bool = False  # a real size (planned as a GPU allocates; cpu mode adds the chunk1 and math plans)
    warmup: int = 2
    min_reps: int = 3
    targets: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        grid = "x".join(map(str, self.shape[1:] if self.op == "decode" else self.shape[2:]))
        return f"{self.label}-{self.op}-{grid}-{_dtype_name(self.dtype)}"


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def real_cases(dtype: torch.dtype, timed: bool) -> list[Case]:
    """The real sizes, decodes first (the call every generation makes)."""
    video, image = (1, 13, 40, 64), (1, 1, 64, 64)
    clip, picture = (1, 3, 49, 320, 512), (1, 3, 1, 1024, 1024)
    sf49, note49 = {"sample_frames": 49}, COSMOS_NOTE + ", sample_frames = 49"
    return [
        Case("cosmos", "cosmos", {}, "decode", video, dtype, timed, COSMOS_NOTE, real=True),
        Case("cosmos-sf49", "cosmos", sf49, "decode", video, dtype, timed, note49, real=True),
        Case("ibq1024", "ibq", IBQ1024, "decode", image, dtype, timed, IBQ1024_NOTE, real=True),
        Case("cosmos", "cosmos", {}, "encode", clip, dtype, timed, COSMOS_NOTE, real=True),
        Case("cosmos-sf49", "cosmos", sf49, "encode", clip, dtype, timed, note49, real=True),
        Case("ibq1024", "ibq", IBQ1024, "encode", picture, dtype, timed, IBQ1024_NOTE, real=True),
    ]


def cases(mode: str) -> list[Case]:
    """In priority order: the suite's deadline cuts from the end."""
    if mode == "gpu":
        return real_cases(torch.bfloat16, True) + real_cases(torch.float16, True)
    f32 = torch.float32
    if mode == "cpu":
        small = [
            # one whole tile of the authors' video tokenizer: 5 latent frames <-> 17 frames of 64 x 64
            Case("cosmos", "cosmos", {}, "decode", (1, 5, 8, 8), f32, True, COSMOS_NOTE, warmup=1, min_reps=2),
            Case("cosmos", "cosmos", {}, "encode", (1, 3, 17, 64, 64), f32, True, COSMOS_NOTE, warmup=1, min_reps=2),
            Case("cosmos-small", "cosmos", COSMOS_SMALL, "decode", (1, 3, 16, 16), f32, True),
            Case("ibq-tiny", "ibq", IBQ_TINY, "decode", (1, 4, 32, 32), f32, True),
            Case("ibq-tiny", "ibq", IBQ_TINY, "encode", (1, 3, 4, 128, 128), f32, True),
        ]
    else:
        quick = {"warmup": 1, "min_reps": 2}
        small = [
            Case("cosmos-tiny", "cosmos", COSMOS_TINY, "decode", (1, 3, 4, 4), f32, True, **quick),
            Case("cosmos-tiny", "cosmos", COSMOS_TINY, "encode", (1, 3, 9, 32, 32), f32, True, **quick),
            Case("ibq-tiny", "ibq", IBQ_TINY, "decode", (1, 2, 8, 12), f32, True, **quick),
            Case("ibq-tiny", "ibq", IBQ_TINY, "encode", (1, 3, 2, 32, 48), f32, True, **quick),
        ]
    planned = real_cases(torch.bfloat16, False)  # seconds each on a CPU; smoke mode plans the decodes only
    return small + (planned if mode == "cpu" else [c for c in planned if c.op == "decode"])


# ----------------------------------------------------------------------------- helpers
def _family(name: str):
    from ursa_engine.vae import CosmosFSQTokenizer, IBQTokenizer

    return {"cosmos": CosmosFSQTokenizer, "ibq": IBQTokenizer}[name]


def _used_weight_bytes(tok, op: str) -> int:
    """Bytes of the weights one call reads: its half of the network, its 1×1 conv and the code table."""
    parts = (tok.decoder, tok.post_quant_conv) if op == "decode" else (tok.encoder, tok.quant_conv)
    params = [p for m in (*parts, tok.quantizer) for p in m.parameters()]
    return sum(p.numel() * p.element_size() for p in params)


def _describe(case: Case, tok) -> dict:
    """The shape dict of a record: grid, pixels, frames (with the authors' tiling), dtype, config."""
    out = {"family": type(tok).__name__, "op": case.op, "dtype": _dtype_name(case.dtype), "config": case.label,
           "config_overrides": case.config if case.label.endswith(("tiny", "small")) else
           {k: v for k, v in case.config.items() if k == "sample_frames"}}
    if case.op == "decode":
        B, T, h, w = case.shape
        F = tok.num_frames(T)
        out.update(batch=B, latents=[T, h, w], tokens=T * h * w, num_frames=F,
                   pixels=[F, h * tok.spatial_stride, w * tok.spatial_stride])
    else:
        B, _, F, H, W = case.shape
        nominal = list(tok.latent_shape(F, H, W))
        T = tok.encoded_frames(F)
        out.update(batch=B, pixels=[F, H, W], num_frames=F, latents=[T, *nominal[1:]], latents_nominal=nominal)
        if T != nominal[0]:
            out["tiling_note"] = (f"sample_frames={tok.sample_frames}: the authors' tiling encodes {F} frames in "
                                  f"overlapping tiles, {T} latent frames (not {nominal[0]})")
    if hasattr(tok, "sample_frames"):
        out["sample_frames"] = tok.sample_frames
        if case.op == "decode" and out["num_frames"] < (case.shape[1] - 1) * tok.temporal_stride + 1:
            out["tiling_note"] = (f"sample_frames={tok.sample_frames}: the authors' tiling decodes "
                                  f"{case.shape[1]} latent frames to {out['num_frames']} pixel frames "
                                  "(a trailing partial tile is left out)")
    if case.note:
        out["config_note"] = case.note
    return out


_PLANS: dict[tuple, object] = {}  # plans by what decides their bytes: a fp16 plan is the bf16 one


def _plan(case: Case, provider: str, granularity: int):
    from ursa_engine.memory import plan_decode, plan_encode

    itemsize = torch.empty((), dtype=case.dtype).element_size()
    key = (case.family, repr(sorted(case.config.items())), case.op, case.shape, itemsize, provider, granularity)
    if key not in _PLANS:
        fn = plan_decode if case.op == "decode" else plan_encode
        chunk = {"plain": 0, "chunked": None, CHUNK_ONE: 1}[provider]
        _PLANS[key] = fn(_family(case.family), case.config, case.shape, dtype=case.dtype, chunk_frames=chunk,
                         granularity=granularity, count_flops=provider != CHUNK_ONE)
    plan = _PLANS[key]
    return dataclasses.replace(plan, dtype=str(case.dtype).replace("torch.", ""))


def _math_attention_peak(case: Case, granularity: int) -> int | None:
    from ursa_engine.memory import plan_decode, plan_encode

    fn = plan_decode if case.op == "decode" else plan_encode
    try:
        return fn(_family(case.family), case.config, case.shape, dtype=case.dtype, chunk_frames=0,
                  attention="math", count_flops=False, granularity=granularity).peak_bytes
    except Exception:  # noqa: BLE001 - a side figure; the main plan row reports real failures
        return None


def _build(case: Case, device: torch.device):
    with torch.device(device):  # random init on the device itself (no host copy)
        tok = _family(case.family)(case.config)
    return tok.to(case.dtype).eval()


def _input(ctx: BenchContext, case: Case, tok) -> torch.Tensor:
    gen = ctx.generator()
    if case.op == "decode":
        return torch.randint(0, tok.codebook_size, case.shape, generator=gen, device=ctx.device)
    x = torch.rand(case.shape, generator=gen, device=ctx.device, dtype=torch.float32)
    return x.mul_(2).sub_(1).to(case.dtype)  # uniform pixels in [-1, 1]


# ----------------------------------------------------------------------------- records
def _measure(ctx: BenchContext, case: Case, provider: str, tok, x, plan, shape: dict) -> dict:
    from ursa_engine.memory import CUDA_GRANULARITY, LiveBytes

    call = tok.decode if case.op == "decode" else tok.encode
    kwargs = {"chunk_frames": 0} if provider == "plain" else {}
    cuda = ctx.device.type == "cuda"

    def fn(i):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the authors' tiling leaving frames out: said in the shape
            return call(x, **kwargs)

    work = Work(flops=float(plan.flops) if plan and plan.flops else 0.0,
                bytes=float(_used_weight_bytes(tok, case.op) + _nbytes(x) + (plan.output_bytes if plan else 0)),
                tokens=float(math.prod(case.shape) if case.op == "decode" else 0))  # codes decoded

    def run():
        budget = max(0.05, min(ctx.case_budget_s, ctx.deadline.left() / 4))
        timing = measure(fn, ctx.device, warmup=case.warmup, reps=25, min_reps=case.min_reps, budget_s=budget)
        peak, peak_extra = peak_memory(fn, ctx.device)
        synchronize(ctx.device)
        with LiveBytes(granularity=CUDA_GRANULARITY if cuda else 1) as mem:
            out = fn(0)
            synchronize(ctx.device)
        extra = {"tracked_peak_extra_bytes": mem.peak, "tracked_peak_module": mem.peak_at["module"],
                 "output_shape": list(out.shape), "chunk_frames": plan.chunk_frames if plan else None,
                 "peak_source": "CUDA allocator (peak_*), LiveBytes on the real tensors (tracked_*)" if cuda
                 else "LiveBytes on the real tensors (tracked_*); no allocator statistics on the CPU"}
        if plan is not None:
            extra.update(planned_peak_extra_bytes=plan.peak_bytes, planned_peak_module=plan.peak_module,
                         tracked_over_planned=mem.peak / plan.peak_bytes if plan.peak_bytes else None)
            if peak_extra is not None and plan.peak_bytes:
                extra["measured_over_planned"] = peak_extra / plan.peak_bytes
        return {"timing": timing, "peak": peak, "peak_extra": peak_extra, "extra": extra}

    return ctx.attempt(run, case=case.name, provider=provider, work=work, shape=shape, targets=case.targets,
                       margin_s=5.0)


def _plan_record(ctx: BenchContext, case: Case, provider: str, plan, error: BaseException | None,
                 shape: dict, math_peak: int | None) -> dict:
    name = f"plan-{provider}"
    if plan is None:
        return ctx.skip(case=case.name, provider=name, shape=shape, work=Work(), status="error",
                        reason=f"{type(error).__name__}: {error}")
    extra = {"planned_peak_extra_bytes": plan.peak_bytes, "planned_peak_module": plan.peak_module,
             "planned_peak_phase": plan.peak_phase, "planned_peak_op": plan.peak_op,
             "planned_peak_tensors": plan.peak_tensors[:6], "chunk_frames": plan.chunk_frames,
             "attention": "fused (flash / memory-efficient: no score matrix)", "output_shape": plan.output_shape,
             "output_bytes": plan.output_bytes, "input_bytes": plan.input_bytes,
             "weight_bytes": plan.weight_bytes, "allocated_bytes": plan.allocated_bytes,
             "planned_flops": plan.flops, "granularity": plan.granularity,
             "peak_source": "plan: FakeTensorMode on the CPU + LiveBytes (peak_extra = above weights and input; "
                            "peak_mem = weights + input + peak_extra; kernel workspaces not included)",
             "timing_note": "median_ms is the CPU time taken to compute the plan"}
    if math_peak is not None:
        extra["planned_peak_math_attention_bytes"] = math_peak
    timing = timing_of([plan.seconds * 1e3], warmup=0)
    return ctx.record(case=case.name, provider=name, shape=shape, work=Work(), timing=timing,
                      peak=plan.weight_bytes + plan.input_bytes + plan.peak_bytes, peak_extra=plan.peak_bytes,
                      extra=extra)


def run(ctx: BenchContext, *, only: tuple[str, ...] | None = None) -> None:
    """Every case of the mode (``only``: case names or config labels); plans first, then timings."""
    for case in cases(ctx.mode):
        if only and case.name not in only and case.label not in only:
            continue
        providers = (*MEASURED, "plan-chunked", "plan-plain") if case.timed else ("plan-chunked", "plan-plain")
        if ctx.deadline.expired(margin=10.0):
            for provider in providers:
                ctx.skip(case=case.name, provider=provider, shape={"op": case.op}, work=Work(),
                         reason="global time budget exhausted")
            continue
        _run_case(ctx, case)


def _run_case(ctx: BenchContext, case: Case) -> None:
    from ursa_engine.memory import CUDA_GRANULARITY

    cuda = ctx.device.type == "cuda"
    # plans first: the measured rows take their FLOPs and planned peaks from them. Real sizes are
    # planned as a GPU allocates (512-byte blocks); CPU-timed cases exactly, to compare with LiveBytes.
    granularity = CUDA_GRANULARITY if cuda or case.real else 1
    plans, errors = {}, {}
    # the CPU-only analyses (one-frame chunks, math attention) in cpu mode: the GPU run has no time for them
    planned = (*MEASURED, CHUNK_ONE) if case.real and ctx.mode == "cpu" else MEASURED
    for provider in planned:
        try:
            plans[provider] = _plan(case, provider, granularity)
        except Exception as err:  # noqa: BLE001 - recorded in the plan row
            plans[provider], errors[provider] = None, err
    math_peak = _math_attention_peak(case, granularity) if case.real and ctx.mode == "cpu" else None
    with torch.device("meta"):
        shape = _describe(case, _family(case.family)(case.config))
    if case.timed:
        tok = x = None
        try:
            t0 = time.perf_counter()
            tok = _build(case, ctx.device)
            x = _input(ctx, case, tok)
            synchronize(ctx.device)
            shape["build_s"] = round(time.perf_counter() - t0, 3)
        except Exception as err:  # noqa: BLE001 - every failure is a record
            for provider in MEASURED:
                ctx.skip(case=case.name, provider=provider, shape=shape, work=Work(), status="error",
                         reason=f"{type(err).__name__}: {err}")
        if tok is not None:
            for provider in MEASURED:
                _measure(ctx, case, provider, tok, x, plans[provider], shape)
        del tok, x
        if cuda:
            torch.cuda.empty_cache()
    for provider in planned:
        _plan_record(ctx, case, provider, plans[provider], errors.get(provider), shape,
                     math_peak if provider == "plain" else None)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
