"""Conditioning and previews in the continuous batcher (issues 20 / 23): a conditioned request's
tokens equal Engine.generate's (image to video, video extension both ways of freeze_cond and with
cond_noise_scale, inpainting), conditioned and plain requests share forward passes without touching
each other, preview events carry the model's x̂1 of their step (Engine.generate's recorded draw), and
bad fields are named.

Frames run on a tiny cosmos3d root (tests/roots.py: a 9 x 32 x 48 clip <-> 3 x 4 x 6 codes, pixels
through the engine's own encode); inpainting on the digits model (its patch tokenizer)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from roots import write_tiny_root
from serve_spy import ForwardSpy

import ursa_engine as ue
from ursa_engine.demo import DigitsModel
from ursa_engine.serve import Batcher, GenerationRequest, graphs

SHAPE = (3, 4, 6)
PROMPT = [3, 4, 6]  # "a bear walking" in the tiny root's word ids
KW = dict(num_steps=4, guidance_scale=3.0, guidance_trunc=0.9)


@pytest.fixture(scope="module")
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def video(tmp_path_factory, threads):
    root = write_tiny_root(tmp_path_factory.mktemp("root"), family="cosmos3d")
    return ue.Engine.from_pretrained(root, dtype=torch.float32, device="cpu", prompt_length=8, mode="eager")


@pytest.fixture(scope="module")
def dm(threads):
    return DigitsModel.load()


@pytest.fixture(scope="module")
def pixels():
    rng = np.random.default_rng(0)
    return {"image": rng.integers(0, 256, (32, 48, 3), dtype=np.uint8),
            "video": rng.integers(0, 256, (13, 32, 48, 3), dtype=np.uint8)}


def req(prompt, shape=SHAPE, *, seed=0, n=1, **kw):
    opts = {k: kw.pop(k, v) for k, v in KW.items()}
    return GenerationRequest(prompt_ids=torch.tensor(prompt), latents_shape=shape, seed=seed, n=n, **opts, **kw)


def serve(engine, *requests, **batcher_kw):
    with Batcher(engine, max_rows=8, **batcher_kw) as b:
        jobs = [b.submit(r) for r in requests]
        return [j.future.result(120) for j in jobs]


def reference(engine, prompt, shape=SHAPE, *, seed=0, n=1, **kw):
    opts = {**KW, **kw}
    return engine.generate([prompt] * n, latents_shape=shape, seed=seed, decode=False, **opts).tokens


def test_image_to_video_equals_generate(video, pixels):
    """Frame 0 from an image: the codes of the engine's encode, through the batcher (n = 2, frozen or not)."""
    codes = video.encode_condition(image=pixels["image"], latents_shape=SHAPE)  # (1, 1, 4, 6)
    for freeze in (False, True):
        got, = serve(video, req(PROMPT, seed=3, n=2, cond_latents=codes, freeze_cond=freeze))
        ref = reference(video, PROMPT, seed=3, n=2, image=pixels["image"], freeze_cond=freeze)
        assert torch.equal(got, ref), freeze
        assert torch.equal(got[:, 0], codes[0].expand(2, -1, -1)) or not freeze
    plain, = serve(video, req(PROMPT, seed=3, n=2))
    assert not torch.equal(plain, got)  # the conditioning did something


@pytest.mark.parametrize("freeze", [False, True], ids=["stepped", "frozen"])
@pytest.mark.parametrize("noise", [0.0, 0.4])
def test_video_extension_equals_generate(video, pixels, freeze, noise):
    """The last 5 frames of a 13-frame clip (2 latent frames) as frames 0, 1 (default) or as the last
    two (``cond_indices``), resampled at t = 1 − noise; frozen or stepped."""
    codes = video.encode_condition(video=pixels["video"], latents_shape=SHAPE, num_cond_frames=5)  # (1, 2, 4, 6)
    for indices in (None, (-2, -1)):
        opts = dict(cond_indices=indices, cond_noise_scale=noise, freeze_cond=freeze)
        got, = serve(video, req(PROMPT, seed=11, n=2, cond_latents=codes, **opts))
        ref = reference(video, PROMPT, seed=11, n=2, video=pixels["video"], num_cond_frames=5, **opts)
        assert torch.equal(got, ref), indices


