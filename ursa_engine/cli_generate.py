"""``ursa-engine generate``: a checkpoint root and prompts in, images / videos / tokens out.

The run goes: check the command line and the files it names (nothing loaded yet) → read
``--image`` / ``--video`` → load the engine → pixel sizes to the latent grid
(``engine.vae.latent_shape``) → generate (``image=`` / ``video=`` + ``num_cond_frames=``, decoded
only for pixel outputs) → save (:func:`ursa_engine.media.save_output`) → one JSON line on stdout.

Defaults: 320×512 pixels for video tokenizers (the authors' pipeline and URSA-1.7B-FSQ320) and
1024×1024 for image tokenizers (URSA-1.7B-IBQ1024, the authors' README and T2I demo); the size of
``--image`` / ``--video`` when one is given; 49 frames for video outputs and conditioning; the
authors' README negative prompt; for ``--video`` 13 conditioning frames at ``cond_noise_scale``
0.1 (the README's extension loop).

Inpainting (``--image IN.png --mask MASK.png``, DESIGN §2.4): the mask has ``--image``'s size;
with an alpha channel its fully transparent pixels are regenerated (OpenAI's ``images.edit``
convention), without one its white pixels (grey >= 128) are regenerated and black ones kept
(diffusers'); :func:`ursa_engine.conditioning.keep_from_mask_image`. Both are resized to the
output size (the mask nearest-neighbour); tokens whose whole patch is kept hold the image's codes
(``Engine.generate(known_tokens=, known_mask=)``); the image is latent frame 0.

Video extension (``--video``) writes what the authors' README loop keeps:
``concatenate([given, new[num_cond_frames:]])``: the whole given video (resized to the output
size) followed by the new clip's frames past its ``--cond-frames`` conditioning frames. Its ``.pt``
holds the new clip's tokens (B, T, h, w), the (resampled) conditioning frames first.

User errors (a bad flag, a missing or broken checkpoint, an unreadable input, an argument the
engine rejects) become :class:`ursa_engine._cli_errors.UsageError` naming the flag, which
``main`` prints as one line. Only the exception types a phase documents for bad input are
converted (checks before loading, ``FileNotFoundError`` / ``ValueError`` while loading,
``ValueError`` from ``generate``'s argument checks, ``OSError`` while writing); anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from . import media
from ._cli_errors import UsageError, one_line, warn
from .defaults import DEFAULT_COND_FRAMES, DEFAULT_EXTENSION_NOISE, DEFAULT_FPS, VIDEO_SIZE

IMAGE_SIZE = (1024, 1024)  # URSA-1.7B-IBQ1024's resolution (the authors' README and T2I demo)
DEFAULT_VIDEO_FRAMES = 49  # 1 + 4·12: 13 latent frames
DEFAULT_LATENTS = (1, 40, 64)  # without a tokenizer: a 320x512 image's grid at stride 8

# argument names in the messages of the engine, the tokenizer and ursa_engine.media -> their flags
FLAGS = {
    "latents_shape": "--latents-shape", "num_frames": "--frames", "height": "--height", "width": "--width",
    "seed": "--seed", "guidance_scale": "--guidance", "guidance_trunc": "--guidance-trunc",
    "num_steps": "--steps", "shift": "--shift", "motion": "--motion", "prompt_ids": "--prompt",
    "negative_prompt_ids": "--negative-prompt", "cond_noise_scale": "--cond-noise-scale",
    "num_cond_frames": "--cond-frames", "image": "--image", "video": "--video", "fps": "--fps",
    "out": "--out", "attn_backend": "--attn", "mode": "--mode", "prompt_length": "--prompt-length",
    "freeze_cond": "--freeze-cond", "mesh": "--parallel", "parallel": "--parallel",
    "transformer_weights": "--transformer-weights", "revision": "--revision", "known_tokens": "--image",
    "known_mask": "--mask", "keep": "--mask", "mask": "--mask",
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


def resolve_cli_root(root: str, revision: str | None = None, *, flag: str = "ROOT", weights: bool = True,
                     transformer_weights: str | None = None) -> Path:
    """``root`` as a local folder: itself, or a hub id ``org/name`` resolved through the hub cache
    (:func:`ursa_engine.hub.resolve_root`; ``HF_HUB_OFFLINE=1``: the cache only). Errors name ``flag``."""
    from .hub import HubError, is_hub_id, resolve_root

    if transformer_weights is not None and not Path(transformer_weights).exists():
        raise UsageError(f"--transformer-weights: {transformer_weights} does not exist")
    if revision is not None and Path(root).exists():
        raise UsageError(f"--revision: {root} is a local folder; --revision only applies to hub ids (org/name)")
    if Path(root).exists() or not is_hub_id(root):
        return Path(root)
    try:
        return resolve_root(root, revision=revision, weights=weights, transformer_weights=transformer_weights is None,
                            name=flag)
    except HubError as err:
        raise UsageError(one_line(err)) from err


def _check_root(root: str, revision: str | None = None, transformer_weights: str | None = None) -> Path:
    path = resolve_cli_root(root, revision, transformer_weights=transformer_weights)
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
    if args.cond_noise_scale is not None and not 0 <= args.cond_noise_scale <= 1:
        raise UsageError(f"--cond-noise-scale: expected a number in [0, 1], got {args.cond_noise_scale}")
    if args.freeze_cond and not (args.image or args.video):
        raise UsageError("--freeze-cond: applies to --image or --video only")
    if getattr(args, "mask", None):
        if not args.image:
            raise UsageError("--mask: inpaints --image; give --image IN.png with it")
        for flag, used in (("--cond-noise-scale", args.cond_noise_scale is not None),
                           ("--freeze-cond", args.freeze_cond)):
            if used:
                raise UsageError(f"{flag}: applies to a conditioning --image, not to inpainting (--mask): kept tokens "
                                 "are always held")
    if not has_vae:
        _need_vae(args, kind, pixel_flags, f"and {args.root} has none")
    from .attention import ATTENTION_BACKENDS

    if args.attn not in ATTENTION_BACKENDS:
        raise UsageError(f"--attn: expected one of {', '.join(ATTENTION_BACKENDS)}, got {args.attn!r}")


def _need_vae(args, kind: str, pixel_flags: list[str], why: str) -> None:
    """Pixel output, pixel sizes and pixel inputs all go through the tokenizer in ROOT/vae/."""
    hint = "; save latent tokens instead: --out NAME.pt (optionally with --latents-shape T H W)"
    if kind != "tokens":
        raise UsageError(f"--out: writing {Path(args.out).suffix} needs the image / video tokenizer in ROOT/vae/, "
                         f"{why}{hint}")
    if pixel_flags:
        raise UsageError(f"{pixel_flags[0]}: pixel sizes need the tokenizer in ROOT/vae/, {why}{hint}")
    for flag, value, what in (("--image", args.image, "image-to-video"), ("--video", args.video, "video extension")):
        if value:
            raise UsageError(f"{flag}: {what} needs the tokenizer in ROOT/vae/ to encode it, {why}")


def _check_parallel(args) -> None:
    """``--parallel``: a valid layout, launched by torchrun with as many processes (issue 13)."""
    if args.parallel is None:
        return
    from .distributed.mesh import check_layout, parse_layout, world_from_env

    with user_errors(ValueError, TypeError):
        layout = parse_layout(args.parallel)
    env = world_from_env()
    if env is None:
        raise UsageError(f"--parallel: {layout} runs {layout.size} processes: launch with torchrun --nproc-per-node "
                         f"{layout.size} -m ursa_engine generate ... (RANK / WORLD_SIZE are not set)")
    with user_errors(ValueError):
        check_layout(layout, world_size=env[2])


def _is_writer(engine) -> bool:
    """Only global rank 0 writes outputs under --parallel."""
    return engine.parallel is None or engine.parallel.rank == 0


def _check_mode(args) -> None:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.mode == "graph" and torch.device(device).type != "cuda":
        raise UsageError(f"--mode: graph (CUDA graphs) needs a CUDA device, and the device is {device}")


# ---------------------------------------------------------------------------- sizes
def default_size(vae) -> tuple[int, int]:
    """(height, width) without --height / --width / an input: 1024×1024 for an image tokenizer
    (temporal stride 1), else the authors' 320×512."""
    return IMAGE_SIZE if vae.temporal_stride == 1 else VIDEO_SIZE


