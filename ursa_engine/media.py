"""Reading and writing pixels: PNG / JPEG images (Pillow), MP4 videos (PyAV), token tensors.

Pixels are always uint8 RGB arrays: an image is ``(H, W, 3)``, a video ``(F, H, W, 3)``, a batch of
videos ``(B, F, H, W, 3)`` (what the engine's tokenizer decodes to). Torch tensors are accepted
wherever an array is.

Videos are H.264 in MP4 with ``yuv420p`` pixels (plays everywhere), encoded by the FFmpeg that
PyAV bundles (no system ``ffmpeg`` is ever run). The encoder is the first of :data:`VIDEO_ENCODERS`
the installed PyAV has: ``libx264`` (in the PyAV >= 12 manylinux / macOS / Windows wheels) at
CRF 18 (visually lossless for generated content), else ``libopenh264`` (H.264 too), else
``mpeg4`` (MPEG-4 part 2, still an ``.mp4`` every player reads). yuv420p stores colour at half
resolution, so an odd height or width cannot be encoded: :func:`save_video` pads such frames by
repeating the last row / column (the file is then 1 pixel taller / wider; URSA sizes are
multiples of 8 and never need it).

Every writer is atomic: the data goes to a temporary file in the destination folder that is
renamed over the destination only when complete, so an error never leaves a partial file (and
never touches an existing one).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
VIDEO_SUFFIXES = (".mp4",)
TOKEN_SUFFIXES = (".pt",)
OUTPUT_SUFFIXES = IMAGE_SUFFIXES + VIDEO_SUFFIXES + TOKEN_SUFFIXES
VIDEO_ENCODERS = ("libx264", "libopenh264", "mpeg4")  # in order of preference
JPEG_QUALITY = 95
X264_CRF = 18


# ---------------------------------------------------------------------------- checks
def _shape_str(a) -> str:
    return f"{a.dtype} {tuple(a.shape)}".replace("torch.", "")


def _pixels(name: str, a, ndims: tuple[int, ...], layout: str) -> np.ndarray:
    """``a`` as a C-contiguous uint8 array with one of ``ndims`` dims and 3 channels last."""
    if hasattr(a, "detach") and hasattr(a, "numpy"):  # a torch tensor, without importing torch
        a_np = a.detach().cpu()
        if str(a_np.dtype) != "torch.uint8" or a_np.dim() not in ndims or a_np.shape[-1] != 3:
            raise ValueError(f"{name}: expected uint8 {layout}, got {_shape_str(a_np)}")
        a = a_np.numpy()
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a uint8 array {layout}, got {type(a).__name__}")
    if a.dtype != np.uint8 or a.ndim not in ndims or a.shape[-1] != 3:
        raise ValueError(f"{name}: expected uint8 {layout}, got {_shape_str(a)}")
    if 0 in a.shape:
        raise ValueError(f"{name}: expected non-empty {layout}, got shape {a.shape}")
    return np.ascontiguousarray(a)


def _fps(fps) -> Fraction:
    if isinstance(fps, bool) or not isinstance(fps, (int, float, Fraction)) or not 0 < fps <= 1000:
        raise ValueError(f"fps: expected a number in (0, 1000], got {fps!r}")
    return Fraction(fps).limit_denominator(1001)


def _suffix(out: str | os.PathLike) -> str:
    suffix = Path(out).suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"out: unknown suffix {Path(out).suffix!r} in {os.fspath(out)!r}; expected one of "
                         f"{', '.join(OUTPUT_SUFFIXES)}")
    return suffix


def output_kind(out: str | os.PathLike) -> str:
    """``"image"``, ``"video"`` or ``"tokens"`` for an output path, checked before any work is done.

    Raises ValueError (naming ``out``) for an unknown suffix and FileNotFoundError when the folder
    does not exist or is not writable.
    """
    suffix = _suffix(out)
    folder = Path(out).parent
    if not folder.is_dir():
        raise FileNotFoundError(f"out: folder {os.fspath(folder)!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise FileNotFoundError(f"out: folder {os.fspath(folder)!r} is not writable")
    if Path(out).is_dir():
        raise FileNotFoundError(f"out: {os.fspath(out)!r} is a folder")
    return "image" if suffix in IMAGE_SUFFIXES else "video" if suffix in VIDEO_SUFFIXES else "tokens"


# ---------------------------------------------------------------------------- atomic writes
def _temp_sibling(p: Path) -> Path:
    """A new empty file ``.<stem>.<random><suffix>`` next to ``p``, created with the permissions of
    any new file (0o666 less the umask; ``tempfile.mkstemp`` would make it 0o600 and so the output)."""
    for _ in range(100):
        tmp = p.with_name(f".{p.stem}.{secrets.token_hex(4)}{p.suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"out: no free temporary name next to {os.fspath(p)!r}")


@contextlib.contextmanager
def _atomic(paths: list[Path]) -> Iterator[list[Path]]:
    """Temporary siblings of ``paths`` (same suffix); renamed over them only if the block succeeds."""
    temps: list[Path] = []
    try:
        for p in paths:
            temps.append(_temp_sibling(p))
        yield temps
        for tmp, p in zip(temps, paths, strict=True):
            os.replace(tmp, p)
    finally:
        for tmp in temps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _write_image(path: Path, frame: np.ndarray) -> None:
    from PIL import Image

    img = Image.fromarray(frame)  # uint8 (H, W, 3): RGB
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.save(path, format="JPEG", quality=JPEG_QUALITY)
    else:
        img.save(path, format="PNG")


def video_encoder() -> str:
    """The encoder :func:`save_video` uses: the first of :data:`VIDEO_ENCODERS` this PyAV has."""
    import av

    for name in VIDEO_ENCODERS:
        try:
            av.codec.Codec(name, "w")
        except Exception:  # PyAV raises its own UnknownCodecError (a ValueError) or FFmpegError
            continue
        return name
    raise RuntimeError(f"no video encoder: this PyAV ({av.__version__}) has none of {VIDEO_ENCODERS}")


def _write_video(path: Path, frames: np.ndarray, fps: Fraction) -> None:
    import av

    if frames.shape[1] % 2 or frames.shape[2] % 2:  # yuv420p needs even sizes: repeat the last row / column
        frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)), mode="edge")
    F, H, W, _ = frames.shape
    codec = video_encoder()
    with av.open(os.fspath(path), mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps, options={"crf": str(X264_CRF)} if codec == "libx264" else {})
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        if codec != "libx264":  # no CRF: a generous bit rate (~1 bit per pixel)
            stream.bit_rate = max(2_000_000, int(W * H * float(fps)))
        for f in range(F):
            frame = av.VideoFrame.from_ndarray(frames[f], format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())  # flush


# ---------------------------------------------------------------------------- public API
def save_image(path: str | os.PathLike, frame) -> Path:
    """Write one uint8 RGB image ``frame`` (H, W, 3) as PNG (lossless) or JPEG (quality 95), chosen
    by the suffix of ``path`` (``.png``, ``.jpg``, ``.jpeg``). Atomic. Returns the path."""
    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"path: expected a suffix in {', '.join(IMAGE_SUFFIXES)}, got {os.fspath(path)!r}")
    frame = _pixels("frame", frame, (3,), "(H, W, 3)")
    with _atomic([path]) as (tmp,):
        _write_image(tmp, frame)
    return path


def save_video(path: str | os.PathLike, frames, fps: float = 12) -> Path:
    """Write uint8 RGB ``frames`` (F, H, W, 3) as an ``.mp4`` (H.264, yuv420p; see the module
    docstring for the encoder and for odd sizes, which are padded to even). Atomic. Returns the path."""
    path = Path(path)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"path: expected a .mp4 suffix, got {os.fspath(path)!r}")
    frames = _pixels("frames", frames, (4,), "(F, H, W, 3)")
    rate = _fps(fps)
    with _atomic([path]) as (tmp,):
        _write_video(tmp, frames, rate)
    return path


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: {os.fspath(path)!r} does not exist" if not path.exists()
                                else f"path: {os.fspath(path)!r} is not a file")
    return path


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as uint8 RGB (H, W, 3): alpha is dropped, grayscale / palette converted."""
    from PIL import Image, UnidentifiedImageError

    path = _existing(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode.startswith("I;16"):  # 16-bit grayscale: keep the high byte (convert() would clip)
                img = Image.fromarray((np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8))
            return np.array(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:  # Pillow's errors for broken files
        raise ValueError(f"path: {os.fspath(path)!r} is not a readable image ({err})") from err


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """A video file's first ``max_frames`` frames (all by default) as uint8 RGB (F, H, W, 3), and
    its frame rate (frames per second; 0.0 when the file does not say)."""
    import av

    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int)
                                   or max_frames < 1):
        raise ValueError(f"max_frames: expected None or an int >= 1, got {max_frames!r}")
    path = _existing(path)
    frames = []
    try:
        with av.open(os.fspath(path), mode="r") as container:
            if not container.streams.video:
                raise ValueError(f"path: {os.fspath(path)!r} has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) == max_frames:
                    break
    except av.error.FFmpegError as err:
        raise ValueError(f"path: {os.fspath(path)!r} is not a readable video ({err})") from err
    if not frames:
        raise ValueError(f"path: {os.fspath(path)!r} has no decodable frames")
    return np.stack(frames), float(rate) if rate else 0.0


def resize(pixels, height: int, width: int) -> np.ndarray:
    """uint8 RGB (H, W, 3) or (F, H, W, 3) resized to ``height × width`` (Lanczos, aspect ratio not
    kept); returned unchanged when the size already matches."""
    px = _pixels("pixels", pixels, (3, 4), "(H, W, 3) or (F, H, W, 3)")
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if px.shape[-3:-1] == (height, width):
        return px
    from PIL import Image

    frames = px.reshape(-1, *px.shape[-3:])
    out = np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.LANCZOS))
                    for f in frames])
    return out.reshape(*px.shape[:-3], height, width, 3)


