"""The latent-token loss (DESIGN §3): the chunked linear cross-entropy (the torch twin of the fused
kernel) and :class:`LatentLoss`, the module to wrap in DDP / ``torch.compile``."""

from __future__ import annotations

import torch
from torch import nn

from .. import _validate, model_ops
from ..model import URSATransformer, latent_positions, sequence_ids

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------- loss
LOSS_REDUCTIONS = ("mean", "sum", "none")
LOSS_BACKENDS = ("auto", "torch", "triton")
_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _softmax_grad_(e, inv_norm, lse, safe, coef, temperature: float, z_loss: float):
    """``coef_i · ((1 + 2·z_loss·lse_i)·softmax(z_i) − onehot(y_i)) / T`` in place of ``e`` (c, K).

    ``e · inv_norm`` is the softmax (``e = exp(z − max)``, ``inv_norm = 1 / Σ e``; or ``e = exp(z − lse)``,
    ``inv_norm = 1``). The result is the gradient of ``coef_i · (lse_i − z_i[y_i] + z_loss·lse_i²)`` with
    respect to the raw logits ``h_i·W_jᵀ`` (``z = raw / T``; DESIGN §9 "Fused linear cross-entropy").
    Rows with ``coef_i = 0`` (ignored) come out 0.
    """
    scale = inv_norm * (1 + 2 * z_loss * lse) if z_loss else inv_norm
    g = e if isinstance(scale, float) and scale == 1.0 else e.mul_(scale[:, None])
    g.scatter_add_(1, safe[:, None], -torch.ones_like(g[:, :1]))
    return g.mul_((coef / temperature)[:, None])


