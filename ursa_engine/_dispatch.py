"""Backend choice for the sampler ops: one plain table, torch / triton / native.

A backend is a module that defines every op of :data:`OPS` with the signatures of
:mod:`ursa_engine.reference.sampler`, plus

* ``unavailable(device) -> str | None``: why it cannot run on ``device`` (None: it can);
* ``unsupported(op, **options) -> str | None``: why it cannot run ``op`` with these options.

Modules load on first use (importing the package compiles nothing). ``"auto"`` takes the first
backend of :func:`auto_order` that is available and supports the call.
"""

from __future__ import annotations

import importlib

import torch

BACKENDS = ("torch", "triton", "native")
OPS = ("metric_sample", "mixture_sample", "mask_sample", "metric_step", "mixture_step", "mask_step")

_MODULES = {
    "torch": "ursa_engine.reference.sampler",
    "triton": "triton_kernels.sampler",
    "native": "ursa_engine._native",
}


def _module(backend: str):
    """Import a backend module, or return the reason it cannot be imported."""
    try:
        return importlib.import_module(_MODULES[backend]), None
    except ImportError as err:  # not built / not installed
        return None, f"{backend} backend is not importable ({err})"


def auto_order(device: torch.device) -> tuple[str, ...]:
    """Preference for ``backend="auto"``: fused kernels first, the dense reference last.

    On the CPU the Triton interpreter is far slower than the reference, so it is never chosen.
    """
    if device.type == "cuda":
        return ("triton", "native", "torch")
    return ("native", "torch")


def why_not(backend: str, op: str, device: torch.device, options: dict) -> str | None:
    """None if ``backend`` can run ``op`` here with ``options``, else the reason."""
    if backend == "torch":
        return None
    mod, reason = _module(backend)
    if mod is None:
        return reason
    reason = mod.unavailable(device)
    if reason is None:
        reason = mod.unsupported(op, **options)
    return reason


def resolve(op: str, backend: str, device: torch.device, **options):
    """The function implementing ``op`` for ``backend`` ("auto" or one of :data:`BACKENDS`)."""
    if op not in OPS:
        raise ValueError(f"op: unknown sampler op {op!r}")
    if backend == "auto":
        for name in auto_order(device):
            if why_not(name, op, device, options) is None:
                return getattr(_module(name)[0], op)
        raise RuntimeError(f"no backend can run {op} on {device}")  # torch always can
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {BACKENDS}, got {backend!r}")
    reason = why_not(backend, op, device, options)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} cannot run {op}: {reason}")
    return getattr(_module(backend)[0], op)
