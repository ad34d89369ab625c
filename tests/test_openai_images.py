"""Issue 23 (items 1-3, 6, 7 for images): the official ``openai`` client against ``ursa-engine serve``.

A loopback server around the bundled digits model (16x8 images, a patch tokenizer of stride 2: its
encode -> decode round trip is exact per patch), with an API key; every standard field of
``images.generate`` once (honoured / recorded / ignored / refused as ``serve/image_schema.py``
documents), OpenAI's stream with partial images, ``images.edit`` with and without a mask (the kept
area equals the input's round trip exactly), bad masks and uploads, and property tests of masks.
"""

from __future__ import annotations

import base64
import io
import logging
import time

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("multipart")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402
from test_serve import Server  # noqa: E402
from test_uploads import png_bomb  # noqa: E402

from ursa_engine.serve.image_schema import quality_steps  # noqa: E402
from ursa_engine.serve.security import Limits  # noqa: E402

KEY = "sk-test-0123456789"
STEPS = 4
UPLOAD = 48 << 10  # the server's max_upload_bytes here


@pytest.fixture(scope="module")
def server(served):
    s = Server(served, Limits(api_keys=(KEY,), max_upload_bytes=UPLOAD, max_image_pixels=64 * 64),
               max_rows=16, max_queue=64)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


def gen(client, prompt="7", seed=1, **kw):
    extra = {"steps": STEPS, "seed": seed, **kw.pop("extra_body", {})}
    return client.images.generate(prompt=prompt, extra_body=extra, **kw)


