"""Memory accounting: live tensor bytes of a computation, real or fake (:mod:`.tracker`), and the
planned peak memory of URSA's tokenizers at real sizes, computed on any CPU (:mod:`.plan`)."""

from .plan import Plan, plan_decode, plan_encode
from .tracker import CUDA_GRANULARITY, LiveBytes, PhaseStats

__all__ = ["CUDA_GRANULARITY", "LiveBytes", "PhaseStats", "Plan", "plan_decode", "plan_encode"]
