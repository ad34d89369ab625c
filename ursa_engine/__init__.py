"""ursa-engine: fast, exact kernels and runtime for uniform discrete diffusion with a metric path.

Importing the package compiles nothing: Triton kernels and the native extension load on first use.
"""

from . import compat, training
from .codebook import Codebook
from .engine import Engine, GenerationResult
from .model import ModelConfig, URSATransformer, latent_positions
from .paths import MaskPath, MetricPath, MixturePath
from .pipeline import URSAPipeline, URSAPipelineOutput
from .scheduler import Scheduler
from .schedules import frame_times_to_tokens, sample_timesteps, shift_time

__all__ = [
    "Codebook",
    "MetricPath",
    "MixturePath",
    "MaskPath",
    "Scheduler",
    "shift_time",
    "sample_timesteps",
    "frame_times_to_tokens",
    "compat",
    "training",
    "ModelConfig",
    "URSATransformer",
    "latent_positions",
    "Engine",
    "GenerationResult",
    "URSAPipeline",
    "URSAPipelineOutput",
]
__version__ = "0.1.0"
