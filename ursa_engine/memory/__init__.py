"""Memory accounting: live tensor bytes of a computation, real or fake (:mod:`.tracker`), the
planned peak memory of URSA's tokenizers (:mod:`.plan`) and of a whole generation
(:mod:`.generation`) at real sizes, computed on any CPU."""

from .generation import GenerationPlan, plan_generation
from .plan import Plan, plan_decode, plan_encode
from .tracker import CUDA_GRANULARITY, LiveBytes, PhaseStats

__all__ = ["CUDA_GRANULARITY", "GenerationPlan", "LiveBytes", "PhaseStats", "Plan", "plan_decode", "plan_encode",
           "plan_generation"]
