"""Token-level inpainting (issue 23 item 3, DESIGN §2.4): ``known_tokens`` / ``known_mask`` hold the
known tokens at every step, on every sampler backend, guided or not, in the (faked and real) graph
body, on the masked path and with frame conditioning; pixels -> tokens (:func:`kept_tokens`,
:func:`encode_inpaint`, mask images in both conventions); the pipeline and the CLI.

The digits model's patch decoder is an exact function of each token's own code, so in the kept area
the decoded pixels equal the input's encode -> decode round trip bit for bit. The tiny IBQ root's
conv decoder (GroupNorms, a mid-block attention) lets every token reach every pixel: there the
kept tokens hold exactly and the kept pixels far from the seam are close to the round trip, not equal.
"""

import numpy as np
import pytest
import torch
from engine_fakes import fake_graph_mode
from PIL import Image
from roots import write_tiny_root

import ursa_engine as ue
from ursa_engine import conditioning, digits
from ursa_engine.demo import DEFAULT_ROOT

STEPS = 6
GUIDANCE = {"guided": 3.0, "unguided": 1.0}


# ---------------------------------------------------------------------------- pixels -> tokens
def _brute_kept(keep: np.ndarray, s: int) -> np.ndarray:
    h, w = keep.shape[0] // s, keep.shape[1] // s
    return np.array([[keep[i * s:(i + 1) * s, j * s:(j + 1) * s].all() for j in range(w)] for i in range(h)],
                    dtype=bool).reshape(h, w)


