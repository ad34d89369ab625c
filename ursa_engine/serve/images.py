"""``POST /v1/images/generations``: the OpenAI images route (issues 14, 23).

Body fields: ``prompt``, ``negative_prompt``, ``size`` ("WxH" pixels), ``frames``, ``n``, ``seed``,
``steps``, ``guidance``, ``guidance_trunc``, ``temperature``, ``top_k``, ``top_p``,
``response_format`` ("b64_json": PNG, or MP4 for frames > 1, base64 in JSON; "png" / "mp4": the
bytes, n = 1; "tokens": the latent tokens as JSON), ``stream`` (server-sent events: ``queued``,
``started``, ``step`` (in order), then ``result`` with the JSON body, or ``cancelled`` /
``failed``), ``request_id`` (else a random one, 128 bits; always in the ``X-Request-Id`` header),
``lora`` (an adapter the server was started with, ``--lora NAME=PATH``; this request's rows only).

Requests over the server's ``max_tokens`` (n x latent tokens, x2 rows while guided) are refused with
a 400 naming ``size``, ``frames``, ``latents_shape`` or ``n`` before anything is allocated.
"""

from __future__ import annotations

import base64
import math
import secrets
import time
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .batcher import GenerationRequest, Job
from .gateway import Gateway, error, sse
from .security import external_id


class ImageRequest(BaseModel):
    """The body of ``POST /v1/images/generations``."""

    model_config = ConfigDict(extra="forbid")
    prompt: str
    negative_prompt: str | None = None
    model: str | None = None  # accepted for OpenAI clients, ignored
    size: str | None = None
    frames: int = Field(1, ge=1, le=1024)
    latents_shape: list[int] | None = Field(None, min_length=2, max_length=3)
    n: int = Field(1, ge=1, le=64)
    seed: int | None = Field(None, ge=0, lt=2**62)
    steps: int | None = Field(None, ge=1, le=1000)
    guidance: float | None = Field(None, ge=-100, le=100)
    guidance_trunc: float = Field(0.9, ge=0, le=1)
    temperature: float = Field(1.0, gt=0, le=100)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    response_format: Literal["b64_json", "png", "mp4", "tokens"] = "b64_json"
    stream: bool = False
    request_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    lora: str | None = Field(None, pattern=r"^[A-Za-z0-9_.:-]{1,64}$")


