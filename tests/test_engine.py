"""Engine.generate on the CPU: equal to a hand-written loop, deterministic, batch invariant,
conditioning, extrapolation, loading a whole checkpoint root, clear errors."""

import json

import pytest
import torch
from engine_fakes import fake_graph_mode

import ursa_engine as ue
from ursa_engine.checkpoint import save_transformer
from ursa_engine.model import latent_positions, sequence_ids
from ursa_engine.tokenizer import pad_prompt_ids

CFG = ue.ModelConfig.preset("tiny")
P = 8  # prompt length for these tests (URSA: 320)
SHAPE = (2, 3, 4)
N_TOK = 24


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ue.URSATransformer(CFG, init_std=0.2)


def metric_sched(steps=4, shift=1.0):
    return ue.Scheduler(ue.MetricPath(ue.Codebook.fsq((4, 4, 4)), alpha=1.0, c=5.0), steps, shift=shift)


def engine_for(model, sched=None, **kw):
    return ue.Engine(model, sched or metric_sched(), prompt_length=P, mode="eager", **kw)


PROMPTS = [[11, 12, 13], [40, 41, 42, 43, 44]]
NEG = [[7, 7]]


def hand_loop(model, sched, prompts, neg, x0, *, scale, trunc, seed):
    """model + scheduler, every step evaluated (no skipping), full logits sliced by hand."""
    B = len(prompts)
    cond = pad_prompt_ids(prompts, CFG.pad_token_id, P)
    uncond = pad_prompt_ids(neg, CFG.pad_token_id, P).expand(B, -1)
    pos = latent_positions(P, SHAPE)
    x = x0.reshape(B, -1)
    seeds = torch.arange(B) + seed
    for k in range(sched.num_steps):
        ids = torch.cat([sequence_ids(cond, x, CFG), sequence_ids(uncond, x, CFG)])
        logits = model(ids, pos)[:, -N_TOK - 1 : -1]
        x = sched.step(logits[:B], k, x, uncond_logits=logits[B:], guidance_scale=scale, guidance_trunc=trunc,
                       seed=seeds)
    return x.view(B, *SHAPE)


def test_generate_equals_hand_written_loop(model):
    sched = metric_sched(steps=5, shift=2.0)
    eng = engine_for(model, sched)
    out = eng.generate(PROMPTS, NEG, SHAPE, guidance_scale=3.0, guidance_trunc=0.8, seed=7)
    x0 = eng.initial_tokens(2, SHAPE, seed=7)
    ref = hand_loop(model, sched, PROMPTS, NEG, x0, scale=3.0, trunc=0.8, seed=7)
    assert out.tokens.shape == (2, *SHAPE) and out.tokens.dtype == torch.int64
    assert torch.equal(out.tokens, ref)
    times = sched.times[:-1]
    assert out.guided_steps == int(((times > 0) & (times < 0.8)).sum())  # step 0 skipped
    assert out.model_calls == 4 and len(out.step_times) == 5 and out.peak_memory is None
    assert out.frames is None and out.decode_time == 0  # no tokenizer: tokens only


def test_guidance_runs_as_one_2b_batch_and_truncation_drops_the_unconditional_half(model):
    sizes = []  # rows of every transformer pass (the embedding sees its (rows, L) ids)
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
    try:
        sched = metric_sched(steps=6)
        engine_for(model, sched).generate(PROMPTS, NEG, SHAPE, guidance_scale=5.0, guidance_trunc=0.5)
    finally:
        hook.remove()
    t = sched.times[1:-1]  # steps 1..N-1 call the model
    assert sizes == [4 if float(v) < 0.5 else 2 for v in t]


def test_guidance_scale_one_never_evaluates_the_negative_prompt(model):
    sizes = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
    try:
        engine_for(model).generate(PROMPTS, latents_shape=SHAPE, guidance_scale=1.0)
    finally:
        hook.remove()
    assert sizes == [2, 2, 2]


