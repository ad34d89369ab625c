"""Pixels in and out on the CPU: Engine with a tokenizer (decoded frames, image / video conditioning,
extrapolation in pixels) and the drop-in URSAPipeline, on tiny checkpoint roots (tests/roots.py)."""

import numpy as np
import pytest
import torch
from roots import TINY_IBQ, tiny_tokenizer, write_tiny_root

import ursa_engine as ue
from ursa_engine.vae import TokenizerError

P = 8  # prompt length for these tests (URSA: 320)
SHAPES = {"cosmos3d": (3, 4, 6), "ibq": (1, 8, 12)}  # latent grids of 9x32x48 clips / 32x48 images
KW = {"num_steps": 3, "guidance_scale": 3.0}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("roots")
    return {fam: write_tiny_root(base / fam, family=fam) for fam in ("cosmos3d", "ibq")}


@pytest.fixture(scope="module")
def engines(roots):
    return {fam: ue.Engine.from_pretrained(root, dtype=torch.float32, device="cpu", prompt_length=P)
            for fam, root in roots.items()}


@pytest.fixture(scope="module")
def video_engine(engines):
    return engines["cosmos3d"]


@pytest.fixture(scope="module")
def clip(video_engine):
    """A decoded (1, 9, 32, 48, 3) uint8 clip and a 13-frame one (two clips, the second's frame 0 dropped)."""
    a = video_engine.generate("a bear", latents_shape=(3, 4, 6), seed=1, **KW).frames
    b = video_engine.generate("cat", latents_shape=(3, 4, 6), seed=2, **KW).frames
    return a, np.concatenate([a, b[:, 5:]], 1)


@pytest.fixture(scope="module")
def pipe(roots):
    p = ue.URSAPipeline.from_pretrained(roots["cosmos3d"], torch_dtype=torch.float32, device="cpu",
                                        trust_remote_code=True)
    p.set_progress_bar_config(disable=True)
    return p


def call_kw(**kw):
    return {"height": 32, "width": 48, "num_inference_steps": 3, "max_prompt_length": P, **kw}


# ---------------------------------------------------------------------------- Engine: decoded frames
@pytest.mark.parametrize("family", ["cosmos3d", "ibq"])
def test_generate_decodes_frames_with_the_tokenizer(engines, family):
    eng = engines[family]
    shape = SHAPES[family]
    out = eng.generate(["a bear", "cat"], latents_shape=shape, seed=3, **KW)
    F = eng.vae.num_frames(shape[0])
    assert out.frames.shape == (2, F, 32, 48, 3) and out.frames.dtype == np.uint8
    assert np.array_equal(out.frames, eng.vae.decode_frames(out.tokens))
    assert out.decode_time > 0 and len(out.step_times) == 3 and out.total_time >= out.decode_time
    tokens_only = eng.generate(["a bear", "cat"], latents_shape=shape, seed=3, decode=False, **KW)
    assert tokens_only.frames is None and tokens_only.decode_time == 0
    assert torch.equal(tokens_only.tokens, out.tokens)


def test_engine_without_a_tokenizer_returns_tokens_only(tmp_path):
    eng = ue.Engine.from_pretrained(write_tiny_root(tmp_path, with_vae=False), device="cpu", prompt_length=P)
    out = eng.generate("a bear", latents_shape=(3, 4, 6), **KW)
    assert eng.vae is None and out.frames is None and out.tokens.shape == (1, 3, 4, 6)
    assert ue.Engine.from_pretrained(write_tiny_root(tmp_path / "b"), device="cpu", load_vae=False).vae is None


