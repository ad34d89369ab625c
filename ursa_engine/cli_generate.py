"""``ursa-engine generate``: a checkpoint root and prompts in, images / videos / tokens out.

The run goes: check the command line and the files it names (nothing loaded yet) → read
``--image`` / ``--video`` → load the engine → pixel sizes to the latent grid
(``engine.vae.latent_shape``) → generate → save (:func:`ursa_engine.media.save_output`) → one
JSON line on stdout.

User errors (a bad flag, a missing or broken checkpoint, an unreadable input, an argument the
engine rejects) become :class:`ursa_engine.cli.UsageError` naming the flag, which ``main`` prints
as one line. Only the exception types a phase documents for bad input are converted (checks
before loading, ``FileNotFoundError`` / ``ValueError`` while loading, ``ValueError`` from
``generate``'s argument checks, ``OSError`` while writing); anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

from . import media
from .cli import UsageError, one_line

DEFAULT_HEIGHT, DEFAULT_WIDTH = 320, 512  # the authors' 320p examples
DEFAULT_VIDEO_FRAMES = 49  # 1 + 4·12: 13 latent frames
DEFAULT_LATENTS = (1, 40, 64)  # without a tokenizer: a 320x512 image's grid at stride 8
DEFAULT_COND_FRAMES = 13  # paper appendix E: 4 latent frames at temporal stride 4
DEFAULT_FPS = 12.0

# argument names in the messages of the engine, the tokenizer and ursa_engine.media -> their flags
FLAGS = {
    "latents_shape": "--latents-shape", "num_frames": "--frames", "height": "--height", "width": "--width",
    "seed": "--seed", "guidance_scale": "--guidance", "guidance_trunc": "--guidance-trunc",
    "num_steps": "--steps", "shift": "--shift", "motion": "--motion", "prompt_ids": "--prompt",
    "negative_prompt_ids": "--negative-prompt", "cond_noise_scale": "--cond-noise-scale",
    "num_cond_frames": "--cond-frames", "image": "--image", "video": "--video", "fps": "--fps",
    "out": "--out", "attn_backend": "--attn", "mode": "--mode", "prompt_length": "--prompt-length",
}
_NAMED = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*): ")


def _message(err: BaseException, flag: str | None) -> str:
    """``err``'s message with its leading ``name: `` turned into the flag that sets ``name``, else
    prefixed with ``flag``."""
    msg = one_line(err)
    m = _NAMED.match(msg)
    if m and m.group(1) in FLAGS:
        return FLAGS[m.group(1)] + msg[len(m.group(1)):]
    if flag is None:
        return msg
    if m and m.group(1) in ("path", "pretrained_path", "folder", "root"):  # the flag names that file
        msg = msg[len(m.group(0)):]
    return f"{flag}: {msg}"


@contextlib.contextmanager
def user_errors(*types: type[BaseException], flag: str | None = None) -> Iterator[None]:
    """Re-raise ``types`` as :class:`UsageError` naming the flag (the original stays chained)."""
    try:
        yield
    except types as err:
        raise UsageError(_message(err, flag)) from err


# ---------------------------------------------------------------------------- checks, nothing loaded
def check_device(device: str | None) -> None:
    """Refuse a device this machine does not have, before anything is loaded."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise UsageError(f"--device: {device!r} is not a torch device ({one_line(err)})") from err
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            if torch.version.cuda is None:
                why = f"this torch {torch.__version__} is a build without CUDA"
            else:
                visible = os.environ.get("CUDA_VISIBLE_DEVICES")
                why = "no CUDA device or driver found" + (f"; CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None
                                                          else "")
            raise UsageError(f"--device: {device} requested but torch.cuda.is_available() is False ({why})")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise UsageError(f"--device: {device} requested but there are {count} CUDA device(s)")
        return
    backend = getattr(torch.backends, dev.type, None) if dev.type == "mps" else getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise UsageError(f"--device: {device} requested but torch has no available {dev.type} backend")


def _check_root(root: str) -> Path:
    path = Path(root)
    if not path.exists():
        raise UsageError(f"ROOT: {root} does not exist")
    if not path.is_dir():
        raise UsageError(f"ROOT: {root} is not a folder (expected a checkpoint root with transformer/, "
                         "scheduler/, tokenizer/ and optionally vae/)")
    missing = [sub for sub in ("transformer", "scheduler") if not (path / sub).is_dir()]
    if missing:
        raise UsageError(f"ROOT: {root} has no {' or '.join(s + '/' for s in missing)} (expected a checkpoint root "
                         "with transformer/, scheduler/, tokenizer/ and optionally vae/)")
    if not (path / "tokenizer" / "tokenizer.json").is_file():
        raise UsageError(f"ROOT: {root} has no tokenizer/tokenizer.json; text prompts (--prompt) need the checkpoint's "
                         "text tokenizer")
    return path