def test_same_seed_same_tokens_other_seed_other_tokens(model):
    eng = engine_for(model)
    a = eng.generate(PROMPTS, NEG, SHAPE, seed=3).tokens
    assert torch.equal(a, eng.generate(PROMPTS, NEG, SHAPE, seed=3).tokens)
    assert not torch.equal(a, eng.generate(PROMPTS, NEG, SHAPE, seed=4).tokens)


def test_batch_invariant(model):
    eng = engine_for(model)
    both = eng.generate(PROMPTS, NEG, SHAPE, seed=10).tokens
    alone = eng.generate(PROMPTS[1:], NEG, SHAPE, seed=11).tokens  # sample b uses seed + b
    assert torch.equal(both[1:], alone)


def test_mixture_path_equals_hand_written_loop_without_skipping(model):
    sched = ue.Scheduler(ue.MixturePath(64), 3)
    eng = engine_for(model, sched)
    out = eng.generate(PROMPTS, NEG, SHAPE, guidance_scale=2.0, guidance_trunc=1.0, seed=1)
    ref = hand_loop(model, sched, PROMPTS, NEG, eng.initial_tokens(2, SHAPE, 1), scale=2.0, trunc=1.0, seed=1)
    assert torch.equal(out.tokens, ref) and out.model_calls == 3


def test_mask_path_starts_masked_and_ends_unmasked(model):
    sched = ue.Scheduler(ue.MaskPath(64, mask_id=63), 3)
    eng = engine_for(model, sched)
    assert (eng.initial_tokens(2, SHAPE) == 63).all()
    out = eng.generate(PROMPTS, NEG, SHAPE, seed=2)
    assert not (out.tokens == 63).any()


def test_single_step_metric_path_is_not_skipped(model):
    out = engine_for(model, metric_sched(steps=1)).generate(PROMPTS, NEG, SHAPE)
    assert out.model_calls == 1


def test_frozen_conditioning_frames_are_kept(model):
    eng = engine_for(model)
    cond = torch.randint(0, 64, (1, 2, 3, 4), generator=torch.Generator().manual_seed(0))
    out = eng.generate(PROMPTS, NEG, SHAPE, cond_latents=cond, cond_indices=[0, -1], freeze_cond=True)
    assert torch.equal(out.tokens[:, 0], cond[0, 0].expand(2, -1, -1))
    assert torch.equal(out.tokens[:, 1], cond[0, 1].expand(2, -1, -1))
    first = eng.generate(PROMPTS, NEG, SHAPE, cond_latents=cond[:, :1], freeze_cond=True).tokens
    assert torch.equal(first[:, 0], cond[0, 0].expand(2, -1, -1))


def test_conditioning_frames_are_written_before_the_loop(model):
    eng = engine_for(model)
    cond = torch.randint(0, 64, (2, 1, 3, 4), generator=torch.Generator().manual_seed(1))
    out = eng.generate(PROMPTS, NEG, SHAPE, num_steps=1, guidance_scale=1.0, cond_latents=cond, argmax_last=True)
    x0 = eng.initial_tokens(2, SHAPE)
    x0[:, 0] = cond[:, 0]
    ref = eng.generate(PROMPTS, NEG, SHAPE, num_steps=1, guidance_scale=1.0, latents=x0, argmax_last=True)
    assert torch.equal(out.tokens, ref.tokens)


def test_full_length_cond_video_with_indices_uses_those_frames(model):
    eng = engine_for(model)
    video = torch.randint(0, 64, (1, 2, 3, 4), generator=torch.Generator().manual_seed(2))
    out = eng.generate(PROMPTS, NEG, SHAPE, cond_latents=video, cond_indices=[1], freeze_cond=True)
    assert torch.equal(out.tokens[:, 1], video[0, 1].expand(2, -1, -1))


def test_cond_noise_resamples_given_frames(model):
    eng = engine_for(model)
    cond = torch.zeros(1, 2, 3, 4, dtype=torch.long)
    out = eng.generate(PROMPTS, NEG, SHAPE, cond_latents=cond, freeze_cond=True, cond_noise_scale=0.9)
    assert (out.tokens != 0).any()  # frozen at the noised values, not at the clean ones


