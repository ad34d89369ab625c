"""Loading and saving diffusers-layout ``transformer/`` folders (DESIGN §3).

A folder holds ``config.json`` and the weights under Qwen3 names, in one ``*.safetensors`` file or
in shards listed by a ``*.safetensors.index.json`` (``{"weight_map": {name: file}}``). The model
keeps q / k / v and gate / up fused; this module converts between the two namings. It knows the
model only through its :class:`ModelConfig` (names and shapes) and its state dict:
:meth:`URSATransformer.from_pretrained` builds the model from :func:`read_weights`.

Every problem with a checkpoint raises :class:`CheckpointError` naming the folder and listing all
missing, unexpected and mis-shaped weights at once; nothing is loaded into a model before the
whole checkpoint has been checked (shapes are read from the safetensors headers).

Legacy formats and overlays (DESIGN §9, checkpoint sources): a folder without safetensors may hold
``diffusion_pytorch_model.bin`` (or ``*.bin`` shards with a ``*.bin.index.json``), and
``read_weights(folder, overlay=PATH)`` takes the weights from a transformer-only state dict instead
of the folder's own (``--tdir .../transformer/diffusion_pytorch_model.bin`` in UDM-GRPO): a
``.safetensors``, ``.bin``, ``.pt`` or ``.pth`` file, or a folder of weights. Torch pickles are read
with ``torch.load(weights_only=True)`` only: a file that needs any other object to unpickle is
refused (nothing of it runs). Keys may carry wrapper prefixes, stripped from the front in any
order (:data:`WRAPPER_PREFIXES`): ``module.`` (DDP / FSDP / DeepSpeed), ``_orig_mod.``
(``torch.compile``) and ``base_model.model.`` (a ``PeftModel`` after ``merge_and_unload()``, whose
own ``state_dict()`` keeps that prefix but no LoRA factors). A state dict that still holds
``lora_A`` / ``lora_B`` factors (an unmerged PEFT model) is refused: merge it or load it as an
adapter. The model's fused names (``qkv_proj``, ``gate_up_proj``: an :class:`URSATransformer`'s own
``state_dict()``) are accepted beside the published ones; a file wrapping its state dict under one
``"state_dict"``, ``"model"`` or ``"module"`` key is unwrapped.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ModelConfig

CONFIG_NAME = "config.json"
WEIGHTS_STEMS = ("diffusion_pytorch_model", "model")  # diffusers name first, then transformers'
TORCH_SUFFIXES = (".bin", ".pt", ".pth")  # torch pickles, read with torch.load(weights_only=True) only
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")  # DDP / FSDP, torch.compile, merged PEFT
_STATE_KEYS = ("state_dict", "model", "module")  # {"state_dict": {...}} and the like: unwrapped
_LIST_MAX = 8


class CheckpointError(ValueError):
    """A transformer folder that cannot be loaded: missing files, bad config, bad weights."""


@contextlib.contextmanager
def _open_safetensors(path: Path, *, device: str = "cpu", name: str | None = None):
    """``safe_open`` whose failures (a truncated file, a header lying about its offsets or dtypes, a
    huge header, a missing file or a symlink loop), opening or reading, are one :class:`CheckpointError`
    naming the file."""
    try:
        with safe_open(path, framework="pt", device=device) as f:
            yield f
    except (SafetensorError, OSError) as err:  # not e.g. a device's out-of-memory: that is no file's fault
        raise CheckpointError(f"{name + ': ' if name else ''}{path} is not a readable safetensors file "
                              f"({type(err).__name__}: {err})") from err


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


def weight_files(folder: str | os.PathLike, *, variant: str | None = None,
                 torch_files: bool = False) -> dict[str, Path]:
    """Map weight name -> weights file for the folder (index json, or a single file).

    Safetensors first; with ``torch_files`` a folder with none falls back to torch pickles
    (``diffusion_pytorch_model[.<variant>].bin``, or ``*.bin`` shards listed by a
    ``*.bin.index.json``), whose names are read with ``torch.load(weights_only=True, mmap=True)``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory")
    found = _find_weights(folder, ".safetensors", variant)
    if found is None and torch_files:
        found = _find_weights(folder, ".bin", variant)
    if found is None:
        suffix = f".{variant}.safetensors" if variant else ".safetensors"
        alt = f" (or *.{variant + '.' if variant else ''}bin)" if torch_files else ""
        raise CheckpointError(f"{folder}: expected one *{suffix}{alt} weights file or an index json, found none")
    return found