def test_conditioned_and_plain_requests_share_a_pass(video, pixels, monkeypatch):
    """A frozen-frames request and a plain one (another prompt) in one forward pass: each equals its
    own Engine.generate; the plain one's tokens are not held by the other's frozen frames."""
    codes = video.encode_condition(video=pixels["video"], latents_shape=SHAPE, num_cond_frames=5)
    cond = req(PROMPT, seed=5, cond_latents=codes, freeze_cond=True, cond_noise_scale=0.2, num_steps=6)
    plain = req([5, 8], seed=5, num_steps=6)
    with Batcher(video, max_rows=8) as b:
        spy = ForwardSpy(b, video.model, monkeypatch, hold=True)
        first = b.submit(cond)
        assert spy.entered.wait(30)
        second = b.submit(plain)
        spy.go.set()
        got = [first.future.result(120), second.future.result(120)]
        monkeypatch.undo()
    assert spy.shared(), "no forward pass carried both requests"
    ref_cond = reference(video, PROMPT, seed=5, num_steps=6, cond_latents=codes, freeze_cond=True,
                         cond_noise_scale=0.2)
    ref_plain = reference(video, [5, 8], seed=5, num_steps=6)
    assert torch.equal(got[0], ref_cond) and torch.equal(got[1], ref_plain)


def test_conditioning_through_graph_buckets_on_the_cpu(video, pixels, monkeypatch):
    """The CUDA-graph path of serve/graphs.py (capture replaced by calling its body, as in
    tests/test_serve_batcher.py): frozen tokens are written back after each replay too."""
    monkeypatch.setattr(graphs, "cuda_graph_capture", lambda fn, pool, device=None: fn)
    monkeypatch.setattr(graphs.GraphCache, "usable", lambda self, jobs: True)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    codes = video.encode_condition(image=pixels["image"], latents_shape=SHAPE)
    reqs = [req(PROMPT, seed=2, cond_latents=codes, freeze_cond=True), req([5], seed=2)]
    eager = serve(video, *reqs)
    bucketed = serve(video, *reqs, graphs=True)
    for a, g in zip(eager, bucketed, strict=True):
        assert torch.equal(a, g)
    assert torch.equal(bucketed[0][:, 0], codes[0])


# ---------------------------------------------------------------------------- inpainting (digits)
def digit_request(dm, label, *, seed, n=1, frames=1, **kw):
    pad = dm.engine.model.config.pad_token_id
    from ursa_engine import digits

    return GenerationRequest(prompt_ids=digits.prompt_ids([label], pad)[0], latents_shape=(frames, *dm.grid),
                             seed=seed, n=n, num_steps=kw.pop("num_steps", 6),
                             guidance_scale=kw.pop("guidance_scale", 3.0), **kw)


def digit_reference(dm, label, *, seed, n=1, frames=1, **kw):
    return dm.generate([label] * n, frames, seed=seed, num_steps=kw.pop("num_steps", 6), decode=False, **kw)