class _ChunkedLinearCE(torch.autograd.Function):
    """The torch twin: weighted cross-entropy of ``hidden @ weight.T / T`` computed chunk by chunk.

    Neither the (n, K) logits nor their softmax ever exist in full: peak extra memory is one
    (chunk, K) block in the compute dtype (fp32; fp64 when an input is fp64). Two schemes:

    * ``reduction`` "mean" / "sum": the forward also computes both gradients chunk by chunk (the
      Liger-Kernel scheme: one pass, three matmuls a chunk) and the backward scales them by the
      incoming scalar gradient;
    * "none": the incoming gradient is a vector, known only in the backward, so the forward keeps
      the per-row log-sum-exp (n floats) and the backward recomputes each chunk's logits.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, weights, ignore_index: int, temperature: float, z_loss: float,
                reduction: str, chunk_size: int, need_grad: bool):
        # hidden: (n, h); weight: (K, h); targets, weights: (n,). ``need_grad`` comes from the caller:
        # under torch.no_grad ctx.needs_input_grad still follows requires_grad, so it cannot tell.
        cd = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
        valid = targets != ignore_index
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        w = valid.to(cd) if weights is None else torch.where(valid, weights.to(cd), torch.zeros((), dtype=cd,
                                                                                                  device=valid.device))
        count = valid.sum().clamp_min(1).to(cd)
        coef = w / count if reduction == "mean" else w
        wc = weight.to(cd)
        fused = need_grad and reduction != "none"
        grad_h = torch.empty_like(hidden) if fused else None
        grad_w = torch.zeros_like(wc) if fused else None
        lse_all = torch.empty(hidden.shape[0], dtype=cd, device=hidden.device) if need_grad and not fused else None
        losses = torch.empty(hidden.shape[0], dtype=cd, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk_size):
            h = hidden[s : s + chunk_size].to(cd)
            y = safe[s : s + chunk_size]
            logits = h @ wc.T  # (c, K): the only block of that size alive (everything below is in place)
            if temperature != 1.0:
                logits.mul_(1.0 / temperature)
            picked = logits.gather(1, y[:, None])[:, 0]
            top = logits.amax(-1)
            e = logits.sub_(top[:, None]).exp_()  # exp(z − max); torch.logsumexp would add a second block
            total = e.sum(-1)
            lse = top + total.log()
            row = lse - picked
            if z_loss:
                row = row + z_loss * lse.square()
            losses[s : s + chunk_size] = torch.where(valid[s : s + chunk_size], row * w[s : s + chunk_size], 0.0)
            if fused:
                g = _softmax_grad_(e, total.reciprocal(), lse, y, coef[s : s + chunk_size], temperature, z_loss)
                grad_h[s : s + chunk_size] = (g @ wc).to(hidden.dtype)
                grad_w.addmm_(g.T, h)  # no (K, h) temporary
            elif lse_all is not None:
                lse_all[s : s + chunk_size] = lse
            logits = e = g = None  # the block is freed before the next chunk's is allocated
        ctx.fused, ctx.reduction = fused, reduction
        ctx.temperature, ctx.z_loss, ctx.chunk_size = temperature, z_loss, chunk_size
        if fused:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        elif need_grad:
            ctx.save_for_backward(hidden, weight, safe, w, lse_all)
        if reduction == "none":
            return losses
        return losses.sum() / count if reduction == "mean" else losses.sum()

    @staticmethod
    def backward(ctx, grad_out):
        need_h, need_w = ctx.needs_input_grad[:2]
        if ctx.fused:
            grad_h, grad_w = ctx.saved_tensors
            return (grad_h * grad_out.to(grad_h.dtype) if need_h else None,
                    grad_w * grad_out.to(grad_w.dtype) if need_w else None) + (None,) * 8
        hidden, weight, safe, w, lse = ctx.saved_tensors
        cd, cs = lse.dtype, ctx.chunk_size
        coef = torch.where(w != 0, w * grad_out.to(cd), 0.0)  # a weight-0 row contributes 0 (no 0·inf = NaN)
        wc = weight.to(cd)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(wc) if need_w else None
        for s in range(0, hidden.shape[0], cs):
            h = hidden[s : s + cs].to(cd)
            logits = h @ wc.T
            if ctx.temperature != 1.0:
                logits.mul_(1.0 / ctx.temperature)
            e = logits.sub_(lse[s : s + cs, None]).exp_()  # the softmax, in place
            g = _softmax_grad_(e, 1.0, lse[s : s + cs], safe[s : s + cs], coef[s : s + cs], ctx.temperature,
                               ctx.z_loss)
            if need_h:
                grad_h[s : s + cs] = (g @ wc).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(g.T, h)
            logits = e = g = None  # the block is freed before the next chunk's is allocated
        return grad_h, grad_w.to(weight.dtype) if need_w else None, *(None,) * 8


class _TritonLinearCE(torch.autograd.Function):
    """The fused Triton kernels (``ursa::linear_ce_forward`` / ``ursa::linear_ce_backward``): the
    forward keeps the per-row log-sum-exp; the backward recomputes the logits tile by tile."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, weights, ignore_index: int, temperature: float, z_loss: float,
                reduction: str):
        lse, losses = torch.ops.ursa.linear_ce_forward(hidden, weight, targets, weights, ignore_index, temperature,
                                                       z_loss)
        valid = targets != ignore_index
        count = valid.sum().clamp_min(1).to(torch.float32)
        ctx.save_for_backward(hidden, weight, targets, weights, lse, count)
        ctx.reduction, ctx.ignore_index, ctx.temperature, ctx.z_loss = reduction, ignore_index, temperature, z_loss
        if reduction == "none":
            return losses
        return losses.sum() / count if reduction == "mean" else losses.sum()

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, weights, lse, count = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        valid = targets != ctx.ignore_index
        w = valid.to(torch.float32) if weights is None else torch.where(valid, weights.float(), 0.0)
        coef = torch.where(w != 0, w * grad_out.float(), 0.0)  # a weight-0 row contributes 0 (no 0·inf = NaN)
        if ctx.reduction == "mean":
            coef = coef / count
        dh, dw = torch.ops.ursa.linear_ce_backward(hidden, weight, targets, lse, coef, ctx.temperature, ctx.z_loss,
                                                   bool(need_h), bool(need_w))
        return (dh.to(hidden.dtype) if need_h else None, dw.to(weight.dtype) if need_w else None) + (None,) * 6


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         weights: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX,
                         temperature: float = 1.0, z_loss: float = 0.0, reduction: str = "mean",
                         chunk_size: int = 2048, backend: str = "auto") -> torch.Tensor:
    """Weighted cross-entropy of the logits ``hidden @ weight.T / temperature``, never all in memory.

    Per row i (DESIGN §9 "Fused linear cross-entropy"), with ``z_i = h_i Wᵀ / T``::

        loss_i = w_i · (logsumexp(z_i) − z_i[y_i] + z_loss · logsumexp(z_i)²),   0 where y_i == ignore_index

    Parameters
    ----------
    hidden : (..., h) final-normed hidden states (any float dtype; bf16 / fp16 / fp32 for Triton)
    weight : (K, h) the ``lm_head`` weight (Triton: same dtype and device as ``hidden``)
    targets : (...) integer ids in [0, K), or ``ignore_index``
    weights : optional float (...) per-row weights ``w_i`` (e.g. advantages; may be negative), shaped
        like ``targets``; default 1. Treated as constants: no gradient flows to them.
    ignore_index : target id of rows left out (weight 0, not counted by "mean")
    temperature : T > 0 dividing the logits
    z_loss : coefficient ≥ 0 of the ``logsumexp²`` penalty (also weighted by ``w_i``)
    reduction : "mean" (Σ loss_i / number of non-ignored rows), "sum", or "none" (per-row losses)
    chunk_size : rows per logits block of the torch backend (peak extra memory: one (chunk, K) fp32 block)
    backend : "torch" (chunked, this module), "triton" (fused kernels, ``ursa::linear_ce_*``: logits
        only in registers / shared memory; on the CPU only under ``TRITON_INTERPRET=1``), or "auto"
        (Triton on a CUDA device where it can run, else torch)

    Returns
    -------
    "mean" / "sum": 0-dim; "none": shaped like ``targets`` (ignored rows 0). float32 (float64 when an
    input is float64, torch backend). Differentiable in ``hidden`` and ``weight`` only.
    """
    _check_loss_args(hidden, weight, targets, weights, temperature, z_loss, reduction, chunk_size, backend)
    _check_ids(("targets", targets, weight.shape[0], ignore_index))
    return _linear_cross_entropy(hidden, weight, targets, chunk_size, ignore_index, weights=weights,
                                 temperature=temperature, z_loss=z_loss, reduction=reduction, backend=backend)


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                    backend: str = "auto", chunk_size: int = 2048) -> torch.Tensor:
    """``log softmax(hidden @ weight.T / temperature)[targets]`` per row, never all logits in memory.

    The negated ``reduction="none"`` loss of :func:`linear_cross_entropy` (same backends, same
    memory); every target must be a real id (no ignore index).

    Parameters
    ----------
    hidden : (..., h); weight : (K, h); targets : (...) ids in [0, K)
    temperature, backend, chunk_size : as for :func:`linear_cross_entropy`

    Returns
    -------
    float32 (float64 for float64 inputs, torch backend), shaped like ``targets``; differentiable
    in ``hidden`` and ``weight``.
    """
    _check_loss_args(hidden, weight, targets, None, temperature, 0.0, "none", chunk_size, backend)
    _check_ids(("targets", targets, weight.shape[0], None))
    return -_linear_cross_entropy(hidden, weight, targets, chunk_size, IGNORE_INDEX, temperature=temperature,
                                  reduction="none", backend=backend)


