"""Philox-4x32-10 in Triton: the counter-based RNG contract of DESIGN §2.5.

Bit-for-bit the generator of :mod:`ursa_engine.reference.rng` (the torch oracle):
``key = (seed lo, seed hi)``, ``counter = (index lo, index hi, step, tag)``, four 32-bit lanes
per call (0: x̂1 / path sample, 1: jump / keep, 2: destination / uniform code, 3: Gumbel).
``index`` is the token's position inside its RNG row: token ``i`` of a flat tensor uses
``seeds[i // row_len]`` and index ``i % row_len + index_offset`` (64-bit): a call on the tokens
``[s, e)`` of every row (``row_len = e − s``, ``index_offset = s``) gets exactly the words of
those tokens in the unchunked call.

All arithmetic is uint32 (``tl.umulhi`` for the high word, wrapping multiply for the low one),
so the words are identical on the GPU, under ``TRITON_INTERPRET=1`` and in the torch reference.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Tags of the RNG contract (mirrors ursa_engine.reference.rng; asserted equal in the tests).
TAG_STEP = tl.constexpr(0)
TAG_PATH = tl.constexpr(1)
TAG_TIMESTEP = tl.constexpr(2)


@triton.jit
def philox4x32(c0, c1, c2, c3, k0, k1):
    """Ten Philox-4x32 rounds on uint32 tensors (broadcasting); returns the four lanes."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = tl.mul(c0, 0xD2511F53, sanitize_overflow=False)  # wrapping uint32 product
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = tl.mul(c2, 0xCD9E8D57, sanitize_overflow=False)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def token_words(seeds_ptr, row_len, tok, mask, step, TAG: tl.constexpr, index_offset=0):
    """The four Philox lanes of flat tokens ``tok`` (int64 tensor) for ``(seed, step, TAG)``.

    ``step`` is an integer scalar (read from device memory by the caller: CUDA graphs).
    ``index_offset`` (an integer scalar, default 0) is added to every token's index in its row.
    Tokens outside ``mask`` get words of seed 0 (never used).
    """
    row = tok // row_len
    index = (tok - row * row_len) + index_offset  # tok is int64: so is the sum
    seed = tl.load(seeds_ptr + row, mask=mask, other=0)
    c0 = index.to(tl.uint32)  # truncation: the low word
    c1 = (index >> 32).to(tl.uint32)
    c2 = (tok * 0 + step).to(tl.uint32)
    c3 = (tok * 0 + TAG).to(tl.uint32)
    k0 = seed.to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    return philox4x32(c0, c1, c2, c3, k0, k1)


@triton.jit
def to_uniform(word):
    """uint32 -> float32 in (0, 1), exactly ``(2·(w >> 9) + 1)·2⁻²⁴`` (§2.5)."""
    return ((word >> 9) * 2 + 1).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def to_below(word, n):
    """uint32 -> integer in [0, n) by multiply-shift ``(w·n) >> 32`` (n < 2³¹); int64."""
    return tl.umulhi(word, (word * 0 + n).to(tl.uint32)).to(tl.int64)
