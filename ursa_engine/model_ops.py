"""The transformer's fused ops with a ``backend`` switch: ``"torch"`` (the oracle in
:mod:`ursa_engine.reference`) or ``"triton"`` (:mod:`ursa_engine.triton_kernels`); ``"auto"`` picks Triton on
CUDA tensors when it is importable, except when autograd is recording (the kernels are forward
only; the torch twins differentiate). On the CPU ``"triton"`` needs ``TRITON_INTERPRET=1`` (tests).
The Triton kernels run as ``torch.library`` custom ops (:mod:`ursa_engine.ops_library`): opaque
to ``torch.compile``, with fake implementations for memory plans; inside
:func:`ursa_engine.ops_library.as_gpu` "auto" picks them as on a CUDA device.

Each function validates nothing beyond what its backend needs: the model calls them with shapes
it built itself.
"""

from __future__ import annotations

import importlib
import os

import torch

from . import ops_library
from .reference import rmsnorm as _ref_norm
from .reference import rope as _ref_rope
from .reference import swiglu as _ref_swiglu

MODEL_OP_BACKENDS = ("auto", "torch", "triton")


@torch.compiler.assume_constant_result  # the environment, not the data: a trace-time constant for torch.compile
def triton_unavailable(device: torch.device) -> str | None:
    """None if the Triton kernels can run on ``device``, else the reason."""
    if ops_library.gpu_planning():
        return None
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"Triton kernels need a CUDA device (got {device}; set TRITON_INTERPRET=1 to interpret)"
    try:
        importlib.import_module("triton")
    except ImportError as err:
        return f"triton is not importable ({err})"
    return None


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"torch"`` or ``"triton"`` for a requested backend; raises if the request cannot be met."""
    if backend not in MODEL_OP_BACKENDS:
        raise ValueError(f"backend: expected one of {MODEL_OP_BACKENDS}, got {backend!r}")
    if backend == "auto":
        gpu = device.type == "cuda" or ops_library.gpu_planning()
        return "triton" if gpu and triton_unavailable(device) is None else "torch"
    if backend == "triton":
        reason = triton_unavailable(device)
        if reason is not None:
            raise RuntimeError(f"backend='triton': {reason}")
    return backend


def _use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    if backend == "auto" and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return resolve_backend(backend, tensors[0].device) == "triton"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, residual: torch.Tensor | None = None,
             backend: str = "auto"):
    """RMSNorm of ``x`` (..., N); with ``residual``, returns ``(x + residual, rms_norm(x + residual))``."""
    if _use_triton(backend, x, weight, *(() if residual is None else (residual,))):
        if residual is None:
            return ops_library.rms_norm(x, weight, eps)
        return ops_library.add_rms_norm(x, residual, weight, eps)
    if residual is None:
        return _ref_norm.rms_norm(x, weight, eps)
    return _ref_norm.add_rms_norm(x, residual, weight, eps)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, eps: float, *, backend: str = "auto"):
    """QK-norm + 3D RoPE: q (B, L, Hq, D), k (B, L, Hkv, D) -> both contiguous, same shapes."""
    if _use_triton(backend, q, k, q_weight, k_weight):
        return ops_library.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps)
    return _ref_rope.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``silu(gate) * up`` for (..., I) tensors."""
    if _use_triton(backend, gate, up):
        return ops_library.swiglu(gate, up)
    return _ref_swiglu.swiglu(gate, up)
