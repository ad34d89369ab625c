"""The OpenAI images routes (issues 14, 20, 23): ``POST /v1/images/generations`` and ``POST /v1/images/edits``.

Every field of ``client.images.generate`` / ``client.images.edit`` (openai 3.63) is accepted and is
honoured, recorded, ignored or refused as :mod:`.image_schema` documents (the table); any other field
is a 400 naming it. The response is OpenAI's ``ImagesResponse`` (``created``, ``data[].b64_json``,
``background``, ``output_format``, ``quality``, ``size``, ``usage``) plus ours: ``id``, ``seed``,
``steps``, ``latents_shape``, ``timing``, ``data[].mime_type``, ``safety_identifier`` (when given).

Streaming (``stream: true``): server-sent events whose ``data:`` lines are OpenAI's events (and whose
``event:`` line repeats the type): ``image_generation.partial_image`` (edits: ``image_edit.*``) with
``partial_image_index``, ``b64_json`` (the decoded prediction x̂1 of evenly spaced steps,
:func:`~.image_schema.partial_steps`), ``size``, ``output_format``, ``quality``, ``background``,
``created_at``; then one ``image_generation.completed`` with the final image and ``usage``. A failure
or a cancel ends the stream with ``{"type": "error", "error": {...}}`` (the client raises it); a
client that disconnects cancels its job. ``n`` > 1 with ``stream`` is a 400 naming ``n`` (partial
events carry no sample index). With ``response_format: "tokens"`` the stream is ours instead:
``queued``, ``started``, ``step``..., then ``done`` and ``result`` (the JSON body) or ``cancelled`` /
``failed``; every job's per-step events also stay at ``/v1/requests/{id}/events``.

Edits (multipart as the client sends it, or JSON with base64 / data-URL ``image`` and ``mask``): one
``image`` (PNG / JPEG / WebP, on the tokenizer's grid: the output has its size); an optional ``mask``
of the image's size with an alpha channel, whose fully transparent pixels (alpha 0) are regenerated:
token-level inpainting (:func:`~ursa_engine.conditioning.encode_inpaint`: the tokens whose patch is
wholly kept hold the image's codes at every step, DESIGN §2.4). Without a mask the image conditions
the generation: its codes are frame 0, resampled at ``t = 1 - strength`` (default
:data:`~.image_schema.EDIT_STRENGTH`), then stepped like any other token (DESIGN §2.4): where sampling
starts, not a constraint (at strength 1 the image no longer matters). Uploads are decoded by
:mod:`.uploads` under the server's byte (413, the guard) and pixel (from the header: decompression
bombs) limits; prompt characters, ``n`` and per-key concurrency go through the
:class:`~.gateway.Gateway` as for every route.

Requests over the server's ``max_tokens`` (n x latent tokens, x2 rows while guided) are refused with
a 400 naming ``size``, ``frames``, ``latents_shape``, ``image`` or ``n`` before anything is allocated.
"""

from __future__ import annotations

import base64
import math
import secrets
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from .batcher import GenerationRequest, Job
from .body_fields import lora_of
from .gateway import Gateway, bad_request, error, sse
from .image_schema import ImageRequest, Output, output_of, partial_steps, quality_steps, usage
from .keymetrics import log_request
from .security import external_id


@dataclass
class Plan:
    """What a job's answer needs, fixed when the request is built."""

    out: Output
    kind: str  # the stream events' prefix: "image_generation" or "image_edit"
    text_tokens: int = 0
    image_tokens_in: int = 0
    user: str | None = None
    created: int = 0


def validation_error(exc: ValidationError, headers: dict | None = None) -> JSONResponse:
    """The 400 of a pydantic error (as the app's handler for JSON bodies: ``param`` = the field)."""
    first = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(v) for v in first.get("loc", ())) or None
    msg = first.get("msg", "invalid request")
    return error(400, f"{param}: {msg}" if param else msg, param, headers=headers)


