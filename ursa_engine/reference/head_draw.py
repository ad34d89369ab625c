"""lm_head + guided x̂1 draw in row chunks: the dense torch twin of :mod:`ursa_engine.triton_kernels.head_draw`.

DESIGN §2.4 (guidance, temperature, x̂1 ~ softmax(z)), §2.5 (randomness), §3 (``lm_head``: hidden → K,
no bias), issue 11 (the logits never exist in full).

For token ``i`` (a row of ``hidden``)::

    c = hidden[i] · Wᵀ,  u = uncond_hidden[i] · Wᵀ      (logits in the model's dtype, exactly lm_head's)
    z = u + s·(c − u)   (z = c where c == u; z = c without uncond_hidden),  then z / T
    x̂1 = the inverse-CDF draw of softmax(z) with the lane-0 uniform of token i (or argmax z)
    logprobs[i] = log softmax(z)[x̂1]                  (optional; float64 from the same chunk's z, DESIGN §9)

RNG (§2.5, :mod:`ursa_engine.reference.rng`): Philox key ``seeds[i // row_len]``, counter
``(index lo, index hi, step, TAG_STEP)`` with ``index = (i % row_len) + index_offset``, lane 0
through :func:`~ursa_engine.reference.rng.to_uniform`: the x̂1 draw of every sampler step, so a
caller running tokens ``[s, e)`` of every sample (``row_len = e − s``, ``index_offset = s``) gets
the tokens of the unchunked call.

The math per chunk is the sampler reference's own (:func:`~ursa_engine.reference.sampler.guided_logits`,
:func:`~ursa_engine.reference.sampler.draw_x1`, float64), on logits computed like ``model.lm_head``
(``F.linear`` in the input dtype): tokens equal :mod:`ursa_engine.reference.sampler` drawing from the
materialized ``hidden @ W.T``. Only one chunk of rows (its logits and their float64 temporaries)
exists at a time: the sampler reference's :func:`~ursa_engine.reference.sampler.row_chunks` (one
float64 (rows, K) buffer within its ``CHUNK_BYTES``: ~1 GiB peak at K = 64,000, whatever D).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .rng import TAG_STEP, random_words, to_uniform
from .sampler import draw_x1, guided_logits, row_chunks

HIDDEN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_inputs(hidden, weight, uncond_hidden, guidance_scale, temperature, seeds, row_len, step, index_offset,
                 out, logprobs=None) -> tuple[int, int, int]:
    """Argument checks shared by both backends of ``head_draw``; returns (D, K, H). Names the argument."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2 or hidden.dtype not in HIDDEN_DTYPES:
        raise ValueError(f"hidden: expected a (D, H) float32 / float16 / bfloat16 tensor, got "
                         f"{getattr(hidden, 'dtype', type(hidden).__name__)} of shape "
                         f"{tuple(getattr(hidden, 'shape', ()))}")
    D, H = hidden.shape
    device = hidden.device
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != H or weight.shape[0] < 1:
        raise ValueError(f"weight: expected (K, {H}) (lm_head.weight), got shape {tuple(getattr(weight, 'shape', ()))}")
    if weight.dtype != hidden.dtype or weight.device != device:
        raise ValueError(f"weight: expected {hidden.dtype} on {device} like hidden, got {weight.dtype} on "
                         f"{weight.device}")
    if uncond_hidden is not None:
        if (not isinstance(uncond_hidden, torch.Tensor) or uncond_hidden.shape != hidden.shape
                or uncond_hidden.dtype != hidden.dtype or uncond_hidden.device != device):
            raise ValueError(f"uncond_hidden: expected {hidden.dtype} of shape {tuple(hidden.shape)} on {device}, "
                             f"got {getattr(uncond_hidden, 'dtype', None)} of shape "
                             f"{tuple(getattr(uncond_hidden, 'shape', ()))}")
    if not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale: expected a finite number, got {guidance_scale!r}")
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature: expected a positive finite number, got {temperature!r}")
    if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64 or seeds.dim() != 1 or seeds.device != device:
        raise ValueError(f"seeds: expected a 1-D int64 tensor on {device}")
    if isinstance(row_len, bool) or not isinstance(row_len, int) or row_len < 1:
        raise ValueError(f"row_len: expected an int >= 1, got {row_len!r}")
    if D and seeds.shape[0] * row_len < D:
        raise ValueError(f"seeds: {seeds.shape[0]} rows of {row_len} tokens do not cover {D} tokens")
    if (not isinstance(step, torch.Tensor) or step.dtype != torch.int64 or step.numel() < 1
            or step.device != device):
        raise ValueError(f"step: expected an int64 tensor (1,) on {device}")
    if isinstance(index_offset, bool) or not isinstance(index_offset, int) or not 0 <= index_offset < 2**62:
        raise ValueError(f"index_offset: expected an int in [0, 2^62), got {index_offset!r}")
    if out is not None and (not isinstance(out, torch.Tensor) or out.dtype != torch.int64 or out.shape != (D,)
                            or out.device != device or not out.is_contiguous()):
        raise ValueError(f"out: expected a contiguous int64 tensor of shape ({D},) on {device}")
    if logprobs is not None and (not isinstance(logprobs, torch.Tensor) or logprobs.dtype != torch.float32
                                 or logprobs.shape != (D,) or logprobs.device != device
                                 or not logprobs.is_contiguous()):
        raise ValueError(f"logprobs: expected a contiguous float32 tensor of shape ({D},) on {device}")
    return D, weight.shape[0], H


