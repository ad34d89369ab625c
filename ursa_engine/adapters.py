"""LoRA adapters in PEFT's layout: reading, merging with an exact unmerge, per-row application (DESIGN §9).

One implementation of the LoRA math and key layout, used by the engine (merged adapters), the
server (adapters per request) and :mod:`ursa_engine.training.lora` (training). For a target linear
``W (out, in)`` and a user scale ``s``::

    W' = W + s·γ·B A            γ = α / r  (rsLoRA: α / √r),  A (r, in),  B (out, r)
    y  = x Wᵀ + s·γ·(x Aᵀ) Bᵀ   the same, unmerged (per group of rows)

Targets are the published module names of DESIGN §3 (``q_proj``, ``k_proj``, ``v_proj``,
``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``). The model keeps q / k / v and gate / up
fused (``qkv_proj``, ``gate_up_proj``): each published projection is a block of rows of the fused
weight (:func:`fused_sites`) with its own ``A`` / ``B``, so an adapter made by PEFT on the unfused
model applies unchanged. Files: ``adapter_config.json`` and ``adapter_model.safetensors`` (or
``adapter_model.bin``, read by ``torch.load(weights_only=True)`` only); keys
``base_model.model.<published path>.lora_A.weight`` / ``.lora_B.weight``, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``.

Refused by name (:class:`AdapterError`): other ``peft_type`` s, DoRA (``use_dora``),
``modules_to_save``, trained biases (``bias`` other than ``"none"``, ``lora_bias``),
``fan_in_fan_out``, per-module ``rank_pattern`` / ``alpha_pattern``, ``layer_replication``,
``target_parameters``, ``trainable_token_indices``, and any key outside the seven targets
(``lm_head``, ``embed_tokens``, ...).

Merging (:class:`MergedAdapters`) keeps a copy of every fused weight an adapter touches, on the
CPU, taken before the first merge: the merged weight is recomputed as
``round(W + Σᵢ sᵢ γᵢ Bᵢ Aᵢ)`` in fp32 from that copy (one rounding, whatever the order adapters
were loaded or unloaded in), and unloading the last adapter copies ``W`` back, bit for bit.
Subtracting the delta again would not: ``(W + δ) − δ`` rounds in bf16 (and in fp32). Weights are
written in place, so CUDA graphs captured over them stay valid and read the new values.

Per-row application (:class:`RowAdapters`) is plain torch: a shrink GEMM ``t = x[rows] Aᵀ`` and
accumulating expand GEMMs ``y[rows, part] += s·γ·t Bᵀ`` per adapter and run of rows. Roofline for
URSA-1.7B in bf16 on an H100 (989 TFLOP/s, 3.0 TB/s), r = 16 on all seven targets, per token and
layer: the base projections are ≈ 100 ns of GEMM at peak, the LoRA passes are memory-bound, ≈ 70 KB
(re-reading x, and the read-modify-write of y) ≈ 23-35 ns, and attention at 33,280 tokens adds
≈ 280 ns: unmerged adapters cost ≈ 6-9 % of a video step. A Triton kernel fusing the expand into the
base GEMM's epilogue would save the y traffic (most of it, leaving ≈ 2 %), but only if it also
matches cuBLAS on the base GEMM; it is not written (no GPU measurement behind it yet).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

__all__ = ["AdapterError", "LoRAWeights", "MergedAdapters", "RowAdapters", "TARGETS", "fused_sites",
           "lora_scaling", "read_adapter"]

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<ab>[AB])\.weight$")
_LIST_MAX = 6


class AdapterError(ValueError):
    """An adapter folder or file this engine cannot apply, with the reason."""


@dataclass(frozen=True)
class Part:
    """One published projection inside a fused linear: rows ``[start, start + rows)`` of its weight."""

    path: str  # published module path, e.g. "model.layers.0.self_attn.q_proj"
    start: int
    rows: int

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[1]


def fused_sites(cfg) -> list[tuple[str, tuple[Part, ...]]]:
    """(module path in the model, its published parts) of every linear LoRA may target, layer by layer.

    Parameters
    ----------
    cfg : the model's :class:`~ursa_engine.config.ModelConfig`
    """
    d, hq, hkv, inter, h = (cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size,
                            cfg.hidden_size)
    out = []
    for n in range(cfg.num_hidden_layers):
        a, m = f"model.layers.{n}.self_attn.", f"model.layers.{n}.mlp."
        out += [(a + "qkv_proj", (Part(a + "q_proj", 0, hq * d), Part(a + "k_proj", hq * d, hkv * d),
                                  Part(a + "v_proj", (hq + hkv) * d, hkv * d))),
                (a + "o_proj", (Part(a + "o_proj", 0, h),)),
                (m + "gate_up_proj", (Part(m + "gate_proj", 0, inter), Part(m + "up_proj", inter, inter))),
                (m + "down_proj", (Part(m + "down_proj", 0, h),))]
    return out


def _in_features(cfg, name: str) -> int:
    return {"o_proj": cfg.num_attention_heads * cfg.head_dim, "down_proj": cfg.intermediate_size}.get(
        name, cfg.hidden_size)


def lora_scaling(alpha: float, r: int, rslora: bool = False) -> float:
    """γ = α / r, or α / √r with rsLoRA (DESIGN §9)."""
    return float(alpha) / (math.sqrt(r) if rslora else r)


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gain: float) -> torch.Tensor:
    """``gain · (x Aᵀ) Bᵀ``: x (..., in), A (r, in), B (rows, r) -> (..., rows) (the unmerged LoRA term)."""
    return (x @ A.t()) @ B.t() * gain


def weight_delta(A: torch.Tensor, B: torch.Tensor, gain: float) -> torch.Tensor:
    """``gain · B A``: (rows, in), the merged LoRA term, in fp32 (fp64 for fp64 factors)."""
    dtype = torch.promote_types(torch.promote_types(A.dtype, B.dtype), torch.float32)
    return (B.to(dtype) @ A.to(dtype)) * gain


def _fmt(names) -> str:
    names = sorted(names)
    return ", ".join(names[:_LIST_MAX]) + (f", ... ({len(names)} in all)" if len(names) > _LIST_MAX else "")


# ---------------------------------------------------------------------- reading
@dataclass
class LoRAWeights:
    """A LoRA adapter read from a PEFT folder (or built in memory).

    Attributes
    ----------
    r, alpha, rslora : PEFT's ``r``, ``lora_alpha``, ``use_rslora``; ``scaling`` is γ
    weights : published module path -> (A (r, in), B (rows, r)), as stored (dtype of the file)
    source : where it was read from (error messages)
    """

    r: int
    alpha: float
    rslora: bool = False
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    source: str = "<memory>"

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.r, self.rslora)

    @property
    def targets(self) -> tuple[str, ...]:
        names = {p.rsplit(".", 1)[1] for p in self.weights}
        return tuple(t for t in TARGETS if t in names)

    @classmethod
    def random(cls, cfg, *, r: int = 8, alpha: float = 16.0, targets=TARGETS, std: float = 0.05, seed: int = 0,
               rslora: bool = False) -> LoRAWeights:
        """An adapter of random A (PEFT's init scale) and random B (``std``: unlike a fresh PEFT adapter it
        changes the model) for ``cfg``'s model: benchmarks and tests."""
        g = torch.Generator().manual_seed(seed)
        weights = {}
        for _, parts in fused_sites(cfg):
            for p in parts:
                if p.name in targets:
                    n_in = _in_features(cfg, p.name)
                    A = (torch.rand(r, n_in, generator=g) * 2 - 1) / math.sqrt(n_in)
                    weights[p.path] = (A, torch.randn(p.rows, r, generator=g) * std)
        return cls(r, float(alpha), rslora, weights, source=f"random(seed={seed})")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """PEFT keys -> tensors."""
        out = {}
        for path, (A, B) in self.weights.items():
            out[f"{PREFIX}{path}.lora_A.weight"] = A
            out[f"{PREFIX}{path}.lora_B.weight"] = B
        return out

    def config(self) -> dict:
        """The ``adapter_config.json`` PEFT writes for this adapter (the fields PEFT needs to load it)."""
        return {"peft_type": "LORA", "r": self.r, "lora_alpha": self.alpha, "use_rslora": self.rslora,
                "target_modules": list(self.targets), "lora_dropout": 0.0, "bias": "none", "use_dora": False,
                "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None, "task_type": None}

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write ``adapter_model.safetensors`` and ``adapter_config.json`` to ``folder``.

        Each file is written to a temporary file in ``folder`` and renamed over its name (weights
        first, config last): a failed or interrupted save leaves no half-written file.
        """
        import tempfile

        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        writers = ((WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"})),
                   (CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(self.config(), indent=2) + "\n")))
        for name, write in writers:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
            os.close(fd)
            try:
                write(tmp)
                os.replace(tmp, folder / name)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        return folder

    def check(self, cfg) -> None:
        """Raise :class:`AdapterError` listing every path this model lacks and every mis-shaped A / B."""
        parts = {p.path: p for _, ps in fused_sites(cfg) for p in ps}
        unknown = sorted(set(self.weights) - set(parts))
        bad = []
        for path, (A, B) in self.weights.items():
            if path not in parts:
                continue
            want_a, want_b = (self.r, _in_features(cfg, parts[path].name)), (parts[path].rows, self.r)
            if tuple(A.shape) != want_a:
                bad.append(f"{path}.lora_A {tuple(A.shape)} != {want_a}")
            if tuple(B.shape) != want_b:
                bad.append(f"{path}.lora_B {tuple(B.shape)} != {want_b}")
        if unknown or bad:
            msg = [f"{len(unknown)} module(s) this model does not have ({_fmt(unknown)})"] if unknown else []
            msg += [f"{len(bad)} mis-shaped weight(s) ({_fmt(bad)})"] if bad else []
            raise AdapterError(f"{self.source}: does not fit this model (r={self.r}): " + "; ".join(msg))


def check_config(cfg: dict, where: str) -> tuple[int, float, bool]:
    """(r, lora_alpha, use_rslora) of a PEFT ``adapter_config.json``; :class:`AdapterError` on what we do not apply."""
    ptype = cfg.get("peft_type", "LORA")
    if ptype != "LORA":
        raise AdapterError(f"{where}: peft_type {ptype!r} is not supported (LoRA adapters only)")
    refused = [name for name, on in (
        ("use_dora (DoRA)", cfg.get("use_dora")), ("modules_to_save", cfg.get("modules_to_save")),
        ("lora_bias", cfg.get("lora_bias")), ("fan_in_fan_out", cfg.get("fan_in_fan_out")),
        ("rank_pattern", cfg.get("rank_pattern")), ("alpha_pattern", cfg.get("alpha_pattern")),
        ("layer_replication", cfg.get("layer_replication")), ("target_parameters", cfg.get("target_parameters")),
        ("trainable_token_indices", cfg.get("trainable_token_indices")), ("use_qalora", cfg.get("use_qalora")))
        if on]
    if cfg.get("bias", "none") != "none":
        refused.append(f"bias={cfg['bias']!r} (trained biases)")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "eva")):
        # these change the base weights when the adapter is made: B A is a delta from a residual base that
        # PEFT rebuilds at load time, not from the published weights
        refused.append(f"init_lora_weights={init!r} (convert it to a plain LoRA with PEFT's "
                       "path_initial_model_for_weight_conversion when saving)")
    if cfg.get("loftq_config"):
        refused.append("loftq_config (LoftQ: a quantized residual base)")
    if refused:
        raise AdapterError(f"{where}: not supported: {', '.join(refused)} (plain LoRA on {', '.join(TARGETS)} only)")
    targets = cfg.get("target_modules")
    if isinstance(targets, (list, tuple)):
        unknown = sorted({str(t).rsplit(".", 1)[-1] for t in targets} - set(TARGETS))
        if unknown:
            raise AdapterError(f"{where}: target_modules {unknown} are not supported (LoRA on {', '.join(TARGETS)} "
                               "only)")
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterError(f"{where}: r must be a positive int, got {r!r}")
    alpha = cfg.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AdapterError(f"{where}: lora_alpha must be a number, got {alpha!r}")
    return r, float(alpha), bool(cfg.get("use_rslora", False))


def _load_pickle(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise AdapterError(f"{path}: refused: this pickle needs more than tensors to load, and only "
                           f"torch.load(weights_only=True) is used (it said: {str(err).splitlines()[0]}); "
                           "convert it to adapter_model.safetensors") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:  # truncated / not a torch file
        raise AdapterError(f"{path}: not a readable torch file ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''})") from None


def read_adapter(path: str | os.PathLike, model_config=None) -> LoRAWeights:
    """Read a PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``).

    Parameters
    ----------
    path : the adapter folder
    model_config : when given, every A / B is checked against this model's shapes

    Raises
    ------
    AdapterError listing what is unsupported, missing, unexpected or mis-shaped
    """
    folder = Path(path)
    if not folder.is_dir() or not (folder / CONFIG_NAME).is_file():
        raise AdapterError(f"{folder}: not a PEFT adapter folder (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        cfg = json.loads((folder / CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{folder / CONFIG_NAME}: not valid JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{folder / CONFIG_NAME}: expected a JSON object, got {type(cfg).__name__}")
    r, alpha, rslora = check_config(cfg, str(folder))
    if (folder / WEIGHTS_NAME).is_file():
        from safetensors.torch import load_file

        try:
            state = load_file(folder / WEIGHTS_NAME)
        except Exception as err:  # a truncated or corrupt file: safetensors raises its own error types
            raise AdapterError(f"{folder / WEIGHTS_NAME}: not a readable safetensors file "
                               f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    else:
        found = [folder / n for n in PICKLE_NAMES if (folder / n).is_file()]
        if not found:
            raise AdapterError(f"{folder}: no {WEIGHTS_NAME} (nor {', '.join(PICKLE_NAMES)})")
        state = _load_pickle(found[0])
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise AdapterError(f"{found[0]}: expected a dict of tensors")
    A, B, other = {}, {}, []
    for key, value in state.items():
        m = _KEY.match(key)
        if m is None or m["path"].rsplit(".", 1)[-1] not in TARGETS:
            other.append(key)
        else:
            (A if m["ab"] == "A" else B)[m["path"]] = value
    if other:
        raise AdapterError(f"{folder}: {len(other)} key(s) outside LoRA on {', '.join(TARGETS)}: {_fmt(other)} "
                           "(DoRA magnitudes, biases, embeddings, lm_head and modules_to_save are not supported)")
    unpaired = sorted(set(A) ^ set(B))
    if unpaired:
        raise AdapterError(f"{folder}: lora_A without lora_B or the reverse: {_fmt(unpaired)}")
    if not A:
        raise AdapterError(f"{folder}: the adapter holds no LoRA weights")
    adapter = LoRAWeights(r, alpha, rslora, {p: (A[p], B[p]) for p in sorted(A)}, source=str(folder))
    if model_config is not None:
        adapter.check(model_config)
    return adapter


def as_adapter(adapter, model_config, where: str = "path") -> LoRAWeights:
    """A :class:`LoRAWeights` or a folder -> checked :class:`LoRAWeights` (errors name ``where``)."""
    if isinstance(adapter, LoRAWeights):
        adapter.check(model_config)
        return adapter
    if not isinstance(adapter, (str, os.PathLike)):
        raise TypeError(f"{where}: expected an adapter folder or LoRAWeights, got {type(adapter).__name__}")
    try:
        return read_adapter(adapter, model_config)
    except AdapterError as err:
        raise AdapterError(f"{where}: {err}") from None


def _check_scale(scale, where: str = "scale") -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{where}: expected a finite number, got {scale!r}")
    return float(scale)


def default_name(adapter, taken) -> str:
    """The folder's name (or ``lora``), made unique among ``taken`` with ``-2``, ``-3``..."""
    base = Path(adapter).name if isinstance(adapter, (str, os.PathLike)) else "lora"
    base = base or "lora"
    name, i = base, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    return name