def _find_weights(folder: Path, ext: str, variant: str | None) -> dict[str, Path] | None:
    """The weights of ``folder`` with extension ``ext`` (``.safetensors`` or ``.bin``); None when there are none."""
    suffix = f".{variant}{ext}" if variant else ext
    # Without a variant, "x.fp16.safetensors.index.json" also ends in ".safetensors.index.json":
    # keep only names with no dot before the extension but the stem's (as for the single files).
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
            raise CheckpointError(f"{index}: not a {ext[1:]} index (needs a 'weight_map'): {err}") from err
        missing = {v for v in weight_map.values() if not (folder / v).is_file()}
        if missing:
            raise CheckpointError(f"{index}: lists shard files that do not exist: {_fmt(missing)}")
        return {k: folder / v for k, v in weight_map.items()}
    singles = [folder / f"{stem}{suffix}" for stem in WEIGHTS_STEMS]
    found = next((p for p in singles if p.is_file()), None)
    if found is None:
        candidates = [p for p in folder.glob(f"*{suffix}") if variant or p.name.count(".") == 1]
        if not candidates:
            return None
        if len(candidates) > 1:
            raise CheckpointError(f"{folder}: expected one *{suffix} weights file or an index json, found several "
                                  f"({_fmt(p.name for p in candidates)})")
        found = candidates[0]
    if ext != ".safetensors":
        return dict.fromkeys(load_torch_weights(found, name=str(folder)), found)
    with _open_safetensors(found) as f:
        return dict.fromkeys(f.keys(), found)


def load_torch_weights(path: str | os.PathLike, *, name: str = "path") -> dict[str, torch.Tensor]:
    """The tensors of a ``.bin`` / ``.pt`` / ``.pth`` state dict, on the CPU (memory-mapped when the
    file allows it).

    Only ``torch.load(weights_only=True)`` is used: a pickle that needs any other object (a class,
    a function, an optimizer...) is refused with :class:`CheckpointError` and nothing of it runs. A
    dict holding no tensors but one of ``"state_dict"`` / ``"model"`` / ``"module"`` is unwrapped.
    ``name`` starts every error message (the argument that gave the path).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{name}: {path} is not a file")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):  # only the legacy (non-zip) format cannot be mapped
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        why = next((ln.strip() for ln in text.splitlines() if "Unsupported global" in ln or "Unsupported class" in ln),
                   None)
        if why is None:  # not a pickle at all, or a truncated one
            first = next((ln.strip() for ln in text.splitlines() if "WeightsUnpickler" in ln), text.strip()[:200])
            raise CheckpointError(f"{name}: {path} is not a readable torch file ({first})") from err
        why = why.split(" was not an allowed global")[0]
        raise CheckpointError(
            f"{name}: {path} is refused: it needs more than tensors to unpickle, and weights are only read with "
            f"torch.load(weights_only=True), which never runs code from a file ({why}); re-save it as a plain "
            "state dict (torch.save({k: v for k, v in model.state_dict().items()}, ...)) or as safetensors"
        ) from err
    except Exception as err:  # noqa: BLE001 - truncated or foreign files raise anything; re-raised named
        raise CheckpointError(f"{name}: {path} is not a readable torch file ({type(err).__name__}: {err})") from err
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = [k for k in _STATE_KEYS if isinstance(obj.get(k), dict)]
        if len(inner) == 1:
            obj = obj[inner[0]]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{name}: {path} holds a {type(obj).__name__}, expected a state dict (name -> tensor)")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{name}: {path} is not a state dict of tensors: entries {_fmt(bad)} are not "
                              "tensors")
    return obj


def read_state_dict(path: str | os.PathLike, *, name: str = "path") -> dict[str, torch.Tensor]:
    """Every tensor of a weights file (``.safetensors``, ``.bin``, ``.pt``, ``.pth``) or of a folder of
    weights (:func:`weight_files` with torch files), on the CPU, under the file's own names."""
    path = Path(path)
    if path.is_dir():
        try:
            files = weight_files(path, torch_files=True)
        except CheckpointError as err:
            raise CheckpointError(f"{name}: {err}") from err
        return _read_files(files, name=name)
    if not path.is_file():
        raise CheckpointError(f"{name}: {path} does not exist")
    if path.suffix in TORCH_SUFFIXES:
        return load_torch_weights(path, name=name)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{name}: {path} has an unknown suffix {path.suffix!r}: expected .safetensors, "
                              f"{', '.join(TORCH_SUFFIXES)} or a folder")
    with _open_safetensors(path, name=name) as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - a safetensors handle


