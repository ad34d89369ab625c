"""Memory accounting: live tensor bytes of a computation, real or fake (:mod:`.tracker`), the
planned peak memory of URSA's tokenizers (:mod:`.plan`), of a whole generation
(:mod:`.generation`) and of one training step (:mod:`.training`) at real sizes, computed on any CPU."""

from .generation import GenerationPlan, plan_generation
from .plan import Plan, plan_decode, plan_encode
from .tracker import CUDA_GRANULARITY, LiveBytes, PhaseStats
from .training import TrainingPlan, plan_training_step

__all__ = ["CUDA_GRANULARITY", "GenerationPlan", "LiveBytes", "PhaseStats", "Plan", "TrainingPlan", "plan_decode",
           "plan_encode", "plan_generation", "plan_training_step"]
