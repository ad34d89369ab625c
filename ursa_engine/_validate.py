"""Argument checks shared by the public API: each error names the argument (DESIGN §7).

Checks that read tensor values (ids in range, NaN logits) synchronize with the device; the
runtime turns them off inside captured steps with ``validate=False``.
"""

from __future__ import annotations

import math
import operator

import torch

from .reference import sampler as _ref

_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tokens(name: str, x, K: int, *, values: bool = True, device=None) -> torch.Tensor:
    """An integer tensor of ids in [0, K)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a LongTensor of token ids, got {type(x).__name__}")
    if x.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{name}: expected an integer tensor of token ids, got {x.dtype}")
    if device is not None and x.device != torch.device(device):
        raise ValueError(f"{name}: on {x.device}, expected {device}")
    if values:
        token_values(name, x, K)
    return x.to(torch.int64)


def token_values(name: str, x: torch.Tensor, K: int) -> None:
    """Ids in [0, K) (a host sync)."""
    if x.numel():
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= K:
            raise ValueError(f"{name}: ids must be in [0, {K}), found values in [{lo}, {hi}]")


def logits(name: str, z, shape: tuple[int, ...], K: int, *, device, values: bool = True) -> torch.Tensor:
    """A float tensor of shape ``shape + (K,)`` on ``device``, free of NaN."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{name}: expected a float tensor of logits, got {type(z).__name__}")
    if z.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"{name}: expected float32/float16/bfloat16 logits, got {z.dtype}")
    if z.device != torch.device(device):
        raise ValueError(f"{name}: on {z.device}, but the tokens are on {device}")
    if z.dim() == 0 or z.shape[-1] != K:
        last = z.shape[-1] if z.dim() else "none"
        raise ValueError(f"{name}: last dim {last} but the codebook has K={K}")
    if tuple(z.shape[:-1]) != tuple(shape):
        raise ValueError(f"{name}: shape {tuple(z.shape)} does not match tokens {tuple(shape)} + (K={K},)")
    if values:
        logit_values(name, z)
    return z


def logit_values(name: str, z: torch.Tensor) -> None:
    """No NaN, no +inf, no token with every logit at −inf (a host sync). The checks run on row chunks
    (:func:`ursa_engine.reference.sampler.row_chunks`): no (D, K) temporary."""
    if not z.numel():
        return
    error = torch.zeros(1, dtype=torch.int32, device=z.device)
    rows = z.reshape(-1, z.shape[-1])
    for sl in _ref.row_chunks(rows.shape[0], rows.shape[1]):
        _ref.check_logits(error, rows[sl])
    raise_for_errors(int(error.item()), K=z.shape[-1], logits_name=name)


_LOGIT_MESSAGES = ((_ref.ERR_COND_NAN, "logits", "contains NaN"), (_ref.ERR_COND_POSINF, "logits", "contains +inf"),
                   (_ref.ERR_COND_ALL_NEGINF, "logits", "a token has every logit at -inf"),
                   (_ref.ERR_UNCOND_NAN, "uncond_logits", "contains NaN"),
                   (_ref.ERR_UNCOND_POSINF, "uncond_logits", "contains +inf"),
                   (_ref.ERR_UNCOND_ALL_NEGINF, "uncond_logits", "a token has every logit at -inf"))


def raise_for_errors(bits: int, *, K: int, x: torch.Tensor | None = None, x1: torch.Tensor | None = None,
                     logits_name: str = "logits") -> None:
    """Turn the ``ERR_*`` bits of a sampler op's ``error=`` buffer into the ValueError that the
    torch checks give (naming ``x``, ``x1``, ``logits``, ``uncond_logits``); no-op for 0."""
    if not bits:
        return
    for bit, name, ids in ((_ref.ERR_X_RANGE, "x", x), (_ref.ERR_X1_RANGE, "x1", x1)):
        if bits & bit:
            if ids is not None:
                token_values(name, ids, K)  # raises with the values found
            raise ValueError(f"{name}: ids must be in [0, {K})")
    for bit, name, what in _LOGIT_MESSAGES:
        if bits & bit:
            raise ValueError(f"{logits_name if name == 'logits' else name}: {what}")
    raise ValueError(f"sampler error bits {bits:#x}")