def _numbered(out: Path, indices: list[tuple[int, ...]]) -> list[Path]:
    if len(indices) == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{'_'.join(map(str, i))}{out.suffix}") for i in indices]


def save_output(out: str | os.PathLike, frames_or_tokens, fps: float = 12) -> list[Path]:
    """Save a generation result; the format comes from the suffix of ``out``.

    - ``.png`` / ``.jpg`` / ``.jpeg``: uint8 pixels (H, W, 3), (F, H, W, 3) or (B, F, H, W, 3).
      One image is written to ``out`` itself; several to ``name_0.png``, ``name_1.png``, ... (one
      index over the frames, or over the batch when F = 1), or ``name_{b}_{f}.png`` when both the
      batch and the frame count exceed 1.
    - ``.mp4``: pixels (F, H, W, 3) or (B, F, H, W, 3) at ``fps``; a batch of B > 1 videos goes
      to ``name_0.mp4``, ``name_1.mp4``, ... (see :func:`save_video`).
    - ``.pt``: ``torch.save`` of the token tensor (moved to the CPU) as it is, e.g. (B, T, h, w).

    All files are written atomically, together: on an error none of them is created.

    Returns
    -------
    list of Path : the files written, in batch-then-frame order
    """
    out = Path(out)
    suffix = _suffix(out)
    if suffix in TOKEN_SUFFIXES:
        import torch

        if isinstance(frames_or_tokens, np.ndarray):
            frames_or_tokens = torch.from_numpy(frames_or_tokens)
        if not isinstance(frames_or_tokens, torch.Tensor):
            raise TypeError(f"frames_or_tokens: .pt saves a tensor, got {type(frames_or_tokens).__name__}")
        with _atomic([out]) as (tmp,):
            torch.save(frames_or_tokens.detach().cpu(), tmp)
        return [out]
    if suffix in IMAGE_SUFFIXES:
        px = _pixels("frames_or_tokens", frames_or_tokens, (3, 4, 5), "(H, W, 3), (F, H, W, 3) or (B, F, H, W, 3)")
        px = px.reshape((1,) * (5 - px.ndim) + px.shape)
        B, F = px.shape[:2]
        indices = [(b, f) if B > 1 and F > 1 else (b * F + f,) for b in range(B) for f in range(F)]
        paths = _numbered(out, indices)
        with _atomic(paths) as temps:
            for tmp, image in zip(temps, px.reshape(-1, *px.shape[2:]), strict=True):
                _write_image(tmp, image)
        return paths
    px = _pixels("frames_or_tokens", frames_or_tokens, (4, 5), "(F, H, W, 3) or (B, F, H, W, 3)")
    px = px[None] if px.ndim == 4 else px
    rate = _fps(fps)
    paths = _numbered(out, [(b,) for b in range(px.shape[0])])
    with _atomic(paths) as temps:
        for tmp, video in zip(temps, px, strict=True):
            _write_video(tmp, video, rate)
    return paths