def _pixel_grid(args, vae, kind: str, cond) -> tuple[int, int, int]:
    """(T, h, w) of the requested pixel size; defaults from the conditioning input or :func:`default_size`."""
    height = args.height or (cond.shape[-3] if cond is not None else default_size(vae)[0])
    width = args.width or (cond.shape[-2] if cond is not None else default_size(vae)[1])
    frames = args.frames
    if frames is None:
        video_like = kind == "video" or args.image or args.video
        frames = DEFAULT_VIDEO_FRAMES if vae.temporal_stride > 1 and video_like else 1
    try:
        grid = tuple(int(v) for v in vae.latent_shape(frames, height, width))
    except ValueError as err:
        msg = _message(err, None)
        source = "--image" if args.image else "--video"
        if cond is not None and (msg.startswith("--height") and args.height is None
                                 or msg.startswith("--width") and args.width is None):
            msg += f" (the size of {source}; pass --height and --width to resize it)"
        elif msg.startswith("--frames") and args.frames is None:
            msg += " (the default; pass --frames)"
        raise UsageError(msg) from err
    return grid


def _warn_partial_tile(vae, T: int) -> bool:
    """Say (once, before the run) when the tokenizer decodes fewer frames than asked: the authors'
    temporal tiling leaves a partial tile out. Returns whether it did."""
    asked, decoded = 1 + vae.temporal_stride * (T - 1), vae.num_frames(T)
    if decoded == asked:
        return False
    warn(f"--frames: {asked} frames are {T} latent frames, which this tokenizer decodes to {decoded} frames "
         f"(temporal tiles of {getattr(vae, 'sample_frames', '?')} frames; a partial tile is not decoded, as in the "
         "authors' pipeline)")
    return True