def _check_args(args, kind: str, has_vae: bool) -> None:
    pixel_flags = [f for f, v in (("--height", args.height), ("--width", args.width), ("--frames", args.frames))
                   if v is not None]
    if args.latents_shape is not None:
        if pixel_flags or args.image or args.video:
            other = ", ".join(pixel_flags + [f for f, v in (("--image", args.image), ("--video", args.video)) if v])
            raise UsageError(f"--latents-shape: give either the latent grid or pixel sizes, not both (also got "
                             f"{other})")
        if len(args.latents_shape) not in (2, 3) or min(args.latents_shape) < 1:
            raise UsageError(f"--latents-shape: expected T H W or H W, positive, got "
                             f"{' '.join(map(str, args.latents_shape))}")
    for flag, v in (("--height", args.height), ("--width", args.width), ("--frames", args.frames),
                    ("--steps", args.steps), ("--cond-frames", args.cond_frames),
                    ("--prompt-length", args.prompt_length)):
        if v is not None and v < 1:
            raise UsageError(f"{flag}: expected a positive int, got {v}")
    for flag, v in (("--guidance", args.guidance), ("--guidance-trunc", args.guidance_trunc),
                    ("--shift", args.shift), ("--motion", args.motion), ("--cond-noise-scale", args.cond_noise_scale)):
        if v is not None and not math.isfinite(v):
            raise UsageError(f"{flag}: expected a finite number, got {v}")
    if args.fps is not None and not 0 < args.fps <= 1000:
        raise UsageError(f"--fps: expected a number in (0, 1000], got {args.fps}")
    if args.image and args.video:
        raise UsageError("--image / --video: give one of them (image-to-video or video extension)")
    if args.cond_frames is not None and not args.video:
        raise UsageError("--cond-frames: applies to --video (video extension) only")
    if args.cond_noise_scale is not None and not (args.image or args.video):
        raise UsageError("--cond-noise-scale: applies to --image or --video only")
    if not has_vae:
        _need_vae(args, kind, pixel_flags, f"and {args.root} has none")
    from .attention import ATTENTION_BACKENDS

    if args.attn not in ATTENTION_BACKENDS:
        raise UsageError(f"--attn: expected one of {', '.join(ATTENTION_BACKENDS)}, got {args.attn!r}")


def _need_vae(args, kind: str, pixel_flags: list[str], why: str) -> None:
    """Pixel output, pixel sizes and pixel inputs all go through the tokenizer in ROOT/vae/."""
    hint = "; save latent tokens instead: --out NAME.pt with --latents-shape T H W"
    if kind != "tokens":
        raise UsageError(f"--out: writing {Path(args.out).suffix} needs the image / video tokenizer in ROOT/vae/, "
                         f"{why}{hint}")
    if pixel_flags:
        raise UsageError(f"{pixel_flags[0]}: pixel sizes need the tokenizer in ROOT/vae/, {why}{hint}")
    for flag, value, what in (("--image", args.image, "image-to-video"), ("--video", args.video, "video extension")):
        if value:
            raise UsageError(f"{flag}: {what} needs the tokenizer in ROOT/vae/ to encode it, {why}")


def _check_mode(args) -> None:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.mode == "graph" and torch.device(device).type != "cuda":
        raise UsageError(f"--mode: graph (CUDA graphs) needs a CUDA device, and the device is {device}")


# ---------------------------------------------------------------------------- sizes
def _pixel_grid(args, vae, kind: str, cond) -> tuple[int, int, int]:
    """(T, h, w) of the requested pixel size; defaults from the conditioning input or the authors'."""
    height = args.height or (cond.shape[-3] if cond is not None else DEFAULT_HEIGHT)
    width = args.width or (cond.shape[-2] if cond is not None else DEFAULT_WIDTH)
    frames = args.frames
    if frames is None:
        video_like = kind == "video" or args.image or args.video
        frames = DEFAULT_VIDEO_FRAMES if vae.temporal_stride > 1 and video_like else 1
    try:
        return tuple(int(v) for v in vae.latent_shape(frames, height, width))
    except ValueError as err:
        msg = _message(err, None)
        source = "--image" if args.image else "--video"
        if cond is not None and (msg.startswith("--height") and args.height is None
                                 or msg.startswith("--width") and args.width is None):
            msg += f" (the size of {source}; pass --height and --width to resize it)"
        elif msg.startswith("--frames") and args.frames is None:
            msg += " (the default; pass --frames)"
        raise UsageError(msg) from err