def _check_loss_args(hidden, weight, targets, weights, temperature, z_loss, reduction, chunk_size, backend) -> None:
    """Argument checks of :func:`linear_cross_entropy` (ids apart), each error naming its argument."""
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point() or hidden.dim() < 1:
        raise ValueError(f"hidden: expected a float tensor (..., h), got {_describe(hidden)}")
    if not isinstance(targets, torch.Tensor) or hidden.shape[:-1] != targets.shape:
        got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"targets: shape {got} does not match hidden {tuple(hidden.shape[:-1])}")
    if (not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2
            or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1):
        raise ValueError(f"weight: expected a float (K, {hidden.shape[-1]}) tensor with K >= 1, got "
                         f"{_describe(weight)}")
    if weight.device != hidden.device:
        raise ValueError(f"weight: on {weight.device}, hidden on {hidden.device}")
    if weights is not None and (not isinstance(weights, torch.Tensor) or not weights.is_floating_point()
                                or weights.shape != targets.shape or weights.device != hidden.device):
        raise ValueError(f"weights: expected a float tensor of shape {tuple(targets.shape)} on {hidden.device}, "
                         f"got {_describe(weights)}")
    _validate.positive("temperature", temperature)
    if _validate.finite("z_loss", z_loss) < 0:
        raise ValueError(f"z_loss: must be >= 0, got {z_loss!r}")
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"reduction: expected one of {LOSS_REDUCTIONS}, got {reduction!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: must be an int >= 1, got {chunk_size!r}")
    if backend not in LOSS_BACKENDS:
        raise ValueError(f"backend: expected one of {LOSS_BACKENDS}, got {backend!r}")
    if backend == "triton":
        _check_triton_dtypes(hidden, weight)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} {tuple(x.shape)} on {x.device}"
    return type(x).__name__


