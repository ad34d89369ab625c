"""Rollout trajectories and their replay with gradients (issue 18, DESIGN §9).

The recorded quantities are checked against independent dense computations: ``x1_logprobs``
against ``log_softmax`` of the reference's guided logits of the full model output at the drawn
ids; ``step_logprobs`` against the exact one-step law given x̂1 (``Scheduler.step_probs(x1=)``) at
the transitions taken; the replay against the rollout (1e-5, fp32) and ``gradcheck`` (fp64).
"""

import pytest
import torch

import ursa_engine as ue
from ursa_engine import training
from ursa_engine.model import latent_positions, sequence_ids
from ursa_engine.reference.sampler import guided_logits

CFG = ue.ModelConfig.preset("tiny")
P = 6
SHAPE = (2, 2, 3)
N_TOK = 12
PROMPTS = [[11, 12, 13], [40, 41, 42, 43, 44]]
NEG = [[7, 7]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ue.URSATransformer(CFG, init_std=0.2)


def scheds():
    table = ue.Codebook(torch.randn(64, 8, generator=torch.Generator().manual_seed(9)))
    return {
        "metric-fsq": lambda: ue.Scheduler(ue.MetricPath(ue.Codebook.fsq((4, 4, 4)), alpha=1.0, c=5.0), 5, shift=2.0),
        "metric-table": lambda: ue.Scheduler(ue.MetricPath(table, alpha=0.5, c=6.0), 4),
        "mixture": lambda: ue.Scheduler(ue.MixturePath(64, "cosine"), 4),
        "mask": lambda: ue.Scheduler(ue.MaskPath(64, mask_id=63), 4),
    }


OPTIONS = {
    "guided": dict(guidance_scale=3.0, guidance_trunc=0.8),
    "unguided-T": dict(guidance_scale=1.0, temperature=0.7),
    "filtered": dict(guidance_scale=2.0, guidance_trunc=1.0, top_k=9, top_p=0.8),
}


def engine_for(model, sched, **kw):
    return ue.Engine(model, sched, prompt_length=P, mode="eager", **kw)


def rollout(model, path="metric-fsq", options="guided", backend="torch", seed=3, **kw):
    eng = engine_for(model, scheds()[path](), sampler_backend=backend)
    return eng, eng.generate(PROMPTS, NEG, SHAPE, seed=seed, return_trajectory=True, **OPTIONS[options], **kw)


def _skip_filtered(backend, options):
    if options == "filtered" and backend == "triton":
        pytest.skip("the Triton sampler does not fuse top-k / top-p")


# ------------------------------------------------------------------------------------------ recording
@pytest.mark.parametrize("path", ["metric-fsq", "metric-table", "mixture", "mask"])
@pytest.mark.parametrize("options", list(OPTIONS))
def test_recording_keeps_the_tokens_of_an_unrecorded_run(model, backend, path, options):
    _skip_filtered(backend, options)
    eng, out = rollout(model, path, options, backend)
    plain = eng.generate(PROMPTS, NEG, SHAPE, seed=3, **OPTIONS[options])
    assert torch.equal(out.tokens, plain.tokens)
    t = out.trajectory
    S = out.model_calls
    assert t.states.shape == t.x1.shape == t.next_states.shape == (2, S, *SHAPE)
    assert t.x1_logprobs.dtype == t.step_logprobs.dtype == torch.float32
    assert torch.equal(t.next_states[:, :-1], t.states[:, 1:])
    assert torch.equal(t.next_states[:, -1], out.tokens)
    k0 = 1 if path.startswith("metric") else 0  # the metric path's step 0 makes no call (β̇(0) = 0)
    assert t.steps.tolist() == list(range(k0, t.scheduler.num_steps))
    assert torch.allclose(t.times, t.scheduler.times[t.steps])
    assert t.guided.tolist() == [OPTIONS[options]["guidance_scale"] != 1.0
                                 and float(tk) < OPTIONS[options].get("guidance_trunc", 1.0) for tk in t.times]
    assert torch.equal(t.seeds, torch.tensor([3, 4]))


def _dense_x1_logprobs(model, eng, t, s):
    """log softmax of the reference's z over the whole model output at call s, at the drawn ids."""
    B = t.states.shape[0]
    x = t.states[:, s].reshape(B, -1)
    rows = [t.prompt_ids] + ([t.negative_prompt_ids] if bool(t.guided[s]) else [])
    ids = sequence_ids(torch.cat(rows), x.repeat(len(rows), 1), CFG)
    logits = model(ids, latent_positions(P, SHAPE))[:, -N_TOK - 1 : -1]  # (rows, n, K)
    o = t.options
    path = t.scheduler.path
    z = guided_logits(logits[:B], logits[B:] if len(rows) > 1 else None, guidance_scale=o["guidance_scale"],
                      temperature=o["temperature"], top_k=o["top_k"], top_p=o["top_p"],
                      exclude=path.mask_id if isinstance(path, ue.MaskPath) else None)
    return torch.log_softmax(z, -1).gather(-1, t.x1[:, s].reshape(B, -1, 1)).squeeze(-1).view(B, *SHAPE)


@pytest.mark.parametrize("path", ["metric-table", "mixture", "mask"])
@pytest.mark.parametrize("options", list(OPTIONS))
def test_x1_logprobs_are_the_dense_log_softmax_at_the_drawn_ids(model, backend, path, options):
    _skip_filtered(backend, options)
    eng, out = rollout(model, path, options, backend)
    t = out.trajectory
    with torch.no_grad():
        for s in range(t.num_calls):
            want = _dense_x1_logprobs(model, eng, t, s)
            assert torch.isfinite(want).all()  # every drawn id is one the filtering kept
            torch.testing.assert_close(t.x1_logprobs[:, s].double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["metric-fsq", "metric-table", "mixture", "mask"])
def test_step_logprobs_are_the_exact_law_given_x1_at_the_taken_transitions(model, path):
    eng, out = rollout(model, path, "guided", "torch", seed=11)
    t = out.trajectory
    sched = t.scheduler
    moved = 0
    for s in range(t.num_calls):
        k = int(t.steps[s])
        x, x1, nxt = t.states[:, s].reshape(-1), t.x1[:, s].reshape(-1), t.next_states[:, s].reshape(-1)
        law = sched.step_probs(None, k, x, x1=x1)  # (D, K) float64, the law given x̂1
        want = law.gather(-1, nxt[:, None]).squeeze(-1).log()
        torch.testing.assert_close(t.step_logprobs[:, s].reshape(-1).double(), want, atol=1e-5, rtol=1e-5)
        moved += int((nxt != x).sum())
    assert moved > 0  # jumps were taken and checked, not only stays


def test_step_logprobs_of_frozen_tokens_are_zero_and_marked(model):
    eng = engine_for(model, scheds()["metric-fsq"]())
    cond = torch.randint(0, 64, (1, 1, 2, 3), generator=torch.Generator().manual_seed(2))
    out = eng.generate(PROMPTS, NEG, SHAPE, seed=1, cond_latents=cond, freeze_cond=True, return_trajectory=True,
                       guidance_scale=3.0)
    t = out.trajectory
    assert t.frozen.shape == (2, *SHAPE) and t.frozen[:, 0].all() and not t.frozen[:, 1].any()
    assert (t.step_logprobs[:, :, 0] == 0).all()
    assert torch.equal(t.next_states[:, :, 0], cond.expand(2, t.num_calls, 2, 3))


def test_draw_then_step_given_x1_is_the_step(backend):
    """Scheduler.draw is the step's own x̂1 draw, on every backend and path."""
    g = torch.Generator().manual_seed(4)
    for name, make in scheds().items():
        sched = make()
        K = sched.path.size
        x = torch.randint(0, K, (3, 7), generator=g)
        cond, uncond = torch.randn(2, 3, 7, K, generator=g).unbind(0)
        for k in (1, sched.num_steps - 1):
            kw = dict(uncond_logits=uncond, guidance_scale=2.5, seed=torch.tensor([5, 6, 7]), backend=backend)
            want = sched.step(cond, k, x, **kw)
            x1 = sched.draw(cond, k, x, **kw)
            got = sched.step(None, k, x, x1=x1, seed=kw["seed"], backend=backend)
            assert torch.equal(got, want), (name, k)


def test_recording_refuses_what_it_cannot_record(model):
    eng = engine_for(model, ue.Scheduler(ue.MaskPath(64, mask_id=63), 4, mask_sampler="confidence"))
    with pytest.raises(ValueError, match="return_trajectory"):
        eng.generate(PROMPTS, NEG, SHAPE, return_trajectory=True)
    eng = engine_for(model, scheds()["mixture"]())
    with pytest.raises(ValueError, match="return_trajectory"):
        eng.generate(PROMPTS, NEG, SHAPE, return_trajectory=True, mode="graph")


# ------------------------------------------------------------------------------------------ replay
@pytest.mark.parametrize("path", ["metric-table", "mixture", "mask"])
@pytest.mark.parametrize("options", list(OPTIONS))
def test_replay_equals_the_rollout(model, backend, path, options):
    _skip_filtered(backend, options)
    _, out = rollout(model, path, options, backend)
    t = out.trajectory
    rep = training.trajectory_logprobs(model, None, t)
    assert rep.steps == list(range(t.num_calls))
    torch.testing.assert_close(rep.x1_logprobs, t.x1_logprobs, atol=1e-5, rtol=0)
    assert torch.equal(rep.step_logprobs, t.step_logprobs)
    some = training.trajectory_logprobs(model, t.prompt_ids, t, steps=[0, -1], with_step_logprobs=False)
    torch.testing.assert_close(some.x1_logprobs, t.x1_logprobs[:, [0, -1]], atol=1e-5, rtol=0)


def test_replay_gradients_flow_through_both_halves_of_guided_calls(model):
    _, out = rollout(model, "mixture", "guided")
    t = out.trajectory
    assert t.guided.any()
    m = ue.URSATransformer(CFG)
    m.load_state_dict(model.state_dict())
    m.requires_grad_(True)
    seen = {"rows": []}
    hook = m.model.embed_tokens.register_forward_hook(lambda mod, inp, o: seen["rows"].append(inp[0].shape[0]))
    rep = training.trajectory_logprobs(m, None, t, steps=[0])
    hook.remove()
    assert seen["rows"] == [4]  # cond and uncond rows in one pass
    rep.x1_logprobs.sum().backward()
    assert m.lm_head.weight.grad.abs().sum() > 0 and m.model.layers[0].self_attn.qkv_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("options", ["guided", "filtered", "unguided-T"])
def test_replay_gradcheck_fp64(model, options):
    _, out = rollout(model, "mask" if options == "filtered" else "metric-table", options)
    t = out.trajectory
    m = ue.URSATransformer(CFG).double()
    m.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    names = ["lm_head.weight", "model.norm.weight", "model.layers.1.mlp.down_proj.weight"]
    params = {k: v.detach().clone().requires_grad_(True) for k, v in m.named_parameters() if k in names}

    def f(*values):
        with torch.nn.utils.stateless._reparametrize_module(m, dict(zip(names, values, strict=True))):
            return training.trajectory_logprobs(m, None, t, steps=[0, 1], with_step_logprobs=False,
                                                chunk_rows=5).x1_logprobs.double()

    assert torch.autograd.gradcheck(f, tuple(params[k] for k in names), fast_mode=True, eps=1e-6, atol=1e-5)


def test_replay_names_bad_arguments(model):
    _, out = rollout(model, "mixture", "guided")
    t = out.trajectory
    with pytest.raises(ValueError, match="steps"):
        training.trajectory_logprobs(model, None, t, steps=[t.num_calls])
    with pytest.raises(ValueError, match="prompt_ids"):
        training.trajectory_logprobs(model, t.prompt_ids[:1], t)
    with pytest.raises(TypeError, match="trajectory"):
        training.trajectory_logprobs(model, None, {"states": t.states})


# ------------------------------------------------------------------------------------------ fused head
def test_fused_head_records_the_chunked_heads_trajectory(model):
    """head="fused" hands out log p(x̂1) from its own log-sum-exp (the interpreter here)."""
    from ursa_engine.ops_library import head_draw_unavailable

    reason = head_draw_unavailable(torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)
    kw = dict(guidance_scale=3.0, guidance_trunc=0.7, temperature=0.8, seed=5, return_trajectory=True)
    for path in ("metric-fsq", "mixture"):
        chunked = engine_for(model, scheds()[path](), head="chunked").generate(PROMPTS, NEG, SHAPE, **kw)
        fused = engine_for(model, scheds()[path](), head="fused",
                           logits_budget=2 * (8 * 1 + 12) * 5).generate(PROMPTS, NEG, SHAPE, **kw)
        assert torch.equal(fused.tokens, chunked.tokens)
        a, b = fused.trajectory, chunked.trajectory
        assert torch.equal(a.x1, b.x1) and torch.equal(a.step_logprobs, b.step_logprobs)
        torch.testing.assert_close(a.x1_logprobs, b.x1_logprobs, atol=1e-5, rtol=0)
        rep = training.trajectory_logprobs(model, None, a)
        torch.testing.assert_close(rep.x1_logprobs, a.x1_logprobs, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ review fixes
def test_replay_through_the_fused_linear_logprob_equals_the_rollout(model):
    """Unguided, unfiltered calls replay through training.linear_logprobs: Triton (interpreter) and torch."""
    from ursa_engine.triton_kernels.sampler import unavailable

    if unavailable(torch.device("cpu")) is not None:
        pytest.skip(unavailable(torch.device("cpu")))
    _, out = rollout(model, "metric-table", "unguided-T")
    t = out.trajectory
    for backend in ("torch", "triton"):
        rep = training.trajectory_logprobs(model, None, t, backend=backend, with_step_logprobs=False)
        torch.testing.assert_close(rep.x1_logprobs, t.x1_logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("options", ["guided", "unguided-T"])
def test_bf16_replay_equals_the_rollout(options):
    """A bf16 rollout drew from logits rounded to bf16: the replay rounds them the same way."""
    torch.manual_seed(0)
    m = ue.URSATransformer(CFG, init_std=0.2).to(torch.bfloat16)
    _, out = rollout(m, "mixture", options)
    t = out.trajectory
    rep = training.trajectory_logprobs(m, None, t, with_step_logprobs=False)
    torch.testing.assert_close(rep.x1_logprobs, t.x1_logprobs, atol=1e-5, rtol=0)


def test_guided_replay_gradient_splits_at_equal_logits():
    """Where c == u (cond and uncond hidden states equal) z = u + s(c − u): d/dc = s·dz, d/du = (1 − s)·dz."""
    from ursa_engine.training.replay import guided_logprobs

    g = torch.Generator().manual_seed(0)
    hc = torch.randn(5, 8, dtype=torch.float64, generator=g)
    W = torch.randn(11, 8, dtype=torch.float64, generator=g)
    x1 = torch.randint(0, 11, (5,), generator=g)
    a, b = hc.clone().requires_grad_(True), hc.clone().requires_grad_(True)
    guided_logprobs(a, W, x1, uncond_hidden=b, guidance_scale=3.0).sum().backward()
    c, u = hc.clone().requires_grad_(True), hc.clone().requires_grad_(True)
    z = u @ W.T + 3.0 * (c @ W.T - u @ W.T)
    torch.log_softmax(z, -1).gather(-1, x1[:, None]).sum().backward()
    torch.testing.assert_close(a.grad, c.grad)
    torch.testing.assert_close(b.grad, u.grad)
    assert a.grad.abs().sum() > 0


def test_argmax_last_is_a_deterministic_choice(model):
    _, out = rollout(model, "mixture", "guided", argmax_last=True)
    t = out.trajectory
    assert (t.x1_logprobs[:, -1] == 0).all() and (t.step_logprobs[:, -1] == 0).all()
    assert (t.x1_logprobs[:, :-1] < 0).any()
    rep = training.trajectory_logprobs(model, None, t)
    torch.testing.assert_close(rep.x1_logprobs, t.x1_logprobs, atol=1e-5, rtol=0)


def test_policy_mask_leaves_out_unmasked_and_frozen_tokens(model):
    _, out = rollout(model, "mask", "guided")
    t = out.trajectory
    assert torch.equal(t.policy_mask, t.states == 63)
    assert t.policy_mask[:, 0].all() and not t.policy_mask[:, -1].all()
    eng = engine_for(model, scheds()["mixture"]())
    cond = torch.randint(0, 63, (1, 1, 2, 3), generator=torch.Generator().manual_seed(2))
    t = eng.generate(PROMPTS, NEG, SHAPE, cond_latents=cond, freeze_cond=True, return_trajectory=True).trajectory
    assert not t.policy_mask[:, :, 0].any() and t.policy_mask[:, :, 1].all()


def test_last_step_law_gives_minus_inf_to_any_other_outcome():
    from ursa_engine.reference import logprobs as ref

    x = torch.tensor([0, 5, 63, 63])
    x1 = torch.tensor([3, 5, 7, 9])
    params = torch.zeros(4, dtype=torch.float64)
    assert ref.mixture_step_logprobs(x, x1, torch.tensor([3, 5, 7, 1]), params, last=True).tolist() == \
        [0.0, 0.0, 0.0, -float("inf")]
    assert ref.mask_step_logprobs(x, x1, torch.tensor([0, 5, 7, 9]), params, mask_id=63, last=True).tolist() == \
        [0.0, 0.0, 0.0, 0.0]  # unmasked tokens stay, masked ones become x̂1
    assert ref.mask_step_logprobs(x, x1, torch.tensor([3, 5, 63, 9]), params, mask_id=63,
                                  last=True).tolist()[::2] == [-float("inf"), -float("inf")]


# ------------------------------------------------------------------------------------------ CUDA, bf16
def _max_logit(m, t):
    """max |c|, |u| over every recorded call: the rollout's lm_head outputs (cond and uncond rows)."""
    dev = m.lm_head.weight.device
    B, n = t.states.shape[0], t.states[0, 0].numel()
    rope = m.rope_tables(latent_positions(P, SHAPE, device=dev))
    top = 0.0
    with torch.no_grad():
        for s in range(t.num_calls):
            x = t.states[:, s].reshape(B, n).to(dev)
            for prompt in (t.prompt_ids.to(dev), t.negative_prompt_ids.to(dev).expand(B, -1)):
                hid = m.hidden_states(sequence_ids(prompt, x, CFG), rope=rope, latent_tokens=n, ops_backend="torch")
                top = max(top, (hid @ m.lm_head.weight.T).float().abs().max().item())
    return top


def _bf16_replay_close(got, want, *, max_logit, guidance_scale, temperature):
    """The bf16 tolerance. The replay rounds the logits to bf16 as the rollout did (same lm_head rounding,
    DESIGN §9.2), so log-probs agree to float32 rounding: |Δ| ≤ 5e-5 (a few 1e-5). One exception, rare: a
    logit whose fp32 sum, accumulated in another order (the fused head's Triton tiles, or another cuBLAS
    kernel for another row count), lands on the other bf16 neighbour moves by one ulp of |z| before
    guidance, i.e. log-probs by at most 2·(|s| + |1 − s|)·ulp / T. At most 1% of the entries may do so."""
    err = (got.detach().float().cpu() - want.float().cpu()).abs()
    ulp = 2.0 ** (torch.tensor(max(max_logit, 1e-30)).log2().floor().item() - 7)
    flip = 2 * (abs(guidance_scale) + abs(1 - guidance_scale)) * ulp / temperature
    far = err > 5e-5
    assert far.float().mean().item() <= 0.01, f"{int(far.sum())} of {err.numel()} log-probs off by > 5e-5"
    assert err.max().item() <= flip, f"max error {err.max().item():.3g} > one-ulp rounding bound {flip:.3g}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("path", ["metric-fsq", "mixture"])
@pytest.mark.parametrize("head,sampler", [("fused", "auto"), ("chunked", "triton")], ids=["fused-head", "triton"])
def test_cuda_bf16_rollout_replays_and_differentiates(path, head, sampler):
    """A bf16 rollout on CUDA (guided calls, then unguided ones past the truncation; T = 0.8) through the
    fused head (x̂1 and its log-prob drawn inside the lm_head GEMM) and through the chunked head + the
    Triton sampler; training.trajectory_logprobs equals the recorded x1_logprobs within the bf16
    tolerance of :func:`_bf16_replay_close`, step_logprobs within 1e-5, and a backward pass runs."""
    from ursa_engine.ops_library import head_draw_unavailable

    dev = torch.device("cuda")
    if head == "fused" and head_draw_unavailable(dev) is not None:
        pytest.skip(head_draw_unavailable(dev))
    torch.manual_seed(0)
    m = ue.URSATransformer(CFG, init_std=0.2).to(dev, torch.bfloat16)
    opts = dict(guidance_scale=3.0, guidance_trunc=0.5, temperature=0.8)
    eng = engine_for(m, scheds()[path](), head=head, sampler_backend=sampler)
    out = eng.generate(PROMPTS, NEG, SHAPE, seed=5, return_trajectory=True, **opts)
    t = out.trajectory
    assert t.guided.any() and not t.guided.all()
    assert torch.isfinite(t.x1_logprobs).all() and (t.x1_logprobs <= 0).all()
    m.requires_grad_(True)
    rep = training.trajectory_logprobs(m, None, t)
    assert rep.x1_logprobs.device.type == "cuda" and rep.x1_logprobs.dtype == torch.float32
    _bf16_replay_close(rep.x1_logprobs, t.x1_logprobs, max_logit=_max_logit(m, t), guidance_scale=3.0,
                       temperature=0.8)
    torch.testing.assert_close(rep.step_logprobs.cpu(), t.step_logprobs.cpu(), atol=1e-5, rtol=0)
    rep.x1_logprobs.sum().backward()
    for p in (m.lm_head.weight, m.model.layers[0].self_attn.qkv_proj.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
