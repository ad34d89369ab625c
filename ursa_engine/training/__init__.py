"""Training API: noising, timesteps and the latent-token loss for any PyTorch loop (DESIGN §2.3, §3).

Everything here is plain autograd-compatible torch (plus the paths' fused sampling backends for
the noising, which needs no gradient), so it runs under ``torch.compile`` and DDP::

    import ursa_engine as ue
    from ursa_engine import training

    path = ue.MetricPath(ue.Codebook(emb), alpha=1.0, c=3.0)
    net = training.LatentLoss(model)                 # wrap *this* in DDP / torch.compile
    t = training.sample_frame_times(B, T, shift=1.0, seed=step)       # (B, T) asynchronous
    x_t = training.add_noise(path, x1, t, seed=seeds)                  # x1: (B, T, H, W)
    loss = net(prompt_ids, x_t, x1)                  # cross-entropy on the latent logits
    loss.backward()

Under DDP give each rank its own seeds (e.g. ``seed = step * world_size + rank``): the draws are
counter-based (§2.5), so equal seeds give equal noise on every rank.
"""

from ..trajectory import Trajectory
from .lora import LoRAAdapter
from .losses import IGNORE_INDEX, LatentLoss, latent_hidden, linear_cross_entropy, linear_logprobs
from .noise import add_noise, expand_times, sample_frame_times
from .replay import Replay, guided_logprobs, trajectory_logprobs
from .rewards import digit_probability

__all__ = ["IGNORE_INDEX", "GRPOConfig", "LatentLoss", "LoRAAdapter", "Replay", "Trajectory", "add_noise",
           "clipped_objective", "digit_probability", "expand_times", "group_advantages", "guided_logprobs",
           "latent_hidden", "linear_cross_entropy", "linear_logprobs", "sample_frame_times", "trajectory_logprobs"]

_GRPO = ("GRPOConfig", "clipped_objective", "group_advantages")


def __getattr__(name):
    # GRPO's names load on first use: importing .grpo here would put it in sys.modules before
    # ``python -m ursa_engine.training.grpo`` runs it (runpy's double-import warning)
    if name in _GRPO:
        from . import grpo

        return getattr(grpo, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
