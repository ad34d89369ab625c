"""Our fused kernels as ``torch.library`` custom ops, each with a fake implementation (DESIGN §4).

Why: a custom op is one opaque node to ``torch.compile`` (it traces a step body without graph
breaks on our kernels) and its fake implementation lets a whole generation step run on
``FakeTensorMode`` tensors at real size on any CPU (:mod:`ursa_engine.memory.generation`).
Every fake allocates exactly the tensors the real launcher returns; scratch memory a launcher
allocates and frees inside the call is declared by :func:`workspace_buffers` from the same
function the launcher sizes its buffers with (``ursa_engine.triton_kernels.workspaces``; what
:class:`~ursa_engine.memory.LiveBytes` adds to the live tensors while the op runs).

Ops (namespace ``ursa``):

* sampler steps and path samples of the fused backends (``backend`` = ``"triton"`` | ``"native"``,
  the signatures of :mod:`ursa_engine.reference.sampler`): ``metric_step``, ``mixture_step``,
  ``mask_step``, ``metric_sample``, ``mixture_sample``, ``mask_sample``. They write ``out`` (and OR
  bits into ``error``) and return nothing; :func:`sampler_op` gives the python callable with the
  backend module's signature (allocates ``out`` when not given, returns it) that
  :func:`ursa_engine._dispatch.resolve` hands out;
* the transformer's Triton kernels: ``rms_norm``, ``add_rms_norm``, ``qk_norm_rope``, ``swiglu``
  (:mod:`ursa_engine.model_ops`);
* ``head_draw``: the fused ``lm_head`` + x̂1 draw (``ursa_engine.triton_kernels.head_draw``): :func:`head_draw`.
* ``linear_ce_forward`` / ``linear_ce_backward``: the fused linear cross-entropy
  (``ursa_engine.triton_kernels.linear_ce``), called by ``training.linear_cross_entropy(backend="triton")``.

Device discipline (issue 12): Triton launches on ``torch.cuda.current_device()`` and the native
module on the stream it is given, not on the tensors' device. Every op body here (the one place
a Triton or native CUDA kernel is launched from the package) runs under :func:`on_device` of its
tensors (decorator :func:`launches`, registry :data:`LAUNCHERS`): a no-op when that device is
already current, so graph capture on the engine's device is unchanged.

The reference backend is plain torch and is not wrapped: dynamo traces it as it is.

:func:`as_gpu` makes every backend choice inside its block as on a CUDA device (fused kernels,
Triton model ops, the fused head), without asking whether the kernels can run: for planning on
fake tensors only, where nothing runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.library import custom_op

_MODULES = {"triton": "ursa_engine.triton_kernels.sampler", "native": "ursa_engine._native"}
_AS_GPU = contextvars.ContextVar("ursa_engine_as_gpu", default=False)


# ----------------------------------------------------------------------------- planning as on a GPU
@contextlib.contextmanager
def as_gpu() -> Iterator[None]:
    """Inside: backend choices are made as on a CUDA device and kernels are assumed available
    (fake tensors only: a real call would try to launch kernels that cannot run here)."""
    token = _AS_GPU.set(True)
    try:
        yield
    finally:
        _AS_GPU.reset(token)


@torch.compiler.assume_constant_result  # a trace-time constant for torch.compile (it cannot read a ContextVar)
def gpu_planning() -> bool:
    """True inside :func:`as_gpu`."""
    return _AS_GPU.get()


# ----------------------------------------------------------------------------- device discipline
_SAME_DEVICE = contextlib.nullcontext()  # reusable: entering it does nothing


def _cuda_index(obj) -> int | None:
    """The CUDA device index of a tensor (or ``torch.device``), None when it is not on a CUDA device."""
    device = obj if isinstance(obj, torch.device) else getattr(obj, "device", None)
    if getattr(device, "type", None) != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def on_device(*objs):
    """Context making the device of the first CUDA tensor (or CUDA ``torch.device``) in ``objs``
    current, so that kernels launch there and on that device's current stream.

    Cheap and graph-safe: when that device is already current (always, inside a capture on it)
    or nothing is on a CUDA device, it returns a shared no-op context and touches no CUDA state.
    """
    for obj in objs:
        index = _cuda_index(obj)
        if index is not None:
            return _SAME_DEVICE if index == torch.cuda.current_device() else torch.cuda.device(index)
    return _SAME_DEVICE


LAUNCHERS: dict[str, object] = {}  # op name -> guarded body: every kernel launch of the package


def launches(name: str):
    """Decorator of a custom op body that launches kernels: run it under :func:`on_device` of its
    tensor arguments (first CUDA one), and register it in :data:`LAUNCHERS`."""
    def wrap(fn):
        @functools.wraps(fn)
        def guarded(*args, **kwargs):
            with on_device(*args, *kwargs.values()):
                return fn(*args, **kwargs)

        LAUNCHERS[name] = guarded
        return guarded

    return wrap


def on_own_device(method):
    """Decorator of a method of an object with a ``device``: the whole call runs with that device
    current (CUDA events, streams and graph captures made inside it land there too)."""
    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        with on_device(self.device):
            return method(self, *args, **kwargs)

    guarded.__ursa_on_own_device__ = True
    return guarded


def _fn(backend: str, op: str):
    return getattr(importlib.import_module(_MODULES[backend]), op)


def _extra(**kwargs) -> dict:
    """Keywords of the issue-11 contract passed only when they differ from their defaults (so a
    backend that predates one still gets the calls it supports)."""
    defaults = {"index_offset": 0, "x1": None, "error": None, "K": None}
    return {k: v for k, v in kwargs.items() if v is not defaults[k]}


# ----------------------------------------------------------------------------- sampler steps
@custom_op("ursa::metric_step", mutates_args=("out", "error"))
@launches("metric_step")
def _metric_step(backend: str, cond: Tensor | None, uncond: Tensor | None, x: Tensor, table: Tensor, params: Tensor,
                 step: Tensor, seeds: Tensor, row_len: int, guidance_scale: float, temperature: float, top_k: int,
                 top_p: float, power: int, levels: Sequence[int] | None, last: bool, argmax_last: bool,
                 index_offset: int, x1: Tensor | None, out: Tensor, error: Tensor | None) -> None:
    _fn(backend, "metric_step")(
        cond, uncond, x, table, params, step, seeds=seeds, row_len=row_len, guidance_scale=guidance_scale,
        temperature=temperature, top_k=top_k, top_p=top_p, power=power,
        levels=None if levels is None else tuple(levels), last=last, argmax_last=argmax_last, out=out,
        **_extra(index_offset=index_offset, x1=x1, error=error))


@_metric_step.register_fake
def _(backend, cond, uncond, x, table, params, step, seeds, row_len, guidance_scale, temperature, top_k, top_p,
      power, levels, last, argmax_last, index_offset, x1, out, error) -> None:
    return None


@custom_op("ursa::mixture_step", mutates_args=("out", "error"))
@launches("mixture_step")
def _mixture_step(backend: str, cond: Tensor | None, uncond: Tensor | None, x: Tensor, params: Tensor, step: Tensor,
                  seeds: Tensor, row_len: int, guidance_scale: float, temperature: float, top_k: int, top_p: float,
                  last: bool, argmax_last: bool, index_offset: int, x1: Tensor | None, K: int | None, out: Tensor,
                  error: Tensor | None) -> None:
    _fn(backend, "mixture_step")(
        cond, uncond, x, params, step, seeds=seeds, row_len=row_len, guidance_scale=guidance_scale,
        temperature=temperature, top_k=top_k, top_p=top_p, last=last, argmax_last=argmax_last, out=out,
        **_extra(index_offset=index_offset, x1=x1, error=error, K=K))


@_mixture_step.register_fake
def _(backend, cond, uncond, x, params, step, seeds, row_len, guidance_scale, temperature, top_k, top_p, last,
      argmax_last, index_offset, x1, K, out, error) -> None:
    return None


@custom_op("ursa::mask_step", mutates_args=("out", "error"))
@launches("mask_step")
def _mask_step(backend: str, cond: Tensor | None, uncond: Tensor | None, x: Tensor, params: Tensor, step: Tensor,
               mask_id: int, seeds: Tensor, row_len: int, guidance_scale: float, temperature: float, top_k: int,
               top_p: float, last: bool, argmax_last: bool, index_offset: int, x1: Tensor | None, K: int | None,
               out: Tensor, error: Tensor | None) -> None:
    _fn(backend, "mask_step")(
        cond, uncond, x, params, step, mask_id=mask_id, seeds=seeds, row_len=row_len, guidance_scale=guidance_scale,
        temperature=temperature, top_k=top_k, top_p=top_p, last=last, argmax_last=argmax_last, out=out,
        **_extra(index_offset=index_offset, x1=x1, error=error, K=K))


@_mask_step.register_fake
def _(backend, cond, uncond, x, params, step, mask_id, seeds, row_len, guidance_scale, temperature, top_k, top_p,
      last, argmax_last, index_offset, x1, K, out, error) -> None:
    return None


# ----------------------------------------------------------------------------- path samples
@custom_op("ursa::metric_sample", mutates_args=("out",))
@launches("metric_sample")
def _metric_sample(backend: str, x1: Tensor, beta: Tensor, table: Tensor, power: int, levels: Sequence[int] | None,
                   seeds: Tensor, row_len: int, index_offset: int, out: Tensor) -> None:
    _fn(backend, "metric_sample")(x1, beta, table, power=power, levels=None if levels is None else tuple(levels),
                                  seeds=seeds, row_len=row_len, out=out, **_extra(index_offset=index_offset))


@_metric_sample.register_fake
def _(backend, x1, beta, table, power, levels, seeds, row_len, index_offset, out) -> None:
    return None


@custom_op("ursa::uniform_sample", mutates_args=("out",))
@launches("uniform_sample")
def _uniform_sample(backend: str, op: str, x1: Tensor, keep: Tensor, value: int, seeds: Tensor, row_len: int,
                    index_offset: int, out: Tensor) -> None:
    """``mixture_sample`` (value = K) and ``mask_sample`` (value = the mask id)."""
    name = "K" if op == "mixture_sample" else "mask_id"
    _fn(backend, op)(x1, keep, seeds=seeds, row_len=row_len, out=out, **{name: value},
                     **_extra(index_offset=index_offset))


@_uniform_sample.register_fake
def _(backend, op, x1, keep, value, seeds, row_len, index_offset, out) -> None:
    return None


def _out(out: Tensor | None, x: Tensor) -> Tensor:
    # the launchers allocate ``empty_like`` of the flat tokens when no ``out`` is given
    return torch.empty(x.shape, dtype=torch.int64, device=x.device) if out is None else out


def _levels(levels):
    return None if levels is None else [int(v) for v in levels]


def _steps(backend: str):
    def metric_step(cond, uncond, x, table, params, step, *, seeds, row_len, guidance_scale=1.0, temperature=1.0,
                    top_k=0, top_p=1.0, power=2, levels=None, last=False, argmax_last=False, out=None,
                    index_offset=0, x1=None, error=None):
        out = _out(out, x)
        torch.ops.ursa.metric_step(backend, cond, uncond, x, table, params, step, seeds, row_len,
                                   float(guidance_scale), float(temperature), int(top_k), float(top_p), int(power),
                                   _levels(levels), bool(last), bool(argmax_last), int(index_offset), x1, out, error)
        return out

    def mixture_step(cond, uncond, x, params, step, *, seeds, row_len, guidance_scale=1.0, temperature=1.0, top_k=0,
                     top_p=1.0, last=False, argmax_last=False, out=None, index_offset=0, x1=None, error=None, K=None):
        out = _out(out, x)
        torch.ops.ursa.mixture_step(backend, cond, uncond, x, params, step, seeds, row_len, float(guidance_scale),
                                    float(temperature), int(top_k), float(top_p), bool(last), bool(argmax_last),
                                    int(index_offset), x1, K, out, error)
        return out

    def mask_step(cond, uncond, x, params, step, *, mask_id, seeds, row_len, guidance_scale=1.0, temperature=1.0,
                  top_k=0, top_p=1.0, last=False, argmax_last=False, out=None, index_offset=0, x1=None, error=None,
                  K=None):
        out = _out(out, x)
        torch.ops.ursa.mask_step(backend, cond, uncond, x, params, step, int(mask_id), seeds, row_len,
                                 float(guidance_scale), float(temperature), int(top_k), float(top_p), bool(last),
                                 bool(argmax_last), int(index_offset), x1, K, out, error)
        return out

    def metric_sample(x1, beta, table, *, power=2, levels=None, seeds, row_len, index_offset=0, out=None):
        out = _out(out, x1)
        torch.ops.ursa.metric_sample(backend, x1, beta, table, int(power), _levels(levels), seeds, row_len,
                                     int(index_offset), out)
        return out

    def mixture_sample(x1, keep, *, K, seeds, row_len, index_offset=0, out=None):
        out = _out(out, x1)
        torch.ops.ursa.uniform_sample(backend, "mixture_sample", x1, keep, int(K), seeds, row_len, int(index_offset),
                                      out)
        return out

    def mask_sample(x1, keep, *, mask_id, seeds, row_len, index_offset=0, out=None):
        out = _out(out, x1)
        torch.ops.ursa.uniform_sample(backend, "mask_sample", x1, keep, int(mask_id), seeds, row_len,
                                      int(index_offset), out)
        return out

    return {f.__name__: f for f in (metric_step, mixture_step, mask_step, metric_sample, mixture_sample,
                                    mask_sample)}


_SAMPLER_OPS = {backend: _steps(backend) for backend in _MODULES}


def sampler_op(op: str, backend: str):
    """The custom-op callable of ``op`` on a fused ``backend``, with the backend module's signature."""
    return _SAMPLER_OPS[backend][op]


