"""Uploaded images and videos, decoded under the server's limits (issues 20 item 2, 23).

Every upload route (``/v1/images/edits``, ``/v1/videos``, ``/v1/videos/extensions``) reads its files
here, so that the same limits hold everywhere:

- **bytes**: the body is bounded by :class:`~ursa_engine.serve.security.Guard` (``max_upload_bytes``,
  413) before it is parsed; a base64 field (:func:`b64_bytes`) is bounded by the same number;
- **formats**: images are PNG, JPEG or WebP (Pillow is told to try only those decoders); videos are
  MP4 / MOV or WebM / Matroska, recognised from their magic bytes and opened with that demuxer only
  (no playlist or image-sequence demuxer that could reach other files or the network);
- **pixels**: width x height as the file's *header* announces it is checked against
  ``max_image_pixels`` before a pixel is decoded (decompression bombs: a 100-byte PNG may announce
  100,000 x 100,000 pixels); for videos every frame's size too (a stream may change size);
- **frames**: a video's frames are counted while decoding and the decoding stops past
  ``max_video_frames``;
- **decoded bytes** (videos): frames x width x height x 3 within a budget (``max_bytes``, by default
  ``max_video_frames`` x ``max_image_pixels`` x 3; the videos routes pass a tighter one from their
  token budget), checked from the header's announced frame count before decoding and at every
  frame; the caller's ``check`` (its grid, its ``max_tokens``) runs on the header too. Frames are
  decoded into one preallocated array.

Every refusal is one ``ValueError("field: ...")`` naming the form field, which the gateway turns into
an OpenAI-shaped 400 with ``param`` = field.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import warnings

import numpy as np

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
VIDEO_DEMUXERS = {"mp4": "MP4 / MOV", "matroska": "WebM / Matroska"}
MAX_FORM_FILES, MAX_FORM_FIELDS = 4, 64
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def _limit(limits, name: str, default: int) -> int:
    return int(getattr(limits, name, default)) if limits is not None else default


def b64_bytes(text: str, field: str, limits=None) -> bytes:
    """The bytes of a base64 field (plain or a ``data:...;base64,`` URL), at most ``max_upload_bytes``.

    The length is checked before decoding (base64 is 4 characters per 3 bytes)."""
    if not isinstance(text, str):
        raise ValueError(f"{field}: expected a base64 string, got {type(text).__name__}")
    m = re.match(r"data:[\w.+/-]*;base64,", text[:128])
    if m:
        text = text[m.end():]
    cap = _limit(limits, "max_upload_bytes", 32 << 20)
    if len(text) * 3 // 4 > cap + 3:
        raise ValueError(f"{field}: about {len(text) * 3 // 4} bytes, over this server's limit of {cap} bytes "
                         "(max_upload_bytes)")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{field}: not valid base64") from None
    if not data:
        raise ValueError(f"{field}: empty")
    return data


# ---------------------------------------------------------------------------- bodies
class _Repeated(ValueError):
    """A key given twice in a JSON object."""


def _no_repeats(pairs: list) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise _Repeated(f"{key}: given more than once")
        out[key] = value
    return out


def is_form(request) -> bool:
    """Whether a request's body is a multipart / urlencoded form (else it is read as JSON)."""
    return request.headers.get("content-type", "").lower().startswith(FORM_TYPES)


def nest(fields: dict) -> dict:
    """Form keys ``a[b]`` as ``{"a": {"b": ...}}`` (other keys as they are)."""
    out: dict = {}
    for key, value in fields.items():
        m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)\[([A-Za-z_][A-Za-z0-9_]*)\]", key)
        if m:
            inner = out.setdefault(m.group(1), {})
            if not isinstance(inner, dict):
                raise ValueError(f"{m.group(1)}: given both as a value and as an object")
            inner[m.group(2)] = value
        elif isinstance(out.get(key), dict):
            raise ValueError(f"{key}: given both as a value and as an object")
        else:
            out[key] = value
    return out


