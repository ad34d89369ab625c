"""``ursa-engine generate`` as a user meets it: every user error is one line on stderr with exit
status 2 naming the flag, bugs keep their traceback, ``--debug`` shows everything, ``.pt`` works
end to end on a real tiny checkpoint, pixel outputs and conditioning inputs go through the
engine's tokenizer (a small fake until the engine's ``vae`` lands)."""

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import ursa_engine as ue
from ursa_engine import media
from ursa_engine.checkpoint import save_transformer
from ursa_engine.cli import UsageError, main

CFG = ue.ModelConfig.preset("tiny")
FAST = ["--steps", "2", "--device", "cpu", "--prompt-length", "8", "--no-progress"]


def _write_root(root, *, vae=False):
    """A real tiny checkpoint root (as tests/test_engine.py writes it), optionally with a vae/ folder."""
    tokenizers = pytest.importorskip("tokenizers")
    torch.manual_seed(0)
    save_transformer(ue.URSATransformer(CFG, init_std=0.2), root / "transformer")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"shift": 3.0, "c": 5.0, "alpha": 1.0}))
    torch.save({"path.emb": ue.Codebook.fsq((4, 4, 4)).emb}, root / "scheduler" / "scheduler_model.pth")
    vocab = {"[UNK]": 0, "<|endoftext|>": CFG.pad_token_id, "a": 3, "bear": 4}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    (root / "tokenizer").mkdir()
    tok.save(str(root / "tokenizer" / "tokenizer.json"))
    if vae:
        (root / "vae").mkdir()
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return _write_root(tmp_path_factory.mktemp("root"))


@pytest.fixture
def work(tmp_path, monkeypatch):
    """An empty working folder (the current directory) whose listing tells what a run wrote."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(argv, capsys, *fragments):
    rc, out, err = run(argv, capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and out == "", (rc, out, err)
    assert len(lines) == 1 and lines[0].startswith("ursa-engine: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------- a fake tokenizer / engine
class FakeVAE:
    """The engine's tokenizer interface (``ursa_engine.vae``): strides and ``latent_shape``."""

    temporal_stride, spatial_stride = 4, 8

    def latent_shape(self, num_frames, height, width):
        if (num_frames - 1) % 4:
            raise ValueError(f"num_frames: this tokenizer takes 1 + 4k frames (1, 5, 9, ...), got {num_frames}")
        for name, v in (("height", height), ("width", width)):
            if v % 8:
                raise ValueError(f"{name}: must be a multiple of the spatial stride 8, got {v}")
        return (num_frames - 1) // 4 + 1, height // 8, width // 8


