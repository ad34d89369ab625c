"""What a videos request asks for (issue 23 item 4, issue 20 item 2): its body, its frames, its conditioning.

Bodies
------
``POST /v1/videos`` and ``POST /v1/videos/extensions`` take multipart forms (what the official
client sends, files included) or JSON. Form keys in brackets are objects: ``input_reference[image_url]``
is ``{"input_reference": {"image_url": ...}}`` and ``video[id]`` is ``{"video": {"id": ...}}`` (the
client 3.63 cannot send ``videos.extend(video={"id": ...})`` itself, its file extraction refuses a
dict: pass ``video=omit, extra_body={"video": {"id": ...}}``, which it sends as ``video[id]``).
Unknown fields are a 400 naming them.

Seconds -> frames
-----------------
Videos play at :data:`FPS` = 12 frames per second, :data:`ursa_engine.defaults.DEFAULT_FPS` (the
CLI's too; the authors' exports: URSA checkpoints carry no frame rate). A clip of F frames lasts
(F − 1) / FPS seconds. The latent frame count T is chosen among those the tokenizer decodes *whole*
(``encoded_frames(num_frames(T)) == T``: with the authors' temporal tiling a trailing partial tile is
not decoded, so e.g. a Cosmos tokenizer of ``sample_frames`` 17 takes T = 1..5, 10, 15, ...) as the
one whose added duration ``(num_frames(T) − num_frames(T0)) / FPS`` is nearest to ``seconds`` (ties:
the shorter clip), where T0 = 0 for a new video (then the base is one frame) and T0 is the
conditioning or source length for an extension. So "4" at 12 fps is 49 frames: T = 13 at
``sample_frames`` 49, T = 15 at 17 (both decode to 49 frames); "8" is 97 frames; the tiny test
tokenizer (``sample_frames`` 9) takes T = 18 for "4". A clip of more than the server's
``max_video_frames`` frames is refused (400 naming ``seconds``): first from ``seconds`` alone (the
frames before + ``seconds`` x FPS, before any search), then from the chosen T. The search is a
bisection on ``num_frames`` (non-decreasing in T) plus a short scan for the nearest whole lengths, so
its cost does not grow with ``seconds``.

Conditioning (DESIGN §2.4)
--------------------------
- ``input_reference`` (an image file, or ``{"image_url": "data:image/...;base64,..."}``; http(s)
  URLs and ``file_id`` are refused: this server fetches nothing): encoded by the tokenizer into latent
  frame 0 (image-to-video, as ``Engine.generate(image=)``). Its size must be the request's ``size``
  (when ``size`` is not given, it is the image's).
- Extension of a completed video of the same key (``video`` = ``{"id"}``) whose tokens cover it: the
  last Tc = min(latents of 13 frames, T_src) latent frames of its stored tokens condition frames
  0..Tc−1 of a new window (no decode / encode round trip); the window's other frames are new. The
  stored result is the token grid ``source tokens ++ window[Tc:]``, decoded as a whole: its first
  frames are the source video's. (Caveat: with a causal video tokenizer, latent frame 0 of the window
  holds a latent that stood for 4 frames in the source.)
- Extension of an uploaded video (or of a video that was itself extended from an upload): its last
  ``nc`` frames (nc = the largest 1 + 4k ≤ min(13, F) that the tokenizer encodes whole) are encoded
  into the window's first latent frames (as ``ursa-engine generate --video``); the MP4 is the whole
  given video followed by the window's frames past its first ``nc`` (the authors' README loop). An
  upload is taken as it is (its frame rate is not resampled; its size must lie on the tokenizer's grid).
"""

from __future__ import annotations

import math
import re
import secrets
from dataclasses import dataclass, field

import numpy as np
import torch
from pydantic import BaseModel, Field, ValidationError

from ..defaults import DEFAULT_COND_FRAMES, DEFAULT_EXTENSION_NOISE, DEFAULT_FPS, VIDEO_SIZE
from .body_fields import GenerationFields

FPS = DEFAULT_FPS
DEFAULT_VIDEO_SIZE = f"{VIDEO_SIZE[1]}x{VIDEO_SIZE[0]}"  # "WxH": the authors' 320x512 (height x width)
DEFAULT_SECONDS = "4"  # OpenAI's default