# ---------------------------------------------------------------------------- Engine: pixel conditioning
def test_image_to_video_writes_the_image_codes_into_frame_0(video_engine, clip):
    eng, image = video_engine, clip[0][0, 0]
    codes = eng.vae.encode_frames(image)  # (1, 1, 4, 6)
    frozen = eng.generate(["a bear", "cat"], latents_shape=(3, 4, 6), image=image, freeze_cond=True, **KW)
    assert torch.equal(frozen.tokens[:, 0], codes[0, 0].expand(2, -1, -1))
    # unfrozen (the authors' semantic): the codes are written before the loop, then stepped like any token
    x0 = eng.initial_tokens(2, (3, 4, 6), seed=5)
    x0[:, 0] = codes[0, 0]
    by_image = eng.generate(["a bear", "cat"], latents_shape=(3, 4, 6), image=image, seed=5, **KW)
    by_latents = eng.generate(["a bear", "cat"], latents_shape=(3, 4, 6), latents=x0, seed=5, **KW)
    assert torch.equal(by_image.tokens, by_latents.tokens)
    PIL = pytest.importorskip("PIL.Image")
    by_pil = eng.generate(["a bear", "cat"], latents_shape=(3, 4, 6), image=PIL.fromarray(image), seed=5, **KW)
    assert torch.equal(by_pil.tokens, by_image.tokens)


def test_image_batch_conditions_each_sample_and_cond_indices_place_it(video_engine, clip):
    eng = video_engine
    images = np.stack([clip[0][0, 0], clip[0][0, 8]])  # (2, H, W, 3): one image per prompt
    codes = eng.vae.encode_frames(images[:, None])[:, 0]
    out = eng.generate(["a bear", "cat"], latents_shape=(3, 4, 6), image=images, freeze_cond=True, **KW)
    assert torch.equal(out.tokens[:, 0], codes)
    last = eng.generate(["a bear", "cat"], latents_shape=(3, 4, 6), image=images, cond_indices=[-1],
                        freeze_cond=True, **KW)
    assert torch.equal(last.tokens[:, -1], codes)


def test_video_extension_encodes_the_last_num_cond_frames(video_engine, clip):
    eng, video = video_engine, clip[1][0]  # (13, H, W, 3)
    codes = eng.vae.encode_frames(video[-5:])  # 5 frames -> 2 latent frames
    kw = {"latents_shape": (3, 4, 6), "seed": 7, "cond_noise_scale": 0.1, **KW}
    by_video = eng.generate("a bear", video=video, num_cond_frames=5, **kw)
    by_codes = eng.generate("a bear", cond_latents=codes, **kw)
    assert torch.equal(by_video.tokens, by_codes.tokens)
    frozen = eng.generate("a bear", video=video, num_cond_frames=5, freeze_cond=True, latents_shape=(3, 4, 6), **KW)
    assert torch.equal(frozen.tokens[:, :2], codes)
    whole = eng.generate("a bear", video=video[-9:], freeze_cond=True, latents_shape=(3, 4, 6), **KW)
    assert torch.equal(whole.tokens, eng.vae.encode_frames(video[-9:]))  # default: every given frame


