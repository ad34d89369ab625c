"""Live tensor bytes of a computation: its peak memory, measured on real tensors or planned on fake ones.

:class:`LiveBytes` is a ``TorchDispatchMode``: it sees every aten op that Python code runs (below
autograd and the composite decompositions, above the kernels) and keeps the byte count of the
tensor storages those ops created that are still alive. Each storage is counted once, by the
identity of its untyped storage, however many views share it; its bytes come back when the
storage dies (a weak reference on the storage object, which PyTorch keeps alive exactly as long
as the C++ storage). In-place ops, views and ``out=`` results reuse a storage that an input
already holds and add nothing. Storages that existed before the tracker started (weights,
inputs) are never counted: figures are bytes **above** what was live at the start, the quantity
``torch.cuda.max_memory_allocated() − memory_allocated()`` measures around a call.

Run under ``torch._subclasses.fake_tensor.FakeTensorMode`` nothing is allocated, so the peak
memory of a real-size computation can be computed on any CPU in seconds::

    with FakeTensorMode():
        model = build().to(torch.bfloat16)          # fake weights: no memory
        x = torch.empty(shape, dtype=torch.bfloat16)
        with LiveBytes(granularity=512) as mem, mem.track_modules(model), mem.phase("decode"):
            model(x)
    mem.peak, mem.peak_at                           # bytes, and where (phase, module, op)

Enter it **inside** the fake mode (last), so that it sees each op before the fake mode runs it.
The same code on real tensors gives the same figures (tested): the tracker only reads storages.

What it does not see: scratch memory that a kernel allocates and frees inside one op (cuDNN /
cuBLAS workspaces, im2col buffers, a fused attention kernel's tiles) — except where a
``workspace`` callable declares it (our custom ops: :func:`ursa_engine.ops_library.workspace_buffers`);
those bytes count as live while the op runs. A fake run follows the
CPU's op choices: ``scaled_dot_product_attention`` becomes the CPU's fused kernel (output and
log-sum-exp only, like CUDA's flash / memory-efficient kernels); under
``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`` it becomes the math decomposition (the
score matrix in fp32), the CUDA fallback for shapes the fused kernels refuse.
"""

from __future__ import annotations

import contextlib
import heapq
import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# ``torch.tensor(data)`` builds its tensor outside any mode, then lifts it: real runs never see that storage,
# and a fake mode gives the lifted copy a new one; neither is counted, so real and fake runs agree.
_CONSTANTS = (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default)
CUDA_GRANULARITY = 512  # the CUDA caching allocator rounds every block up to a multiple of 512 bytes


@dataclass
class PhaseStats:
    """Live bytes seen during one phase (bytes above the tracker's start)."""

    start: int = 0  # live bytes when the phase began
    peak: int = 0  # the most live bytes while it ran
    end: int | None = None  # live bytes when it ended (None while it runs)
    allocated: int = 0  # bytes of every storage created in it (freed or not)
    ops: int = 0  # aten ops run in it
    largest: dict | None = None  # the largest storage created in it (bytes): {"bytes", "numel", "op", "shape", ...}
    most_elements: dict | None = None  # the storage (or declared workspace tensor) of the most elements created in it
    own_allocated: int = 0  # bytes created while it was the innermost phase (not in a nested one)


@dataclass
class _Storage:
    nbytes: int
    op: str
    shape: tuple[int, ...]
    dtype: str
    phase: str
    module: str | None
    ref: weakref.ref | None = field(repr=False)
    numel: int = 0

    def describe(self) -> dict:
        return {"bytes": self.nbytes, "numel": self.numel, "op": self.op, "shape": list(self.shape),
                "dtype": self.dtype, "phase": self.phase, "module": self.module}


