"""The attention a CUDA device would run, for plans on fake CPU tensors (issue 20).

:func:`ursa_engine.attention.attention` picks its kernel from the device: flash-attn (GQA native)
when importable on CUDA, else SDPA, which on CUDA gets k / v **expanded** to the query heads (not
every SDPA kernel honours ``enable_gqa``: two (B, Hq, L, D) copies a layer, alive while the kernel
runs and, in training, saved for its backward). A fake run on the CPU would take the CPU branch
(``enable_gqa``, nothing expanded); :func:`planned_attention` gives the plans the CUDA choice instead:
the backend ``resolve_attention`` picks for a CUDA device, a label naming it, and, when SDPA
expands, an ``attend`` function that makes the same expansion (so its bytes are counted) before the
CPU's fused SDPA kernel (output and log-sum-exp, like CUDA's flash / memory-efficient kernels).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ..attention import _expand_kv, resolve_attention


def planned_attention(model, dtype: torch.dtype, rows: int, seq_len: int,
                      device="cuda") -> tuple[str, str, int, object | None]:
    """(backend name, label, expansion bytes a layer, ``attend`` or None) of ``model`` on ``device``.

    Parameters
    ----------
    model : an :class:`ursa_engine.URSATransformer` (its ``attn_backend`` and config)
    dtype : the compute dtype; rows, seq_len : the batch rows and L of the forward
    device : ``"cuda"`` (the plans' GPU) or ``"cpu"`` (the CPU's own choice: SDPA with ``enable_gqa``,
        nothing expanded; the fake run already makes it)
    """
    cfg = model.config
    Hq, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    device = torch.device(device)
    name = resolve_attention(model.attn_backend, device, dtype, D, seq_len=seq_len)
    if device.type != "cuda" and name != "math":
        return name, f"SDPA {name} on the CPU (output + log-sum-exp; enable_gqa: k / v not expanded)", 0, None
    if name == "math":
        return name, "math (fp32 L x L scores: not fused)", 0, None
    if name == "flash":
        return name, "flash-attn (output + log-sum-exp; no L x L buffer; k / v not expanded: GQA native)", 0, None
    groups = Hq // Hkv
    expand = 2 * rows * Hq * seq_len * D * dtype.itemsize if groups > 1 else 0
    label = (f"SDPA {name} (output + log-sum-exp; no L x L buffer; "
             + (f"k / v expanded to the {Hq} query heads: {expand / 1e9:.3f} GB a layer)" if expand
                else "no GQA: nothing expanded)"))

    def attend(q, k, v, *, backend="auto"):
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        kt, vt = _expand_kv(kt, groups), _expand_kv(vt, groups)  # as attention() does on CUDA
        return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)

    return name, label, expand, attend if groups > 1 else None


@contextlib.contextmanager
def attending(model, attend) -> Iterator[None]:
    """Every attention block of ``model`` runs ``attend`` (None: unchanged) inside the block."""
    blocks = [layer.self_attn for layer in model.model.layers]
    saved = [b.attend for b in blocks]
    if attend is not None:
        for b in blocks:
            b.attend = attend
    try:
        yield
    finally:
        for b, a in zip(blocks, saved, strict=True):
            b.attend = a