def test_pixel_arguments_are_checked_before_anything_runs(video_engine, clip, tmp_path, monkeypatch):
    eng = video_engine
    image, video = clip[0][0, 0], clip[1][0]
    no_vae = ue.Engine.from_pretrained(write_tiny_root(tmp_path, with_vae=False), device="cpu", prompt_length=P)
    for kw, name in [({"image": image}, "image"), ({"video": video}, "video")]:
        with pytest.raises(ValueError, match=name):
            no_vae.generate("a bear", latents_shape=(3, 4, 6), **kw)
    calls = []
    monkeypatch.setattr(eng.model, "forward", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(eng.model, "hidden_states", lambda *a, **k: calls.append(1))  # what the steps call
    cases = [
        ({"image": image[:16]}, ValueError, "image"),  # 16x48 pixels for a 4x6 grid (32x48)
        ({"image": image.astype(np.float32)}, TypeError, "image"),
        ({"image": np.stack([image] * 3)}, ValueError, "image"),  # 3 images for 2 prompts
        ({"image": image[..., :2]}, ValueError, "image"),
        ({"video": video[:6]}, ValueError, "video"),  # 6 frames: not 1 + 4k
        ({"video": video}, ValueError, "video"),  # 13 frames -> 4 latent frames > T = 3
        ({"video": video, "num_cond_frames": 4}, ValueError, "num_cond_frames"),
        ({"video": video[:5], "num_cond_frames": 9}, ValueError, "num_cond_frames"),
        ({"num_cond_frames": 5}, ValueError, "num_cond_frames"),
        ({"image": image, "video": video}, ValueError, "image"),
        ({"image": image, "cond_latents": torch.zeros(1, 1, 4, 6, dtype=torch.long)}, ValueError, "cond_latents"),
    ]
    for kw, err, name in cases:
        with pytest.raises(err, match=name):
            eng.generate(["a bear", "cat"], latents_shape=(3, 4, 6), **kw)
    assert not calls


# ---------------------------------------------------------------------------- Engine: extrapolation in pixels
def test_extrapolate_from_pixels_returns_pixels(video_engine, clip):
    eng, video = video_engine, clip[1]  # (1, 13, H, W, 3)
    kw = {"latents_shape": (3, 4, 6), "history_frames": 2, "seed": 9, **KW}
    out = eng.extrapolate("a bear", num_windows=2, video=video, **kw)
    history = eng.vae.encode_frames(video[:, -5:])  # 2 latent frames = the last 5 pixel frames
    assert out.tokens.shape == (1, 2 + 2 * 1, 4, 6) and torch.equal(out.tokens[:, :2], history)
    w1 = eng.generate("a bear", latents_shape=(3, 4, 6), seed=9 + (1 << 32), cond_latents=history,
                      cond_noise_scale=0.1, **KW)
    assert torch.equal(out.tokens[:, 2:3], w1.tokens[:, 2:])
    skip = eng.vae.num_frames(2)  # 5 pixel frames re-show the history
    assert out.frames.shape == (1, 13 + 2 * (9 - skip), 32, 48, 3)
    assert np.array_equal(out.frames[:, :13], video)  # the given pixels, kept as they are
    assert np.array_equal(out.frames[:, 13:17], w1.frames[:, skip:])  # the README loop: video[num_cond_frames:]
    assert out.decode_time > 0 and len(out.step_times) == 6
    tokens_in = eng.extrapolate("a bear", num_windows=2, video=out.tokens[:, :2], **kw)  # tokens still accepted
    assert torch.equal(tokens_in.tokens, out.tokens)
    assert np.array_equal(tokens_in.frames[:, 5:], out.frames[:, 13:])


def test_extrapolate_from_the_prompt_decodes_each_window(video_engine):
    eng = video_engine
    kw = {"latents_shape": (3, 4, 6), "history_frames": 1, "seed": 4, **KW}
    out = eng.extrapolate(["a bear", "cat"], num_windows=1, **kw)
    first = eng.generate(["a bear", "cat"], latents_shape=(3, 4, 6), seed=4, **KW)
    second = eng.generate(["a bear", "cat"], latents_shape=(3, 4, 6), seed=4 + (1 << 32), decode=True,
                          cond_latents=first.tokens[:, -1:], cond_noise_scale=0.1, **KW)
    assert np.array_equal(out.frames, np.concatenate([first.frames, second.frames[:, 1:]], 1))
    assert eng.extrapolate(["a bear", "cat"], num_windows=1, decode=False, **kw).frames is None
    image = first.frames[0, 0]
    from_image = eng.extrapolate("a bear", num_windows=1, image=image, freeze_cond=True, **kw)
    assert torch.equal(from_image.tokens[:, 0], eng.vae.encode_frames(image)[:, 0])
    with pytest.raises(ValueError, match="video"):
        eng.extrapolate("a bear", num_windows=1, video=np.zeros((1, 2, 32, 48, 3), np.uint8), **kw | {
            "history_frames": 2})


# ---------------------------------------------------------------------------- loading
def test_load_rejects_a_tokenizer_of_another_codebook_size(tmp_path):
    root = write_tiny_root(tmp_path)
    tiny_tokenizer("ibq").save_pretrained(root / "vae")  # K = 100 next to a K = 64 scheduler
    with pytest.raises(ValueError, match=r"K=100.*K=64"):
        ue.Engine.from_pretrained(root, device="cpu")
    eng = ue.Engine.from_pretrained(root, device="cpu", load_vae=False)
    with pytest.raises(ValueError, match=r"K=100.*K=64"):
        ue.Engine(eng.model, eng.scheduler, vae=tiny_tokenizer("ibq"))


def test_load_names_a_missing_tokenizer_weight(tmp_path):
    from safetensors.torch import load_file, save_file

    root = write_tiny_root(tmp_path, family="ibq")
    path = root / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    state.pop("quantizer.embedding.weight")
    save_file(state, path)
    with pytest.raises(TokenizerError, match="quantizer.embedding.weight"):
        ue.Engine.from_pretrained(root, device="cpu")


def test_tiny_root_scheduler_codebook_is_the_tokenizers_table(roots, engines):
    vae = engines["ibq"].vae
    emb = ue.Codebook.from_pretrained(roots["ibq"] / "scheduler").emb
    assert torch.equal(emb, vae.quantizer.embedding.weight) and vae.codebook_size == TINY_IBQ["num_vq_embeddings"]
    assert engines["cosmos3d"].scheduler.path.size == 64 == engines["cosmos3d"].model.config.lm_head_size


# ---------------------------------------------------------------------------- URSAPipeline
def test_pipeline_one_frame_gives_pil_images(pipe):
    Image = pytest.importorskip("PIL.Image")
    out = pipe(["a bear", "cat"], num_images_per_prompt=2, **call_kw(seed=1))
    assert isinstance(out.frames, list) and len(out.frames) == 4
    assert all(isinstance(im, Image.Image) and im.size == (48, 32) for im in out.frames)
    assert np.array_equal(np.asarray(out.frames[1]), out.result.frames[1, 0])


def test_pipeline_video_gives_uint8_frames_and_readme_semantics(pipe):
    out = pipe("motion=9.0, a bear", num_frames=9, **call_kw(seed=2))
    assert isinstance(out.frames, np.ndarray) and out.frames.dtype == np.uint8
    assert out.frames.shape == (1, 9, 32, 48, 3) and out.frames[0].shape == (9, 32, 48, 3)  # .frames[0]: a video
    assert out[0] is out.frames
    image = pipe("a bear", **call_kw(seed=2)).frames[0]  # README: text-to-image, then image-to-video
    i2v = pipe("motion=9.0, a bear", num_frames=9, image=image, output_type="latent", **call_kw(seed=3))
    assert i2v.frames.shape == (1, 3, 4, 6)
    # README video-to-video loop: video[-num_cond_frames:] sliced by hand, or num_cond_frames= given
    video = out.frames[0]
    a = pipe("motion=5.0, a bear", num_frames=9, video=video[-5:], cond_noise_scale=0.1, **call_kw(seed=4)).frames
    b = pipe("motion=5.0, a bear", num_frames=9, video=video, num_cond_frames=5, cond_noise_scale=0.1,
             **call_kw(seed=4)).frames
    assert np.array_equal(a, b)


def test_pipeline_same_seed_same_frames(pipe):
    kw = call_kw(num_frames=9)
    a = pipe("a bear", generator=torch.Generator().manual_seed(5), **kw).frames
    assert np.array_equal(a, pipe("a bear", generator=torch.Generator().manual_seed(5), **kw).frames)
    assert np.array_equal(a, pipe("a bear", seed=5, **kw).frames)  # a generator gives its initial seed
    assert not np.array_equal(a, pipe("a bear", seed=6, **kw).frames)
    torch.manual_seed(0)
    c = pipe("a bear", **kw).frames  # neither: a seed drawn from torch's global RNG
    torch.manual_seed(0)
    assert np.array_equal(c, pipe("a bear", **kw).frames)


def test_pipeline_latents_equal_engine_generate(pipe):
    out = pipe("a bear", num_frames=9, num_images_per_prompt=2, guidance_trunc=0.8, output_type="latent",
               **call_kw(seed=8))
    ref = pipe.engine.generate(["a bear", "a bear"], None, (3, 4, 6), guidance_scale=7.0, guidance_trunc=0.8,
                               num_steps=3, seed=8, decode=False, prompt_length=P)
    assert torch.equal(out.frames, ref.tokens)
    neg = pipe("a bear", negative_prompt="cat", num_frames=9, output_type="latent", **call_kw(seed=8)).frames
    ref = pipe.engine.generate("a bear", ["cat"], (3, 4, 6), num_steps=3, seed=8, prompt_length=P)
    assert torch.equal(neg, ref.tokens)


def test_pipeline_cond_indices_follow_the_authors(pipe):
    cond = torch.randint(0, 64, (1, 3, 4, 6), generator=torch.Generator().manual_seed(0))
    out = pipe("a bear", num_frames=9, cond_latents=cond, cond_indices=[2], freeze_cond=True, output_type="latent",
               **call_kw(seed=1)).frames
    assert torch.equal(out[:, 2], cond[:, 2])  # frame i <- cond_latents[:, i]
    first = pipe("a bear", num_frames=9, cond_latents=cond[:, :1], freeze_cond=True, output_type="latent",
                 **call_kw(seed=1)).frames
    assert torch.equal(first[:, 0], cond[:, 0])


def test_pipeline_guidance_at_most_one_runs_the_conditional_rows_only(pipe):
    rows = []
    # every transformer pass embeds its (rows, L) ids (the engine calls hidden_states, then the head by range)
    hook = pipe.transformer.model.embed_tokens.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    try:
        pipe("a bear", guidance_scale=0.5, **call_kw(seed=1))
    finally:
        hook.remove()
    assert rows and set(rows) == {1}


def test_pipeline_ignores_unknown_keywords_and_names_bad_ones(pipe):
    out = pipe("a bear", model_id="BAAI/URSA", pipe=pipe, text_prompt="x", output_type="latent", **call_kw(seed=1))
    assert out.frames.shape == (1, 1, 4, 6)
    for kw, name in [({"output_type": "video"}, "output_type"), ({"height": 30}, "height"),
                     ({"num_frames": 8}, "num_frames"), ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
                     ({"generator": [torch.Generator()]}, "generator")]:
        with pytest.raises((ValueError, TypeError), match=name):
            pipe("a bear", **{**call_kw(seed=1), **kw})
    with pytest.raises(ValueError, match="prompt"):
        pipe(**call_kw())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_generation_decodes_like_eager(roots):
    eng = ue.Engine.from_pretrained(roots["cosmos3d"], dtype=torch.float16, device="cuda", prompt_length=P)
    assert eng.vae.dtype == torch.float16 and eng.vae.device.type == "cuda"
    kw = {"latents_shape": (3, 4, 6), "seed": 3, **KW}
    eager = eng.generate(["a bear", "cat"], mode="eager", **kw)
    graph = eng.generate(["a bear", "cat"], mode="graph", **kw)
    assert graph.mode == "graph" and torch.equal(graph.tokens, eager.tokens)
    assert np.array_equal(graph.frames, eager.frames)
    assert graph.peak_memory > 0 and graph.decode_peak_memory > 0 and graph.decode_time > 0


def test_conditioning_clip_longer_than_an_encode_tile_is_refused_naming_the_argument(tmp_path):
    import numpy as np
    import pytest
    from roots import write_tiny_root

    import ursa_engine as ue

    root = write_tiny_root(tmp_path / "root", family="cosmos3d")
    engine = ue.Engine.from_pretrained(root, device="cpu", dtype=torch.float32, prompt_length=8)
    video = np.zeros((13, 32, 48, 3), np.uint8)  # 13 frames > sample_frames = 9: the tiles would drop 4
    with pytest.raises(ValueError, match="num_cond_frames: 13 frames are encoded in temporal tiles of 9"):
        engine.encode_condition(video=video, latents_shape=(5, 4, 6), num_cond_frames=13)
    assert engine.encode_condition(video=video, latents_shape=(5, 4, 6), num_cond_frames=9).shape == (1, 3, 4, 6)
