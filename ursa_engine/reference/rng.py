"""Counter-based randomness shared by every backend (DESIGN §2.5).

The contract
------------
Every random number is a pure function of ``(seed, tag, step, index)``; nothing depends on
tiling, launch configuration, batch composition or backend.

* Generator: Philox-4x32-10 (Salmon et al., 2011) with the standard constants.
  ``key = (seed & 0xFFFFFFFF, seed >> 32)`` (seed is a non-negative int64),
  ``counter = (index & 0xFFFFFFFF, index >> 32, step, tag)``.
  One call gives four 32-bit words, the four *lanes*.
* ``index`` is the token's flat position inside its *row*. A seed is either one int for the
  whole tensor (one row: the flat index over all tokens) or an int64 tensor of shape
  ``(S[0],)``, one seed per sample (row ``b`` holds the ``prod(S[1:])`` tokens of sample ``b``).
  Per-sample seeds make a sample's tokens independent of which batch it is generated in.
  Token ``i`` of a flat input of rows of ``row_len`` tokens uses key ``seeds[i // row_len]`` and
  index ``(i % row_len) + index_offset`` (64-bit): a caller that runs the tokens ``[s, e)`` of
  every sample as one call (``row_len = e − s``, ``index_offset = s``) draws exactly the numbers
  of the whole call, so row chunking never changes a token.
* ``tag`` names the consumer: :data:`TAG_STEP` for a sampler step (``step`` = the step index
  ``k``), :data:`TAG_PATH` for path sampling ``x_t ~ p_t(.|x1)`` (``step`` = 0),
  :data:`TAG_TIMESTEP` for training-time draws (``step`` = 0), :data:`TAG_INIT` for the
  engine's initial noise x_0 (``step`` = 0).
* Lanes: 0 draws the categorical ``x̂1`` (or the path sample), 1 the jump / keep decision,
  2 the jump destination (or the uniform replacement code of the mixture path), 3 the Gumbel
  noise of the MaskGIT confidence sampler.
* A 32-bit word ``w`` becomes the float32 ``u = (2·(w >> 9) + 1) · 2⁻²⁴`` in (0, 1): exactly
  representable, identical on every backend. An integer in ``[0, n)`` is ``(w · n) >> 32``.
* Categorical draws use the inverse CDF: with non-negative weights ``w_j`` and total ``W``,
  the result is the smallest ``j`` with ``w_0 + … + w_j > u·W`` (only indices with positive
  weight can be chosen). Backends sum in different orders, so they may disagree when ``u·W``
  lands within float rounding of a boundary: the "rare ties" of §2.5.
"""

from __future__ import annotations

import torch

TAG_STEP = 0
TAG_PATH = 1
TAG_TIMESTEP = 2
TAG_INIT = 3

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """32x32 -> 64-bit product of the constant ``a`` and uint32 values ``b`` held in int64.

    The product can reach 2^64, past int64, so ``b`` is split in 16-bit halves.
    """
    b_lo, b_hi = b & 0xFFFF, b >> 16
    p_lo = a * b_lo  # < 2^48
    p_hi = a * b_hi  # < 2^48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi, lo


def philox4x32(counter: tuple[torch.Tensor, ...], key: tuple[torch.Tensor, torch.Tensor]):
    """Philox-4x32-10 on uint32 words stored in int64 tensors (broadcasting).

    Returns four int64 tensors holding uint32 values.
    """
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & _MASK32 for c in counter)
    k0, k1 = (torch.as_tensor(k, dtype=torch.int64) & _MASK32 for k in key)
    for _ in range(10):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


def seeds_per_row(seed, shape: tuple[int, ...], device) -> tuple[torch.Tensor, int]:
    """Normalize ``seed`` to an int64 tensor of row seeds and the row length (tokens a row).

    ``seed`` is an int (one row over the whole tensor) or an int tensor of shape
    ``(shape[0],)`` (one row per sample).
    """
    numel = 1
    for s in shape:
        numel *= s
    if isinstance(seed, torch.Tensor):
        if seed.dtype not in (torch.int64, torch.int32) or seed.dim() != 1:
            raise ValueError(f"seed: expected an int or a 1-D int64 tensor, got {seed.dtype} of "
                             f"shape {tuple(seed.shape)}")
        if len(shape) == 0 or seed.shape[0] != shape[0]:
            raise ValueError(f"seed: one seed per sample needs shape ({shape[0] if shape else 1},),"
                             f" got {tuple(seed.shape)}")
        row_len = numel // shape[0] if shape[0] else 0
        return seed.to(device=device, dtype=torch.int64), row_len
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int or an int64 tensor, got {type(seed).__name__}")
    if seed < 0 or seed >= 2**63:
        raise ValueError(f"seed: must be in [0, 2^63), got {seed}")
    return torch.tensor([seed], dtype=torch.int64, device=device), max(numel, 1)


def random_words(seeds: torch.Tensor, row_len: int, numel: int, step, tag: int, *, index_offset: int = 0):
    """The four Philox lanes for flat tokens ``0 .. numel-1`` (int64 tensors of uint32 words).

    ``step`` is an int or a 0-dim int64 tensor (device memory, for CUDA graphs). Token ``i``
    uses index ``(i % row_len) + index_offset`` of its row (see the module docstring).
    """
    device = seeds.device
    flat = torch.arange(numel, device=device, dtype=torch.int64)
    row = flat // max(row_len, 1)
    index = flat - row * row_len + index_offset
    seed = seeds[row] if seeds.numel() > 1 else seeds.expand(numel)
    step = torch.as_tensor(step, dtype=torch.int64, device=device)
    counter = (index & _MASK32, index >> 32, step.expand(numel), torch.full_like(flat, tag))
    return philox4x32(counter, (seed & _MASK32, seed >> 32))


def to_uniform(word: torch.Tensor) -> torch.Tensor:
    """uint32 word -> float32 in (0, 1), exactly ``(2·(w >> 9) + 1) · 2⁻²⁴``."""
    return ((word >> 9) * 2 + 1).to(torch.float32) * (2.0**-24)


def to_below(word: torch.Tensor, n: int) -> torch.Tensor:
    """uint32 word -> integer in [0, n) by multiply-shift: ``(w · n) >> 32``."""
    if n >= 2**31:
        raise ValueError(f"n: must be < 2^31, got {n}")
    # w < 2^32 and n < 2^31 keep the product below 2^63.
    return (word * n) >> 32


def uniforms(seed, shape: tuple[int, ...], device, *, step=0, tag: int = TAG_STEP):
    """Lanes 0..3 as float32 uniforms, each of shape ``shape``."""
    seeds, row_len = seeds_per_row(seed, shape, device)
    numel = 1
    for s in shape:
        numel *= s
    return tuple(to_uniform(w).view(shape) for w in random_words(seeds, row_len, numel, step, tag))


def categorical(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: the smallest ``j`` with ``cumsum(w)_j > u·W`` (the §2.5 contract).

    weights: (..., K) non-negative, not all zero on a row; u: (...) in (0, 1).
    Sums in float64 so the reference is the most accurate member of the contract.
    """
    w = weights.to(torch.float64)
    cdf = torch.cumsum(w, dim=-1)
    target = (u.to(torch.float64) * cdf[..., -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    # u < 1 keeps target below the total; a rounding edge can still step past the last code
    # with positive weight: take that code.
    positive = w > 0
    k = w.shape[-1]
    last_positive = k - 1 - torch.flip(positive, dims=[-1]).to(torch.int8).argmax(dim=-1)
    return torch.minimum(idx, last_positive)
