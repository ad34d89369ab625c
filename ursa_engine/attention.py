"""Bidirectional (non-causal) grouped-query attention with a choice of kernels (DESIGN §4).

Backends (``backend=``):

* ``"flash"``: the flash-attn package (FA3 ``flash_attn_interface`` first, then FA2), CUDA,
  fp16 / bf16; GQA native.
* ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention``; on CUDA it may pick cuDNN,
  flash or memory-efficient kernels (cuDNN first). ``"sdpa-cudnn"``, ``"sdpa-flash"``,
  ``"sdpa-efficient"``, ``"sdpa-math"`` force one kernel: torch raises rather than silently falling
  back when the forced kernel cannot run, so a benchmark knows what it measured; ``"sdpa-cudnn"``
  raises a ValueError where cuDNN is known to be wrong (below).
* ``"math"``: explicit fp32 ``softmax(q kᵀ / √D) v``; the oracle, any device.
* ``"auto"``: flash when importable and usable, else ``"sdpa"``.

Two traps handled here (DESIGN §4): cuDNN SDPA before cuDNN 9.15.1 gave wrong results for query
lengths not divisible by 128, so ``"auto"`` / ``"sdpa"`` leave cuDNN out there; and not every
SDPA kernel honours ``enable_gqa``, so on CUDA k / v are expanded to the query heads explicitly.
"""

from __future__ import annotations

import functools
import importlib
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ATTENTION_BACKENDS = ("auto", "flash", "sdpa", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa-math", "math")
_FORCED_SDPA = {
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}
CUDNN_FIXED = 91501  # cuDNN 9.15.1: correct results for any query length


@functools.cache
def _flash_func():
    """``(flash_attn_func, name)`` of the newest importable flash-attn, or ``(None, reason)``.

    Cached: a failing import is tried once per process, not at every attention call."""
    for module, name in (("flash_attn_interface", "fa3"), ("flash_attn", "fa2")):
        try:
            return importlib.import_module(module).flash_attn_func, name
        except (ImportError, AttributeError):
            continue
    return None, "flash-attn is not installed (pip install 'ursa-engine[flash]')"


def flash_unavailable(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """None if flash-attn can run here, else the reason."""
    if device.type != "cuda":
        return f"flash-attn needs a CUDA device, got {device}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn needs fp16 / bf16, got {dtype}"
    if head_dim > 256:
        return f"flash-attn supports head_dim <= 256, got {head_dim}"
    fn, reason = _flash_func()
    return None if fn is not None else reason


def cudnn_attention_safe(seq_len: int) -> bool:
    """False where cuDNN SDPA is known to give wrong results (cuDNN < 9.15.1, L % 128 != 0)."""
    version = torch.backends.cudnn.version() or 0
    return version >= CUDNN_FIXED or seq_len % 128 == 0


def resolve_attention(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int,
                      seq_len: int | None = None) -> str:
    """The concrete backend that ``backend`` means here; raises if a forced one cannot run, or,
    given the query length ``seq_len``, is forced "sdpa-cudnn" where cuDNN is known to be wrong."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend: expected one of {ATTENTION_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "flash" if flash_unavailable(device, dtype, head_dim) is None else "sdpa"
    if backend == "flash":
        reason = flash_unavailable(device, dtype, head_dim)
        if reason is not None:
            raise RuntimeError(f"attention backend 'flash': {reason}")
    if backend == "sdpa-cudnn" and device.type != "cuda":
        raise RuntimeError(f"attention backend 'sdpa-cudnn' needs a CUDA device, got {device}")
    if backend == "sdpa-cudnn" and seq_len is not None and not cudnn_attention_safe(seq_len):
        raise ValueError(f"attention backend 'sdpa-cudnn': cuDNN {torch.backends.cudnn.version()} gives wrong "
                         f"results for query length L={seq_len} (not a multiple of 128) before cuDNN 9.15.1 "
                         f"({CUDNN_FIXED}); use 'sdpa' or 'auto', which leave cuDNN out there (docs/design.md §4)")
    return backend


def _sdpa_priority(seq_len: int) -> list[SDPBackend]:
    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return ([SDPBackend.CUDNN_ATTENTION] if cudnn_attention_safe(seq_len) else []) + order


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, L, D) -> (B, Hkv·groups, L, D), query head h reading kv head h // groups."""
    if groups == 1:
        return x
    B, H, L, D = x.shape
    return x[:, :, None].expand(B, H, groups, L, D).reshape(B, H * groups, L, D)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """fp32 oracle; q (B, L, Hq, D), k / v (B, L, Hkv, D) -> (B, L, Hq, D) in q's dtype."""
    groups = q.shape[2] // k.shape[2]
    ct = torch.promote_types(q.dtype, torch.float32)  # fp32 (fp64 stays fp64)
    qf = q.to(ct).transpose(1, 2)
    kf, vf = (_expand_kv(t.to(ct).transpose(1, 2), groups) for t in (k, v))
    p = torch.softmax(qf @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (p @ vf).transpose(1, 2).to(q.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Non-causal attention, scale ``1/√D``, no mask (DESIGN §3: every token sees every token).

    Parameters
    ----------
    q : (B, L, Hq, D);  k, v : (B, L, Hkv, D) with ``Hq % Hkv == 0`` (grouped-query attention)
    backend : one of :data:`ATTENTION_BACKENDS`

    Returns
    -------
    (B, L, Hq, D) tensor of q's dtype
    """
    _, L, Hq, D = q.shape
    Hkv = k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"q / k: {Hq} query heads is not a multiple of {Hkv} key-value heads")
    name = resolve_attention(backend, q.device, q.dtype, D, seq_len=L)
    if name == "math":
        return math_attention(q, k, v)
    if name == "flash":
        fn, _ = _flash_func()
        out = fn(q, k, v, causal=False)
        return out[0] if isinstance(out, tuple) else out  # some FA3 builds also return the LSE
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D) views
    gqa = {}
    if q.device.type == "cuda":
        kt, vt = _expand_kv(kt, Hq // Hkv), _expand_kv(vt, Hq // Hkv)
    elif Hq != Hkv:
        gqa = {"enable_gqa": True}
    kernels = [_FORCED_SDPA[name]] if name in _FORCED_SDPA else _sdpa_priority(L)
    with sdpa_kernel(kernels, set_priority=name == "sdpa"):
        out = F.scaled_dot_product_attention(qt, kt, vt, **gqa)
    return out.transpose(1, 2)
