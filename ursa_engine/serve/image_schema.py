"""The request schema of the OpenAI images routes (issue 23): every field of ``client.images.generate``
and ``client.images.edit`` (openai 3.63), what each one does here, and our extensions.

Each standard field is **honoured** (it changes the result), **recorded** (logged and counted, echoed
in the response), **ignored** (accepted, no effect) or **refused** (a 400 naming it). :data:`FIELDS`
is the table (the README's mapping is made from the same words):

======================  ==========  ===================================================================
field                   policy      here
======================  ==========  ===================================================================
prompt                  honoured    the prompt (digits model: one digit class)
n                       honoured    samples; ``stream`` with ``n`` > 1 is refused (partial-image events
                                    carry no sample index)
size                    honoured    ``"WxH"`` pixels on the tokenizer's grid; ``"auto"``: the model's
                                    default size (edits: the image's size, the only one accepted)
quality                 honoured    steps (:data:`QUALITY_STEPS`: a fraction of the checkpoint's default
                                    steps D): low D/4, medium / standard D/2, high / hd / auto D,
                                    xhigh 1.5 D, max 2 D (at least 2); ``steps`` wins when given
output_format           honoured    png (default), jpeg, webp; gif: an animated GIF of ``frame_count``
                                    frames; svg refused; mp4 (our extension, the default for
                                    ``frames`` > 1)
output_compression      honoured    jpeg / webp quality 0-100 (webp 100: lossless); png / gif / mp4:
                                    ignored
frame_count             honoured    gif frames (2-16, default 9); they must lie on the tokenizer's
                                    temporal grid; refused without ``output_format="gif"``
frame_duration_ms       honoured    gif frame delay (default 200, rounded to 10 ms); refused without gif
stream                  honoured    SSE in OpenAI's format (``image_generation.partial_image`` /
                                    ``.completed``, edits: ``image_edit.*``); with
                                    ``response_format="tokens"`` our per-step events instead
partial_images          honoured    0-3 partial images (the decoded prediction x̂1 at evenly spaced steps)
background              honoured    auto / opaque (the output is opaque); transparent refused (no alpha)
response_format         honoured    b64_json (default); url refused (no result store for images: the
                                    400 names b64_json); our png / mp4 (the file itself) and tokens
model                   honoured    a LoRA name from ``/v1/models`` selects that adapter; any other
                                    value is ignored (the served checkpoint answers)
user                    recorded    request log line and per-key metrics; echoed as safety_identifier
safety_identifier       recorded    as ``user`` (and wins over it when non-empty)
style                   ignored     legacy DALL-E 3 field
moderation              ignored     no moderation model here
complexity              ignored     no planning stage here
input_fidelity (edits)  ignored     the image is always encoded exactly
image (edits)           honoured    one PNG / JPEG / WebP (``image`` or one ``image[]``), on the grid
mask (edits)            honoured    PNG / WebP with alpha, the image's size: alpha 0 = regenerate
svg                     refused     no SVG output
markup (edits)          refused     no markup input
any other field         refused     400 naming it
======================  ==========  ===================================================================

Extensions: ``negative_prompt``, ``seed``, ``steps``, ``guidance``, ``guidance_trunc``,
``temperature``, ``top_k``, ``top_p``, ``request_id``, ``lora``; generations also ``frames`` and
``latents_shape``; edits also ``strength``. ``null`` for any field means its default (as OpenAI).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from .body_fields import ID, GenerationFields

QUALITY_STEPS = {"low": 0.25, "medium": 0.5, "standard": 0.5, "high": 1.0, "hd": 1.0, "auto": 1.0, "xhigh": 1.5,
                 "max": 2.0}
"""``quality`` -> the fraction of the checkpoint's default step count (at least 2 steps)."""
QUALITY_NAME = {"standard": "medium", "hd": "high", "auto": "high"}  # the reported quality of legacy / auto values
GIF_FRAMES, GIF_MS = 9, 200  # OpenAI's defaults for frame_count, frame_duration_ms
EDIT_STRENGTH = 0.7  # an unmasked edit: the image's tokens resampled at t = 1 - strength (DESIGN §2.4)

FIELDS = {
    "prompt": "honoured", "n": "honoured", "size": "honoured", "quality": "honoured", "output_format": "honoured",
    "output_compression": "honoured", "frame_count": "honoured", "frame_duration_ms": "honoured",
    "stream": "honoured", "partial_images": "honoured", "background": "honoured", "response_format": "honoured",
    "model": "honoured", "user": "recorded", "safety_identifier": "recorded", "style": "ignored",
    "moderation": "ignored", "complexity": "ignored", "input_fidelity": "ignored", "image": "honoured",
    "mask": "honoured", "svg": "refused", "markup": "refused",
}