class FakeEngine:
    """``generate`` records its arguments and returns tokens plus frames (B, F, H, W, 3)."""

    def __init__(self):
        self.vae, self.calls = FakeVAE(), []

    def generate(self, prompts, negative, shape, **kw):
        self.calls.append(SimpleNamespace(prompts=prompts, negative=negative, shape=shape, **kw))
        B, (T, h, w) = len(prompts), shape
        F, H, W = 1 + 4 * (T - 1), 8 * h, 8 * w
        y, x = np.mgrid[0:H, 0:W]
        frames = np.stack([np.stack([x * 255 // W, y * 255 // H, np.full_like(x, 20 * f)], -1) for f in range(F)])
        return SimpleNamespace(tokens=torch.zeros(B, T, h, w, dtype=torch.long),
                               frames=np.repeat(frames[None].astype(np.uint8), B, 0),
                               step_times=[0.0, 0.01], total_time=0.02, model_calls=1, mode="eager",
                               attention="sdpa", peak_memory=None)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A root with a vae/ folder whose Engine.from_pretrained returns a FakeEngine."""
    fake_root = tmp_path / "fake_root"
    for sub in ("transformer", "scheduler", "tokenizer", "vae"):
        (fake_root / sub).mkdir(parents=True)
    (fake_root / "tokenizer" / "tokenizer.json").write_text("{}")
    engine = FakeEngine()
    monkeypatch.setattr(ue.Engine, "from_pretrained", classmethod(lambda cls, root, **kw: engine))
    return SimpleNamespace(root=fake_root, engine=engine)


# ---------------------------------------------------------------------------- help
def test_help(capsys):
    for argv in (["--help"], ["generate", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("generate", "--debug", "--height", "--frames", "--latents-shape", "--image", "--video",
                 "--cond-frames", "--cond-noise-scale", "--fps", ".mp4", ".pt"):
        assert flag in text


# ---------------------------------------------------------------------------- user errors
def test_missing_and_incomplete_roots(tmp_path, work, capsys):
    assert_user_error(["generate", tmp_path / "nope", "--prompt", "a", "--out", "t.pt"], capsys,
                      "ROOT:", "does not exist")
    (tmp_path / "half" / "scheduler").mkdir(parents=True)
    assert_user_error(["generate", tmp_path / "half", "--prompt", "a", "--out", "t.pt"], capsys,
                      "ROOT:", "no transformer/")
    assert work.joinpath("t.pt").exists() is False


@pytest.mark.parametrize(("breakage", "fragment"), [
    ("config", "config.json"),
    ("weights", "safetensors"),
    ("scheduler_json", "scheduler_config.json"),
    ("codebook", "scheduler_model"),
    ("tokenizer", "tokenizer.json"),
])
def test_broken_checkpoints_are_one_line(root, tmp_path, work, capsys, breakage, fragment):
    import shutil

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
    assert not (work / "t.pt").exists()


@pytest.mark.parametrize(("args", "fragments"), [
    (["--latents-shape", "0", "4"], ["--latents-shape:", "0 4"]),
    (["--latents-shape", "1", "2", "3", "4"], ["--latents-shape:"]),
    (["--out", "t.gif"], ["--out:", "'.gif'", ".png, .jpg, .jpeg, .mp4, .pt"]),
    (["--out", "missing/t.pt"], ["--out:", "does not exist"]),
    (["--out", "t.png"], ["--out:", ".png", "vae/", ".pt"]),
    (["--out", "t.mp4"], ["--out:", ".mp4", "vae/", ".pt"]),
    (["--height", "64"], ["--height:", "vae/", "--latents-shape"]),
    (["--image", "in.png"], ["--image:", "vae/"]),
    (["--latents-shape", "3", "4", "--frames", "5"], ["--latents-shape:", "--frames"]),
    (["--image", "a.png", "--video", "b.mp4"], ["--image / --video:"]),
    (["--cond-frames", "13"], ["--cond-frames:", "--video"]),
    (["--cond-noise-scale", "0.1"], ["--cond-noise-scale:", "--image or --video"]),
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
    assert sorted(p.name for p in work.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_device_cuda_without_cuda_is_refused_before_loading(root, work, capsys, monkeypatch):
    def no_loading(*a, **k):
        raise AssertionError("loaded a checkpoint although the device is absent")

    monkeypatch.setattr(ue.Engine, "from_pretrained", classmethod(no_loading))
    line = assert_user_error(["generate", root, "--prompt", "a", "--out", "t.pt", "--device", "cuda"], capsys)
    assert line.startswith("ursa-engine: error: --device: cuda requested but torch.cuda.is_available() is False (")


def test_pixel_sizes_are_checked_by_the_tokenizer(fake, work, capsys):
    base = ["generate", fake.root, "--prompt", "a", "--out", "v.mp4", "--no-progress"]
    assert_user_error([*base, "--frames", "10"], capsys, "--frames:", "1 + 4k", "got 10")
    assert_user_error([*base, "--height", "65", "--width", "64"], capsys, "--height:", "spatial stride 8")
    media.save_image(work / "in.png", np.zeros((30, 40, 3), np.uint8))  # 30 is not a multiple of 8
    assert_user_error([*base, "--image", "in.png"], capsys, "--height:", "--image", "resize")
    assert_user_error([*base, "--image", "missing.png"], capsys, "--image:", "missing.png", "does not exist")
    (work / "junk.mp4").write_bytes(b"junk")
    assert_user_error([*base, "--video", "junk.mp4"], capsys, "--video:", "not a readable video")
    media.save_video(work / "short.mp4", np.zeros((5, 16, 16, 3), np.uint8))
    assert_user_error([*base, "--video", "short.mp4"], capsys, "--video:", "5 frames", "13")
    assert fake.engine.calls == [] and not (work / "v.mp4").exists()


# ---------------------------------------------------------------------------- bugs and --debug
def test_debug_shows_the_traceback_of_user_errors(tmp_path, capsys):
    argv = ["generate", str(tmp_path / "nope"), "--prompt", "a", "--out", str(tmp_path / "t.pt")]
    for debug_argv in (["--debug", *argv], [*argv, "--debug"]):
        with pytest.raises(UsageError, match="ROOT: .* does not exist"):
            main(debug_argv)


def test_internal_bugs_keep_their_traceback(fake, work, capsys, monkeypatch):
    argv = ["generate", str(fake.root), "--prompt", "a", "--out", "t.png", "--no-progress"]

    def buggy_generate(*a, **k):
        raise TypeError("generate() got an unexpected keyword argument 'image'")

    monkeypatch.setattr(fake.engine, "generate", buggy_generate)
    with pytest.raises(TypeError, match="unexpected keyword"):  # a TypeError inside the engine is no user error
        main(argv)
    monkeypatch.setattr(fake.engine, "generate", lambda *a, **k: SimpleNamespace(tokens=torch.zeros(1), frames=None))
    with pytest.raises(RuntimeError, match="no .frames"):
        main(argv)
    assert not (work / "t.png").exists()


def test_errors_are_one_line_from_the_installed_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ursa_engine.cli", "generate", str(tmp_path / "nope"),
                           "--prompt", "a", "--out", str(tmp_path / "t.pt")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"ursa-engine: error: ROOT: {tmp_path / 'nope'} does not exist"]


# ---------------------------------------------------------------------------- working runs
def test_tokens_pt_end_to_end_with_a_real_checkpoint(root, work, capsys):
    rc, out, _ = run(["generate", root, "--prompt", "a bear", "--prompt", "bear", "--latents-shape", 3, 4,
                      "--out", "tokens.pt", *FAST], capsys)
    assert rc == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["out"] == ["tokens.pt"] and summary["format"] == "tokens" and summary["frames"] is None
    assert summary["tokens"] == [2, 1, 3, 4] and summary["model_calls"] == 1
    tokens = torch.load(work / "tokens.pt")
    assert tokens.shape == (2, 1, 3, 4) and tokens.dtype == torch.int64
    assert sorted(p.name for p in work.iterdir()) == ["tokens.pt"]


def test_png_through_the_tokenizer(fake, work, capsys):
    rc, out, _ = run(["generate", fake.root, "--prompt", "a", "--prompt", "b", "--height", 16, "--width", 24,
                      "--out", "img.png", "--no-progress"], capsys)
    assert rc == 0
    summary = json.loads(out)
    assert summary["out"] == ["img_0.png", "img_1.png"] and summary["frames"] == [2, 1, 16, 24, 3]
    call = fake.engine.calls[-1]
    assert call.shape == (1, 2, 3) and "image" not in vars(call) and "video" not in vars(call)
    assert media.read_image(work / "img_1.png").shape == (16, 24, 3)


def test_image_to_video_mp4(fake, work, capsys):
    media.save_image(work / "first.png", np.full((20, 30, 3), 200, np.uint8))
    rc, out, _ = run(["generate", fake.root, "--prompt", "a", "--image", "first.png", "--height", 16, "--width", 32,
                      "--frames", 9, "--cond-noise-scale", 0.1, "--fps", 8, "--motion", 9, "--out", "clip.mp4",
                      "--no-progress"], capsys)
    assert rc == 0 and json.loads(out)["out"] == ["clip.mp4"]
    call = fake.engine.calls[-1]
    assert call.shape == (3, 2, 4) and call.image.shape == (16, 32, 3) and call.image.dtype == np.uint8
    assert call.cond_noise_scale == 0.1 and call.motion == 9.0
    frames, fps = media.read_video(work / "clip.mp4")
    assert frames.shape == (9, 16, 32, 3) and fps == 8.0


def test_video_extension_defaults(fake, work, capsys):
    media.save_video(work / "in.mp4", np.full((17, 16, 24, 3), 90, np.uint8), fps=10)
    rc, out, _ = run(["generate", fake.root, "--prompt", "a", "--video", "in.mp4", "--out", "more.mp4",
                      "--no-progress"], capsys)
    assert rc == 0
    call = fake.engine.calls[-1]
    assert call.video.shape == (17, 16, 24, 3) and call.num_cond_frames == 13  # the size of --video, 13 frames
    assert call.shape == (13, 2, 3)  # 49 frames by default for a video tokenizer
    frames, fps = media.read_video(work / "more.mp4")
    assert frames.shape == (49, 16, 24, 3) and fps == 10.0  # --fps defaults to the input video's
