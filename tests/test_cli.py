"""``ursa-engine generate`` as a user meets it, on real tiny checkpoint roots (tests/roots.py): every
user error is one line on stderr with exit status 2 naming the flag, bugs keep their traceback,
``--debug`` shows everything; prompt -> PNG with the image and the video checkpoint, prompt -> MP4,
image -> MP4, video extension -> MP4 (the given video followed by the new frames), ``.pt`` tokens
without decoding."""

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from roots import tiny_tokenizer, write_tiny_root

import ursa_engine as ue
from ursa_engine import media
from ursa_engine.cli import UsageError, main
from ursa_engine.cli_generate import IMAGE_SIZE, VIDEO_SIZE, default_size
from ursa_engine.engine import NEGATIVE_PROMPT
from ursa_engine.vae import load_tokenizer

pytest.importorskip("tokenizers")
pytest.importorskip("PIL")
pytest.importorskip("av")

FAST = ["--steps", "2", "--device", "cpu", "--prompt-length", "8", "--no-progress"]
SMALL = ["--height", "32", "--width", "48"]  # tiny Cosmos: 4 x 6 codes a frame; tiny IBQ: 8 x 12
MP4_MEAN_ABS_ERROR = 4.0  # one H.264 round trip of a smooth video (tests/test_media.py)


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Tiny complete roots: a video checkpoint (Cosmos FSQ, strides 4 x 8, temporal tiles of 9 frames),
    an image checkpoint (IBQ, stride 4) and a tokens-only one (no vae/)."""
    base = tmp_path_factory.mktemp("roots")
    return SimpleNamespace(cosmos=write_tiny_root(base / "cosmos", family="cosmos3d"),
                           ibq=write_tiny_root(base / "ibq", family="ibq"),
                           tokens_only=write_tiny_root(base / "tokens_only", with_vae=False))


@pytest.fixture(scope="module")
def root(roots):
    """A root without vae/: tokens only."""
    return roots.tokens_only


@pytest.fixture
def work(tmp_path, monkeypatch):
    """An empty working folder (the current directory) whose listing tells what a run wrote."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


@pytest.fixture
def generate_calls(monkeypatch):
    """The arguments of every Engine.generate call, keywords by name and positionals as "args" (the real
    one runs)."""
    calls, original = [], ue.Engine.generate

    def spy(self, *args, **kwargs):
        calls.append({"args": args, **kwargs})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ue.Engine, "generate", spy)
    return calls


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def run_ok(argv, capsys):
    """Run a command that must succeed; its JSON summary and stderr."""
    rc, out, err = run(argv, capsys)
    assert rc == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