def _cond_frames(args, vae, T: int) -> int:
    """The --cond-frames count, checked: 1 + s·k, a count the tokenizer encodes whole (its temporal
    tiles can leave trailing frames out) into at most the T generated latent frames. The video's
    length was checked before loading."""
    n = DEFAULT_COND_FRAMES if args.cond_frames is None else args.cond_frames
    s = vae.temporal_stride
    if s > 1 and (n - 1) % s:
        raise UsageError(f"--cond-frames: the video tokenizer encodes 1 + {s}k frames (1, {1 + s}, {1 + 2 * s}, ...), "
                         f"got {n}")
    kept = vae.num_frames(vae.encoded_frames(n))
    if kept != n:
        whole = [m for m in range(1, n + 1, s) if vae.num_frames(vae.encoded_frames(m)) == m]
        raise UsageError(f"--cond-frames: this tokenizer encodes {n} frames in temporal tiles that keep only {kept} "
                         f"of them; use at most {whole[-1]}")
    Tc = vae.encoded_frames(n)
    if Tc > T:
        raise UsageError(f"--cond-frames: {n} frames encode to {Tc} latent frames, more than the {T} generated "
                         f"(--frames {vae.num_frames(T)}); use fewer --cond-frames or more --frames")
    return n


def _summary(paths, result, kind: str, frames, load_s: float, save_s: float) -> dict:
    steps = sorted(t for t in result.step_times if t > 0) or [0.0]
    return {"out": [os.fspath(p) for p in paths], "format": kind, "tokens": list(result.tokens.shape),
            "frames": list(frames.shape) if frames is not None else None, "mode": result.mode,
            "attention": result.attention, "load_s": round(load_s, 4), "total_s": round(result.total_time, 4),
            "median_step_s": round(steps[len(steps) // 2], 5), "decode_s": round(result.decode_time, 4),
            "save_s": round(save_s, 4), "model_calls": result.model_calls, "peak_memory_bytes": result.peak_memory}


# ---------------------------------------------------------------------------- the command
def run(args) -> int:
    """``ursa-engine generate`` (flags: see ``ursa-engine generate --help``)."""
    root = _check_root(args.root, getattr(args, "revision", None), getattr(args, "transformer_weights", None))
    with user_errors(ValueError, FileNotFoundError):
        kind = media.output_kind(args.out)
    has_vae = (root / "vae").is_dir()
    _check_args(args, kind, has_vae)
    check_device(args.device)
    _check_mode(args)
    if getattr(args, "lora", None):
        from .adapters import parse_lora_spec

        try:
            args.lora_specs = [parse_lora_spec(s) for s in args.lora]
        except ValueError as err:  # its message names --lora
            raise UsageError(str(err)) from None
    parallel = getattr(args, "parallel", None)
    if parallel is not None:
        _check_parallel(args)

    cond, fps, keep = None, args.fps, None
    if args.image:
        with user_errors(ValueError, FileNotFoundError, flag="--image"):
            cond = media.read_image(args.image)
    if getattr(args, "mask", None):
        keep = read_mask(args.mask, cond.shape[:2])
    if args.video:
        with user_errors(ValueError, FileNotFoundError, flag="--video"):
            cond, video_fps = media.read_video(args.video)
        need = DEFAULT_COND_FRAMES if args.cond_frames is None else args.cond_frames
        if cond.shape[0] < need:
            raise UsageError(f"--video: {args.video} has {cond.shape[0]} frames, fewer than the {need} conditioning "
                             "frames (--cond-frames)")
        fps = fps or video_fps or None

    import torch.distributed as dist

    # under --parallel the engine creates the process group: tear it down on every rank, writer or not
    created = parallel is not None and not (dist.is_available() and dist.is_initialized())
    loaded: list = []
    try:
        return _generate(args, root, kind, has_vae, cond, fps, parallel, loaded, keep)
    finally:
        if created:
            if loaded:
                loaded[0].release_graphs()  # graphs holding NCCL operations keep their communicators
            if dist.is_initialized():
                dist.destroy_process_group()


def read_mask(path: str, size: tuple[int, int]):
    """``--mask``: bool (H, W) of kept pixels (either convention, see the module docstring), of ``size``
    (--image's (H, W)); errors name the flag."""
    from PIL import Image, UnidentifiedImageError

    from .conditioning import keep_from_mask_image

    if not Path(path).is_file():
        raise UsageError(f"--mask: {path} " + ("is not a file" if Path(path).exists() else "does not exist"))
    try:
        with Image.open(path) as img:
            img.load()
            keep = keep_from_mask_image(img, "mask")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise UsageError(f"--mask: {path!r} is not a readable image ({one_line(err)})") from err
    if tuple(keep.shape) != tuple(size):
        raise UsageError(f"--mask: {keep.shape[0]}x{keep.shape[1]} pixels (HxW), but --image is {size[0]}x{size[1]}; "
                         "a mask has the size of its image")
    return keep


def _resize_mask(keep, height: int, width: int):
    """bool (H, W) -> (height, width), nearest neighbour (a kept pixel stays exactly kept or not)."""
    if tuple(keep.shape) == (height, width):
        return keep
    from PIL import Image

    img = Image.fromarray(keep.numpy().astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(img) >= 128


def _generate(args, root: Path, kind: str, has_vae: bool, cond, fps, parallel, loaded: list, keep=None) -> int:
    """Load, generate and (on the writer) save; the engine is appended to ``loaded`` once built."""
    import torch

    from .engine import NEGATIVE_PROMPT, Engine

    # tokens of a given latent grid need no tokenizer: do not load it
    load_vae = has_vae and not (kind == "tokens" and args.latents_shape is not None)
    t0 = time.perf_counter()
    with user_errors(FileNotFoundError, ValueError, flag="ROOT"):
        engine = Engine.from_pretrained(root, dtype=getattr(torch, args.dtype) if args.dtype else None,
                                        device=args.device, shift=args.shift, mode=args.mode,
                                        attn_backend=args.attn, prompt_length=args.prompt_length, load_vae=load_vae,
                                        mesh=parallel, transformer_weights=getattr(args, "transformer_weights", None))
    loaded.append(engine)
    for _, path, scale in getattr(args, "lora_specs", ()):
        with user_errors(ValueError, flag="--lora"):
            engine.load_lora(path, scale)
    load_s = time.perf_counter() - t0
    vae = engine.vae  # None exactly when not load_vae (a vae/ that does not load raised above)
    if args.latents_shape is not None or vae is None:
        shape = tuple(args.latents_shape or DEFAULT_LATENTS)
    else:
        shape = _pixel_grid(args, vae, kind, cond)

    options = {}
    if keep is not None:  # inpainting: the image's kept tokens hold (no conditioning frame)
        _, h, w = shape
        s = vae.spatial_stride
        with user_errors(ValueError, flag="--image"):
            cond = media.resize(cond, h * s, w * s)
        with user_errors(ValueError, TypeError, flag="--mask"):
            options["known_tokens"], options["known_mask"] = engine.encode_inpaint(
                cond, _resize_mask(keep, h * s, w * s), latents_shape=shape)
    elif cond is not None:
        if args.video:
            options["num_cond_frames"] = _cond_frames(args, vae, shape[0])
        _, h, w = shape
        with user_errors(ValueError, flag="--image" if args.image else "--video"):
            cond = media.resize(cond, h * vae.spatial_stride, w * vae.spatial_stride)
        options["image" if args.image else "video"] = cond
        noise = args.cond_noise_scale
        if noise is None and args.video:
            noise = DEFAULT_EXTENSION_NOISE
        if noise is not None:
            options["cond_noise_scale"] = noise
        options["freeze_cond"] = args.freeze_cond
    negative = NEGATIVE_PROMPT if args.negative_prompt is None else args.negative_prompt
    warned = kind != "tokens" and vae is not None and _warn_partial_tile(vae, shape[0])
    with user_errors(ValueError), warnings.catch_warnings():  # generate checks its arguments first, naming them
        if warned:  # the tokenizer's own multi-line warning at decoding time would say it again
            warnings.filterwarnings("ignore", message="ids: latent frames", category=UserWarning)
        result = engine.generate(args.prompt, [negative], shape, guidance_scale=args.guidance,
                                 guidance_trunc=args.guidance_trunc, num_steps=args.steps, motion=args.motion,
                                 seed=args.seed, progress=not args.no_progress, decode=kind != "tokens", **options)
    if not _is_writer(engine):  # the whole batch is gathered on rank 0, which decodes and writes
        return 0

    frames = None
    if kind == "tokens":
        data = result.tokens
    else:
        frames = result.frames
        if frames is None:  # the engine has a tokenizer, so this is a bug, not a user error
            raise RuntimeError("engine.generate returned no .frames although engine.vae is set")
        if args.video:  # the README loop: the given video, then the new frames past the conditioning ones
            given = np.broadcast_to(cond, (frames.shape[0], *cond.shape))
            frames = np.concatenate([given, frames[:, options["num_cond_frames"]:]], axis=1)
        data = frames
    t0 = time.perf_counter()
    with user_errors(OSError, flag="--out"):
        paths = media.save_output(args.out, data, fps=fps or DEFAULT_FPS)
    print(json.dumps(_summary(paths, result, kind, frames, load_s, time.perf_counter() - t0)))
    return 0