class _Common(GenerationFields):
    """Fields of both video routes: those of every generation body (:class:`~.body_fields.GenerationFields`),
    then the videos' extensions."""

    motion: float | None = Field(None, ge=0, le=100)
    cond_noise_scale: float | None = Field(None, ge=0, le=1)
    freeze_cond: bool = False


class CreateBody(_Common):
    """``POST /v1/videos`` (``input_reference`` is read apart: a file or an object)."""

    seconds: str | float = DEFAULT_SECONDS
    size: str | None = None
    input_reference: dict | None = None


class ExtendBody(_Common):
    """``POST /v1/videos/extensions`` (``video`` is read apart: a file or ``{"id"}``)."""

    seconds: str | float
    video: dict | None = None


def parse(model: type[BaseModel], data: dict) -> BaseModel:
    """``model`` of ``data``; a ValidationError becomes ``ValueError("field: ...")``."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = str(first["loc"][0]) if first.get("loc") else ""  # a top-level field (not a union's branch)
        msg = first.get("msg", "invalid value")
        if first.get("type") == "extra_forbidden":
            msg = "unknown field (not part of OpenAI's videos API nor of this server's extensions)"
        raise ValueError(f"{loc}: {msg}" if loc else msg) from None


def seconds_of(value, field: str = "seconds") -> float:
    """A positive finite number of seconds from ``"4"`` / ``4`` / ``"2.5"``."""
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{field}: expected a number of seconds such as '4', '8' or '12', got {value!r}") from None
    if not math.isfinite(s) or s <= 0:
        raise ValueError(f"{field}: expected a positive number of seconds, got {value!r}")
    return s


def fmt_seconds(s: float) -> str:
    """Seconds as the API reports them: ``"4"``, ``"2.5"``."""
    return f"{round(s, 3):g}"


def decodes_whole(vae, T: int) -> bool:
    """Whether ``T`` latent frames decode to a clip that encodes back to ``T`` (no partial tile)."""
    try:
        return vae.encoded_frames(vae.num_frames(T)) == T
    except ValueError:
        return False


SCAN = 256  # latent frames searched on either side of the target for a length that decodes whole


def check_seconds(seconds: float, before: int, limits, field: str = "seconds") -> None:
    """Refuse ``seconds`` when ``before`` frames + ``seconds`` x FPS are already over ``max_video_frames``
    (before any search: its cost must not depend on a huge ``seconds``)."""
    cap = int(getattr(limits, "max_video_frames", 257))
    if before + seconds * FPS > cap:
        what = "" if before <= 1 else f" after the {before} frames before it"
        raise ValueError(f"{field}: {fmt_seconds(seconds)} s is {seconds * FPS:.6g} frames at {FPS:g} frames per "
                         f"second{what}, over this server's limit of {cap} frames in a video (max_video_frames)")


def latent_frames_for(vae, seconds: float, *, start: int = 0, fps: float = FPS, field: str = "seconds") -> int:
    """The latent frame count T > ``start`` whose added duration is nearest to ``seconds`` (module
    docstring; ties: the shorter). ``start`` 0: a new clip (its base is one frame).

    ``num_frames`` is non-decreasing in T, so the first T that reaches the target is found by
    bisection; the nearest lengths that decode whole are then at most :data:`SCAN` latent frames
    below / above it: O(log T + SCAN) calls of ``num_frames``. Callers bound ``seconds`` first
    (:func:`check_seconds`): a tokenizer's ``num_frames(T)`` may cost O(T)."""
    base = vae.num_frames(start) if start else 1
    target = seconds * fps

    def added(T: int) -> int:
        return vae.num_frames(T) - base

    lo, hi = start + 1, start + 1
    while added(hi) < target:  # exponential, then bisection: the first T with added(T) >= target
        lo, hi = hi + 1, start + 2 * (hi - start)
        if hi - start > 1 << 40:  # pragma: no cover - a tokenizer whose clips stop growing
            raise ValueError(f"{field}: no clip length of this tokenizer reaches {fmt_seconds(seconds)} s")
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if added(mid) < target else (lo, mid)
    below = next((T for T in range(lo - 1, max(start, lo - 1 - SCAN), -1) if decodes_whole(vae, T)), None)
    above = next((T for T in range(lo, lo + SCAN) if decodes_whole(vae, T)), None)
    if below is None and above is None:
        raise ValueError(f"{field}: no clip length of this tokenizer is near {fmt_seconds(seconds)} s")
    if below is None or (above is not None and abs(added(above) - target) < abs(added(below) - target)):
        return above
    return below