def error_event(message: str, kind: str, code: str | None = None) -> str:
    """OpenAI's stream error event (the official client raises ``APIError`` with it)."""
    return sse("error", {"type": "error", "error": {"message": message, "type": kind, "param": None, "code": code}})


def add_image_routes(app: FastAPI, gw: Gateway) -> ImageRoutes:
    """Register ``POST /v1/images/generations`` on ``app``; returns the routes' shared machinery
    (the edits route, :func:`ursa_engine.serve.image_edits.add_edit_route`, runs on it)."""
    routes = ImageRoutes(gw)

    @app.post("/v1/images/generations")
    async def generations(body: ImageRequest, request: Request):
        return await routes.generations(body, request)

    return routes


class ImageRoutes:
    """The images routes' shared parts: building requests, answering (plain or streamed), rendering."""

    def __init__(self, gw: Gateway):
        self.gw, self.served, self.batcher = gw, gw.served, gw.batcher

    # ------------------------------------------------------------------ building
    def refused(self, body, headers: dict | None) -> JSONResponse | None:
        """The gateway's body checks of an images request: prompt characters, then ``n`` (a 400, or None)."""
        return self.gw.check_texts(body.texts, headers) or self.gw.check_n(body.n, headers)

    def steps_of(self, body, frames: int) -> tuple[int | None, int]:
        """(the request's ``num_steps``: ``steps``, else from ``quality``, else None; the resolved count)."""
        e = self.served.engine
        steps = body.steps
        if steps is None and body.quality != "auto":
            steps = quality_steps(body.quality, e.scheduler_for(None, None, frames).num_steps)
        return steps, e.scheduler_for(steps, None, frames).num_steps

    def request_of(self, body, shape, plan: Plan, **conditioning) -> GenerationRequest:
        """The batcher request of a checked body (in the thread pool: tokenizing is not cheap)."""
        served = self.served
        if plan.out.response_format != "tokens" and served.engine.vae is None:
            raise ValueError("response_format: this checkpoint has no vae/: only 'tokens' can be returned")
        steps, total = self.steps_of(body, shape[0])
        previews = ()
        if body.stream and plan.out.response_format != "tokens":
            previews = partial_steps(body.partial_images, total)
        neg = body.negative_prompt if body.negative_prompt is not None else ""
        ids = served.prompt_ids(body.prompt)
        plan.text_tokens = served.text_tokens(ids)
        return GenerationRequest(
            prompt_ids=ids, negative_ids=served.prompt_ids(neg, field="negative_prompt"), latents_shape=tuple(shape),
            n=body.n, num_steps=steps,
            guidance_scale=served.default_guidance if body.guidance is None else body.guidance,
            guidance_trunc=body.guidance_trunc, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
            seed=secrets.randbelow(2**31) if body.seed is None else body.seed, lora=lora_of(body, self.batcher.loras),
            preview_steps=previews, **conditioning)

    def generation_shape(self, body: ImageRequest, out: Output) -> tuple[tuple[int, int, int], str]:
        """The latent grid of a generation body and the field to blame when it is too big."""
        if body.latents_shape is not None:
            shape = tuple(body.latents_shape)
            shape = (1, *shape) if len(shape) == 2 else shape
            if min(shape) < 1:
                raise ValueError(f"latents_shape: expected positive sizes, got {list(body.latents_shape)}")
            return shape, "latents_shape"
        size = None if body.size in (None, "auto") else body.size
        if out.frames > 1:  # the frame count on the tokenizer's temporal grid, named as the body gave it
            try:
                self.served.latents_shape(None, out.frames)
            except ValueError as err:
                name = "frame_count" if body.frame_count is not None or body.frames == 1 else "frames"
                raise ValueError(f"{name}: {str(err).split(': ', 1)[-1]}") from None
        shape = self.served.latents_shape(size, out.frames)
        return shape, "size" if size is not None or out.frames == 1 else "frames"

    def check_size(self, shape, n: int, field: str) -> None:
        """The batcher's size check, blaming ``n`` when one sample would fit."""
        if n > 1 and 2 * math.prod(shape) <= self.batcher.max_tokens:
            field = "n"
        self.batcher.check_size(shape, n, field=field)

    def prepare(self, req: GenerationRequest, job_id: str, field: str) -> Job:
        try:
            return self.batcher.prepare(req, job_id)
        except ValueError as err:  # prepare's exact size check (guided rows) names the field the body gave
            msg = str(err)
            if msg.startswith("latents_shape:") and "(max_tokens)" in msg and field != "latents_shape":
                if req.n > 1 and 2 * math.prod(req.latents_shape) <= self.batcher.max_tokens:
                    field = "n"
                raise ValueError(field + msg[len("latents_shape"):]) from None
            raise

    # ------------------------------------------------------------------ generations
    async def generations(self, body: ImageRequest, request: Request):
        rid = {"X-Request-Id": body.request_id} if body.request_id else None
        refused = self.refused(body, rid)
        if refused is not None:
            return refused
        try:
            out = output_of(body, body.frames)
        except ValueError as err:
            return bad_request(err, rid)
        plan = Plan(out, "image_generation", user=body.end_user, created=int(time.time()))

        def build(job_id: str) -> Job:
            shape, field = self.generation_shape(body, out)
            self.check_size(shape, body.n, field)  # before any allocation
            return self.prepare(self.request_of(body, shape, plan), job_id, field)

        return await self.answer(request, body, plan, build, "images.generations")

    # ------------------------------------------------------------------ answering
    async def answer(self, request: Request, body, plan: Plan, build, route: str):
        """Submit ``build`` through the gateway, then the plain answer or the stream."""
        owner = request.state.owner
        job = await self.gw.submit(owner, build, request_id=body.request_id, user=plan.user)
        if isinstance(job, JSONResponse):
            return job
        rid = {"X-Request-Id": external_id(job.id)}
        log_request(route, external_id(job.id), owner, plan.user, n=job.request.n, shape=list(job.shape),
                    steps=job.steps, format=plan.out.fmt, stream=body.stream)
        if body.stream:
            gen = self.token_stream(job, plan) if plan.out.response_format == "tokens" else self.stream(job, plan)
            return StreamingResponse(gen, media_type="text/event-stream", headers=rid)
        tokens = await self.gw.wait(job, request)
        if isinstance(tokens, JSONResponse):
            return tokens
        try:
            out = await run_in_threadpool(self.render, job, tokens, plan)
        except Exception as err:  # decode / encode failed: an OpenAI-shaped 500, the server keeps serving
            return error(500, f"rendering the result failed: {err}", None, "server_error", rid)
        return out if isinstance(out, Response) else JSONResponse(out, headers=rid)

    # ------------------------------------------------------------------ rendering
    def encode(self, frames, out: Output) -> tuple[bytes, str]:
        """One sample's uint8 frames (F, H, W, 3) in the output format: (bytes, MIME type)."""
        if out.fmt == "gif":
            return self.served.gif(frames, out.duration_ms), "image/gif"
        if out.fmt == "mp4":
            return self.served.mp4(frames), "video/mp4"
        return self.served.image(frames[0], out.fmt, out.compression)

    def common(self, plan: Plan, size: str | None) -> dict:
        """The fields every answer and stream event of a plan repeats."""
        return {"background": "opaque", "output_format": plan.out.fmt, "quality": plan.out.quality, "size": size}

    def usage_of(self, job: Job, plan: Plan) -> dict:
        return usage(plan.text_tokens, plan.image_tokens_in, math.prod(job.shape) * job.request.n)

    def render(self, job: Job, tokens, plan: Plan) -> dict | Response:
        """The answer of a finished job: the JSON body, or the file itself (``response_format`` png / mp4)."""
        out, served = plan.out, self.served
        size = None
        if out.response_format == "tokens":
            data = [{"tokens": t.tolist(), "shape": list(t.shape)} for t in tokens.cpu()]
        else:
            frames = served.frames(tokens)  # (n, F, H, W, 3)
            size = f"{frames.shape[3]}x{frames.shape[2]}"
            if out.response_format in ("png", "mp4"):
                blob, mime = self.encode(frames[0], out)
                return Response(blob, media_type=mime, headers={"X-Request-Id": external_id(job.id)})
            data = []
            for f in frames:
                blob, mime = self.encode(f, out)
                data.append({"b64_json": base64.b64encode(blob).decode("ascii"), "mime_type": mime})
        body = {"created": plan.created, "data": data, **self.common(plan, size), "usage": self.usage_of(job, plan),
                "id": external_id(job.id), "seed": job.request.seed, "steps": job.steps,
                "latents_shape": list(job.shape),
                "timing": {"queued_s": round(job.t_start - job.t_submit, 4),
                           "generate_s": round(job.t_done - job.t_start, 4)}}
        if out.response_format == "tokens":
            body["output_format"] = "tokens"
        if plan.user:
            body["safety_identifier"] = plan.user
        return body

    def first_image(self, tokens, plan: Plan) -> tuple[str, str]:
        """(base64 of sample 0's first frame in the output format, its "WxH" size) of tokens (n, T, h, w)."""
        frames = self.served.frames(tokens[:1])
        blob, _ = self.served.image(frames[0, 0], plan.out.fmt, plan.out.compression)
        return base64.b64encode(blob).decode("ascii"), f"{frames.shape[3]}x{frames.shape[2]}"

    # ------------------------------------------------------------------ streams
    async def stream(self, job: Job, plan: Plan):
        """OpenAI's image stream of a job (see the module docstring)."""
        prefix, index = plan.kind, 0
        events = self.gw.events(job, cancel_on_close=True)
        try:
            async for name, ev in events:
                if name == "step" and "tokens" in ev:
                    try:
                        b64, size = await run_in_threadpool(self.first_image, ev["tokens"], plan)
                    except Exception as err:  # the stream still ends with a terminal event (and cancels the job)
                        yield error_event(f"rendering a partial image failed: {err}", "server_error")
                        return
                    yield sse(f"{prefix}.partial_image", {
                        "type": f"{prefix}.partial_image", "b64_json": b64, "partial_image_index": index,
                        "created_at": int(time.time()), **self.common(plan, size), "id": ev["id"], "step": ev["step"]})
                    index += 1
                elif name == "done":
                    try:
                        b64, size = await run_in_threadpool(self.first_image, job.future.result(), plan)
                    except Exception as err:
                        yield error_event(f"rendering the result failed: {err}", "server_error")
                        return
                    done = {"type": f"{prefix}.completed", "b64_json": b64, "created_at": int(time.time()),
                            **self.common(plan, size), "usage": self.usage_of(job, plan), "id": ev["id"],
                            "seed": job.request.seed, "steps": job.steps}
                    if plan.user:
                        done["safety_identifier"] = plan.user
                    yield sse(f"{prefix}.completed", done)
                elif name in ("cancelled", "failed"):
                    kind = "cancelled" if name == "cancelled" else "server_error"
                    yield error_event(f"request {ev['id']} {name}: {ev.get('message', name)}", kind, name)
        finally:
            await events.aclose()

    async def token_stream(self, job: Job, plan: Plan):
        """Our per-step stream (``response_format: "tokens"``): the job's events, then ``result``."""
        events = self.gw.events(job, cancel_on_close=True)
        try:
            async for name, ev in events:
                if name == "done":
                    try:
                        out = await run_in_threadpool(self.render, job, job.future.result(), plan)
                    except Exception as err:
                        yield sse("failed", {"id": ev["id"], "event": "failed", "error": {
                            "message": f"rendering the result failed: {err}", "type": "server_error", "param": None}})
                        return
                    yield sse("done", ev)
                    yield sse("result", out)
                else:
                    yield sse(name, {k: v for k, v in ev.items() if k != "tokens"})
        finally:
            await events.aclose()

