"""CFG-free checkpoints (issue 19 item 5; UDM-GRPO's models run at guidance 1): at ``guidance_scale=1`` no
step carries unconditional rows — eager steps, the (faked) CUDA-graph body and its captured layouts, the serve
batcher, the pipeline and ``ursa-engine generate --guidance 1`` — and the negative prompt is never encoded.
A spy on ``URSATransformer.hidden_states`` (every forward goes through it) records the rows of each call;
the guided control run shows the spy sees unconditional rows when there are some."""

import pytest
import torch
from engine_fakes import fake_graph_mode
from roots import write_tiny_root

import ursa_engine as ue
from ursa_engine import digits
from ursa_engine.cli import main

PROMPTS = ["a bear", "a cat"]  # B = 2
SHAPE = (1, 2, 3)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_tiny_root(tmp_path_factory.mktemp("cfg_free") / "root", with_vae=False, seed=0)


@pytest.fixture
def engine(root):
    return ue.Engine.from_pretrained(root, device="cpu", dtype=torch.float32, prompt_length=8, num_steps=5)


@pytest.fixture
def rows(monkeypatch):
    """The rows (batch size) of every transformer call, in order."""
    seen, original = [], ue.URSATransformer.hidden_states

    def spy(self, input_ids, *args, **kwargs):
        seen.append(input_ids.shape[0])
        return original(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(ue.URSATransformer, "hidden_states", spy)
    return seen


@pytest.fixture
def negatives(monkeypatch):
    """Every encode_prompts call that encodes a negative prompt."""
    seen, original = [], ue.Engine.encode_prompts

    def spy(self, prompts, *args, **kwargs):
        if kwargs.get("name") == "negative_prompt_ids":
            seen.append(prompts)
        return original(self, prompts, *args, **kwargs)

    monkeypatch.setattr(ue.Engine, "encode_prompts", spy)
    return seen


@pytest.mark.parametrize("trunc", [0.9, 1.0])
def test_eager_steps_carry_no_unconditional_rows(engine, rows, negatives, trunc):
    out = engine.generate(PROMPTS, negative_prompt_ids="worst quality", latents_shape=SHAPE, guidance_scale=1.0,
                          guidance_trunc=trunc, seed=3, decode=False)
    assert out.mode == "eager" and out.guided_steps == 0 and out.model_calls == 4  # step 0 of the metric path: none
    assert rows == [2] * out.model_calls and not negatives
    rows.clear()
    guided = engine.generate(PROMPTS, latents_shape=SHAPE, guidance_scale=3.0, guidance_trunc=trunc, seed=3,
                             decode=False)
    assert guided.guided_steps > 0 and rows.count(4) == guided.guided_steps and negatives  # the spy sees them
    plain = engine.generate(PROMPTS, latents_shape=SHAPE, guidance_scale=1.0, seed=3, decode=False)
    assert torch.equal(plain.tokens, out.tokens)  # the negative prompt plays no part


def test_graph_body_is_captured_without_unconditional_rows(engine, rows, negatives, monkeypatch):
    eager = engine.generate(PROMPTS, latents_shape=SHAPE, guidance_scale=1.0, seed=5, decode=False).tokens
    rows.clear()
    fake_graph_mode(engine, monkeypatch)
    out = engine.generate(PROMPTS, latents_shape=SHAPE, guidance_scale=1.0, seed=5, decode=False, keep_graphs=True)
    assert out.mode == "graph" and torch.equal(out.tokens, eager)
    assert rows and set(rows) == {2} and not negatives
    (runner,) = engine._graphs.values()
    assert set(runner.graphs) == {2}  # one captured layout: B rows, no 2B graph
    assert runner.state.ids.shape[0] == 2  # the captured ids buffer holds no unconditional rows
    engine.release_graphs()
    rows.clear()
    engine.generate(PROMPTS, latents_shape=SHAPE, guidance_scale=3.0, seed=5, decode=False, keep_graphs=True)
    (runner,) = engine._graphs.values()
    assert 4 in set(runner.graphs) and 4 in rows  # the guided control: a 2B layout


@pytest.mark.parametrize("guidance", [1.0, 0.5])  # the authors' pipeline: guidance_scale <= 1 means no guidance
def test_pipeline_at_guidance_one(root, rows, negatives, guidance):
    pipe = ue.URSAPipeline.from_pretrained(root, device="cpu", prompt_length=8)
    out = pipe(PROMPTS, num_inference_steps=4, guidance_scale=guidance, output_type="latent", latents_shape=SHAPE,
               seed=1)
    assert out.result.guided_steps == 0 and rows and set(rows) == {2} and not negatives


def test_cli_generate_guidance_1(root, rows, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["generate", str(root), *(a for p in PROMPTS for a in ("--prompt", p)), "--guidance", "1",
            "--latents-shape", *map(str, SHAPE), "--steps", "4", "--device", "cpu", "--prompt-length", "8",
            "--no-progress", "--out", "t.pt"]
    assert main(argv) == 0, capsys.readouterr().err
    assert rows == [2] * 3


def test_serve_batcher_at_guidance_one(rows):
    from ursa_engine.demo import DigitsModel
    from ursa_engine.serve import Batcher, GenerationRequest

    engine = DigitsModel.load().engine
    pad = engine.model.config.pad_token_id

    def request(label, guidance, n=2):
        return GenerationRequest(prompt_ids=digits.prompt_ids([label], pad)[0], latents_shape=(1, 4, 8), n=n,
                                 num_steps=5, guidance_scale=guidance, guidance_trunc=1.0, seed=label)

    with Batcher(engine, max_rows=8, policy="sequential") as b:
        free = b.submit(request(3, 1.0)).future.result(120)
        assert rows and set(rows) == {2} and b.metrics.max_rows_seen == 2
        rows.clear()
        b.submit(request(4, 3.0)).future.result(120)
        assert 4 in rows  # the guided control: cond + uncond rows
    ref = engine.generate(digits.prompt_ids([3, 3], pad), latents_shape=(1, 4, 8), num_steps=5, guidance_scale=1.0,
                          seed=3, decode=False).tokens
    assert torch.equal(free, ref)
