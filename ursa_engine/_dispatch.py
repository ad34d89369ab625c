"""Backend choice for the sampler ops: one plain table, torch / triton / native.

A backend is a module that defines every op of :data:`OPS` with the signatures of
:mod:`ursa_engine.reference.sampler`, plus

* ``unavailable(device) -> str | None``: why it cannot run on ``device`` (None: it can);
* ``unsupported(op, **options) -> str | None``: why it cannot run ``op`` with these options.

Modules load on first use (importing the package compiles nothing). ``"auto"`` takes the first
backend of :func:`auto_order` that is available and supports the call. The fused backends are
handed out as their ``torch.library`` custom ops (:func:`ursa_engine.ops_library.sampler_op`: same
signature, one opaque node to ``torch.compile``, a fake implementation for memory plans, the
launch on the tensors' device: :func:`ursa_engine.ops_library.on_device`); the reference is plain
torch. Inside :func:`ursa_engine.ops_library.as_gpu` (planning on fake
tensors) choices are made as on a CUDA device.
"""

from __future__ import annotations

import importlib

import torch

from .reference import sampler as _reference

BACKENDS = ("torch", "triton", "native")
OPS = ("metric_sample", "mixture_sample", "mask_sample", "metric_step", "mixture_step", "mask_step")

_MODULES = {
    "torch": "ursa_engine.reference.sampler",
    "triton": "ursa_engine.triton_kernels.sampler",
    "native": "ursa_engine._native",
}


# Backend modules once imported: a dict lookup, which torch.compile traces (an import it cannot).
_LOADED: dict[str, object] = {"torch": _reference}


def _module(backend: str):
    """Import a backend module, or return the reason it cannot be imported."""
    mod = _LOADED.get(backend)
    if mod is not None:
        return mod, None
    try:
        mod = importlib.import_module(_MODULES[backend])
    except ImportError as err:  # not built / not installed
        return None, f"{backend} backend is not importable ({err})"
    _LOADED[backend] = mod
    return mod, None


# GPU choice between the fused backends, measured per (op, device, shape bucket) by tune().
_MEASURED: dict[tuple, str] = {}


def _bucket(op: str, device: torch.device, shape) -> tuple | None:
    """(op, device, log2 tokens, K): shapes whose timings are interchangeable."""
    if shape is None:
        return None
    tokens, K = int(shape[0]), int(shape[1])
    return (op, str(device), max(tokens, 1).bit_length(), K)


def auto_order(device: torch.device, op: str | None = None, shape=None) -> tuple[str, ...]:
    """Preference for ``backend="auto"``: fused kernels first, the dense reference last.

    On the CPU the Triton interpreter is far slower than the reference, so it is never chosen.
    On the GPU the faster of Triton and native for this op and shape ``(tokens, K)``, as
    measured by :func:`tune`; Triton where nothing was measured.
    """
    if device.type == "cuda" or _as_gpu():
        if _MEASURED.get(_bucket(op, device, shape)) == "native":
            return ("native", "triton", "torch")
        return ("triton", "native", "torch")
    return ("native", "torch")


def tune(op: str, device: torch.device, shape, calls: dict, reps: int = 5) -> str:
    """Time ``calls`` (backend -> zero-argument callable on real inputs) with CUDA events and
    remember the fastest for ``auto`` at this op and shape bucket. It synchronizes: call it at
    warm-up, never inside CUDA graph capture. Returns the chosen backend."""
    from .ops_library import on_device

    def timed(fn, n):
        with on_device(device):  # the events on ``device``'s stream, where the kernels run
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                fn()
            end.record()
            torch.cuda.synchronize(device)
        return start.elapsed_time(end) / n

    # One warm-up (compilation, autotuning) and one timed call each; the ``reps`` calls only for the
    # backends within 2x of the fastest single call: a backend 100x slower (the native IBQ table mode
    # re-reads the table per moving token, issue 12) runs twice, not reps + 1 times.
    times = {}
    for name, fn in calls.items():
        if why_not(name, op, device, {}) is not None:
            continue
        with on_device(device):
            fn()
        times[name] = timed(fn, 1)
    fastest = min(times.values())
    for name in [n for n, t in times.items() if t <= 2.0 * fastest]:
        times[name] = timed(calls[name], reps)
    best = min(times, key=times.get)
    _MEASURED[_bucket(op, device, shape)] = best
    return best


@torch.compiler.assume_constant_result  # the environment, not the data: a trace-time constant for torch.compile
def why_not(backend: str, op: str, device: torch.device, options: dict) -> str | None:
    """None if ``backend`` can run ``op`` here with ``options``, else the reason."""
    if backend == "torch":
        return None
    mod, reason = _module(backend)
    if mod is None:
        return reason
    reason = None if _as_gpu() else mod.unavailable(device)
    if reason is None:
        reason = mod.unsupported(op, **options)
    return reason


def resolve(op: str, backend: str, device: torch.device, *, shape=None, **options):
    """The function implementing ``op`` for ``backend`` ("auto" or one of :data:`BACKENDS`).

    ``shape`` = (tokens, K) lets ``auto`` use the GPU timings of :func:`tune`.
    """
    if op not in OPS:
        raise ValueError(f"op: unknown sampler op {op!r}")
    if backend == "auto":
        for name in auto_order(device, op, shape):
            if why_not(name, op, device, options) is None:
                return _op(name, op)
        raise RuntimeError(f"no backend can run {op} on {device}")  # torch always can
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {BACKENDS}, got {backend!r}")
    reason = why_not(backend, op, device, options)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} cannot run {op}: {reason}")
    return _op(backend, op)


def _op(backend: str, op: str):
    if backend == "torch":
        return getattr(_module(backend)[0], op)
    from .ops_library import sampler_op

    return sampler_op(op, backend)


def _as_gpu() -> bool:
    from .ops_library import gpu_planning

    return gpu_planning()
