"""Error bits the step kernels OR into ``error`` (an int32 (1,) device tensor) for bad values they read.

The values mirror ``ursa_engine.reference.sampler.ERR_*`` (defined there once; the tests assert
they agree). A kernel sets a bit only for values it reads anyway (its docstring says which
logits), never reads or writes out of bounds because of a bad value (ids are clamped for
addressing), and makes no separate pass over valid input (rows with a bad value are read a
second time, for the exact bits). The launcher reads nothing back, so a step with
``error=`` stays free of host syncs (CUDA graphs); the caller reads the flag after the step.

How the x̂1 draw checks logits (:func:`triton_kernels.categorical.draw_rows_checked`): its
streaming loop is left as it is; a bad raw value always shows in the draw's own statistics (a
NaN chunk sum, a +inf or all −inf row maximum), and only such suspect rows are read again by
:func:`triton_kernels.categorical.check_rows` for the exact bits. Per-element *field codes*
hold the conditions: one 5-bit field each for cond NaN, cond +inf, cond "not −inf", the same
for uncond (:func:`value_codes`); OR-ing codes (or sums of at most 31 codes: the argmax loop,
whose max hides NaN, checks every slice) keeps "some element had it" per field, and
:func:`logit_bits` turns the fields into the reported bits with flag-wise maxima (a generic OR
reduction would run element by element in the interpreter).
"""

from __future__ import annotations

import triton
import triton.language as tl

ERR_X_RANGE = tl.constexpr(1)  # an id of x outside [0, K)
ERR_COND_NAN = tl.constexpr(2)
ERR_COND_POSINF = tl.constexpr(4)
ERR_COND_ALL_NEGINF = tl.constexpr(8)  # a token whose cond logits are all −inf
ERR_UNCOND_NAN = tl.constexpr(16)
ERR_UNCOND_POSINF = tl.constexpr(32)
ERR_UNCOND_ALL_NEGINF = tl.constexpr(64)
ERR_X1_RANGE = tl.constexpr(128)  # an id of a given x1 outside [0, K)

# fields of the per-element codes (internal): NaN, +inf, "a value other than −inf"
F_NAN = tl.constexpr(1)
F_POSINF = tl.constexpr(1 << 5)
F_SEEN = tl.constexpr(1 << 10)
F_UNCOND = tl.constexpr(15)  # the uncond fields are the cond fields shifted by 15 bits
FIELD = tl.constexpr(31)


@triton.jit
def value_codes(v, ok, SHIFT: tl.constexpr):
    """Per-element field codes of logits ``v`` (float32) where ``ok`` (SHIFT: 0 cond, F_UNCOND uncond)."""
    e = ((v != v).to(tl.int32) * F_NAN + (v == float("inf")).to(tl.int32) * F_POSINF
         + (ok & (v != float("-inf"))).to(tl.int32) * F_SEEN)
    return tl.where(ok, e, 0) << SHIFT


@triton.jit
def _has(acc, shift: tl.constexpr):
    return tl.max((acc >> shift) & FIELD, 1) != 0


@triton.jit
def logit_bits(acc, active, HAS_UNCOND: tl.constexpr):
    """Reported bits of rows (R,) from their OR-ed field codes ``acc`` (R, C), for ``active`` rows."""
    out = (tl.where(_has(acc, 0), ERR_COND_NAN, 0) | tl.where(_has(acc, 5), ERR_COND_POSINF, 0)
           | tl.where(_has(acc, 10), 0, ERR_COND_ALL_NEGINF))
    if HAS_UNCOND:
        out = (out | tl.where(_has(acc, 15), ERR_UNCOND_NAN, 0) | tl.where(_has(acc, 20), ERR_UNCOND_POSINF, 0)
               | tl.where(_has(acc, 25), 0, ERR_UNCOND_ALL_NEGINF))
    return tl.where(active, out, 0)


@triton.jit
def id_bits(ids, ok, K, BIT: tl.constexpr):
    """BIT where an id (where ``ok``) lies outside [0, K); nothing when K ≤ 0 (unknown: no logits)."""
    return tl.where(ok & (K > 0) & ((ids < 0) | (ids >= K)), BIT, 0)


@triton.jit
def report(error_ptr, bits):
    """OR the bits of a program's tokens (R,) into ``error[0]``: one atomic, only when something is wrong.

    The bits are distinct flags, so their OR over the tokens is one flag-wise max (cheap everywhere).
    """
    b = (tl.max(bits & ERR_X_RANGE, 0) | tl.max(bits & ERR_COND_NAN, 0) | tl.max(bits & ERR_COND_POSINF, 0)
         | tl.max(bits & ERR_COND_ALL_NEGINF, 0) | tl.max(bits & ERR_UNCOND_NAN, 0)
         | tl.max(bits & ERR_UNCOND_POSINF, 0) | tl.max(bits & ERR_UNCOND_ALL_NEGINF, 0)
         | tl.max(bits & ERR_X1_RANGE, 0))
    if b != 0:
        tl.atomic_or(error_ptr, b)
