"""The embedded default model (issue 7): the digits it generates are recognisable (seeded, CPU).

One demo run (the same function as ``ursa-engine demo``) feeds every test; a classifier fit on
scikit-learn's real digits judges the samples.
"""

import json
import os

import numpy as np
import pytest
import torch

import ursa_engine as ue
from ursa_engine import demo, digits

pytest.importorskip("sklearn")

ROOT = demo.DEFAULT_ROOT


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = demo.run_demo(out, seed=0, per_class=4, verbose=False)
    return out, result


@pytest.fixture(scope="module")
def classifier():
    images, labels = digits.load_digits_array()
    return digits.DigitClassifier(images, labels)


def test_bundled_checkpoint_layout_and_size():
    files = [os.path.join(d, f) for d, _, fs in os.walk(ROOT) for f in fs]
    assert sum(os.path.getsize(f) for f in files) <= 10 * 2**20
    cfg = json.loads((ROOT / "scheduler" / "scheduler_config.json").read_text())
    assert {"alpha", "c", "shift"} <= cfg.keys()
    cb = ue.Codebook.from_pretrained(ROOT / "scheduler")
    assert cb.size >= 256 and (cb.emb.norm(dim=1) > 0.1).all()  # no zero code vectors (DESIGN §2.1)
    model = ue.URSATransformer.from_pretrained(ROOT / "transformer")
    assert model.config.lm_head_size == cb.size


def test_patch_tokenizer_round_trip():
    tok = digits.PatchTokenizer.from_pretrained(ROOT / "vae")
    images, _ = digits.load_digits_array()
    frames = digits.make_clips(images[:200], 2, np.random.default_rng(0))
    rec = tok.decode(tok.encode(frames)).numpy()
    assert rec.shape == frames.shape
    assert np.abs(rec - frames).mean() < 0.03
    blank = np.zeros((1, *digits.CANVAS), np.float32)
    assert (tok.encode(blank) == 0).all() and (tok.decode(tok.encode(blank)).numpy() == 0).all()


def test_demo_writes_grid_and_npz(run):
    out, result = run
    png = (out / "samples.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    npz = np.load(out / "samples.npz")
    frames, labels = npz["frames"], npz["labels"]
    assert frames.dtype == np.float32 and frames.ndim == 4 and frames.shape[1] == 1
    assert frames.shape[2:] == digits.CANVAS and len(labels) == len(frames) == 40
    assert 0.0 <= frames.min() and frames.max() <= 1.0
    assert np.issubdtype(labels.dtype, np.integer) and sorted(set(labels.tolist())) == list(range(10))
    assert npz["video_frames"].shape == (10, digits.VIDEO_FRAMES, *digits.CANVAS)
    assert result["seconds"] < 60


def test_class_conditional_samples_are_recognised(run, classifier):
    _, r = run
    img_acc = (classifier.predict(r["frames"][:, 0]) == r["labels"]).mean()
    vid_pred = classifier.predict(r["video_frames"])  # (10, F)
    vid_acc = (vid_pred == r["video_labels"][:, None]).mean()
    assert img_acc >= 0.8, f"image accuracy {img_acc:.2f}"
    assert vid_acc >= 0.8, f"video frame accuracy {vid_acc:.2f}"


def test_video_frames_agree_on_class(run, classifier):
    _, r = run
    pred = classifier.predict(r["video_frames"])  # (10, F)
    majority = np.array([np.bincount(p, minlength=10).max() for p in pred]) / pred.shape[1]
    assert majority.mean() >= 0.9, pred


def test_image_to_video_keeps_given_first_frame(run, classifier):
    _, r = run
    given, video = r["i2v_given"][0], r["i2v_frames"][0]
    assert np.abs(video[0] - given).mean() < 0.05
    assert (classifier.predict(video) == r["i2v_label"]).mean() >= 0.75


def test_interpolation_keeps_both_ends(run, classifier):
    _, r = run
    ends, video = r["interp_given"], r["interp_frames"][0]
    assert np.abs(video[0] - ends[0]).mean() < 0.05
    assert np.abs(video[-1] - ends[1]).mean() < 0.05
    assert (classifier.predict(video) == r["interp_label"]).mean() >= 0.75


def test_same_seed_same_samples():
    dm = demo.DigitsModel.load()
    a = dm.generate([1, 2], 1, seed=3, num_steps=6)
    b = dm.generate([1, 2], 1, seed=3, num_steps=6)
    assert torch.equal(a, b)
