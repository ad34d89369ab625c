"""Uploaded images / videos under the server's limits (ursa_engine.serve.uploads)."""

from __future__ import annotations

import base64
import io
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ursa_engine.serve.security import Limits
from ursa_engine.serve.uploads import b64_bytes, image_size, read_image, read_image_rgba, read_mask_alpha, read_video


def encode(arr: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_bomb(w: int = 100_000, h: int = 100_000) -> bytes:
    """A ~100-byte PNG whose header announces w x h pixels (one compressed row only)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def test_image_formats_round_trip():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    assert np.array_equal(read_image(encode(arr), "image"), arr)
    assert np.array_equal(read_image(encode(arr, "WEBP", lossless=True), "image"), arr)
    jpg = read_image(encode(arr, "JPEG", quality=95), "image")
    assert jpg.shape == (12, 20, 3) and jpg.dtype == np.uint8
    assert image_size(encode(arr), "image") == (20, 12)


def test_gif_and_garbage_are_refused():
    arr = np.zeros((8, 8, 3), np.uint8)
    for data in (encode(arr, "GIF"), encode(arr, "BMP"), b"not an image at all", b""):
        with pytest.raises(ValueError, match=r"^image: "):
            read_image(data, "image")


def test_truncated_image():
    data = encode(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"^image\[\]: .*(truncated|corrupt|readable)"):
        read_image(data[: len(data) // 2], "image[]")


def test_decompression_bomb_refused_before_decoding():
    bomb = png_bomb()
    assert len(bomb) < 200
    with pytest.raises(ValueError, match=r"^mask: .*max_image_pixels"):
        read_image(bomb, "mask", Limits())
    # under PIL's own threshold but over ours: our limit decides, from the header
    with pytest.raises(ValueError, match=r"^image: a 300x200 image .*limit of 1000 pixels"):
        read_image(png_bomb(300, 200), "image", Limits(max_image_pixels=1000))


def test_mask_alpha():
    rgba = np.full((6, 10, 4), 255, np.uint8)
    rgba[2:4, 3:7, 3] = 0
    alpha = read_mask_alpha(encode(rgba), "mask")
    assert alpha.shape == (6, 10) and (alpha == 0).sum() == 8
    out, has = read_image_rgba(encode(rgba[..., :3].copy()), "mask")
    assert not has and (out[..., 3] == 255).all()
    with pytest.raises(ValueError, match=r"^mask: .*no alpha"):
        read_mask_alpha(encode(rgba[..., :3].copy()), "mask")


def test_b64():
    data = encode(np.zeros((4, 4, 3), np.uint8))
    text = base64.b64encode(data).decode()
    assert b64_bytes(text, "image") == data
    assert b64_bytes("data:image/png;base64," + text, "image") == data
    with pytest.raises(ValueError, match=r"^image: not valid base64"):
        b64_bytes("@@@", "image")
    with pytest.raises(ValueError, match=r"^image: .*max_upload_bytes"):
        b64_bytes(text, "image", Limits(max_upload_bytes=10))


def _mp4(frames: np.ndarray, fps: float = 8) -> bytes:
    from ursa_engine.media import save_video

    with tempfile.TemporaryDirectory() as tmp:
        return Path(save_video(Path(tmp) / "v.mp4", frames, fps=fps)).read_bytes()


def test_video_limits():
    frames = np.random.default_rng(2).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    data = _mp4(frames)
    out, fps = read_video(data, "video", Limits())
    assert out.shape == (5, 16, 16, 3) and out.dtype == np.uint8 and fps == pytest.approx(8)
    with pytest.raises(ValueError, match=r"^video: more than 4 frames"):
        read_video(data, "video", Limits(max_video_frames=4))
    with pytest.raises(ValueError, match=r"^input_reference: .*max_image_pixels"):
        read_video(data, "input_reference", Limits(max_image_pixels=100))
    for bad in (b"garbage bytes here", data[:12], encode(frames[0])):
        with pytest.raises(ValueError, match=r"^video: "):
            read_video(bad, "video")


def test_video_decoded_bytes_are_bounded_before_decoding():
    """A small MP4 that announces a big decode is refused from its header (nothing decoded), by the
    byte budget and by the caller's check; a legit one is decoded into one array (no 2x peak)."""
    import tracemalloc

    ramp = np.linspace(0, 255, 24).astype(np.uint8)[:, None, None, None]
    frames = np.broadcast_to(ramp, (24, 64, 96, 3)).copy()  # compresses to a few KB
    data = _mp4(frames)
    one = 64 * 96 * 3
    assert len(data) < one  # the file is smaller than one decoded frame
    with pytest.raises(ValueError, match=r"^video: the stream header announces 24 frames .*budget of"):
        read_video(data, "video", Limits(), max_bytes=10 * one)
    seen = []

    def check(w, h, n):
        seen.append((w, h, n))
        if n > 10:
            raise ValueError(f"video: {n} frames of {w}x{h}: too many for this caller")

    with pytest.raises(ValueError, match=r"^video: 24 frames of 96x64"):
        read_video(data, "video", Limits(), check=check)
    assert seen == [(96, 64, 24)]  # the header's size and count, before any frame
    tracemalloc.start()
    try:
        out, _ = read_video(data, "video", Limits(), max_bytes=24 * one)  # exactly enough
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.shape == (24, 64, 96, 3) and np.abs(out.astype(int) - frames).mean() < 3
    assert peak < 1.3 * out.nbytes, (peak, out.nbytes)  # frames in a list then np.stack: 2x


def test_video_upload_bounds_follow_the_token_budget():
    """The videos routes' check: off the tokenizer's grid, or a window (the last frames' latents + 1)
    over max_tokens, is refused from the header; the running count refuses a header that said nothing."""
    from roots import tiny_tokenizer

    from ursa_engine.serve.video_inputs import upload_bounds

    vae = tiny_tokenizer("cosmos3d")  # stride 4 x 8; sample_frames 9: 9+ frames condition 3 latent frames
    check, max_bytes = upload_bounds(vae, Limits(max_video_frames=50), max_tokens=2 * 4 * 8 * 12, rows=2)
    check(96, 64, 24)  # 2 rows x (3 + 1) x 8 x 12 tokens: fits exactly
    with pytest.raises(ValueError, match=r"^video: 100x64 is not on this tokenizer's grid"):
        check(100, 64, 1)
    with pytest.raises(ValueError, match=r"^video: a 96x72 video of 24 frames .*max_tokens"):
        check(96, 72, 24)
    check(96, 72, 4)  # 4 frames condition 1 latent frame: 2 x 2 x 9 x 12 fits
    assert max_bytes == 50 * (2 * 4 * 8 * 12 // 4) * 64 * 3
