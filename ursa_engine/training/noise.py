"""Noising and training times for any PyTorch loop (DESIGN §2.3): :func:`add_noise` with per-token,
per-frame or per-sample times, :func:`sample_frame_times` (asynchronous per-frame times)."""

from __future__ import annotations

import torch

from ..paths import MaskPath, MetricPath, MixturePath
from ..schedules import sample_timesteps


# ---------------------------------------------------------------------------------------- noising
def expand_times(t, shape: tuple[int, ...]):
    """Times for tokens of ``shape``: a float, per-token (broadcastable), per-sample ``(B,)`` or
    per-frame ``(B, T)`` (aligned on the leading dims, e.g. against tokens ``(B, T, H, W)``)."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    lead = tuple(shape[: t.dim()])
    if t.dim() < len(shape) and tuple(t.shape) == lead:  # leading-aligned: per sample / per frame
        return t.reshape(*t.shape, *([1] * (len(shape) - t.dim()))).expand(shape)
    return t  # the path broadcasts (and names the argument if it cannot)


def add_noise(path: MetricPath | MixturePath | MaskPath, x1: torch.Tensor, t, *, seed=0,
              backend: str = "auto") -> torch.Tensor:
    """Draw ``x_t ~ p_t(· | x1)`` for any path (DESIGN §2.3) with per-token, per-frame or per-sample times.

    Parameters
    ----------
    path : MetricPath | MixturePath | MaskPath
    x1 : LongTensor S, e.g. (B, T, H, W) clean latent tokens
    t : float, or a tensor broadcastable to S, or leading-aligned with S: ``(B,)`` one time per
        sample, ``(B, T)`` one per latent frame (asynchronous scheduling)
    seed : int, or int64 tensor (B,) of one seed per sample (RNG contract §2.5, tag TAG_PATH)
    backend : ``"auto" | "torch" | "triton" | "native"``: the fused path-sampling kernels

    Returns
    -------
    LongTensor S, no gradient
    """
    if not isinstance(path, (MetricPath, MixturePath, MaskPath)):
        raise TypeError(f"path: expected a MetricPath, MixturePath or MaskPath, got {type(path).__name__}")
    if not isinstance(x1, torch.Tensor):
        raise TypeError(f"x1: expected a LongTensor of tokens, got {type(x1).__name__}")
    with torch.no_grad():
        return path.sample(x1, expand_times(t, tuple(x1.shape)), seed=seed, backend=backend)


def sample_frame_times(batch: int, num_frames: int = 1, *, shift: float = 1.0, seed=0,
                       asynchronous: bool = True, device=None) -> torch.Tensor:
    """Training times (DESIGN §2.3), one per latent frame: (B, T) float32 in (0, 1).

    ``asynchronous=True`` draws an independent shifted time for every frame; ``False`` draws one
    per sample and repeats it over the frames. ``seed``: int, or int64 (B,) per-sample seeds
    (tag TAG_TIMESTEP). Broadcast to tokens with :func:`expand_times` / ``ue.frame_times_to_tokens``.
    """
    if asynchronous:
        return sample_timesteps((batch, num_frames), shift=shift, seed=seed, device=device)
    return sample_timesteps((batch,), shift=shift, seed=seed, device=device)[:, None].expand(batch, num_frames)