def test_extrapolate_slides_a_noised_history_window(model):
    eng = engine_for(model)
    kw = {"guidance_scale": 2.0, "num_steps": 3}
    out = eng.extrapolate(PROMPTS, num_windows=2, latents_shape=(3, 3, 4), history_frames=1, seed=5, **kw)
    assert out.tokens.shape == (2, 3 + 2 * 2, 3, 4)
    first = eng.generate(PROMPTS, latents_shape=(3, 3, 4), seed=5, **kw).tokens
    assert torch.equal(out.tokens[:, :3], first)
    second = eng.generate(PROMPTS, latents_shape=(3, 3, 4), seed=5 + (1 << 32), cond_latents=first[:, -1:],
                          cond_noise_scale=0.1, **kw).tokens
    assert torch.equal(out.tokens[:, 3:5], second[:, 1:])
    assert len(out.step_times) == 9 and out.model_calls == 6


def test_prompt_length_override_equals_an_engine_built_with_it(model):
    a = engine_for(model).generate(PROMPTS, NEG, SHAPE, seed=2, prompt_length=12)
    b = ue.Engine(model, metric_sched(), prompt_length=12, mode="eager").generate(PROMPTS, NEG, SHAPE, seed=2)
    assert torch.equal(a.tokens, b.tokens)
    with pytest.raises(ValueError, match="prompt_length"):
        engine_for(model).generate(PROMPTS, latents_shape=SHAPE, prompt_length=-1)


def test_progress_bar(model, capsys):
    engine_for(model).generate(PROMPTS, NEG, SHAPE, progress=True)
    assert "denoising" in capsys.readouterr().err


def _write_root(root, model, *, alpha=1.0, shift=3.0, tokenizer=True):
    save_transformer(model, root / "transformer")
    (root / "scheduler").mkdir()
    cfg = {"shift": shift, "c": 5.0, **({"alpha": alpha} if alpha is not None else {})}
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    torch.save({"path.emb": ue.Codebook.fsq((4, 4, 4)).emb}, root / "scheduler" / "scheduler_model.pth")
    if tokenizer:
        tokenizers = pytest.importorskip("tokenizers")
        vocab = {"[UNK]": 0, "<|endoftext|>": CFG.pad_token_id, "a": 3, "bear": 4}
        tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
        (root / "tokenizer").mkdir()
        tok.save(str(root / "tokenizer" / "tokenizer.json"))


def test_from_pretrained_root_generates_from_text(tmp_path, model):
    _write_root(tmp_path, model)
    eng = ue.Engine.from_pretrained(tmp_path, dtype=torch.float32, device="cpu", prompt_length=P)
    assert isinstance(eng.scheduler.path, ue.MetricPath) and eng.scheduler.shift == 3.0
    assert eng.scheduler_for(None, None, frames=1).num_steps == 25  # authors' defaults
    assert eng.scheduler_for(None, None, frames=13).num_steps == 50
    out = eng.generate(["a bear", "bear"], latents_shape=(3, 4), num_steps=3, seed=1)
    ids = [[3, 4], [4]]
    ref = engine_for(eng.model, eng.scheduler_for(3, None, 1)).generate(ids, [[]], (3, 4), seed=1)
    assert torch.equal(out.tokens, ref.tokens)
    assert ue.Engine.from_pretrained(tmp_path, device="cpu", shift=1.0).scheduler.shift == 1.0  # user shift wins


def test_from_pretrained_without_alpha_is_the_mixture_path(tmp_path, model):
    _write_root(tmp_path, model, alpha=None, tokenizer=False)
    eng = ue.Engine.from_pretrained(tmp_path, device="cpu", num_steps=2)
    assert isinstance(eng.scheduler.path, ue.MixturePath) and eng.tokenizer is None


