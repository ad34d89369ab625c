"""Planned peak memory (and FLOPs) of a tokenizer's decode / encode at any size, computed on a CPU.

The tokenizer is built and run under ``FakeTensorMode`` (no weight, activation or output is
allocated) through its public ``decode`` / ``encode`` — the same batch loop, chunking and tiling
as a real call — with :class:`~.tracker.LiveBytes` counting live storages and
``torch.utils.flop_counter.FlopCounterMode`` counting FLOPs (convolutions, matmuls, attention).
Only the input checks are skipped: they read values (``ids.min()``), which fake tensors do not have.

``peak_bytes`` is what ``torch.cuda.max_memory_allocated() − memory_allocated()`` would show
around the call on a GPU (weights and the input already resident), minus kernel workspaces;
``attention="fused"`` models flash / memory-efficient attention (no score matrix),
``"math"`` the math fallback (fp32 scores).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .tracker import CUDA_GRANULARITY, LiveBytes

ATTENTION = ("fused", "math")


def _cpu_flash_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # FlopCounterMode knows the CUDA attention kernels but not the CPU one a fake CPU run picks
    return sdpa_flop_count(query_shape, key_shape, value_shape)


CUSTOM_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flops}


@dataclass
class Plan:
    """What one planned call needs (bytes above the resident weights and input; FLOPs)."""

    what: str  # "decode" or "encode"
    family: str  # the tokenizer class
    input_shape: list[int]
    output_shape: list[int]
    dtype: str
    chunk_frames: int  # frames per chunk the call used (0: plain)
    attention: str
    peak_bytes: int
    peak_phase: str
    peak_module: str | None
    peak_op: str | None
    peak_tensors: list[dict]
    output_bytes: int
    input_bytes: int
    weight_bytes: int  # every parameter of the tokenizer
    allocated_bytes: int  # every storage created (written at least once)
    flops: int | None
    flops_by_op: dict = field(default_factory=dict)
    granularity: int = CUDA_GRANULARITY
    seconds: float = 0.0  # time taken to compute this plan

    def to_dict(self) -> dict:
        return asdict(self)


def plan_decode(cls, config: dict | None, ids_shape, *, dtype: torch.dtype = torch.bfloat16,
                chunk_frames: int | None = None, memory_budget: int | None = None, attention: str = "fused",
                count_flops: bool = True, granularity: int = CUDA_GRANULARITY) -> Plan:
    """Plan ``cls(config).to(dtype).decode(ids, chunk_frames=..., memory_budget=...)``.

    Parameters
    ----------
    cls : a tokenizer class (:class:`ursa_engine.vae.CosmosFSQTokenizer`, :class:`~ursa_engine.vae.IBQTokenizer`)
    config : its config dict (None: the class defaults)
    ids_shape : (B, T, h, w) code grid, e.g. (1, 13, 40, 64) for 49 × 320 × 512 pixels
    chunk_frames, memory_budget : as in ``Tokenizer.decode`` (None, None: the default budget)
    attention : ``"fused"`` (flash / memory-efficient kernels) or ``"math"`` (score matrix in fp32)
    """
    def make_input(tok):
        return torch.zeros(tuple(ids_shape), dtype=torch.long)

    def call(tok, ids):
        return tok.decode(ids, chunk_frames=chunk_frames, memory_budget=memory_budget)

    def chunk_of(tok, ids):
        return tok.chunk_frames(*ids.shape[-2:], memory_budget) if chunk_frames is None else chunk_frames

    return _plan("decode", cls, config, dtype, make_input, call, chunk_of, attention, count_flops, granularity)


def plan_encode(cls, config: dict | None, pixels_shape, *, dtype: torch.dtype = torch.bfloat16,
                chunk_frames: int | None = None, memory_budget: int | None = None, attention: str = "fused",
                count_flops: bool = True, granularity: int = CUDA_GRANULARITY) -> Plan:
    """Plan ``cls(config).to(dtype).encode(pixels, ...)`` for pixels of shape (B, 3, F, H, W) in ``dtype``."""
    def make_input(tok):
        return torch.zeros(tuple(pixels_shape), dtype=dtype)

    def call(tok, pixels):
        return tok.encode(pixels, chunk_frames=chunk_frames, memory_budget=memory_budget)

    def chunk_of(tok, pixels):
        s = tok.spatial_stride
        return tok.chunk_frames(pixels.shape[-2] // s, pixels.shape[-1] // s, memory_budget) \
            if chunk_frames is None else chunk_frames

    return _plan("encode", cls, config, dtype, make_input, call, chunk_of, attention, count_flops, granularity)


def _plan(what, cls, config, dtype, make_input, call, chunk_of, attention, count_flops, granularity) -> Plan:
    if attention not in ATTENTION:
        raise ValueError(f"attention: expected one of {ATTENTION}, got {attention!r}")
    t0 = time.perf_counter()
    with torch.device("meta"):  # built on meta (.to(dtype) cannot swap fake parameters), then made fake
        tok = cls(config).to(dtype).eval()
    with FakeTensorMode():
        tok._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device="cpu"))
        # the checks read values (min / max / isfinite), which fake tensors do not have
        tok._check_ids = lambda ids: ids
        tok._check_pixels = lambda pixels: pixels
        x = make_input(tok)
        counter = FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS) if count_flops else None
        mem = LiveBytes(granularity=granularity)
        backend = sdpa_kernel(SDPBackend.MATH) if attention == "math" else contextlib.nullcontext()
        with warnings.catch_warnings(), backend, counter or contextlib.nullcontext():
            warnings.simplefilter("ignore")  # latent frames left out by the authors' tiling: the caller knows
            with mem, mem.track_modules(tok), mem.phase(what):
                out = call(tok, x)
        plan = Plan(
            what=what, family=type(tok).__name__, input_shape=list(x.shape), output_shape=list(out.shape),
            dtype=str(dtype).replace("torch.", ""), chunk_frames=int(chunk_of(tok, x)), attention=attention,
            peak_bytes=mem.peak, peak_phase=mem.peak_at["phase"], peak_module=mem.peak_at["module"],
            peak_op=mem.peak_at["op"], peak_tensors=mem.peak_tensors, output_bytes=_nbytes(out),
            input_bytes=_nbytes(x), weight_bytes=sum(_nbytes(p) for p in tok.parameters()),
            allocated_bytes=mem.allocated, flops=counter.get_total_flops() if counter else None,
            flops_by_op={str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
            if counter else {}, granularity=granularity)
    plan.seconds = time.perf_counter() - t0
    return plan


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
