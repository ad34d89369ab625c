"""What the web UI's buttons do, without Gradio: check the inputs, queue a request on the server's
:class:`~ursa_engine.serve.batcher.Batcher`, report its steps, decode the result (issue 21).

A :class:`Studio` is shared by every browser session: each request goes through the same batcher as
the HTTP API (``ursa-engine serve``), so requests of different sessions share forward passes while
a session's tokens depend only on its own request (prompt, size, steps, guidance, seed: DESIGN §2.5).

Errors a person reads: every refusal is one :class:`UIError` whose message names the field
("size: ...", "image: ...", "queue full: ...", "api_key: ..."); :mod:`.blocks` shows it with
``gr.Error``. Nothing here imports Gradio, so the handlers are tested directly.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import queue
import re
import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..defaults import DEFAULT_COND_FRAMES, DEFAULT_EXTENSION_NOISE, VIDEO_SIZE
from ..engine import NEGATIVE_PROMPT
from ..serve.batcher import Batcher, Cancelled, Draining, GenerationRequest, QueueFull
from ..serve.models import ServedModel
from ..serve.security import InFlight, Limits, internal_id, new_id

TERMINAL = ("done", "cancelled", "failed")
MAX_SEED = 2**31 - 1
MAX_STEPS = 1000  # the steps field's range is 1..MAX_STEPS (the page's slider too)
Progress = Callable[[int, int], None]  # (step, steps)


class UIError(ValueError):
    """A refusal a person can read: one line naming the field (shown with ``gr.Error``)."""


def conditioning_available() -> bool:
    """Whether this server's :class:`GenerationRequest` takes conditioning frames (``cond_latents``)."""
    return "cond_latents" in {f.name for f in dataclasses.fields(GenerationRequest)}


