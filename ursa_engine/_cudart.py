"""Loading the native CUDA module against the shared CUDA runtime, and saying why it cannot run.

The module (``csrc/cuda``, CMakeLists.txt) links ``libcudart.so.<major>`` dynamically, not the
static runtime: a static CUDA 13 runtime needs a driver of its generation even where torch runs
on an older one, and then silently counts no device. Shared, it resolves the runtime as torch
does: the copy torch already loaded (same soname), else through its RUNPATH the pip wheel's
(``site-packages/nvidia/cu13/lib`` from CUDA 13 on, ``nvidia/cuda_runtime/lib`` before) or the
toolkit it was built with. An editable install lives in the repository, where that RUNPATH finds
no wheel: :func:`import_module` then preloads the wheel's copy from ``sys.path`` and retries.

When it still cannot run, :func:`runtime_report` gives the facts (the soname it needs, runtime
and driver versions, the runtime's own message) and :func:`no_device_reason` the sentence with
what to do. Nothing here needs a GPU: on a machine without a driver the runtime loads and
reports driver version 0.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import re
import struct
import sys
from pathlib import Path

import torch

CUDART = re.compile(r"libcudart\.so\.(\d+)")


def cudart_dirs(major: str | int) -> list[Path]:
    """Where a CUDA ``major`` runtime may lie, in search order: the pip wheels on ``sys.path``,
    then the toolkit (``$CUDA_HOME``, ``$CUDA_PATH``, ``/usr/local/cuda``)."""
    dirs = [Path(p) / "nvidia" / sub / "lib" for p in sys.path if p for sub in (f"cu{major}", "cuda_runtime")]
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    return dirs + [Path(h) / lib for h in homes if h for lib in ("lib64", "lib")]


def _preload(soname: str) -> str | None:
    """Load ``soname`` globally from the first of :func:`cudart_dirs` that has a loadable copy."""
    for d in cudart_dirs(CUDART.fullmatch(soname).group(1)):
        path = d / soname
        if path.is_file():
            try:
                ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
                return str(path)
            except OSError:
                continue
    return None


def _rebuild_hint() -> str:
    cuda = torch.version.cuda or "<torch's CUDA version>"
    return (f"rebuild the module with the nvcc of torch's CUDA "
            f"(`CUDACXX=/usr/local/cuda-{cuda}/bin/nvcc pip install -e .`)")


def missing_runtime(soname: str, err) -> str:
    """Why the module cannot load without ``soname``, and the three ways out."""
    major = int(CUDART.fullmatch(soname).group(1))
    wheel = "nvidia-cuda-runtime" if major >= 13 else f"nvidia-cuda-runtime-cu{major}"
    return (f"it needs the CUDA {major} runtime {soname}, loaded neither by torch (torch {torch.__version__}, CUDA "
            f"{torch.version.cuda}) nor found in the pip wheels on sys.path or a CUDA toolkit ({err}); install it "
            f"(`pip install {wheel}`), add its directory to LD_LIBRARY_PATH, or {_rebuild_hint()}")


def import_module(name: str):
    """``(module, None)``, or ``(None, why)``: a missing ``libcudart.so.N`` is preloaded from
    :func:`cudart_dirs` and the import retried once."""
    try:
        return importlib.import_module(name), None
    except ImportError as err:
        missing = CUDART.search(str(err))
        if missing is None:
            return None, str(err)
        path = _preload(missing.group(0))
        if path is None:
            return None, missing_runtime(missing.group(0), err)
        try:
            return importlib.import_module(name), None
        except ImportError as again:
            return None, f"{again} (after loading {path})"


def elf_needed(path) -> list[str]:
    """The ``DT_NEEDED`` entries (libraries the dynamic loader must find) of an ELF64 little-endian
    shared object, as ``readelf -d`` lists them (no binutils needed)."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4:6] != b"\x02\x01":
        raise ValueError(f"path: {path} is not an ELF64 little-endian file")
    (shoff,), (shentsize, shnum) = struct.unpack_from("<Q", data, 0x28), struct.unpack_from("<HH", data, 0x3A)
    # section header: name, type, flags, addr, offset, size, link, info, addralign, entsize
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    needed = []
    for sec in sections:
        if sec[1] != 6:  # SHT_DYNAMIC
            continue
        strings = sections[sec[6]][4]  # file offset of its string table
        for off in range(sec[4], sec[4] + sec[5], 16):
            tag, value = struct.unpack_from("<qQ", data, off)
            if tag == 0:  # DT_NULL
                break
            if tag == 1:  # DT_NEEDED
                start = strings + value
                needed.append(data[start : data.index(b"\0", start)].decode())
    return needed


def runtime_report(module) -> dict:
    """Facts about ``module``'s CUDA runtime (None: not loaded).

    Keys: ``file``; ``cudart`` (the soname it needs; None for a static build); ``runtime`` and
    ``driver`` (CUDA versions, 13000 = 13.0; driver 0: no driver found); ``status`` (the runtime's
    message for ``cudaGetDeviceCount``); ``torch_devices``.
    """
    report = dict(file=None, cudart=None, runtime=None, driver=None, status=None,
                  torch_devices=torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if module is None:
        return report
    report["file"] = module.__file__
    report["cudart"] = next((n for n in elf_needed(module.__file__) if CUDART.fullmatch(n)), None)
    if report["cudart"] is None:
        return report
    rt = ctypes.CDLL(report["cudart"], mode=os.RTLD_NOLOAD)  # the copy the module resolved: already loaded
    for key, fn in (("runtime", rt.cudaRuntimeGetVersion), ("driver", rt.cudaDriverGetVersion)):
        version = ctypes.c_int(0)
        fn(ctypes.byref(version))
        report[key] = version.value
    count = ctypes.c_int(0)
    rt.cudaGetErrorString.restype = ctypes.c_char_p
    report["status"] = rt.cudaGetErrorString(rt.cudaGetDeviceCount(ctypes.byref(count))).decode()
    return report


def version(v: int) -> str:
    """13020 -> "13.2"."""
    return f"{v // 1000}.{v % 1000 // 10}"


def no_device_reason(report: dict) -> str:
    """Why a loaded module counts no CUDA device (a :func:`runtime_report`), and what to do."""
    seen = f"torch sees {report['torch_devices']} CUDA device(s)"
    if report["cudart"] is None:
        return (f"the native CUDA module sees no CUDA device ({seen}); it links a static CUDA runtime, which needs a "
                f"driver of its own CUDA generation: rebuild it against the shared runtime (`pip install -e .`)")
    rt, drv, name = report["runtime"], report["driver"], report["cudart"]
    if not drv:
        return (f"the native CUDA module sees no CUDA device: its runtime {name} (CUDA {version(rt)}) found no NVIDIA "
                f"driver (libcuda.so.1): {report['status']}; {seen}")
    if drv // 1000 < rt // 1000 or (drv < rt and report["status"] != "no error"):
        return (f"the native CUDA module sees no CUDA device: the NVIDIA driver supports CUDA {version(drv)}, older "
                f"than the module's runtime {name} (CUDA {version(rt)}): {report['status']}; {seen}; install a "
                f"driver for CUDA {rt // 1000}, or {_rebuild_hint()}")
    return (f"the native CUDA module sees no CUDA device: {report['status']} (driver CUDA {version(drv)}, runtime "
            f"{name} CUDA {version(rt)}); {seen}")
