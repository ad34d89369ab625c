"""Parallel layouts over one ``DeviceMesh`` with dims ``dp``, ``cfg``, ``sp`` (issue 13).

A layout is written ``dp=2,cfg=2,sp=2`` (``--parallel`` on the command line, ``mesh=`` in the
Python API); missing dims are 1. The world is laid out dp-major: rank ``(d, c, s)`` is
``(d·cfg + c)·sp + s``, so the ``sp`` peers of a rank are its nearest neighbours (on one NVLink
node every group is fast; across nodes put ``sp`` inside a node).

* ``dp``: the prompts / samples are split across data-parallel ranks;
* ``cfg``: 1 or 2: the conditional rows on cfg rank 0, the unconditional on cfg rank 1;
* ``sp``: Ulysses sequence parallel: it must divide the model's key-value heads, because each
  sp rank attends with ``Hkv / sp`` kv heads (and their ``Hq / sp`` query heads) over the whole
  sequence. A layout where it does not is refused before any weight is loaded: running it would
  need kv heads replicated across ranks (``sp / Hkv`` copies each), which this engine does not do.

Every check here runs on the layout, the world size and the checkpoint's ``config.json`` only:
nothing is loaded and no process group is needed for the errors.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

DIMS = ("dp", "cfg", "sp")
#: how long a collective waits for its peers before it fails (``init_mesh(timeout=)``): a rank that
#: died or hangs then stops the others with an error instead of leaving them blocked forever
TIMEOUT = datetime.timedelta(minutes=10)
_ITEM = re.compile(r"^\s*([a-z]+)\s*=\s*(\d+)\s*$")


@dataclass(frozen=True)
class Layout:
    """Sizes of the three mesh dims; their product is the world size."""

    dp: int = 1
    cfg: int = 1
    sp: int = 1

    @property
    def size(self) -> int:
        return self.dp * self.cfg * self.sp

    def __str__(self) -> str:
        return ",".join(f"{d}={getattr(self, d)}" for d in DIMS)


def parse_layout(value, *, name: str = "parallel") -> Layout:
    """A :class:`Layout` from ``"dp=2,cfg=2,sp=2"``, a Layout, a dict or a ``DeviceMesh`` (its dim
    names must be ``dp`` / ``cfg`` / ``sp``, any subset in that order). Errors name ``name``."""
    if isinstance(value, Layout):
        layout = value
    elif isinstance(value, dict):
        unknown = sorted(set(value) - set(DIMS))
        if unknown:
            raise ValueError(f"{name}: unknown dim(s) {unknown}; expected {', '.join(DIMS)}")
        layout = Layout(**{k: int(v) for k, v in value.items()})
    elif isinstance(value, str):
        sizes: dict[str, int] = {}
        for item in filter(None, (s.strip() for s in value.split(","))):
            m = _ITEM.match(item)
            if m is None:
                raise ValueError(f"{name}: expected dims like 'dp=2,cfg=2,sp=2', got {value!r} ({item!r})")
            dim, size = m.group(1), int(m.group(2))
            if dim not in DIMS:
                raise ValueError(f"{name}: unknown dim {dim!r} in {value!r}; expected {', '.join(DIMS)}")
            if dim in sizes:
                raise ValueError(f"{name}: dim {dim!r} given twice in {value!r}")
            sizes[dim] = size
        if not sizes:
            raise ValueError(f"{name}: expected dims like 'dp=2,cfg=2,sp=2', got {value!r}")
        layout = Layout(**sizes)
    elif hasattr(value, "mesh_dim_names") and hasattr(value, "shape"):
        names = tuple(value.mesh_dim_names or ())
        if not names or any(n not in DIMS for n in names) or list(names) != sorted(names, key=DIMS.index):
            raise ValueError(f"{name}: a DeviceMesh with dim names among {DIMS} (in that order), got {names}")
        layout = Layout(**dict(zip(names, (int(s) for s in value.shape), strict=True)))
    else:
        raise TypeError(f"{name}: expected a 'dp=..,cfg=..,sp=..' string, a Layout or a DeviceMesh, "
                        f"got {type(value).__name__}")
    for dim in DIMS:
        size = getattr(layout, dim)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{name}: {dim} must be a positive int, got {size!r}")
    if layout.cfg not in (1, 2):
        raise ValueError(f"{name}: cfg={layout.cfg}, but CFG parallel splits the conditional and the "
                         "unconditional rows: cfg must be 1 or 2")
    return layout


def check_layout(layout: Layout, *, world_size: int | None = None, config=None, name: str = "parallel") -> None:
    """Refuse an impossible layout before anything is loaded.

    Parameters
    ----------
    world_size : the number of processes (``WORLD_SIZE`` under torchrun); must equal dp·cfg·sp
    config : the model's :class:`~ursa_engine.config.ModelConfig`: sp must divide its key-value heads
    """
    if world_size is not None and world_size != layout.size:
        divides = "" if world_size % layout.size else f" (it divides {world_size}: add dp={world_size // layout.size}?)"
        raise ValueError(f"{name}: {layout} needs {layout.size} processes (dp·cfg·sp), but the world has "
                         f"{world_size}{divides}; launch torchrun --nproc-per-node {layout.size}")
    if config is not None and layout.sp > 1:
        hkv, hq = config.num_key_value_heads, config.num_attention_heads
        if hkv % layout.sp:
            ok = [d for d in range(1, hkv + 1) if hkv % d == 0]
            raise ValueError(f"{name}: sp={layout.sp} does not divide the model's {hkv} key-value heads "
                             f"({hq} query heads): Ulysses gives each sp rank Hkv/sp whole kv heads, and "
                             f"replicating kv heads across ranks is not supported; use sp in {ok} "
                             "(and dp or cfg for the other GPUs)")


def world_from_env() -> tuple[int, int, int] | None:
    """``(rank, local_rank, world_size)`` from torchrun's environment, or None outside torchrun."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    return rank, int(os.environ.get("LOCAL_RANK", rank)), world


