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
path, e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import torch
from torch import nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def _published_parts(model) -> list[tuple[str, list[tuple[str, int]]]]:
    """(model module path, [(published path, rows)]) of every linear that LoRA may target."""
    cfg = model.config
    d, hq, hkv, inter = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    out = []
    for n in range(cfg.num_hidden_layers):
        a, m = f"model.layers.{n}.self_attn.", f"model.layers.{n}.mlp."
        out += [(a + "qkv_proj", [(a + "q_proj", hq * d), (a + "k_proj", hkv * d), (a + "v_proj", hkv * d)]),
                (a + "o_proj", [(a + "o_proj", cfg.hidden_size)]),
                (m + "gate_up_proj", [(m + "gate_proj", inter), (m + "up_proj", inter)]),
                (m + "down_proj", [(m + "down_proj", cfg.hidden_size)])]
    return out


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
        self.scaling = self.alpha / (math.sqrt(rank) if rslora else rank)
        self.scale, self.enabled, self.merged = 1.0, True, False
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        gen = torch.Generator().manual_seed(seed)
        self._sites: list[tuple[nn.Linear, list[tuple[str, int]]]] = []  # the fused linear, its parts
        self._hooks = []
        for mpath, parts in _published_parts(model):
            linear = model.get_submodule(mpath)
            if not any(p.rsplit(".", 1)[1] in targets for p, _ in parts):
                continue
            w = linear.weight
            for path, rows in parts:
                if path.rsplit(".", 1)[1] not in targets:
                    continue
                bound = 1.0 / math.sqrt(w.shape[1])  # kaiming_uniform_(a=√5), as nn.Linear and PEFT
                A = (torch.rand(rank, w.shape[1], generator=gen) * 2 - 1) * bound
                self.lora_A[_key(path)] = nn.Parameter(A.to(w.device, w.dtype))
                self.lora_B[_key(path)] = nn.Parameter(torch.zeros(rows, rank, device=w.device, dtype=w.dtype))
            self._sites.append((linear, parts))
            self._hooks.append(linear.register_forward_hook(self._hook(parts)))

    def _hook(self, parts):
        def add_delta(module, args, out):
            if not self.enabled:
                return out
            x = args[0]
            pieces = []
            for path, rows in parts:
                k = _key(path)
                if k in self.lora_A:
                    pieces.append((x @ self.lora_A[k].t()) @ self.lora_B[k].t())
                else:
                    pieces.append(x.new_zeros(*x.shape[:-1], rows))
            delta = pieces[0] if len(pieces) == 1 else torch.cat(pieces, -1)
            return out + (self.scale * self.scaling) * delta

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
        return (self.scale * self.scaling) * (self.lora_B[k] @ self.lora_A[k])

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every delta into the model's weights and remove the hooks (the adapter is spent)."""
        if self.merged:
            raise RuntimeError("merge: this adapter was already merged")
        for linear, parts in self._sites:
            start = 0
            for path, rows in parts:
                if _key(path) in self.lora_A:
                    linear.weight[start : start + rows] += self.delta(path).to(linear.weight.dtype)
                start += rows
        self.remove()
        self.merged = True

    def remove(self) -> None:
        """Detach the hooks without merging: the model is the base model again."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # ------------------------------------------------------------------ PEFT layout
    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """``base_model.model.<published path>.lora_{A,B}.weight`` -> tensor (detached)."""
        out = {}
        for k, A in self.lora_A.items():
            path = k.replace("__", ".")
            out[f"{_PREFIX}{path}.lora_A.weight"] = A.detach()
            out[f"{_PREFIX}{path}.lora_B.weight"] = self.lora_B[k].detach()
        return out

    def peft_config(self) -> dict:
        return {"peft_type": "LORA", "r": self.rank, "lora_alpha": self.alpha, "use_rslora": self.rslora,
                "target_modules": list(self.targets), "lora_dropout": 0.0, "bias": "none",
                "fan_in_fan_out": False, "init_lora_weights": True, "task_type": None}

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write ``adapter_model.safetensors`` and ``adapter_config.json`` (PEFT's names) to ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.to("cpu").contiguous() for k, v in self.peft_state_dict().items()}
        save_file(state, folder / WEIGHTS_NAME, metadata={"format": "pt"})
        with open(folder / CONFIG_NAME, "w") as f:
            json.dump(self.peft_config(), f, indent=2)

    @classmethod
    def from_pretrained(cls, model: nn.Module, folder: str | os.PathLike) -> LoRAAdapter:
        """Attach a saved adapter (this module's or PEFT's, same keys) to ``model``."""
        from safetensors.torch import load_file

        folder = Path(folder)
        with open(folder / CONFIG_NAME) as f:
            cfg = json.load(f)
        if cfg.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{folder}: not a LoRA adapter (peft_type {cfg.get('peft_type')!r})")
        adapter = cls(model, int(cfg["r"]), float(cfg["lora_alpha"]), targets=cfg["target_modules"],
                      rslora=bool(cfg.get("use_rslora", False)))
        state = load_file(folder / WEIGHTS_NAME)
        expected = adapter.peft_state_dict()
        if set(state) != set(expected):
            missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            raise ValueError(f"{folder}: adapter keys differ: missing {missing[:4]}, unexpected {extra[:4]}")
        with torch.no_grad():
            for k in adapter.lora_A:
                path = _PREFIX + k.replace("__", ".")
                adapter.lora_A[k].copy_(state[path + ".lora_A.weight"])
                adapter.lora_B[k].copy_(state[path + ".lora_B.weight"])
        return adapter