def pil(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def pixels(b64: str) -> np.ndarray:
    return np.asarray(pil(b64).convert("RGB"))


def refused(call, param: str, status: int = 400, text: str | None = None):
    """The call raises one OpenAI status error naming ``param``."""
    with pytest.raises(openai.APIStatusError) as info:
        call()
    err = info.value
    assert err.status_code == status, (err.status_code, err.body)
    assert err.body["param"] == param and param in err.body["message"], err.body
    if text is not None:
        assert text in err.body["message"], err.body
    return err


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------- generations
def test_plain_generate_is_an_images_response(client, served):
    r = gen(client)
    assert r.created > 0 and len(r.data) == 1 and r.output_format == "png" and r.size == "16x8"
    img = pil(r.data[0].b64_json)
    assert img.format == "PNG" and img.size == (16, 8)
    assert r.background == "opaque" and r.quality == "high"
    u = r.usage
    assert u.input_tokens_details.text_tokens == served.text_tokens(served.prompt_ids("7")) == 2
    assert u.input_tokens_details.image_tokens == 0
    assert u.output_tokens == 4 * 8 and u.total_tokens == u.input_tokens + u.output_tokens
    extra = r.to_dict()
    assert extra["steps"] == STEPS and extra["seed"] == 1 and extra["latents_shape"] == [1, 4, 8]
    two = gen(client, n=2)
    assert len(two.data) == 2 and two.usage.output_tokens == 2 * 32
    assert two.data[0].b64_json == r.data[0].b64_json  # sample b uses seed + b


def test_output_formats_and_compression(client):
    ref = pixels(gen(client).data[0].b64_json)
    jpg = gen(client, output_format="jpeg")
    assert jpg.output_format == "jpeg" and pil(jpg.data[0].b64_json).format == "JPEG"
    low = gen(client, output_format="jpeg", output_compression=5).data[0].b64_json
    high = gen(client, output_format="jpeg", output_compression=95).data[0].b64_json
    assert low != high and len(base64.b64decode(low)) < len(base64.b64decode(high))
    assert np.abs(pixels(high).astype(int) - ref).mean() < np.abs(pixels(low).astype(int) - ref).mean()
    webp = gen(client, output_format="webp").data[0].b64_json  # 100 (the default): lossless
    assert pil(webp).format == "WEBP" and np.array_equal(pixels(webp), ref)
    assert gen(client, output_format="webp", output_compression=20).data[0].b64_json != webp
    assert gen(client, output_format="png", output_compression=3).data[0].b64_json == gen(client).data[0].b64_json
    g = gen(client, output_format="gif", frame_count=3, frame_duration_ms=120)
    img = pil(g.data[0].b64_json)
    assert img.format == "GIF" and img.n_frames == 3 and img.info["duration"] == 120
    assert g.to_dict()["latents_shape"] == [3, 4, 8]
    assert pil(gen(client, output_format="gif").data[0].b64_json).n_frames == 9  # OpenAI's default
    refused(lambda: gen(client, output_format="svg"), "output_format")
    refused(lambda: gen(client, svg={"model": "any"}), "svg")
    refused(lambda: gen(client, frame_count=4), "frame_count")
    refused(lambda: gen(client, frame_duration_ms=100), "frame_duration_ms")
    refused(lambda: gen(client, output_compression=101), "output_compression")


def test_quality_maps_to_steps(client, served):
    default = served.engine.scheduler_for(None, None, 1).num_steps
    seen = {}
    for q in ("low", "medium", "high", "max"):
        r = client.images.generate(prompt="3", quality=q, extra_body={"seed": 2})
        seen[q] = r.to_dict()["steps"]
        assert seen[q] == quality_steps(q, default) and r.quality == q
    assert seen["low"] < seen["medium"] < seen["high"] == default < seen["max"]
    r = client.images.generate(prompt="3", quality="auto", extra_body={"seed": 2})
    assert r.to_dict()["steps"] == default and r.quality == "high"
    r = gen(client, quality="low")  # steps wins
    assert r.to_dict()["steps"] == STEPS and r.quality == "low"


def test_accepted_ignored_recorded_and_refused_fields(client, server, caplog):
    ref = gen(client).data[0].b64_json
    # ignored: the same image for the same seed
    for kw in (dict(style="vivid"), dict(moderation="low"), dict(complexity="high"), dict(model="gpt-image-1"),
               dict(background="auto"), dict(background="opaque"), dict(size="auto"), dict(partial_images=2),
               dict(response_format="b64_json")):
        assert gen(client, **kw).data[0].b64_json == ref, kw
    refused(lambda: gen(client, background="transparent"), "background", text="alpha")
    refused(lambda: gen(client, response_format="url"), "response_format", text="b64_json")
    refused(lambda: gen(client, extra_body={"bogus": 1}), "bogus")
    refused(lambda: gen(client, size="15x8"), "size")
    assert pil(gen(client, size="32x16").data[0].b64_json).size == (32, 16)
    # recorded: echoed, counted per key index, never as a label
    metrics = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text

    def count(name):
        line = [s for s in metrics.splitlines() if s.startswith(name + '{key="k0"}')]
        return int(line[0].split()[-1]) if line else 0

    before = count("ursa_key_identified_requests_total"), count("ursa_key_requests_total")
    log = logging.getLogger("uvicorn.error.ursa")  # uvicorn's loggers do not propagate to the root (caplog)
    log.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger=log.name)
    try:
        assert gen(client, user="alice-hash").safety_identifier == "alice-hash"
    finally:
        log.removeHandler(caplog.handler)
    lines = [r.getMessage() for r in caplog.records if r.name == log.name]
    assert any("images.generations" in m and "key=k0" in m and "user='alice-hash'" in m for m in lines), lines
    assert gen(client, user="alice-hash", safety_identifier="sid-7").safety_identifier == "sid-7"
    metrics = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert (count("ursa_key_identified_requests_total"), count("ursa_key_requests_total")) == \
        (before[0] + 2, before[1] + 2)
    assert count("ursa_key_end_users") >= 2
    assert "alice" not in metrics and "sid-7" not in metrics


def test_api_key_required(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError):
            gen(c)
        with pytest.raises(openai.AuthenticationError):
            c.images.edit(image=("a.png", png_bytes(np.zeros((8, 16, 3), np.uint8))), prompt="1")


