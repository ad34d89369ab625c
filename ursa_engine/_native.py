"""The native backend: C++ (OpenMP) and CUDA sampler ops from ``csrc/`` (DESIGN §2.3-2.5, §5).

Same ops and signatures as :mod:`ursa_engine.reference.sampler`; this wrapper checks shapes,
dtypes and devices (the kernels get raw pointers: a wrong size here would be memory
corruption there), then calls ``ursa_engine._native_cpu`` or ``ursa_engine._native_cuda``,
both loaded on first use.

What the kernels do (csrc/cpu/kernels.h, csrc/cuda/sampler.cu):

* x̂1 ~ softmax(z) with z = (u + s·(c − u)) / T read once from bf16 / fp16 / fp32 logits,
  streamed block by block (max and Σ exp per block), then the block crossing u·W is rescanned
  alone: no D×K buffer. float32 math, float64 block-level sums.
* metric step: tokens with x̂1 = z0 skip the codebook; others sum Z = Σ exp(−βd) and the rates
  per block of codes, decide the jump, and draw the destination from the block sums plus one
  rescanned block. FSQ codebooks (``levels``) rebuild ê from the index instead of reading the
  table (used only when the table is exactly ``Codebook.fsq(levels).normalized``).
* mixture / mask steps draw x̂1 only for tokens whose result depends on it.
* top-k / top-p: the filtered logits are computed with the reference's ``guided_logits`` in
  row chunks (exact same kept set), then sampled by the kernel.

Randomness: the §2.5 contract through ``csrc/include/ursa/philox.h`` (same lanes and tags as
the reference), so a seed gives the same tokens as the torch reference up to float ties.
"""

from __future__ import annotations

import functools
import importlib
import math
import weakref

import torch

from .reference.sampler import guided_logits

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_FILTER_CHUNK_ELEMS = 1 << 24  # rows × K per float64 chunk of the top-k / top-p prefilter


# ----------------------------------------------------------------------------- loading
@functools.cache
def _load(kind: str):
    """The compiled module for ``kind`` ("cpu" / "cuda"), or the ImportError text."""
    try:
        return importlib.import_module(f"ursa_engine._native_{kind}"), None
    except ImportError as err:
        return None, str(err)


@functools.cache
def _cuda_device_count() -> int:
    return _load("cuda")[0].device_count()


def build_info() -> dict:
    """What the build produced: ``{"cuda": bool, "cuda_note": str, "isas": "base,avx2,..."}``."""
    mod, err = _load("cpu")
    if mod is None:
        raise ImportError(f"the native extension is not built ({err}); run `pip install -e .`")
    return dict(mod.build_info)


def unavailable(device) -> str | None:
    """Why the native backend cannot run on ``device`` (None: it can)."""
    device = torch.device(device)
    if device.type == "cpu":
        mod, err = _load("cpu")
        return None if mod is not None else f"native CPU extension not built ({err}); run `pip install -e .`"
    if device.type == "cuda":
        mod, err = _load("cuda")
        if mod is None:
            cpu, _ = _load("cpu")
            note = cpu.build_info["cuda_note"] if cpu is not None else err
            return f"native CUDA module not built ({note})"
        if _cuda_device_count() == 0:
            return "the native CUDA module sees no CUDA device"
        return None
    return f"native backend runs on cpu and cuda, not {device.type}"


def unsupported(op: str, **options) -> str | None:
    """Every op and option is supported (top-k / top-p through the prefilter)."""
    return None


def _module(device: torch.device):
    reason = unavailable(device)
    if reason is not None:
        raise RuntimeError(f"backend='native': {reason}")
    return _load(device.type)[0]


# ----------------------------------------------------------------------------- argument checks
def _device_of(x: torch.Tensor, **tensors) -> torch.device:
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: on {t.device}, expected {x.device} like the tokens")
    return x.device


