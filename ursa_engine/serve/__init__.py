"""Serving: step-level continuous batching and the HTTP API (``ursa-engine serve``, issue 14).

:mod:`.batcher` runs requests at different steps in one forward pass (per-row sampler steps,
:mod:`ursa_engine.rowwise`); :mod:`.app` is the FastAPI application around it. The HTTP stack is
imported only by :mod:`.app` (``pip install ursa-engine[serve]``).
"""

from .batcher import POLICIES, Batcher, Cancelled, GenerationRequest, Job, QueueFull

__all__ = ["POLICIES", "Batcher", "Cancelled", "GenerationRequest", "Job", "QueueFull"]
