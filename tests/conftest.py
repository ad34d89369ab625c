"""Shared fixtures: every sampler op runs on every available backend (STYLE: Tests)."""

import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter; it must be chosen before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ursa_engine import _dispatch  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(params=_dispatch.BACKENDS)
def backend(request):
    """A backend name, skipped (with the reason) where it cannot run."""
    reason = _dispatch.why_not(request.param, "metric_step", DEVICE, {})
    if reason is not None:
        pytest.skip(reason)
    return request.param


@pytest.fixture
def device():
    return DEVICE


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def served():
    """The bundled digits model as ``serve`` loads it, with torch on one thread (the batch worker, the
    HTTP side and any browser share 2 cores). A test module may define its own ``served``."""
    from ursa_engine.serve.models import ServedModel

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield ServedModel.load()
    torch.set_num_threads(threads)
