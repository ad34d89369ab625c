"""The OpenAI videos API on the batcher (issue 23 item 4; issue 20 item 2's video conditioning).

Routes
------
- ``POST /v1/videos`` (multipart as the official client sends it, or JSON): ``prompt``, ``model``
  (accepted; the served checkpoint answers, or the LoRA adapter of that name from ``/v1/models``),
  ``seconds`` (default "4"; any positive number, mapped to frames as :mod:`.video_inputs` says:
  12 fps onto the tokenizer's temporal grid), ``size`` ("WxH" on the tokenizer's grid, default the
  authors' "512x320", else a 400 naming ``size``), ``input_reference`` (an image file, or
  ``{"image_url": "data:..."}``: image-to-video, frame 0 conditioned; URLs and ``file_id`` get a 400
  naming it). Our extensions: ``negative_prompt``, ``seed``, ``steps``, ``guidance``,
  ``guidance_trunc``, ``temperature``, ``top_k``, ``top_p``, ``motion`` (URSA's ``motion=X,``
  prompt prefix), ``cond_noise_scale`` / ``freeze_cond`` (for the conditioning frames), ``lora``;
  ``user`` / ``safety_identifier`` are recorded in the per-key metrics, as the images routes do.
  Answers at once with the ``video`` object, ``status: "queued"``; the job runs on the batcher
  through :meth:`Gateway.submit` (keys, namespaces, per-key concurrency, queue, drain, sizes).
- ``GET /v1/videos/{id}``: the object; ``progress`` is the job's step / steps in % (99 while the
  tokens are decoded and encoded, 100 once ``completed``); header ``openai-poll-after-ms``.
- ``GET /v1/videos``: the caller's key's videos only, ``order`` (by creation, default ``desc``),
  ``limit`` (1..100, default 20), ``after`` (an id of the previous page); the cursor page
  ``{"object": "list", "data", "first_id", "last_id", "has_more"}``.
- ``DELETE /v1/videos/{id}``: cancels a queued or running job (its rows leave at the next step)
  and drops the stored result: ``{"id", "object": "video.deleted", "deleted": true}``; then 404.
- ``GET /v1/videos/{id}/content?variant=``: ``video`` (default) the MP4 (H.264, 12 fps),
  ``thumbnail`` the first frame as a **PNG**, ``spritesheet`` a 400 naming ``variant`` (not
  offered), our ``tokens`` the stored latent tokens as JSON ``{"shape", "tokens"}``. 409 before
  the video is completed (or when it failed).
- ``POST /v1/videos/extensions`` (the client's ``videos.extend``): ``prompt``, ``seconds`` (the
  *new* part), ``video`` (``{"id"}`` of a completed video of the same key, sent by the client as
  ``video[id]``, or an uploaded MP4 / WebM), the extensions above (``cond_noise_scale`` default
  0.1, the authors' README loop). URSA's extension: the new window is conditioned on the last
  latent frames of the given video; the result is the stitched video and its ``seconds`` the total
  (exactly which frames condition and what the MP4 holds: :mod:`.video_inputs`).

Results live in a :class:`~ursa_engine.serve.store.ResultStore` bounded by ``max_stored_results``,
``max_stored_bytes`` and ``result_ttl_s`` (``expires_at``), visible only to the key that made them
(another key's id is a 404, as an unknown one; an expired or dropped one is a 404 that says so).
A video that fails (generation, rendering, a result over ``max_stored_bytes``, a cancel by the
server's drain) is ``status: "failed"`` with ``error: {code, message}``. Uploads are bounded by
``max_upload_bytes`` (413, the Guard), ``max_image_pixels`` and ``max_video_frames`` (400); a video
to extend also by the tokenizer's grid, ``max_tokens`` and a decoded-bytes budget, from its stream
header before a frame is decoded (:func:`.video_inputs.upload_bounds`); the returned video too: more
than ``max_video_frames`` frames is a 400 naming ``seconds``.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from . import video_inputs as vi
from .batcher import Cancelled, GenerationRequest, Job
from .body_fields import lora_of
from .gateway import Gateway, bad_request, error
from .security import new_id
from .store import Entry, Gone, ResultStore, TooLarge
from .uploads import b64_bytes, read_form, read_image, read_video
from .video_inputs import FPS, CreateBody, ExtendBody, Plan

POLL_AFTER_MS = 250  # the poll interval suggested to the client (openai-poll-after-ms)


@dataclass(eq=False)
class VideoRecord:
    """A video's description (the store entry's ``meta``); ``job`` is dropped once it ended."""

    prompt: str
    model: str
    plan: Plan
    steps: int
    job: Job | None = None
    error: dict | None = None
    progress_at_end: int = 0
    covers: bool = True  # the stored tokens cover the whole video (else: an upload's frames come first)


def reference_bytes(ref: dict, limits) -> bytes:
    """The image bytes of an ``input_reference`` object (data URLs only: this server fetches nothing)."""
    unknown = set(ref) - {"image_url", "file_id"}
    if unknown:
        raise ValueError(f"input_reference: unknown key(s) {sorted(unknown)} (expected image_url or file_id)")
    url = ref.get("image_url")
    if isinstance(url, str) and url.startswith("data:"):
        return b64_bytes(url, "input_reference", limits)
    if ref.get("file_id") is not None:
        raise ValueError("input_reference: this server has no files API (file_id); upload the image as "
                         "input_reference or give a data: URL in image_url")
    raise ValueError("input_reference: this server does not fetch URLs; upload the image as input_reference or "
                     "give a base64 data: URL (data:image/png;base64,...) in image_url")


def add_video_routes(app: FastAPI, gw: Gateway) -> None:
    """Register the videos routes on ``app`` (their store is ``app.state.video_store``)."""
    served, batcher, limits = gw.served, gw.batcher, gw.limits
    store = ResultStore.from_limits(limits)
    app.state.video_store = store
    watchers: set = set()

    # ------------------------------------------------------------------ helpers
    def prompt_ids(text: str, motion: float | None):
        if motion is None:
            return served.prompt_ids(text)
        if served.digits or served.engine.tokenizer is None:
            raise ValueError("motion: applies to text prompts of video checkpoints with a tokenizer/")
        try:
            return served.engine.encode_prompts([text], motion=motion)[0]
        except ValueError as err:
            raise ValueError(str(err).replace("prompt_ids:", "prompt:", 1)) from None

    def request_of(body, plan: Plan, **cond) -> GenerationRequest:
        neg = body.negative_prompt if body.negative_prompt is not None else ""
        return GenerationRequest(
            prompt_ids=prompt_ids(body.prompt, body.motion),
            negative_ids=served.prompt_ids(neg, field="negative_prompt"), latents_shape=tuple(plan.shape), n=1,
            num_steps=body.steps,
            guidance_scale=served.default_guidance if body.guidance is None else body.guidance,
            guidance_trunc=body.guidance_trunc, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
            seed=plan.seed, lora=lora_of(body, batcher.loras), **cond)

    def prepare(req: GenerationRequest, job_id: str, blame) -> Job:
        """The batcher's job; a grid over ``max_tokens`` is the ValueError ``blame(rows)`` returns
        (``rows``: the sample's forward rows at its peak)."""
        try:
            batcher.check_size(req.latents_shape, 1)
            return batcher.prepare(req, job_id)
        except ValueError as err:
            if str(err).startswith("latents_shape:") and "(max_tokens)" in str(err):
                rows = vi.guided_rows(req.guidance_scale, req.guidance_trunc)
                if rows * math.prod(req.latents_shape) <= batcher.max_tokens:  # refused at more rows than guessed
                    rows += 1
                raise blame(rows) from None
            raise

    def extension_too_large(req: GenerationRequest):
        """An extension over ``max_tokens``: ``video`` when one frame of its size is already over (the
        size is the given video's), else ``seconds`` (the window grows with it)."""
        def blame(rows: int) -> ValueError:
            T, h, w = req.latents_shape
            field = "video" if rows * h * w > batcher.max_tokens else "seconds"
            return ValueError(f"{field}: the window of {T}x{h}x{w} latent tokens needs {rows} rows x {T * h * w} = "
                              f"{rows * T * h * w} token-rows per step, over this server's limit of "
                              f"{batcher.max_tokens} (max_tokens)")
        return blame

    def lookup(owner: str, video_id: str, param: str = "video_id") -> Entry | JSONResponse:
        try:
            return store.get(owner, video_id)
        except Gone as err:
            return error(404, f"{param}: {err}", param)
        except KeyError:
            return error(404, f"{param}: no video {video_id!r}", param)

    def status_of(entry: Entry) -> tuple[str, int]:
        rec: VideoRecord = entry.meta
        if entry.terminal:
            return ("completed", 100) if entry.payload is not None else ("failed", rec.progress_at_end)
        job = rec.job
        if job is None or job.status == "queued":
            return "queued", 0
        if job.status == "running":
            return "in_progress", min(99, int(100 * job.k / max(1, job.steps)))
        return "in_progress", 99  # done: decoding and encoding; failed / cancelled: the watcher ends it now

    def video_object(entry: Entry) -> dict:
        rec: VideoRecord = entry.meta
        plan = rec.plan
        status, progress = status_of(entry)
        return {"id": entry.key, "object": "video", "created_at": int(entry.created), "status": status,
                "progress": progress, "model": rec.model, "seconds": plan.seconds, "size": plan.size,
                "prompt": rec.prompt, "error": rec.error if status == "failed" else None,
                "completed_at": int(entry.finished) if entry.terminal else None,
                "expires_at": int(entry.expires) if entry.terminal else None, "remixed_from_video_id": None,
                # our extensions
                "frames": plan.frames, "fps": FPS, "seed": plan.seed, "steps": rec.steps,
                "latents_shape": list(plan.shape), "extended_from": plan.extended_from}

    def answer(entry: Entry) -> JSONResponse:
        return JSONResponse(video_object(entry), headers={"openai-poll-after-ms": str(POLL_AFTER_MS)})

    def render(plan: Plan, tokens) -> tuple[dict, bool]:
        full, frames, covers = vi.stitch(served, plan, tokens[:1])
        return {"tokens": full, "video": served.mp4(frames, fps=FPS), "thumbnail": served.png(frames[0])}, covers

    async def watch(owner: str, video_id: str, rec: VideoRecord, job: Job) -> None:
        """Wait for the job, render and store its result (or record why it failed); then let the
        source's tokens / frames go (they are not part of the stored bytes)."""
        try:
            await settle(owner, video_id, rec, job)
        finally:
            rec.plan.source_tokens = rec.plan.source_frames = None

    async def settle(owner: str, video_id: str, rec: VideoRecord, job: Job) -> None:
        def fail(code: str, message: str) -> None:
            rec.error = {"code": code, "message": message}
            rec.progress_at_end = min(99, int(100 * job.k / max(1, job.steps)))
            rec.job = None
            store.fail(owner, video_id)

        try:
            tokens = await asyncio.wrap_future(job.future)
        except Cancelled as err:
            return fail("cancelled", str(err) or "the video job was cancelled")
        except Exception as err:
            return fail("generation_failed", f"generation failed: {err}")
        try:
            payload, rec.covers = await run_in_threadpool(render, rec.plan, tokens)
        except Exception as err:
            return fail("render_failed", f"rendering the video failed: {err}")
        try:
            store.finish(owner, video_id, payload)
        except TooLarge as err:
            return fail("result_too_large", str(err))
        rec.job = None

    async def start(request: Request, make, body) -> JSONResponse:
        """Submit through the gateway, record the video, watch its job; the queued object."""
        owner = request.state.owner
        video_id = f"video_{new_id()}"
        plans: dict = {}

        def build(job_id: str) -> Job:
            job, plans["plan"] = make(job_id)
            return job

        job = await gw.submit(owner, build, request_id=video_id, user=body.end_user)
        if isinstance(job, JSONResponse):
            return job
        model = job.request.lora or served.name
        rec = VideoRecord(prompt=body.prompt, model=model, plan=plans["plan"], steps=job.steps, job=job)
        entry = store.add(owner, video_id, rec)
        task = asyncio.get_running_loop().create_task(watch(owner, video_id, rec, job))
        watchers.add(task)
        task.add_done_callback(watchers.discard)
        return answer(entry)

    # ------------------------------------------------------------------ routes
    def documented(model) -> dict:  # the body's schema in /openapi.json (the route reads forms and JSON itself)
        schema = model.model_json_schema()
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema},
                                                              "multipart/form-data": {"schema": schema}}}}

    @app.post("/v1/videos", openapi_extra=documented(CreateBody))
    async def create_video(request: Request):
        try:
            data, files = await read_form(request, ("input_reference",))
            if "input_reference" in files and "input_reference" in data:
                raise ValueError("input_reference: give a file or an object, not both")
            body = vi.parse(CreateBody, data)
            vi.check_seconds(vi.seconds_of(body.seconds), 1, limits)  # before admission: cheap, bounded
        except ValueError as err:
            return bad_request(err)
        refused = gw.check_texts(body.texts)
        if refused is not None:
            return refused
        upload = files["input_reference"][0] if "input_reference" in files else None

        def make(job_id: str):
            image = None
            if upload is not None:
                image = read_image(upload, "input_reference", limits)
            elif body.input_reference is not None:
                image = read_image(reference_bytes(body.input_reference, limits), "input_reference", limits)
            plan = vi.new_video_plan(served, body, limits, image)
            vae = served.engine.vae
            cond = {}
            if image is not None:
                cond = dict(cond_latents=served.engine.encode_condition(image=image, latents_shape=plan.shape),
                            cond_noise_scale=body.cond_noise_scale or 0.0, freeze_cond=body.freeze_cond)
            elif body.cond_noise_scale is not None or body.freeze_cond:
                name = "cond_noise_scale" if body.cond_noise_scale is not None else "freeze_cond"
                raise ValueError(f"{name}: applies to input_reference, which is not given")
            req = request_of(body, plan, **cond)
            seconds = vi.seconds_of(body.seconds)
            return prepare(req, job_id, lambda rows: vi.too_large(vae, plan, seconds, rows, batcher.max_tokens)), plan

        return await start(request, make, body)

    @app.post("/v1/videos/extensions", openapi_extra=documented(ExtendBody))
    async def extend_video(request: Request):
        owner = request.state.owner
        try:
            data, files = await read_form(request, ("video",))
            upload = files["video"][0] if "video" in files else None
            body = vi.parse(ExtendBody, data)
            ref = body.video
            if (upload is None) == (ref is None):
                raise ValueError("video: give the video to extend: an uploaded file, or {'id': ...} of a completed "
                                 "video (the client sends video[id])")
            if ref is not None and (set(ref) != {"id"} or not isinstance(ref["id"], str)):
                raise ValueError(f"video: expected {{'id': '<video id>'}}, got keys {sorted(ref)}")
            vi.check_seconds(vi.seconds_of(body.seconds), 1, limits)  # the source's frames are checked later
        except ValueError as err:
            return bad_request(err)
        refused = gw.check_texts(body.texts)
        if refused is not None:
            return refused
        source = None
        if ref is not None:
            source = lookup(owner, ref["id"], "video")
            if isinstance(source, JSONResponse):
                return source
            status, _ = status_of(source)
            if status != "completed":
                return error(400, f"video: {ref['id']!r} is {status}: only a completed video can be extended", "video")

        def make(job_id: str):
            guidance = served.default_guidance if body.guidance is None else body.guidance
            check, max_bytes = vi.upload_bounds(vi.video_tokenizer(served), limits, batcher.max_tokens,
                                                vi.guided_rows(guidance, body.guidance_trunc))
            if source is not None and source.meta.covers:
                src = {"id": source.key, "seconds": source.meta.plan.seconds, "size": source.meta.plan.size}
                plan = vi.token_extension_plan(served, body, limits, source.payload["tokens"], src)
                cond = plan.source_tokens[:, plan.source_tokens.shape[1] - plan.cond:]
            else:
                if source is not None:  # extended from an upload: its MP4's frames (lossy) are the source
                    frames, _ = read_video(source.payload["video"], "video", limits, check=check, max_bytes=max_bytes)
                    plan = vi.pixel_extension_plan(served, body, limits, frames, source.key,
                                                   vi.seconds_of(source.meta.plan.seconds))
                else:
                    frames, _ = read_video(upload, "video", limits, check=check, max_bytes=max_bytes)
                    plan = vi.pixel_extension_plan(served, body, limits, frames, None)
                cond = served.engine.encode_condition(video=plan.source_frames, latents_shape=plan.shape,
                                                      num_cond_frames=plan.cond)
            req = request_of(body, plan, cond_latents=cond, cond_noise_scale=vi.extension_noise(body),
                             freeze_cond=body.freeze_cond)
            return prepare(req, job_id, extension_too_large(req)), plan

        return await start(request, make, body)

    @app.get("/v1/videos")
    async def list_videos(request: Request, after: str | None = None, limit: str = "20", order: str = "desc"):
        if order not in ("asc", "desc"):
            return error(400, f"order: expected 'asc' or 'desc', got {order!r}", "order")
        try:
            n = int(limit)
        except ValueError:
            n = 0
        if not 1 <= n <= 100:
            return error(400, f"limit: expected an int in [1, 100], got {limit!r}", "limit")
        entries = store.entries(request.state.owner)
        if order == "desc":
            entries.reverse()
        if after is not None:
            keys = [e.key for e in entries]
            if after not in keys:
                return error(400, f"after: no video {after!r} in this list (it may have expired)", "after")
            entries = entries[keys.index(after) + 1:]
        page = [video_object(e) for e in entries[:n]]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(entries) > n}

    @app.get("/v1/videos/{video_id}")
    async def retrieve_video(video_id: str, request: Request):
        entry = lookup(request.state.owner, video_id)
        return entry if isinstance(entry, JSONResponse) else answer(entry)

    @app.delete("/v1/videos/{video_id}")
    async def delete_video(video_id: str, request: Request):
        owner = request.state.owner
        entry = lookup(owner, video_id)
        if isinstance(entry, JSONResponse):
            return entry
        store.pop(owner, video_id)
        job = entry.meta.job
        if job is not None:
            batcher.cancel(job.id)  # its rows leave at the next step boundary
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    @app.get("/v1/videos/{video_id}/content")
    async def video_content(video_id: str, request: Request, variant: str = "video"):
        if variant == "spritesheet":
            return error(400, "variant: 'spritesheet' is not offered by this server; use 'video' (MP4) or "
                              "'thumbnail' (PNG of the first frame)", "variant")
        if variant not in ("video", "thumbnail", "tokens"):
            return error(400, f"variant: expected 'video', 'thumbnail' or 'tokens', got {variant!r}", "variant")
        entry = lookup(request.state.owner, video_id)
        if isinstance(entry, JSONResponse):
            return entry
        status, _ = status_of(entry)
        if status != "completed":
            return error(409, f"video_id: {video_id!r} is {status}: its content exists once it is completed",
                         "video_id")
        p = entry.payload
        if variant == "video":
            return Response(p["video"], media_type="video/mp4")
        if variant == "thumbnail":
            return Response(p["thumbnail"], media_type="image/png")
        t = p["tokens"]
        return {"id": video_id, "shape": list(t.shape), "tokens": t.tolist(), "created": int(time.time())}