def assert_user_error(argv, capsys, *fragments):
    rc, out, err = run(argv, capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and out == "", (rc, out, err)
    assert len(lines) == 1 and lines[0].startswith("ursa-engine: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def gradient(H, W, F=None):
    """Smooth uint8 RGB (H, W, 3), or (F, H, W, 3) drifting a little every frame."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    frames = [np.stack([x * 200 / (W - 1) + 5 * f, y * 255 / (H - 1), 255 - (x + y) * 200 / (W + H - 2)], -1)
              for f in range(F or 1)]
    out = np.clip(np.stack(frames), 0, 255).astype(np.uint8)
    return out if F else out[0]


# ---------------------------------------------------------------------------- help, module layout
def test_help(capsys):
    for argv in (["--help"], ["generate", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("generate", "--debug", "--height", "--frames", "--latents-shape", "--image", "--video",
                 "--cond-frames", "--cond-noise-scale", "--freeze-cond", "--fps", ".mp4", ".pt", "examples"):
        assert flag in text


def test_imports_go_one_way_cli_then_cli_generate_then_cli_errors():
    import ast

    import ursa_engine._cli_errors
    import ursa_engine.cli_generate

    def imported(module) -> set[str]:
        tree = ast.parse(open(module.__file__).read())
        return {"." * n.level + (n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}

    assert {".cli", "ursa_engine.cli"}.isdisjoint(imported(ursa_engine.cli_generate))
    assert not any(m.startswith((".", "ursa_engine")) for m in imported(ursa_engine._cli_errors))


def test_default_size_is_the_checkpoints_resolution():
    assert default_size(tiny_tokenizer("ibq")) == IMAGE_SIZE == (1024, 1024)  # URSA-1.7B-IBQ1024
    assert default_size(tiny_tokenizer("cosmos3d")) == VIDEO_SIZE == (320, 512)  # the authors' pipeline


# ---------------------------------------------------------------------------- user errors
def test_missing_and_incomplete_roots(tmp_path, work, capsys):
    assert_user_error(["generate", tmp_path / "nope", "--prompt", "a", "--out", "t.pt"], capsys,
                      "ROOT:", "does not exist")
    (tmp_path / "half" / "scheduler").mkdir(parents=True)
    assert_user_error(["generate", tmp_path / "half", "--prompt", "a", "--out", "t.pt"], capsys,
                      "ROOT:", "no transformer/")
    assert sorted(work.iterdir()) == []


@pytest.mark.parametrize(("breakage", "fragment"), [
    ("config", "config.json"),
    ("weights", "safetensors"),
    ("scheduler_json", "scheduler_config.json"),
    ("codebook", "scheduler_model"),
    ("tokenizer", "tokenizer.json"),
])
def test_broken_checkpoints_are_one_line(root, tmp_path, work, capsys, breakage, fragment):
    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    if breakage == "config":
        (broken / "transformer" / "config.json").write_text('{"hidden_size": ')
    elif breakage == "weights":
        for f in (broken / "transformer").glob("*.safetensors"):
            f.unlink()
    elif breakage == "scheduler_json":
        (broken / "scheduler" / "scheduler_config.json").write_text("not json")
    elif breakage == "codebook":
        (broken / "scheduler" / "scheduler_model.pth").unlink()
    else:
        shutil.rmtree(broken / "tokenizer")
    assert_user_error(["generate", broken, "--prompt", "a", "--latents-shape", 3, 4, "--out", "t.pt", *FAST],
                      capsys, "ROOT:", fragment)
    assert sorted(work.iterdir()) == []


@pytest.mark.parametrize(("breakage", "fragments"), [
    ("empty", ["no config.json"]),  # an empty vae/ is no tokens-only root: it fails to load
    ("weights", ["safetensors"]),
    ("other_family", ["K=100", "K=64"]),  # the IBQ tokenizer next to the Cosmos transformer
])
def test_broken_vae_folders_are_one_line_naming_the_folder(roots, tmp_path, work, capsys, breakage, fragments):
    broken = tmp_path / "broken"
    shutil.copytree(roots.cosmos, broken)
    if breakage == "empty":
        shutil.rmtree(broken / "vae")
        (broken / "vae").mkdir()
    elif breakage == "weights":
        for f in (broken / "vae").glob("*.safetensors"):
            f.unlink()
    else:
        shutil.rmtree(broken / "vae")
        shutil.copytree(roots.ibq / "vae", broken / "vae")
    for out in ("t.png", "t.pt"):  # .pt too: the root's vae/ is loaded to map pixel sizes to the grid
        assert_user_error(["generate", broken, "--prompt", "a", *SMALL, "--out", out, *FAST], capsys,
                          f"ROOT: {broken / 'vae'}", *fragments)
    assert sorted(work.iterdir()) == []


@pytest.mark.parametrize(("args", "fragments"), [
    (["--latents-shape", "0", "4"], ["--latents-shape:", "0 4"]),
    (["--latents-shape", "1", "2", "3", "4"], ["--latents-shape:"]),
    (["--out", "t.gif"], ["--out:", "'.gif'", ".png, .jpg, .jpeg, .mp4, .pt"]),
    (["--out", "missing/t.pt"], ["--out:", "does not exist"]),
    (["--out", "t.png"], ["--out:", ".png", "ROOT/vae/", "--out NAME.pt"]),  # pixels need the tokenizer
    (["--out", "t.mp4"], ["--out:", ".mp4", "ROOT/vae/", "--out NAME.pt"]),
    (["--height", "64"], ["--height:", "vae/", "--latents-shape"]),
    (["--image", "in.png"], ["--image:", "vae/"]),
    (["--latents-shape", "3", "4", "--frames", "5"], ["--latents-shape:", "--frames"]),
    (["--image", "a.png", "--video", "b.mp4"], ["--image / --video:"]),
    (["--cond-frames", "13"], ["--cond-frames:", "--video"]),
    (["--cond-noise-scale", "0.1"], ["--cond-noise-scale:", "--image or --video"]),
    (["--image", "a.png", "--cond-noise-scale", "1.5"], ["--cond-noise-scale:", "[0, 1]", "1.5"]),
    (["--freeze-cond"], ["--freeze-cond:", "--image or --video"]),
    (["--steps", "0"], ["--steps:", "positive"]),
    (["--guidance", "nan"], ["--guidance:", "finite"]),
    (["--fps", "0"], ["--fps:"]),
    (["--attn", "fastest"], ["--attn:", "sdpa"]),
    (["--mode", "graph"], ["--mode:", "CUDA"]),
    (["--device", "cuda:x"], ["--device:", "cuda:x"]),
    (["--seed", "-1", "--latents-shape", "3", "4"], ["--seed:", "[0, 2^62)"]),  # raised by Engine.generate
])
def test_bad_arguments_are_one_line_naming_the_flag(root, work, capsys, args, fragments):
    argv = ["generate", root, "--prompt", "a bear", "--out", "t.pt", *FAST, *args]
    assert_user_error(argv, capsys, *fragments)
    assert sorted(work.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_device_cuda_without_cuda_is_refused_before_loading(root, work, capsys, monkeypatch):
    def no_loading(*a, **k):
        raise AssertionError("loaded a checkpoint although the device is absent")

    monkeypatch.setattr(ue.Engine, "from_pretrained", classmethod(no_loading))
    line = assert_user_error(["generate", root, "--prompt", "a", "--out", "t.pt", "--device", "cuda"], capsys)
    assert line.startswith("ursa-engine: error: --device: cuda requested but torch.cuda.is_available() is False (")


def test_pixel_sizes_and_inputs_are_checked_before_generating(roots, work, capsys, generate_calls):
    base = ["generate", roots.cosmos, "--prompt", "a", "--out", "v.mp4", *FAST]
    assert_user_error([*base, "--frames", "10"], capsys, "--frames:", "1 + 4k", "got 10")
    assert_user_error([*base, "--height", "65", "--width", "64"], capsys, "--height:", "spatial stride 8")
    media.save_image(work / "in.png", np.zeros((30, 40, 3), np.uint8))  # 30 is not a multiple of 8
    assert_user_error([*base, "--image", "in.png"], capsys, "--height:", "--image", "resize")
    assert_user_error([*base, "--image", "missing.png"], capsys, "--image:", "missing.png", "does not exist")
    (work / "junk.mp4").write_bytes(b"junk")
    assert_user_error([*base, "--video", "junk.mp4"], capsys, "--video:", "not a readable video")
    media.save_video(work / "short.mp4", np.zeros((5, 32, 48, 3), np.uint8))
    assert_user_error([*base, "--video", "short.mp4"], capsys, "--video:", "5 frames", "13")  # the default
    media.save_video(work / "long.mp4", np.zeros((13, 32, 48, 3), np.uint8))
    long = [*base, "--video", "long.mp4"]
    assert_user_error([*long, "--cond-frames", "6"], capsys, "--cond-frames:", "1 + 4k", "got 6")
    # the tiny tokenizer encodes in temporal tiles of 9 frames: 13 would silently lose 4 of them
    assert_user_error([*long, "--cond-frames", "13"], capsys, "--cond-frames:", "at most 9")
    assert_user_error([*long, "--cond-frames", "9", "--frames", "5"], capsys, "--cond-frames:", "more than the 2")
    assert generate_calls == []
    assert sorted(p.name for p in work.iterdir()) == ["in.png", "junk.mp4", "long.mp4", "short.mp4"]


# ---------------------------------------------------------------------------- bugs and --debug
def test_debug_shows_the_traceback_of_user_errors(tmp_path, capsys):
    argv = ["generate", str(tmp_path / "nope"), "--prompt", "a", "--out", str(tmp_path / "t.pt")]
    for debug_argv in (["--debug", *argv], [*argv, "--debug"]):
        with pytest.raises(UsageError, match="ROOT: .* does not exist"):
            main(debug_argv)


def test_internal_bugs_keep_their_traceback(roots, work, monkeypatch):
    """A wrong engine (the one thing a real run cannot show) raises with its traceback."""
    argv = ["generate", str(roots.cosmos), "--prompt", "a", *SMALL, "--out", "t.png", *FAST]

    def buggy_generate(*a, **k):
        raise TypeError("generate() got an unexpected keyword argument 'image'")

    monkeypatch.setattr(ue.Engine, "generate", buggy_generate)
    with pytest.raises(TypeError, match="unexpected keyword"):  # a TypeError inside the engine is no user error
        main(argv)
    monkeypatch.setattr(ue.Engine, "generate", lambda *a, **k: ue.GenerationResult(tokens=torch.zeros(1, 1, 4, 6)))
    with pytest.raises(RuntimeError, match="no .frames"):
        main(argv)
    assert sorted(work.iterdir()) == []


def test_errors_are_one_line_from_the_installed_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ursa_engine.cli", "generate", str(tmp_path / "nope"),
                           "--prompt", "a", "--out", str(tmp_path / "t.pt")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"ursa-engine: error: ROOT: {tmp_path / 'nope'} does not exist"]


# ---------------------------------------------------------------------------- working runs
def test_tokens_pt_without_a_tokenizer(root, work, capsys):
    summary, _ = run_ok(["generate", root, "--prompt", "a bear", "--prompt", "bear", "--latents-shape", 3, 4,
                         "--out", "tokens.pt", *FAST], capsys)
    assert summary["out"] == ["tokens.pt"] and summary["format"] == "tokens" and summary["frames"] is None
    assert summary["tokens"] == [2, 1, 3, 4] and summary["model_calls"] == 1
    tokens = torch.load(work / "tokens.pt")
    assert tokens.shape == (2, 1, 3, 4) and tokens.dtype == torch.int64
    assert sorted(p.name for p in work.iterdir()) == ["tokens.pt"]


def test_png_from_the_image_checkpoint_is_the_decoded_tokens(roots, work, capsys):
    args = ["generate", roots.ibq, "--prompt", "a bear", "--prompt", "a cat", *SMALL, *FAST]
    summary, _ = run_ok([*args, "--out", "img.png"], capsys)
    assert summary["out"] == ["img_0.png", "img_1.png"] and summary["format"] == "image"
    assert summary["tokens"] == [2, 1, 8, 12] and summary["frames"] == [2, 1, 32, 48, 3]
    tokens_summary, _ = run_ok([*args, "--out", "t.pt"], capsys)  # the same seed: the same tokens
    assert tokens_summary["decode_s"] == 0 and tokens_summary["frames"] is None
    expected = load_tokenizer(roots.ibq / "vae").decode_frames(torch.load(work / "t.pt"))  # (2, 1, 32, 48, 3)
    for b in range(2):  # PNG is lossless: the files hold exactly the tokenizer's uint8 frames
        image = media.read_image(work / f"img_{b}.png")
        assert image.shape == (32, 48, 3) and np.array_equal(image, expected[b, 0])
        assert image.std() > 1  # not blank


def test_png_from_the_video_checkpoint_is_one_frame(roots, work, capsys):
    summary, _ = run_ok(["generate", roots.cosmos, "--prompt", "a bear", *SMALL, "--out", "bear.png", *FAST],
                        capsys)
    assert summary["out"] == ["bear.png"] and summary["tokens"] == [1, 1, 4, 6]
    image = media.read_image(work / "bear.png")
    assert image.shape == (32, 48, 3) and image.std() > 1
    assert sorted(p.name for p in work.iterdir()) == ["bear.png"]


@pytest.mark.parametrize(("frames", "T"), [(["--frames", "9"], 3), (["--frames", "17"], 5), ([], 13)])
def test_prompt_to_mp4_has_the_frames_the_tokenizer_decodes(roots, work, capsys, frames, T):
    summary, err = run_ok(["generate", roots.cosmos, "--prompt", "a bear", "--motion", 9, *SMALL, *frames,
                           "--out", "bear.mp4", *FAST], capsys)
    F = load_tokenizer(roots.cosmos / "vae").num_frames(T)  # 9 frames: one temporal tile of the tiny tokenizer
    assert summary["tokens"] == [1, T, 4, 6] and summary["frames"] == [1, F, 32, 48, 3]
    video, fps = media.read_video(work / "bear.mp4")
    assert video.shape == (F, 32, 48, 3) and fps == 12.0
    asked = 49 if not frames else int(frames[1])  # 49: the default for .mp4 with a video tokenizer
    warned = [line for line in err.splitlines() if line.startswith("ursa-engine: warning: --frames:")]
    assert len(warned) == (F != asked) and "UserWarning" not in err  # said once, before the run


def test_image_to_video_mp4(roots, work, capsys, generate_calls):
    media.save_image(work / "first.png", gradient(40, 60))  # resized to 32 x 48
    summary, _ = run_ok(["generate", roots.cosmos, "--prompt", "a bear", "--motion", 9, "--image", "first.png",
                         *SMALL, "--frames", 9, "--fps", 8, "--out", "clip.mp4", *FAST], capsys)
    assert summary["out"] == ["clip.mp4"] and summary["frames"] == [1, 9, 32, 48, 3]
    call = generate_calls[-1]
    assert call["image"].shape == (32, 48, 3) and call["image"].dtype == np.uint8 and "video" not in call
    assert call["motion"] == 9.0 and "cond_noise_scale" not in call and call["decode"] is True  # authors' I2V: 0
    assert call["args"][:2] == (["a bear"], [NEGATIVE_PROMPT])  # the authors' README negative prompt by default
    frames, fps = media.read_video(work / "clip.mp4")
    assert frames.shape == (9, 32, 48, 3) and fps == 8.0


def test_image_to_video_pt_keeps_the_encoded_image_and_does_not_decode(roots, work, capsys, monkeypatch):
    def no_decoding(*a, **k):
        raise AssertionError(".pt output decoded the tokens")

    monkeypatch.setattr(ue.Engine, "decode", no_decoding)
    image = gradient(32, 48)
    media.save_image(work / "first.png", image)
    summary, _ = run_ok(["generate", roots.cosmos, "--prompt", "a bear", "--image", "first.png", "--frames", 9,
                         "--freeze-cond", "--out", "clip.pt", *FAST], capsys)
    assert summary["frames"] is None and summary["decode_s"] == 0
    tokens = torch.load(work / "clip.pt")
    assert tokens.shape == (1, 3, 4, 6)  # 9 x 32 x 48 pixels: the size of --image by default
    first = load_tokenizer(roots.cosmos / "vae").encode_frames(image)  # (1, 1, 4, 6)
    assert torch.equal(tokens[:, :1], first)  # --freeze-cond: latent frame 0 is the encoded image


def test_video_extension_writes_the_given_video_then_the_new_frames(roots, work, capsys, generate_calls):
    media.save_video(work / "in.mp4", gradient(40, 56, F=9), fps=10)  # resized to 32 x 48
    given = media.resize(media.read_video(work / "in.mp4")[0], 32, 48)
    argv = ["generate", roots.cosmos, "--prompt", "a bear", "--motion", 5, "--video", "in.mp4", "--cond-frames", 5,
            *SMALL, "--frames", 9, *FAST]
    summary, _ = run_ok([*argv, "--out", "more.mp4"], capsys)
    call = generate_calls[-1]
    assert call["video"].shape == (9, 32, 48, 3) and call["num_cond_frames"] == 5
    assert call["cond_noise_scale"] == 0.1 and call["freeze_cond"] is False  # the README loop's extension
    assert summary["tokens"] == [1, 3, 4, 6]  # the new clip: 9 frames, 5 of them re-showing the given ones
    assert summary["frames"] == [1, 9 + 9 - 5, 32, 48, 3]  # README: concatenate([given, new[num_cond_frames:]])
    frames, fps = media.read_video(work / "more.mp4")
    assert frames.shape == (13, 32, 48, 3) and fps == 10.0  # --fps defaults to the given video's
    error = np.abs(frames[:9].astype(np.float64) - given).mean()  # the given frames as they were (H.264 aside)
    assert error < MP4_MEAN_ABS_ERROR, error
    summary, _ = run_ok([*argv, "--out", "more.pt"], capsys)  # tokens: the new clip's, not decoded
    assert summary["tokens"] == [1, 3, 4, 6] and torch.load(work / "more.pt").shape == (1, 3, 4, 6)


@pytest.mark.parametrize("command", ["serve", "ui"])
@pytest.mark.parametrize("flag", ["--max-prompt-chars", "--max-upload-bytes", "--max-image-pixels",
                                  "--max-video-frames", "--max-concurrent-per-key", "--max-tokens"])
def test_serve_and_ui_share_their_limit_flags(command, flag, capsys):
    """One set of limits (ursa_engine.cli_serve.add_limit_flags): a bad value is one usage error naming the flag,
    before anything is loaded, for the API server and the page alike."""
    pytest.importorskip("fastapi")
    if command == "ui":
        pytest.importorskip("gradio")
    assert_user_error([command, flag, "0"], capsys, flag, ">= 1")