@pytest.fixture(scope="module")
def known(dm):
    """Known tokens (a generated 4, as the patch tokenizer encodes it) and a mask of half the tokens."""
    tokens = digit_reference(dm, 4, seed=1)  # (1, 1, h, w)
    mask = torch.zeros(1, *dm.grid, dtype=torch.bool)
    mask[..., : dm.grid[1] // 2] = True  # the left half is kept
    return tokens, mask


def test_inpainting_holds_the_known_tokens(dm, known):
    tokens, mask = known
    n = 3
    got, = serve(dm.engine, digit_request(dm, 7, seed=8, n=n, known_tokens=tokens, known_mask=mask))
    assert torch.equal(got[:, mask], tokens[:, mask].expand(n, -1))  # kept tokens hold
    assert not torch.equal(got[:, ~mask], tokens[:, ~mask].expand(n, -1))  # the rest was generated
    assert torch.equal(got, digit_reference(dm, 7, seed=8, n=n, known_tokens=tokens, known_mask=mask))
    empty, = serve(dm.engine, digit_request(dm, 7, seed=8, n=n, known_tokens=tokens, known_mask=mask & False))
    assert torch.equal(empty, digit_reference(dm, 7, seed=8, n=n))  # nothing kept: a plain generation
    full, = serve(dm.engine, digit_request(dm, 7, seed=8, known_tokens=tokens, known_mask=mask | True))
    assert torch.equal(full, tokens)


def test_inpainting_whole_frames_equals_frozen_frames(dm):
    """A mask of whole latent frames is frame conditioning: the same tokens as Engine.generate with
    those frames as ``cond_latents`` and ``freeze_cond=True`` (an independent reference of the
    write-back); composed with frames (union, known tokens win), the two kinds add up."""
    video = digit_reference(dm, 2, seed=4, frames=3)  # (1, 3, h, w)
    mask = torch.zeros(3, *dm.grid, dtype=torch.bool)
    mask[2] = True
    got, = serve(dm.engine, digit_request(dm, 2, seed=9, frames=3, known_tokens=video, known_mask=mask))
    ref = digit_reference(dm, 2, seed=9, frames=3, cond_latents=video[:, 2:], cond_indices=[2], freeze_cond=True)
    assert torch.equal(got, ref)
    both, = serve(dm.engine, digit_request(dm, 2, seed=9, frames=3, known_tokens=video, known_mask=mask,
                                           cond_latents=video[:, :1], freeze_cond=True))
    ref = digit_reference(dm, 2, seed=9, frames=3, cond_latents=video[:, [0, 2]], cond_indices=[0, 2],
                          freeze_cond=True)
    assert torch.equal(both, ref)


# ---------------------------------------------------------------------------- previews
def preview_run(dm, request, **batcher_kw):
    """(result, {step: preview tokens}, step numbers of the "step" events) of one batcher request."""
    events = []
    with Batcher(dm.engine, max_rows=8, **batcher_kw) as b:
        job = b.prepare(request)
        b.subscribe(job, events.append)
        result = b.submit(job).future.result(120)
    steps = [e for e in events if e["event"] == "step"]
    return result, {e["step"]: e["tokens"] for e in steps if "tokens" in e}, [e["step"] for e in steps]


def recorded(dm, label, *, seed, n, num_steps, guidance_scale, **kw):
    """Engine.generate's trajectory of the same request (every model call's x̂1 and state)."""
    return dm.engine.generate(dm.prompts([label] * n), latents_shape=(1, *dm.grid), seed=seed, num_steps=num_steps,
                              guidance_scale=guidance_scale, decode=False, return_trajectory=True, **kw)


def call_of(traj, step: int) -> int:
    """The trajectory's index of the model call that the 1-based ``step`` event follows (grid k = step - 1)."""
    return traj.steps.tolist().index(step - 1)


@pytest.mark.parametrize("scale, per_row", [(3.0, False), (1.0, False), (3.0, True)],
                         ids=["guided", "unguided", "guided-per-row-token-ranges"])
def test_previews_are_the_steps_x1(dm, scale, per_row, monkeypatch):
    """A preview is x̂1 of its step's model call, exactly as Engine.generate draws (and records) it,
    guided or not; the metric path's step 1 (no call) is dropped; previews change no token. The last
    call's x̂1 is the result on the metric path (its last step lands on x̂1). Per-row: the logits in
    token ranges of 9 tokens (each range's draw at its own token offset)."""
    N, n = 6, 2
    if per_row:
        monkeypatch.setattr(dm.engine, "logits_budget", 4 * 256 * 4 * 9)  # 4 rows x K x float32 x 9 tokens
    ask = digit_request(dm, 5, seed=3, n=n, num_steps=N, guidance_scale=scale, preview_steps=(1, 3, 4, N))
    result, shown, steps = preview_run(dm, ask, per_row_sampler=per_row)
    plain, = serve(dm.engine, digit_request(dm, 5, seed=3, n=n, num_steps=N, guidance_scale=scale),
                   per_row_sampler=per_row)
    assert steps == list(range(2, N + 1)) and sorted(shown) == [3, 4, N]  # step 1: no model call, no x̂1
    for t in shown.values():
        assert t.device.type == "cpu" and t.dtype == torch.int64 and t.shape == (n, 1, *dm.grid)
    out = recorded(dm, 5, seed=3, n=n, num_steps=N, guidance_scale=scale)
    traj = out.trajectory
    assert torch.equal(result, plain) and torch.equal(result, out.tokens)  # previews change nothing
    assert bool(traj.guided[call_of(traj, 3)]) == (scale != 1.0)
    for s in (3, 4, N):
        assert torch.equal(shown[s], traj.x1[:, call_of(traj, s)]), s
        assert not torch.equal(shown[s], traj.next_states[:, call_of(traj, s)]) or s == N  # not the state
    assert torch.equal(shown[N], result)  # the last call's x̂1: the metric path's last step lands on it
    assert not torch.equal(shown[3], shown[4])


@pytest.mark.parametrize("per_row", [False, True], ids=["scalar-k", "per-row"])
def test_preview_of_a_job_sharing_a_pass(dm, per_row):
    """Two guided jobs in every forward pass (both queued before the loop starts), the second one
    previewing: its x̂1 comes from its own rows (cond and uncond) of the shared logits."""
    N = 6
    events = []
    with Batcher(dm.engine, max_rows=8, per_row_sampler=per_row) as b:
        b.stop()  # queue both, then start: they join the same steps
        first = b.submit(digit_request(dm, 1, seed=2, n=2, num_steps=N))
        second = b.prepare(digit_request(dm, 5, seed=3, n=2, num_steps=N, preview_steps=(3,)))
        b.subscribe(second, events.append)
        b.submit(second)
        b.start()
        got = [first.future.result(120), second.future.result(120)]
    assert b.metrics.max_rows_seen == 8  # 2 jobs x (cond + uncond) x 2 samples in one pass
    shown = [e["tokens"] for e in events if "tokens" in e]
    out = recorded(dm, 5, seed=3, n=2, num_steps=N, guidance_scale=3.0)
    assert len(shown) == 1 and torch.equal(shown[0], out.trajectory.x1[:, call_of(out.trajectory, 3)])
    assert torch.equal(got[1], out.tokens)


def test_previews_of_a_frozen_request_show_the_held_tokens(dm, known):
    """Inpainting: the preview is the recorded x̂1 with the known tokens written in."""
    tokens, mask = known
    ask = digit_request(dm, 7, seed=8, known_tokens=tokens, known_mask=mask, preview_steps=(2, 4))
    result, shown, _ = preview_run(dm, ask)
    out = recorded(dm, 7, seed=8, n=1, num_steps=6, guidance_scale=3.0, known_tokens=tokens, known_mask=mask)
    traj = out.trajectory
    assert torch.equal(result, out.tokens) and sorted(shown) == [2, 4]
    for s, t in shown.items():
        assert torch.equal(t[:, mask], tokens[:, mask])  # known tokens are known
        x1 = traj.x1[:, call_of(traj, s)]
        assert torch.equal(t, torch.where(traj.frozen, tokens.expand_as(x1), x1)), s
        assert not torch.equal(t, x1)  # the draw under the mask was written over


def test_previews_through_graph_buckets_on_the_cpu(dm, monkeypatch):
    """``graphs=True`` (capture replaced by calling its body, as above): a previewing step runs eagerly,
    the others replay; previews and tokens equal the eager batcher's."""
    monkeypatch.setattr(graphs, "cuda_graph_capture", lambda fn, pool, device=None: fn)
    monkeypatch.setattr(graphs.GraphCache, "capturable", lambda self, jobs: True)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    replays = []
    run = graphs.GraphCache.run
    monkeypatch.setattr(graphs.GraphCache, "run",
                        lambda self, jobs, *a: replays.append(jobs[0].k) or run(self, jobs, *a))
    N = 6
    ask = digit_request(dm, 2, seed=5, n=2, num_steps=N, preview_steps=(3, 5))
    eager, eager_shown, _ = preview_run(dm, ask)
    assert not replays
    bucketed, shown, _ = preview_run(dm, ask, graphs=True)
    assert replays == [1, 3, 5]  # grid steps k of the replays: steps 2, 4, 6 (3 and 5 preview: eager)
    assert torch.equal(bucketed, eager) and sorted(shown) == [3, 5]
    assert all(torch.equal(shown[s], eager_shown[s]) for s in shown)


def test_early_previews_are_close_to_the_final_image(dm):
    """What issue 23 asked: a streamed partial image shows the model's current prediction. Mean
    |pixel − final pixel| (0-255) of the decoded preview vs the decoded state x_t after the same steps
    (25 steps, as the HTTP stream's default), over the ten digits (sample b: label b, seed b). x̂1 is
    a draw, not a mean: early on it is a plausible digit, not yet the final one."""
    N, at, labels = 25, (6, 13, 19), list(range(10))
    events = {}
    with Batcher(dm.engine, max_rows=8) as b:
        jobs = []
        for label in labels:
            job = b.prepare(digit_request(dm, label, seed=label, num_steps=N, preview_steps=at))
            events[label] = []
            b.subscribe(job, events[label].append)
            jobs.append(b.submit(job))
        results = torch.cat([j.future.result(120) for j in jobs])
    shown = {s: torch.cat([next(e["tokens"] for e in events[label] if e.get("step") == s) for label in labels])
             for s in at}
    out = dm.engine.generate(dm.prompts(labels), latents_shape=(1, *dm.grid), seed=0, num_steps=N,
                             guidance_scale=3.0, decode=False, return_trajectory=True)
    assert torch.equal(results, out.tokens)
    final = dm.decode(results) * 255
    pred = [float(np.abs(dm.decode(shown[s]) * 255 - final).mean()) for s in at]
    state = [float(np.abs(dm.decode(out.trajectory.next_states[:, call_of(out.trajectory, s)]) * 255 - final).mean())
             for s in at]
    print(f"\nmean |image - final| over the 10 digits at steps {at} of {N}: preview (x̂1) "
          f"{[round(v, 1) for v in pred]}, state (x_t) {[round(v, 1) for v in state]}")
    assert pred[0] < 0.7 * state[0] and pred[1] < 0.6 * state[1] and pred[2] < 0.6 * state[2]


# ---------------------------------------------------------------------------- bad fields
BAD = [
    (dict(preview_steps=(0,)), "preview_steps"),
    (dict(preview_steps=(7,)), "preview_steps"),  # 6 steps
    (dict(preview_steps=(True,)), "preview_steps"),
    (dict(preview_steps=3), "preview_steps"),
    (dict(cond_noise_scale=0.5), "cond_noise_scale"),  # without cond_latents
    (dict(freeze_cond=True), "freeze_cond"),
    (dict(cond_indices=(0,)), "cond_indices"),
    (dict(cond_latents="frame"), "cond_latents"),
    (dict(cond_latents=torch.zeros(1, 1, 4, 8)), "cond_latents"),  # float codes
    (dict(cond_latents=torch.zeros(1, 1, 3, 3, dtype=torch.long)), "cond_latents"),  # another grid
    (dict(cond_latents=torch.full((1, 1, 4, 8), 10**6)), "cond_latents"),  # past the codebook
    (dict(cond_latents=torch.zeros(1, 1, 4, 8, dtype=torch.long), cond_noise_scale=1.5), "cond_noise_scale"),
    (dict(cond_latents=torch.zeros(1, 1, 4, 8, dtype=torch.long), cond_noise_scale=float("nan")), "cond_noise_scale"),
    (dict(cond_latents=torch.zeros(1, 1, 4, 8, dtype=torch.long), freeze_cond="yes"), "freeze_cond"),
    (dict(cond_latents=torch.zeros(1, 1, 4, 8, dtype=torch.long), cond_indices=(5,)), "cond_indices"),
    (dict(known_tokens=torch.zeros(1, 1, 4, 8, dtype=torch.long)), "known_mask"),
    (dict(known_mask=torch.ones(1, 4, 8, dtype=torch.bool)), "known_tokens"),
    (dict(known_tokens=torch.zeros(1, 1, 4, 4, dtype=torch.long), known_mask=torch.ones(1, 4, 8, dtype=torch.bool)),
     "known_tokens"),
    (dict(known_tokens=torch.zeros(1, 1, 4, 8, dtype=torch.long), known_mask=torch.ones(1, 4, 4, dtype=torch.bool)),
     "known_mask"),
    (dict(known_tokens=torch.zeros(1, 1, 4, 8), known_mask=torch.ones(1, 4, 8, dtype=torch.bool)), "known_tokens"),
    (dict(known_tokens=torch.full((1, 1, 4, 8), -1), known_mask=torch.ones(1, 4, 8, dtype=torch.bool)),
     "known_tokens"),
    (dict(known_tokens=torch.zeros(1, 1, 4, 8, dtype=torch.long), known_mask=torch.ones(1, 4, 8)), "known_mask"),
    (dict(known_tokens=torch.zeros(1, 1, 4, 8, dtype=torch.long), known_mask=torch.full((1, 4, 8), 2)),
     "known_mask"),
    (dict(known_tokens=torch.zeros(1, 1, 4, 8, dtype=torch.long), known_mask=[[1]]), "known_mask"),
]


@pytest.mark.parametrize("fields, name", BAD, ids=[f"{name}-{i}" for i, (_, name) in enumerate(BAD)])
def test_bad_fields_are_named(dm, fields, name):
    assert dm.grid == (4, 8)  # the shapes above
    b = Batcher(dm.engine, max_rows=8)  # never started: prepare runs in the caller's thread
    with pytest.raises(ValueError, match=f"^{name}:"):
        b.prepare(digit_request(dm, 1, seed=0, **fields))
    assert not b._queue