# ----------------------------------------------------------------------------- transformer ops (Triton)
def _triton(name: str):
    """A Triton launcher module of ``ursa_engine.triton_kernels`` (imported on first use)."""
    return importlib.import_module(f"ursa_engine.triton_kernels.{name}")


def _empty(t: Tensor) -> Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


@custom_op("ursa::rms_norm", mutates_args=())
@launches("rms_norm")
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return _triton("rmsnorm").rms_norm(x, weight, eps)


@rms_norm.register_fake
def _(x, weight, eps):
    return _empty(x)


@custom_op("ursa::add_rms_norm", mutates_args=())
@launches("add_rms_norm")
def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return _triton("rmsnorm").rms_norm(x, weight, eps, residual=residual)


@add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return _empty(x), _empty(x)


@custom_op("ursa::qk_norm_rope", mutates_args=())
@launches("qk_norm_rope")
def qk_norm_rope(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor,
                 eps: float) -> tuple[Tensor, Tensor]:
    return _triton("qk_norm_rope").qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps)


@qk_norm_rope.register_fake
def _(q, k, q_weight, k_weight, cos, sin, eps):
    return _empty(q), _empty(k)  # contiguous (B, L, H, D), as the launcher allocates them


@custom_op("ursa::swiglu", mutates_args=())
@launches("swiglu")
def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    return _triton("swiglu").swiglu(gate, up)


