"""Argument checks of the Triton sampler launchers (:mod:`.sampler`): shapes, dtypes, devices and
options, checked on the host before any launch so a bad call writes nothing. Values (token ranges,
NaN / inf logits) are checked inside the kernels (:mod:`.errors`)."""

from __future__ import annotations

import math

import torch

P_H, P_BETA, P_BETA_DOT, P_RATE = 0, 1, 2, 3
NUM_PARAMS = 4
LOG2E = 1.4426950408889634
LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

def _check_tokens(name: str, x: torch.Tensor, D: int | None, device) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.int64 or x.dim() != 1 or not x.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous 1-D int64 tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} of shape {tuple(getattr(x, 'shape', ()))}")
    if D is not None and x.shape[0] != D:
        raise ValueError(f"{name}: expected {D} tokens, got {x.shape[0]}")
    if x.device != device:
        raise ValueError(f"{name}: on {x.device}, expected {device}")


def _check_logits(name: str, z: torch.Tensor, D: int, K: int | None, device) -> None:
    if not isinstance(z, torch.Tensor) or z.dim() != 2:
        raise ValueError(f"{name}: expected a (D, K) tensor, got shape {tuple(getattr(z, 'shape', ()))}")
    if z.dtype not in LOGIT_DTYPES:
        raise ValueError(f"{name}: expected bfloat16 / float16 / float32, got {z.dtype}")
    if z.shape[0] != D or (K is not None and z.shape[1] != K):
        raise ValueError(f"{name}: expected shape ({D}, {K if K is not None else 'K'}), got {tuple(z.shape)}")
    if z.shape[1] > 1 and z.stride(1) != 1:
        raise ValueError(f"{name}: the code axis must be contiguous (stride 1), got stride {z.stride(1)}")
    if z.device != device:
        raise ValueError(f"{name}: on {z.device}, expected {device}")


def _check_rng(seeds, row_len, D, device, params=None, step=None) -> None:
    if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64 or seeds.dim() != 1:
        raise ValueError("seeds: expected a 1-D int64 tensor")
    if seeds.device != device:
        raise ValueError(f"seeds: on {seeds.device}, expected {device}")
    if not isinstance(row_len, int) or row_len < 1:
        raise ValueError(f"row_len: expected an int >= 1, got {row_len!r}")
    if D and seeds.shape[0] * row_len < D:
        raise ValueError(f"seeds: {seeds.shape[0]} rows of {row_len} tokens do not cover {D} tokens")
    if params is not None:
        if params.dtype != torch.float32 or params.numel() < NUM_PARAMS or params.device != device:
            raise ValueError(f"params: expected a float32 tensor of {NUM_PARAMS} values on {device}")
    if step is not None:
        if step.dtype != torch.int64 or step.numel() < 1 or step.device != device:
            raise ValueError(f"step: expected an int64 tensor (1,) on {device}")


def _per_token(name, v, D, device) -> torch.Tensor:
    """A float vector of one value per token, as contiguous float32 on ``device``."""
    if not isinstance(v, torch.Tensor) or v.shape != (D,) or not v.is_floating_point():
        raise ValueError(f"{name}: expected a float tensor of shape ({D},)")
    return v.to(device=device, dtype=torch.float32).contiguous()


def _check_offset(index_offset, row_len) -> int:
    if isinstance(index_offset, bool) or not isinstance(index_offset, int):
        raise ValueError(f"index_offset: expected an int, got {type(index_offset).__name__}")
    if not 0 <= index_offset <= 2**63 - 1 - row_len:  # index_offset + (i % row_len) fits int64
        raise ValueError(f"index_offset: expected an int in [0, 2^63 − row_len), got {index_offset}")
    return index_offset


def _check_error(error, device) -> None:
    if error is None:
        return
    if (not isinstance(error, torch.Tensor) or error.dtype != torch.int32 or error.shape != (1,)
            or error.device != device):
        raise ValueError(f"error: expected an int32 tensor of shape (1,) on {device}, got "
                         f"{getattr(error, 'dtype', type(error).__name__)} of shape "
                         f"{tuple(getattr(error, 'shape', ()))} on {getattr(error, 'device', None)}")


def _check_step(op, cond, uncond, x, params, step, seeds, row_len, top_k, top_p, x1=None, error=None,
                index_offset=0):
    """Checks shared by the step launchers; returns (device, D, K) (K None: no logits, x1 given)."""
    if x1 is None:  # with x1 no logits are read: guidance, temperature and filtering are ignored
        reason = unsupported(op, top_k=top_k, top_p=top_p)
        if reason:
            raise ValueError(reason)
    device = x.device if isinstance(x, torch.Tensor) else None
    _check_tokens("x", x, None, device)
    D = x.shape[0]
    K = None
    if x1 is not None:
        _check_tokens("x1", x1, D, device)
    if cond is not None or x1 is None:
        _check_logits("cond", cond, D, None, device)
        K = cond.shape[1]
    if uncond is not None and cond is None:
        raise ValueError("uncond: given without cond")
    if uncond is not None:
        _check_logits("uncond", uncond, D, K, device)
    _check_rng(seeds, row_len, D, device, params, step)
    _check_offset(index_offset, row_len)
    _check_error(error, device)
    return device, D, K


def _logit_args(cond, uncond, x1, fallback):
    """(cond, uncond pointers, stride_c, stride_u, HAS_UNCOND): logits are never read with x1, and
    pointers of absent tensors are ``fallback`` (never dereferenced)."""
    if x1 is not None or cond is None:
        return fallback, fallback, 0, 0, False
    sc, su = _strides(cond, uncond)
    return cond, (uncond if uncond is not None else cond), sc, su, uncond is not None


def _out(out, x: torch.Tensor, name="out") -> torch.Tensor:
    if out is None:
        return torch.empty_like(x)
    if (not isinstance(out, torch.Tensor) or out.dtype != torch.int64 or out.shape != x.shape
            or out.device != x.device or not out.is_contiguous()):
        raise ValueError(f"{name}: expected a contiguous int64 tensor of shape {tuple(x.shape)} on {x.device}")
    return out


def _check_table(table, K, levels, power, device):
    if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[0] != K:
        raise ValueError(f"table: expected ({K}, m), got shape {tuple(getattr(table, 'shape', ()))}")
    if table.dtype not in LOGIT_DTYPES:
        raise ValueError(f"table: expected a float tensor, got {table.dtype}")
    if table.device != device:
        raise ValueError(f"table: on {table.device}, expected {device}")
    if power not in (2, 4):
        raise ValueError(f"power: expected 2 or 4, got {power!r}")
    if levels is not None:
        levels = tuple(int(v) for v in levels)
        if not levels or min(levels) < 2 or math.prod(levels) != K:
            raise ValueError(f"levels: expected levels >= 2 whose product is K={K}, got {levels}")
    return levels


def _guidance(uncond, guidance_scale, temperature):
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature: expected a positive finite number, got {temperature!r}")
    if not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale: expected a finite number, got {guidance_scale!r}")
    return float(guidance_scale), LOG2E / float(temperature)


def _strides(cond, uncond):
    return cond.stride(0), (uncond.stride(0) if uncond is not None else 0)


def unsupported(op: str, **options) -> str | None:
    """Why ``op`` cannot run with ``options`` on this backend (None: it can)."""
    if options.get("top_k", 0):
        return "top-k filtering is not fused in the Triton sampler (the reference applies it)"
    if options.get("top_p", 1.0) < 1.0:
        return "top-p filtering is not fused in the Triton sampler (the reference applies it)"
    return None
