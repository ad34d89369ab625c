"""Property-based fuzzing (hypothesis) of ``Scheduler.step`` and ``Engine.generate`` inputs (issue 20, item 4).

Every drawn input either gives a result of the documented shape, dtype and range, or raises one
``ValueError`` / ``TypeError`` whose message starts with the name of the argument at fault (DESIGN §7):
no other exception type, no hang (hypothesis deadlines), no silently wrong shape. Example counts are
bounded so the file stays a few seconds on 2 CPU cores.
"""

import re

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import ursa_engine as ue  # noqa: E402

K = 9
STEPS = 6
FAST = settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

STEP_ARGS = ("logits", "x", "k", "uncond_logits", "guidance_scale", "guidance_trunc", "temperature", "top_k",
             "top_p", "seed", "token_offset", "out", "backend")


def _names_an_argument(err: Exception, names) -> bool:
    return re.match(rf"^({'|'.join(map(re.escape, names))})\b", str(err)) is not None


@pytest.fixture(scope="module")
def sched():
    return ue.Scheduler(ue.MetricPath(ue.Codebook.fsq((3, 3)), alpha=1.0, c=5.0), STEPS)


def _poison(z: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "none" or z.numel() == 0:
        return z
    z = z.clone()
    flat = z.view(-1, z.shape[-1]) if z.dim() > 0 else z
    if kind == "nan":
        flat[0, 1] = float("nan")
    elif kind == "+inf":
        flat[-1, 0] = float("inf")
    elif kind == "-inf row":
        flat[0] = -float("inf")
    elif kind == "-inf some":
        flat[0, :3] = -float("inf")
    return z


def _chooser(draw):
    """``ch(valid, bad)``: half the examples draw valid values only (so results are checked too)."""
    clean = draw(st.booleans())
    return lambda valid, bad=(): st.sampled_from(list(valid) if clean else list(valid) + list(bad))


@st.composite
def step_inputs(draw):
    ch = _chooser(draw)
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    kz = draw(ch([K], [K - 1, K + 1, 1]))
    zshape = draw(ch([shape], [shape[:-1] or (2,), shape + (1,)]))
    zdtype = draw(ch([torch.float32, torch.float16, torch.bfloat16], [torch.float64, torch.int32]))
    z = torch.randn(*zshape, kz, generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))).to(zdtype)
    if zdtype.is_floating_point:
        z = _poison(z, draw(ch(["none", "-inf some"], ["nan", "+inf", "-inf row"])))
    lo, hi = draw(ch([(0, K)], [(-3, K), (0, K + 3)]))
    x = torch.randint(lo, hi, shape, generator=torch.Generator().manual_seed(1))
    x = x.to(draw(ch([torch.int64], [torch.int32, torch.float32])))
    k = draw(ch([0, 1, STEPS - 1], [STEPS, -1]))
    opts = draw(st.fixed_dictionaries({}, optional={
        "temperature": ch([0.5, 1.0], [0.0, -1.0, float("inf"), float("nan")]),
        "top_k": ch([0, 1, 3, K + 5], [-2]),
        "top_p": ch([1.0, 0.5], [0.0, 1.5]),
        "guidance_scale": ch([1.0, 3.0], [float("nan")]),
        "seed": ch([0, 7], [-1, 2**63]),
        "token_offset": ch([0, 5], [-1]),
        "argmax_last": st.booleans(),
    }))
    if draw(st.booleans()):
        opts["uncond_logits"] = torch.randn(*zshape, kz).to(zdtype)
        opts.setdefault("guidance_scale", 3.0)
    return z, x, k, opts


@FAST
@given(inp=step_inputs(), backend=st.sampled_from(["torch", "auto"]))
def test_step_gives_tokens_or_one_error_naming_the_argument(sched, inp, backend):
    z, x, k, opts = inp
    try:
        y = sched.step(z, k, x, backend=backend, **opts)
    except (ValueError, TypeError) as err:
        assert _names_an_argument(err, STEP_ARGS), f"error names no argument: {err!r}"
        event(f"refused: {str(err).split(':')[0]}")
        return
    event("stepped")
    assert y.shape == x.shape, f"result shape {tuple(y.shape)} != x {tuple(x.shape)}"
    assert y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) < K


# ------------------------------------------------------------------ Engine.generate
CFG = ue.ModelConfig.preset("tiny")
GEN_ARGS = ("prompt_ids", "negative_prompt_ids", "latents_shape", "guidance_scale", "guidance_trunc", "num_steps",
            "shift", "temperature", "top_k", "top_p", "seed", "latents", "mode", "prompt_length", "motion",
            "cond_latents", "cond_indices", "cond_noise_scale")


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    model = ue.URSATransformer(CFG, init_std=0.2)
    sched = ue.Scheduler(ue.MetricPath(ue.Codebook.fsq((4, 4, 4)), alpha=1.0, c=5.0), 2)
    return ue.Engine(model, sched, prompt_length=8, mode="eager")