async def read_form(request, file_fields: tuple[str, ...], *, repeatable: tuple[str, ...] = ()
                    ) -> tuple[dict, dict[str, list[bytes]]]:
    """``(fields, files)`` of an upload route's body, read one way for every route.

    A multipart / urlencoded form (at most :data:`MAX_FORM_FILES` files and :data:`MAX_FORM_FIELDS`
    fields): its text fields, bracket keys nested (``video[id]`` -> ``{"video": {"id": ...}}``), and its
    files by key (``file_fields`` only: another file is a 400 naming its key). Otherwise a JSON object
    (no files). A field or file given more than once is a 400 naming it (the last one is never taken
    silently), in a form as in JSON; only the file keys in ``repeatable`` may repeat (the caller counts).

    Raises
    ------
    ValueError ``"field: ..."`` (``body`` for an unreadable body).
    """
    from starlette.datastructures import UploadFile

    if not is_form(request):
        try:
            data = json.loads(await request.body(), object_pairs_hook=_no_repeats)
        except _Repeated:
            raise
        except Exception:
            raise ValueError("body: expected a JSON object or a multipart form") from None
        if not isinstance(data, dict):
            raise ValueError("body: expected a JSON object")
        return data, {}
    try:
        form = await request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS)
    except Exception as err:  # python-multipart's / starlette's parse errors (too many parts, malformed)
        raise ValueError(f"body: not a readable form ({getattr(err, 'detail', err)})") from None
    fields: dict = {}
    files: dict[str, list[bytes]] = {}
    try:
        for key, value in form.multi_items():
            name = key.split("[", 1)[0] or key  # the field a bracket key belongs to (video[id] -> video)
            if isinstance(value, UploadFile):
                if key not in file_fields:
                    raise ValueError(f"{name}: unexpected file (files go in {', '.join(file_fields)})")
                if key in fields or (key in files and key not in repeatable):
                    raise ValueError(f"{name}: given more than once")
                files.setdefault(key, []).append(await value.read())
            elif key in fields or key in files:
                raise ValueError(f"{name}: given more than once")
            else:
                fields[key] = value
    finally:
        await form.close()
    return nest(fields), files