@swiglu.register_fake
def _(gate, up):
    return _empty(gate)


# ----------------------------------------------------------------------------- fused head + draw
def head_draw_unavailable(device) -> str | None:
    """None if the fused ``lm_head`` + x̂1 draw kernel can run on ``device``, else why not (inside
    :func:`as_gpu`: None, the fake implementation needs no kernel)."""
    if gpu_planning():
        return None
    try:
        module = importlib.import_module("ursa_engine.triton_kernels.head_draw")
    except ImportError as err:
        return f"ursa_engine.triton_kernels.head_draw is not importable ({err})"
    return module.unavailable(torch.device(device))


@custom_op("ursa::head_draw", mutates_args=("out", "logprobs"))
@launches("head_draw")
def _head_draw(hidden: Tensor, weight: Tensor, uncond_hidden: Tensor | None, guidance_scale: float,
               temperature: float, seeds: Tensor, row_len: int, step: Tensor, index_offset: int, argmax: bool,
               out: Tensor, logprobs: Tensor | None) -> None:
    _triton("head_draw").head_draw(
        hidden, weight, uncond_hidden=uncond_hidden, guidance_scale=guidance_scale, temperature=temperature,
        seeds=seeds, row_len=row_len, step=step, index_offset=index_offset, argmax=argmax, out=out,
        logprobs=logprobs)


