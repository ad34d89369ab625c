"""The OpenAI videos API and ``/v1/models`` (issue 23 items 4, 5, 7; issue 20 item 2's video conditioning),
driven by the official ``openai`` client against a tiny random video root (``tests/roots.py``, Cosmos
family: temporal stride 4, spatial 8, ``sample_frames`` 9) served on loopback with two API keys.

Steps are 2 per video and sizes 48x32, so that every video here takes well under a second on a CPU.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
import warnings

import numpy as np
import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("av")

from roots import write_tiny_root  # noqa: E402
from test_serve import Server  # noqa: E402

from ursa_engine.serve.models import ServedModel  # noqa: E402
from ursa_engine.serve.security import Limits  # noqa: E402
from ursa_engine.serve.uploads import read_video  # noqa: E402
from ursa_engine.serve.video_inputs import FPS, cond_latent_frames, latent_frames_for  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the client marks the Sora API deprecated

KEY_A, KEY_B = "key-a-videos", "key-b-videos"
STEPS = 2
SIZE = "48x32"
MAX_FRAMES = 100  # "12" s = 145 frames is over it
MAX_UPLOAD = 200_000
OPTS = {"seed": 3, "steps": STEPS}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the worker thread and the HTTP side share 2 cores
    root = write_tiny_root(tmp_path_factory.mktemp("videos") / "tiny-video", family="cosmos3d")
    yield ServedModel.load(root)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(served):
    s = Server(served, Limits(api_keys=(KEY_A, KEY_B), max_video_frames=MAX_FRAMES, max_upload_bytes=MAX_UPLOAD),
               max_rows=8, max_queue=64)
    yield s
    s.close()


def client(server, key=KEY_A):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def text_video(server):
    """One completed text-to-video of key A (seed 3), shared by the tests that read it."""
    c = client(server)
    v = c.videos.create_and_poll(prompt="a bear walking", size=SIZE, seconds="4", extra_body=OPTS)
    assert v.status == "completed", v.error
    return v


def tokens(c, video_id) -> torch.Tensor:
    body = json.loads(c.videos.download_content(video_id, variant="tokens").content)
    return torch.tensor(body["tokens"], dtype=torch.int64).view(body["shape"])


def png(frame: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


def blurred_diff(a: np.ndarray, b: np.ndarray, block: int = 8) -> float:
    """Mean |a - b| of 8x8 block means of (F, H, W, 3) frames: H.264 keeps them (the random tiny tokenizer
    decodes to noise, whose pixels 4:2:0 chroma and quantisation do not keep: ~57 per pixel)."""
    def means(x):
        F, H, W, C = x.shape
        return x.reshape(F, H // block, block, W // block, block, C).astype(float).mean((2, 4))
    return float(np.abs(means(a) - means(b)).mean())


def api_error(fn, status: int):
    with pytest.raises(openai.APIStatusError) as info:
        fn()
    assert info.value.status_code == status, info.value
    body = info.value.body if isinstance(info.value.body, dict) else {}
    return body if "error" in body else {"error": body}  # the client keeps the inner object


# ---------------------------------------------------------------------------- seconds -> frames
def test_seconds_map_onto_the_tokenizers_temporal_grid(served):
    vae = served.engine.vae
    assert FPS == 12.0
    T = latent_frames_for(vae, 4.0)  # 48 frames after the first: 1 + 48 = 49 frames
    assert vae.num_frames(T) == 49 and vae.encoded_frames(49) == T
    for seconds in (0.5, 1.0, 2.0, 4.0, 8.0, 3.3):
        T = latent_frames_for(vae, seconds)
        assert vae.encoded_frames(vae.num_frames(T)) == T  # decodes whole: no partial tile
        added = vae.num_frames(T) - 1
        for other in range(1, 3 * T):  # no other whole length is nearer (ties: the shorter)
            if vae.encoded_frames(vae.num_frames(other)) == other:
                d = abs(vae.num_frames(other) - 1 - seconds * FPS)
                assert d > abs(added - seconds * FPS) or (d == abs(added - seconds * FPS) and other >= T)
    start = latent_frames_for(vae, 4.0)
    more = latent_frames_for(vae, 4.0, start=start)
    assert vae.num_frames(more) - vae.num_frames(start) == 48
    assert cond_latent_frames(vae, start) == vae.encoded_frames(9)  # 13 frames do not encode whole at 9


# ---------------------------------------------------------------------------- models
def test_models_list_and_retrieve(server, served):
    c = client(server)
    ids = [m.id for m in c.models.list()]
    assert ids == [served.name] + server.batcher.loras.names
    m = c.models.retrieve(served.name)
    assert (m.id, m.object, m.owned_by) == (served.name, "model", "ursa-engine")
    body = api_error(lambda: c.models.retrieve("sora-2"), 404)
    assert body["error"]["param"] == "model"
    api_error(lambda: openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list(), 401)


# ---------------------------------------------------------------------------- create, content
def test_text_to_video_tokens_equal_engine_generate(server, served, text_video):
    c = client(server)
    v = text_video
    assert (v.object, v.seconds, v.size, v.progress, v.model) == ("video", "4", SIZE, 100, served.name)
    assert v.frames == 49 and v.expires_at - v.completed_at == Limits().result_ttl_s
    got = tokens(c, v.id)
    want = served.engine.generate("a bear walking", latents_shape=tuple(v.latents_shape), seed=3, num_steps=STEPS,
                                  guidance_scale=served.default_guidance, decode=False).tokens.cpu()
    assert got.shape == (1, *v.latents_shape) and torch.equal(got, want)

    mp4 = c.videos.download_content(v.id).content
    frames, _ = read_video(mp4, "video")
    assert frames.shape == (49, 32, 48, 3)
    decoded = served.frames(got)[0]
    assert blurred_diff(frames, decoded) < 6 < blurred_diff(frames, decoded[::-1])  # H.264 is lossy: ~2.7, ~18
    thumb = c.videos.download_content(v.id, variant="thumbnail")
    assert thumb.response.headers["content-type"] == "image/png"
    from PIL import Image

    with Image.open(io.BytesIO(thumb.content)) as img:
        assert img.format == "PNG" and np.array_equal(np.asarray(img.convert("RGB")), decoded[0])  # lossless
    body = api_error(lambda: c.videos.download_content(v.id, variant="spritesheet"), 400)
    assert body["error"]["param"] == "variant"


def test_image_to_video_conditions_frame_zero(server, served):
    c = client(server)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    opts = {**OPTS, "seed": 11, "freeze_cond": True}
    v = c.videos.create_and_poll(prompt="a cat", seconds="1", input_reference=("ref.png", png(image), "image/png"),
                                 extra_body=opts)
    assert v.status == "completed" and v.size == SIZE  # the image's size (size not given)
    got = tokens(c, v.id)
    e = served.engine
    codes = e.encode_condition(image=image, latents_shape=tuple(v.latents_shape)).cpu()
    assert torch.equal(got[:, :1], codes)  # frame 0 held at the image's codes
    want = e.generate("a cat", latents_shape=tuple(v.latents_shape), seed=11, num_steps=STEPS, image=image,
                      freeze_cond=True, guidance_scale=served.default_guidance, decode=False).tokens.cpu()
    assert torch.equal(got, want)
    # the same image as a data URL in an input_reference object
    url = "data:image/png;base64," + base64.b64encode(png(image)).decode()
    v2 = c.videos.create_and_poll(prompt="a cat", seconds="1",
                                  extra_body={**opts, "input_reference": {"image_url": url}})
    assert torch.equal(tokens(c, v2.id), want)
    for ref in ({"image_url": "https://example.com/a.png"}, {"file_id": "file-1"}):
        body = api_error(lambda ref=ref: c.videos.create(prompt="a cat", extra_body={"input_reference": ref}), 400)
        assert body["error"]["param"] == "input_reference"
    body = api_error(lambda: c.videos.create(prompt="a cat", size="64x32", input_reference=("r.png", png(image))), 400)
    assert body["error"]["param"] == "input_reference"


# ---------------------------------------------------------------------------- extensions
def test_extend_a_stored_video_keeps_its_frames(server, served, text_video):
    c = client(server)
    src = tokens(c, text_video.id)
    e = c.videos.extend(prompt="a bear walking on snow", seconds="4", video=openai.omit,
                        extra_body={"video": {"id": text_video.id}, "seed": 5, "steps": STEPS})
    e = c.videos.poll(e.id)
    assert e.status == "completed", e.error
    assert (e.seconds, e.frames, e.extended_from, e.size) == ("8", 97, text_video.id, SIZE)
    got = tokens(c, e.id)
    T0 = src.shape[1]
    assert got.shape[1] > T0 and torch.equal(got[:, :T0], src)  # the source's tokens come first, unchanged
    tc = cond_latent_frames(served.engine.vae, T0)
    window = served.engine.generate("a bear walking on snow", latents_shape=tuple(e.latents_shape), seed=5,
                                    num_steps=STEPS, cond_latents=src[:, T0 - tc:], cond_noise_scale=0.1,
                                    guidance_scale=served.default_guidance, decode=False).tokens.cpu()
    assert torch.equal(got[:, T0:], window[:, tc:])  # conditioned on the source's last tc latent frames
    assert np.array_equal(served.frames(got)[0][:49], served.frames(src)[0])  # decoded: the same first frames
    frames, _ = read_video(c.videos.download_content(e.id).content, "video")
    first, _ = read_video(c.videos.download_content(text_video.id).content, "video")
    assert frames.shape == (97, 32, 48, 3)
    assert blurred_diff(frames[:49], first) < 6  # two H.264 encodes of equal frames


def test_extend_an_uploaded_video(server, served, text_video):
    c = client(server)
    mp4 = c.videos.download_content(text_video.id).content
    given, _ = read_video(mp4, "video")
    e = c.videos.extend(prompt="more", seconds="2", video=("clip.mp4", mp4, "video/mp4"), extra_body=OPTS)
    e = c.videos.poll(e.id)
    assert e.status == "completed", e.error
    vae = served.engine.vae
    nc = vae.num_frames(vae.encoded_frames(9))  # the last 9 frames condition (13 do not encode whole here)
    assert e.frames == 49 + vae.num_frames(e.latents_shape[0]) - nc and e.seconds == "6"
    frames, _ = read_video(c.videos.download_content(e.id).content, "video")
    assert frames.shape == (e.frames, 32, 48, 3)
    assert blurred_diff(frames[:49], given) < 6  # the given video first
    window = tokens(c, e.id)
    codes = served.engine.encode_condition(video=given, latents_shape=tuple(e.latents_shape), num_cond_frames=nc)
    want = served.engine.generate("more", latents_shape=tuple(e.latents_shape), seed=3, num_steps=STEPS,
                                  cond_latents=codes, cond_noise_scale=0.1, guidance_scale=served.default_guidance,
                                  decode=False).tokens.cpu()
    assert torch.equal(window, want)
    # its tokens do not cover the given frames: extending it by id starts from its MP4's frames
    again = c.videos.poll(c.videos.extend(prompt="more", seconds="1", video=openai.omit,
                                          extra_body={**OPTS, "video": {"id": e.id}}).id)
    assert again.status == "completed" and again.seconds == "7" and again.extended_from == e.id
    frames2, _ = read_video(c.videos.download_content(again.id).content, "video")
    assert frames2.shape[0] == again.frames > e.frames and blurred_diff(frames2[:e.frames], frames) < 6


# ---------------------------------------------------------------------------- list, keys, delete
def test_list_paginates_the_callers_videos_only(server, text_video):
    a, b = client(server), client(server, KEY_B)
    mine = [a.videos.create(prompt="a cat", size=SIZE, seconds="1", extra_body=OPTS).id for _ in range(3)]
    theirs = b.videos.create(prompt="a cat", size=SIZE, seconds="1", extra_body=OPTS).id
    page = a.videos.list(limit=2)
    assert len(page.data) == 2 and page.has_more and page.data[0].id == mine[-1]
    all_a = [v.id for v in a.videos.list(limit=2)]  # the client follows last_id -> after
    assert all_a[:3] == mine[::-1] and text_video.id in all_a and theirs not in all_a
    assert len(all_a) == len(set(all_a))
    asc = [v.id for v in a.videos.list(order="asc", limit=100)]
    assert asc == all_a[::-1]
    assert [v.id for v in b.videos.list()] == [theirs]
    for fn in (lambda: b.videos.retrieve(mine[0]), lambda: b.videos.download_content(text_video.id),
               lambda: b.videos.delete(mine[0]),
               lambda: b.videos.extend(prompt="x", seconds="4", video=openai.omit,
                                       extra_body={"video": {"id": text_video.id}})):
        api_error(fn, 404)  # another key's video is not found, as an unknown one
    assert api_error(lambda: a.videos.list(after="video_nope"), 400)["error"]["param"] == "after"
    assert api_error(lambda: a.videos.list(limit=0), 400)["error"]["param"] == "limit"
    for vid in mine:
        assert a.videos.poll(vid).status == "completed"
    b.videos.poll(theirs)


def test_delete_cancels_and_drops(server):
    c = client(server)
    slow = c.videos.create(prompt="a cat", size=SIZE, seconds="1", extra_body={"seed": 1, "steps": 400})
    assert slow.status in ("queued", "in_progress")
    assert api_error(lambda: c.videos.download_content(slow.id), 409)["error"]["param"] == "video_id"
    gone = c.videos.delete(slow.id)
    assert (gone.id, gone.deleted, gone.object) == (slow.id, True, "video.deleted")
    assert api_error(lambda: c.videos.retrieve(slow.id), 404)["error"]["param"] == "video_id"
    deadline = time.time() + 10
    job = server.batcher.get(f"k0:{slow.id}")
    while job.status not in ("cancelled", "done") and time.time() < deadline:
        time.sleep(0.05)
    assert job.status == "cancelled"  # its rows left the batch
    done = c.videos.create_and_poll(prompt="a cat", size=SIZE, seconds="1", extra_body=OPTS)
    c.videos.delete(done.id)
    api_error(lambda: c.videos.download_content(done.id), 404)
    api_error(lambda: c.videos.delete(done.id), 404)


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("extra, param", [
    ({"seconds": "abc"}, "seconds"), ({"seconds": "-4"}, "seconds"),
    ({"seconds": "12"}, "seconds"),  # 145 frames, over max_video_frames
    ({"size": "50x32"}, "size"), ({"size": "big"}, "size"),
    ({"size": "4096x4096"}, "size"),  # over max_tokens with one latent frame
    ({"seconds": "8", "size": "512x320"}, "seconds"),  # 97 frames: within max_video_frames, over max_tokens
    ({"size": "1280x720"}, "size"),  # one frame fits, but not even the default 4 s: the size is the problem
    ({"seconds": "2", "size": "1280x720"}, "size"),
    ({"quality": "hd"}, "quality"),  # unknown field
    ({"steps": 0}, "steps"), ({"freeze_cond": True}, "freeze_cond"),
])
def test_bad_fields_get_a_400_naming_them(server, extra, param):
    c = client(server)
    body = api_error(lambda: c.videos.create(prompt="a cat", size=SIZE, extra_body=extra), 400)
    assert body["error"]["param"] == param, body
    assert body["error"]["message"].startswith(param)
    if "size" in extra and "max_tokens" in body["error"]["message"] and extra["size"] != "4096x4096":
        assert "size x seconds" in body["error"]["message"]  # too long for this size: both are named


def test_the_size_x_seconds_message_says_what_fits(server, served):
    """Over max_tokens with a size one frame of which fits: the message names both and the longest clip
    that fits at that size (guided: 2 rows)."""
    c = client(server)
    body = api_error(lambda: c.videos.create(prompt="a cat", size="1280x720", seconds="4", extra_body=OPTS), 400)
    found = re.search(r"at 1280x720 at most ([0-9.]+) s fit", body["error"]["message"])
    assert found, body
    vae = served.engine.vae
    T = latent_frames_for(vae, float(found.group(1)))
    longer = next(t for t in range(T + 1, T + 50) if vae.encoded_frames(vae.num_frames(t)) == t)
    assert 2 * T * 90 * 160 <= server.batcher.max_tokens < 2 * longer * 90 * 160  # the next whole length does not


def test_upload_limits(server):
    from ursa_engine.media import save_video

    c = client(server)
    body = api_error(lambda: c.videos.create(prompt="a cat", input_reference=("big.png", b"\0" * (MAX_UPLOAD + 1))),
                     413)
    assert body["error"]["param"] == "body"
    body = api_error(lambda: c.videos.create(prompt="a cat", input_reference=("x.png", b"not an image")), 400)
    assert body["error"]["param"] == "input_reference"
    with warnings.catch_warnings(), __import__("tempfile").TemporaryDirectory() as tmp:
        ramp = np.linspace(0, 255, MAX_FRAMES + 5).astype(np.uint8)[:, None, None, None]
        long = np.broadcast_to(ramp, (MAX_FRAMES + 5, 32, 48, 3)).copy()
        data = save_video(f"{tmp}/long.mp4", long, fps=FPS).read_bytes()
    assert len(data) < MAX_UPLOAD
    body = api_error(lambda: c.videos.extend(prompt="x", seconds="1", video=("long.mp4", data, "video/mp4")), 400)
    assert body["error"]["param"] == "video" and "max_video_frames" in body["error"]["message"]
    body = api_error(lambda: c.videos.extend(prompt="x", seconds="1", video=("v.mp4", b"garbage")), 400)
    assert body["error"]["param"] == "video"
    with warnings.catch_warnings(), __import__("tempfile").TemporaryDirectory() as tmp:
        big = np.zeros((10, 1024, 1280, 3), np.uint8)  # 39 MB decoded, a ~20 KB file
        data = save_video(f"{tmp}/big.mp4", big, fps=FPS).read_bytes()
    assert len(data) < MAX_UPLOAD
    t0 = time.perf_counter()
    body = api_error(lambda: c.videos.extend(prompt="x", seconds="1", video=("big.mp4", data, "video/mp4")), 400)
    assert body["error"]["param"] == "video" and "max_tokens" in body["error"]["message"], body
    assert "1280x1024 video of 10 frames" in body["error"]["message"]  # from the header, before decoding
    assert time.perf_counter() - t0 < 1.0


def test_store_bounds_expiry_and_per_key_limit(served):
    """A server of its own: 2 stored results, per-key concurrency 1, and a store clock moved forward."""
    s = Server(served, Limits(max_stored_results=2, max_concurrent_per_key=1, result_ttl_s=60), max_rows=8)
    try:
        c = client(s, "any")
        ids = [c.videos.create_and_poll(prompt="a cat", size=SIZE, seconds="1", extra_body=OPTS).id for _ in range(3)]
        body = api_error(lambda: c.videos.retrieve(ids[0]), 404)
        assert "dropped" in body["error"]["message"] and "max_stored_results" in body["error"]["message"]
        assert [v.id for v in c.videos.list()] == ids[:0:-1]
        slow = c.videos.create(prompt="a cat", size=SIZE, seconds="1", extra_body={"steps": 400})
        api_error(lambda: c.videos.create(prompt="a cat", size=SIZE, seconds="1", extra_body=OPTS), 429)
        c.videos.delete(slow.id)
        store = s.server.config.app.state.video_store
        store.clock = lambda: time.time() + 61
        body = api_error(lambda: c.videos.retrieve(ids[2]), 404)
        assert "expired" in body["error"]["message"] and "result_ttl_s" in body["error"]["message"]
        api_error(lambda: c.videos.download_content(ids[1]), 404)
        assert list(c.videos.list()) == []
        s.batcher.drain(0)  # SIGTERM's drain: the videos routes refuse new jobs as every route does
        body = api_error(lambda: c.videos.create(prompt="a cat", size=SIZE, seconds="1", extra_body=OPTS), 503)
        assert "shutting down" in body["error"]["message"]
    finally:
        s.close()


def test_models_name_the_servers_adapters(served):
    """``/v1/models`` lists the per-request LoRA adapters; ``model`` naming one runs the video with it."""
    from test_serve_lora import random_adapter

    s = Server(served, max_rows=8, loras={"film": random_adapter(served.engine.model.config, 1, std=0.5)})
    try:
        c = client(s, "any")
        assert [m.id for m in c.models.list()] == [served.name, "film"]
        assert c.models.retrieve("film").id == "film"
        base = c.videos.create_and_poll(prompt="a cat", size=SIZE, seconds="1", extra_body=OPTS)
        film = c.videos.create_and_poll(prompt="a cat", size=SIZE, seconds="1", model="film", extra_body=OPTS)
        assert (base.model, film.model) == (served.name, "film")
        assert not torch.equal(tokens(c, base.id), tokens(c, film.id))
    finally:
        s.close()


def test_json_bodies_motion_and_progress(server, served):
    """JSON as well as multipart; ``motion`` is the prompt prefix Engine.generate(motion=) adds; progress
    is the job's step / steps."""
    import httpx

    h = {"Authorization": f"Bearer {KEY_A}"}

    def identified() -> int:
        text = httpx.get(server.url + "/metrics", headers=h).text
        found = re.search(r'^ursa_key_identified_requests_total\{key="k0"\} (\d+)', text, re.M)
        return int(found.group(1)) if found else 0

    before = identified()
    r = httpx.post(server.url + "/v1/videos", headers=h, json={"prompt": "a cat", "size": SIZE, "seconds": 1,
                                                               "motion": 4.0, "user": "u-1", **OPTS})
    assert r.status_code == 200, r.text
    assert identified() == before + 1  # user is recorded per key, as the images routes do
    c = client(server)
    v = c.videos.poll(r.json()["id"])
    assert v.status == "completed" and v.seconds == "1"
    want = served.engine.generate("a cat", latents_shape=tuple(v.latents_shape), seed=3, num_steps=STEPS, motion=4.0,
                                  guidance_scale=served.default_guidance, decode=False).tokens.cpu()
    assert torch.equal(tokens(c, v.id), want)
    r = httpx.post(server.url + "/v1/videos", headers=h, json=["not", "an", "object"])
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    slow = c.videos.create(prompt="a cat", size=SIZE, seconds="1", extra_body={"seed": 2, "steps": 300})
    deadline, seen = time.time() + 20, []
    while time.time() < deadline:
        now = c.videos.retrieve(slow.id)
        seen.append(now.progress)
        if now.status == "in_progress" and 0 < now.progress < 100:
            break
        time.sleep(0.05)
    assert now.status == "in_progress" and 0 < now.progress < 100, seen
    c.videos.delete(slow.id)


