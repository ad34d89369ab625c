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
* top-k / top-p (and logits the kernels cannot read directly: another dtype, strided in K,
  cond and uncond of different dtypes): prepared in row chunks, filtered by the reference's
  ``guided_logits`` (one (rows, K) float64 buffer within ``reference.sampler.CHUNK_BYTES``, the
  reference's own budget) or converted into float32 chunk buffers, each chunk sampled by the
  kernel with the RNG index offset of its tokens: no (D, K) buffer, and exactly the tokens of one
  whole call. Chunk rows and buffers come from ``triton_kernels.workspaces.native_step_workspace``,
  which the memory plans declare (``ops_library.op_workspace``).
* ``x1=`` (x̂1 drawn elsewhere, e.g. by the fused lm_head + draw): the logits are not read.
* ``error=`` (int32 (1,) on the tokens' device): the kernels OR the ``ERR_*`` bits of
  :mod:`ursa_engine.reference.sampler` (``csrc/include/ursa/errors.h``) for what they read:
  ids of x and x1 (every token), and the raw cond / uncond logits of every row they draw x̂1
  from (all rows of the metric step; of moving / unmasking tokens for the mixture / mask
  steps; every row of a top-k / top-p chunk, checked by torch before the filter). No extra
  pass: a NaN or +inf logit poisons its block's Σ exp of the draw, an all −inf row has no
  finite max; only such a row is rescanned to classify its values. The argmax last step
  rescans every row it reads. A bad id is flagged and never used as an address.

Loading (issue 12): the CUDA module links the shared CUDA runtime (``libcudart.so.<major>``). It
resolves the copy torch already loaded (same soname), else the pip wheel's or the toolkit's
through its RUNPATH; for an editable install :func:`_load` preloads the wheel's copy found on
``sys.path`` (:mod:`ursa_engine._cudart`). When it cannot load or sees no device,
:func:`unavailable` says why (missing runtime, no driver, a driver older than the runtime, an old
static build) and what to do; :func:`cuda_report` gives the facts.

Randomness: the §2.5 contract through ``csrc/include/ursa/philox.h`` (same lanes and tags as
the reference), so a seed gives the same tokens as the torch reference up to float ties.
``index_offset`` is added to every token's index inside its row (64-bit).
"""

from __future__ import annotations

import functools
import importlib
import math
import weakref

import torch

from . import _cudart
from .reference import sampler as ref
from .triton_kernels import workspaces as _ws

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


# ----------------------------------------------------------------------------- loading
@functools.cache
def _load(kind: str):
    """The compiled module for ``kind`` ("cpu" / "cuda"), or why it cannot be imported."""
    if kind == "cuda":  # preloads the shared CUDA runtime if needed; says why not
        return _cudart.import_module("ursa_engine._native_cuda")
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


def cuda_report() -> dict:
    """What the native CUDA module and its runtime see (bring-up reports): ``loaded``, ``error``
    and the keys of :func:`ursa_engine._cudart.runtime_report`."""
    mod, err = _load("cuda")
    report = dict(loaded=mod is not None, error=err, **_cudart.runtime_report(mod))
    report["devices"] = _cuda_device_count() if mod is not None else 0
    return report


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
            if err is not None and "No module named" not in err:  # built, but it cannot load here
                return f"native CUDA module cannot load: {err}"
            return f"native CUDA module not built ({note})"
        if _cuda_device_count() == 0:
            return _cudart.no_device_reason(cuda_report())
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


def _logits(name: str, z: torch.Tensor | None, D: int, K: int) -> torch.Tensor | None:
    """(D, K) rows of logits, a view whenever one exists: the kernels read any row stride, and
    other dtypes / strides in K are converted per row chunk by the caller, never as a whole."""
    if z is None:
        return None
    if z.dim() == 0 or z.shape[-1] != K or z.numel() != D * K:
        raise ValueError(f"{name}: expected shape ({D}, {K}), got {tuple(z.shape)}")
    if z.dim() != 2:
        try:
            z = z.view(D, K)
        except RuntimeError:  # not viewable as rows: one copy
            z = z.reshape(D, K)
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


def _offset(index_offset) -> int:
    if isinstance(index_offset, bool) or not isinstance(index_offset, int) or not 0 <= index_offset < 2**62:
        raise ValueError(f"index_offset: expected an int in [0, 2^62), got {index_offset!r}")
    return index_offset


def _error_word(error: torch.Tensor | None, device) -> torch.Tensor | None:
    if error is None:
        return None
    if not isinstance(error, torch.Tensor) or error.dtype != torch.int32 or error.numel() != 1:
        raise ValueError(f"error: expected an int32 tensor of one element, got {getattr(error, 'dtype', error)!r} "
                         f"of shape {tuple(getattr(error, 'shape', ()))}")
    if error.device != device:
        raise ValueError(f"error: on {error.device}, expected {device} like the tokens")
    return error


def _row_chunks(D: int, row_len: int, n_seeds: int, rows: int):
    """Pieces ``(s, e, seed_lo, seed_hi, row_len, offset)`` of at most ``rows`` tokens covering [0, D).

    Each piece is whole RNG rows or part of one row, so that the call on tokens [s, e) with
    ``seeds[seed_lo:seed_hi]`` (all of them for a single seed), that ``row_len`` and
    ``index_offset + offset`` draws the words of those tokens in the whole call (§2.5).
    """
    L = max(int(row_len), 1)
    if L <= rows:  # whole rows per piece
        step = rows // L * L
        for s in range(0, D, step):
            e = min(D, s + step)
            yield s, e, s // L, -(-e // L), L, 0
        return
    for r0 in range(0, D, L):  # pieces of one row
        for s in range(r0, min(D, r0 + L), rows):
            e = min(D, r0 + L, s + rows)
            yield s, e, r0 // L, r0 // L + 1, e - s, s - r0


def _prefiltered(cond, uncond, *, guidance_scale, temperature, top_k, top_p, exclude, error):
    """float32 z of a row chunk after guidance, temperature and top-k / top-p, by the reference.

    The kernel then reads z, not the raw logits: with ``error`` the raw values are checked here
    (a few torch passes over the chunk, beside the filter's own sort).
    """
    ref.check_logits(error, cond)
    if uncond is not None:
        ref.check_logits(error, uncond, uncond=True)
    z = ref.guided_logits(cond, uncond, guidance_scale=guidance_scale, temperature=temperature, top_k=top_k,
                          top_p=top_p, exclude=exclude)
    return z.to(torch.float32, memory_format=torch.contiguous_format)  # rows contiguous in K, as the kernel reads


def _launch(mod, fn: str, *, cond, uncond, x, x1, out, error, check_logits, params, step, seeds, row_len,
            index_offset, K, guidance_scale, temperature, exclude, last, argmax_last, device, extra):
    """One kernel call on (D,) tokens; logits (D, K) rows contiguous in K, or None with x1."""
    ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    getattr(mod, fn)(
        cond=ptr(cond), uncond=ptr(uncond), dtype=_DTYPES[cond.dtype] if cond is not None else 0,
        cond_stride=0 if cond is None else cond.stride(0), uncond_stride=0 if uncond is None else uncond.stride(0),
        scale=float(guidance_scale), temperature=float(temperature), exclude=exclude, x=x.data_ptr(),
        out=out.data_ptr(), D=x.numel(), K=K, params=params.data_ptr(), seeds=seeds.data_ptr(),
        n_seeds=seeds.numel(), row_len=int(row_len), index_offset=int(index_offset), step=step.data_ptr(),
        last=bool(last), argmax_last=bool(argmax_last), x1=ptr(x1), error=ptr(error),
        check_logits=bool(check_logits), n_threads=_threads(device), stream=_stream(device), **extra)


def _step_call(mod_fn, cond, uncond, x, params, step, *, K, seeds, row_len, index_offset, guidance_scale,
               temperature, top_k, top_p, last, argmax_last, out, x1, error, exclude=None, **extra):
    x_flat = _tokens("x", x)
    D = x_flat.numel()
    if K is None and cond is not None:
        K = cond.shape[-1]
    if K is None:  # x1 given and no logits: no K to check ids against and no logits read: nothing checked
        K, error = 2**62, None
    if x1 is not None:
        x1 = _tokens("x1", x1)
        if x1.numel() != D:
            raise ValueError(f"x1: expected {D} ids like x, got {x1.numel()}")
        cond = uncond = None  # the logits are not read (guidance, temperature and filtering ignored)
    elif cond is None:
        raise ValueError("cond: logits are needed unless x1 is given")
    device = _device_of(x_flat, cond=cond, uncond=uncond, params=params, x1=x1, error=error)
    mod = _module(device)
    index_offset = _offset(index_offset)
    error = _error_word(error, device)
    if cond is not None:
        cond = _logits("cond", cond, D, K)
        uncond = _logits("uncond", uncond, D, K)
    # Logits the kernel cannot read as they are go through row chunks (converted or filtered), sized
    # and declared to the memory plans by triton_kernels.workspaces (native_step_workspace).
    path = _ws.native_step_path(cond, uncond, top_k=top_k, top_p=top_p)
    filtering, convert = path == "filter", path == "convert"
    params = params.to(device=device, dtype=torch.float32).reshape(-1).contiguous()
    if params.numel() < 4:
        raise ValueError(f"params: expected 4 step values, got {params.numel()}")
    if not isinstance(step, torch.Tensor):
        step = torch.tensor([int(step)], dtype=torch.int64, device=device)
    step = step.to(device=device, dtype=torch.int64).reshape(-1).contiguous()
    seeds = _seeds(seeds, row_len, D, device)
    buf, target = _out(out, D, device)
    exclude_id = -1 if exclude is None or not 0 <= exclude < K else int(exclude)
    call = dict(params=params, step=step, K=int(K), exclude=exclude_id, last=last, argmax_last=argmax_last,
                device=device, extra=extra)
    with torch.cuda.device(device) if device.type == "cuda" else _nullcontext():
        if not (filtering or convert):
            _launch(mod, mod_fn, cond=cond, uncond=uncond, x=x_flat, x1=x1, out=buf, error=error, check_logits=True,
                    seeds=seeds, row_len=row_len, index_offset=index_offset, guidance_scale=guidance_scale,
                    temperature=temperature, **call)
            return _finish(buf, target, out)
        work = _ws.native_step_workspace(cond, uncond, D, K, row_len=row_len, top_k=top_k, top_p=top_p,
                                         error=error is not None)
        f32 = work.allocate(device)  # convert: float32 chunk buffers, reused by every chunk
        for s, e, lo, hi, chunk_len, offset in _row_chunks(D, row_len, seeds.numel(), work.config["rows"]):
            c, u = cond[s:e], None if uncond is None else uncond[s:e]
            if filtering:
                c = _prefiltered(c, u, guidance_scale=guidance_scale, temperature=temperature, top_k=top_k,
                                 top_p=top_p, exclude=exclude, error=error)
                u, gs, temp = None, 1.0, 1.0
            else:
                c = f32["cond_f32"][: e - s].copy_(c) if "cond_f32" in f32 else c
                u = f32["uncond_f32"][: e - s].copy_(u) if "uncond_f32" in f32 else u
                gs, temp = guidance_scale, temperature
            _launch(mod, mod_fn, cond=c, uncond=u, x=x_flat[s:e], x1=None, out=buf[s:e], error=error,
                    check_logits=not filtering, seeds=seeds[lo:hi] if seeds.numel() > 1 else seeds,
                    row_len=chunk_len, index_offset=index_offset + offset, guidance_scale=gs, temperature=temp,
                    **call)
    return _finish(buf, target, out)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _path_call(mod_fn, x1, value, *, seeds, row_len, index_offset, out, K, **extra):
    x1_flat = _tokens("x1", x1)
    D = x1_flat.numel()
    device = _device_of(x1_flat, value=value)
    mod = _module(device)
    index_offset = _offset(index_offset)
    value = value.to(device=device, dtype=torch.float32).reshape(-1).contiguous()
    if value.numel() != D:
        raise ValueError(f"per-token values: expected {D}, got {value.numel()}")
    seeds = _seeds(seeds, row_len, D, device)
    buf, target = _out(out, D, device)
    with torch.cuda.device(device) if device.type == "cuda" else _nullcontext():
        getattr(mod, mod_fn)(x1=x1_flat.data_ptr(), value=value.data_ptr(), out=buf.data_ptr(), D=D, K=int(K),
                             seeds=seeds.data_ptr(), n_seeds=seeds.numel(), row_len=int(row_len),
                             index_offset=index_offset, n_threads=_threads(device), stream=_stream(device), **extra)
    return _finish(buf, target, out)


# ----------------------------------------------------------------------------- path sampling
def metric_sample(x1, beta, table, *, power=2, levels=None, seeds, row_len, index_offset=0, out=None):
    """x_t ~ softmax(−β_i·d(·, x1_i)) per token (§2.3); β = ∞ returns x1. RNG: TAG_PATH, lane 0."""
    K = table.shape[0]
    table, lv = _codes(table, K, levels, x1.device)
    return _path_call("metric_sample", x1, beta, seeds=seeds, row_len=row_len, index_offset=index_offset, out=out,
                      K=K, table=table.data_ptr(), m=table.shape[1], levels=lv, power=int(power))


def mixture_sample(x1, keep, *, K, seeds, row_len, index_offset=0, out=None):
    """x_t = x1 with probability κ_i (lane 1), else uniform over [0, K) (lane 2)."""
    return _path_call("mixture_sample", x1, keep, seeds=seeds, row_len=row_len, index_offset=index_offset, out=out,
                      K=K)


def mask_sample(x1, keep, *, mask_id, seeds, row_len, index_offset=0, out=None):
    """x_t = x1 with probability κ_i (lane 1), else the mask id."""
    return _path_call("mask_sample", x1, keep, seeds=seeds, row_len=row_len, index_offset=index_offset, out=out,
                      K=0, mask_id=int(mask_id))


# ----------------------------------------------------------------------------- sampler steps
# Step options common to the three ops (reference.sampler): index_offset shifts the RNG index of
# every token (§2.5); x1 (D,) replaces the draw of x̂1 (logits unread, may be None); error
# (int32 (1,)) receives the ERR_* bits of the values read (see the module docstring).
def metric_step(cond, uncond, x, table, params, step, *, seeds, row_len, guidance_scale=1.0, temperature=1.0,
                top_k=0, top_p=1.0, power=2, levels=None, last=False, argmax_last=False, out=None, index_offset=0,
                x1=None, error=None):
    """One metric-path Euler step (§2.4). RNG: TAG_STEP; lanes 0 x̂1, 1 jump, 2 destination.

    Reads the logits of every token (with x1: none), the codebook for tokens with x̂1 ≠ x.
    """
    K = cond.shape[-1] if cond is not None and x1 is None else table.shape[0]
    table, lv = _codes(table, K, levels, x.device)
    return _step_call("metric_step", cond, uncond, x, params, step, K=K, seeds=seeds, row_len=row_len,
                      index_offset=index_offset, guidance_scale=guidance_scale, temperature=temperature, top_k=top_k,
                      top_p=top_p, last=last, argmax_last=argmax_last, out=out, x1=x1, error=error,
                      table=table.data_ptr(), m=table.shape[1], levels=lv, power=int(power))


def mixture_step(cond, uncond, x, params, step, *, seeds, row_len, guidance_scale=1.0, temperature=1.0, top_k=0,
                 top_p=1.0, last=False, argmax_last=False, out=None, index_offset=0, x1=None, error=None, K=None):
    """Mixture-path step (§2.4): jump to x̂1 with probability 1 − exp(−h·κ̇/(1−κ)).

    Reads the logits of jumping tokens only (every token on the last step). ``K`` (default: the
    logits' last dim) bounds the id checks when ``cond`` is None.
    """
    return _step_call("mixture_step", cond, uncond, x, params, step, K=K, seeds=seeds, row_len=row_len,
                      index_offset=index_offset, guidance_scale=guidance_scale, temperature=temperature, top_k=top_k,
                      top_p=top_p, last=last, argmax_last=argmax_last, out=out, x1=x1, error=error)


def mask_step(cond, uncond, x, params, step, *, mask_id, seeds, row_len, guidance_scale=1.0, temperature=1.0,
              top_k=0, top_p=1.0, last=False, argmax_last=False, out=None, index_offset=0, x1=None, error=None,
              K=None):
    """Masked-path step (§2.4): a masked token becomes x̂1 (never the mask) w.p. min(1, h·κ̇/(1−κ)).

    Reads the logits of unmasking tokens only (every masked token on the last step). ``K`` as
    for :func:`mixture_step`.
    """
    return _step_call("mask_step", cond, uncond, x, params, step, K=K, seeds=seeds, row_len=row_len,
                      index_offset=index_offset, guidance_scale=guidance_scale, temperature=temperature, top_k=top_k,
                      top_p=top_p, last=last, argmax_last=argmax_last, out=out, x1=x1, error=error,
                      exclude=int(mask_id), mask_id=int(mask_id))