@pytest.mark.parametrize("size, s", [((6, 10), 2), ((12, 20), 4), ((3, 5), 1), ((24, 40), 8), ((8, 24), 8)])
def test_kept_tokens_keeps_a_token_iff_its_whole_patch_is_kept(size, s):
    rng = np.random.default_rng(sum(size) + s)
    for density in (0.0, 0.7, 0.97, 1.0):  # empty, patchy, nearly full, full masks
        keep = rng.random(size) < density
        got = conditioning.kept_tokens(keep, s)
        assert got.dtype == torch.bool and tuple(got.shape) == (size[0] // s, size[1] // s)
        assert np.array_equal(got.numpy(), _brute_kept(keep, s))
        frames = conditioning.kept_tokens(torch.from_numpy(np.stack([keep, ~keep])), s)  # (F, H, W): per frame
        assert np.array_equal(frames[1].numpy(), _brute_kept(~keep, s))
    assert not conditioning.kept_tokens(np.zeros(size, bool), s).any()
    assert conditioning.kept_tokens(np.ones(size, np.uint8), s).all()  # 0/1 integers are accepted


def test_kept_tokens_groups_frames_as_a_causal_video_tokenizer():
    keep = np.ones((9, 4, 4), bool)  # 1 + 4·2 frames, stride (4, 2): 3 latent frames of 2 x 2
    keep[6, 0, 3] = False  # frame 6 belongs to latent frame 2 (frames 5..8), token (0, 1)
    got = conditioning.kept_tokens(keep, (4, 2))
    expected = np.ones((3, 2, 2), bool)
    expected[2, 0, 1] = False
    assert np.array_equal(got.numpy(), expected)


@pytest.mark.parametrize("keep, stride, error, match", [
    (np.ones((7, 10), bool), 2, ValueError, r"keep: a 7x10 mask .* multiples of 2"),
    (np.ones((8, 8), np.float32), 2, TypeError, r"keep: expected a bool mask"),
    (np.full((8, 8), 2, np.int64), 2, ValueError, r"keep: integer masks must hold only 0 and 1"),
    (np.ones((2, 2, 8, 8), bool), 2, ValueError, r"keep: expected a \(H, W\) or \(F, H, W\) mask"),
    (np.ones((4, 8, 8), bool), (4, 2), ValueError, r"keep: 4 frames"),
    (np.ones((8, 8), bool), 0, ValueError, r"stride:"),
])
def test_kept_tokens_refuses_bad_masks_naming_the_argument(keep, stride, error, match):
    with pytest.raises(error, match=match):
        conditioning.kept_tokens(keep, stride)


def test_mask_images_in_both_conventions():
    """Alpha present: OpenAI's (alpha 0 = regenerate; colours ignored). Else diffusers' (white = repaint)."""
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere: ignored when there is alpha
    rgba[:, 3:, 3] = 255  # opaque right half: kept
    keep = conditioning.keep_from_mask_image(Image.fromarray(rgba, "RGBA"))
    assert keep[:, 3:].all() and not keep[:, :3].any()
    assert torch.equal(conditioning.keep_from_mask_image(rgba), keep)
    grey = np.zeros((4, 6), np.uint8)
    grey[:, :2] = 255  # white: repaint
    grey[0, 5] = 127  # dark grey: kept
    keep = conditioning.keep_from_mask_image(Image.fromarray(grey, "L"))
    assert not keep[:, :2].any() and keep[:, 2:].all()
    assert torch.equal(conditioning.keep_from_mask_image(Image.fromarray(grey).convert("RGB")), keep)
    assert torch.equal(conditioning.keep_from_mask_image(grey), keep)
    assert torch.equal(conditioning.keep_from_mask_image(grey >= 128), keep)  # bool: True = repaint
    assert torch.equal(conditioning.keep_from_mask_image(grey / 255.0), keep)  # float in [0, 1]
    with pytest.raises(ValueError, match="mask: a float mask must lie in"):
        conditioning.keep_from_mask_image(np.full((2, 2), 3.0))


# ---------------------------------------------------------------------------- the digits model
@pytest.fixture(scope="module")
def engine():
    return ue.Engine.from_pretrained(DEFAULT_ROOT, device="cpu", dtype=torch.float32, prompt_length=2, mode="eager")


def _prompts(engine, labels):
    return digits.prompt_ids(labels, engine.model.config.pad_token_id)


@pytest.fixture(scope="module")
def source(engine):
    """A generated 7 (uint8 (8, 16, 3)): the image to inpaint, and its shape's latent grid (1, 4, 8)."""
    out = engine.generate(_prompts(engine, [7]), latents_shape=(1, 4, 8), num_steps=STEPS, guidance_scale=3.0,
                          seed=11)
    return out.frames[0, 0]


def _keep_pixels(shape, cols: int) -> np.ndarray:
    """Kept pixels: the left ``cols`` columns (an odd count cuts a patch: that token is regenerated)."""
    keep = np.zeros(shape[:2], bool)
    keep[:, :cols] = True
    return keep


def _pixel_mask(mask: torch.Tensor, s: int) -> np.ndarray:
    """(T, h, w) tokens -> (T, h·s, w·s) pixels of their patches."""
    return mask.repeat_interleave(s, -2).repeat_interleave(s, -1).numpy()


def _run(engine, labels, seed, scale, steps=STEPS, **kw):
    return engine.generate(_prompts(engine, labels), latents_shape=(1, 4, 8), num_steps=steps, guidance_scale=scale,
                           seed=seed, **kw)


@pytest.mark.parametrize("guidance", list(GUIDANCE))
def test_kept_tokens_and_pixels_hold_on_every_backend(engine, source, backend, guidance):
    """(a) kept tokens are the encoded input's at the end; (b) kept pixels are its encode -> decode round
    trip exactly; (c) the regenerated area differs from the input for some seed; batch of 2 prompts."""
    engine.sampler_backend = backend
    try:
        known, mask = engine.encode_inpaint(source, _keep_pixels(source.shape, 9))  # 9 columns: tokens 0..3
        assert mask.shape == (1, 4, 8) and mask[0, :, :4].all() and not mask[0, :, 4:].any()
        roundtrip = engine.decode(known)[0, 0]  # (8, 16, 3)
        kept_px = _pixel_mask(mask, engine.vae.spatial_stride)[0]
        changed = False
        for seed in (0, 1):
            out = _run(engine, [3, 1], seed, GUIDANCE[guidance], known_tokens=known, known_mask=mask)
            assert torch.equal(out.tokens[:, mask], known[:, mask].expand(2, -1))
            for b in range(2):
                assert np.array_equal(out.frames[b, 0][kept_px], roundtrip[kept_px])
                changed |= not np.array_equal(out.frames[b, 0][~kept_px], roundtrip[~kept_px])
        assert changed
    finally:
        engine.sampler_backend = "auto"


@pytest.mark.parametrize("guidance", list(GUIDANCE))
def test_an_empty_mask_is_a_plain_run_and_a_full_mask_returns_the_input(engine, source, backend, guidance):
    engine.sampler_backend = backend
    try:
        known, _ = engine.encode_inpaint(source, np.ones(source.shape[:2], bool))
        plain = _run(engine, [3, 5], 2, GUIDANCE[guidance], 4)
        empty = _run(engine, [3, 5], 2, GUIDANCE[guidance], 4, known_tokens=known,
                     known_mask=torch.zeros(1, 4, 8, dtype=torch.bool))
        assert torch.equal(empty.tokens, plain.tokens)
        full = _run(engine, [3, 5], 2, GUIDANCE[guidance], 3, known_tokens=known[0],
                    known_mask=np.ones((1, 4, 8), int))
        assert torch.equal(full.tokens, known.expand(2, -1, -1, -1))
        assert not torch.equal(plain.tokens[0], known[0])  # the full mask did something
    finally:
        engine.sampler_backend = "auto"


def test_graph_body_inpaints_as_eager_and_reloads_a_new_mask(engine, source, monkeypatch):
    """The captured body (faked on the CPU: tensor step index, static buffers) holds the tokens as
    eager does; a second call with another mask reuses the captured runner (same key) with the new
    mask and values copied in; a call without a mask is another layout."""
    known, _ = engine.encode_inpaint(source, np.ones(source.shape[:2], bool))
    masks = [torch.zeros(1, 4, 8, dtype=torch.bool) for _ in range(2)]
    masks[0][..., :3] = True
    masks[1][..., 2, :] = True
    eager = [_run(engine, [3, 4], 5, 3.0, known_tokens=known, known_mask=m).tokens for m in masks]
    graphs = ue.Engine.from_pretrained(DEFAULT_ROOT, device="cpu", dtype=torch.float32, prompt_length=2)
    fake_graph_mode(graphs, monkeypatch)
    runners = []
    for m, ref in zip(masks, eager, strict=True):
        out = _run(graphs, [3, 4], 5, 3.0, known_tokens=known, known_mask=m, keep_graphs=True)
        assert out.mode == "graph" and torch.equal(out.tokens, ref)
        runners.append(next(iter(graphs._graphs.values())))
    assert runners[0] is runners[1]
    plain = _run(graphs, [3, 4], 5, 3.0, keep_graphs=True)
    assert torch.equal(plain.tokens, _run(engine, [3, 4], 5, 3.0).tokens)
    assert next(iter(graphs._graphs.values())) is not runners[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_inpaint_as_eager(source):
    """Real CUDA graphs (captured once, replayed with the mask and values in static buffers)."""
    eng = ue.Engine.from_pretrained(DEFAULT_ROOT, device="cuda", dtype=torch.float32, prompt_length=2)
    known, mask = eng.encode_inpaint(source, _keep_pixels(source.shape, 8))
    for scale in (3.0, 1.0):
        ref = _run(eng, [3, 4], 5, scale, known_tokens=known, known_mask=mask, mode="eager")
        got = _run(eng, [3, 4], 5, scale, known_tokens=known, known_mask=mask, mode="graph", keep_graphs=True)
        assert got.mode == "graph"
        assert torch.equal(got.tokens, ref.tokens) and torch.equal(got.tokens[:, mask], known[:, mask].expand(2, -1))


# ---------------------------------------------------------------------------- paths, conditioning, checks
CFG = ue.ModelConfig.preset("tiny")  # K = 64
SHAPE = (2, 3, 4)
PROMPTS = [[11, 12, 13], [40, 41, 42, 43, 44]]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return ue.URSATransformer(CFG, init_std=0.2)


def _tiny_engine(model, sched=None):
    sched = sched or ue.Scheduler(ue.MetricPath(ue.Codebook.fsq((4, 4, 4)), alpha=1.0, c=5.0), 4)
    return ue.Engine(model, sched, prompt_length=8, mode="eager")


def _region(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(SHAPE, generator=g) < 0.4
    return torch.randint(0, 62, (1, *SHAPE), generator=g), mask


@pytest.mark.parametrize("sampler", ["euler", "confidence"])
def test_the_masked_path_holds_known_tokens(tiny, sampler):
    sched = ue.Scheduler(ue.MaskPath(64, mask_id=63), 4, mask_sampler=sampler)
    known, mask = _region(1)
    out = _tiny_engine(tiny, sched).generate(PROMPTS, latents_shape=SHAPE, guidance_scale=2.0, seed=3,
                                             known_tokens=known, known_mask=mask)
    assert torch.equal(out.tokens[:, mask], known[:, mask].expand(2, -1))
    assert (out.tokens != 63).all()  # every other token was unmasked


def test_frames_and_known_tokens_freeze_together_and_known_wins(tiny):
    cond = torch.full((1, 1, 3, 4), 5)  # frame 0 given, frozen
    known, mask = _region(2)
    mask[0, 0, 0] = True
    known[0, 0, 0, 0] = 9  # where both give a value the known token wins
    eng = _tiny_engine(tiny)
    out = eng.generate(PROMPTS, latents_shape=SHAPE, guidance_scale=3.0, seed=4, cond_latents=cond, freeze_cond=True,
                       known_tokens=known, known_mask=mask)
    assert torch.equal(out.tokens[:, mask], known[:, mask].expand(2, -1))
    frame0 = out.tokens[:, 0]
    assert frame0[0, 0, 0] == 9 and (frame0[:, ~mask[0]] == 5).all()
    # not frozen: the frame is only the start; the known tokens hold all the same
    out = eng.generate(PROMPTS, latents_shape=SHAPE, guidance_scale=3.0, seed=4, cond_latents=cond,
                       known_tokens=known, known_mask=mask)
    assert torch.equal(out.tokens[:, mask], known[:, mask].expand(2, -1))


def test_a_trajectory_records_known_tokens_as_frozen(tiny):
    known, mask = _region(3)
    out = _tiny_engine(tiny).generate(PROMPTS, latents_shape=SHAPE, guidance_scale=3.0, seed=4, known_tokens=known,
                                      known_mask=mask, return_trajectory=True)
    traj = out.trajectory
    assert torch.equal(traj.frozen, mask.expand(2, -1, -1, -1))
    assert not traj.policy_mask[:, :, mask].any() and traj.policy_mask[:, :, ~mask].all()
    assert (traj.step_logprobs[:, :, mask] == 0).all()


@pytest.mark.parametrize("kw, error, match", [
    ({"known_tokens": torch.zeros(1, *SHAPE, dtype=torch.long)}, ValueError, "known_mask: known_tokens and"),
    ({"known_mask": torch.ones(SHAPE, dtype=torch.bool)}, ValueError, "known_tokens: known_tokens and"),
    ({"known_tokens": torch.zeros(SHAPE), "known_mask": torch.ones(SHAPE, dtype=torch.bool)}, TypeError,
     "known_tokens: expected integer codes"),
    ({"known_tokens": torch.zeros(3, *SHAPE, dtype=torch.long), "known_mask": torch.ones(SHAPE, dtype=torch.bool)},
     ValueError, r"known_tokens: expected \(B or 1, 2, 3, 4\)"),
    ({"known_tokens": torch.full(SHAPE, 64), "known_mask": torch.ones(SHAPE, dtype=torch.bool)}, ValueError,
     r"known_tokens: codes under known_mask must lie in \[0, 64\)"),
    ({"known_tokens": torch.zeros(SHAPE, dtype=torch.long), "known_mask": torch.ones(2, 3, 5, dtype=torch.bool)},
     ValueError, r"known_mask: expected \(2, 3, 4\)"),
    ({"known_tokens": torch.zeros(SHAPE, dtype=torch.long), "known_mask": torch.ones(SHAPE)}, TypeError,
     "known_mask: expected a bool mask"),
])
def test_bad_known_arguments_are_named(tiny, kw, error, match):
    with pytest.raises(error, match=match):
        _tiny_engine(tiny).generate(PROMPTS, latents_shape=SHAPE, **kw)


def test_codes_outside_the_mask_are_ignored(tiny):
    known, mask = _region(4)
    junk = torch.where(mask, known, -1)  # anything outside the mask: not checked, not used
    eng = _tiny_engine(tiny)
    a = eng.generate(PROMPTS, latents_shape=SHAPE, seed=1, known_tokens=junk, known_mask=mask).tokens
    b = eng.generate(PROMPTS, latents_shape=SHAPE, seed=1, known_tokens=known, known_mask=mask).tokens
    assert torch.equal(a, b)


def test_encode_inpaint_checks_its_arguments(engine, source):
    with pytest.raises(ValueError, match=r"keep: a mask of shape \(8, 14\) for an image of 8x16"):
        engine.encode_inpaint(source, np.ones((8, 14), bool))
    with pytest.raises(ValueError, match=r"mask: a mask of shape \(4, 16\)"):
        conditioning.encode_inpaint(engine.vae, source, np.ones((4, 16), bool), name="mask")
    with pytest.raises(ValueError, match=r"image: frames of 8x16 pixels"):
        engine.encode_inpaint(source, np.ones((8, 16), bool), latents_shape=(1, 4, 4))
    with pytest.raises(ValueError, match="image: inpainting pixels needs the checkpoint's tokenizer"):
        conditioning.encode_inpaint(None, source, np.ones((8, 16), bool))
    known, mask = engine.encode_inpaint(Image.fromarray(source), np.ones((8, 16), bool), latents_shape=(3, 4, 8))
    assert known.shape == (1, 3, 4, 8) and mask[0].all() and not mask[1:].any()  # the image is latent frame 0


# ---------------------------------------------------------------------------- a conv tokenizer
@pytest.fixture(scope="module")
def ibq_root(tmp_path_factory):
    return write_tiny_root(tmp_path_factory.mktemp("inpaint") / "ibq", family="ibq")


def test_a_conv_tokenizer_holds_the_kept_tokens_and_roughly_the_far_pixels(ibq_root):
    """The tiny IBQ root (stride 4, random weights): the kept tokens hold exactly. Its decoder's
    GroupNorm statistics and mid-block attention make every pixel depend on every token (there is no
    finite receptive-field margin), so kept pixels 16+ px from the seam only come near the round trip:
    stated tolerance, mean |Δ| at most 0.6× a plain run's there (measured 23.1 vs 45.1 of 255)."""
    eng = ue.Engine.from_pretrained(ibq_root, device="cpu", dtype=torch.float32, prompt_length=8, mode="eager")
    h, w, seam = 4, 24, 64  # 16 x 96 pixels; tokens 0..15 of each row kept
    source = eng.decode(torch.randint(0, 100, (1, 1, h, w), generator=torch.Generator().manual_seed(0)))[0, 0]
    keep = np.zeros(source.shape[:2], bool)
    keep[:, :seam] = True
    known, mask = eng.encode_inpaint(source, keep)
    assert mask[0, :, :16].all() and not mask[0, :, 16:].any()
    roundtrip = eng.decode(known)[0, 0].astype(int)
    far = slice(0, seam - 16)
    gen = dict(latents_shape=(1, h, w), num_steps=4, seed=1)
    out = eng.generate("a bear", known_tokens=known, known_mask=mask, **gen)
    plain = eng.generate("a bear", **gen)
    assert torch.equal(out.tokens[:, mask], known[:, mask])
    inpainted = np.abs(out.frames[0, 0].astype(int) - roundtrip)[:, far].mean()
    unconstrained = np.abs(plain.frames[0, 0].astype(int) - roundtrip)[:, far].mean()
    assert inpainted <= 0.6 * unconstrained, (inpainted, unconstrained)


# ---------------------------------------------------------------------------- pipeline and CLI
def test_pipeline_mask_image_inpaints_in_diffusers_convention(engine, source):
    """White repaints, black keeps; the kept pixels are the round trip, the image is no conditioning frame."""
    pipe = ue.URSAPipeline(engine)
    mask = np.zeros(source.shape[:2], np.uint8)
    mask[:, 8:] = 255  # repaint the right half: tokens 4..7 of each row
    args = dict(prompt_ids=_prompts(engine, [3]), height=8, width=16, num_inference_steps=STEPS, guidance_scale=3,
                max_prompt_length=2, seed=0, image=Image.fromarray(source), output_type="np")
    out = pipe(mask_image=Image.fromarray(mask), **args)
    known, kept = engine.encode_inpaint(source, mask < 128)
    roundtrip = engine.decode(known)[0, 0]
    assert torch.equal(out.result.tokens[:, kept], known[:, kept])
    assert np.array_equal(out.frames[0][:, :8], roundtrip[:, :8])
    assert not np.array_equal(out.frames[0][:, 8:], roundtrip[:, 8:])
    with pytest.raises(ValueError, match=r"mask_image: a mask of shape \(8, 12\)"):
        pipe(mask_image=np.zeros((8, 12), np.uint8), **args)
    with pytest.raises(ValueError, match="mask_image: inpaints image="):
        pipe(mask_image=mask, **{**args, "image": None})


def test_cli_image_and_mask_inpaint_in_openai_convention(ibq_root, tmp_path, monkeypatch, capsys):
    """``generate --image IN.png --mask MASK.png``: an RGBA mask, alpha 0 regenerated (OpenAI's);
    the saved tokens hold the image's codes where the whole patch is opaque; a mask of another size
    is one line naming --mask."""
    from ursa_engine.cli import main

    monkeypatch.chdir(tmp_path)
    eng = ue.Engine.from_pretrained(ibq_root, device="cpu", dtype=torch.float32, prompt_length=8)
    image = eng.decode(torch.randint(0, 100, (1, 1, 4, 6), generator=torch.Generator().manual_seed(1)))[0, 0]
    Image.fromarray(image).save("in.png")
    rgba = np.full((16, 24, 4), 255, np.uint8)
    rgba[:, 10:, 3] = 0  # transparent from column 10: tokens 0, 1 kept (pixels 0..7), token 2 cut
    Image.fromarray(rgba, "RGBA").save("mask.png")
    base = ["generate", str(ibq_root), "--prompt", "a bear", "--image", "in.png", "--steps", "3", "--device", "cpu",
            "--prompt-length", "8", "--no-progress"]
    assert main([*base, "--mask", "mask.png", "--out", "out.pt"]) == 0
    tokens = torch.load("out.pt")
    known, kept = eng.encode_inpaint(image, rgba[..., 3] != 0)
    assert kept[0, :, :2].all() and not kept[0, :, 2:].any()
    assert torch.equal(tokens[:, kept], known[:, kept])
    capsys.readouterr()
    Image.fromarray(rgba[:8], "RGBA").save("small.png")
    assert main([*base, "--mask", "small.png", "--out", "out.pt"]) == 2
    assert "--mask: 8x24 pixels (HxW), but --image is 16x24" in capsys.readouterr().err
    assert main([*base[:4], *base[6:], "--mask", "mask.png", "--out", "out.pt"]) == 2
    assert "--mask: inpaints --image" in capsys.readouterr().err


def test_a_video_tokenizer_inpaints_latent_frame_0(tmp_path):
    """Tiny Cosmos root (strides 4 x 8): one image is latent frame 0 (pixel frame 0 alone); the later
    frames have no known token and are generated (an image-to-video whose first frame is partly repainted)."""
    eng = ue.Engine.from_pretrained(write_tiny_root(tmp_path / "cosmos", family="cosmos3d"), device="cpu",
                                    dtype=torch.float32, prompt_length=8, mode="eager")
    image = eng.decode(torch.randint(0, 64, (1, 1, 4, 6), generator=torch.Generator().manual_seed(2)))[0, 0]
    keep = np.ones(image.shape[:2], bool)
    keep[:, 20:] = False  # 32 x 48 pixels: token columns 0, 1 kept (pixels 0..15), 2 cut, 3..5 repainted
    known, mask = eng.encode_inpaint(image, keep, latents_shape=(2, 4, 6))
    assert known.shape == (1, 2, 4, 6) and mask[0, :, :2].all() and not mask[0, :, 2:].any() and not mask[1].any()
    out = eng.generate("a bear", latents_shape=(2, 4, 6), num_steps=3, seed=0, known_tokens=known, known_mask=mask,
                       decode=False)
    assert torch.equal(out.tokens[:, mask], known[:, mask])
    assert torch.equal(known[0, 0], eng.encode_condition(image=image, latents_shape=(2, 4, 6))[0, 0])