@_head_draw.register_fake
def _(hidden, weight, uncond_hidden, guidance_scale, temperature, seeds, row_len, step, index_offset, argmax,
      out, logprobs) -> None:
    return None  # writes out (and logprobs) in place: nothing allocated


def head_draw(hidden: Tensor, weight: Tensor, *, uncond_hidden: Tensor | None = None, guidance_scale: float = 1.0,
              temperature: float = 1.0, seeds: Tensor, row_len: int, step: Tensor, index_offset: int = 0,
              argmax: bool = False, out: Tensor | None = None, logprobs: Tensor | None = None) -> Tensor:
    """x̂1 (D,) int64 drawn from ``softmax(guided(hidden @ weightᵀ) / T)`` without writing the logits
    (``ursa_engine.triton_kernels.head_draw``; same law and uniforms as the unfused path, §2.4-§2.5).

    hidden, uncond_hidden : (D, hidden) final hidden states of the tokens (cond / uncond rows)
    weight : (K, hidden) ``lm_head`` weight; seeds / row_len / step / index_offset: the RNG keys
    logprobs : optional float32 (D,) buffer, written with ``log softmax(z / T)[x̂1]`` (DESIGN §9;
        with ``argmax``: the argmax code's); the caller allocates it (fixed address for CUDA graphs)
    """
    if out is None:
        out = torch.empty(hidden.shape[0], dtype=torch.int64, device=hidden.device)
    torch.ops.ursa.head_draw(hidden, weight, uncond_hidden, float(guidance_scale), float(temperature), seeds,
                             int(row_len), step, int(index_offset), bool(argmax), out, logprobs)
    return out


