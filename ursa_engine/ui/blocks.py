"""The Gradio page of ``ursa-engine ui`` (issue 21): four tabs over one :class:`~.handlers.Studio`.

Tabs: text -> image, text -> video, image -> video (an upload as latent frame 0) and video
extension (the last frames of an uploaded video). Each has prompt, negative prompt, size, steps,
guidance, seed (and "randomize"), frames and motion score for video checkpoints; a per-step
progress bar fed by the batcher's ``step`` events; the result as an image or a video player with a
download button. Named API endpoints (``gradio_client``): ``/generate_image``, ``/generate_video``,
``/image_to_video`` and ``/extend_video``, parameters documented in their docstrings (Gradio reads
the ``Parameters:`` lines, which is why these few docstrings are not numpy-style).

Refusals are ``gr.Error`` toasts with the handler's one-line message (never a traceback).
"""

from __future__ import annotations

import inspect
import threading

import anyio
import gradio as gr

from .handlers import MAX_STEPS, Studio, UIError, conditioning_available

CSS = """
.ursa-out img, .ursa-out video, .ursa-in img { width: 100% !important; height: 100% !important; object-fit: contain;
    image-rendering: pixelated; }
footer { display: none !important; }
"""


class KeyLogin:
    """Gradio's login check when the server has API keys: the password is an API key.

    A user name is bound to the key it first logged in with (another key under that name is
    refused), so a session's jobs count against its key's ``max_concurrent_per_key`` and live in
    its namespace, as over HTTP."""

    def __init__(self, studio: Studio):
        self.studio, self.owners, self._lock = studio, {}, threading.Lock()

    def __call__(self, username: str, password: str) -> bool:
        try:
            owner = self.studio.owner(password)
        except UIError:
            return False
        with self._lock:
            return self.owners.setdefault(username, owner) == owner

    def owner_of(self, request: gr.Request | None) -> str:
        if not self.studio.limits.api_keys:
            return "anon"
        owner = self.owners.get(getattr(request, "username", None))
        if owner is None:
            raise UIError("api_key: log in with an API key first")
        return owner


def _progress(progress: gr.Progress):
    def report(step: int, steps: int) -> None:
        progress((step, steps), desc="denoising", unit="steps")

    return report


class Sessions:
    """The stop flags of each browser session's running clicks (Gradio's session hash -> flags): closing
    or reloading the page (Gradio's ``unload``) sets them, so the session's batcher jobs are cancelled."""

    def __init__(self):
        self._lock, self._flags = threading.Lock(), {}

    def add(self, key, flag: threading.Event) -> None:
        with self._lock:
            self._flags.setdefault(key, set()).add(flag)

    def discard(self, key, flag: threading.Event) -> None:
        with self._lock:
            flags = self._flags.get(key, set())
            flags.discard(flag)
            if not flags:
                self._flags.pop(key, None)

    def close(self, key) -> None:
        with self._lock:
            for flag in self._flags.pop(key, ()):
                flag.set()


def on_click(login: KeyLogin, sessions: Sessions):
    """Decorator: ``fn(*inputs, call)`` (``call``: the Studio keywords ``owner``, ``progress``,
    ``cancelled``) as a Gradio handler ``(*inputs, request, progress)``, with ``fn``'s docstring (the
    API page reads it).

    ``fn`` runs in a worker thread; a :class:`UIError` becomes a ``gr.Error`` toast (no traceback). The
    click's job is cancelled in the batcher when Gradio cancels the event (``/cancel``: a client's
    ``job.cancel()``, a ``cancels=`` event) or the page is closed (:class:`Sessions`)."""

    def wrap(fn):
        async def handler(*args):
            *inputs, request, progress = args
            stop, key = threading.Event(), getattr(request, "session_hash", None)
            sessions.add(key, stop)
            try:
                call = {"owner": login.owner_of(request), "progress": _progress(progress), "cancelled": stop.is_set}
                return await anyio.to_thread.run_sync(lambda: fn(*inputs, call), abandon_on_cancel=True)
            except UIError as err:
                raise gr.Error(str(err), print_exception=False) from None
            finally:  # cancelled (the thread then sees the flag within 0.25 s) or done
                stop.set()
                sessions.discard(key, stop)

        params = list(inspect.signature(fn).parameters.values())[:-1]
        handler.__signature__ = inspect.Signature(params + [
            inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=gr.Request),
            inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=gr.Progress())])
        handler.__annotations__ = {"request": gr.Request}
        handler.__name__, handler.__qualname__, handler.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
        return handler

    return wrap