def test_a_failed_render_is_a_failed_video(server, served, monkeypatch):
    def broken(frames, fps=12):
        raise RuntimeError("no encoder")

    monkeypatch.setattr(served, "mp4", broken)
    c = client(server)
    v = c.videos.create_and_poll(prompt="a cat", size=SIZE, seconds="1", extra_body=OPTS)
    assert v.status == "failed" and v.error.code == "render_failed" and "no encoder" in v.error.message
    assert api_error(lambda: c.videos.download_content(v.id), 409)["error"]["param"] == "video_id"
    body = api_error(lambda: c.videos.extend(prompt="x", seconds="1", video=openai.omit,
                                             extra_body={"video": {"id": v.id}}), 400)
    assert body["error"]["param"] == "video" and "failed" in body["error"]["message"]


def test_image_checkpoints_refuse_videos():
    from ursa_engine.serve.video_inputs import video_tokenizer

    with pytest.raises(ValueError, match="^model: .*image model"):
        video_tokenizer(ServedModel.load())  # the bundled digits model


def test_huge_seconds_are_refused_at_once(server, served):
    """``seconds`` over ``max_video_frames`` is a 400 before any search (a huge value once hung a server)."""
    import httpx

    h = {"Authorization": f"Bearer {KEY_A}"}
    for route, extra in (("/v1/videos", {"size": SIZE}), ("/v1/videos/extensions", {"video": {"id": "video_x"}})):
        for seconds in ("1e7", "1e300", 1e7):
            t0 = time.perf_counter()
            r = httpx.post(server.url + route, headers=h, json={"prompt": "a cat", "seconds": seconds, **extra},
                           timeout=30)
            took = time.perf_counter() - t0
            assert r.status_code == 400 and r.json()["error"]["param"] == "seconds", r.text
            assert "max_video_frames" in r.json()["error"]["message"] and took < 1.0, (route, seconds, took)
    vae = served.engine.vae
    t0 = time.perf_counter()
    T = latent_frames_for(vae, 3000.0)  # the search itself: bisection, not a scan of every length
    assert time.perf_counter() - t0 < 1.0
    assert vae.encoded_frames(vae.num_frames(T)) == T and abs(vae.num_frames(T) - 1 - 36000) <= vae.num_frames(9)