# ----------------------------------------------------------------------------- scratch memory
PLAN_SMS = 132  # SMs of the GPU the plans model (an H100 SXM): sizes the table pass's K splits
_WS_LABELS = {"metric_step": "table metric step: x̂1, moving list, group counts, tile sums, split sums",
              "metric_sample": "table path sample: tile sums", "head_draw": "head draw: per-chunk max and sum"}


def _workspaces():
    # triton-free (torch + tiles): plans import it without Triton
    return importlib.import_module("ursa_engine.triton_kernels.workspaces")


def _plan_device(t: Tensor) -> torch.device:
    """The device a launcher would run on: CUDA inside :func:`as_gpu` (fake planning), else the tensor's."""
    return torch.device("cuda") if gpu_planning() else t.device


def _head_chunks(D: int, K: int, H: int, device: torch.device, dtype: torch.dtype) -> int:
    """NC of the fused head draw: :func:`ursa_engine.triton_kernels.head_draw.head_config`'s own tiling."""
    return _triton("head_draw").head_config(D, K, H, device, dtype)["NC"]


def head_draw_workspace(D: int, K: int, H: int = 64, *, device="cuda", dtype: torch.dtype = torch.bfloat16):
    """The fused head draw's :class:`~ursa_engine.triton_kernels.workspaces.Workspace` on D tokens (the
    launcher allocates exactly its buffers; on a GPU by default)."""
    device = torch.device(device)
    return _workspaces().head_draw_workspace(D, _head_chunks(D, K, H, device, dtype))


@torch.compiler.assume_constant_result  # a trace-time constant for torch.compile (step bodies size ranges with it)
def head_draw_scratch(D: int, K: int) -> int:
    """Peak scratch bytes of the fused head draw on D tokens on a GPU (:func:`head_draw_workspace`)."""
    return _head_draw_scratch(int(D), int(K))


@functools.cache
def _head_draw_scratch(D: int, K: int) -> int:
    return head_draw_workspace(D, K).peak_bytes()


def op_workspace(func, args, kwargs):
    """The :class:`~ursa_engine.triton_kernels.workspaces.Workspace` a launcher of ``func`` (our custom
    ops) allocates and frees inside the call, or None: the same function the launcher sizes its
    buffers with (``ursa_engine.triton_kernels.workspaces``), fed with the op's arguments.

    Declared: the Triton table metric step (explicit codebook, not the last step; no x̂1 buffer when
    ``x1`` is given; token groups on CUDA), the Triton table path sample, the fused head draw
    (per-chunk statistics, then the sort) and the native steps' torch side where it runs
    (:func:`_native_step_workspace`: top-k / top-p filtering or logits converted to float32, in row
    chunks). Nothing else allocates scratch through torch: the FSQ and uniform kernels keep none,
    the native kernels keep host / per-thread scratch of O(threads · K) outside torch (not device
    memory), and ``linear_ce`` allocates only what it returns (and (1,) scalars).

    Which backend: the sampler ops carry the backend that runs them as their first argument, already
    resolved (``"auto"`` is resolved by :func:`ursa_engine._dispatch.resolve` before the op is called;
    inside :func:`as_gpu` as on a CUDA device: Triton, except where Triton does not support the call,
    e.g. top-k / top-p, which resolves to native). The declaration follows that argument.
    """
    name = getattr(func, "name", lambda: "")()
    if name in _NATIVE_STEPS and args and args[0] == "native":
        return _native_step_workspace(func, args, kwargs)
    if name == "ursa::metric_step":
        backend, cond, x, table, levels, last, x1 = args[0], args[1], args[3], args[4], args[14], args[15], args[18]
        if backend != "triton" or levels is not None or last or table is None or table.dim() != 2:
            return None
        device = _plan_device(x)
        K = cond.shape[-1] if cond is not None else table.shape[0]
        return _workspaces().table_step_workspace(x.numel(), K, table.shape[1], device, table.dtype,
                                                  x1_given=x1 is not None,
                                                  num_sms=PLAN_SMS if device.type == "cuda" else None)
    if name == "ursa::metric_sample":
        backend, x1, table, levels = args[0], args[1], args[3], args[5]
        if backend != "triton" or levels is not None or table.dim() != 2:
            return None
        device = _plan_device(x1)
        return _workspaces().table_sample_workspace(x1.shape[0], table.shape[0], table.shape[1], device, table.dtype,
                                                    num_sms=PLAN_SMS if device.type == "cuda" else None)
    if name == "ursa::head_draw":
        hidden, weight = args[0], args[1]
        D, H = hidden.shape
        nc = _head_chunks(D, weight.shape[0], H, _plan_device(hidden), hidden.dtype)
        return _workspaces().head_draw_workspace(D, nc)
    return None


