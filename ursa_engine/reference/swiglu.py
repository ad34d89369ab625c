"""SwiGLU activation ``silu(gate) * up``, the oracle of ``triton_kernels/swiglu.py`` (DESIGN §3).

Rounding is that of the unfused torch expression in the input dtype: ``silu(gate)`` is rounded,
then the product is rounded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``; ``gate`` and ``up`` are (..., I) of one dtype; returns (..., I)."""
    return F.silu(gate) * up
