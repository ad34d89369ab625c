"""The web UI without a browser (issue 21): the handlers of :mod:`ursa_engine.ui.handlers` on the bundled
digits model, the named Gradio endpoints through ``gradio_client`` against a live loopback server, the
API-key login, ``serve --ui``'s mount and the ``ui`` subcommand's flags.

The browser half is tests/test_ui_browser.py (``-m browser``).
"""

from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
import pytest
import torch

gr = pytest.importorskip("gradio")
httpx = pytest.importorskip("httpx")
gradio_client = pytest.importorskip("gradio_client")

from serve_spy import ForwardSpy  # noqa: E402
from ui_server import UIServer  # noqa: E402

from ursa_engine import digits  # noqa: E402
from ursa_engine.serve import Batcher  # noqa: E402
from ursa_engine.serve.models import ServedModel  # noqa: E402
from ursa_engine.serve.security import Limits  # noqa: E402
from ursa_engine.ui import Studio, UIError, conditioning_available  # noqa: E402

STEPS = 6
# gradio's queue calls pandas with options pandas 3 deprecates (not ours)
pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]


@pytest.fixture(scope="module")
def studio(served):
    b = Batcher(served.engine, max_rows=16, max_queue=16).start()
    yield Studio(served, b)
    b.stop()


@pytest.fixture(scope="module")
def ui(served):
    s = UIServer(served)
    yield s
    s.close()


def engine_image(served, digit: int, seed: int, steps: int = STEPS, guidance: float = 3.0) -> np.ndarray:
    """The same request through :meth:`Engine.generate` (no batcher), decoded: (H, W, 3) uint8."""
    e = served.engine
    tokens = e.generate(digits.prompt_ids([digit], e.model.config.pad_token_id), latents_shape=(1, 4, 8),
                        num_steps=steps, guidance_scale=guidance, seed=seed, decode=False).tokens
    return served.frames(tokens)[0, 0]


# ---------------------------------------------------------------------------------------------- handlers
def test_generate_image_equals_engine_and_reports_every_step(studio, served):
    seen = []
    image, seed = studio.generate_image("a seven 7", "", 16, 8, STEPS, 3.0, 11, False,
                                        progress=lambda k, n: seen.append((k, n)))
    assert seed == 11 and image.shape == (8, 16, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, engine_image(served, 7, 11))
    # the step reached at submit (1: the metric path skips step 0), then every step of the batch loop
    assert seen[0][0] <= 1 and seen == [(k, STEPS) for k in range(seen[0][0], STEPS + 1)]
    other, _ = studio.generate_image("7", "", 16, 8, STEPS, 3.0, 12, False)
    assert not np.array_equal(image, other)  # the seed matters


def test_randomized_seed_is_reported_and_reproduces(studio):
    image, seed = studio.generate_image("4", "", 16, 8, STEPS, 3.0, 0, True)
    again, seed2 = studio.generate_image("4", "", 16, 8, STEPS, 3.0, seed, False)
    assert seed2 == seed and np.array_equal(image, again)


def test_generate_video_writes_an_mp4_of_the_frames(studio, served):
    from ursa_engine.media import read_video

    path, seed = studio.generate_video("6", "", 16, 8, 4, STEPS, 3.0, 2, False, 9)
    frames, _ = read_video(path)
    assert seed == 2 and frames.shape == (4, 8, 16, 3)