def test_the_bisection_picks_what_a_scan_picks(served):
    """The nearest whole length (ties: the shorter), as a plain scan of every T finds it."""
    vae = served.engine.vae

    def scan(seconds, start):
        base = vae.num_frames(start) if start else 1
        whole = [T for T in range(start + 1, start + 200) if vae.encoded_frames(vae.num_frames(T)) == T]
        return min(whole, key=lambda T: (abs(vae.num_frames(T) - base - seconds * FPS), T))

    for start in (0, 1, 2, 3, 7, 18):
        for seconds in (0.01, 0.3, 1 / 3, 0.5, 2 / 3, 1.0, 2.0, 2.5, 4.0, 7.9, 8.0, 10.0):
            assert latent_frames_for(vae, seconds, start=start) == scan(seconds, start), (start, seconds)


def test_a_field_given_twice_is_refused(server):
    """``-F seconds=4 -F seconds=1`` is a 400 naming seconds (not the last one silently), as the edits route."""
    import httpx

    h = {"Authorization": f"Bearer {KEY_A}"}
    ref = ("r.png", png(np.zeros((32, 48, 3), np.uint8)), "image/png")
    cases = [("/v1/videos", {"prompt": "a", "seconds": ["4", "1"]}, None, "seconds"),
             ("/v1/videos", {"prompt": "a", "seconds": ["4", "1"]}, [("input_reference", ref)], "seconds"),  # multipart
             ("/v1/videos", {"prompt": "a", "size": SIZE}, [("input_reference", ref)] * 2, "input_reference"),
             ("/v1/videos/extensions", {"prompt": "a", "seconds": "1", "video[id]": ["v1", "v2"]}, None, "video")]
    for route, data, files, param in cases:
        r = httpx.post(server.url + route, headers=h, data=data, files=files, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (param, r.text)
        assert "given more than once" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/videos", headers={**h, "Content-Type": "application/json"},
                   content=b'{"prompt": "a", "seconds": "4", "seconds": "1"}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "seconds", r.text