def image_upload(**kwargs) -> gr.Image:
    """A ``gr.Image`` whose upload reaches the handler as its file path, not decoded by Gradio: the
    server's reader (:meth:`Studio.read_image`, ``max_image_pixels``) decodes it, so an unreadable or
    oversized file is one message naming ``image``, never Gradio's preprocessing error. (An instance
    override: a ``gr.Image`` subclass would make Gradio write a ``.pyi`` stub beside this module.)"""
    image = gr.Image(type="filepath", **kwargs)
    image.preprocess = lambda payload: None if payload is None else str(payload.path)
    return image


def build_blocks(studio: Studio, login: KeyLogin | None = None) -> gr.Blocks:
    """The page (a ``gr.Blocks``; queue set up for many sessions at once)."""
    login = login or KeyLogin(studio)
    served, e = studio.served, studio.served.engine
    W, H = served.default_size
    steps0, guidance0, stride = e.scheduler.num_steps, served.default_guidance, studio.stride
    video_model = not served.digits
    conditioning = conditioning_available()
    sessions = Sessions()
    click = on_click(login, sessions)

    @click
    def generate_image(prompt, negative_prompt, width, height, steps, guidance, seed, randomize_seed, call):
        """Text to image: one sample through the server's step-level batcher.

        Parameters:
            prompt: the text prompt (the digits model: one digit 0-9, e.g. "7")
            negative_prompt: the unconditional prompt of classifier-free guidance ("" for none)
            width: image width in pixels, a multiple of the tokenizer's stride
            height: image height in pixels, a multiple of the tokenizer's stride
            steps: denoising steps
            guidance: classifier-free guidance scale (1 turns guidance off)
            seed: the sample's seed (same seed, same image)
            randomize_seed: ignore `seed` and draw one
        Returns:
            the image (PNG) and the seed used
        """
        return studio.generate_image(prompt, negative_prompt, width, height, steps, guidance, seed, randomize_seed,
                                     **call)

    @click
    def generate_video(prompt, negative_prompt, width, height, frames, steps, guidance, seed, randomize_seed,
                       motion, call):
        """Text to video: one clip through the server's step-level batcher.

        Parameters:
            prompt: the text prompt (the digits model: one digit 0-9)
            negative_prompt: the unconditional prompt of classifier-free guidance ("" for none)
            width: frame width in pixels, a multiple of the tokenizer's stride
            height: frame height in pixels, a multiple of the tokenizer's stride
            frames: pixel frames (video tokenizers of temporal stride s take 1 + s*k)
            steps: denoising steps
            guidance: classifier-free guidance scale
            seed: the sample's seed
            randomize_seed: ignore `seed` and draw one
            motion: motion score of video checkpoints (the "motion=X, " prompt prefix; ignored by the digits model)
        Returns:
            the video (MP4, H.264) and the seed used
        """
        return studio.generate_video(prompt, negative_prompt, width, height, frames, steps, guidance, seed,
                                     randomize_seed, motion, **call)

    @click
    def image_to_video(image, prompt, negative_prompt, frames, steps, guidance, seed, randomize_seed, motion, call):
        """Image to video: the uploaded image is the first frame; the size is the image's.

        Parameters:
            image: the first frame (PNG / JPEG / WebP; its size, a multiple of the tokenizer's stride, is the video's)
            prompt: the text prompt
            negative_prompt: the unconditional prompt ("" for none)
            frames: pixel frames of the clip
            steps: denoising steps
            guidance: classifier-free guidance scale
            seed: the sample's seed
            randomize_seed: ignore `seed` and draw one
            motion: motion score of video checkpoints
        Returns:
            the video (MP4) and the seed used
        """
        if image is None:
            raise UIError("image: upload an image first")
        return studio.generate_video(prompt, negative_prompt, None, None, frames, steps, guidance, seed,
                                     randomize_seed, motion, image=image, **call)

    @click
    def extend_video(video, prompt, negative_prompt, frames, cond_frames, steps, guidance, seed, randomize_seed,
                     motion, call):
        """Video extension: a new clip that starts from the last frames of the uploaded video.

        Parameters:
            video: the video to continue (MP4 / WebM); the new clip has its size
            prompt: the text prompt
            negative_prompt: the unconditional prompt ("" for none)
            frames: pixel frames of the new clip (the kept frames included)
            cond_frames: frames of the upload's end that start the new clip (1 + s*k for temporal stride s)
            steps: denoising steps
            guidance: classifier-free guidance scale
            seed: the sample's seed
            randomize_seed: ignore `seed` and draw one
            motion: motion score of video checkpoints
        Returns:
            the upload followed by the new frames (MP4) and the seed used
        """
        if video is None:
            raise UIError("video: upload a video first")
        return studio.generate_video(prompt, negative_prompt, None, None, frames, steps, guidance, seed,
                                     randomize_seed, motion, video=video, cond_frames=cond_frames, **call)

    def common(tab: str, *, size: bool = True, frames: bool = False):
        """The shared inputs of a tab: prompt, negative prompt, (size), (frames), steps, guidance, seed."""
        prompt = gr.Textbox(label="Prompt", elem_id=f"{tab}-prompt", lines=2,
                            placeholder="a digit 0-9, e.g. 7" if served.digits else "describe the picture")
        negative = gr.Textbox(label="Negative prompt", elem_id=f"{tab}-negative", value=studio.default_negative)
        out = {"prompt": prompt, "negative": negative}
        if size:
            w, h = studio.video_size if frames else (W, H)
            with gr.Row():
                out["width"] = gr.Number(label="Width (px)", value=w, precision=0, step=stride, elem_id=f"{tab}-width",
                                         info=f"a multiple of {stride}")
                out["height"] = gr.Number(label="Height (px)", value=h, precision=0, step=stride,
                                          elem_id=f"{tab}-height", info=f"a multiple of {stride}")
        if frames:
            out["frames"] = gr.Number(label="Frames", value=studio.default_frames, precision=0,
                                      elem_id=f"{tab}-frames")
        out["steps"] = gr.Slider(1, MAX_STEPS, value=steps0, step=1, label="Steps", elem_id=f"{tab}-steps")
        out["guidance"] = gr.Slider(0, 20, value=guidance0, step=0.5, label="Guidance", elem_id=f"{tab}-guidance")
        with gr.Row():
            out["seed"] = gr.Number(label="Seed", value=0, precision=0, elem_id=f"{tab}-seed")
            out["randomize"] = gr.Checkbox(label="Randomize seed", value=False, elem_id=f"{tab}-randomize")
        if frames:
            out["motion"] = gr.Slider(0, 10, value=9, step=0.5, label="Motion score", visible=video_model,
                                      elem_id=f"{tab}-motion")
        return out

    def outputs(tab: str, video: bool):
        if video:
            result = gr.Video(label="Result", format="mp4", elem_id=f"{tab}-out", elem_classes="ursa-out",
                              buttons=["download"], interactive=False)
        else:
            result = gr.Image(label="Result", format="png", type="numpy", elem_id=f"{tab}-out",
                              elem_classes="ursa-out", buttons=["download"], interactive=False, height=320)
        return result, gr.Number(label="Seed used", elem_id=f"{tab}-seed-used", interactive=False, precision=0)

    with gr.Blocks(title="ursa-engine") as blocks:
        gr.Markdown(f"## ursa-engine · {served.name}\nModel on `{e.device}`; requests from every open page join "
                    f"one step-level batch ({studio.batcher.policy}, up to {studio.batcher.max_rows} rows a step): "
                    "your result depends only on your own settings and seed.")
        with gr.Tabs():
            with gr.Tab("Text → Image", id="t2i"):
                with gr.Row():
                    with gr.Column():
                        f = common("t2i")
                        run = gr.Button("Generate", variant="primary", elem_id="t2i-run")
                    with gr.Column():
                        result, used = outputs("t2i", video=False)
                run.click(generate_image, [f["prompt"], f["negative"], f["width"], f["height"], f["steps"],
                                           f["guidance"], f["seed"], f["randomize"]], [result, used],
                          api_name="generate_image", show_progress_on=result)
            with gr.Tab("Text → Video", id="t2v"):
                with gr.Row():
                    with gr.Column():
                        f = common("t2v", frames=True)
                        run = gr.Button("Generate", variant="primary", elem_id="t2v-run")
                    with gr.Column():
                        result, used = outputs("t2v", video=True)
                run.click(generate_video, [f["prompt"], f["negative"], f["width"], f["height"], f["frames"],
                                           f["steps"], f["guidance"], f["seed"], f["randomize"], f["motion"]],
                          [result, used], api_name="generate_video", show_progress_on=result)
            with gr.Tab("Image → Video", id="i2v"):
                if not conditioning:
                    gr.Markdown("**Not available on this server**: its batcher takes text prompts only "
                                "(no conditioning frames).", elem_id="i2v-unavailable")
                with gr.Row(visible=conditioning):
                    with gr.Column():
                        w0, h0 = studio.video_size
                        image = image_upload(label=f"First frame (resized and centre-cropped to {w0}x{h0})",
                                             sources=["upload", "clipboard"], elem_id="i2v-image",
                                             elem_classes="ursa-in", height=240)
                        f = common("i2v", size=False, frames=True)
                        run = gr.Button("Generate", variant="primary", elem_id="i2v-run")
                    with gr.Column():
                        result, used = outputs("i2v", video=True)
                run.click(image_to_video, [image, f["prompt"], f["negative"], f["frames"], f["steps"], f["guidance"],
                                           f["seed"], f["randomize"], f["motion"]], [result, used],
                          api_name="image_to_video", show_progress_on=result)
            with gr.Tab("Extend a video", id="extend"):
                if not conditioning:
                    gr.Markdown("**Not available on this server**: its batcher takes text prompts only "
                                "(no conditioning frames).", elem_id="extend-unavailable")
                with gr.Row(visible=conditioning):
                    with gr.Column():
                        video = gr.Video(label="Video to continue", sources=["upload"], elem_id="extend-video",
                                         elem_classes="ursa-in", height=240)
                        f = common("extend", size=False, frames=True)
                        cond = gr.Number(label="Frames kept (the upload's last)", value=studio.default_cond_frames,
                                         precision=0, elem_id="extend-cond")
                        run = gr.Button("Generate", variant="primary", elem_id="extend-run")
                    with gr.Column():
                        result, used = outputs("extend", video=True)
                run.click(extend_video, [video, f["prompt"], f["negative"], f["frames"], cond, f["steps"],
                                         f["guidance"], f["seed"], f["randomize"], f["motion"]], [result, used],
                          api_name="extend_video", show_progress_on=result)

        def closed(request: gr.Request):  # the page was closed or reloaded: its clicks' jobs are cancelled
            sessions.close(request.session_hash)

        blocks.unload(closed)
    # every session's click runs at once: the batcher, not Gradio's queue, decides what shares a step
    blocks.queue(default_concurrency_limit=None, max_size=None)
    return blocks