def test_sessions_at_once_share_forward_passes_and_get_their_alone_outputs(served, monkeypatch):
    """Three 'sessions' queue while the batch loop is stopped, then join the first step together: a
    forward pass carries all of them, and each result equals the same request run alone."""
    cases = [("1", 21), ("5", 22), ("8", 23)]
    b = Batcher(served.engine, max_rows=16, max_queue=16)
    st = Studio(served, b)
    spy = ForwardSpy(b, served.engine.model, monkeypatch)
    out = {}

    def session(i):
        out[i] = st.generate_image(cases[i][0], "", 16, 8, STEPS, 3.0, cases[i][1], False)[0]

    threads = [threading.Thread(target=session, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    deadline = time.time() + 30
    while b.stats()["queued"] < 3 and time.time() < deadline:
        time.sleep(0.01)
    assert b.stats()["queued"] == 3
    b.start()
    for t in threads:
        t.join(60)
    b.stop()
    assert len(spy.shared()) == STEPS - 1 and max(len(p["prompts"]) for p in spy.shared()) == 3  # step 0 skips CFG
    for i, (digit, seed) in enumerate(cases):
        np.testing.assert_array_equal(out[i], engine_image(served, int(digit), seed))


@pytest.mark.parametrize("args, message", [
    (dict(width=15), "width: 15 pixels; expected a positive multiple of 2"),
    (dict(height=0), "height: 0 pixels"),
    (dict(width=2.5), "width: expected a whole number, got 2.5"),
    (dict(steps=0), "steps: expected 1..1000"),
    (dict(guidance=float("nan")), "guidance: expected a finite number"),
    (dict(seed=-1), "seed: expected 0.."),
    (dict(prompt=""), "prompt: type a prompt first"),
    (dict(prompt="12"), "prompt: the digits model takes one digit class 0-9"),
    (dict(negative_prompt="x" * 5000), "negative_prompt: 5000 characters, over this server's limit of 4096"),
    (dict(width=4096, height=4096), "size: 4096x4096 pixels are 4194304 latent tokens a frame"),
    (dict(steps=1001), "steps: expected 1..1000"),
])
def test_bad_inputs_are_one_line_naming_the_field(studio, args, message):
    kw = dict(prompt="7", negative_prompt="", width=16, height=8, steps=STEPS, guidance=3.0, seed=0,
              randomize_seed=False) | args
    with pytest.raises(UIError) as info:
        studio.generate_image(**kw)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert studio.batcher.stats() == {"queued": 0, "running": 0, "active_rows": 0}  # nothing queued


def test_queue_full_and_per_key_limit_are_readable(served):
    b = Batcher(served.engine, max_rows=16, max_queue=1)  # not started: queued jobs stay queued
    st = Studio(served, b, Limits(max_concurrent_per_key=2))
    threading.Thread(target=lambda: _quiet(st.generate_image, "3", "", 16, 8, STEPS, 3.0, 0, False),
                     daemon=True).start()
    deadline = time.time() + 30
    while b.stats()["queued"] < 1 and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(UIError, match=r"^queue full: the server has 1 requests waiting; try again in a moment$"):
        st.generate_image("3", "", 16, 8, STEPS, 3.0, 1, False)
    st.inflight.reserve("anon", None)  # a second job of this key in flight (e.g. over HTTP)
    with pytest.raises(UIError, match=r"^busy: this key already has 2 requests queued or running"):
        st.generate_image("3", "", 16, 8, STEPS, 3.0, 1, False)
    b.stop()  # the queued job is cancelled: its session gets a readable error


def _quiet(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except UIError:
        pass


def test_conditioning_tabs_refuse_readably(studio, served):
    img = np.zeros((8, 16, 3), np.uint8)
    if not conditioning_available():
        with pytest.raises(UIError, match="not available on this server"):
            studio.generate_video("6", "", 16, 8, 4, STEPS, 3.0, 0, False, 9, image=img)
        return
    with pytest.raises(UIError, match=r"^image: expected an RGB picture"):
        studio.generate_video("6", "", 16, 8, 4, STEPS, 3.0, 0, False, 9, image=np.zeros((8, 16, 2), np.uint8))
    for junk in (b"not an image" * 50, np.zeros(0, np.uint8).tobytes()):  # Gradio hands over the file unread
        with pytest.raises(UIError, match=r"^image: ") as info:
            studio.generate_video("6", "", None, None, 4, STEPS, 3.0, 0, False, 9, image=junk)
        assert "\n" not in str(info.value) and "Traceback" not in str(info.value) and "0x" not in str(info.value)
    assert studio.batcher.stats() == {"queued": 0, "running": 0, "active_rows": 0}


def test_an_image_upload_is_resized_and_centre_cropped_to_the_video_size(studio):
    from ursa_engine.ui.handlers import fit_image

    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (8, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(fit_image(wide, 16, 8), wide[:, 8:24])  # same height: the middle columns
    small = rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)  # 13x9: scaled to cover 16x8 (16x11), then cropped
    assert fit_image(small, 16, 8).shape == (8, 16, 3)
    exact = rng.integers(0, 256, (8, 16, 3), dtype=np.uint8)
    assert fit_image(exact, 16, 8) is exact
    if conditioning_available():  # a 13x9 picture on the image -> video tab (no width / height there) works
        path, _ = studio.generate_video("6", "", None, None, 4, STEPS, 3.0, 0, False, 9, image=small)
        from ursa_engine.media import read_video

        assert read_video(path)[0].shape == (4, 8, 16, 3)


def test_a_stopped_or_closed_page_cancels_its_job(ui, monkeypatch):
    """The page goes away mid-run: Gradio's /cancel (gradio_client's job.cancel()) and the handler's
    ``cancelled`` flag free the batch rows within a second, not when the 200-step job would end (~40 s)."""
    step = ui.batcher._forward_and_step

    def slow(jobs):
        time.sleep(0.2)
        return step(jobs)

    monkeypatch.setattr(ui.batcher, "_forward_and_step", slow)

    def wait(cond, timeout=30.0):
        deadline = time.time() + timeout
        while not cond() and time.time() < deadline:
            time.sleep(0.02)
        return cond()

    def idle():
        return ui.batcher.stats() == {"queued": 0, "running": 0, "active_rows": 0}

    assert wait(idle)
    stop = threading.Event()  # the handler level: the flag a closed page / a Gradio cancel sets
    t = threading.Thread(target=_quiet, args=(ui.studio.generate_image, "3", "", 16, 8, 200, 3.0, 0, False),
                         kwargs={"cancelled": stop.is_set}, daemon=True)
    t.start()
    assert wait(lambda: ui.batcher.stats()["running"] == 1)
    t0 = time.time()
    stop.set()
    assert wait(idle, 5) and time.time() - t0 < 2.0
    t.join(5)
    client = gradio_client.Client(ui.url, verbose=False)  # over HTTP: Gradio's cancel of a running event
    job = client.submit("3", "", 16, 8, 200, 3.0, 0, False, api_name="/generate_image")
    assert wait(lambda: ui.batcher.stats()["running"] == 1)
    t0 = time.time()
    job.cancel()
    assert wait(idle, 5) and time.time() - t0 < 3.0, ui.batcher.stats()
    assert ui.studio.inflight.reserve("anon", 1)  # the per-key count was released too
    ui.studio.inflight.release("anon")


@pytest.mark.skipif(not conditioning_available(), reason="the batcher takes no conditioning frames")
def test_image_to_video_and_extension_equal_engine_generate(studio, served):
    """The upload is encoded with the engine's tokenizer and held as the first latent frame(s): the tokens
    equal :meth:`Engine.generate` with the same image / video (frozen, as the digits demo)."""
    e = served.engine
    image, _ = studio.generate_image("3", "", 16, 8, STEPS, 3.0, 5, False)
    prompt = digits.prompt_ids([3], e.model.config.pad_token_id)
    req = studio.condition(studio.request("3", "", 16, 8, 4, STEPS, 3.0, 6, False), image=image)
    tokens = studio.run(req)
    ref = e.generate(prompt, latents_shape=(4, 4, 8), num_steps=STEPS, guidance_scale=3.0, seed=6, image=image,
                     freeze_cond=True, decode=False).tokens
    assert torch.equal(tokens, ref)
    assert torch.equal(tokens[0, 0], e.encode_condition(image=image, latents_shape=(4, 4, 8))[0, 0])
    clip = served.frames(tokens)[0]  # (4, 8, 16, 3)
    req = studio.condition(studio.request("3", "", 16, 8, 4, STEPS, 3.0, 7, False), video=clip, cond_frames=1)
    assert req.cond_noise_scale == 0.1
    ref = e.generate(prompt, latents_shape=(4, 4, 8), num_steps=STEPS, guidance_scale=3.0, seed=7, video=clip,
                     num_cond_frames=1, cond_noise_scale=0.1, freeze_cond=True, decode=False).tokens
    assert torch.equal(studio.run(req), ref)
    from ursa_engine.media import read_video

    path, _ = studio.generate_video("3", "", None, None, 4, STEPS, 3.0, 7, False, video=clip, cond_frames=1)
    assert read_video(path)[0].shape == (4 + 3, 8, 16, 3)  # the upload, then the new clip past its kept frame
    with pytest.raises(UIError, match=r"^cond_frames: 4 frames are 4 latent frames, the new clip has 4"):
        studio.generate_video("3", "", None, None, 4, STEPS, 3.0, 7, False, video=clip, cond_frames=4)


@pytest.mark.skipif(not conditioning_available(), reason="the batcher takes no conditioning frames")
def test_a_video_checkpoint_with_text_prompts_motion_and_uploads(tmp_path):
    """A tiny URSA video root (tokenizer of temporal stride 4, text prompts): text -> video with a motion
    score, image -> video and the extension of a 5-frame clip by its last 5 frames (1 + 4k)."""
    from roots import write_tiny_root

    from ursa_engine.media import read_video

    served = ServedModel.load(write_tiny_root(tmp_path / "root", family="cosmos3d"))
    b = Batcher(served.engine).start()
    try:
        st = Studio(served, b)
        assert st.video_size == (512, 320) and st.default_negative.startswith("worst quality")
        path, _ = st.generate_video("a bear in the snow", "", 16, 16, 5, 2, 7.0, 1, False, 9)
        clip = read_video(path)[0]
        assert clip.shape == (5, 16, 16, 3)
        e = served.engine
        ref = e.generate(["a bear in the snow"], latents_shape=(2, 2, 2), num_steps=2, guidance_scale=7.0, seed=1,
                         motion=9, decode=False).tokens
        req = st.request("a bear in the snow", "", 16, 16, 5, 2, 7.0, 1, False, 9)
        assert torch.equal(st.run(req), ref)  # the motion prefix is in the prompt ids
        assert read_video(st.generate_video("a bear", "", 16, 16, 5, 2, 7.0, 1, False, 9, image=clip[0])[0])[
            0].shape == (5, 16, 16, 3)
        longer = st.generate_video("a bear", "", None, None, 9, 2, 7.0, 1, False, 9, video=clip, cond_frames=5)[0]
        assert read_video(longer)[0].shape == (5 + 4, 16, 16, 3)
        with pytest.raises(UIError, match=r"^cond_frames: the video tokenizer encodes 1 \+ 4k frames"):
            st.generate_video("a bear", "", None, None, 9, 2, 7.0, 1, False, 9, video=clip, cond_frames=3)
        # refusals name what the person set: size (one frame over max_tokens), else frames; the upload's
        # size names the upload; no "size: num_frames:" double prefix; frames the tokenizer cannot decode whole
        big = st.batcher.max_tokens
        cases = [((4096, 4096, 5), r"^size: 4096x4096 pixels are \d+ latent tokens a frame"),
                 ((16, 16, 1 + 4 * (big // 8)), r"^frames: \d+ frames at 16x16 are \d+ latent frames .*: at most 9 "
                                                r"frames at this size$"),
                 ((16, 16, 2), r"^frames: this tokenizer takes 1 \+ 4k frames \(1, 5, 9, \.\.\.\), got 2$"),
                 ((16, 16, 13), r"^frames: this tokenizer decodes 13 frames as 9 \(it decodes temporal tiles of 9 "
                                r"frames and leaves a partial one out\): ask for 9 frames$"),
                 ((16, 16, 401), r"^frames: this tokenizer decodes 401 frames as 265 .*: ask for 9 frames$"),
                 ((13, 16, 5), r"^width: 13 pixels; expected a positive multiple of 8 \(e\.g\. 512\)$")]
        for (w, h, f), message in cases:
            with pytest.raises(UIError, match=message):
                st.generate_video("a bear", "", w, h, f, 2, 7.0, 1, False, 9)
        with pytest.raises(UIError, match=r"^video: 12x16 pixels; this tokenizer needs a width and height that are "
                                          r"multiples of 8 \(e\.g\. 512x320\)$"):
            st.generate_video("a bear", "", None, None, 9, 2, 7.0, 1, False, 9, video=clip[:, :, :12], cond_frames=5)
        st.video_size = (24, 16)  # (512 x 320 for URSA: too slow here)
        bear = st.generate_video("a bear", "", None, None, 5, 1, 7.0, 1, False, 9, image=clip[0, :9, :13])[0]
        assert read_video(bear)[0].shape == (5, 16, 24, 3)  # a 13x9 upload on that tab: the checkpoint's video size
    finally:
        b.stop()


# ---------------------------------------------------------------------------------------------- over HTTP
def test_named_endpoint_through_gradio_client(ui, served):
    client = gradio_client.Client(ui.url, verbose=False)
    path, seed = client.predict("2", "", 16, 8, STEPS, 3.0, 31, False, api_name="/generate_image")
    from PIL import Image

    image = np.asarray(Image.open(path).convert("RGB"))
    assert seed == 31 and image.shape == (8, 16, 3)
    np.testing.assert_array_equal(image, engine_image(served, 2, 31))
    with pytest.raises(gradio_client.exceptions.AppError, match="width: 15 pixels; expected a positive multiple"):
        client.predict("2", "", 15, 8, STEPS, 3.0, 31, False, api_name="/generate_image")
    if conditioning_available():  # an upload through the client: image -> video, then its extension
        from ursa_engine.media import read_video, save_image

        png = save_image(ui.studio.out_dir / "first.png", image)
        clip_path, _ = client.predict(gradio_client.handle_file(str(png)), "2", "", 4, STEPS, 3.0, 1, False, 9,
                                      api_name="/image_to_video")
        clip = read_video(clip_path)[0]
        assert clip.shape == (4, 8, 16, 3) and np.abs(clip[0].astype(int) - image).mean() < 8  # H.264, lossy
        longer, _ = client.predict(gradio_client.handle_file(clip_path), "2", "", 4, 1, STEPS, 3.0, 2,
                                   False, 9, api_name="/extend_video")
        assert read_video(longer)[0].shape == (7, 8, 16, 3)
    info = httpx.get(ui.url + "gradio_api/info", timeout=30).json()["named_endpoints"]
    assert {"/generate_image", "/generate_video", "/image_to_video", "/extend_video"} <= set(info)
    params = {p["parameter_name"]: p for p in info["/generate_image"]["parameters"]}
    assert list(params) == ["prompt", "negative_prompt", "width", "height", "steps", "guidance", "seed",
                            "randomize_seed"]
    assert info["/generate_image"]["description"].startswith("Text to image: one sample")  # the docstring
    assert params["width"]["parameter_default"] == 16 and params["steps"]["parameter_default"] == 50


def test_api_keys_put_the_page_behind_a_login(served):
    s = UIServer(served, limits=Limits(api_keys=("sesame", "other")))
    try:
        with httpx.Client(base_url=s.base, timeout=30) as c:
            assert c.get("/config").status_code == 401
            assert c.post("/gradio_api/upload", files={"files": ("a.png", b"x")}).status_code == 401
            assert c.post("/login", data={"username": "ann", "password": "wrong"}).status_code == 400
        with pytest.raises(Exception):  # noqa: B017 (gradio_client raises a plain ValueError / AppError)
            gradio_client.Client(s.url, verbose=False).predict("2", "", 16, 8, STEPS, 3.0, 1, False,
                                                                api_name="/generate_image")
        client = gradio_client.Client(s.url, auth=("ann", "sesame"), verbose=False)
        _, seed = client.predict("2", "", 16, 8, STEPS, 3.0, 1, False, api_name="/generate_image")
        assert seed == 1
        with httpx.Client(base_url=s.base, timeout=30) as c:  # a user name stays bound to its first key
            assert c.post("/login", data={"username": "ann", "password": "other"}).status_code == 400
            assert c.post("/login", data={"username": "bob", "password": "other"}).status_code == 200
    finally:
        s.close()


def test_serve_ui_mount_keeps_the_api_and_its_key(served):
    s = UIServer(served, limits=Limits(api_keys=("sesame",), max_upload_bytes=2000), with_api=True)
    try:
        assert s.studio.inflight is s.app.state.api.state.inflight  # one per-key count for the API and the page
        with httpx.Client(base_url=s.base, timeout=30) as c:
            big = c.post("/ui/gradio_api/upload", files={"files": ("a.png", b"x" * 3000)})
            assert big.status_code == 413 and "limit of 2000 bytes" in big.text  # max_upload_bytes, before parsing
            for query in ("", "?__theme=dark"):  # "/ui" is the page (no key needed to be sent to its login)
                r = c.get("/ui" + query, follow_redirects=False)
                assert r.status_code == 307 and r.headers["location"] == "/ui/" + query
            # the page's body bound is not the API's: a 3 KB JSON body (max_body_bytes 1 MiB) is generated
            padded = json.dumps({"prompt": "3", "steps": STEPS, "seed": 1, "response_format": "png"}) + " " * 3000
            r = c.post("/v1/images/generations", content=padded, headers={"Authorization": "Bearer sesame",
                                                                           "Content-Type": "application/json"})
            assert r.status_code == 200, r.text
            assert c.get("/health").json()["status"] == "ok"
            body = {"prompt": "3", "steps": STEPS, "seed": 1, "response_format": "png"}
            assert c.post("/v1/images/generations", json=body).status_code == 401
            r = c.post("/v1/images/generations", json=body, headers={"Authorization": "Bearer sesame"})
            assert r.status_code == 200 and r.headers["content-type"] == "image/png"
            assert c.get("/ui/config").status_code == 401  # the page needs the login too
            assert c.get("/openapi.json", headers={"Authorization": "Bearer sesame"}).json()["info"]["title"] == \
                "ursa-engine"  # the API's own schema, not a wrapper's
        client = gradio_client.Client(s.url, auth=("ann", "sesame"), verbose=False)
        path, _ = client.predict("3", "", 16, 8, STEPS, 3.0, 1, False, api_name="/generate_image")
        from PIL import Image

        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")),
                              np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")))  # API == UI
    finally:
        s.close()


def test_serve_ui_without_keys_redirects_ui_to_the_page_and_logs_it(served):
    import logging

    from fastapi.testclient import TestClient

    from ursa_engine.serve.app import create_app
    from ursa_engine.ui import mount

    seen, log = [], logging.getLogger("uvicorn.error")  # uvicorn's loggers do not reach the root (caplog)
    handler, level = logging.Handler(logging.INFO), log.level
    handler.emit = lambda record: seen.append(record.getMessage())
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    b = Batcher(served.engine)  # not started: nothing is generated here
    try:
        with TestClient(mount(create_app(served, b), served, b)) as c:  # runs the app's startup
            assert any("the web page is at /ui/" in m for m in seen), seen
            r = c.get("/ui")
            assert r.status_code == 200 and r.url.path == "/ui/" and "<html" in r.text.lower()
            assert "worker_alive" in c.get("/health").json()  # every other path is the API's
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


# ---------------------------------------------------------------------------------------------- CLI
def test_ursa_engine_ui_serves_the_page(tmp_path):
    """``ursa-engine ui --port P`` as a user runs it: the page and its endpoints answer, Ctrl-C ends it."""
    import signal
    import subprocess
    import sys

    from ui_server import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ursa_engine", "ui", "--port", str(port)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, page = time.time() + 120, None
        while page is None and time.time() < deadline and proc.poll() is None:
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
            except httpx.TransportError:
                time.sleep(0.25)
        assert page is not None and page.status_code == 200, proc.stdout.read() if proc.poll() is not None else ""
        info = httpx.get(f"http://127.0.0.1:{port}/gradio_api/info", timeout=30).json()["named_endpoints"]
        assert "/generate_image" in info and "/generate_video" in info
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert f"ursa-engine ui: http://127.0.0.1:{port}/ (digits on cpu)" in out and proc.returncode == 0, out


def test_serve_ui_flag_passes_through(monkeypatch):
    from ursa_engine import cli

    seen = {}
    monkeypatch.setattr("ursa_engine.serve.app.serve", lambda root=None, **kw: seen.update(root=root, **kw))
    assert cli.main(["serve", "--ui", "--port", "8123"]) == 0
    assert seen["ui"] is True and seen["port"] == 8123
    assert cli.main(["serve", "--port", "8123"]) == 0 and seen["ui"] is False


def test_ui_subcommand_flags(monkeypatch):
    from ursa_engine import cli

    seen = {}
    monkeypatch.setattr("ursa_engine.ui.launch", lambda root=None, **kw: seen.update(root=root, **kw))
    assert cli.main(["ui", "--port", "7999", "--max-rows", "4"]) == 0
    assert seen["root"] is None and seen["port"] == 7999 and seen["host"] == "127.0.0.1" and seen["max_rows"] == 4
    monkeypatch.setenv("URSA_API_KEY", "k1,k2")
    assert cli.main(["ui", "some/root", "--api-key", "k3"]) == 0
    assert seen["root"] == "some/root" and seen["limits"].api_keys == ("k3", "k1", "k2")
    assert cli.main(["ui", "--port", "70000"]) == 2
    assert cli.main(["ui", "--max-upload-bytes", "0"]) == 2


def test_ui_max_tokens_reaches_the_batcher(monkeypatch):
    """`ursa-engine ui --max-tokens N` sizes the page's batcher as `serve --max-tokens N` does."""
    import uvicorn

    from ursa_engine.cli import main
    from ursa_engine.serve import batcher as batcher_mod

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    original = batcher_mod.Batcher.__init__

    def spy(self, engine, **kw):
        seen["max_tokens"] = kw.get("max_tokens")
        original(self, engine, **kw)

    monkeypatch.setattr(batcher_mod.Batcher, "__init__", spy)
    assert main(["ui", "--port", "0", "--max-tokens", "777"]) == 0
    assert seen["max_tokens"] == 777 and seen["port"] == 0