class Studio:
    """The UI's generation functions over a served model and its (started) batcher.

    Parameters
    ----------
    served : the model and its conventions (prompts, sizes, decoding)
    batcher : the step-level batcher the HTTP API uses (one forward pass carries every session's rows)
    limits : the server's :class:`~ursa_engine.serve.security.Limits` (prompt characters, jobs per key)
    inflight : the HTTP app's per-key job counts (``app.state.inflight``) so that UI and API jobs of one
        key share ``max_concurrent_per_key``; default: the UI's own
    out_dir : where result videos are written (default: a temporary folder)
    """

    def __init__(self, served: ServedModel, batcher: Batcher, limits: Limits | None = None, *,
                 inflight: InFlight | None = None, out_dir: str | Path | None = None):
        self.served, self.batcher = served, batcher
        self.limits = Limits() if limits is None else limits
        self.inflight = InFlight() if inflight is None else inflight
        self.out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="ursa-ui-"))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        vae = served.engine.vae
        self.stride = int(vae.spatial_stride) if vae is not None else 8
        self.default_frames = 4 if served.digits else 49
        video = vae is not None and int(getattr(vae, "temporal_stride", 1)) > 1
        self.video_size = VIDEO_SIZE[::-1] if video else served.default_size  # (W, H): the authors' 512 x 320
        self.default_negative = "" if served.digits else NEGATIVE_PROMPT  # the authors' README negative prompt
        self.default_cond_frames = 1 if served.digits else DEFAULT_COND_FRAMES  # generate --cond-frames

    # ------------------------------------------------------------------ inputs
    def owner(self, api_key: str | None) -> str:
        """The key namespace of a caller (``"anon"`` without keys); a missing or wrong key is refused."""
        found = self.limits.owner(b"Bearer " + (api_key or "").strip().encode("utf-8", "replace"))
        if found is None:
            raise UIError("api_key: this server needs an API key: enter a valid one")
        return found

    def prompt_ids(self, text, *, field: str = "prompt", motion: float | None = None):
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise UIError(f"{field}: expected text, got {type(text).__name__}")
        if len(text) > self.limits.max_prompt_chars:
            raise UIError(f"{field}: {len(text)} characters, over this server's limit of "
                          f"{self.limits.max_prompt_chars}")
        if field == "prompt" and not text.strip():
            raise UIError("prompt: type a prompt first" + (" (a digit 0-9)" if self.served.digits else ""))
        try:
            if motion is not None and not self.served.digits and text:  # the prefix goes on "prompt_ids" only
                return self.served.engine.encode_prompts([text], motion=motion)[0]
            return self.served.prompt_ids(text, field=field)
        except ValueError as err:
            msg = _one_line(err)
            raise UIError(field + msg[len("prompt_ids"):] if msg.startswith("prompt_ids:") else msg) from None

    def latents_shape(self, width, height, frames, *, upload: str | None = None) -> tuple[int, int, int]:
        """The latent grid of a size in pixels, refused with what would work.

        ``upload`` ("image" / "video"): the size is that upload's, so its refusals name it. Over
        ``max_tokens`` (at 2 rows: guidance) the refusal names the size when one frame of it is already
        over, else ``frames``; a frame count the tokenizer does not decode whole (a partial temporal tile
        is left out) is refused with the nearest counts that are."""
        w, h, f = (_int(width, "width"), _int(height, "height"), _int(frames, "frames"))
        vae = self.served.engine.vae
        if vae is None:
            raise UIError("size: this checkpoint has no vae/ to decode pixels")
        W0, H0 = self.video_size if f > 1 else self.served.default_size
        for name, v in (("width", w), ("height", h)):
            if v < self.stride or v % self.stride:
                if upload is not None:
                    raise UIError(f"{upload}: {w}x{h} pixels; this tokenizer needs a width and height that are "
                                  f"multiples of {self.stride} (e.g. {W0}x{H0})")
                raise UIError(f"{name}: {v} pixels; expected a positive multiple of {self.stride} "
                              f"(e.g. {W0 if name == 'width' else H0})")
        s = int(getattr(vae, "temporal_stride", 1))
        if f < 1:
            raise UIError(f"frames: expected at least 1, got {f}")
        if (f - 1) % s:
            raise UIError(f"frames: this tokenizer takes 1 + {s}k frames (1, {1 + s}, {1 + 2 * s}, ...), got {f}")
        shape = (1 + (f - 1) // s, h // self.stride, w // self.stride)
        size = upload or "size"
        per_frame = 2 * shape[1] * shape[2]
        if per_frame > self.batcher.max_tokens:
            raise UIError(f"{size}: {w}x{h} pixels are {shape[1] * shape[2]} latent tokens a frame, x 2 rows "
                          f"(guidance) = {per_frame} token-rows a step, over this server's limit of "
                          f"{self.batcher.max_tokens} (max_tokens): use a smaller "
                          f"{'upload' if upload else 'width / height'}")
        if shape[0] * per_frame > self.batcher.max_tokens:
            fit = 1 + s * (self.batcher.max_tokens // per_frame - 1)
            raise UIError(f"frames: {f} frames at {w}x{h} are {shape[0]} latent frames x {per_frame} token-rows = "
                          f"{shape[0] * per_frame}, over this server's limit of {self.batcher.max_tokens} "
                          f"(max_tokens): at most {whole_frames(vae, fit)[0]} frames at this size")
        decoded = int(vae.num_frames(shape[0]))
        if decoded != f:
            below, above = whole_frames(vae, f)
            tile = getattr(vae, "sample_frames", None)
            raise UIError(f"frames: this tokenizer decodes {f} frames as {decoded} (it decodes temporal tiles"
                          f"{f' of {tile} frames' if tile else ''} and leaves a partial one out): ask for "
                          f"{below}{'' if above is None else f' or {above}'} frames")
        return shape

    def request(self, prompt, negative_prompt, width, height, frames, steps, guidance, seed, randomize_seed,
                motion=None, *, upload: str | None = None) -> GenerationRequest:
        """The :class:`GenerationRequest` of the form's values (one sample); ``upload``: the upload whose
        size this is (its refusals name it)."""
        shape = self.latents_shape(width, height, frames, upload=upload)
        steps = _int(steps, "steps")
        if not 1 <= steps <= MAX_STEPS:
            raise UIError(f"steps: expected 1..{MAX_STEPS}, got {steps}")
        guidance = _float(guidance, "guidance")
        if not -100 <= guidance <= 100:
            raise UIError(f"guidance: expected -100..100, got {guidance:g}")
        seed = secrets.randbelow(MAX_SEED + 1) if randomize_seed else _int(seed, "seed")
        if not 0 <= seed <= MAX_SEED:
            raise UIError(f"seed: expected 0..{MAX_SEED}, got {seed}")
        motion = None if motion is None or self.served.digits or shape[0] == 1 else _float(motion, "motion")
        return GenerationRequest(prompt_ids=self.prompt_ids(prompt, motion=motion),
                                 negative_ids=self.prompt_ids(negative_prompt, field="negative_prompt"),
                                 latents_shape=shape, num_steps=steps, guidance_scale=guidance, seed=seed)

    # ------------------------------------------------------------------ running
    def run(self, request: GenerationRequest, progress: Progress | None = None, *, owner: str = "anon",
            timeout: float | None = None, cancelled: Callable[[], bool] | None = None):
        """Queue ``request`` on the batcher and wait for its tokens (1, T, h, w), calling
        ``progress(step, steps)`` at every step of the batch loop (``Batcher.subscribe``).

        ``cancelled()`` is polled every 0.25 s: once true (the page was closed or its request stopped)
        the job is cancelled, so its rows leave the batch at the next step boundary.

        Refusals (queue full, per-key limit, bad request, shutting down, cancelled) are :class:`UIError`."""
        if not self.inflight.reserve(owner, self.limits.max_concurrent_per_key):
            raise UIError(f"busy: this key already has {self.limits.max_concurrent_per_key} requests queued or "
                          "running (the server's limit); wait for one to finish")
        job, events = None, queue.Queue()
        try:
            self.batcher.check_queue()
            try:
                job = self.batcher.prepare(request, internal_id(owner, "ui-" + new_id()))
            except ValueError as err:
                raise UIError(_one_line(err)) from None
            self.batcher.subscribe(job, events.put)
            self.batcher.submit(job)
            if progress is not None:
                progress(job.k, job.steps)  # k = 1 where the metric path skips the first step
            deadline = None if timeout is None else time.monotonic() + timeout
            while not job.future.done():
                if deadline is not None and time.monotonic() > deadline:
                    raise UIError(f"timeout: not finished within {timeout:g} s")
                if cancelled is not None and cancelled():
                    raise UIError("cancelled: the page stopped this request")
                try:
                    ev = events.get(timeout=0.25)
                except queue.Empty:
                    continue
                if ev["event"] == "step" and progress is not None:
                    progress(ev["step"], ev["steps"])
                if ev["event"] in TERMINAL:
                    break
            return job.future.result()
        except QueueFull as err:
            raise UIError(f"queue full: the server has {self.batcher.max_queue} requests waiting; try again in a "
                          "moment") from err
        except Draining as err:
            raise UIError(f"shutting down: {_one_line(err)}") from err
        except Cancelled as err:
            raise UIError(f"cancelled: {_one_line(err)}") from err
        except UIError:
            raise
        except Exception as err:  # the batch failed: one line, never a traceback in the page
            raise UIError(f"generation failed: {_one_line(err)}") from err
        finally:
            if job is not None:
                self.batcher.unsubscribe(job, events.put)
                if not job.future.done():  # the page went away or timed out: its rows leave the batch
                    self.batcher.cancel(job.id)
            self.inflight.release(owner)

    # ------------------------------------------------------------------ the buttons
    def generate_image(self, prompt, negative_prompt="", width=None, height=None, steps=None, guidance=None,
                       seed=0, randomize_seed=False, *, owner: str = "anon", progress: Progress | None = None,
                       cancelled: Callable[[], bool] | None = None):
        """Text to image. Returns (uint8 (H, W, 3) image, the seed used). ``owner``: the caller's key
        namespace (:meth:`owner`); ``cancelled``: see :meth:`run`."""
        req = self.request(prompt, negative_prompt, *self._size(width, height), 1, self._steps(steps),
                           self._guidance(guidance), seed, randomize_seed)
        tokens = self.run(req, progress, owner=owner, cancelled=cancelled)
        return self.served.frames(tokens)[0, 0], req.seed

    def generate_video(self, prompt, negative_prompt="", width=None, height=None, frames=None, steps=None,
                       guidance=None, seed=0, randomize_seed=False, motion=None, *, owner: str = "anon",
                       progress: Progress | None = None, image=None, video=None, cond_frames=None,
                       cancelled: Callable[[], bool] | None = None):
        """Text to video, or with an upload (a file path, bytes or uint8 pixels): ``image`` to video
        (the image, resized and centre-cropped to the video's size, default :attr:`video_size`, is the
        first frame), or the extension of ``video`` (the new clip has its size; its last ``cond_frames``
        frames start the new clip; the result is the whole upload followed by the new frames, as
        ``ursa-engine generate --video``). Returns (the MP4's path, the seed used)."""
        frames = self.default_frames if frames is None else frames
        upload = None
        if image is not None:
            image, upload = self.read_image(image), "image"
        if video is not None:
            video = self.read_video(video)
            if width is None and height is None:  # the new clip has the upload's size
                (height, width), upload = video.shape[1:3], "video"
        if width is None and height is None:
            width, height = self.video_size
        req = self.request(prompt, negative_prompt, *self._size(width, height), frames, self._steps(steps),
                           self._guidance(guidance), seed, randomize_seed, motion,
                           upload="video" if upload == "video" else None)
        if upload is not None:
            req = self.condition(req, image=image, video=video, cond_frames=cond_frames)
        tokens = self.run(req, progress, owner=owner, cancelled=cancelled)
        pixels = self.served.frames(tokens)[0]
        if video is not None:
            kept = self.default_cond_frames if cond_frames is None else _int(cond_frames, "cond_frames")
            pixels = np.concatenate([video, pixels[kept:]])
        path = self.out_dir / f"ursa-{secrets.token_hex(8)}.mp4"
        path.write_bytes(self.served.mp4(pixels))
        return str(path), req.seed

    def condition(self, req: GenerationRequest, *, image=None, video=None, cond_frames=None) -> GenerationRequest:
        """``req`` with known first frames (DESIGN §2.4), encoded with ``engine.encode_condition``.

        ``image``: latent frame 0 (image to video); ``video``: its last ``cond_frames`` pixel frames
        (1 + s·k for a tokenizer of temporal stride s; default 13 for URSA, 1 for the digits model)
        start the new clip, resampled at ``cond_noise_scale`` 0.1 as ``ursa-engine generate --video``
        does. The digits model holds the given frames (``freeze_cond``, as its demo: stepped, the small
        model redraws some of their patches)."""
        if not conditioning_available():
            raise UIError("image: conditioning frames are not available on this server (its batcher takes text "
                          "prompts only)")
        vae = self.served.engine.vae
        if vae is None:
            raise UIError("image: this checkpoint has no vae/ to encode pixels")
        T, h, w = req.latents_shape
        H, W = h * self.stride, w * self.stride
        noise = 0.0
        if image is not None:
            kw = {"image": fit_image(self.read_image(image), W, H)}
        else:
            clip = self.read_video(video)
            if clip.shape[1:3] != (H, W):
                raise UIError(f"video: {clip.shape[2]}x{clip.shape[1]} pixels, but the new clip is {W}x{H}: "
                              "leave width / height out (the upload's size) or upload a video of that size")
            n = self.default_cond_frames if cond_frames is None else _int(cond_frames, "cond_frames")
            s = int(getattr(vae, "temporal_stride", 1))
            if n < 1 or (n - 1) % s:
                raise UIError(f"cond_frames: the video tokenizer encodes 1 + {s}k frames (1, {1 + s}, {1 + 2 * s}, "
                              f"...), got {n}")
            kept = int(vae.num_frames(vae.encoded_frames(n)))
            if kept != n:
                raise UIError(f"cond_frames: this tokenizer encodes {n} frames in temporal tiles that keep only "
                              f"{kept} of them; keep at most {whole_frames(vae, n)[0]}")
            if n > clip.shape[0]:
                raise UIError(f"cond_frames: {n} frames asked, the uploaded video has {clip.shape[0]}")
            Tc = int(vae.encoded_frames(n)) if hasattr(vae, "encoded_frames") else 1 + (n - 1) // s
            if Tc >= T:
                raise UIError(f"cond_frames: {n} frames are {Tc} latent frames, the new clip has {T}: keep fewer "
                              "frames or ask for more")
            kw, noise = {"video": clip, "num_cond_frames": n}, DEFAULT_EXTENSION_NOISE
        try:
            codes = self.served.engine.encode_condition(latents_shape=req.latents_shape, **kw)
        except ValueError as err:
            raise UIError(_one_line(err)) from None
        return dataclasses.replace(req, cond_latents=codes, cond_noise_scale=noise, freeze_cond=self.served.digits)

    def read_image(self, image) -> np.ndarray:
        """uint8 (H, W, 3) of an upload: a file path or bytes (the server's reader and ``max_image_pixels``)
        or an array."""
        if isinstance(image, (str, Path, bytes)):
            from ..serve.uploads import read_image

            data = Path(image).read_bytes() if not isinstance(image, bytes) else image
            try:
                return read_image(data, "image", self.limits)
            except ValueError as err:  # without PIL's "(cannot identify image file <_io.BytesIO object at 0x..>)"
                raise UIError(re.sub(r" \([^()]*<[^<>]* at 0x[0-9a-f]+>\)", "", _one_line(err))) from None
        return _pixels(image, "image", 3)

    def read_video(self, video) -> np.ndarray:
        """uint8 (F, H, W, 3) of an upload: a file path or bytes (MP4 / WebM, ``max_video_frames``) or frames."""
        if isinstance(video, (str, Path, bytes)):
            from ..serve.uploads import read_video

            data = Path(video).read_bytes() if not isinstance(video, bytes) else video
            try:
                return read_video(data, "video", self.limits)[0]
            except ValueError as err:
                raise UIError(_one_line(err)) from None
        return _pixels(video, "video", 4)

    # ------------------------------------------------------------------ defaults
    def _size(self, width, height) -> tuple[int, int]:
        w, h = self.served.default_size
        return (w if width is None else width), (h if height is None else height)

    def _steps(self, steps) -> int:
        return self.served.engine.scheduler.num_steps if steps is None else steps

    def _guidance(self, guidance) -> float:
        return self.served.default_guidance if guidance is None else guidance


def fit_image(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 (height, width, 3): ``image`` (H, W, 3) scaled to cover the size (Lanczos), then centre-cropped,
    as the authors' app prepares an image-to-video upload; an image of that size is returned as is."""
    H, W = image.shape[:2]
    if (H, W) == (height, width):
        return image
    from PIL import Image

    scale = max(width / W, height / H)
    w, h = max(width, round(W * scale)), max(height, round(H * scale))
    big = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.LANCZOS))
    top, left = (h - height) // 2, (w - width) // 2
    return np.ascontiguousarray(big[top:top + height, left:left + width])


def whole_frames(vae, frames: int) -> tuple[int, int | None]:
    """The frame counts nearest ``frames`` (at most, then above; None: none nearby) that ``vae``
    decodes whole: ``num_frames(T) == 1 + s (T - 1)`` for the T latent frames that generate them."""
    s = int(getattr(vae, "temporal_stride", 1))
    T = 1 + (max(frames, 1) - 1) // s

    def whole(t: int) -> bool:
        return int(vae.num_frames(t)) == 1 + s * (t - 1)

    near, low = range(T, max(T - 256, 0), -1), range(min(T - 256, 256), 0, -1)  # bounded scans
    below = next((1 + s * (t - 1) for t in itertools.chain(near, low) if whole(t)), 1)
    above = next((1 + s * (t - 1) for t in range(T + 1, T + 256) if whole(t)), None)
    return below, above


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _int(v, name: str) -> int:
    if isinstance(v, bool) or v is None:
        raise UIError(f"{name}: expected a whole number, got {v!r}")
    if isinstance(v, float):
        if not math.isfinite(v) or v != int(v):
            raise UIError(f"{name}: expected a whole number, got {v:g}")
        return int(v)
    try:
        return int(v)
    except (TypeError, ValueError):
        raise UIError(f"{name}: expected a whole number, got {v!r}") from None


def _float(v, name: str) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise UIError(f"{name}: expected a number, got {v!r}") from None
    if not math.isfinite(f):
        raise UIError(f"{name}: expected a finite number, got {v!r}")
    return f


def _pixels(a, name: str, ndim: int) -> np.ndarray:
    """uint8 RGB pixels of an upload (numpy as Gradio gives it; grey or RGBA converted)."""
    a = np.asarray(a)
    if a.ndim == ndim - 1:  # grey
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != ndim or a.shape[-1] not in (3, 4):
        raise UIError(f"{name}: expected an RGB picture, got an array of shape {tuple(a.shape)}")
    a = a[..., :3]
    if a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a)
