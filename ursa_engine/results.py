"""What a generation returns and how it is measured: :class:`GenerationResult`, the per-step timer
(CUDA events, read once at the end) and timed decoding (DESIGN §6, §8).

Step times never include encoding or decoding pixels; decoding is timed apart, with its own peak
memory on the tokenizer's device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class GenerationResult:
    """What :meth:`Engine.generate` returns.

    tokens : (B, T, H, W) int64 latent tokens
    frames : (B, F, H·s, W·s, 3) uint8 pixels decoded by the engine's tokenizer (``F = vae.num_frames(T)``);
        None without a tokenizer or with ``decode=False``
    step_times : seconds of each of the N steps (a skipped step counts its ~0 host time); never
        includes encoding or decoding pixels
    peak_memory : peak bytes allocated on the CUDA device during the steps (None on the CPU)
    total_time : wall seconds of the whole call (pixel encoding and decoding included)
    decode_time : seconds spent decoding tokens to ``frames`` (0 when nothing was decoded)
    decode_peak_memory : peak bytes allocated on the tokenizer's CUDA device while decoding
    model_calls : transformer evaluations; guided_steps : steps run as a 2B batch
    mode, attention : what ran ("eager" / "graph", the attention backend chosen)
    trajectory : with ``return_trajectory=True``, the rollout (:class:`ursa_engine.trajectory.Trajectory`)
    """

    tokens: torch.Tensor
    frames: np.ndarray | None = None
    step_times: list[float] = field(default_factory=list)
    peak_memory: int | None = None
    total_time: float = 0.0
    decode_time: float = 0.0
    decode_peak_memory: int | None = None
    model_calls: int = 0
    guided_steps: int = 0
    mode: str = "eager"
    attention: str = ""
    trajectory: object = None


class StepTimer:
    """Per-step wall time: CUDA events (read once at the end, no sync per step) or perf_counter."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.events = []

    def start(self):
        if self.cuda:
            self.events.append([torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)])
            self.events[-1][0].record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self.events[-1][1].record()
            return 0.0
        return time.perf_counter() - self._t0

    def resolve(self, times: list[float]) -> list[float]:
        if not self.cuda:
            return times
        torch.cuda.synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in self.events]


def timed_decode(decode, device: torch.device, tokens) -> tuple[np.ndarray, float, int | None]:
    """``decode(tokens)`` as (frames, seconds, peak bytes on the tokenizer's CUDA ``device`` or None)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the steps' queued work is not decode time
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    frames = decode(tokens)  # ends with a copy to host: synchronizes
    seconds = time.perf_counter() - t0
    return frames, seconds, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
