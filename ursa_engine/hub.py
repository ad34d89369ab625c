"""Checkpoint roots given as Hugging Face hub ids (DESIGN §9, checkpoint sources).

Everywhere a checkpoint root is taken (``Engine.from_pretrained``, ``URSAPipeline.from_pretrained``,
``ursa-engine generate | serve | plan``) :func:`resolve_root` turns the argument into a local folder:

- an existing local path wins, whatever it looks like;
- an ``org/name`` id goes through ``huggingface_hub``: the repository's file list is read and
  only the files a load reads are downloaded into the hub cache (:func:`root_files`: configs,
  the chosen variant's weights of ``transformer/`` and ``vae/``, the scheduler's config and
  codebook, the prompt tokenizer's two files; no other variant, no duplicate ``.bin`` beside
  safetensors); the token comes from where ``huggingface_hub`` keeps it (``HF_TOKEN``,
  ``hf auth login``) unless one is given;
- with ``HF_HUB_OFFLINE=1``, ``local_files_only=True`` or no network the id is served from the
  local cache (``models--org--name/snapshots/<commit>/``, the revision through ``refs/<revision>``);
- anything else raises :class:`HubError` (a ``FileNotFoundError``) naming the id, the revision, the
  cache folder looked in and the command that fetches it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
WEIGHTS_STEMS = ("diffusion_pytorch_model", "model")  # as ursa_engine.checkpoint (no torch import here)
REQUIRED = ("transformer/config.json", "scheduler/scheduler_config.json")


class HubError(FileNotFoundError):
    """A hub id that cannot be turned into a local checkpoint root."""


def is_hub_id(name_or_path: str | os.PathLike) -> bool:
    """Whether ``name_or_path`` has the form ``org/name`` (and so may be a hub id)."""
    return isinstance(name_or_path, str) and HUB_ID.fullmatch(name_or_path) is not None


def _weights(names: set[str], ext: str, variant: str | None) -> list[str]:
    """The weight files (index + shards, or one file) of one folder's file names, as
    :func:`ursa_engine.checkpoint.weight_files` picks them."""
    suffix = f".{variant}{ext}" if variant else ext
    index = sorted(n for n in names if n.endswith(f"{suffix}.index.json") and (variant or n.count(".") == 3))
    files = sorted(n for n in names if n.endswith(suffix) and (variant or n.count(".") == 1))
    if index:
        return index + files
    singles = [f"{stem}{suffix}" for stem in WEIGHTS_STEMS if f"{stem}{suffix}" in names]
    return singles[:1] or files


def root_files(repo_files: Iterable[str], *, variant: str | None = None, weights: bool = True,
               transformer_weights: bool = True) -> list[str]:
    """The files of a checkpoint repository that loading it as a root reads.

    Parameters
    ----------
    repo_files : every file of the repository (paths relative to its top)
    variant : the weight variant (``diffusion_pytorch_model.<variant>.safetensors``)
    weights : False for configs only (``ursa-engine plan``): no transformer or vae weights
    transformer_weights : False when an overlay replaces the transformer's weights
    """
    by_folder: dict[str, set[str]] = {}
    for f in repo_files:
        folder, _, name = f.rpartition("/")
        by_folder.setdefault(folder, set()).add(name)
    out = []

    def take(folder: str, names: Iterable[str]) -> None:
        out.extend(f"{folder}/{n}" for n in names if n in by_folder.get(folder, ()))

    take("transformer", ["config.json"])
    if weights and transformer_weights:
        names = by_folder.get("transformer", set())
        take("transformer", _weights(names, ".safetensors", variant) or _weights(names, ".bin", variant))
    take("scheduler", ["scheduler_config.json"])
    take("scheduler", [n for n in ("scheduler_model.pth", "scheduler_model.safetensors")
                       if n in by_folder.get("scheduler", ())][:1])
    take("tokenizer", ["tokenizer.json", "tokenizer_config.json"])
    take("vae", ["config.json"])
    if weights:
        take("vae", _weights(by_folder.get("vae", set()), ".safetensors", variant))
    return out


def _offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in ("1", "ON", "YES", "TRUE") or bool(constants.HF_HUB_OFFLINE)


def _fetch_command(repo_id: str, revision: str | None, cache_dir: str | None) -> str:
    cmd = f"hf download {repo_id}"
    if revision:
        cmd += f" --revision {revision}"
    if cache_dir:
        cmd += f" --cache-dir {cache_dir}"
    return f"`{cmd}` (`huggingface-cli download` with an older huggingface_hub)"


def resolve_root(name_or_path: str | os.PathLike, *, revision: str | None = None,
                 cache_dir: str | os.PathLike | None = None, local_files_only: bool | None = None,
                 token: str | bool | None = None, variant: str | None = None, weights: bool = True,
                 transformer_weights: bool = True, name: str = "root") -> Path:
    """A local checkpoint root for a folder or an ``org/name`` hub id.

    Parameters
    ----------
    name_or_path : a local folder (wins when it exists) or a hub id ``org/name``
    revision : branch, tag or commit of a hub id (default: ``main``)
    cache_dir : the hub cache (default: ``HF_HUB_CACHE``, else huggingface_hub's default)
    local_files_only : only look in the cache (default: True when ``HF_HUB_OFFLINE`` is set)
    token : hub token (default: huggingface_hub's own, ``HF_TOKEN`` or the stored login)
    variant, weights, transformer_weights : which files are downloaded (:func:`root_files`)
    name : the argument named in error messages

    Returns
    -------
    Path : the local folder (for a hub id, the snapshot folder in the cache)
    """
    path = Path(name_or_path)
    if path.exists() or not is_hub_id(os.fspath(name_or_path)):
        if not path.exists():
            raise HubError(f"{name}: {name_or_path} is neither a local folder nor a hub id (org/name)")
        if revision is not None:
            raise HubError(f"revision: applies to hub ids only; {name} {name_or_path} is a local folder")
        return path
    repo_id = os.fspath(name_or_path)
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:
        raise HubError(f"{name}: {repo_id} is not a local folder; resolving it as a hub id needs huggingface_hub "
                       "(pip install 'ursa-engine[hub]')") from None
    from huggingface_hub.utils import RepositoryNotFoundError, RevisionNotFoundError

    cache = os.fspath(cache_dir or os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)
    rev = revision or "main"
    where = f"{repo_id} (revision {rev})"
    fetch = _fetch_command(repo_id, revision, os.fspath(cache_dir) if cache_dir else None)
    offline = _offline() if local_files_only is None else bool(local_files_only) or _offline()
    unreachable = None
    if not offline:
        try:
            info = huggingface_hub.HfApi(token=token).model_info(repo_id, revision=revision)  # one call, no retries
            files = [s.rfilename for s in info.siblings or ()]
        except RevisionNotFoundError as err:
            raise HubError(f"{name}: {repo_id} has no revision {rev!r} on the hub (a branch, tag or commit of the "
                           f"repository; cache {cache}); fetch the default one with "
                           f"{_fetch_command(repo_id, None, None)}") from err
        except RepositoryNotFoundError as err:
            raise HubError(f"{name}: {repo_id} is not a local folder and no hub repository {repo_id} can be read "
                           "(it does not exist, or it is private or gated: log in with `hf auth login` or pass "
                           f"token=); the id was checked at {constants.ENDPOINT}") from err
        except Exception as err:  # noqa: BLE001 - no network, proxy, hub down: the cache may still serve it
            unreachable = f"the hub cannot be reached ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        else:
            selected = root_files(files, variant=variant, weights=weights, transformer_weights=transformer_weights)
            missing = [f for f in REQUIRED if f not in selected]
            if missing:
                raise HubError(f"{name}: {where} is not an URSA checkpoint root: it has no {' and no '.join(missing)}")
            try:
                folder = huggingface_hub.snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                                           token=token, allow_patterns=selected)
            except Exception as err:  # noqa: BLE001 - a failed download: say which and how to fetch it
                raise HubError(f"{name}: downloading {where} into {cache} failed ({type(err).__name__}: "
                               f"{str(err).splitlines()[0][:200]}); fetch it with {fetch}") from err
            return Path(folder)
    else:
        unreachable = "the hub is not asked (offline: HF_HUB_OFFLINE=1 or local_files_only=True)"
    try:
        folder = Path(huggingface_hub.snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                                        local_files_only=True))
    except Exception as err:  # noqa: BLE001 - LocalEntryNotFoundError and friends
        raise HubError(f"{name}: {where} is not in the hub cache {cache} and {unreachable}; fetch it with "
                       f"{fetch}, or pass a local folder (there is none at {path.resolve()})") from err
    missing = [f for f in REQUIRED if not (folder / f).is_file()]
    if weights:  # a snapshot cached by a configs-only load (plan) or under an overlay lacks the weights
        cached = [str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file()]
        picked = set(root_files(cached, variant=variant, weights=True, transformer_weights=transformer_weights))
        for sub in ("transformer",) * transformer_weights + ("vae",) * (folder / "vae").is_dir():
            if not any(f.startswith(f"{sub}/") and f.endswith((".safetensors", ".bin")) for f in picked):
                missing.append(f"{sub}/ weights" + (f" (variant {variant})" if variant else ""))
    if missing:
        raise HubError(f"{name}: the cached snapshot {folder} of {where} has no {' and no '.join(missing)} and "
                       f"{unreachable}; fetch it with {fetch}")
    return folder