class _Common(GenerationFields):
    """The fields generations and edits share (OpenAI's, then ours; those of every generation body,
    ``prompt``, ``model``, ``user``, ``safety_identifier`` and the sampling extensions, come from
    :class:`~.body_fields.GenerationFields`)."""

    background: Literal["transparent", "opaque", "auto"] = "auto"
    complexity: Literal["low", "medium", "high"] | None = None
    frame_count: int | None = Field(None, ge=2, le=16)
    frame_duration_ms: int | None = Field(None, ge=1, le=655_350)
    n: int = Field(1, ge=1, le=64)
    output_compression: int | None = Field(None, ge=0, le=100)
    output_format: Literal["png", "jpeg", "webp", "gif", "svg", "mp4"] | None = None
    partial_images: int = Field(0, ge=0, le=3)
    quality: Literal["low", "medium", "high", "xhigh", "max", "auto", "standard", "hd"] = "auto"
    response_format: Literal["b64_json", "url", "png", "mp4", "tokens"] = "b64_json"
    size: str | None = Field(None, max_length=32)
    stream: bool = False
    svg: dict | str | None = None
    request_id: str | None = Field(None, pattern=ID)  # extension

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        """OpenAI's ``null`` means "the default": drop null fields (a missing ``prompt`` stays an error)."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class ImageRequest(_Common):
    """The body of ``POST /v1/images/generations`` (JSON)."""

    moderation: Literal["low", "auto"] | None = None
    style: Literal["vivid", "natural"] | None = None
    frames: int = Field(1, ge=1, le=1024)
    latents_shape: list[int] | None = Field(None, min_length=2, max_length=3)


class EditRequest(_Common):
    """The non-file fields of ``POST /v1/images/edits`` (multipart form fields, converted by pydantic)."""

    input_fidelity: Literal["high", "low"] | None = None
    strength: float = Field(EDIT_STRENGTH, ge=0, le=1)


@dataclass
class Output:
    """How a request's result is returned: the resolved format, its options and what the response reports."""

    fmt: str  # png, jpeg, webp, gif, mp4 (ignored for tokens)
    frames: int  # pixel frames per sample
    compression: int | None = None
    duration_ms: int = GIF_MS
    response_format: str = "b64_json"
    quality: str = "high"


def output_of(body: _Common, frames: int = 1) -> Output:
    """The checked output plan of a body (ValueError naming the field otherwise).

    ``frames``: the pixel frames the body asks for (``frames``, 1 for edits)."""
    if body.svg is not None:
        raise ValueError("svg: SVG output is not served here (raster output only: png, jpeg, webp, gif)")
    if body.output_format == "svg":
        raise ValueError("output_format: 'svg' is not served here; use png, jpeg, webp or gif")
    if body.background == "transparent":
        raise ValueError("background: 'transparent' is not possible: the model has no alpha channel; use 'auto' "
                         "or 'opaque'")
    if body.response_format == "url":
        raise ValueError("response_format: 'url' is not served (this server keeps no image store); use 'b64_json' "
                         "(the default)")
    fmt = body.output_format
    if fmt == "gif":
        if body.frame_count is not None:
            if frames > 1 and frames != body.frame_count:
                raise ValueError(f"frame_count: {body.frame_count} frames, but frames asks {frames}; give one")
            frames = body.frame_count
        elif frames == 1:
            frames = GIF_FRAMES
    else:
        for name in ("frame_count", "frame_duration_ms"):
            if getattr(body, name) is not None:
                raise ValueError(f"{name}: applies to output_format 'gif' only")
    if fmt is None:
        fmt = "mp4" if frames > 1 or body.response_format == "mp4" else "png"
    if fmt in ("png", "jpeg", "webp") and frames > 1:
        raise ValueError(f"output_format: {fmt!r} holds one image; use 'gif' or 'mp4' for frames > 1")
    rf = body.response_format
    if rf in ("png", "mp4"):
        if fmt != rf:
            raise ValueError(f"response_format: {rf!r} returns the file itself; it needs output_format {rf!r} "
                             f"(or none), got {fmt!r}")
        if body.n != 1:
            raise ValueError(f"n: response_format {rf!r} returns one file: n must be 1")
        if rf == "png" and frames != 1:
            raise ValueError("response_format: 'png' is one image: use 'mp4' or 'b64_json' for frames > 1")
    if body.stream and rf != "tokens":
        if rf in ("png", "mp4"):
            raise ValueError(f"stream: response_format {rf!r} returns one file; stream with 'b64_json'")
        if fmt in ("gif", "mp4"):
            raise ValueError(f"stream: partial images are single images; output_format {fmt!r} is not streamed")
        if body.n != 1:
            raise ValueError("n: a stream's partial images carry no sample index: stream with n = 1")
    duration = GIF_MS if body.frame_duration_ms is None else max(10, int(round(body.frame_duration_ms / 10)) * 10)
    quality = QUALITY_NAME.get(body.quality, body.quality)
    return Output(fmt, frames, body.output_compression, duration, rf, quality)


def quality_steps(quality: str, default_steps: int) -> int:
    """The step count of a ``quality`` (:data:`QUALITY_STEPS` x the checkpoint's default, at least 2)."""
    return min(1000, max(2, int(math.floor(QUALITY_STEPS[quality] * default_steps + 0.5))))


def partial_steps(count: int, num_steps: int) -> tuple[int, ...]:
    """``count`` (0-3) evenly spaced 1-based steps strictly before the last one: where the partial images
    are taken (fewer when there are not enough steps; the final image is the completed event's)."""
    if count <= 0 or num_steps < 2:
        return ()
    picks = [min(num_steps - 1, max(1, int(math.floor(num_steps * (i + 1) / (count + 1) + 0.5))))
             for i in range(count)]
    return tuple(sorted(set(picks)))


def usage(text_tokens: int, image_tokens_in: int, image_tokens_out: int) -> dict:
    """OpenAI's ``usage`` object: text tokens of the prompt (not padding), image tokens in (an edit's
    input image, its latent tokens) and out (latent tokens x n)."""
    inp = text_tokens + image_tokens_in
    return {"input_tokens": inp, "output_tokens": image_tokens_out, "total_tokens": inp + image_tokens_out,
            "input_tokens_details": {"text_tokens": text_tokens, "image_tokens": image_tokens_in},
            "output_tokens_details": {"text_tokens": 0, "image_tokens": image_tokens_out}}
