"""Bytes each rank sends in one denoising step of a parallel layout, from the model config (issue 13).

Counts what :mod:`.generate` moves (per rank, one direction; activations in ``act_bytes``, bf16 = 2):

* **Ulysses** (a sequence group of ``g`` ranks, ``rows`` sequences of ``L`` positions): per layer an
  all-to-all of q, k, v before attention and of the output after; a rank keeps ``1/g`` of each and
  sends the rest: ``(g − 1)/g · rows · ⌈L/g⌉ · (2·Hq + 2·Hkv) · D · act_bytes`` per layer;
* **CFG exchange** (guided steps, cfg = 2): each rank sends its peer the final hidden states of the
  half of its latent tokens the peer draws: ``B · ⌈n/(2·sp)⌉ · hidden · act_bytes``. Sending logits
  instead would be ``K / hidden`` times more (64,000 / 2,048 = 31× at 1.7B);
* **tokens**: the new tokens of the rank's draw range, all-gathered every step (int64) over the ``g = cfg·sp``
  drawing ranks; a ring all-gather has each rank send ``g − 1`` chunks: ``(g − 1) · B · ⌈n/g⌉ · 8``.

Data parallel moves nothing per step (the samples are independent; the tokens are gathered once).
"""

from __future__ import annotations

import math

from .mesh import Layout, parse_layout


def ulysses_bytes(config, rows: int, length: int, group: int, act_bytes: int = 2) -> int:
    """Bytes one rank sends in the all-to-alls of one forward over a sequence group of ``group`` ranks."""
    if group == 1:
        return 0
    local = math.ceil(length / group)
    per_layer = rows * local * (2 * config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    return int(config.num_hidden_layers * per_layer * act_bytes * (group - 1) // group)


def step_bytes(config, latents_shape, layout, *, batch: int = 1, prompt_len: int = 320, guided: bool = True,
               act_bytes: int = 2) -> dict:
    """Bytes one rank sends in one step of ``layout`` (a layout string or :class:`Layout`) for
    ``batch`` samples per dp rank.

    Returns
    -------
    dict with ``ulysses``, ``cfg_exchange``, ``cfg_logits_instead`` (what a logits exchange would
    send: not what runs), ``tokens``, ``total`` (bytes), ``sequence_group`` (ranks sharing one
    sequence's forward) and ``forward_ranks`` (ranks over which the step's compute is split)
    """
    lay: Layout = parse_layout(layout)
    n = math.prod(int(v) for v in latents_shape)
    L = prompt_len + 1 + n
    K, H = config.lm_head_size, config.hidden_size
    cfg_exchange = logits_instead = 0
    if guided and lay.cfg == 2:
        group, rows, split = lay.sp, batch, lay.sp * 2
        half = math.ceil(n / split)
        cfg_exchange, logits_instead = batch * half * H * act_bytes, batch * half * K * act_bytes
        forward_ranks = lay.sp * 2
    elif guided:
        group, rows, forward_ranks = lay.sp, 2 * batch, lay.sp
    elif lay.cfg == 2 and config.num_key_value_heads % (2 * lay.sp) == 0:
        group, rows, forward_ranks = 2 * lay.sp, batch, 2 * lay.sp
    else:  # cfg = 1, or both cfg ranks run the conditional rows (kv heads do not split cfg·sp ways)
        group, rows, forward_ranks = lay.sp, batch, lay.sp
    ul = ulysses_bytes(config, rows, L, group, act_bytes)
    drawers = lay.cfg * lay.sp
    tokens = (drawers - 1) * batch * math.ceil(n / drawers) * 8  # ring all-gather: g − 1 chunks a rank
    return {"ulysses": ul, "cfg_exchange": cfg_exchange, "cfg_logits_instead": logits_instead, "tokens": tokens,
            "total": ul + cfg_exchange + tokens, "sequence_group": group, "forward_ranks": forward_ranks,
            "rows_per_forward": rows, "seq_len": L, "latent_tokens": n}


def expected_step_s(config, latents_shape, layout, *, single_gpu_step_s: float, batch: int = 1,
                    prompt_len: int = 320, guided: bool = True, link_bytes_per_s: float = 450e9,
                    act_bytes: int = 2) -> dict:
    """Expected wall time of one step: the single-GPU step time of the same ``batch`` (guided: 2·batch
    rows) divided over the ranks that share its compute, plus the bytes sent at ``link_bytes_per_s``
    (no overlap of communication and compute assumed: an upper estimate)."""
    b = step_bytes(config, latents_shape, layout, batch=batch, prompt_len=prompt_len, guided=guided,
                   act_bytes=act_bytes)
    compute = single_gpu_step_s / b["forward_ranks"]
    comm = b["total"] / link_bytes_per_s
    return {"compute_s": compute, "comm_s": comm, "step_s": compute + comm, "bytes": b}
