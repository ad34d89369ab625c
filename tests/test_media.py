"""ursa_engine.media: exact PNG round trips, MP4 round trips within a fixed error bound, output
naming by suffix, errors naming the argument, nothing written on error."""

import os

import numpy as np
import pytest
import torch

from ursa_engine import media

pytest.importorskip("PIL")
pytest.importorskip("av")

# Mean |error| of an H.264 (or mpeg4 fallback) round trip of the smooth video below, fixed in advance:
# measured 1.72 (libx264, CRF 18) and 1.90 (mpeg4) on 8-bit values, mostly yuv420p chroma subsampling.
MP4_MEAN_ABS_ERROR = 4.0
JPEG_MEAN_ABS_ERROR = 3.0


def smooth_video(F=9, H=64, W=96):
    """(F, H, W, 3) uint8 gradients that drift a little every frame."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    frames = [np.stack([np.clip(x * 200 / (W - 1) + 5 * f, 0, 255), y * 255 / (H - 1),
                        255 - np.clip((x + y) * 200 / (W + H - 2) + 3 * f, 0, 255)], -1) for f in range(F)]
    return np.stack(frames).astype(np.uint8)


def random_image(H=7, W=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def listing(folder):
    return sorted(os.listdir(folder))


# ---------------------------------------------------------------------------- images
def test_png_round_trip_is_exact_at_odd_sizes(tmp_path):
    img = random_image(7, 5)
    assert media.save_image(tmp_path / "a.png", img) == tmp_path / "a.png"
    back = media.read_image(tmp_path / "a.png")
    assert back.dtype == np.uint8 and back.shape == (7, 5, 3)
    assert np.array_equal(back, img)
    assert listing(tmp_path) == ["a.png"]  # no temporary file left


def test_jpeg_round_trip_is_close(tmp_path):
    img = smooth_video(F=1)[0]
    media.save_image(tmp_path / "a.JPG", img)  # suffixes are case-insensitive
    back = media.read_image(tmp_path / "a.JPG")
    assert back.shape == img.shape
    assert np.abs(back.astype(int) - img).mean() < JPEG_MEAN_ABS_ERROR


def test_read_image_drops_alpha_and_converts_gray_and_16_bit(tmp_path):
    from PIL import Image

    rgba = np.concatenate([random_image(4, 6), np.full((4, 6, 1), 7, np.uint8)], -1)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert np.array_equal(media.read_image(tmp_path / "rgba.png"), rgba[..., :3])
    gray = random_image(4, 6)[..., 0]
    Image.fromarray(gray).save(tmp_path / "gray.png")
    assert np.array_equal(media.read_image(tmp_path / "gray.png"), np.repeat(gray[..., None], 3, -1))
    deep = (np.arange(24, dtype=np.uint16).reshape(4, 6) * 2700)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert np.array_equal(media.read_image(tmp_path / "deep.png")[..., 1], (deep >> 8).astype(np.uint8))


def test_torch_uint8_tensors_are_accepted(tmp_path):
    img = random_image()
    media.save_image(tmp_path / "t.png", torch.from_numpy(img))
    assert np.array_equal(media.read_image(tmp_path / "t.png"), img)


# ---------------------------------------------------------------------------- videos
def test_mp4_round_trip_frame_count_size_fps_and_pixels(tmp_path):
    assert media.video_encoder() in media.VIDEO_ENCODERS
    vid = smooth_video()
    media.save_video(tmp_path / "v.mp4", vid, fps=12)
    back, fps = media.read_video(tmp_path / "v.mp4")
    assert back.dtype == np.uint8 and back.shape == vid.shape and fps == 12.0
    assert np.abs(back.astype(int) - vid).mean() < MP4_MEAN_ABS_ERROR
    first, _ = media.read_video(tmp_path / "v.mp4", max_frames=3)
    assert np.array_equal(first, back[:3])
    assert listing(tmp_path) == ["v.mp4"]


def test_mp4_fallback_encoder_when_libx264_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(media, "VIDEO_ENCODERS", ("no-such-encoder", "mpeg4"))
    assert media.video_encoder() == "mpeg4"
    vid = smooth_video(F=5)
    media.save_video(tmp_path / "v.mp4", vid, fps=8)
    back, fps = media.read_video(tmp_path / "v.mp4")
    assert back.shape == vid.shape and fps == 8.0
    assert np.abs(back.astype(int) - vid).mean() < MP4_MEAN_ABS_ERROR
    monkeypatch.setattr(media, "VIDEO_ENCODERS", ("no-such-encoder",))
    with pytest.raises(RuntimeError, match="no video encoder"):
        media.save_video(tmp_path / "w.mp4", vid)
    assert listing(tmp_path) == ["v.mp4"]


def test_odd_video_sizes_are_padded_to_even_by_repeating_the_edge(tmp_path):
    vid = smooth_video(F=5)[:, :33, :47]
    media.save_video(tmp_path / "odd.mp4", vid)
    back, _ = media.read_video(tmp_path / "odd.mp4")
    assert back.shape == (5, 34, 48, 3)
    assert np.abs(back[:, :33, :47].astype(int) - vid).mean() < MP4_MEAN_ABS_ERROR
    assert np.abs(back[:, 33, :47].astype(int) - vid[:, 32]).mean() < MP4_MEAN_ABS_ERROR  # the repeated row


# ---------------------------------------------------------------------------- save_output
def test_save_output_one_image_writes_the_path_itself(tmp_path):
    img = random_image()
    for px in (img, img[None], img[None, None]):
        paths = media.save_output(tmp_path / "one.png", px)
        assert paths == [tmp_path / "one.png"]
        assert np.array_equal(media.read_image(paths[0]), img)


@pytest.mark.parametrize(("B", "F", "names"), [
    (1, 3, ["x_0.png", "x_1.png", "x_2.png"]),
    (2, 1, ["x_0.png", "x_1.png"]),
    (2, 2, ["x_0_0.png", "x_0_1.png", "x_1_0.png", "x_1_1.png"]),
])
def test_save_output_numbers_several_images(tmp_path, B, F, names):
    px = np.stack([np.stack([random_image(seed=b * 10 + f) for f in range(F)]) for b in range(B)])
    paths = media.save_output(tmp_path / "x.png", px)
    assert [p.name for p in paths] == names and listing(tmp_path) == names
    for p, image in zip(paths, px.reshape(-1, 7, 5, 3), strict=True):
        assert np.array_equal(media.read_image(p), image)


def test_save_output_video_batch_and_tokens(tmp_path):
    vid = smooth_video(F=5, H=16, W=24)
    paths = media.save_output(tmp_path / "clip.mp4", np.stack([vid, vid[:, ::-1]]), fps=24)
    assert [p.name for p in paths] == ["clip_0.mp4", "clip_1.mp4"]
    back, fps = media.read_video(paths[1])
    assert back.shape == vid.shape and fps == 24.0
    assert media.save_output(tmp_path / "one.mp4", vid) == [tmp_path / "one.mp4"]
    tokens = torch.randint(0, 64000, (2, 3, 4, 5))
    assert media.save_output(tmp_path / "tok.pt", tokens) == [tmp_path / "tok.pt"]
    assert torch.equal(torch.load(tmp_path / "tok.pt"), tokens)


def test_unknown_suffix_names_out_and_lists_the_suffixes(tmp_path):
    with pytest.raises(ValueError, match=r"out: unknown suffix '\.gif'.*\.png, \.jpg, \.jpeg, \.mp4, \.pt"):
        media.save_output(tmp_path / "a.gif", random_image())
    with pytest.raises(ValueError, match="out: unknown suffix ''"):
        media.output_kind(tmp_path / "noext")
    assert listing(tmp_path) == []


def test_output_kind(tmp_path):
    assert [media.output_kind(tmp_path / n) for n in ("a.png", "a.jpeg", "a.MP4", "a.pt")] == \
        ["image", "image", "video", "tokens"]
    with pytest.raises(FileNotFoundError, match="out: folder .* does not exist"):
        media.output_kind(tmp_path / "missing" / "a.png")
    (tmp_path / "d.png").mkdir()
    with pytest.raises(FileNotFoundError, match="out: .* is a folder"):
        media.output_kind(tmp_path / "d.png")


# ---------------------------------------------------------------------------- bad input
def test_bad_pixels_name_the_argument(tmp_path):
    cases = [
        (lambda: media.save_video(tmp_path / "v.mp4", np.zeros((2, 3), np.float32)), ValueError,
         r"frames: expected uint8 \(F, H, W, 3\), got float32 \(2, 3\)"),
        (lambda: media.save_video(tmp_path / "v.mp4", np.zeros((2, 4, 4, 4), np.uint8)), ValueError,
         r"frames: expected uint8 \(F, H, W, 3\), got uint8 \(2, 4, 4, 4\)"),
        (lambda: media.save_video(tmp_path / "v.mp4", np.zeros((0, 4, 4, 3), np.uint8)), ValueError, "frames"),
        (lambda: media.save_video(tmp_path / "v.mp4", smooth_video(F=1), fps=0), ValueError, "fps"),
        (lambda: media.save_video(tmp_path / "v.png", smooth_video(F=1)), ValueError, "path"),
        (lambda: media.save_image(tmp_path / "a.png", [[0, 0, 0]]), TypeError, "frame: expected a uint8 array"),
        (lambda: media.save_image(tmp_path / "a.png", torch.zeros(4, 4, 3)), ValueError,
         r"frame: expected uint8 \(H, W, 3\), got float32 \(4, 4, 3\)"),
        (lambda: media.save_image(tmp_path / "a.mp4", random_image()), ValueError, "path"),
        (lambda: media.save_output(tmp_path / "a.png", np.zeros((1, 1, 2, 2, 2, 3), np.uint8)), ValueError,
         "frames_or_tokens"),
        (lambda: media.save_output(tmp_path / "a.pt", [1, 2]), TypeError, "frames_or_tokens"),
        (lambda: media.read_video(tmp_path / "v.mp4", max_frames=0), ValueError, "max_frames"),
        (lambda: media.resize(random_image(), 0, 4), ValueError, "height"),
    ]
    for fn, err, match in cases:
        with pytest.raises(err, match=match):
            fn()
    assert listing(tmp_path) == []


def test_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="path: .*nope.png' does not exist"):
        media.read_image(tmp_path / "nope.png")
    with pytest.raises(FileNotFoundError, match="path: .* is not a file"):
        media.read_video(tmp_path)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="path: .*junk.png' is not a readable image"):
        media.read_image(tmp_path / "junk.png")
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="path: .*junk.mp4' is not a readable video"):
        media.read_video(tmp_path / "junk.mp4")


def test_nothing_written_when_a_write_fails_midway(tmp_path, monkeypatch):
    (tmp_path / "x_1.png").write_bytes(b"older file")
    original, written = media._write_image, []

    def fail_on_the_second(path, frame):
        if written:
            raise OSError("disk full")
        original(path, frame)
        written.append(path)

    monkeypatch.setattr(media, "_write_image", fail_on_the_second)
    with pytest.raises(OSError, match="disk full"):
        media.save_output(tmp_path / "x.png", np.stack([random_image(seed=s) for s in range(3)]))
    assert len(written) == 1 and written[0].parent == tmp_path  # x_0.png was encoded into a temporary file
    assert listing(tmp_path) == ["x_1.png"]  # ... which is gone: no x_0.png, no temporary files
    assert (tmp_path / "x_1.png").read_bytes() == b"older file"  # an existing file is left untouched


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_written_files_have_the_permissions_of_any_new_file(tmp_path):
    old = os.umask(0o022)
    try:
        paths = [media.save_image(tmp_path / "a.png", random_image()),
                 media.save_video(tmp_path / "v.mp4", smooth_video(F=2, H=16, W=16)),
                 *media.save_output(tmp_path / "t.pt", torch.zeros(2, 3))]
    finally:
        os.umask(old)
    for path in paths:  # 0o644, as `open(path, "w")` makes, not the 0o600 of a tempfile.mkstemp file
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_resize():
    img = random_image(6, 4)
    assert np.array_equal(media.resize(img, 6, 4), img)
    assert media.resize(img, 12, 10).shape == (12, 10, 3)
    assert media.resize(np.stack([img, img]), 3, 2).shape == (2, 3, 2, 3)