def _summary(paths, result, kind: str, load_s: float, save_s: float) -> dict:
    steps = sorted(t for t in result.step_times if t > 0) or [0.0]
    frames = getattr(result, "frames", None)
    return {"out": [os.fspath(p) for p in paths], "format": kind, "tokens": list(result.tokens.shape),
            "frames": list(frames.shape) if frames is not None else None, "mode": result.mode,
            "attention": result.attention, "load_s": round(load_s, 4), "total_s": round(result.total_time, 4),
            "median_step_s": round(steps[len(steps) // 2], 5), "save_s": round(save_s, 4),
            "model_calls": result.model_calls, "peak_memory_bytes": result.peak_memory}


# ---------------------------------------------------------------------------- the command
def run(args) -> int:
    """``ursa-engine generate`` (flags: see ``ursa-engine generate --help``)."""
    root = _check_root(args.root)
    with user_errors(ValueError, FileNotFoundError):
        kind = media.output_kind(args.out)
    _check_args(args, kind, has_vae=(root / "vae").is_dir())
    check_device(args.device)
    _check_mode(args)

    cond, fps = None, args.fps
    if args.image:
        with user_errors(ValueError, FileNotFoundError, flag="--image"):
            cond = media.read_image(args.image)
    if args.video:
        with user_errors(ValueError, FileNotFoundError, flag="--video"):
            cond, video_fps = media.read_video(args.video)
        need = DEFAULT_COND_FRAMES if args.cond_frames is None else args.cond_frames
        if cond.shape[0] < need:
            raise UsageError(f"--video: {args.video} has {cond.shape[0]} frames, fewer than the {need} conditioning "
                             "frames (--cond-frames)")
        fps = fps or video_fps or None

    import torch

    from .engine import NEGATIVE_PROMPT, Engine

    t0 = time.perf_counter()
    with user_errors(FileNotFoundError, ValueError, flag="ROOT"):
        engine = Engine.from_pretrained(root, dtype=getattr(torch, args.dtype) if args.dtype else None,
                                        device=args.device, shift=args.shift, mode=args.mode,
                                        attn_backend=args.attn, prompt_length=args.prompt_length)
    load_s = time.perf_counter() - t0
    vae = getattr(engine, "vae", None)
    if vae is None:  # a vae/ folder the engine did not load
        pixel_flags = [f for f in ("--height", "--width", "--frames") if getattr(args, f[2:]) is not None]
        _need_vae(args, kind, pixel_flags, "but the engine loaded no tokenizer from it (engine.vae is None)")
        shape = tuple(args.latents_shape or DEFAULT_LATENTS)
    elif args.latents_shape is not None:
        shape = tuple(args.latents_shape)
    else:
        shape = _pixel_grid(args, vae, kind, cond)

    options = {}
    if cond is not None:
        _, h, w = shape
        with user_errors(ValueError, flag="--image" if args.image else "--video"):
            cond = media.resize(cond, h * vae.spatial_stride, w * vae.spatial_stride)
        if args.image:
            options["image"] = cond
        else:
            options["video"] = cond
            options["num_cond_frames"] = DEFAULT_COND_FRAMES if args.cond_frames is None else args.cond_frames
        if args.cond_noise_scale is not None:
            options["cond_noise_scale"] = args.cond_noise_scale
    negative = NEGATIVE_PROMPT if args.negative_prompt is None else args.negative_prompt
    with user_errors(ValueError):  # generate checks its arguments before any model call, naming them
        result = engine.generate(args.prompt, [negative], shape, guidance_scale=args.guidance,
                                 guidance_trunc=args.guidance_trunc, num_steps=args.steps, motion=args.motion,
                                 seed=args.seed, progress=not args.no_progress, **options)

    if kind == "tokens":
        data = result.tokens
    else:
        data = getattr(result, "frames", None)
        if data is None:  # the engine has a tokenizer, so this is a bug, not a user error
            raise RuntimeError("engine.generate returned no .frames although engine.vae is set")
    t0 = time.perf_counter()
    with user_errors(OSError, flag="--out"):
        paths = media.save_output(args.out, data, fps=fps or DEFAULT_FPS)
    print(json.dumps(_summary(paths, result, kind, load_s, time.perf_counter() - t0)))
    return 0
