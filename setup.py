"""Build of the native extension (DESIGN §5): CMake + pybind11 + ninja, torch not needed.

Metadata lives in pyproject.toml; this file only drives CMakeLists.txt, which writes
``ursa_engine/_native_cpu*.so`` and, wherever nvcc exists, ``ursa_engine/_native_cuda*.so``.

Environment: ``URSA_CUDA`` = AUTO (default: build the CUDA module iff a CUDA compiler is found)
| ON (fail without one) | OFF; ``CMAKE_CUDA_ARCHITECTURES`` (default "80-real;90");
``URSA_BUILD_JOBS`` (parallel compile jobs, default: CPU count); ``CUDACXX`` (the nvcc to use:
the CUDA module links that toolkit's shared runtime ``libcudart.so.<major>``, so pick the nvcc of
torch's CUDA major, or install the matching ``nvidia-cuda-runtime`` wheel; see ``_cudart.py``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_namespace_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
PACKAGE = "ursa_engine"
EXTRA_MODULES = ("_native_cuda",)  # side outputs of the same CMake build, present only with nvcc


def _tool(module: str, exe: str) -> str:
    """A build tool from its pip package (the isolated build environment) or from PATH."""
    try:
        mod = __import__(module)
        path = Path(mod.BIN_DIR if module == "ninja" else mod.CMAKE_BIN_DIR) / exe
        if path.exists():
            return str(path)
    except (ImportError, AttributeError):
        pass
    found = shutil.which(exe)
    if found is None:
        raise RuntimeError(f"{exe} not found: install it (pip install {module})")
    return found


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt once; every module lands next to the first one."""

    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        out_dir.mkdir(parents=True, exist_ok=True)
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = _tool("cmake", "cmake")
        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={_tool('ninja', 'ninja')}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DURSA_OUTPUT_DIR={out_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DURSA_CUDA={os.environ.get('URSA_CUDA', 'AUTO')}",
        ]
        if os.environ.get("CMAKE_CUDA_ARCHITECTURES"):
            configure.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['CMAKE_CUDA_ARCHITECTURES']}")
        jobs = os.environ.get("URSA_BUILD_JOBS") or str(os.cpu_count() or 1)
        subprocess.run(configure, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True)

    def copy_extensions_to_source(self) -> None:
        """In-place / editable builds: copy the side modules too, not only the declared one."""
        super().copy_extensions_to_source()
        built = Path(self.build_lib) / PACKAGE
        dest = Path(self.get_finalized_command("build_py").get_package_dir(PACKAGE))
        for name in EXTRA_MODULES:
            for path in built.glob(f"{name}.*"):
                shutil.copyfile(path, dest / path.name)

    def get_outputs(self):
        outputs = super().get_outputs()
        if not outputs:
            return outputs
        built = Path(outputs[0]).parent
        for name in EXTRA_MODULES:
            outputs += [str(p) for p in built.glob(f"{name}.*")]
        return outputs


# `triton_kernels/` and `benchmarks/` stay at the repository root but install as
# `ursa_engine.triton_kernels` / `ursa_engine.benchmarks`: registry packages (and inference stacks)
# install top-level `triton_kernels` / `benchmarks` of their own, and neither may shadow the other.
MAPPED = {f"{PACKAGE}.triton_kernels": "triton_kernels", f"{PACKAGE}.benchmarks": "benchmarks"}
# namespace discovery, as pyproject's packages.find did: the digits assets folders are packages of data
PACKAGES = find_namespace_packages(include=[PACKAGE, f"{PACKAGE}.*"], exclude=["*.__pycache__"]) + sorted(MAPPED)

setup(packages=PACKAGES, package_dir=MAPPED,
      ext_modules=[CMakeExtension(f"{PACKAGE}._native_cpu")], cmdclass={"build_ext": CMakeBuild})
