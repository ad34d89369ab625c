"""``POST /v1/images/edits`` (issue 23 item 3, issue 20 item 2's image conditioning): an image, an optional
mask, a prompt -> images of the image's size (see :mod:`.images` for the behaviour, :mod:`.image_schema`
for the fields).

The body is multipart, as ``client.images.edit`` sends it (files ``image`` or ``image[]`` and ``mask``;
every other field a form field, converted by pydantic as JSON values would be), or JSON with ``image``
and ``mask`` as base64 / data-URL strings (or ``{"image_url": "data:..."}``, OpenAI's JSON form; only
data URLs: this server fetches nothing).
"""

from __future__ import annotations

import math
import time

from fastapi import FastAPI, Request
from pydantic import ValidationError

from ..conditioning import encode_inpaint, encode_pixels
from .batcher import Job
from .gateway import bad_request, error
from .image_schema import EditRequest, output_of
from .images import ImageRoutes, Plan, validation_error
from .uploads import b64_bytes, is_form, read_form, read_image, read_mask_alpha


def _data_of(value, field: str, limits) -> bytes:
    """The bytes of a JSON ``image`` / ``mask``: base64, a data URL, ``{"image_url": ...}`` or a list of one."""
    if isinstance(value, list):
        if len(value) != 1:
            raise ValueError(f"{field}: expected one image, got {len(value)}")
        value = value[0]
    if isinstance(value, dict):
        extra = set(value) - {"image_url"}
        if extra or not isinstance(value.get("image_url"), str):
            raise ValueError(f"{field}: expected {{'image_url': 'data:image/...;base64,...'}}")
        value = value["image_url"]
        if not value.startswith("data:"):
            raise ValueError(f"{field}: only data URLs are accepted (this server fetches nothing)")
    return b64_bytes(value, field, limits)


async def read_body(request: Request, limits) -> tuple[dict, bytes, bytes | None]:
    """(the non-file fields, the image's bytes, the mask's bytes or None) of a multipart or JSON body,
    read by :func:`~.uploads.read_form` as every upload route reads its body (a field given twice is
    a 400 naming it)."""
    fields, files = await read_form(request, ("image", "image[]", "mask"), repeatable=("image", "image[]"))
    if not is_form(request):
        images = [fields.pop(k) for k in ("image", "images") if k in fields]
        if len(images) != 1:
            raise ValueError("image: give one image (base64 or a data URL)")
        mask = fields.pop("mask", None)
        return fields, _data_of(images[0], "image", limits), None if mask is None else _data_of(mask, "mask", limits)
    if "svg" in fields:
        raise ValueError("svg: SVG output is not served here (raster output only)")
    if "markup" in fields:
        raise ValueError("markup: markup images are not supported here")
    for key in ("image", "mask"):
        if key in fields:
            raise ValueError(f"{key}: expected a file upload")
    images = files.pop("image", []) + files.pop("image[]", [])
    if len(images) != 1:
        raise ValueError(f"image: expected one image file (image or image[]), got {len(images)}")
    masks = files.pop("mask", [])
    return fields, images[0], masks[0] if masks else None


def openapi_body() -> dict:
    """The multipart body as ``/openapi.json`` shows it (the route reads the form itself)."""
    props = {k: v for k, v in EditRequest.model_json_schema()["properties"].items()}
    props["image"] = {"type": "string", "format": "binary", "description": "PNG, JPEG or WebP"}
    props["mask"] = {"type": "string", "format": "binary", "description": "PNG / WebP with alpha: 0 = edit"}
    schema = {"type": "object", "required": ["image", "prompt"], "properties": props}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


def add_edit_route(app: FastAPI, routes: ImageRoutes) -> None:
    """Register ``POST /v1/images/edits`` on ``app``."""
    gw, served = routes.gw, routes.served

    @app.post("/v1/images/edits", openapi_extra=openapi_body())
    async def edits(request: Request):
        try:
            fields, image_bytes, mask_bytes = await read_body(request, gw.limits)
        except ValueError as err:
            return bad_request(err)
        try:
            body = EditRequest.model_validate(fields)
        except ValidationError as err:
            return validation_error(err)
        rid = {"X-Request-Id": body.request_id} if body.request_id else None
        refused = routes.refused(body, rid)
        if refused is not None:
            return refused
        try:
            out = output_of(body, 1)
            if out.frames != 1 or out.fmt in ("gif", "mp4"):
                raise ValueError(f"output_format: an edit returns one image (png, jpeg or webp), not {out.fmt!r}")
        except ValueError as err:
            return bad_request(err, rid)
        if served.engine.vae is None:
            return error(400, "image: this checkpoint has no vae/ to encode images", "image", headers=rid)
        plan = Plan(out, "image_edit", user=body.end_user, created=int(time.time()))

        def build(job_id: str) -> Job:  # in the thread pool, after the per-key / queue admission
            img = read_image(image_bytes, "image", gw.limits)  # (H, W, 3): pixel limit from the header first
            H, W = img.shape[:2]
            if body.size not in (None, "auto") and body.size.replace(" ", "").lower() != f"{W}x{H}":
                raise ValueError(f"size: an edit has its image's size ({W}x{H}); give 'auto' or '{W}x{H}', "
                                 f"got {body.size!r}")
            try:
                shape = served.latents_shape(f"{W}x{H}", 1)
            except ValueError as err:
                raise ValueError(f"image: {W}x{H} pixels: {str(err).split(': ', 1)[-1]}") from None
            routes.check_size(shape, body.n, "image")
            plan.image_tokens_in = math.prod(shape)
            vae = served.engine.vae
            if mask_bytes is not None:
                alpha = read_mask_alpha(mask_bytes, "mask", gw.limits)
                if alpha.shape != (H, W):
                    raise ValueError(f"mask: a {alpha.shape[1]}x{alpha.shape[0]} mask for a {W}x{H} image; the mask "
                                     "must have the image's size")
                known, mask = encode_inpaint(vae, img, alpha != 0, shape, name="mask")  # alpha 0: regenerate
                cond = dict(known_tokens=known, known_mask=mask)
            else:
                codes = encode_pixels(vae, image=img, latents_shape=shape)
                cond = dict(cond_latents=codes, cond_noise_scale=float(body.strength))
            return routes.prepare(routes.request_of(body, shape, plan, **cond), job_id, "image")

        return await routes.answer(request, body, plan, build, "images.edits")