def _tokens(name: str, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.int64:
        raise TypeError(f"{name}: expected an int64 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    return x.reshape(-1).contiguous()


def _logits(name: str, z: torch.Tensor | None, D: int, K: int | None) -> torch.Tensor | None:
    if z is None:
        return None
    if z.dim() != 2 or z.shape[0] != D or (K is not None and z.shape[1] != K):
        raise ValueError(f"{name}: expected shape ({D}, {K if K is not None else 'K'}), got {tuple(z.shape)}")
    if z.dtype not in _DTYPES:
        z = z.to(torch.float32)
    if z.stride(1) != 1 or z.stride(0) < z.shape[1]:
        z = z.contiguous()
    return z


def _seeds(seeds: torch.Tensor, row_len: int, D: int, device) -> torch.Tensor:
    seeds = seeds.to(device=device, dtype=torch.int64).reshape(-1).contiguous()
    if seeds.numel() == 0:
        raise ValueError("seeds: empty")
    if seeds.numel() > 1 and seeds.numel() * max(row_len, 1) < D:
        raise ValueError(f"seeds: {seeds.numel()} rows of {row_len} tokens do not cover {D} tokens")
    return seeds


def _out(out: torch.Tensor | None, D: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(buffer the kernel writes, tensor to copy it into afterwards or None)."""
    if out is None:
        return torch.empty(D, dtype=torch.int64, device=device), None
    if out.numel() != D or out.device != device:
        raise ValueError(f"out: expected {D} elements on {device}, got {out.numel()} on {out.device}")
    if out.dtype == torch.int64 and out.is_contiguous():
        return out.view(-1), None
    return torch.empty(D, dtype=torch.int64, device=device), out


def _finish(buf: torch.Tensor, target: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor:
    if target is not None:
        target.copy_(buf.view(target.shape))
        return target
    return out if out is not None else buf


@functools.cache
def _fsq_reference(levels: tuple[int, ...], device: str) -> torch.Tensor:
    from .codebook import Codebook

    return Codebook.fsq(levels).normalized.to(device)


_FSQ_VERIFIED: dict = {}


def _codes(table: torch.Tensor, K: int, levels, device) -> tuple[torch.Tensor, list[int]]:
    """The float32 (K, m) table and the FSQ levels to rebuild codes from (empty: read the table).

    ``levels`` is an optimization only: it is used when the table is exactly the normalized FSQ
    table of those levels (checked once per table version), else the table is read.
    """
    if table.dim() != 2 or table.shape[0] != K:
        raise ValueError(f"table: expected shape ({K}, m), got {tuple(table.shape)}")
    table = table.to(device=device, dtype=torch.float32).contiguous()
    if not levels:
        return table, []
    levels = tuple(int(v) for v in levels)
    # Verified once per (tensor object, version): a weak reference proves it is the same tensor
    # (an address can be reused by a new tensor), so later calls neither compare nor sync.
    seen = _FSQ_VERIFIED.get(id(table))
    if seen is not None and seen[0]() is table and seen[1:3] == (table._version, levels):
        ok = seen[3]
    else:
        ok = (len(levels) == table.shape[1] and math.prod(levels) == K and len(levels) <= 16
              and torch.equal(table, _fsq_reference(levels, str(device))))
        if len(_FSQ_VERIFIED) > 64:
            _FSQ_VERIFIED.clear()
        _FSQ_VERIFIED[id(table)] = (weakref.ref(table), table._version, levels, ok)
    return table, list(levels) if ok else []


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def _threads(device: torch.device) -> int:
    return torch.get_num_threads() if device.type == "cpu" else 0


def _prefiltered(cond, uncond, *, guidance_scale, temperature, top_k, top_p, exclude=None):
    """float32 z after guidance, temperature and top-k / top-p, by the reference (row chunks).

    Known cost: this materializes one (D, K) float32 buffer (the size of fp32 logits) before the
    kernel samples from it; only the unfiltered path reads the logits once with nothing D×K.
    """
    D, K = cond.shape
    z = torch.empty(D, K, dtype=torch.float32, device=cond.device)
    rows = max(1, _FILTER_CHUNK_ELEMS // max(K, 1))
    for r0 in range(0, D, rows):
        sl = slice(r0, min(D, r0 + rows))
        z[sl] = guided_logits(cond[sl], None if uncond is None else uncond[sl], guidance_scale=guidance_scale,
                              temperature=temperature, top_k=top_k, top_p=top_p, exclude=exclude)
    return z


def _step_call(mod_fn, cond, uncond, x, params, step, *, seeds, row_len, guidance_scale, temperature, top_k,
               top_p, last, argmax_last, out, exclude=None, **extra):
    x_flat = _tokens("x", x)
    D = x_flat.numel()
    device = _device_of(x_flat, cond=cond, uncond=uncond, params=params)
    mod = _module(device)
    K = cond.shape[-1]
    cond = _logits("cond", cond.reshape(D, K) if cond.dim() != 2 else cond, D, K)
    uncond = _logits("uncond", None if uncond is None else (uncond.reshape(D, K) if uncond.dim() != 2 else uncond),
                     D, K)
    if uncond is not None and uncond.dtype != cond.dtype:
        cond, uncond = cond.float(), uncond.float()
    if top_k or top_p < 1.0:
        cond = _prefiltered(cond, uncond, guidance_scale=guidance_scale, temperature=temperature, top_k=top_k,
                            top_p=top_p, exclude=exclude)
        uncond, guidance_scale, temperature = None, 1.0, 1.0
    params = params.to(device=device, dtype=torch.float32).reshape(-1).contiguous()
    if params.numel() < 4:
        raise ValueError(f"params: expected 4 step values, got {params.numel()}")
    if not isinstance(step, torch.Tensor):
        step = torch.tensor([int(step)], dtype=torch.int64, device=device)
    step = step.to(device=device, dtype=torch.int64).reshape(-1).contiguous()
    seeds = _seeds(seeds, row_len, D, device)
    buf, target = _out(out, D, device)
    with torch.cuda.device(device) if device.type == "cuda" else _nullcontext():
        getattr(mod, mod_fn)(
            cond=cond.data_ptr(), uncond=0 if uncond is None else uncond.data_ptr(), dtype=_DTYPES[cond.dtype],
            cond_stride=cond.stride(0), uncond_stride=0 if uncond is None else uncond.stride(0),
            scale=float(guidance_scale), temperature=float(temperature),
            exclude=-1 if exclude is None or not 0 <= exclude < K else int(exclude),
            x=x_flat.data_ptr(), out=buf.data_ptr(), D=D, K=K, params=params.data_ptr(), seeds=seeds.data_ptr(),
            n_seeds=seeds.numel(), row_len=int(row_len), step=step.data_ptr(), last=bool(last),
            argmax_last=bool(argmax_last), n_threads=_threads(device), stream=_stream(device), **extra)
    return _finish(buf, target, out)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _path_call(mod_fn, x1, value, *, seeds, row_len, out, K, **extra):
    x1_flat = _tokens("x1", x1)
    D = x1_flat.numel()
    device = _device_of(x1_flat, value=value)
    mod = _module(device)
    value = value.to(device=device, dtype=torch.float32).reshape(-1).contiguous()
    if value.numel() != D:
        raise ValueError(f"per-token values: expected {D}, got {value.numel()}")
    seeds = _seeds(seeds, row_len, D, device)
    buf, target = _out(out, D, device)
    with torch.cuda.device(device) if device.type == "cuda" else _nullcontext():
        getattr(mod, mod_fn)(x1=x1_flat.data_ptr(), value=value.data_ptr(), out=buf.data_ptr(), D=D, K=int(K),
                             seeds=seeds.data_ptr(), n_seeds=seeds.numel(), row_len=int(row_len),
                             n_threads=_threads(device), stream=_stream(device), **extra)
    return _finish(buf, target, out)


# ----------------------------------------------------------------------------- path sampling
def metric_sample(x1, beta, table, *, power=2, levels=None, seeds, row_len, out=None):
    """x_t ~ softmax(−β_i·d(·, x1_i)) per token (§2.3); β = ∞ returns x1. RNG: TAG_PATH, lane 0."""
    K = table.shape[0]
    table, lv = _codes(table, K, levels, x1.device)
    return _path_call("metric_sample", x1, beta, seeds=seeds, row_len=row_len, out=out, K=K,
                      table=table.data_ptr(), m=table.shape[1], levels=lv, power=int(power))


def mixture_sample(x1, keep, *, K, seeds, row_len, out=None):
    """x_t = x1 with probability κ_i (lane 1), else uniform over [0, K) (lane 2)."""
    return _path_call("mixture_sample", x1, keep, seeds=seeds, row_len=row_len, out=out, K=K)


def mask_sample(x1, keep, *, mask_id, seeds, row_len, out=None):
    """x_t = x1 with probability κ_i (lane 1), else the mask id."""
    return _path_call("mask_sample", x1, keep, seeds=seeds, row_len=row_len, out=out, K=0, mask_id=int(mask_id))


# ----------------------------------------------------------------------------- sampler steps
def metric_step(cond, uncond, x, table, params, step, *, seeds, row_len, guidance_scale=1.0, temperature=1.0,
                top_k=0, top_p=1.0, power=2, levels=None, last=False, argmax_last=False, out=None):
    """One metric-path Euler step (§2.4). RNG: TAG_STEP; lanes 0 x̂1, 1 jump, 2 destination."""
    K = cond.shape[-1]
    table, lv = _codes(table, K, levels, x.device)
    return _step_call("metric_step", cond, uncond, x, params, step, seeds=seeds, row_len=row_len,
                      guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p, last=last,
                      argmax_last=argmax_last, out=out, table=table.data_ptr(), m=table.shape[1], levels=lv,
                      power=int(power))


def mixture_step(cond, uncond, x, params, step, *, seeds, row_len, guidance_scale=1.0, temperature=1.0, top_k=0,
                 top_p=1.0, last=False, argmax_last=False, out=None):
    """Mixture-path step (§2.4): jump to x̂1 with probability 1 − exp(−h·κ̇/(1−κ))."""
    return _step_call("mixture_step", cond, uncond, x, params, step, seeds=seeds, row_len=row_len,
                      guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p, last=last,
                      argmax_last=argmax_last, out=out)


def mask_step(cond, uncond, x, params, step, *, mask_id, seeds, row_len, guidance_scale=1.0, temperature=1.0,
              top_k=0, top_p=1.0, last=False, argmax_last=False, out=None):
    """Masked-path step (§2.4): a masked token becomes x̂1 (never the mask) w.p. min(1, h·κ̇/(1−κ))."""
    return _step_call("mask_step", cond, uncond, x, params, step, seeds=seeds, row_len=row_len,
                      guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p, last=last,
                      argmax_last=argmax_last, out=out, exclude=int(mask_id), mask_id=int(mask_id))