def add_image_routes(app: FastAPI, gw: Gateway) -> None:
    """Register the images routes on ``app``."""
    served, batcher = gw.served, gw.batcher

    def size_field(body: ImageRequest, shape) -> str:
        """The field to blame for a request over ``max_tokens``: its grid when one sample is too big, else n."""
        if body.n > 1 and 2 * math.prod(shape) <= batcher.max_tokens:
            return "n"
        if body.latents_shape is not None:
            return "latents_shape"
        return "size" if body.size is not None or body.frames == 1 else "frames"

    def to_request(body: ImageRequest) -> GenerationRequest:
        """The request of a body (in the thread pool: tokenization is not cheap); sizes are checked first."""
        if body.latents_shape is not None:
            shape = tuple(body.latents_shape)
            if len(shape) == 2:
                shape = (1, *shape)
            if min(shape) < 1:
                raise ValueError(f"latents_shape: expected positive sizes, got {list(body.latents_shape)}")
        else:
            shape = served.latents_shape(body.size, body.frames)
        batcher.check_size(shape, body.n, field=size_field(body, shape))  # before any allocation
        if body.response_format in ("png", "mp4") and body.n != 1:
            raise ValueError(f"n: response_format {body.response_format!r} returns one file: n must be 1")
        if body.response_format == "png" and shape[0] != 1:
            raise ValueError("response_format: 'png' is one image: use 'mp4' or 'b64_json' for frames > 1")
        if body.response_format != "tokens" and served.engine.vae is None:
            raise ValueError("response_format: this checkpoint has no vae/: only 'tokens' can be returned")
        neg = body.negative_prompt if body.negative_prompt is not None else ""
        return GenerationRequest(
            prompt_ids=served.prompt_ids(body.prompt), negative_ids=served.prompt_ids(neg, field="negative_prompt"),
            latents_shape=shape, n=body.n, num_steps=body.steps,
            guidance_scale=served.default_guidance if body.guidance is None else body.guidance,
            guidance_trunc=body.guidance_trunc, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
            seed=secrets.randbelow(2**31) if body.seed is None else body.seed, lora=body.lora)

    def build(body: ImageRequest):
        def make(job_id: str) -> Job:
            req = to_request(body)
            try:
                return batcher.prepare(req, job_id)
            except ValueError as err:  # prepare's exact size check (guided rows) names the field the body gave
                msg = str(err)
                if msg.startswith("latents_shape:") and "(max_tokens)" in msg and body.latents_shape is None:
                    raise ValueError(size_field(body, req.latents_shape) + msg[len("latents_shape"):]) from None
                raise
        return make

    def render(job: Job, tokens, fmt: str) -> dict | Response:
        if fmt == "tokens":
            data = [{"tokens": t.tolist(), "shape": list(t.shape)} for t in tokens.cpu()]
        else:
            frames = served.frames(tokens)
            if fmt == "png":
                return Response(served.png(frames[0, 0]), media_type="image/png",
                                headers={"X-Request-Id": external_id(job.id)})
            if fmt == "mp4":
                return Response(served.mp4(frames[0]), media_type="video/mp4",
                                headers={"X-Request-Id": external_id(job.id)})
            data = []
            for f in frames:
                blob, mime = (served.png(f[0]), "image/png") if f.shape[0] == 1 else (served.mp4(f), "video/mp4")
                data.append({"b64_json": base64.b64encode(blob).decode("ascii"), "mime_type": mime})
        return {"id": external_id(job.id), "created": int(time.time()), "data": data, "seed": job.request.seed,
                "steps": job.steps, "latents_shape": list(job.shape),
                "timing": {"queued_s": round(job.t_start - job.t_submit, 4),
                           "generate_s": round(job.t_done - job.t_start, 4)}}

    def render_error(err: Exception) -> dict:
        return {"message": f"rendering the result failed: {err}", "type": "server_error", "param": None}

    async def stream(job: Job, fmt: str):
        async for name, ev in gw.events(job, cancel_on_close=True):
            if name == "done":
                try:
                    out = await run_in_threadpool(render, job, job.future.result(),
                                                  "b64_json" if fmt in ("png", "mp4") else fmt)
                except Exception as err:  # the stream still ends with a terminal event
                    yield sse("failed", {"id": ev["id"], "event": "failed", "error": render_error(err)})
                    return
                yield sse("done", ev)
                yield sse("result", out)
            else:
                yield sse(name, {k: v for k, v in ev.items() if k != "tokens"})

    @app.post("/v1/images/generations")
    async def generations(body: ImageRequest, request: Request):
        rid = {"X-Request-Id": body.request_id} if body.request_id else None
        refused = gw.check_texts({"prompt": body.prompt, "negative_prompt": body.negative_prompt}, rid) or \
            gw.check_n(body.n, rid)
        if refused is not None:
            return refused
        job = await gw.submit(request.state.owner, build(body), request_id=body.request_id)
        if isinstance(job, JSONResponse):
            return job
        rid = {"X-Request-Id": external_id(job.id)}
        if body.stream:
            return StreamingResponse(stream(job, body.response_format), media_type="text/event-stream", headers=rid)
        tokens = await gw.wait(job, request)
        if isinstance(tokens, JSONResponse):
            return tokens
        try:
            out = await run_in_threadpool(render, job, tokens, body.response_format)
        except Exception as err:  # decode / encode failed: an OpenAI-shaped 500, the server keeps serving
            return error(500, render_error(err)["message"], None, "server_error", rid)
        return out if isinstance(out, Response) else JSONResponse(out, headers=rid)
