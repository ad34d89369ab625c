"""Loading and saving diffusers-layout ``transformer/`` folders (DESIGN §3).

A folder holds ``config.json`` and the weights under Qwen3 names, in one ``*.safetensors`` file or
in shards listed by a ``*.safetensors.index.json`` (``{"weight_map": {name: file}}``). The model
keeps q / k / v and gate / up fused; this module converts between the two namings. It knows the
model only through its :class:`ModelConfig` (names and shapes) and its state dict:
:meth:`URSATransformer.from_pretrained` builds the model from :func:`read_weights`.

Every problem with a checkpoint raises :class:`CheckpointError` naming the folder and listing all
missing, unexpected and mis-shaped weights at once; nothing is loaded into a model before the
whole checkpoint has been checked (shapes are read from the safetensors headers).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig

CONFIG_NAME = "config.json"
WEIGHTS_STEMS = ("diffusion_pytorch_model", "model")  # diffusers name first, then transformers'
_LIST_MAX = 8


class CheckpointError(ValueError):
    """A transformer folder that cannot be loaded: missing files, bad config, bad weights."""


def _fmt(names, more: str = "") -> str:
    names = sorted(names)
    head = ", ".join(names[:_LIST_MAX])
    return head + (f", ... ({len(names)} in all)" if len(names) > _LIST_MAX else "") + more


def checkpoint_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight of the checkpoint layout (Qwen3 names) and its shape."""
    h, d, hq, hkv, i = (cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads,
                        cfg.intermediate_size)
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,),
              "lm_head.weight": (cfg.lm_head_size, h)}
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hq * d, h), p + "self_attn.k_proj.weight": (hkv * d, h),
            p + "self_attn.v_proj.weight": (hkv * d, h), p + "self_attn.o_proj.weight": (h, hq * d),
            p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    return shapes


_FUSED = {"self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                        "self_attn.v_proj.weight"),
          "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight")}


def to_model_state_dict(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Checkpoint (Qwen3) names -> :class:`URSATransformer` names, concatenating fused projections."""
    out = dict(tensors)
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        for fused, parts in _FUSED.items():
            out[p + fused] = torch.cat([out.pop(p + part) for part in parts])
    return out


def to_checkpoint_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """:class:`URSATransformer` names -> checkpoint (Qwen3) names, splitting fused projections."""
    out = dict(state)
    d, hq, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    sizes = {"self_attn.qkv_proj.weight": (hq * d, hkv * d, hkv * d),
             "mlp.gate_up_proj.weight": (cfg.intermediate_size,) * 2}
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        for fused, parts in _FUSED.items():
            for part, t in zip(parts, out.pop(p + fused).split(sizes[fused]), strict=False):
                out[p + part] = t
    return out


def read_config(folder: str | os.PathLike) -> ModelConfig:
    """The :class:`ModelConfig` of ``folder/config.json``."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_NAME} (expected a diffusers-layout transformer/ folder)")
    try:
        with open(path) as f:
            raw = json.load(f)
        return ModelConfig.from_dict(raw)
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid transformer config: {err}") from err


