"""LoRA adapters on the URSA transformer's linear layers, saved in PEFT's layout (DESIGN §9).

For a target linear ``W (out, in)``: ``W' = W + s·(α / r)·B A`` with ``A (r, in)`` random (PEFT's
Kaiming-uniform init), ``B (out, r)`` zeros, so a fresh adapter changes nothing (rsLoRA: ``α / √r``).
Targets use the published module names (DESIGN §3): ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``,
``gate_proj``, ``up_proj``, ``down_proj``. The model keeps q / k / v and gate / up fused
(``qkv_proj``, ``gate_up_proj``); each published projection is a block of rows of the fused weight and
gets its own ``A`` / ``B``, so the adapter is the same one PEFT would attach to the unfused model.

The adapter lives beside the model, not in it: forward hooks on the fused linears add
``s (α/r) (x Aᵀ) Bᵀ`` to their output, so the model's ``state_dict`` and its checkpoint names stay
untouched and the engine samples the adapted model as it is::

    adapter = LoRAAdapter(model, rank=8, alpha=16)       # model's own weights stay frozen
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-3)
    ...
    adapter.save_pretrained("adapter/")   # adapter_model.safetensors + adapter_config.json
    adapter.merge()                       # folds B A into the weights, removes the hooks

Saved keys: ``base_model.model.<module path>.lora_A.weight`` / ``lora_B.weight`` with the published
path, e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``. The math, the fused
sites and the PEFT files are those of :mod:`ursa_engine.adapters` (one implementation for training,
the engine's merged adapters and the server's per-request ones): a saved adapter loads with
``Engine.load_lora`` / ``ursa-engine generate --lora``.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
from torch import nn

from .. import adapters as _adapters
from ..adapters import CONFIG_NAME, TARGETS, WEIGHTS_NAME, LoRAWeights, read_adapter

__all__ = ["CONFIG_NAME", "LoRAAdapter", "TARGETS", "WEIGHTS_NAME"]
_PREFIX = _adapters.PREFIX


def _key(path: str) -> str:
    return path.replace(".", "__")  # ParameterDict keys cannot hold dots


class LoRAAdapter(nn.Module):
    """Low-rank adapters on an :class:`~ursa_engine.URSATransformer`, applied by forward hooks.

    Parameters
    ----------
    model : the transformer to adapt (its own parameters are left as they are; freeze them yourself
        if they had ``requires_grad``)
    rank : r
    alpha : α (default ``2 r``)
    targets : published module names to adapt (subset of :data:`TARGETS`)
    rslora : scale by ``α / √r`` instead of ``α / r``
    seed : seeds the init of the ``A`` matrices

    Attributes
    ----------
    lora_A, lora_B : ParameterDicts keyed by the published module path (dots as ``__``):
        ``A (r, in)``, ``B (rows, r)``
    scale : the user's ``s`` (1.0); ``enabled`` False (or :meth:`disabled`) runs the base model
    """

    def __init__(self, model: nn.Module, rank: int, alpha: float | None = None, *, targets=TARGETS,
                 rslora: bool = False, seed: int = 0):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank: expected a positive int, got {rank!r}")
        targets = tuple(targets)
        if not targets or set(targets) - set(TARGETS):
            raise ValueError(f"targets: expected a non-empty subset of {TARGETS}, got {targets}")
        self.rank, self.alpha = rank, float(2 * rank if alpha is None else alpha)
        self.targets, self.rslora = targets, rslora
        self.scaling = _adapters.lora_scaling(self.alpha, rank, rslora)
        self.scale, self.enabled, self.merged = 1.0, True, False
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        gen = torch.Generator().manual_seed(seed)
        self._sites: list[tuple[nn.Linear, tuple]] = []  # the fused linear, its parts (adapters.Part)
        self._hooks = []
        for mpath, parts in _adapters.fused_sites(model.config):
            linear = model.get_submodule(mpath)
            if not any(p.name in targets for p in parts):
                continue
            w = linear.weight
            for p in parts:
                if p.name not in targets:
                    continue
                bound = 1.0 / math.sqrt(w.shape[1])  # kaiming_uniform_(a=√5), as nn.Linear and PEFT
                A = (torch.rand(rank, w.shape[1], generator=gen) * 2 - 1) * bound
                self.lora_A[_key(p.path)] = nn.Parameter(A.to(w.device, w.dtype))
                self.lora_B[_key(p.path)] = nn.Parameter(torch.zeros(p.rows, rank, device=w.device, dtype=w.dtype))
            self._sites.append((linear, parts))
            self._hooks.append(linear.register_forward_hook(self._hook(parts)))

    def _hook(self, parts):
        def add_delta(module, args, out):
            if not self.enabled:
                return out
            x = args[0]
            gain = self.scale * self.scaling
            pieces = []
            for p in parts:
                k = _key(p.path)
                if k in self.lora_A:
                    pieces.append(_adapters.lora_delta(x, self.lora_A[k], self.lora_B[k], gain))
                else:
                    pieces.append(x.new_zeros(*x.shape[:-1], p.rows))
            delta = pieces[0] if len(pieces) == 1 else torch.cat(pieces, -1)
            return out + delta  # out of place: autograd records through it

        return add_delta

    @contextlib.contextmanager
    def disabled(self):
        """Run the base model inside the block (e.g. the frozen reference of a KL penalty)."""
        before, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = before

    def delta(self, path: str) -> torch.Tensor:
        """``s (α/r) B A`` (rows, in) of one published module path."""
        k = _key(path)
        return _adapters.weight_delta(self.lora_A[k], self.lora_B[k], self.scale * self.scaling)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every delta into the model's weights and remove the hooks (the adapter is spent)."""
        if self.merged:
            raise RuntimeError("merge: this adapter was already merged")
        for linear, parts in self._sites:
            for p in parts:
                if _key(p.path) in self.lora_A:
                    linear.weight[p.start : p.start + p.rows] += self.delta(p.path).to(linear.weight.dtype)
        self.remove()
        self.merged = True

    def remove(self) -> None:
        """Detach the hooks without merging: the model is the base model again."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # ------------------------------------------------------------------ PEFT layout
    def as_weights(self) -> LoRAWeights:
        """The adapter's current A / B (detached) as :class:`ursa_engine.adapters.LoRAWeights`."""
        weights = {k.replace("__", "."): (A.detach(), self.lora_B[k].detach()) for k, A in self.lora_A.items()}
        return LoRAWeights(self.rank, self.alpha, self.rslora, weights, source="LoRAAdapter")

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """``base_model.model.<published path>.lora_{A,B}.weight`` -> tensor (detached)."""
        return self.as_weights().state_dict()

    def peft_config(self) -> dict:
        return self.as_weights().config()

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write ``adapter_model.safetensors`` and ``adapter_config.json`` (PEFT's names) to ``folder``."""
        self.as_weights().save_pretrained(folder)

    @classmethod
    def from_pretrained(cls, model: nn.Module, folder: str | os.PathLike) -> LoRAAdapter:
        """Attach a saved adapter (this module's or PEFT's, same keys; checked by
        :func:`ursa_engine.adapters.read_adapter`) to ``model``, unmerged and trainable."""
        saved = read_adapter(folder, model.config)
        adapter = cls(model, saved.r, saved.alpha, targets=saved.targets, rslora=saved.rslora)
        missing = sorted(set(adapter.as_weights().weights) - set(saved.weights))
        if missing:
            adapter.remove()
            raise ValueError(f"{folder}: adapter keys differ: missing {missing[:4]} ({len(missing)} in all)")
        with torch.no_grad():
            for k in adapter.lora_A:
                A, B = saved.weights[k.replace("__", ".")]
                adapter.lora_A[k].copy_(A)
                adapter.lora_B[k].copy_(B)
        return adapter