def _read_files(files: dict[str, Path], *, name: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors ``files`` maps (each name from its own file), safetensors or torch pickles."""
    tensors = {}
    for path in sorted(set(files.values())):
        if path.suffix == ".safetensors":
            with _open_safetensors(path, device=device, name=name) as f:
                tensors.update({k: f.get_tensor(k) for k in f.keys() if files.get(k) == path})  # noqa: SIM118
        else:
            tensors.update({k: v for k, v in load_torch_weights(path, name=name).items() if files.get(k) == path})
    return tensors


def unwrap_names(state: dict[str, torch.Tensor], cfg: ModelConfig, *, name: str = "path",
                 source: str = "") -> dict[str, torch.Tensor]:
    """A state dict under the published (checkpoint) names: wrapper prefixes
    (:data:`WRAPPER_PREFIXES`) stripped, the model's fused ``qkv_proj`` / ``gate_up_proj`` split.

    LoRA factors (an unmerged PEFT model) and two keys that become the same name are refused.
    """
    lora = [k for k in state if ".lora_" in k or "lora_magnitude_vector" in k]
    if lora:
        raise CheckpointError(f"{name}: {source} holds LoRA factors ({_fmt(lora)}): the state dict of an unmerged "
                              "PEFT model; save peft_model.merge_and_unload().state_dict() instead, or load the "
                              "adapter folder as a LoRA adapter")
    out, clashes = {}, []
    for key, t in state.items():
        short = key
        while prefix := next((p for p in WRAPPER_PREFIXES if short.startswith(p)), None):
            short = short[len(prefix):]
        if short in out:
            clashes.append(short)
        out[short] = t
    if clashes:
        raise CheckpointError(f"{name}: {source} holds several tensors for {_fmt(clashes)} once the wrapper "
                              f"prefixes {', '.join(WRAPPER_PREFIXES)} are stripped")
    d, hq, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    sizes = {"self_attn.qkv_proj.weight": (hq * d, hkv * d, hkv * d),
             "mlp.gate_up_proj.weight": (cfg.intermediate_size,) * 2}
    for key in [k for k in out if k.startswith("model.layers.")]:
        layer, _, rest = key[len("model.layers."):].partition(".")
        if rest in _FUSED and out[key].dim() == 2 and out[key].shape[0] == sum(sizes[rest]):
            t = out.pop(key)
            for part, piece in zip(_FUSED[rest], t.split(sizes[rest]), strict=True):
                out[f"model.layers.{layer}.{part}"] = piece
    return out


def check_weights(folder: str | os.PathLike, cfg: ModelConfig, files: dict[str, Path]) -> None:
    """Raise one :class:`CheckpointError` listing every missing, unexpected or mis-shaped weight
    (safetensors: read from the headers; torch pickles: memory-mapped)."""
    found = {}
    for path in sorted(set(files.values())):
        if path.suffix != ".safetensors":
            found.update({k: (tuple(v.shape), _DTYPES.get(v.dtype, str(v.dtype)))
                          for k, v in load_torch_weights(path, name=str(folder)).items() if files.get(k) == path})
            continue
        with _open_safetensors(path, name=str(folder)) as f:
            for name in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                if files.get(name) == path:
                    sl = f.get_slice(name)
                    found[name] = (tuple(sl.get_shape()), sl.get_dtype())
    _raise_problems(f"{folder}: checkpoint does not match its config.json", cfg, found, set(files))


_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def _raise_problems(what: str, cfg: ModelConfig, found: dict[str, tuple[tuple[int, ...], str]], names: set) -> None:
    """One :class:`CheckpointError` (``what: ... | ...``) for every missing, unexpected or mis-shaped name.

    ``found``: name -> (shape, safetensors dtype string) of the tensors present; ``names``: every name given.
    """
    expected = checkpoint_shapes(cfg)
    problems = []
    missing = expected.keys() - names
    unexpected = names - expected.keys()
    if missing:
        problems.append(f"missing weights: {_fmt(missing)}")
    if unexpected:
        problems.append(f"unexpected weights: {_fmt(unexpected)}")
    bad = []
    for name in sorted(found.keys() & expected.keys()):
        shape, dtype = found[name]
        if shape != expected[name]:
            bad.append(f"{name} has shape {shape}, the config implies {expected[name]}")
        elif dtype not in ("F32", "F16", "BF16", "F64"):
            bad.append(f"{name} has dtype {dtype}, expected a float type")
    if bad:
        problems.append("mis-shaped weights: " + "; ".join(bad[:_LIST_MAX])
                        + (f"; ... ({len(bad)} in all)" if len(bad) > _LIST_MAX else ""))
    if problems:
        raise CheckpointError(f"{what} (hidden_size={cfg.hidden_size}, layers={cfg.num_hidden_layers}): "
                              + " | ".join(problems))


def read_weights(folder: str | os.PathLike, *, dtype: torch.dtype | None = None, device=None,
                 variant: str | None = None,
                 overlay: str | os.PathLike | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The config and the checked weights of a ``transformer/`` folder, under model names
    (:func:`to_model_state_dict`); :meth:`URSATransformer.from_pretrained` builds the model from them.

    Parameters
    ----------
    folder : the folder with ``config.json`` and safetensors (or ``.bin``) weights
    dtype : the dtype of every tensor (default: the checkpoint's own)
    device : where the tensors are read to (default: CPU)
    variant : diffusers weight variant (``diffusion_pytorch_model.<variant>.safetensors``)
    overlay : a transformer-only state dict laid over the folder (``transformer_weights``): its
        weights replace the folder's, which are not read (only its ``config.json``); a
        ``.safetensors`` / ``.bin`` / ``.pt`` / ``.pth`` file or a folder of weights, keys under the
        published or the model's names with wrapper prefixes allowed (module docstring). Every
        missing, unexpected or mis-shaped key is listed in one error naming ``transformer_weights``.
    """
    cfg = read_config(folder)
    device = torch.device(device if device is not None else "cpu")
    if overlay is None:
        files = weight_files(folder, variant=variant, torch_files=True)
        check_weights(folder, cfg, files)
        tensors = _read_files(files, name=str(folder), device=str(device))
    else:
        raw = read_state_dict(overlay, name="transformer_weights")
        tensors = unwrap_names(raw, cfg, name="transformer_weights", source=str(overlay))
        found = {k: (tuple(v.shape), _DTYPES.get(v.dtype, str(v.dtype))) for k, v in tensors.items()}
        config = Path(folder) / CONFIG_NAME
        _raise_problems(f"transformer_weights: {overlay} does not fit the transformer config {config}", cfg, found,
                        set(tensors))
    dtype = dtype or next(iter(tensors.values())).dtype
    tensors = {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}
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
