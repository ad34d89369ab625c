"""Inputs shared by the native backend's test files (test_native.py, test_native_checks.py)."""

import importlib

import torch

import ursa_engine as ue
from ursa_engine import _native as nat

_C = importlib.import_module("ursa_engine._native_cpu")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and nat.unavailable("cuda") is None else [])
AGREE = 0.99  # same seed: tokens equal up to float ties (§2.5)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _codebook(kind: str, seed: int = 0) -> ue.Codebook:
    """'table' (K=97, m=5), 'wide' (K=97, m=40: the row-major path), 'fsq' (K=100 from levels)."""
    if kind == "fsq":
        return ue.Codebook.fsq((4, 5, 5))
    m = 40 if kind == "wide" else 5
    return ue.Codebook(torch.randn(97, m, generator=_gen(seed)))


def _step_inputs(D, K, dtype, seed, device):
    g = _gen(seed)
    cond = (torch.randn(D, K, generator=g) * 2).to(dtype).to(device)
    uncond = torch.randn(D, K, generator=g).to(dtype).to(device)
    x = torch.randint(0, K, (D,), generator=g).to(device)
    return cond, uncond, x