# ---------------------------------------------------------------------------- streams
def test_stream_partial_images_then_completed(client):
    plain = gen(client, seed=3, extra_body={"steps": 8})
    events = list(gen(client, seed=3, stream=True, partial_images=2, extra_body={"steps": 8}))
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["ImageGenPartialImageEvent"] * 2 + ["ImageGenCompletedEvent"], kinds
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert [e.to_dict()["step"] for e in events[:2]] == [3, 5]  # evenly spaced in 8 steps
    for e in events:
        assert e.size == "16x8" and e.output_format == "png" and e.background == "opaque" and e.created_at > 0
        assert pil(e.b64_json).size == (16, 8)
    done = events[-1]
    assert done.type == "image_generation.completed" and done.b64_json == plain.data[0].b64_json
    assert done.usage.output_tokens == 32 and done.usage.input_tokens_details.text_tokens == 2
    assert events[1].b64_json != done.b64_json  # a partial image is the state at its step
    zero = list(gen(client, seed=3, stream=True, extra_body={"steps": 8}))
    assert len(zero) == 1 and zero[0].b64_json == plain.data[0].b64_json
    jpg = list(gen(client, seed=3, stream=True, partial_images=1, output_format="jpeg"))
    assert [pil(e.b64_json).format for e in jpg] == ["JPEG", "JPEG"]
    refused(lambda: list(gen(client, stream=True, n=2)), "n")
    refused(lambda: list(gen(client, stream=True, output_format="gif")), "stream")