class LiveBytes(TorchDispatchMode):
    """Track the bytes of live tensor storages created while the mode is active.

    Parameters
    ----------
    granularity : round every storage up to a multiple of this many bytes (1: exact; use
        :data:`CUDA_GRANULARITY` to mirror what ``torch.cuda.memory_allocated`` reports)
    top : how many of the largest live storages to keep at the peak (:attr:`peak_tensors`)
    workspace : optional ``(func, args, kwargs) -> (buffers, label) | None``: scratch an op allocates
        and frees inside itself, counted as live while it runs; ``buffers`` a list of ``(shape, dtype)``
        (each booked like a storage: phase records, ``watch``) or a number of bytes (e.g.
        :func:`ursa_engine.ops_library.workspace_buffers` for our custom ops)
    watch : optional element count: while :attr:`watching`, every storage or declared workspace
        tensor of at least this many elements is listed in :attr:`big` (the (n, K) checks)

    Attributes
    ----------
    current : live bytes now (storages created since the start and not yet freed)
    peak : the most live bytes seen
    peak_at : ``{"phase", "module", "op"}`` where the peak was reached
    peak_tensors : the largest storages live at the peak: ``{"bytes", "op", "shape", "dtype", "phase", "module"}``
    allocated : bytes of every storage created (the traffic a run must at least write)
    phases : :class:`PhaseStats` per phase name (nested phases are named ``outer/inner``)
    unphased : bytes of storages created while no phase was open
    big : descriptions of the watched storages (see ``watch``)
    """

    def __init__(self, *, granularity: int = 1, top: int = 8, workspace=None, watch: int | None = None):
        super().__init__()
        self.workspace = workspace
        self.watch, self.watching, self.big = (None if watch is None else int(watch)), False, []
        self.unphased = 0  # bytes of storages created while no phase was open
        if int(granularity) < 1:
            raise ValueError(f"granularity: expected a positive number of bytes, got {granularity!r}")
        self.granularity = int(granularity)
        self.top = int(top)
        self.current = 0
        self.peak = 0
        self.allocated = 0
        self.peak_at: dict[str, str | None] = {"phase": "", "module": None, "op": None}
        self.peak_tensors: list[dict] = []
        self.phases: dict[str, PhaseStats] = {}
        self._live: dict[int, _Storage] = {}
        self._phases: list[str] = []
        self._modules: list[str] = []

    # ------------------------------------------------------------------ where we are
    @property
    def phase_name(self) -> str:
        return "/".join(self._phases)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[PhaseStats]:
        """Name the work done inside the block; peaks are reported per phase (nested: ``a/b``)."""
        self._phases.append(str(name))
        key = self.phase_name
        stats = self.phases.setdefault(key, PhaseStats())
        stats.start, stats.peak, stats.end = self.current, max(stats.peak, self.current), None
        try:
            yield stats
        finally:
            stats.end = self.current
            self._phases.pop()

    @contextlib.contextmanager
    def track_modules(self, module: nn.Module, prefix: str = "") -> Iterator[None]:
        """Record the innermost submodule of ``module`` running when storages are created and at the peak."""
        handles = []

        def enter(name):
            return lambda mod, args: self._modules.append(name)

        def leave(mod, args, out):
            if self._modules:
                self._modules.pop()

        for name, sub in module.named_modules(prefix=prefix):
            handles.append(sub.register_forward_pre_hook(enter(name or type(module).__name__)))
            handles.append(sub.register_forward_hook(leave, always_call=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def phase_of(self, modules, name: str) -> Iterator[None]:
        """Run every call of each module in ``modules`` inside phase ``name`` (forward hooks)."""
        open_phases = []

        def enter(mod, args):
            cm = self.phase(name)
            cm.__enter__()
            open_phases.append(cm)

        def leave(mod, args, out):
            if open_phases:
                open_phases.pop().__exit__(None, None, None)

        handles = []
        for module in modules:
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave, always_call=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    # ------------------------------------------------------------------ the mode
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        scratch = self.workspace(func, args, kwargs) if self.workspace is not None else None
        with self._scratch(func, *scratch) if scratch else contextlib.nullcontext():
            out = func(*args, **kwargs)
            if func in _CONSTANTS:
                return out
            self._outputs(func, args, kwargs, out)  # the outputs exist while the scratch does
        return out

    def _outputs(self, func, args, kwargs, out) -> None:
        held = {_key(s) for s in map(_storage, tree_leaves((args, kwargs))) if s is not None}
        for stats in self._active():
            stats.ops += 1
        for leaf in tree_leaves(out):
            st = _storage(leaf)
            if st is None:
                continue
            key = _key(st)
            entry = self._live.get(key)
            if entry is not None:  # a storage we track, maybe resized by an out= or resize_ op
                grown = self._round(st.nbytes()) - entry.nbytes
                if grown:
                    entry.nbytes += grown
                    self._add(grown, func, entry)
            elif key not in held:  # a new storage (not an input's: not a view, in-place or out= result)
                self._track(st, key, leaf, func)

    def _track(self, st, key: int, tensor: torch.Tensor, func) -> None:
        nbytes = self._round(st.nbytes())

        def freed(_ref, key=key):
            entry = self._live.pop(key, None)
            if entry is not None:
                self.current -= entry.nbytes

        entry = _Storage(nbytes, _op_name(func), tuple(tensor.shape), str(tensor.dtype).replace("torch.", ""),
                         self.phase_name, self._modules[-1] if self._modules else None, weakref.ref(st, freed),
                         numel=int(st.nbytes()) // max(tensor.element_size(), 1))
        self._live[key] = entry
        self.allocated += nbytes
        self._created(entry)
        self._add(nbytes, func, entry)

    def _created(self, entry: _Storage) -> None:
        """Book a new storage or declared workspace tensor: phase records and the ``watch`` list."""
        active = self._active()
        if not active:
            self.unphased += entry.nbytes
        else:
            active[-1].own_allocated += entry.nbytes
        for stats in active:
            stats.allocated += entry.nbytes
            if stats.largest is None or entry.nbytes > stats.largest["bytes"]:
                stats.largest = entry.describe()
            if stats.most_elements is None or entry.numel > stats.most_elements["numel"]:
                stats.most_elements = entry.describe()
        if self.watch is not None and self.watching and entry.numel >= self.watch:
            self.big.append(entry.describe())

    @contextlib.contextmanager
    def _scratch(self, func, spec, label: str) -> Iterator[None]:
        """Declared scratch of one op, live while it runs: ``spec`` is a list of ``(shape, dtype)``
        (each a pseudo storage with its elements, booked like a storage: phase records, ``watch``)
        or a number of bytes (one pseudo storage without elements)."""
        if isinstance(spec, int | float):
            specs = [((), None, self._round(spec))]
        else:
            specs = []
            for shape, dtype in spec:
                numel = math.prod(int(d) for d in shape)
                specs.append((tuple(int(d) for d in shape), dtype, self._round(numel * dtype.itemsize)))
        keys, total = [], 0
        try:
            for shape, dtype, nbytes in specs:
                entry = _Storage(nbytes, f"{_op_name(func)} workspace: {label}", shape,
                                 "workspace" if dtype is None else str(dtype).replace("torch.", ""), self.phase_name,
                                 self._modules[-1] if self._modules else None, None,
                                 numel=0 if dtype is None else math.prod(shape))
                key = -id(entry)  # never a storage address
                self._live[key] = entry
                keys.append(key)
                total += nbytes
                self.allocated += nbytes
                self._created(entry)
                self._add(nbytes, func, entry)
            yield
        finally:
            for key in keys:
                self._live.pop(key, None)
            self.current -= total

    def _add(self, nbytes: int, func, entry: _Storage) -> None:
        self.current += nbytes
        for stats in self._active():
            stats.peak = max(stats.peak, self.current)
        if self.current > self.peak:
            self.peak = self.current
            self.peak_at = {"phase": self.phase_name, "module": self._modules[-1] if self._modules else None,
                            "op": _op_name(func)}
            largest = heapq.nlargest(self.top, self._live.values(), key=lambda e: e.nbytes)
            self.peak_tensors = [e.describe() for e in largest]

    def _active(self) -> list[PhaseStats]:
        return [self.phases["/".join(self._phases[: i + 1])] for i in range(len(self._phases))]

    def _round(self, nbytes: int) -> int:
        g = self.granularity
        return -(-int(nbytes) // g) * g

    # ------------------------------------------------------------------ results
    def reset_peak(self) -> None:
        """Start a new peak from the bytes live now (as ``torch.cuda.reset_peak_memory_stats``)."""
        self.peak = self.current
        self.peak_at = {"phase": self.phase_name, "module": None, "op": None}
        self.peak_tensors = []

    def summary(self) -> dict:
        """Peak, where it happened, the largest live tensors then, and every phase (JSON-ready)."""
        return {"peak_bytes": self.peak, "peak_phase": self.peak_at["phase"], "peak_module": self.peak_at["module"],
                "peak_op": self.peak_at["op"], "current_bytes": self.current, "allocated_bytes": self.allocated,
                "granularity": self.granularity, "peak_tensors": list(self.peak_tensors),
                "phases": {k: vars(v).copy() for k, v in self.phases.items()}}


def _storage(x) -> torch.UntypedStorage | None:
    if not isinstance(x, torch.Tensor) or x.is_sparse or x.layout != torch.strided:
        return None
    try:
        return x.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensors without a storage (e.g. some wrapper subclasses)
        return None


def _key(st: torch.UntypedStorage) -> int:
    # the address of the C++ StorageImpl: one per storage, shared by every view, on real and fake tensors
    # (data_ptr() is 0 for every fake / meta storage); reused only after the storage died (then untracked)
    return st._cdata


def _op_name(func) -> str:
    return str(getattr(func, "__name__", func))