@st.composite
def generate_inputs(draw):
    ch = _chooser(draw)
    prompts = draw(st.one_of(
        st.lists(st.lists(st.integers(0, 60), max_size=10), min_size=1, max_size=2),
        ch([[[1, 2]], torch.zeros(1, 3, dtype=torch.long)],
           [[[5, -1]], [[10**6]], [], torch.zeros(2, 3), [[1.5]], "text", torch.zeros(2, 2, 2, dtype=torch.long)]),
    ))
    shape = draw(ch([(1, 2, 3), (1, 2, 2), (2, 1, 3), (2, 3)], [(0, 2, 2), (1, -2, 3), (1, 2, 3, 4), (1, 2.5, 3)]))
    opts = draw(st.fixed_dictionaries({}, optional={
        "guidance_scale": ch([1.0, 2.0], [float("nan"), float("inf")]),
        "num_steps": ch([1, 2], [0, -1]),
        "temperature": ch([1.0, 0.7], [0.0, float("nan")]),
        "top_k": ch([0, 2], [-1]),
        "top_p": ch([1.0, 0.9], [0.0, 2.0]),
        "seed": ch([0, 3], [-5]),
        "guidance_trunc": ch([0.9, 0.0], [-0.5, 2.0]),
        "mode": ch(["eager"], ["nonsense"]),
        "prompt_length": ch([4, 8], [-1, 10**7]),
    }))
    return prompts, shape, opts


@settings(max_examples=30, deadline=5000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(inp=generate_inputs())
def test_generate_gives_tokens_or_one_error_naming_the_argument(engine, inp):
    prompts, shape, opts = inp
    try:
        res = engine.generate(prompts, latents_shape=shape, **opts)
    except (ValueError, TypeError) as err:
        assert _names_an_argument(err, GEN_ARGS), f"error names no argument: {err!r}"
        event(f"refused: {str(err).split(':')[0]}")
        return
    event("generated")
    n = len(prompts)
    shape = shape if len(shape) == 3 else (1, *shape)  # (H, W): one frame, as documented
    assert tuple(res.tokens.shape) == (n, *shape), f"tokens {tuple(res.tokens.shape)} for {n} prompts, {shape}"
    assert res.tokens.dtype == torch.int64
    assert int(res.tokens.min()) >= 0 and int(res.tokens.max()) < 64  # fsq (4, 4, 4)


# ------------------------------------------------------------------ URSAPipeline.__call__
PIPE_ARGS = ("prompt", "negative_prompt", "height", "width", "num_frames", "num_inference_steps", "guidance_scale",
             "guidance_trunc", "flow_shift", "num_images_per_prompt", "generator", "latents", "latents_shape",
             "prompt_ids", "negative_prompt_ids", "output_type", "max_prompt_length", "prompt_length", "num_steps",
             "shift", "seed")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from roots import write_tiny_root

    root = write_tiny_root(tmp_path_factory.mktemp("fuzz") / "cosmos3d", family="cosmos3d")
    p = ue.URSAPipeline.from_pretrained(root, torch_dtype=torch.float32, device="cpu", trust_remote_code=True)
    p.set_progress_bar_config(disable=True)
    return p


@st.composite
def pipeline_inputs(draw):
    ch = _chooser(draw)
    kw = {"height": 32, "width": 48, "num_inference_steps": 1, "max_prompt_length": 8, "output_type": "latent",
          "prompt": "a cat"}
    kw.update(draw(st.fixed_dictionaries({}, optional={
        "prompt": ch(["a cat", ["a", "b"], ""], [[], [1, 2], None]),
        "negative_prompt": ch([None, "", "blurry"], [["x", "y", "z"], 3]),
        "height": ch([32], [30, 0, -8, "32"]),
        "width": ch([48, 16], [47, 0]),
        "num_frames": ch([1, 5], [0, 2, -1]),
        "num_inference_steps": ch([1, 2, 2.0], [0, -1, 2.5, "3"]),
        "guidance_scale": ch([1, 3.0], [float("nan"), "x", None]),
        "guidance_trunc": ch([0.9], [-1.0, float("nan")]),
        "num_images_per_prompt": ch([1, 2], [0, True, 1.5]),
        "generator": ch([None, torch.Generator().manual_seed(3)], [5, "g"]),
        "latents_shape": ch([None, (1, 2, 3), (2, 3)], [(0, 2, 3), ("a", 2, 3), (1, 2, 3, 4), 7]),
        "max_prompt_length": ch([8, 4], [-1, 10**7, "8"]),
        "output_type": ch(["latent", "np"], ["foo"]),
        "seed": ch([0, 5], [-1, 2**64, "s"]),
    })))
    return kw


@settings(max_examples=40, deadline=10_000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(kw=pipeline_inputs())
def test_pipeline_call_gives_frames_or_one_error_naming_the_argument(pipe, kw):
    try:
        out = pipe(**kw)
    except (ValueError, TypeError) as err:
        assert _names_an_argument(err, PIPE_ARGS), f"error names no argument: {err!r}"
        event(f"refused: {str(err).split(':')[0]}")
        return
    event("generated")
    prompts = [kw["prompt"]] if isinstance(kw["prompt"], str) else kw["prompt"]
    B = len(prompts) * kw.get("num_images_per_prompt", 1)
    tokens = out.result.tokens
    assert tokens.shape[0] == B and tokens.dim() == 4, (tuple(tokens.shape), kw)
    if kw.get("latents_shape") is not None:
        want = tuple(kw["latents_shape"])
        assert tuple(tokens.shape[1:]) == (want if len(want) == 3 else (1, *want)), (tuple(tokens.shape), kw)
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 64