# ---------------------------------------------------------------------- merged
class MergedAdapters:
    """Adapters merged into a model's weights, each with its scale; unloading restores bit for bit.

    Parameters
    ----------
    model : the :class:`~ursa_engine.URSATransformer` whose fused linears are written in place
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.loaded: dict[str, tuple[LoRAWeights, float]] = {}  # load order
        self._base: dict[str, torch.Tensor] = {}  # fused module path -> CPU copy of its weight before any merge

    @property
    def names(self) -> list[str]:
        return list(self.loaded)

    def load(self, adapter, scale: float = 1.0, name: str | None = None) -> str:
        """Merge ``adapter`` (folder or :class:`LoRAWeights`) with ``scale``; returns its name."""
        scale = _check_scale(scale)
        adapter = as_adapter(adapter, self.model.config)
        name = default_name(getattr(adapter, "source", "lora"), self.loaded) if name is None else str(name)
        if name in self.loaded:
            raise ValueError(f"name: an adapter {name!r} is already loaded (unload it first, or pick another name)")
        self.loaded[name] = (adapter, scale)
        try:
            self._apply(self._touched(adapter))
        except Exception:
            del self.loaded[name]
            self._apply(self._touched(adapter))
            raise
        return name

    def unload(self, name: str | None = None) -> None:
        """Unmerge one adapter (``None``: all); with none left the base weights are back exactly."""
        if name is None:
            names = list(self.loaded)
        elif name not in self.loaded:
            raise ValueError(f"name: no adapter {name!r} is loaded (loaded: {self.names or 'none'})")
        else:
            names = [name]
        touched = set()
        for n in names:
            touched |= self._touched(self.loaded.pop(n)[0])
        self._apply(touched)

    def set_scale(self, scale: float, name: str | None = None) -> None:
        """Re-merge one adapter (``None``: every one) at ``scale``."""
        scale = _check_scale(scale)
        names = self.names if name is None else [name]
        touched = set()
        for n in names:
            if n not in self.loaded:
                raise ValueError(f"name: no adapter {n!r} is loaded (loaded: {self.names or 'none'})")
            self.loaded[n] = (self.loaded[n][0], scale)
            touched |= self._touched(self.loaded[n][0])
        self._apply(touched)

    def _touched(self, adapter: LoRAWeights) -> set[str]:
        return {site for site, parts in fused_sites(self.model.config) if any(p.path in adapter.weights for p in parts)}

    @torch.no_grad()
    def _apply(self, sites: set[str]) -> None:
        """Recompute the weights of ``sites`` from their base copies and the loaded adapters (in place)."""
        for site, parts in fused_sites(self.model.config):
            if site not in sites:
                continue
            w = self.model.get_submodule(site).weight
            if site not in self._base:
                self._base[site] = w.detach().to("cpu", copy=True)
            base = self._base[site]
            if base.dtype != w.dtype or base.shape != w.shape:
                raise RuntimeError(f"{site}: the weight changed dtype or shape since the first merge; unload "
                                   "adapters before casting the model")
            terms = [(p, ad.weights[p.path], s * ad.scaling) for ad, s in self.loaded.values() for p in parts
                     if p.path in ad.weights]
            if not terms:  # back to the base weight, bit for bit
                w.copy_(base)
                del self._base[site]
                continue
            acc = torch.promote_types(w.dtype, torch.float32)  # fp32 sums (fp64 for an fp64 model)
            merged = base.to(w.device, acc, copy=True)  # never a view of the base copy
            for p, (A, B), gain in terms:
                merged[p.start : p.start + p.rows] += weight_delta(A.to(w.device), B.to(w.device), gain).to(acc)
            w.copy_(merged)  # one rounding to the model's dtype


# ---------------------------------------------------------------------- per row
class RowAdapters:
    """Adapters applied unmerged, each to its own rows of a batch (per-request adapters when serving).

    Inside :meth:`rows`, forward hooks on the fused linears add ``s·γ·(x[rows] Aᵀ) Bᵀ`` to the
    output rows of each adapter present (a segmented matmul: one shrink GEMM per adapter, run of
    rows and fused linear, one accumulating expand GEMM per published part); rows of no adapter
    get nothing. The hooks exist only inside the block: elsewhere the model is the base (or
    merged) model and pays nothing. Adapter tensors live on the model's device in its dtype.

    Parameters
    ----------
    model : the :class:`~ursa_engine.URSATransformer`
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.adapters: dict[str, tuple[LoRAWeights, float]] = {}
        # fused module path -> adapter name -> (A of its parts stacked (Σr, in), [(Part, offset in Σr, r, B, gain)])
        self._sites: dict[str, dict[str, tuple]] = {}
        self._runs: list[tuple[str, int, int]] | None = None
        self._hooks = []
        self.version = 0  # changes whenever an adapter is added or removed (graph caches key on it)

    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    def add(self, name: str, adapter, scale: float = 1.0) -> None:
        """Register ``adapter`` (folder or :class:`LoRAWeights`) under ``name`` with ``scale``."""
        scale = _check_scale(scale)
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", name):
            raise ValueError(f"name: expected 1-64 letters, digits or _.:-, got {name!r}")
        if name in self.adapters:
            raise ValueError(f"name: an adapter {name!r} is already registered")
        adapter = as_adapter(adapter, self.model.config)
        w = self.model.lm_head.weight
        for site, parts in fused_sites(self.model.config):
            mine = [p for p in parts if p.path in adapter.weights]
            if not mine:
                continue
            A = torch.cat([adapter.weights[p.path][0] for p in mine]).to(w.device, w.dtype)  # one shrink GEMM per site
            terms, off = [], 0
            for p in mine:
                B = adapter.weights[p.path][1].to(w.device, w.dtype)
                terms.append((p, off, B.shape[1], B, scale * adapter.scaling))
                off += B.shape[1]
            self._sites.setdefault(site, {})[name] = (A, terms)
        self.adapters[name] = (adapter, scale)
        self.version += 1

    def remove(self, name: str | None = None) -> None:
        """Forget one adapter (``None``: all)."""
        names = list(self.adapters) if name is None else [name]
        for n in names:
            if n not in self.adapters:
                raise ValueError(f"name: no adapter {n!r} is registered (registered: {self.names or 'none'})")
            del self.adapters[n]
            for per in self._sites.values():
                per.pop(n, None)
        self.version += 1

    @staticmethod
    def runs(assignment) -> list[tuple[str, int, int]]:
        """(name, start, end) runs of consecutive rows of one adapter; rows of ``None`` are left out."""
        out = []
        for r, name in enumerate(assignment):
            if name is None:
                continue
            if out and out[-1][0] == name and out[-1][2] == r:
                out[-1][2] = r + 1
            else:
                out.append([name, r, r + 1])
        return [tuple(v) for v in out]

    @contextlib.contextmanager
    def rows(self, assignment):
        """Inside the block, row ``b`` of every forward pass gets adapter ``assignment[b]`` (a name or None)."""
        unknown = sorted({a for a in assignment if a is not None} - set(self.adapters))
        if unknown:
            raise ValueError(f"lora: no adapter {unknown[0]!r} is registered (registered: {self.names or 'none'})")
        before, self._runs = self._runs, self.runs(assignment)
        hooks = []
        if self._runs and not self._hooks:  # outermost block with adapter rows: hook the sites it touches
            for site in self._sites:
                hooks.append(self.model.get_submodule(site).register_forward_hook(self._hook(site)))
            self._hooks = hooks
        try:
            yield
        finally:
            self._runs = before
            for h in hooks:
                h.remove()
            if hooks:
                self._hooks = []

    def _hook(self, site: str):
        def add_rows(module, args, out):
            per = self._sites.get(site)
            if not self._runs or not per:
                return out
            x = args[0]  # (rows, tokens, in): token ranges of a chunked stage keep every row
            flat = out.is_contiguous() and x.is_contiguous()
            for name, a, b in self._runs:
                if name not in per:
                    continue
                A, terms = per[name]
                if flat:  # y[rows, :, part] += gain · (x[rows] Aᵀ) Bᵀ, accumulated in place (no delta tensor)
                    xs, ys = x[a:b].reshape(-1, x.shape[-1]), out[a:b].view(-1, out.shape[-1])
                    t = xs @ A.t()  # (rows · tokens, Σr): the shrink of every part at once
                    for p, o, r, B, gain in terms:
                        ys[:, p.start : p.start + p.rows].addmm_(t[:, o : o + r], B.t(), alpha=gain)
                else:
                    for p, o, r, B, gain in terms:
                        out[a:b, ..., p.start : p.start + p.rows] += lora_delta(x[a:b], A[o : o + r], B, gain)
            return out

        return add_rows


def parse_lora_spec(spec: str, *, named: bool = False) -> tuple[str | None, str, float]:
    """``[NAME=]PATH[:SCALE]`` of the command line -> (name or None, path, scale).

    ``NAME=`` (letters, digits, ``_.-``) is read only with ``named``; ``:SCALE`` only when what follows
    the last ``:`` is a number. A path that exists as given is taken whole (it may hold ``=`` / ``:``).
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"--lora: expected {'[NAME=]' if named else ''}PATH[:SCALE], got {spec!r}")
    name = None
    if named and not Path(spec).exists():
        m = re.fullmatch(r"([A-Za-z0-9_.-]{1,64})=(.+)", spec)
        if m:
            name, spec = m.group(1), m.group(2)
    scale = 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head and not Path(spec).exists():
        try:
            scale = float(tail)
        except ValueError:
            pass
        else:
            spec = head
            if not math.isfinite(scale):
                raise ValueError(f"--lora: the scale of {spec!r} must be finite, got {tail}")
    if not Path(spec).is_dir():
        raise ValueError(f"--lora: {spec} is not an adapter folder (adapter_config.json + adapter_model.safetensors)")
    return name, spec, scale