def head_draw(hidden: torch.Tensor, weight: torch.Tensor, *, uncond_hidden: torch.Tensor | None = None,
              guidance_scale: float = 1.0, temperature: float = 1.0, seeds: torch.Tensor, row_len: int,
              step: torch.Tensor, index_offset: int = 0, argmax: bool = False,
              out: torch.Tensor | None = None, logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """x̂1 ~ softmax(guided(hidden·Wᵀ, uncond_hidden·Wᵀ) / T) per token, in row chunks (DESIGN §2.4).

    Parameters
    ----------
    hidden : (D, H) final-normed hidden states of the latent positions (bf16 / fp16 / fp32)
    weight : (K, H) ``lm_head.weight``, same dtype and device
    uncond_hidden : (D, H) the unconditional pass's hidden states, or None (no guidance: the
        caller applies guidance truncation by passing None)
    guidance_scale, temperature : s and T of §2.4 (T > 0)
    seeds, row_len, step, index_offset : the RNG rows of the sampler ops (module docstring)
    argmax : return argmax z (first index) instead of a draw
    out : optional int64 (D,) output buffer
    logprobs : optional float32 (D,) buffer, written with ``log softmax(z / T)[x̂1]`` of every token
        (DESIGN §9 ``x1_logprobs``; with ``argmax``: the log-probability of the argmax code under
        softmax(z / T)). Computed in float64 from the chunk's own z (the draw's), then rounded.

    Returns
    -------
    (D,) int64 x̂1
    """
    return _head_draw(hidden, weight, uncond_hidden=uncond_hidden, guidance_scale=guidance_scale,
                      temperature=temperature, seeds=seeds, row_len=row_len, step=step, index_offset=index_offset,
                      argmax=argmax, out=out, logprobs=logprobs)


def _head_draw(hidden, weight, *, uncond_hidden, guidance_scale, temperature, seeds, row_len, step, index_offset,
               argmax, out, logprobs=None, chunk_rows: int | None = None):
    """:func:`head_draw` with an explicit chunk size (tests force several chunks at small D)."""
    D, K, _ = check_inputs(hidden, weight, uncond_hidden, guidance_scale, temperature, seeds, row_len, step,
                           index_offset, out, logprobs)
    x1 = out if out is not None else torch.empty(D, dtype=torch.int64, device=hidden.device)
    if D == 0:
        return x1
    step = step.reshape(-1)[0]
    u0 = to_uniform(random_words(seeds, row_len, D, step, TAG_STEP, index_offset=index_offset)[0])
    chunks = row_chunks(D, K) if chunk_rows is None else [slice(s, min(D, s + chunk_rows))
                                                          for s in range(0, D, chunk_rows)]
    for sl in chunks:
        cond = F.linear(hidden[sl], weight)  # (rows, K): model.lm_head on this chunk only
        uncond = F.linear(uncond_hidden[sl], weight) if uncond_hidden is not None else None
        z = guided_logits(cond, uncond, guidance_scale=guidance_scale, temperature=temperature)
        x1[sl] = draw_x1(z, u0[sl], argmax=argmax)
        if logprobs is not None:  # one more (rows, K) float64 temporary, like the draw's softmax (freed before)
            lse = torch.logsumexp(z, dim=-1)
            logprobs[sl] = (z.gather(-1, x1[sl].unsqueeze(-1)).squeeze(-1) - lse).to(torch.float32)
    return x1