_NATIVE_STEPS = ("ursa::metric_step", "ursa::mixture_step", "ursa::mask_step")


def _native_step_workspace(func, args, kwargs):
    """:func:`~ursa_engine.triton_kernels.workspaces.native_step_workspace` of a native step op, from its
    arguments (by name: the three step ops order them differently): nothing when ``x1`` is given
    (the logits are not read), else the slow path's chunk buffers (none on the fast path)."""
    a = dict(zip((arg.name for arg in func._schema.arguments), args, strict=False), **kwargs)
    cond, x = a["cond"], a["x"]
    if a["x1"] is not None or cond is None:
        return None
    K = cond.shape[-1] if cond.dim() else 0
    return _workspaces().native_step_workspace(cond, a["uncond"], x.numel(), K, row_len=int(a["row_len"]),
                                               top_k=int(a["top_k"]), top_p=float(a["top_p"]),
                                               error=a["error"] is not None)


def workspace_buffers(func, args, kwargs) -> tuple[list[tuple[tuple[int, ...], torch.dtype]], str] | None:
    """Scratch tensors a launcher allocates and frees inside ``func`` (our ops only), at the call's
    largest stage, as ``[(shape, dtype), ...]``, and a label: the ``workspace`` callable of
    :class:`~ursa_engine.memory.LiveBytes` (each counted as a live tensor while the op runs)."""
    ws = op_workspace(func, args, kwargs)
    if ws is None or not ws.buffers:
        return None
    label = ws.config.get("label") or _WS_LABELS[str(func.name()).split("::")[1]]
    return [(b.shape, b.dtype) for b in ws.peak_stage()], label


def workspace_bytes(func, args, kwargs) -> tuple[int, str] | None:
    """Peak scratch bytes of ``func`` (our ops) and a label: :func:`workspace_buffers` summed."""
    found = workspace_buffers(func, args, kwargs)
    if found is None:
        return None
    bufs, label = found
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in bufs), label


# ----------------------------------------------------------------------------- fused linear cross-entropy
@custom_op("ursa::linear_ce_forward", mutates_args=())
@launches("linear_ce_forward")
def _linear_ce_forward(hidden: Tensor, weight: Tensor, targets: Tensor, weights: Tensor | None, ignore_index: int,
                       temperature: float, z_loss: float) -> tuple[Tensor, Tensor]:
    """Per-row (lse, loss) fp32 of ``ursa_engine.triton_kernels.linear_ce`` (DESIGN §9)."""
    return _triton("linear_ce").linear_ce_forward(hidden, weight, targets, weights, ignore_index=ignore_index,
                                                  temperature=temperature, z_loss=z_loss)


@_linear_ce_forward.register_fake
def _(hidden, weight, targets, weights, ignore_index, temperature, z_loss):
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32)


@custom_op("ursa::linear_ce_backward", mutates_args=())
@launches("linear_ce_backward")
def _linear_ce_backward(hidden: Tensor, weight: Tensor, targets: Tensor, lse: Tensor, coef: Tensor,
                        temperature: float, z_loss: float, need_hidden: bool,
                        need_weight: bool) -> tuple[Tensor, Tensor]:
    """fp32 (d_hidden, d_weight) of the fused linear cross-entropy, logits recomputed (DESIGN §9)."""
    return _triton("linear_ce").linear_ce_backward(hidden, weight, targets, lse, coef, temperature=temperature,
                                                   z_loss=z_loss, need_hidden=need_hidden, need_weight=need_weight)


@_linear_ce_backward.register_fake
def _(hidden, weight, targets, lse, coef, temperature, z_loss, need_hidden, need_weight):
    dh = hidden.new_empty(hidden.shape if need_hidden else (0,), dtype=torch.float32)
    return dh, weight.new_empty(weight.shape if need_weight else (0,), dtype=torch.float32)