# ---------------------------------------------------------------------------- images
def _open_image(data: bytes, field: str, limits):
    """A PIL image of ``data`` whose header was read and whose size is within ``max_image_pixels``
    (nothing decoded yet)."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise ValueError(f"{field}: expected a non-empty image file (PNG, JPEG or WebP)")
    cap = _limit(limits, "max_image_pixels", 4096 * 4096)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            img = Image.open(io.BytesIO(bytes(data)), formats=list(IMAGE_FORMATS))
    except Image.DecompressionBombError:
        raise ValueError(f"{field}: the image header announces more pixels than this server's limit of {cap} "
                         "(max_image_pixels)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{field}: not a readable PNG, JPEG or WebP image ({err})") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise ValueError(f"{field}: an image of {w}x{h} pixels")
    if w * h > cap:
        raise ValueError(f"{field}: a {w}x{h} image ({w * h} pixels) is over this server's limit of {cap} pixels "
                         "(max_image_pixels)")
    return img


def _load(img, field: str):
    """Decode the pixels (truncated or corrupt data -> ValueError naming ``field``)."""
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{field}: the image data is truncated or corrupt ({err})") from None
    if img.mode.startswith("I;16"):  # 16-bit grayscale: keep the high byte (convert() would clip)
        from PIL import Image

        return Image.fromarray((np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8))
    return img


def image_size(data: bytes, field: str, limits=None) -> tuple[int, int]:
    """``(width, height)`` of an image file from its header (checked as :func:`read_image` does)."""
    with _open_image(data, field, limits) as img:
        return img.size


def has_alpha(img) -> bool:
    """Whether a PIL image carries an alpha channel (an alpha band or a transparency entry)."""
    return "A" in img.getbands() or "a" in img.getbands() or "transparency" in img.info


def read_image(data: bytes, field: str, limits=None) -> np.ndarray:
    """An uploaded PNG / JPEG / WebP image as uint8 RGB (H, W, 3); alpha is dropped.

    Parameters
    ----------
    data : the file's bytes
    field : the form field, named in errors
    limits : :class:`~ursa_engine.serve.security.Limits` (``max_image_pixels``; None: the defaults)

    Raises
    ------
    ValueError ``"field: ..."``: not one of the formats, over ``max_image_pixels`` (from the header,
    before decoding), truncated or corrupt data.
    """
    with _open_image(data, field, limits) as img:
        return np.array(_load(img, field).convert("RGB"), dtype=np.uint8)


def read_image_rgba(data: bytes, field: str, limits=None) -> tuple[np.ndarray, bool]:
    """An uploaded image as uint8 RGBA (H, W, 4) and whether the file has an alpha channel (without
    one, alpha is 255 everywhere). Checks as :func:`read_image`."""
    with _open_image(data, field, limits) as img:
        img = _load(img, field)
        alpha = has_alpha(img)
        return np.array(img.convert("RGBA"), dtype=np.uint8), alpha


def read_mask_alpha(data: bytes, field: str, limits=None) -> np.ndarray:
    """The alpha channel (H, W) uint8 of an uploaded mask image (OpenAI's ``images.edit`` convention:
    alpha 0 marks the pixels to edit). A mask without an alpha channel is refused (ValueError naming
    ``field``), as OpenAI does."""
    rgba, alpha = read_image_rgba(data, field, limits)
    if not alpha:
        raise ValueError(f"{field}: the mask has no alpha channel; give a PNG / WebP with alpha where fully "
                         "transparent pixels (alpha 0) mark the area to edit")
    return rgba[..., 3]


# ---------------------------------------------------------------------------- videos
def _demuxer(data: bytes, field: str) -> str:
    """The one demuxer an upload may use, from its magic bytes."""
    head = bytes(data[:12])
    if len(head) >= 8 and head[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip"):
        return "mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    raise ValueError(f"{field}: not an MP4 / MOV or WebM / Matroska video file")


def read_video(data: bytes, field: str, limits=None, *, check=None, max_bytes: int | None = None
               ) -> tuple[np.ndarray, float]:
    """An uploaded video as uint8 RGB frames (F, H, W, 3) and its frame rate (0.0 when the file does
    not say), with PyAV, decoded into one preallocated array (no list of frames stacked at the end).

    Parameters
    ----------
    data : the file's bytes (MP4 / MOV or WebM / Matroska)
    field : the form field, named in errors
    limits : :class:`~ursa_engine.serve.security.Limits` (``max_image_pixels`` per frame and
        ``max_video_frames``; None: the defaults)
    check : the caller's ``check(width, height, frames)``, raising ValueError naming ``field`` when it
        cannot take such a video (its grid, its token budget): called with the stream header's size
        and announced frame count (0: not announced) before any frame is decoded, then with the
        running count before each frame is converted
    max_bytes : the decoded bytes F x H x W x 3 allowed (default: ``max_video_frames`` x
        ``max_image_pixels`` x 3), checked against the header's announced frames before decoding and
        against every decoded frame

    Raises
    ------
    ValueError ``"field: ..."``: not a readable video, no video stream, no decodable frame, frames
    over ``max_image_pixels``, more than ``max_video_frames`` frames, over ``max_bytes``, frames that
    change size, or what ``check`` refuses.
    """
    import av

    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise ValueError(f"{field}: expected a non-empty video file (MP4 or WebM)")
    fmt = _demuxer(data, field)
    cap_px = _limit(limits, "max_image_pixels", 4096 * 4096)
    cap_f = _limit(limits, "max_video_frames", 257)
    budget = cap_f * cap_px * 3 if max_bytes is None else int(max_bytes)

    def check_size(w: int, h: int, frames: int, where: str) -> None:
        if w * h > cap_px:
            raise ValueError(f"{field}: {w}x{h} frames ({w * h} pixels) are over this server's limit of {cap_px} "
                             "pixels (max_image_pixels)")
        if frames > cap_f:
            raise ValueError(f"{field}: more than {cap_f} frames ({where} {frames}), this server's limit "
                             "(max_video_frames)")
        if frames * w * h * 3 > budget:
            raise ValueError(f"{field}: {where} {frames} frames of {w}x{h} = {frames * w * h * 3} decoded bytes, over "
                             f"this server's budget of {budget} bytes for an upload (max_video_frames x its frame "
                             "size)")
        if check is not None:
            check(w, h, frames)

    out, n, rate = None, 0, None
    try:
        with av.open(io.BytesIO(bytes(data)), mode="r", format=fmt) as container:
            if not container.streams.video:
                raise ValueError(f"{field}: the file has no video stream")
            stream = container.streams.video[0]
            W, H, announced = int(stream.width or 0), int(stream.height or 0), max(0, int(stream.frames or 0))
            if W * H:
                check_size(W, H, announced, "the stream header announces")  # before decoding
            rate = stream.average_rate or stream.guessed_rate
            for frame in container.decode(stream):
                w, h = int(frame.width), int(frame.height)
                if out is None:
                    check_size(w, h, 1, "the video has")
                    W, H = w, h
                    cap = min(cap_f, budget // (w * h * 3))  # frames the budget allows
                    out = np.empty((max(1, min(announced or 16, cap)), h, w, 3), np.uint8)
                elif (w, h) != (W, H):
                    raise ValueError(f"{field}: the video's frames change size ({W}x{H} first, then {w}x{h}); give "
                                     "frames of one size")
                check_size(w, h, n + 1, "the video has")
                if n == len(out):  # the header announced fewer frames (or none): grow, within the checks
                    grown = np.empty((min(2 * n, cap), h, w, 3), np.uint8)
                    grown[:n] = out
                    out = grown
                out[n] = frame.to_ndarray(format="rgb24")
                n += 1
    except av.error.FFmpegError as err:
        raise ValueError(f"{field}: not a readable {VIDEO_DEMUXERS[fmt]} video ({err})") from None
    if not n:
        raise ValueError(f"{field}: the video has no decodable frames")
    return out[:n], float(rate) if rate else 0.0
