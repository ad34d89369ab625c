"""The latent-token loss (DESIGN §3): the chunked linear cross-entropy (the torch twin of the fused
kernel) and :class:`LatentLoss`, the module to wrap in DDP / ``torch.compile``."""

from __future__ import annotations

import torch
from torch import nn

from .. import _validate
from ..model import URSATransformer, latent_positions, sequence_ids

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------- loss
class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` computed chunk by chunk.

    The forward also computes both gradients chunk by chunk (the Liger-Kernel scheme), so
    neither the (N, K) fp32 logits nor their softmax ever exist in full: peak extra memory is
    one (chunk, K) fp32 block.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, ignore_index: int, need_grad: bool):
        # hidden: (N, h); weight: (K, h); targets: (N,). ``need_grad`` comes from the caller:
        # under torch.no_grad ctx.needs_input_grad still follows requires_grad, so it cannot tell.
        valid = targets != ignore_index
        count = valid.sum().clamp_min(1).to(torch.float32)
        w32 = weight.float()
        loss = hidden.new_zeros((), dtype=torch.float32)
        grad_h = torch.empty_like(hidden) if need_grad else None
        grad_w = torch.zeros_like(w32) if need_grad else None
        for s in range(0, hidden.shape[0], chunk_size):
            h = hidden[s : s + chunk_size].float()
            tgt, ok = targets[s : s + chunk_size], valid[s : s + chunk_size]
            safe = torch.where(ok, tgt, torch.zeros_like(tgt))
            logits = h @ w32.T  # (c, K) fp32: the only logits alive
            lse = torch.logsumexp(logits, -1)
            picked = logits.gather(1, safe[:, None])[:, 0]
            loss = loss + torch.where(ok, lse - picked, torch.zeros_like(lse)).sum()
            if need_grad:
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits (after the gather)
                g.scatter_add_(1, safe[:, None], -torch.ones_like(g[:, :1]))
                g.mul_(ok[:, None].to(g.dtype))
                grad_h[s : s + chunk_size] = (g @ w32).to(hidden.dtype)
                grad_w.add_(g.T @ h)
        if need_grad:
            ctx.save_for_backward(grad_h / count.to(grad_h.dtype), (grad_w / count).to(weight.dtype))
        return loss / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), grad_w * grad_out.to(grad_w.dtype), None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         chunk_size: int = 2048, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy of the logits ``hidden @ weight.T`` against ``targets``, chunked.

    Parameters
    ----------
    hidden : (..., h) final-normed hidden states (any float dtype)
    weight : (K, h) the ``lm_head`` weight
    targets : (...) int64 in [0, K), or ``ignore_index``
    chunk_size : rows per fp32 logits block

    Returns
    -------
    0-dim float32 loss (mean over the non-ignored targets); differentiable in hidden and weight.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets: shape {tuple(targets.shape)} does not match hidden {tuple(hidden.shape[:-1])}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight: expected (K, {hidden.shape[-1]}), got {tuple(weight.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1, got {chunk_size}")
    _check_ids(("targets", targets, weight.shape[0], ignore_index))
    return _linear_cross_entropy(hidden, weight, targets, chunk_size, ignore_index)


def _linear_cross_entropy(hidden, weight, targets, chunk_size, ignore_index):
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1).long(),
                                     int(chunk_size), int(ignore_index), need_grad)


def _check_ids(*named) -> None:
    """Each ``(name, ids, K, ignore_index or None)`` is an integer tensor of ids in [0, K) (or the
    ignore index), checked with one host sync for all: an out-of-range id is a device assert on CUDA."""
    stats, checked = [], []
    for name, x, K, ignore_index in named:
        _validate.tokens(name, x, K, values=False)
        if x.numel():
            x = x.long()
            if ignore_index is not None:  # min / max over the other ids
                x = torch.where(x == ignore_index, torch.zeros_like(x), x)
            stats += [x.min(), x.max()]
            checked.append((name, K, ignore_index))
    if not checked:
        return
    vals = torch.stack(stats).tolist()
    for (name, K, ignore_index), lo, hi in zip(checked, vals[0::2], vals[1::2], strict=True):
        if lo < 0 or hi >= K:
            extra = f" (or ignore_index={ignore_index})" if ignore_index is not None else ""
            raise ValueError(f"{name}: ids must be in [0, {K}){extra}, found values in [{lo}, {hi}]")


def latent_hidden(model: URSATransformer, input_ids: torch.Tensor, positions: torch.Tensor,
                  latent_tokens: int, *, ops_backend: str | None = None) -> torch.Tensor:
    """Final-normed hidden states of the positions that predict the last ``latent_tokens`` ids.

    Same computation as ``model(input_ids, positions, latent_tokens=N)`` without the ``lm_head``
    (DESIGN §3: latent ``j`` is predicted one position earlier; BOV predicts latent 0).
    ``ops_backend`` overrides the model's for this call only. Returns (B, N, hidden).
    """
    return model.hidden_states(input_ids, positions, latent_tokens=latent_tokens, ops_backend=ops_backend)


class LatentLoss(nn.Module):
    """``model`` plus the latent-token cross-entropy: the module to wrap in DDP / ``torch.compile``.

    ``forward(prompt_ids, x_t, x1)`` builds ``[prompt, BOV, x_t]`` (DESIGN §3), runs the model
    bidirectionally and returns the mean cross-entropy of the predicted codes against ``x1``
    over every latent token, chunked so fp32 logits for long sequences never exist in full.

    Parameters
    ----------
    model : URSATransformer (its parameters are set trainable)
    chunk_size : rows per fp32 logits block
    ops_backend : backend of the model's RMSNorm / RoPE / SwiGLU during training; ``"torch"`` by
        default because its autograd is plain torch. Passed per call: the model's own
        ``ops_backend`` (e.g. an Engine sharing it) is left alone.
    """

    def __init__(self, model: URSATransformer, *, chunk_size: int = 2048, ops_backend: str = "torch"):
        super().__init__()
        self.model = model.requires_grad_(True)
        self.chunk_size = chunk_size
        self.ops_backend = ops_backend

    def forward(self, prompt_ids: torch.Tensor, x_t: torch.Tensor, x1: torch.Tensor, *,
                ignore: torch.Tensor | None = None) -> torch.Tensor:
        """
        Parameters
        ----------
        prompt_ids : (B, P) left-padded prompt ids
        x_t : (B, T, H, W) noised tokens (model input); x1 : (B, T, H, W) clean tokens (targets)
        ignore : optional bool (B, T, H, W): tokens left out of the loss (e.g. given frames)

        Returns
        -------
        0-dim float32 loss
        """
        if x_t.shape != x1.shape or x1.dim() != 4:
            raise ValueError(f"x_t, x1: expected equal (B, T, H, W) shapes, got {tuple(x_t.shape)}, "
                             f"{tuple(x1.shape)}")
        cfg = self.model.config
        if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2 or prompt_ids.shape[0] != x1.shape[0]:
            got = tuple(prompt_ids.shape) if isinstance(prompt_ids, torch.Tensor) else type(prompt_ids).__name__
            raise ValueError(f"prompt_ids: expected (B, P) with B={x1.shape[0]} (the batch of x1), got {got}")
        if ignore is not None and (not isinstance(ignore, torch.Tensor) or ignore.shape != x1.shape):
            got = tuple(ignore.shape) if isinstance(ignore, torch.Tensor) else type(ignore).__name__
            raise ValueError(f"ignore: expected a bool tensor of shape {tuple(x1.shape)}, got {got}")
        K = self.model.lm_head.weight.shape[0]
        # One check (one host sync); the targets are x1, so the loss below skips its own.
        _check_ids(("prompt_ids", prompt_ids, cfg.vocab_size, None), ("x_t", x_t, K, None), ("x1", x1, K, None))
        B, P, N = x1.shape[0], prompt_ids.shape[1], x1[0].numel()
        ids = sequence_ids(prompt_ids, x_t, cfg)
        pos = latent_positions(P, tuple(x1.shape[1:]), device=ids.device)
        h = latent_hidden(self.model, ids, pos, N, ops_backend=self.ops_backend)  # (B, N, hidden)
        targets = x1.reshape(B, N).long()
        if ignore is not None:
            targets = targets.masked_fill(ignore.reshape(B, N), IGNORE_INDEX)
        return _linear_cross_entropy(h, self.model.lm_head.weight, targets, self.chunk_size, IGNORE_INDEX)