def index_offset(name: str, v) -> int:
    """A token offset: an int in [0, 2^62) (Philox indices are 64-bit)."""
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**62:
        raise ValueError(f"{name}: must be an int in [0, 2^62), got {v!r}")
    return v


def times(name: str, t, shape: tuple[int, ...], device) -> torch.Tensor:
    """Times in [0, 1] broadcast to ``shape``, float64."""
    if isinstance(t, torch.Tensor):
        if not (t.is_floating_point() or t.dtype in (torch.int64, torch.int32)):
            raise TypeError(f"{name}: expected float times, got {t.dtype}")
        tt = t.to(device=device, dtype=torch.float64)
    elif isinstance(t, (int, float)) and not isinstance(t, bool):
        tt = torch.tensor(float(t), dtype=torch.float64, device=device)
    else:
        raise TypeError(f"{name}: expected a float or a tensor, got {type(t).__name__}")
    if torch.isnan(tt).any() or (tt < 0).any() or (tt > 1).any():
        raise ValueError(f"{name}: times must lie in [0, 1]")
    # Leading axes first: (B,) is one time per sample and (B, T) one per frame of (B, T, H, W)
    # tokens (URSA's add_noise convention), even where trailing broadcasting would also fit.
    if 0 < tt.dim() < len(shape) and tuple(tt.shape) == tuple(shape[: tt.dim()]):
        return tt.view(tuple(tt.shape) + (1,) * (len(shape) - tt.dim())).expand(shape)
    try:
        return torch.broadcast_to(tt, shape)
    except RuntimeError:
        raise ValueError(f"{name}: shape {tuple(tt.shape)} matches neither the leading axes of the tokens "
                         f"{tuple(shape)} nor broadcasts to them") from None


def positive(name: str, v: float) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name}: must be a positive finite number, got {v!r}")
    return float(v)


def finite(name: str, v: float) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise ValueError(f"{name}: must be a finite number, got {v!r}")
    return float(v)


def filtering(top_k, top_p, K: int) -> tuple[int, float]:
    if top_k is None:
        top_k = 0
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k: must be an int >= 0 (0 = off), got {top_k!r}")
    if top_p is None:
        top_p = 1.0
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p: must be in (0, 1], got {top_p!r}")
    return (0 if top_k >= K else top_k), float(top_p)


def latents_shape(shape) -> tuple[int, int, int]:
    """(T, H, W) of positive sizes from (T, H, W) or (H, W) (an image, T = 1)."""
    try:  # ints only (operator.index): 2.5 or "3" would silently become another grid
        out = tuple(operator.index(s) for s in shape)
    except TypeError:
        raise ValueError(f"latents_shape: expected (T, H, W) or (H, W) of positive ints, got {shape!r}") from None
    out = (1, *out) if len(out) == 2 else out
    if len(out) != 3 or min(out) < 1:
        raise ValueError(f"latents_shape: expected (T, H, W) or (H, W) of positive sizes, got {shape}")
    return out


MAX_PROMPT_LENGTH = 32768  # the text encoder's positions (Qwen3: 32k); URSA itself uses 320


def prompt_length(length) -> int:
    """An int in [0, MAX_PROMPT_LENGTH]: a larger one would allocate (B, length) activations and attention
    before anything else could refuse it (issue 20: a fuzzed 10^7 was an out-of-memory kill)."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"prompt_length: expected an int >= 0, got {length!r}")
    if length > MAX_PROMPT_LENGTH:
        raise ValueError(f"prompt_length: at most {MAX_PROMPT_LENGTH} ids, got {length}")
    return length
