"""Dense oracle of the fused linear cross-entropy (DESIGN §9 "Fused linear cross-entropy").

The formula written out with the (n, K) logits materialized, differentiable by plain autograd:
the reference the chunked twin (:func:`ursa_engine.training.linear_cross_entropy`, ``backend="torch"``)
and the Triton kernels (:mod:`ursa_engine.triton_kernels.linear_ce`) are tested against, and the
"dense" provider of ``benchmarks/bench_linear_ce.py``.
"""

from __future__ import annotations

import torch


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         weights: torch.Tensor | None = None, ignore_index: int = -100, temperature: float = 1.0,
                         z_loss: float = 0.0, reduction: str = "mean",
                         dtype: torch.dtype | None = None) -> torch.Tensor:
    """``w_i·(lse_i − z_i[y_i] + z_loss·lse_i²)`` with ``z = hidden @ weight.T / temperature`` in full.

    Parameters
    ----------
    hidden : (..., h); weight : (K, h); targets : (...) ids in [0, K) or ``ignore_index``
    weights : optional (...) per-row weights (constants: detached)
    reduction : "mean" (over non-ignored rows), "sum" or "none" (ignored rows 0)
    dtype : compute dtype of the logits (default: the inputs' promoted dtype, so bf16 inputs give
        torch's own bf16 arithmetic, fp64 inputs an fp64 reference)

    Returns
    -------
    0-dim ("mean", "sum") or shaped like ``targets`` ("none"), in ``dtype``.
    """
    dtype = dtype or torch.promote_types(hidden.dtype, weight.dtype)
    z = (hidden.to(dtype) @ weight.to(dtype).T) / temperature  # (..., K): the materialized logits
    lse = torch.logsumexp(z, -1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
    loss = lse - z.gather(-1, safe[..., None])[..., 0]
    if z_loss:
        loss = loss + z_loss * lse.square()
    if weights is not None:
        loss = loss * weights.detach().to(dtype)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp_min(1)
