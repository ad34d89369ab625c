"""Reading and writing tokenizer folders in the published layout (``vae/`` of an URSA checkpoint).

A folder holds ``config.json`` (``"_class_name"`` picks the family) and the weights under the
authors' parameter names in ``diffusion_pytorch_model[.<variant>].safetensors`` (or shards with an
index json), read as they are: no conversion step. Every problem raises one
:class:`TokenizerError` naming the folder and listing all missing, unexpected and mis-shaped
weights; nothing is built from a folder that does not match its config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from ..checkpoint import CheckpointError, weight_files
from .base import Tokenizer, TokenizerError, save_tokenizer  # noqa: F401 - re-exported
from .cosmos3d import CosmosFSQTokenizer
from .ibq import IBQTokenizer
from .patch import DigitsPatchTokenizer

FAMILIES: dict[str, type[Tokenizer]] = {
    cls.class_name: cls for cls in (CosmosFSQTokenizer, IBQTokenizer, DigitsPatchTokenizer)}
CONFIG_NAME = "config.json"
_LIST_MAX = 8


def _fmt(names) -> str:
    names = sorted(names)
    return ", ".join(names[:_LIST_MAX]) + (f", ... ({len(names)} in all)" if len(names) > _LIST_MAX else "")


def read_tokenizer_config(folder: str | os.PathLike) -> tuple[type[Tokenizer], dict]:
    """(family class, config dict) of ``folder/config.json``."""
    path = Path(folder) / CONFIG_NAME
    if not Path(folder).is_dir():
        raise TokenizerError(f"{folder}: not a directory (expected a vae/ tokenizer folder)")
    if not path.is_file():
        raise TokenizerError(f"{folder}: no {CONFIG_NAME} (expected a vae/ tokenizer folder)")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TokenizerError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(cfg, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    name = cfg.get("_class_name")
    if name not in FAMILIES:
        raise TokenizerError(f"{path}: _class_name {name!r} is not a tokenizer we know (known: {_fmt(FAMILIES)})")
    return FAMILIES[name], {k: v for k, v in cfg.items() if not k.startswith("_") or k == "_quantizer_name"}


def _build(cls: type[Tokenizer], cfg: dict, where) -> Tokenizer:
    try:
        return cls(cfg)
    except (TypeError, ValueError, KeyError) as err:
        raise TokenizerError(f"{where}: invalid {cls.class_name} config: {err}") from err


def load_tokenizer(folder: str | os.PathLike, *, dtype: torch.dtype | None = None, device=None,
                   variant: str | None = None) -> Tokenizer:
    """Load a published ``vae/`` folder; the family comes from ``config.json``.

    Parameters
    ----------
    folder : the tokenizer folder (config.json + safetensors)
    dtype : compute dtype (default: the checkpoint's own); an IBQ config's ``decoder_dtype`` wins
        for its decoder
    device : where the weights go (default: CPU)
    variant : diffusers weight variant (``diffusion_pytorch_model.<variant>.safetensors``)
    """
    folder = Path(folder)
    cls, cfg = read_tokenizer_config(folder)
    with torch.device("meta"):
        model = _build(cls, cfg, folder / CONFIG_NAME)
    try:
        files = weight_files(folder, variant=variant)
    except CheckpointError as err:
        raise TokenizerError(str(err)) from err
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = []
    if missing := expected.keys() - files.keys():
        problems.append(f"missing weights: {_fmt(missing)}")
    if unexpected := files.keys() - expected.keys():
        problems.append(f"unexpected weights: {_fmt(unexpected)}")
    device = torch.device(device if device is not None else "cpu")
    tensors, bad = {}, []
    for path in sorted(set(files.values())):
        with safe_open(path, framework="pt", device=str(device)) as f:
            for name in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                if name not in expected or files.get(name) != path:
                    continue
                shape = tuple(f.get_slice(name).get_shape())
                if shape != expected[name]:
                    bad.append(f"{name} has shape {shape}, the config implies {expected[name]}")
                elif not problems and not bad:
                    tensors[name] = f.get_tensor(name)
    if bad:
        problems.append("mis-shaped weights: " + "; ".join(bad[:_LIST_MAX])
                        + (f"; ... ({len(bad)} in all)" if len(bad) > _LIST_MAX else ""))
    if problems:
        raise TokenizerError(f"{folder}: weights do not match its {cls.class_name} config.json: "
                             + " | ".join(problems))
    dtype = dtype or next(iter(tensors.values())).dtype
    model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=True, assign=True)
    model.to(device=device, dtype=dtype)
    return model.requires_grad_(False).eval()
