"""Generation defaults shared by the command line and the server (so that the server never imports a CLI module).

The numbers are the authors' pipeline defaults (URSA-1.7B-FSQ320's exports and README loop); the CLI
(:mod:`ursa_engine.cli_generate`) and the videos routes (:mod:`ursa_engine.serve.video_inputs`) read
them from here.
"""

from __future__ import annotations

VIDEO_SIZE = (320, 512)  # (height, width): the authors' pipeline defaults, URSA-1.7B-FSQ320
DEFAULT_COND_FRAMES = 13  # paper appendix E, the README loop: 4 latent frames at temporal stride 4
DEFAULT_EXTENSION_NOISE = 0.1  # the README loop's cond_noise_scale for --video
DEFAULT_FPS = 12.0  # the authors' exports (URSA checkpoints carry no frame rate)

__all__ = ["DEFAULT_COND_FRAMES", "DEFAULT_EXTENSION_NOISE", "DEFAULT_FPS", "VIDEO_SIZE"]