def check_rank_device(device, local_rank: int | None = None, *, name: str = "device") -> None:
    """Refuse a CUDA device other than this rank's own ``cuda:LOCAL_RANK`` on a mesh: under torchrun
    an explicit ``cuda:0`` would put every rank on GPU 0. ``local_rank``: None reads ``LOCAL_RANK``
    (nothing is checked outside torchrun); CPU devices and ``"cuda"`` without an index pass."""
    device = torch.device(device)
    if device.type != "cuda" or device.index is None:
        return
    if local_rank is None:
        env = world_from_env()
        if env is None:
            return
        local_rank = env[1]
    if device.index != local_rank:
        raise ValueError(f"{name}: {device} on a mesh, but this is local rank {local_rank}, whose device is "
                         f"cuda:{local_rank}: with mesh= each rank runs on cuda:LOCAL_RANK (pass device='cuda' or "
                         "none, or move the model there)")


def init_mesh(parallel, *, device=None, config=None, name: str = "parallel", timeout: datetime.timedelta = TIMEOUT):
    """The ``DeviceMesh`` (dims dp, cfg, sp) of a layout, initializing ``torch.distributed`` from
    torchrun's environment when it is not initialized (NCCL on CUDA, gloo on the CPU).

    ``device``: "cuda" / "cpu" / None (the initialized process group's backend, else CUDA when
    available; each CUDA rank uses ``cuda:LOCAL_RANK``). ``timeout``: how long a collective of the
    group this creates waits for its peers before failing (:data:`TIMEOUT`, 10 minutes; a group
    initialized by the caller keeps its own). Checks (:func:`check_layout`) run before the process
    group is created. Returns the mesh.
    """
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    if isinstance(parallel, DeviceMesh):
        layout = parse_layout(parallel, name=name)
        check_layout(layout, world_size=dist.get_world_size(), config=config, name=name)
        return parallel
    layout = parse_layout(parallel, name=name)
    if dist.is_initialized():
        world = dist.get_world_size()
    else:
        env = world_from_env()
        if env is None:
            raise RuntimeError(f"{name}: {layout} needs torch.distributed: launch with torchrun --nproc-per-node "
                               f"{layout.size} (RANK / WORLD_SIZE are not set) or call "
                               "torch.distributed.init_process_group first")
        world = env[2]
    check_layout(layout, world_size=world, config=config, name=name)
    if device is not None:
        kind = torch.device(device).type
    elif dist.is_initialized():  # the caller's group says where the collectives run
        kind = "cuda" if "nccl" in str(dist.get_backend()) else "cpu"
    else:
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    local = None
    if kind == "cuda":
        env = world_from_env()
        local = env[1] if env is not None else dist.get_rank() % torch.cuda.device_count()
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", timeout=timeout,
                                device_id=None if local is None else torch.device("cuda", local))
    return init_device_mesh(kind, (layout.dp, layout.cfg, layout.sp), mesh_dim_names=DIMS)


class Groups:
    """This rank's coordinates and process groups in a dp × cfg × sp mesh.

    ``wide`` is the cfg × sp group of this rank's dp slice (cfg-major): past ``guidance_trunc``
    the conditional rows are sequence-sharded over it when ``cfg·sp`` divides the kv heads.
    Creating it is collective: every rank builds every dp slice's group, in order.
    """

    def __init__(self, mesh):
        self.mesh = mesh
        self.layout = parse_layout(mesh, name="mesh")
        ranks = mesh.mesh.reshape(self.layout.dp, self.layout.cfg, self.layout.sp)
        me = dist.get_rank()
        where = (ranks == me).nonzero()
        if where.shape[0] != 1:
            raise ValueError(f"mesh: rank {me} is not in the mesh {ranks.tolist()}")
        self.dp_rank, self.cfg_rank, self.sp_rank = (int(v) for v in where[0])
        self.dp = mesh.get_group("dp") if self.layout.dp > 1 else None
        self.cfg = mesh.get_group("cfg") if self.layout.cfg > 1 else None
        self.sp = mesh.get_group("sp") if self.layout.sp > 1 else None
        self.wide = self.sp
        if self.layout.cfg > 1:
            for d in range(self.layout.dp):
                members = ranks[d].reshape(-1).tolist()
                group = dist.new_group(members)
                if d == self.dp_rank:
                    self.wide = group
        self.wide_rank = self.cfg_rank * self.layout.sp + self.sp_rank
        self.wide_size = self.layout.cfg * self.layout.sp
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}") if mesh.device_type == "cuda" \
            else torch.device("cpu")

    @property
    def rank(self) -> int:
        return dist.get_rank()