def cond_pixel_frames(vae, available: int) -> int:
    """Frames of an uploaded video that condition an extension: the largest ``1 + s·k`` ≤
    min(13, ``available``) that the tokenizer encodes whole (``s`` its temporal stride)."""
    s = int(vae.temporal_stride)
    nc = 1 + s * ((min(DEFAULT_COND_FRAMES, available) - 1) // s)
    while nc > 1 and vae.num_frames(vae.encoded_frames(nc)) != nc:
        nc -= s
    return nc


def cond_latent_frames(vae, source_T: int) -> int:
    """Latent frames of a stored video that condition its extension: those of 13 frames, at most all."""
    return min(vae.encoded_frames(cond_pixel_frames(vae, DEFAULT_COND_FRAMES)), source_T)


@dataclass
class Plan:
    """How a video job is rendered and described once its tokens are there.

    ``kind``: ``"plain"`` (decode the tokens), ``"tokens"`` (stored source tokens ++ window[Tc:],
    decoded whole) or ``"pixels"`` (source frames ++ the window's frames past ``nc``)."""

    kind: str
    shape: tuple  # the window's latent grid (T, h, w)
    size: str  # "WxH"
    seconds: str  # reported: the total
    frames: int  # frames of the returned MP4
    seed: int
    source_tokens: torch.Tensor | None = None  # (1, T0, h, w), kind "tokens"
    source_frames: np.ndarray | None = None  # (F0, H, W, 3) uint8, kind "pixels"
    cond: int = 0  # Tc (kind "tokens") or nc (kind "pixels")
    extended_from: str | None = None
    extras: dict = field(default_factory=dict)


def video_tokenizer(served):
    """The served checkpoint's tokenizer, which must have a temporal axis (400 naming ``model`` otherwise)."""
    vae = served.engine.vae
    if vae is None:
        raise ValueError(f"model: the served checkpoint {served.name!r} has no vae/ (tokenizer): it cannot make videos")
    if int(getattr(vae, "temporal_stride", 1)) <= 1 or served.digits:
        raise ValueError(f"model: the served checkpoint {served.name!r} is an image model (its tokenizer has no "
                         "temporal axis): use /v1/images/generations")
    return vae


def parse_size(size: str, field: str = "size") -> tuple[int, int]:
    """``(W, H)`` of ``"WxH"``."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", size)
    if not m:
        raise ValueError(f"{field}: expected 'WIDTHxHEIGHT' in pixels (e.g. '{DEFAULT_VIDEO_SIZE}'), got {size!r}")
    return int(m.group(1)), int(m.group(2))


def grid(vae, T: int, w: int, h: int, field: str = "size") -> tuple[int, int, int]:
    """The latent grid (T, h/s, w/s) of a clip (sizes on the tokenizer's grid: else 400 naming ``field``)."""
    try:
        _, gh, gw = vae.latent_shape(1, h, w)
    except ValueError as err:
        msg = str(err).split(": ", 1)[-1]
        raise ValueError(f"{field}: {w}x{h} is not on this tokenizer's grid ({msg})") from None
    return T, gh, gw


def check_frames(frames: int, limits, field: str = "seconds") -> None:
    if frames > limits.max_video_frames:
        raise ValueError(f"{field}: the video would have {frames} frames, over this server's limit of "
                         f"{limits.max_video_frames} (max_video_frames; {FPS:g} frames per second)")


def guided_rows(guidance_scale: float, guidance_trunc: float) -> int:
    """Forward rows of one sample at its peak: 2 while guided (``guidance`` != 1 and ``guidance_trunc``
    > 0, as :func:`~ursa_engine.rowwise.guided_steps` decides for some step), else 1."""
    return 2 if guidance_scale != 1.0 and guidance_trunc > 0 else 1


def upload_bounds(vae, limits, max_tokens: int, rows: int, field: str = "video"):
    """``(check, max_bytes)`` for :func:`~ursa_engine.serve.uploads.read_video` of a video to extend.

    ``check(W, H, F)`` refuses, from the stream header before decoding and then frame by frame, a
    size off the tokenizer's grid, and a video whose extension cannot fit ``max_tokens``: its last
    ``nc`` frames (:func:`cond_pixel_frames` of F frames) are Tc latent frames, and the window holds
    at least Tc + 1, at ``rows`` rows (so a 1024x1024 upload announcing 200 frames is refused before
    a frame is decoded when 2 x 5 x 128 x 128 > ``max_tokens``). ``max_bytes``: ``max_video_frames``
    frames of the largest frame size any extension fits (Tc = 1: two latent frames)."""
    s = int(vae.spatial_stride)
    cap_px = int(getattr(limits, "max_image_pixels", 4096 * 4096))
    max_px = min(cap_px, max_tokens // (2 * rows) * s * s)
    max_bytes = int(getattr(limits, "max_video_frames", 257)) * max_px * 3

    def check(w: int, h: int, frames: int) -> None:
        _, gh, gw = grid(vae, 1, w, h, field)
        tc = vae.encoded_frames(cond_pixel_frames(vae, max(1, frames)))
        if rows * (tc + 1) * gh * gw > max_tokens:
            raise ValueError(f"{field}: a {w}x{h} video of {frames or 'at least 1'} frames cannot be extended on "
                             f"this server: its last frames are {tc} latent frames of {gh}x{gw} tokens and the "
                             f"window adds at least one: {rows} rows x {(tc + 1) * gh * gw} tokens are over the limit "
                             f"of {max_tokens} token-rows per step (max_tokens); give a smaller video")

    return check, max_bytes


def too_large(vae, plan: Plan, seconds: float, rows: int, max_tokens: int) -> ValueError:
    """The 400 of a new video over ``max_tokens`` (``rows`` x T x h x w token-rows a step).

    When one latent frame of its size is already over, the size alone is named (``size``). Otherwise
    the message names both size and seconds, and ``param`` is the one to change: ``seconds`` when a
    clip of min(``seconds``, the default 4 s) fits at this size (more time was asked than fits),
    else ``size`` (even the default length does not fit: the size is the problem)."""
    T, h, w = plan.shape
    if rows * h * w > max_tokens:
        return ValueError(f"size: {plan.size} is {h}x{w} = {h * w} latent tokens a frame; {rows} rows of one frame "
                          f"are over this server's limit of {max_tokens} token-rows per step (max_tokens): give a "
                          "smaller size")
    fit = max(t for t in range(1, min(T, max_tokens // (rows * h * w) + 1)) if decodes_whole(vae, t))  # < T
    fit_s = (vae.num_frames(fit) - 1) / FPS
    shorter = latent_frames_for(vae, min(seconds, float(DEFAULT_SECONDS)))
    param = "seconds" if rows * shorter * h * w <= max_tokens else "size"
    hint = "give fewer seconds" if param == "seconds" else "give a smaller size"
    return ValueError(f"{param}: size x seconds: {plan.size} x {fmt_seconds(seconds)} s is {T} latent frames of "
                      f"{h}x{w} tokens, {rows} rows x {T * h * w} = {rows * T * h * w} token-rows per step, over "
                      f"this server's limit of {max_tokens} (max_tokens); at {plan.size} at most "
                      f"{fmt_seconds(fit_s)} s fit: {hint}")


def seed_of(body) -> int:
    return secrets.randbelow(2**31) if body.seed is None else body.seed


def new_video_plan(served, body: CreateBody, limits, image: np.ndarray | None) -> Plan:
    """The plan of ``POST /v1/videos``: frames from ``seconds``, the grid from ``size`` (or the image's)."""
    vae = video_tokenizer(served)
    seconds = seconds_of(body.seconds)
    if body.size is not None:
        w, h = parse_size(body.size)
    elif image is not None:
        h, w = image.shape[:2]
    else:
        w, h = parse_size(DEFAULT_VIDEO_SIZE)
    if image is not None and image.shape[:2] != (h, w):
        raise ValueError(f"input_reference: the image is {image.shape[1]}x{image.shape[0]}, the video's size is "
                         f"{w}x{h}: they must match (or leave size out to take the image's)")
    check_seconds(seconds, 1, limits)
    T = latent_frames_for(vae, seconds)
    shape = grid(vae, T, w, h)
    frames = vae.num_frames(T)
    check_frames(frames, limits)
    return Plan("plain", shape, f"{w}x{h}", fmt_seconds(seconds), frames, seed_of(body))


def token_extension_plan(served, body: ExtendBody, limits, source_tokens: torch.Tensor, source: dict) -> Plan:
    """Extending a stored video whose tokens cover it (module docstring): the window's grid and Tc."""
    vae = video_tokenizer(served)
    seconds = seconds_of(body.seconds)
    T0, h, w = (int(v) for v in source_tokens.shape[1:])
    check_seconds(seconds, vae.num_frames(T0), limits)
    total_T = latent_frames_for(vae, seconds, start=T0)
    tc = cond_latent_frames(vae, T0)
    frames = vae.num_frames(total_T)
    check_frames(frames, limits)
    total = seconds_of(source["seconds"]) + seconds
    return Plan("tokens", (tc + total_T - T0, h, w), source["size"], fmt_seconds(total), frames, seed_of(body),
                source_tokens=source_tokens, cond=tc, extended_from=source["id"])


def pixel_extension_plan(served, body: ExtendBody, limits, frames_in: np.ndarray, source_id: str | None,
                         source_seconds: float | None = None) -> Plan:
    """Extending given frames (an upload, or a stored video without covering tokens): nc and the window."""
    vae = video_tokenizer(served)
    seconds = seconds_of(body.seconds)
    F0, H, W = (int(v) for v in frames_in.shape[:3])
    nc = cond_pixel_frames(vae, F0)
    tc = vae.encoded_frames(nc)
    check_seconds(seconds, F0, limits)
    T = latent_frames_for(vae, seconds, start=tc)
    shape = grid(vae, T, W, H, field="video")
    frames = F0 + vae.num_frames(T) - nc
    check_frames(frames, limits)
    before = (F0 - 1) / FPS if source_seconds is None else source_seconds
    return Plan("pixels", shape, f"{W}x{H}", fmt_seconds(before + seconds), frames, seed_of(body),
                source_frames=frames_in, cond=nc, extended_from=source_id)


def stitch(served, plan: Plan, tokens: torch.Tensor) -> tuple[torch.Tensor, np.ndarray, bool]:
    """``(tokens to store (1, T, h, w), frames (F, H, W, 3) uint8, tokens cover the frames)`` of a
    finished window ``tokens`` (1, Tw, h, w) (module docstring)."""
    tokens = tokens.to("cpu", torch.int64)
    if plan.kind == "tokens":
        full = torch.cat([plan.source_tokens.to(torch.int64), tokens[:, plan.cond:]], 1)
        return full, served.frames(full)[0], True
    frames = served.frames(tokens)[0]
    if plan.kind == "pixels":
        return tokens, np.concatenate([plan.source_frames, frames[plan.cond:]], 0), False
    return tokens, frames, True


def extension_noise(body) -> float:
    """An extension's ``cond_noise_scale``: the request's, else the README loop's 0.1."""
    return DEFAULT_EXTENSION_NOISE if body.cond_noise_scale is None else body.cond_noise_scale


__all__ = ["CreateBody", "DEFAULT_VIDEO_SIZE", "ExtendBody", "FPS", "Plan", "check_seconds", "cond_latent_frames",
           "guided_rows", "upload_bounds",
           "cond_pixel_frames", "latent_frames_for", "new_video_plan", "parse", "pixel_extension_plan",
           "seconds_of", "stitch", "token_extension_plan", "too_large", "video_tokenizer"]
