"""Shared by the model benchmarks: sequence lengths, random-weight models, one denoising step.

Sequence length = 320 prompt tokens + 1 BOV + T·H·W latent tokens (DESIGN §3). Each latent
grid below is a real video / image size ((F − 1)/4 + 1 frames × H/8 × W/8 FSQ tokens):

=========  ==========  =============================================
 tokens     (T, H, W)   what it is
=========  ==========  =============================================
  1,345     1 × 32×32   256×256 image
  4,417     1 × 64×64   512×512 image
 19,521     3 × 80×80   9 frames at 640×640
 19,041    13 × 30×48   49 frames at 240×384 (the paper's "19K" video)
 33,601    13 × 40×64   49 frames at 320×512 (the paper's "34K" video)
=========  ==========  =============================================

FLOPs per step (DESIGN §6, :meth:`ursa_engine.ModelConfig.forward_flops`): per sequence,
``2·P_lin·L`` for the linear layers (``P_lin`` = q/k/v/o and MLP weights of every layer),
``4·L²·(heads·head_dim)`` per layer for non-causal attention (QKᵀ and PV, nothing skipped),
``2·hidden·K·N`` for ``lm_head`` on the N latent positions only; times the batch (2 with CFG).
Norms, RoPE, softmax, embeddings and the sampler are not counted. MFU = FLOPs / time / the
datasheet dense bf16 peak (989 TFLOP/s on H100 / H200); ``ratio_to_floor`` uses the matmul
rate measured in the same run instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PROMPT_LEN = 320
LATENTS = {1_345: (1, 32, 32), 4_417: (1, 64, 64), 19_521: (3, 80, 80), 19_041: (13, 30, 48),
           33_601: (13, 40, 64)}
PRESETS = {"0.6b": "ursa-0.6b", "1.7b": "ursa-1.7b", "4b": "ursa-4b", "tiny": "tiny"}
NUM_STEPS = 50
GUIDANCE_SCALE, GUIDANCE_TRUNC = 7.0, 0.9


def seq_len(latents: tuple[int, int, int], prompt_len: int = PROMPT_LEN) -> int:
    T, H, W = latents
    return prompt_len + 1 + T * H * W


@dataclass
class ModelHolder:
    """Keeps one random-weight model on the device and rebuilds it only when the preset changes."""

    device: torch.device
    name: str | None = None
    model: object = None

    def get(self, preset: str):
        import ursa_engine as ue

        if self.name != preset:
            self.release()
            cfg = ue.ModelConfig.preset(PRESETS[preset])
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            # built on the device directly (no host copy); random init, then cast
            self.model = ue.URSATransformer(cfg, dtype=dtype, device=self.device).eval()
            self.name = preset
        return self.model

    def release(self) -> None:
        self.model, self.name = None, None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def make_engine(model, num_steps: int, *, mode: str, attention: str = "auto", sampler: str = "auto"):
    """An :class:`ursa_engine.Engine` over ``model`` with a metric-path FSQ scheduler of N steps."""
    import ursa_engine as ue

    K = model.config.lm_head_size
    levels = {64_000: (8, 8, 8, 5, 5, 5), 64: (4, 4, 4)}[K]
    sched = ue.Scheduler(ue.MetricPath(ue.Codebook.fsq(levels), alpha=1.0, c=5.0), num_steps, shift=1.0)
    return ue.Engine(model, sched, mode=mode, attn_backend=attention, sampler_backend=sampler)


def random_prompts(model, device, seed: int, rows: int = 1) -> torch.Tensor:
    """(rows, 320) random text ids: fresh data, never zeros or all pads."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randint(0, model.config.lm_vocab_size, (rows, PROMPT_LEN), generator=gen, device=device)


def steady_steps(model, latents, *, mode: str, guided: bool, reps: int, attention: str = "auto",
                 seed: int = 0, device=None) -> tuple[list[float], object]:
    """Per-step latencies (ms) of the engine's own step, from ``Engine.generate`` step timings.

    Runs ``reps + 3`` steps and keeps steps 2 .. N−2: step 0 of the metric path evaluates no
    model (β̇(0) = 0), step 1 pays compilation / autotuning and, in graph mode, the capture,
    and the last step runs eagerly. ``guided``: CFG on (2 rows) for every kept step (all have
    ``t_k < 0.9``), else guidance scale 1 (the conditional row only).
    Returns (samples in ms, the GenerationResult).
    """
    device = device or model.device
    n_steps = reps + 3
    engine = make_engine(model, n_steps, mode=mode, attention=attention)
    prompt, negative = random_prompts(model, device, seed), random_prompts(model, device, seed + 1)
    result = engine.generate(prompt, negative_prompt_ids=negative, latents_shape=latents,
                             guidance_scale=GUIDANCE_SCALE if guided else 1.0, guidance_trunc=1.0,
                             seed=seed, progress=False)
    if result.mode != mode:
        raise RuntimeError(f"engine ran mode={result.mode!r}, asked for {mode!r}")
    return [1e3 * t for t in result.step_times[2:n_steps - 1]], result


def step_flops(cfg, latents: tuple[int, int, int], rows: int) -> float:
    """DESIGN §6 FLOPs of one forward over ``rows`` sequences (module docstring)."""
    n = latents[0] * latents[1] * latents[2]
    return float(cfg.forward_flops(seq_len(latents), batch=rows, latent_tokens=n))
