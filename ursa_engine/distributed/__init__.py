"""Many processes on ``torch.distributed``: data-, CFG- and Ulysses sequence-parallel generation,
FSDP2 and sequence-parallel training (issue 13; README "Many GPUs").

* :mod:`.mesh`: the ``dp=2,cfg=2,sp=2`` layout, its checks (before any weight is read), the
  ``DeviceMesh`` and process groups (NCCL on CUDA, gloo on the CPU, from torchrun's environment);
* :mod:`.ulysses`: sequence shards and the all-to-all of heads around attention;
* :mod:`.generate`: the parallel step loop behind ``Engine(mesh=...)`` /
  ``Engine.from_pretrained(..., mesh=...)`` and ``torchrun -m ursa_engine generate --parallel``;
* :mod:`.graphs`: CUDA graphs of a rank's step, its NCCL collectives captured inside;
* :mod:`.training`: ``fully_shard`` of the transformer, :class:`SequenceParallelLoss` and noise
  draws by global token index;
* :mod:`.cost`: bytes moved per step of each layout (``benchmarks/bench_parallel.py``).

The guarantee (DESIGN §2.5): the same tokens as one process, whatever the layout.
"""

from __future__ import annotations

from .. import checkpoint
from .mesh import DIMS, Groups, Layout, check_layout, check_rank_device, init_mesh, parse_layout

__all__ = ["DIMS", "Groups", "Layout", "check_layout", "check_rank_device", "init_mesh", "parse_layout", "groups_for",
           "setup_mesh"]


def groups_for(mesh, config=None, device=None) -> Groups | None:
    """:class:`Groups` of ``mesh`` (a Groups, a ``DeviceMesh``, or a layout string / :class:`Layout`,
    initialized by :func:`init_mesh`); None for a mesh of one process. ``device``: the model's, checked
    against this rank's (:func:`check_rank_device`: ``cuda:LOCAL_RANK``)."""
    if device is not None:
        check_rank_device(device, name="device")
    if isinstance(mesh, Groups):
        groups = mesh
    else:
        groups = Groups(init_mesh(mesh, config=config, name="mesh"))
    if config is not None:
        check_layout(groups.layout, config=config, name="mesh")
    return groups if groups.layout.size > 1 else None


def setup_mesh(mesh, *, config_folder, device=None, name: str = "mesh"):
    """For ``Engine.from_pretrained(..., mesh=)``: check the layout against the world size and the
    checkpoint's ``config.json`` (nothing else read), initialize the mesh and pick this rank's device
    (``cuda:LOCAL_RANK`` for "cuda" or None on a CUDA machine). Returns ``(Groups, device)``."""
    import torch

    config = checkpoint.read_config(config_folder)
    if device is not None:
        check_rank_device(device, name="device")
    kind = torch.device(device).type if device is not None else None
    groups = Groups(init_mesh(mesh, device=kind, config=config, name=name))
    if device is None or (torch.device(device).type == "cuda" and torch.device(device).index is None):
        device = groups.device
    return groups, device