def test_stream_cancel_ends_with_an_error_event(client, server):
    stream = gen(client, seed=4, stream=True, partial_images=3, extra_body={"steps": 1000, "guidance": 1.0,
                                                                             "request_id": "long-one"})
    first = next(iter(stream))
    assert first.type == "image_generation.partial_image"
    r = httpx.delete(server.url + "/v1/requests/long-one", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    with pytest.raises(openai.APIError, match="cancel"):
        for _ in stream:
            pass


# ---------------------------------------------------------------------------- edits
def _source(seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (8, 16, 3), dtype=np.uint8)


def _round_trip(served, img: np.ndarray) -> np.ndarray:
    codes = served.engine.vae.encode_frames(torch.from_numpy(img)[None, None])
    return served.frames(codes)[0, 0]


def _mask(keep: np.ndarray) -> bytes:
    rgba = np.zeros((*keep.shape, 4), np.uint8)
    rgba[..., 3] = np.where(keep, 255, 0)
    return png_bytes(rgba)


def test_edit_with_mask_keeps_the_round_trip(client, served):
    img = _source()
    keep = np.ones((8, 16), bool)
    keep[:, :8] = False  # alpha 0: the left half is regenerated
    keep[0, 15] = False  # a single pixel: its whole 2x2 patch is regenerated
    r = client.images.edit(image=("in.png", png_bytes(img)), mask=("m.png", _mask(keep)), prompt="5", n=2,
                           extra_body={"steps": STEPS, "seed": 9})
    ref = _round_trip(served, img)
    kept = np.ones((8, 16), bool)
    kept[:, :8] = False
    kept[0:2, 14:16] = False
    assert r.size == "16x8" and r.usage.input_tokens_details.image_tokens == 32
    for d in r.data:
        out = pixels(d.b64_json)
        assert np.array_equal(out[kept], ref[kept])
        assert not np.array_equal(out[~kept], ref[~kept])  # regenerated (16-level digit pixels vs noise)
    streamed = list(client.images.edit(image=("in.png", png_bytes(img)), mask=("m.png", _mask(keep)), prompt="5",
                                       stream=True, partial_images=1, extra_body={"steps": STEPS, "seed": 9}))
    assert [e.type for e in streamed] == ["image_edit.partial_image", "image_edit.completed"]
    assert streamed[-1].b64_json == r.data[0].b64_json


def test_edit_without_mask_conditions_on_the_image(client, served):
    img = _source(1)
    r = client.images.edit(image=("in.png", png_bytes(img)), prompt="2", output_format="webp",
                           extra_body={"steps": STEPS, "seed": 1, "strength": 0.0})
    assert pil(r.data[0].b64_json).format == "WEBP" and r.size == "16x8"
    # a list of one image is sent as image[]; JSON with a data URL works too
    r2 = client.images.edit(image=[("in.png", png_bytes(img))], prompt="2",
                            extra_body={"steps": STEPS, "seed": 1, "strength": 0.0})
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()
    r3 = httpx.post(client.base_url.join("images/edits").__str__(), headers={"Authorization": f"Bearer {KEY}"},
                    json={"prompt": "2", "image": data_url, "steps": STEPS, "seed": 1, "strength": 0.0}, timeout=60)
    assert r3.status_code == 200, r3.text
    assert r3.json()["data"][0]["b64_json"] == r2.data[0].b64_json
    assert np.array_equal(pixels(r2.data[0].b64_json), pixels(r.data[0].b64_json))  # webp 100 is lossless
    refused(lambda: client.images.edit(image=("in.png", png_bytes(img)), prompt="2", output_format="gif"),
            "output_format")

    def run(src, strength):
        return client.images.edit(image=("in.png", png_bytes(src)), prompt="2",
                                  extra_body={"steps": STEPS, "seed": 1, "strength": strength}).data[0].b64_json

    other = _source(2)
    assert run(img, 0.0) != run(other, 0.0) and run(img, 0.7) != run(other, 0.7)  # the image is the start
    assert run(img, 1.0) == run(other, 1.0)  # strength 1: resampled from t = 0, the image no longer matters


def test_bad_edits(client):
    img = png_bytes(_source())
    keep = np.ones((8, 16), bool)

    def edit(**kw):
        extra = {"steps": 2, **kw.pop("extra_body", {})}
        return client.images.edit(**{"image": ("in.png", img), "prompt": "1", **kw}, extra_body=extra)

    refused(lambda: edit(mask=("m.png", _mask(np.ones((8, 14), bool)))), "mask", text="size")
    refused(lambda: edit(mask=("m.png", png_bytes(np.zeros((8, 16, 3), np.uint8)))), "mask", text="alpha")
    refused(lambda: edit(mask=("m.png", b"not an image")), "mask")
    refused(lambda: edit(image=("in.png", png_bytes(np.zeros((8, 15, 3), np.uint8)))), "image")
    refused(lambda: edit(image=("in.png", b"GIF89a....")), "image")
    refused(lambda: edit(image=("bomb.png", png_bomb())), "image", text="max_image_pixels")
    refused(lambda: edit(size="32x16", mask=("m.png", _mask(keep))), "size")
    refused(lambda: edit(markup=("k.png", img)), "markup")
    refused(lambda: edit(extra_body={"bogus": "1"}), "bogus")
    refused(lambda: edit(background="transparent"), "background")
    big = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # ~12 KB of PNG per copy
    with pytest.raises(openai.APIStatusError) as info:
        client.images.edit(image=[("a.png", png_bytes(big))] * 5, prompt="1")
    assert info.value.status_code == 413
    assert edit(mask=("m.png", _mask(keep)), input_fidelity="high").data  # accepted, ignored


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.one_of(st.just((8, 16)), st.tuples(st.integers(1, 20), st.integers(1, 20))),
       fill=st.sampled_from(["empty", "full", "random"]), seed=st.integers(0, 2**16))
def test_masks_property(client, served, size, fill, seed):
    """Odd sizes, sizes that differ from the image, empty and full masks: a result or one clear 4xx."""
    mh, mw = size
    img = _source(seed)
    rng = np.random.default_rng(seed)
    keep = {"empty": np.ones((mh, mw), bool), "full": np.zeros((mh, mw), bool),
            "random": rng.random((mh, mw)) < 0.5}[fill]
    try:
        r = client.images.edit(image=("in.png", png_bytes(img)), mask=("m.png", _mask(keep)), prompt="4",
                               extra_body={"steps": 2, "seed": seed})
    except openai.APIStatusError as err:
        assert (mh, mw) != (8, 16) and err.status_code == 400 and err.body["param"] == "mask", err.body
        return
    assert (mh, mw) == (8, 16)
    out, ref = pixels(r.data[0].b64_json), _round_trip(served, img)
    patch = keep.reshape(4, 2, 8, 2).all(axis=(1, 3)).repeat(2, 0).repeat(2, 1)  # kept patches
    assert np.array_equal(out[patch], ref[patch])