def weight_files(folder: str | os.PathLike, *, variant: str | None = None) -> dict[str, Path]:
    """Map weight name -> safetensors file for the folder (index json, or a single file)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory")
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    # Without a variant, "x.fp16.safetensors.index.json" also ends in ".safetensors.index.json":
    # keep only names with no dot before "safetensors" but the stem's (as for the single files).
    indexes = sorted(p for p in folder.glob(f"*{suffix}.index.json") if variant or p.name.count(".") == 3)
    preferred = [folder / f"{stem}{suffix}.index.json" for stem in WEIGHTS_STEMS]
    index = next((p for p in preferred if p.is_file()), indexes[0] if len(indexes) == 1 else None)
    if index is None and len(indexes) > 1:
        raise CheckpointError(f"{folder}: several index files ({_fmt(p.name for p in indexes)}); keep one")
    if index is not None:
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map'): {err}") from err
        missing = {v for v in weight_map.values() if not (folder / v).is_file()}
        if missing:
            raise CheckpointError(f"{index}: lists shard files that do not exist: {_fmt(missing)}")
        return {k: folder / v for k, v in weight_map.items()}
    singles = [folder / f"{stem}{suffix}" for stem in WEIGHTS_STEMS]
    found = next((p for p in singles if p.is_file()), None)
    if found is None:
        candidates = [p for p in folder.glob(f"*{suffix}") if variant or p.name.count(".") == 1]
        if len(candidates) != 1:
            what = f"several ({_fmt(p.name for p in candidates)})" if candidates else "none"
            raise CheckpointError(f"{folder}: expected one *{suffix} weights file or an index json, found {what}")
        found = candidates[0]
    with safe_open(found, framework="pt") as f:
        return dict.fromkeys(f.keys(), found)


def check_weights(folder: str | os.PathLike, cfg: ModelConfig, files: dict[str, Path]) -> None:
    """Raise one :class:`CheckpointError` listing every missing, unexpected or mis-shaped weight."""
    expected = checkpoint_shapes(cfg)
    problems = []
    missing = expected.keys() - files.keys()
    unexpected = files.keys() - expected.keys()
    if missing:
        problems.append(f"missing weights: {_fmt(missing)}")
    if unexpected:
        problems.append(f"unexpected weights: {_fmt(unexpected)}")
    bad = []
    for path in sorted(set(files.values())):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                if name not in expected or files.get(name) != path:
                    continue
                sl = f.get_slice(name)
                shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
                if shape != expected[name]:
                    bad.append(f"{name} has shape {shape}, the config implies {expected[name]}")
                elif dtype not in ("F32", "F16", "BF16", "F64"):
                    bad.append(f"{name} has dtype {dtype}, expected a float type")
    if bad:
        problems.append("mis-shaped weights: " + "; ".join(bad[:_LIST_MAX])
                        + (f"; ... ({len(bad)} in all)" if len(bad) > _LIST_MAX else ""))
    if problems:
        raise CheckpointError(f"{folder}: checkpoint does not match its config.json "
                              f"(hidden_size={cfg.hidden_size}, layers={cfg.num_hidden_layers}): "
                              + " | ".join(problems))


def read_weights(folder: str | os.PathLike, *, dtype: torch.dtype | None = None, device=None,
                 variant: str | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The config and the checked weights of a ``transformer/`` folder, under model names
    (:func:`to_model_state_dict`); :meth:`URSATransformer.from_pretrained` builds the model from them.

    Parameters
    ----------
    folder : the folder with ``config.json`` and safetensors weights
    dtype : the dtype of every tensor (default: the checkpoint's own)
    device : where the tensors are read to (default: CPU)
    variant : diffusers weight variant (``diffusion_pytorch_model.<variant>.safetensors``)
    """
    cfg = read_config(folder)
    files = weight_files(folder, variant=variant)
    check_weights(folder, cfg, files)
    device = torch.device(device if device is not None else "cpu")
    tensors = {}
    for path in sorted(set(files.values())):
        with safe_open(path, framework="pt", device=str(device)) as f:
            for name in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                if files.get(name) == path:
                    t = f.get_tensor(name)
                    dtype = dtype or t.dtype
                    tensors[name] = t
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    return cfg, to_model_state_dict(tensors, cfg)


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = str(size).strip().upper()
    for unit, mult in sorted(units.items(), key=lambda u: -len(u[0])):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def _is_weights_file(name: str) -> bool:
    """A variant-less weights file or index (``<stem>.safetensors[.index.json]``): what
    :func:`weight_files` reads when no variant is asked for."""
    return ((name.endswith(".safetensors") and name.count(".") == 1)
            or (name.endswith(".safetensors.index.json") and name.count(".") == 3))


def save_transformer(model: torch.nn.Module, folder: str | os.PathLike, *, max_shard_size=None,
                     dtype: torch.dtype | None = None) -> None:
    """Write ``config.json`` and the weights under checkpoint names (sharded past ``max_shard_size``,
    bytes or a string like ``"2GB"``, with a ``diffusion_pytorch_model.safetensors.index.json``).

    ``model``: an :class:`URSATransformer` (what is read: its ``config`` and ``state_dict()``).

    The files are written into a temporary sibling folder first, so a failed save leaves an
    existing checkpoint intact; then the folder's previous variant-less weights (single file,
    shards, index) are removed so none of them can shadow the new ones, the new weights moved in,
    and ``config.json`` written last. Other files in the folder (variants, tokenizer...) are kept.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = to_checkpoint_state_dict(model.state_dict(), cfg)
    state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in state.items()}
    stem = WEIGHTS_STEMS[0]
    limit = _parse_size(max_shard_size) if max_shard_size is not None else None
    shards, size = [{}], 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if limit is not None and shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = state[name]
        size += nbytes
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.saving-", dir=folder.parent))
    try:
        if len(shards) == 1:
            save_file(shards[0], tmp / f"{stem}.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for n, shard in enumerate(shards, 1):
                fname = f"{stem}-{n:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / fname, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, fname))
            total = sum(v.numel() * v.element_size() for v in state.values())
            with open(tmp / f"{stem}.safetensors.index.json", "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(tmp / CONFIG_NAME, "w") as f:
            json.dump({"_class_name": "URSATransformer3DModel", **cfg.to_dict()}, f, indent=2)
        for old in folder.iterdir():
            if old.is_file() and _is_weights_file(old.name):
                old.unlink()
        for new in sorted(tmp.iterdir(), key=lambda p: p.name == CONFIG_NAME):  # config.json last
            os.replace(new, folder / new.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