def _check_triton_dtypes(hidden, weight) -> None:
    if hidden.dtype not in _TRITON_DTYPES:
        raise ValueError(f"hidden: backend='triton' takes bf16 / fp16 / fp32, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight: backend='triton' needs the dtype of hidden ({hidden.dtype}), got {weight.dtype}")


def _resolve_loss_backend(backend: str, hidden, weight) -> str:
    """"torch" or "triton"; "auto" takes Triton only where it runs natively (CUDA, or as-GPU
    planning) and the dtypes suit it; "triton" raises when it cannot run (model_ops' rule)."""
    if backend == "auto" and (hidden.dtype not in _TRITON_DTYPES or weight.dtype != hidden.dtype):
        return "torch"
    return model_ops.resolve_backend(backend, hidden.device)


def _linear_cross_entropy(hidden, weight, targets, chunk_size, ignore_index, *, weights=None, temperature=1.0,
                          z_loss=0.0, reduction="mean", backend="torch"):
    """:func:`linear_cross_entropy` without the checks (callers that validated their ids)."""
    shape = targets.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).long()
    weights = None if weights is None else weights.reshape(-1).detach()
    if _resolve_loss_backend(backend, hidden, weight) == "triton":
        out = _TritonLinearCE.apply(hidden, weight, targets, weights, int(ignore_index), float(temperature),
                                    float(z_loss), reduction)
    else:
        need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
        out = _ChunkedLinearCE.apply(hidden, weight, targets, weights, int(ignore_index), float(temperature),
                                     float(z_loss), reduction, int(chunk_size), need_grad)
    return out.reshape(shape) if reduction == "none" else out


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
    backend : backend of the loss (:func:`linear_cross_entropy`): "auto", "torch" or "triton"
    """

    def __init__(self, model: URSATransformer, *, chunk_size: int = 2048, ops_backend: str = "torch",
                 backend: str = "auto"):
        super().__init__()
        if backend not in LOSS_BACKENDS:
            raise ValueError(f"backend: expected one of {LOSS_BACKENDS}, got {backend!r}")
        self.model = model.requires_grad_(True)
        self.chunk_size = chunk_size
        self.ops_backend = ops_backend
        self.backend = backend

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
        return _linear_cross_entropy(h, self.model.lm_head.weight, targets, self.chunk_size, IGNORE_INDEX,
                                     backend=self.backend)