def test_edit_limits_go_through_the_gateway(served):
    """Prompt characters, n and per-key concurrency hold for edits as for every route."""
    s = Server(served, Limits(max_prompt_chars=8, max_n=2, max_concurrent_per_key=1), max_rows=8, max_queue=8)
    try:
        with openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60) as c:
            img = ("in.png", png_bytes(_source()))
            refused(lambda: c.images.edit(image=img, prompt="7" * 9), "prompt", text="max_prompt_chars")
            refused(lambda: c.images.edit(image=img, prompt="7", n=3), "n", text="max_n")
            hog = c.images.edit(image=img, prompt="7", stream=True, partial_images=3,
                                extra_body={"steps": 1000, "guidance": 1.0, "request_id": "hog"})
            assert next(iter(hog)).type == "image_edit.partial_image"
            err = refused(lambda: c.images.edit(image=img, prompt="7", extra_body={"steps": 2}),
                          "max_concurrent_per_key", status=429)
            assert err.response.headers["retry-after"]
            hog.close()  # a client that goes away cancels its job
            deadline = time.time() + 20
            while s.batcher.stats()["running"] and time.time() < deadline:
                time.sleep(0.05)
            assert s.batcher.stats()["running"] == 0 and s.batcher.metrics.cancelled == 1
    finally:
        s.close()


def test_edits_refuse_a_field_given_twice(server):
    """One form reader for every upload route: a repeated field or file is a 400 naming it (as /v1/videos)."""
    import httpx

    h = {"Authorization": f"Bearer {KEY}"}
    img = ("in.png", png_bytes(_source()), "image/png")
    mask = ("m.png", _mask(np.ones((8, 16), bool)), "image/png")
    cases = [({"prompt": ["1", "2"]}, [("image", img)], "prompt"),
             ({"prompt": "1", "steps": ["2", "3"]}, [("image", img)], "steps"),
             ({"prompt": "1"}, [("image", img), ("mask", mask), ("mask", mask)], "mask"),
             ({"prompt": "1", "image": "x"}, [("image", img)], "image")]
    for data, files, param in cases:
        r = httpx.post(server.url + "/v1/images/edits", headers=h, data=data, files=files, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (param, r.text)
        assert r.json()["error"]["message"].startswith(f"{param}: ")
    body = b'{"prompt": "1", "prompt": "2", "image": "aaaa"}'  # JSON too: not the last one silently
    r = httpx.post(server.url + "/v1/images/edits", headers={**h, "Content-Type": "application/json"}, content=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


def test_the_routes_share_one_body_base():
    """Images and videos bodies: one definition of the shared fields, ``end_user`` one property, one LoRA pick."""
    from types import SimpleNamespace

    from ursa_engine.serve.body_fields import GenerationFields, lora_of
    from ursa_engine.serve.image_schema import EditRequest, ImageRequest
    from ursa_engine.serve.video_inputs import CreateBody, ExtendBody

    loras = SimpleNamespace(names=["film"])
    for cls, extra in ((ImageRequest, {}), (EditRequest, {}), (CreateBody, {}), (ExtendBody, {"seconds": "1"})):
        assert issubclass(cls, GenerationFields)
        body = cls(prompt="a", user="u", safety_identifier="s", model="film", **extra)
        assert body.end_user == "s" and cls(prompt="a", user="u", **extra).end_user == "u"
        assert lora_of(body, loras) == "film" and lora_of(cls(prompt="a", model="sora-2", **extra), loras) is None
        assert lora_of(cls(prompt="a", model="film", lora="other", **extra), loras) == "other"
        with pytest.raises(ValueError, match="top_p"):
            cls(prompt="a", top_p=0, **extra)