def test_rejects_bad_arguments(model, tmp_path):
    eng = engine_for(model)
    cases = [
        ({"prompt_ids": "a bear"}, ValueError, "tokenizer"),
        ({"prompt_ids": [[CFG.lm_vocab_size]]}, ValueError, "text ids"),
        ({"latents_shape": (0, 3, 4)}, ValueError, "latents_shape"),
        ({"negative_prompt_ids": [[1], [2], [3]]}, ValueError, "negative_prompt_ids"),
        ({"cond_latents": torch.zeros(1, 1, 4, 4, dtype=torch.long)}, ValueError, "cond_latents"),
        ({"cond_latents": torch.full((1, 1, 3, 4), 64)}, ValueError, "cond_latents"),
        ({"cond_latents": torch.zeros(1, 1, 3, 4)}, TypeError, "cond_latents"),
        ({"cond_latents": torch.zeros(1, 1, 3, 4, dtype=torch.long), "cond_indices": [5]}, ValueError, "cond_indices"),
        ({"cond_latents": torch.zeros(1, 1, 3, 4, dtype=torch.long), "cond_noise_scale": 2.0}, ValueError,
         "cond_noise_scale"),
        ({"cond_indices": [0]}, ValueError, "cond_indices"),
        ({"seed": -1}, ValueError, "seed"),
        ({"guidance_scale": float("nan")}, ValueError, "guidance_scale"),
        ({"latents": torch.zeros(2, 1, 3, 4, dtype=torch.long)}, ValueError, "latents"),
        ({"mode": "graph"}, RuntimeError, "CUDA"),
        ({"mode": "fast"}, ValueError, "mode"),
        ({"num_steps": 0}, ValueError, "num_steps"),
    ]
    for kwargs, err, match in cases:
        with pytest.raises(err, match=match):
            eng.generate(**{"prompt_ids": PROMPTS, "latents_shape": SHAPE, **kwargs})
    with pytest.raises(ValueError, match="K=27"):
        ue.Engine(model, ue.Scheduler(ue.MixturePath(27), 2))
    with pytest.raises(FileNotFoundError, match="transformer/"):
        ue.Engine.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="history_frames"):
        eng.extrapolate(PROMPTS, num_windows=1, latents_shape=SHAPE, history_frames=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("freeze", [False, True])
def test_cuda_graph_replay_gives_the_eager_tokens(freeze):
    torch.manual_seed(0)
    model = ue.URSATransformer(CFG, init_std=0.2, device="cuda", dtype=torch.bfloat16)
    eng = ue.Engine(model, metric_sched(steps=6), prompt_length=P)
    cond = torch.randint(0, 64, (1, 1, 3, 4), device="cuda")
    kw = {"guidance_scale": 3.0, "guidance_trunc": 0.5, "seed": 4, "cond_latents": cond, "freeze_cond": freeze}
    eager = eng.generate(PROMPTS, NEG, SHAPE, mode="eager", **kw)
    graph = eng.generate(PROMPTS, NEG, SHAPE, mode="graph", **kw)
    again = eng.generate(PROMPTS, NEG, SHAPE, mode="graph", **kw)  # cached graphs, inputs reloaded
    assert graph.mode == "graph" and eager.mode == "eager"
    assert torch.equal(graph.tokens, eager.tokens) and torch.equal(again.tokens, eager.tokens)
    other = eng.generate(PROMPTS, NEG, SHAPE, mode="graph", **{**kw, "seed": 5})
    assert torch.equal(other.tokens, eng.generate(PROMPTS, NEG, SHAPE, mode="eager", **{**kw, "seed": 5}).tokens)
    assert graph.peak_memory > 0 and len(graph.step_times) == 6


def test_graph_step_body_with_device_step_index_gives_the_eager_tokens(model, monkeypatch):
    """The CUDA-graph path on the CPU: the captured body (tensor step index, static buffers, warm-up
    state restored, cached runner reloaded) "replayed" by calling it; only the capture is faked."""
    import ursa_engine.graphs as graphs

    def fake_capture(fn, pool):
        fn()  # the warm-up runs mutate the state, as on the GPU
        fn()
        return fn

    eng = engine_for(model, metric_sched(steps=6))
    cond = torch.randint(0, 64, (1, 1, 3, 4), generator=torch.Generator().manual_seed(3))
    kw = {"guidance_scale": 3.0, "guidance_trunc": 0.5, "seed": 4, "cond_latents": cond, "freeze_cond": True}
    eager = [eng.generate(PROMPTS, NEG, SHAPE, **{**kw, "seed": s}).tokens for s in (4, 5)]
    monkeypatch.setattr(graphs, "cuda_graph_capture", fake_capture)
    monkeypatch.setattr(eng, "_resolve_mode", lambda mode, sched: "graph")
    first = eng.generate(PROMPTS, NEG, SHAPE, **kw)
    runner = next(iter(eng._graphs.values()))
    assert first.mode == "graph" and set(runner.graphs) == {2, 4}  # the 2B and the B layouts
    again = eng.generate(PROMPTS, NEG, SHAPE, **{**kw, "seed": 5})
    assert next(iter(eng._graphs.values())) is runner  # reused, its inputs reloaded
    assert torch.equal(first.tokens, eager[0]) and torch.equal(again.tokens, eager[1])


def test_cli_generate(tmp_path, model, capsys):
    from ursa_engine.cli import main

    _write_root(tmp_path, model)
    out = tmp_path / "tokens.pt"
    assert main(["generate", str(tmp_path), "--prompt", "a bear", "--prompt", "bear", "--latents-shape", "3", "4",
                 "--steps", "2", "--device", "cpu", "--prompt-length", "8", "--out", str(out), "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["tokens"] == [2, 1, 3, 4] and summary["model_calls"] == 1
    assert torch.load(out).shape == (2, 1, 3, 4)


def test_graph_runner_reused_for_another_latent_shape_uses_its_rope(model, monkeypatch):
    """Same token count, other (T, H, W): a reused runner must replay the new 3D rope positions."""
    eng = engine_for(model, metric_sched(steps=6))
    kw = {"guidance_scale": 3.0, "guidance_trunc": 0.5, "seed": 4}
    eager = [eng.generate(PROMPTS, NEG, s, **kw).tokens for s in ((2, 3, 4), (2, 4, 3))]
    fake_graph_mode(eng, monkeypatch)
    first = eng.generate(PROMPTS, NEG, (2, 3, 4), **kw)
    runner = next(iter(eng._graphs.values()))
    second = eng.generate(PROMPTS, NEG, (2, 4, 3), **kw)
    assert next(iter(eng._graphs.values())) is runner  # reused: the captured rope tables were reloaded
    assert first.mode == second.mode == "graph"
    assert torch.equal(first.tokens, eager[0]) and torch.equal(second.tokens, eager[1])


@pytest.mark.parametrize("graph", [False, True])
def test_sampler_backend_auto_is_tuned_once_per_generate_and_used_by_every_step(model, monkeypatch, graph):
    """Eager and graph mode run the same concrete sampler backend: one ``tune`` before the loop
    (outside any capture), its choice passed to every step; on the CPU ``tune`` is simulated."""
    import ursa_engine.engine as engine_mod

    sched = metric_sched(steps=6)
    eng = engine_for(model, sched)
    tuned, backends = [], []
    step = sched.step
    monkeypatch.setattr(engine_mod, "_tunable", lambda state: True)
    monkeypatch.setattr(sched, "tune", lambda *a, **kw: tuned.append(1) or "torch")
    monkeypatch.setattr(sched, "step", lambda *a, **kw: backends.append(kw["backend"]) or step(*a, **kw))
    if graph:
        fake_graph_mode(eng, monkeypatch)
    out = eng.generate(PROMPTS, NEG, SHAPE, guidance_scale=3.0, guidance_trunc=0.5, seed=4)
    assert out.mode == ("graph" if graph else "eager")
    assert len(tuned) == 1 and backends and set(backends) == {"torch"}


def test_backend_names_and_sampling_options_are_checked_before_anything_runs(model, monkeypatch):
    for kw, name in [({"attn_backend": "flashy"}, "attn_backend"), ({"ops_backend": "cuda"}, "ops_backend"),
                     ({"sampler_backend": "fast"}, "sampler_backend")]:
        with pytest.raises(ValueError, match=name):
            engine_for(model, **kw)
        assert (model.attn_backend, model.ops_backend) == ("auto", "auto")  # nothing written
    eng = engine_for(model, sampler_backend="torch")
    calls = []
    monkeypatch.setattr(model, "forward", lambda *a, **kw: calls.append(1))
    monkeypatch.setattr(model, "hidden_states", lambda *a, **kw: calls.append(1))
    for kw, name in [({"temperature": 0.0}, "temperature"), ({"temperature": float("inf")}, "temperature"),
                     ({"top_k": -1}, "top_k"), ({"top_k": 1.5}, "top_k"), ({"top_p": 0.0}, "top_p"),
                     ({"top_p": 1.5}, "top_p")]:
        with pytest.raises(ValueError, match=name):
            eng.generate(PROMPTS, NEG, SHAPE, **kw)
    assert not calls  # rejected before the first forward


@pytest.mark.parametrize("keep", [None, True, False])
def test_graphs_are_released_before_decoding_unless_kept(tmp_path, monkeypatch, keep):
    """The graphs' private pool cannot serve ordinary allocations: a decoding call frees it first
    (so the decode never adds to the step's peak); a call without decoding keeps it."""
    from roots import write_tiny_root

    root = write_tiny_root(tmp_path / "root", family="ibq")
    eng = ue.Engine.from_pretrained(root, device="cpu", dtype=torch.float32, prompt_length=8, num_steps=3)
    fake_graph_mode(eng, monkeypatch)
    out = eng.generate("a bear", latents_shape=(1, 2, 2), keep_graphs=keep)
    assert out.mode == "graph" and out.frames.shape == (1, 1, 8, 8, 3)
    assert bool(eng._graphs) == bool(keep)
    eng.generate("a bear", latents_shape=(1, 2, 2), decode=False, keep_graphs=None if keep is None else keep)
    assert bool(eng._graphs) == (keep is not False)


# ----------------------------------------------------------------------------- head + sampler by token range
def _paths():
    table = ue.Codebook(torch.randn(64, 8, generator=torch.Generator().manual_seed(9)))
    return {
        "metric-fsq": lambda: metric_sched(steps=5, shift=2.0),
        "metric-table": lambda: ue.Scheduler(ue.MetricPath(table, alpha=0.5, c=6.0), 5),
        "mixture": lambda: ue.Scheduler(ue.MixturePath(64), 4),
        "mask": lambda: ue.Scheduler(ue.MaskPath(64, mask_id=63), 4),
        "mask-confidence": lambda: ue.Scheduler(ue.MaskPath(64, mask_id=63), 4, mask_sampler="confidence"),
    }


def _offsets(sched, monkeypatch):
    """Record the token_offset of every scheduler call."""
    seen, step = [], sched.step
    monkeypatch.setattr(sched, "step", lambda *a, **kw: seen.append(kw.get("token_offset", 0)) or step(*a, **kw))
    return seen


@pytest.mark.parametrize("path", list(_paths()))
@pytest.mark.parametrize("scale", [1.0, 3.0])
@pytest.mark.parametrize("graph", [False, True])
def test_head_and_sampler_by_token_range_give_the_unchunked_tokens(model, monkeypatch, path, scale, graph):
    """lm_head + sampler run on token ranges [s, e) of every sample (cond and uncond rows together,
    ``token_offset=s``): every draw is keyed by token (§2.5), so the tokens are exactly those of the
    whole-logits step, for every path, with and without guidance, eager and in the graph body. The
    MaskGIT confidence sampler ranks a sample's tokens together: it keeps whole logits."""
    if graph and path == "mask-confidence":
        pytest.skip("the confidence sampler takes python step indices: no graph body")
    kw = {"guidance_scale": scale, "guidance_trunc": 0.7, "seed": 3, "argmax_last": path == "mixture"}
    whole = engine_for(model, _paths()[path](), logits_budget=None, head="chunked")
    sched = _paths()[path]()
    ranged = engine_for(model, sched, logits_budget=5 * 4 * 64 * 4, head="chunked")  # 5 tokens of 4 rows, fp32
    if graph:
        fake_graph_mode(whole, monkeypatch)
        fake_graph_mode(ranged, monkeypatch)
    ref = whole.generate(PROMPTS, NEG, SHAPE, **kw)
    offsets = _offsets(sched, monkeypatch)
    out = ranged.generate(PROMPTS, NEG, SHAPE, **kw)
    assert out.mode == ref.mode == ("graph" if graph else "eager")
    assert torch.equal(out.tokens, ref.tokens)
    if path == "mask-confidence":
        assert set(offsets) == {0}
    else:  # 5-token ranges with guidance (4 rows), 10 without (2 rows): ragged tails of 24 tokens
        ranges = {0, 5, 10, 15, 20} if scale != 1.0 else {0, 10, 20}
        assert ranges <= set(offsets) and set(offsets) <= {0, 5, 10, 15, 20}


def test_logits_budget_bounds_the_range_of_logits(model):
    """Every logits tensor of a step is one range's: (rows, at most 7 tokens, K) for a 7-token budget."""
    shapes = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: shapes.append(tuple(out.shape)))
    try:
        eng = engine_for(model, metric_sched(steps=3), logits_budget=7 * 4 * 64 * 4, head="chunked")
        eng.generate(PROMPTS, NEG, SHAPE, guidance_scale=3.0, guidance_trunc=1.0)
    finally:
        hook.remove()
    assert shapes == [(4, 7, 64), (4, 7, 64), (4, 7, 64), (4, 3, 64)] * 2  # steps 1 and 2 (step 0 skipped)


def _fused_or_skip():
    from ursa_engine.ops_library import head_draw_unavailable

    reason = head_draw_unavailable(torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("path", ["metric-fsq", "metric-table", "mixture"])
@pytest.mark.parametrize("graph", [False, True])
def test_fused_head_gives_the_tokens_of_the_chunked_head(model, monkeypatch, path, graph):
    """``head="fused"``: x̂1 drawn inside the lm_head GEMM (ursa_engine.triton_kernels.head_draw; the interpreter
    here), the step fed ``x1=``: the same law and uniforms, so the same tokens (float ties aside, none
    at this size), by token range too."""
    _fused_or_skip()
    kw = {"guidance_scale": 3.0, "guidance_trunc": 0.7, "seed": 5, "argmax_last": path == "mixture"}
    chunked = engine_for(model, _paths()[path](), head="chunked")
    fused = engine_for(model, _paths()[path](), head="fused", logits_budget=2 * (8 * 1 + 12) * 10)  # 10 tokens
    if graph:
        fake_graph_mode(chunked, monkeypatch)
        fake_graph_mode(fused, monkeypatch)
    ref = chunked.generate(PROMPTS, NEG, SHAPE, **kw)
    out = fused.generate(PROMPTS, NEG, SHAPE, **kw)
    assert torch.equal(out.tokens, ref.tokens)


def test_fused_head_refuses_what_it_cannot_draw(model):
    _fused_or_skip()
    for sched, kw, why in [(ue.Scheduler(ue.MaskPath(64, mask_id=63), 3), {}, "mask id"),
                           (metric_sched(), {"top_k": 5}, "top-k"),
                           (ue.Scheduler(ue.MaskPath(64, 63), 3, mask_sampler="confidence"), {}, "confidence")]:
        with pytest.raises(RuntimeError, match=why):
            engine_for(model, sched, head="fused").generate(PROMPTS, NEG, SHAPE, **kw)
    with pytest.raises(ValueError, match="head"):
        engine_for(model, head="fast")
    with pytest.raises(ValueError, match="logits_budget"):
        engine_for(model, logits_budget=0)


def test_auto_head_is_chunked_on_the_cpu(model):
    """The fused head runs on the CPU only through the Triton interpreter: ``auto`` never picks it there."""
    eng = engine_for(model)
    assert eng.head == "auto" and eng.logits_budget == 512 * 2**20
    from ursa_engine.graphs import LoopState

    state = LoopState(eng, eng.scheduler, None, torch.zeros(2, 24, dtype=torch.long), None, None, None,
                      {"top_k": 0, "top_p": 1.0}, False, 24, 2)
    eng.configure(state, 4)
    assert state.fused_head is False
