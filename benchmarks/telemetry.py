"""What a result was measured on: device telemetry (nvidia-ml-py), software versions, git commit.

Everything here is best effort: a missing library or an NVML error gives ``None`` fields and
an ``errors`` entry, never an exception, so telemetry can never cost a benchmark run.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- git
def git_commit(root: Path = REPO_ROOT) -> dict:
    """``{"commit", "dirty", "source"}``.

    The device machine gets a copy of the working tree that may lack ``.git``: the commit then
    comes from ``$URSA_COMMIT`` (set it in the command that starts the suite), else "unknown".
    """
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10, check=False).stdout
        return {"commit": sha, "dirty": bool(status.strip()), "source": "git"}
    except (OSError, subprocess.SubprocessError):
        pass
    env = os.environ.get("URSA_COMMIT", "").strip()
    if env:
        return {"commit": env, "dirty": None, "source": "URSA_COMMIT"}
    return {"commit": "unknown", "dirty": None, "source": "none"}


# ----------------------------------------------------------------------------- software
def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "unknown")
    except Exception:  # noqa: BLE001 - an absent or broken package is just "not there"
        return None


def software() -> dict:
    """Versions of everything that changes a timing."""
    cudnn = None
    if torch.backends.cudnn.is_available():
        cudnn = torch.backends.cudnn.version()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": cudnn,
        "triton": _version("triton"),
        "flash_attn": _version("flash_attn"),
        "numpy": _version("numpy"),
        "ursa_engine": _version("ursa_engine"),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
    }


# ----------------------------------------------------------------------------- NVML
def _nvml():
    import pynvml  # nvidia-ml-py

    pynvml.nvmlInit()
    return pynvml


def _nvml_handle(nv, device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is not None:
        try:
            text = str(uuid)
            return nv.nvmlDeviceGetHandleByUUID(text if text.startswith("GPU-") else f"GPU-{text}")
        except Exception:  # noqa: BLE001, S110 - fall back to the index below
            pass
    return nv.nvmlDeviceGetHandleByIndex(index)


def _try(errors: list, name: str, fn):
    try:
        value = fn()
        return value.decode() if isinstance(value, bytes) else value
    except Exception as err:  # noqa: BLE001 - one unsupported query must not hide the others
        errors.append(f"{name}: {err}")
        return None


def nvml_sample(device: torch.device) -> dict:
    """Clocks, power, temperature and utilisation now (cheap: call it right after a timing)."""
    if device.type != "cuda":
        return {}
    errors: list[str] = []
    try:
        nv = _nvml()
        h = _nvml_handle(nv, device)
    except Exception as err:  # noqa: BLE001
        return {"nvml_error": str(err)}
    power = _try(errors, "power", lambda: nv.nvmlDeviceGetPowerUsage(h))
    return {
        "sm_clock_mhz": _try(errors, "sm_clock", lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
        "mem_clock_mhz": _try(errors, "mem_clock", lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM)),
        "power_w": power / 1000 if power is not None else None,
        "temperature_c": _try(errors, "temperature",
                              lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
        "gpu_util_pct": _try(errors, "util", lambda: nv.nvmlDeviceGetUtilizationRates(h).gpu),
    }


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_telemetry(device: torch.device) -> dict:
    """Static facts and a first sample of the device: name, driver, clocks, memory, power."""
    if device.type != "cuda":
        return {"type": "cpu", "name": _cpu_model(), "driver": None,
                "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    out = {
        "type": "cuda",
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "l2_bytes": getattr(props, "L2_cache_size", None),
        "total_memory_bytes": props.total_memory,
        "driver": None,
    }
    errors: list[str] = []
    try:
        nv = _nvml()
        h = _nvml_handle(nv, device)
    except Exception as err:  # noqa: BLE001
        out["nvml_error"] = str(err)
        return out
    mem = _try(errors, "memory", lambda: nv.nvmlDeviceGetMemoryInfo(h))
    limit = _try(errors, "power_limit", lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h))
    out.update({
        "nvml_name": _try(errors, "name", lambda: nv.nvmlDeviceGetName(h)),
        "driver": _try(errors, "driver", nv.nvmlSystemGetDriverVersion),
        "cuda_driver_version": _try(errors, "cuda_driver", nv.nvmlSystemGetCudaDriverVersion),
        "max_sm_clock_mhz": _try(errors, "max_sm_clock",
                                 lambda: nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM)),
        "max_mem_clock_mhz": _try(errors, "max_mem_clock",
                                  lambda: nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_MEM)),
        "memory_total_bytes": getattr(mem, "total", None),
        "memory_used_bytes": getattr(mem, "used", None),
        "power_limit_w": limit / 1000 if limit is not None else None,
        "pstate": _try(errors, "pstate", lambda: nv.nvmlDeviceGetPerformanceState(h)),
    })
    out.update(nvml_sample(device))
    if errors:
        out["nvml_errors"] = errors
    return out


def device_slug(telemetry: dict) -> str:
    """``"nvidia-h200"``, ``"cpu"``: the device part of a result file name."""
    if telemetry.get("type") != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", str(telemetry.get("name", "gpu")).lower()).strip("-") or "gpu"


def run_header(device: torch.device, mode: str) -> dict:
    """The facts every result record repeats (DESIGN §6: reproducible figures)."""
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "mode": mode,
        "host": platform.node(),
        **git_commit(),
        "device": device_telemetry(device),
        "software": software(),
    }
